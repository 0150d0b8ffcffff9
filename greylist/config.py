"""All settings in one place: defaults, then run-script flags, then environment.

The environment wins over flags on purpose. tcprules sets variables per client
netblock (``1.2.3.:allow,GREYLIST_DELAY="300"``), while a flag in the run
script applies to everybody: the specific beats the general.

:data:`SETTINGS` is the single table of every setting (name, flag, variable,
parser, default, help); the wrapper's hand-written flag reader, the admin
commands' argparse options and the README's table all come from it.
"""

from __future__ import annotations

from greylist.core.policy import Policy
from greylist.core.values import Value


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the setting."""


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``5m``, ``2h``, ``1.5d`` or ``1w``."""
    raw = text.strip().lower()
    unit = 1
    if raw and raw[-1] in _UNITS:
        unit = _UNITS[raw[-1]]
        raw = raw[:-1]
    try:
        value = float(raw) * unit
    except ValueError:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 60, 90s, 5m, 2h, 1d)") from None
    if value != value or value < 0 or value == float("inf"):
        raise ConfigError(f"not a duration: {text!r} (must be a finite number >= 0)")
    return value


def _bounded_duration(low: float, high: float):
    """A duration parser that keeps a value within what select() and timers can use."""
    def parse(text: str) -> float:
        value = parse_duration(text)
        if not low <= value <= high:
            raise ConfigError(f"{text!r} is outside {low:g}..{high:g} seconds")
        return value
    return parse


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off", ""):
        return False
    raise ConfigError(f"not a yes/no value: {text!r}")


def parse_on_error(text: str) -> str:
    value = text.strip().lower()
    if value not in ("pass", "tempfail"):
        raise ConfigError(f"on-error must be 'pass' or 'tempfail', not {text!r}")
    return value


def parse_text(text: str) -> str:
    """Text that goes into an SMTP reply or a header: printable ASCII and spaces (RFC 5321
    allows a tab too, which no greylisting message needs and some parsers choke on);
    anything else (a control character, a line break) would break the reply."""
    bad = next((c for c in text if not " " <= c <= "~"), None)
    if bad is not None:
        raise ConfigError(f"text settings must be printable ASCII (RFC 5321), not {bad!r} in {text[:60]!r}")
    return text


def parse_mode(text: str) -> str:
    value = text.strip().lower()
    if value not in ("enforce", "shadow"):
        raise ConfigError(f"mode must be 'enforce' or 'shadow', not {text!r}")
    return value


def parse_key(text: str) -> str:
    from greylist.core.keys import KEY_MODES

    value = text.strip().lower()
    if value not in KEY_MODES:
        raise ConfigError(f"key must be one of {', '.join(KEY_MODES)}, not {text!r}")
    return value


def _integer(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text.strip().lstrip("/"))
        except ValueError:
            raise ConfigError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{value} is outside {low}..{high}")
        return value
    return parse


def parse_path(text: str) -> str:
    if text and not text.startswith("/"):
        raise ConfigError(f"give an absolute path, not {text!r}")
    if any(c in text for c in "\r\n\0"):
        raise ConfigError("a path cannot contain CR, LF or NUL")
    return text


def parse_paths(text: str) -> str:
    """One absolute path, or several separated by ':' (a repeated flag joins them so)."""
    for part in text.split(":"):
        if part:
            parse_path(part)
    return text


def parse_store(text: str) -> str:
    """A store URL of a kind we have: a typo in the scheme is the setting's error, said at
    once (a server does not start, the wrapper answers 421 as for any bad setting), not a
    store that fails at every connection while mail passes ungreylisted (on_error=pass).
    Only the scheme: its options are the store's to check, when it is opened (a whitelisted
    client's connection imports no store)."""
    from greylist.stores import unknown

    if "://" not in text:
        raise ConfigError(f"store must be a URL such as file:///var/qmail/cqgreylist, not {text!r}")
    why = unknown(text)
    if why is not None:
        raise ConfigError(why)
    return text


#: name, command-line flag, environment variable, parser, default, help
SETTINGS = (
    ("delay", "--delay", "GREYLIST_DELAY", parse_duration, 60.0,
     "how long a new client must wait before its retry passes"),
    ("retry_window", "--retry-window", "GREYLIST_RETRY_WINDOW", parse_duration, 2 * 86400.0,
     "how long a first-seen entry waits for its retry before it counts as new again"),
    ("max_age", "--max-age", "GREYLIST_MAX_AGE", parse_duration, 35 * 86400.0,
     "how long a client that passed stays known after its last pass"),
    ("store", "--store", "GREYLIST_STORE", parse_store, "file:///var/qmail/cqgreylist",
     "where entries live: file:///DIR (cqgreylist tree), sqlite:///PATH, redis://HOST:PORT/DB, "
     "redis+unix:///PATH.sock or memory://"),
    ("mode", "--mode", "GREYLIST_MODE", parse_mode, "enforce",
     "enforce, or shadow: decide and record as usual but let every client through, logging "
     "the verdict enforcing would have given (shadow=tempfail|pass)"),
    ("on_error", "--on-error", "GREYLIST_ON_ERROR", parse_on_error, "pass",
     "when the store fails: pass (fail open, default) or tempfail (fail closed)"),
    ("hostname", "--hostname", "GREYLIST_HOSTNAME", parse_text, "",
     "host name in SMTP replies (default: /var/qmail/control/me, else the machine's name)"),
    ("message", "--message", "GREYLIST_MESSAGE", parse_text, "you are greylisted try again",
     "text of the RCPT and DATA tempfail replies"),
    ("enhanced", "--enhanced-codes", "GREYLIST_ENHANCED", parse_bool, False,
     "add enhanced status code 4.7.1 and a retry hint to the tempfail replies"),
    ("timeout", "--timeout", "GREYLIST_TIMEOUT", _bounded_duration(1, 3600), 300.0,
     "idle seconds before the tempfail dialogue answers 421 and closes"),
    ("session_limit", "--session-limit", "GREYLIST_SESSION_LIMIT", _bounded_duration(1, 86400), 600.0,
     "seconds a whole tempfail dialogue may last, however active, before it answers 421 and closes"),
    ("key", "--key", "GREYLIST_KEY", parse_key, "ip",
     "what an entry is keyed on: ip, subnet, triplet or triplet-subnet (triplets need "
     "greylist-spp or greylist policyd)"),
    ("subnet_v4", "--subnet-v4", "GREYLIST_SUBNET_V4", _integer(8, 32), 24,
     "prefix length of an IPv4 client's network in subnet modes"),
    ("subnet_v6", "--subnet-v6", "GREYLIST_SUBNET_V6", _integer(16, 128), 64,
     "prefix length of an IPv6 client's network in subnet modes"),
    ("auto_whitelist", "--auto-whitelist", "GREYLIST_AUTO_WHITELIST", _integer(0, 1_000_000), 5,
     "with triplet keys: passed deliveries after which a client skips greylisting (0: off)"),
    ("whitelist", "--whitelist", "GREYLIST_WHITELIST", parse_paths, "",
     "file of client networks (CIDR, partial addresses) and host names that skip greylisting; "
     "repeat the flag, or separate paths with ':', for several files"),
    ("whitelist_recipients", "--whitelist-recipients", "GREYLIST_WHITELIST_RECIPIENTS", parse_paths, "",
     "file of recipients (address, @domain or local@) who opt out of greylisting; several as above"),
    ("privacy", "--privacy", "GREYLIST_PRIVACY", parse_bool, False,
     "store keys as SHA-1 hashes (postgrey's --privacy): the store shows no addresses; "
     "the log lines still do"),
    ("hostname_verified", "--hostname-verified", "GREYLIST_HOSTNAME_VERIFIED", parse_bool, False,
     "TCPREMOTEHOST is a verified name (tcpserver -p): only then do host-name whitelist entries "
     "apply (greylist serve -p and Postfix's client_name are verified by themselves)"),
)

#: settings that hold several paths: a repeated flag adds one
LIST_SETTINGS = frozenset({"whitelist", "whitelist_recipients"})

BOOLEAN_FLAGS = frozenset(flag for _, flag, _, parser, _, _ in SETTINGS if parser is parse_bool)


class Config(Value):
    """Every setting of every front end; build it with :func:`load`."""

    __slots__ = tuple(s[0] for s in SETTINGS)

    def __init__(self, **values: object) -> None:
        for name, _flag, _env, _parser, default, _help in SETTINGS:
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"unknown settings: {', '.join(sorted(values))}")

    @property
    def policy(self) -> Policy:
        return Policy(self.delay, self.retry_window, self.max_age, self.auto_whitelist)

    @property
    def keying(self):
        from greylist.core.keys import Keying

        return Keying(self.key, self.subnet_v4, self.subnet_v6)


def load(flags: dict[str, str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Defaults, overridden by flags (text, keyed by setting name), overridden by environment."""
    flags = flags or {}
    values: dict[str, object] = {}
    for name, flag, _env, parser, _default, _help in SETTINGS:
        raw = flags.get(name)
        if raw is not None:
            try:
                values[name] = parser(raw) if isinstance(raw, str) else raw
            except ConfigError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    return override(Config(**values), environ or {})


def override(config: Config, environ: dict[str, str]) -> Config:
    """A configuration with per-client variables (tcprules') on top of ``config``."""
    values = {name: getattr(config, name) for name in Config.__slots__}
    for name, _flag, env, parser, _default, _help in SETTINGS:
        raw = environ.get(env)
        if raw is not None:
            try:
                values[name] = parser(raw)
            except ConfigError as exc:
                raise ConfigError(f"{env}: {exc}") from None
    result = Config(**values)
    try:
        result.policy
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return result


def add_setting_options(parser, names: tuple[str, ...], environment: bool = True) -> None:
    """argparse options for the named settings, from the one settings table.

    Used by the admin commands and the simulator (never by the wrapper, which
    must not import argparse); options default to None so that unset ones
    fall through to the environment and the defaults in :func:`load`.
    """
    for name, flag, env, _parser, default, help_text in SETTINGS:
        if name in names:
            also = f"env {env}; " if environment else ""
            if flag in BOOLEAN_FLAGS:
                parser.add_argument(flag, dest=name, action="store_const", const="1",
                                    help=f"{help_text} ({also}default off)")
            elif name in LIST_SETTINGS:
                parser.add_argument(flag, dest=name, metavar="FILE", action="append",
                                    help=f"{help_text} ({also}default none)")
            else:
                parser.add_argument(flag, dest=name, metavar=name.upper(),
                                    help=f"{help_text} ({also}default {default!r})")


def flags_of(args: object) -> dict[str, str]:
    """The settings an argparse namespace was given, keyed by setting name."""
    flags = {}
    for name, *_ in SETTINGS:
        value = getattr(args, name, None)
        if value is not None:
            flags[name] = ":".join(value) if isinstance(value, list) else value
    return flags


def usage() -> str:
    """Every setting with its flag, variable and default, for --help."""
    lines = ["settings (a variable overrides the flag: tcprules sets them per netblock):"]
    for name, flag, env, _parser, default, help_text in SETTINGS:
        lines.append(f"  {flag} / {env} (default {default!r})\n      {help_text}")
    return "\n".join(lines) + "\n"


def split_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Read ``--flag value`` / ``--flag=value`` options up to the program to run.

    Hand-written rather than argparse, which costs the wrapper 5 ms a connection.
    """
    by_flag = {flag: name for name, flag, *_ in SETTINGS}
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("--"):
            break
        flag, eq, value = arg.partition("=")
        if flag not in by_flag:
            raise ConfigError(f"unknown option {flag}")
        name = by_flag[flag]
        if flag in BOOLEAN_FLAGS:
            value = value if eq else "1"
        elif not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option {flag} needs a value")
            i += 1
            value = argv[i]
        if name in LIST_SETTINGS and name in flags:
            value = f"{flags[name]}:{value}"  # a repeated --whitelist adds a file
        flags[name] = value
        i += 1
    return flags, argv[i:]
