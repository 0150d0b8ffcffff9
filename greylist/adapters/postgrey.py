"""``greylist postgrey [postgrey's options]``: greylist policyd with postgrey's command line.

A Debian site swaps the binary and keeps ``POSTGREY_OPTS``: every option of
postgrey 1.37 is read with postgrey's units and defaults (``--delay`` in
seconds, 300; ``--max-age`` in days, 35; ``--retry-window`` in days or
``Nh``, 2 days; ``--inet=PORT`` binds localhost, as postgrey does; the
whitelists default to /etc/postgrey/whitelist_clients and
whitelist_recipients and their ``.local`` companions), and postgrey's
replies (``--greylist-action``, ``--greylist-text`` with ``%s`` and ``%r``,
``--x-greylist-header``, 4.2.0 for Exchange clients) come from
:class:`~greylist.adapters.policyd.Replies`. Triplets by /24 (``--ipv4cidr``)
or /64 (``--ipv6cidr``), or by host with ``--lookup-by-host``; the client
auto-whitelist counts as postgrey counts. Our settings (``--store``, ``--mode
shadow``, GREYLIST_* variables) may be added. Stale entries are removed as postgrey
removes them, once a night (:mod:`greylist.adapters.nightly`): no cron job to add.

The database is ours, one SQLite file in ``--dbdir`` (``greylist.sqlite``);
postgrey's own Berkeley DB files are brought over once with ``greylist migrate
postgrey:///var/lib/postgrey ...`` (:mod:`greylist.stores.postgrey`), not
served from. ``--privacy`` stores SHA-1 hashes of the keys, as postgrey does
(auto-whitelisted clients of a postgrey ``--privacy`` database migrate; its
hashed triplets cannot); ``--exim`` closes the connection after each answer.
"""

from __future__ import annotations

import getopt
import os
import sys

from greylist import __version__
from greylist.config import ConfigError, load
from greylist.service import log_line

POSTGREY_VERSION = "1.37"
CONFIG_DIR = "/etc/postgrey"
DEFAULT_DBDIR = "/var/lib/postgrey"
DEFAULT_TEXT = "Greylisted, see http://postgrey.schweikert.ch/help/%r.html"
DEFAULT_HEADER = "X-Greylist: delayed %t seconds by postgrey-%v at %h; %d"

LONG = ["help", "man", "version", "noaction", "no-action", "verbose", "quiet", "daemonize", "unix=", "inet=",
        "socketmode=", "user=", "group=", "dbdir=", "pidfile=", "delay=", "max-age=", "lookup-by-subnet",
        "lookup-by-host", "ipv4cidr=", "ipv6cidr=", "auto-whitelist-clients=", "whitelist-clients=",
        "whitelist-recipients=", "syslogfacility=", "syslog-facility=", "facility=", "retry-window=",
        "greylist-action=", "greylist-text=", "privacy", "hostname=", "exim", "listen-queue-size=",
        "x-greylist-header=",
        # ours
        "store=", "mode=", "accept-test-time"]
SHORT = "hnvqdu:i:"
ALIASES = {"-h": "--help", "-n": "--noaction", "-v": "--verbose", "-q": "--quiet", "-d": "--daemonize",
           "-u": "--unix", "-i": "--inet", "--no-action": "--noaction", "--syslogfacility": "--syslog-facility",
           "--facility": "--syslog-facility"}
REFUSED = {"--noaction": "is refused by postgrey itself"}


#: what --help prints: postgrey's own usage, its options in its order, units and defaults,
#: each as greylist postgrey takes it, and what we add. An admin who swaps the binary
#: types --help to check an option, not to read this module's docstring.
USAGE = """Usage:
    greylist postgrey [postgrey's options...]     (or greylist-postgrey)

     -h, --help              display this help and exit
         --version           output version information and exit
     -v, --verbose           log every decision (the default)
         --syslog-facility   syslog facility, with --daemonize (default mail)
     -q, --quiet             log no decisions, only errors and warnings (beats -v)
     -u, --unix=PATH         listen on unix socket PATH
         --socketmode=MODE   unix socket permission (default 0666)
     -i, --inet=[HOST:]PORT  listen on PORT, localhost if HOST is not specified
     -d, --daemonize         run in the background, logging to syslog
         --pidfile=PATH      put daemon pid into this file
         --user=USER         run as USER (default: postgrey)
         --group=GROUP       run as group GROUP (default: USER's group)
         --dbdir=PATH        put the database in PATH (default: /var/lib/postgrey):
                             one SQLite file, greylist.sqlite
         --delay=N           greylist for N seconds (default: 300)
         --max-age=N         delete entries older than N days since the last time
                             that they have been seen (default: 35), once a night
         --retry-window=N    allow only N days for the first retrial (default: 2)
                             append 'h' if you want to specify it in hours
         --greylist-action=A if greylisted, return A to Postfix (default: DEFER_IF_PERMIT)
         --greylist-text=TXT response when a mail is greylisted, %s the seconds left
                             and %r the recipient's domain (default: Greylisted, see
                             http://postgrey.schweikert.ch/help/%r.html)
         --lookup-by-subnet  strip the last bits from IP addresses, as ipv4cidr and
                             ipv6cidr say (default)
         --ipv4cidr=N        the subnet of IPv4 addresses with lookup-by-subnet (default: 24)
         --ipv6cidr=N        the subnet of IPv6 addresses with lookup-by-subnet (default: 64)
         --lookup-by-host    do not strip the last bits from IP addresses
         --privacy           store data using one-way hash functions (SHA-1)
         --hostname=NAME     set the hostname (default: `hostname`)
         --exim              don't reuse a socket for more than one query (exim compatible)
         --whitelist-clients=FILE     default: /etc/postgrey/whitelist_clients
         --whitelist-recipients=FILE  default: /etc/postgrey/whitelist_recipients
         --auto-whitelist-clients=N   whitelist a client after N deliveries that
                                      waited (default 5, counted as postgrey counts);
                                      N=0 disables it
         --listen-queue-size=N        allow for N waiting connections to our socket
                                      (default: as many as the system allows)
         --x-greylist-header=TXT      header when a mail was delayed by greylisting
                                      default: X-Greylist: delayed <seconds> seconds by
                                      postgrey-<version> at <server>; <date>

     Note that the --whitelist-x options can be specified multiple times,
     and that per default /etc/postgrey/whitelist_clients.local and
     /etc/postgrey/whitelist_recipients.local are also read, so that you can put
     there local entries.

 greylist's own, beside postgrey's:
         --store=URL         the database instead of --dbdir's file: sqlite:///PATH,
                             redis://HOST:PORT/DB, file:///DIR or memory://
         --mode=shadow       decide and log, but let every mail through (try it first)
         GREYLIST_*          settings from the environment, as greylist policyd takes them

 postgrey's database is brought over once, before the switch:
     greylist migrate postgrey:///var/lib/postgrey sqlite:///var/lib/postgrey/greylist.sqlite
"""


class PostgreyError(ValueError):
    """A postgrey option we cannot honour; the message says which and why."""


class Plan:
    """What the options ask for: our settings, the listener and the server's behaviour."""

    def __init__(self) -> None:
        self.flags: dict[str, str] = {}
        self.listen = ""
        self.socket_mode = 0o666  # postgrey's default for --unix
        self.backlog: int | None = None
        self.user = "postgrey"
        self.group: str | None = None
        self.user_given = False
        self.pidfile: str | None = None
        self.dbdir = DEFAULT_DBDIR
        self.daemonize = False
        self.facility = "mail"
        self.quiet = False
        self.action = "DEFER_IF_PERMIT"
        self.text = DEFAULT_TEXT
        self.header = DEFAULT_HEADER
        self.version_only = False
        self.test_time = False  # honour policy_test_time (differential tests against postgrey only)
        self.one_request = False  # --exim: one request per connection
        self.help = False


#: our reasons for a decision, in postgrey's words (its log's action= and reason=)
POSTGREY_REASONS = {"new": ("greylist", "new"), "known": ("pass", "triplet found"),
                    "passed": ("pass", "triplet found"), "auto-whitelisted": ("pass", "client AWL"),
                    "whitelisted": ("pass", "client whitelist"),
                    "whitelisted-recipient": ("pass", "recipient whitelist")}


def postgrey_line(program: str, fields: dict) -> bytes:
    """A decision's log line as postgrey writes it (``[QUEUE_ID: ]action=greylist,
    reason=new, client_name=..., client_address=..., sender=..., recipient=...``), so
    that Debian's logcheck rules, an admin's habits and ``simulate replay --format
    postgrey`` keep working; it goes to syslog as ``postgrey[PID]:`` (--daemonize, or a
    unit's SyslogIdentifier). Anything postgrey has no words for (errors, shadow mode,
    start-up) is our own line. The request's values are postgrey's (as Postfix sent
    them), anything unprintable written %XX as Net::Server writes postgrey's: a log line is
    never split or forged."""
    request = fields.get("_request")
    if request and "whitelisted_after" in fields and "shadow" not in fields:
        note = _postgrey_text(f"whitelisted: {_postgrey_client(request, fields.get('ip', ''))}")
        if fields.get("verdict") is None:  # -q: the decision itself goes unlogged
            return note
        return note + postgrey_line(program, {k: v for k, v in fields.items() if k != "whitelisted_after"})
    reason = fields.get("reason")
    words = POSTGREY_REASONS.get(reason)  # one test passes the usual line
    if (not request or (words is None and reason != "too-soon") or "shadow" in fields
            or fields.get("verdict") not in ("pass", "tempfail")):
        if fields.get("expire") == "started":  # the nightly clean-up (greylist.adapters.nightly)
            return b"cleaning up old entries...\n"
        if fields.get("expire") == "done" and "removed" in fields:
            scanned = int(fields.get("scanned", 0))
            return (f"cleaning main database finished. before: {scanned}, "
                    f"after: {scanned - int(fields['removed'])}\n").encode("ascii")
        return log_line(program, {k: v for k, v in fields.items() if k != "_request"})
    if words is None:  # too soon
        words = ("greylist", f"early-retry ({max(0, int(float(fields.get('retry_in', 0)) + 0.999))}s missing)")
    line = f"action={words[0]}, reason={words[1]}"
    if reason == "passed" and "header" not in fields:  # postgrey says the delay with its header
        line += f", delay={int(float(fields.get('age', 0)))}"
    for name in ("client_name", "client_address", "sender", "recipient"):
        value = request.get(name)
        if value and value != "0":  # Perl's truth, as postgrey tests it
            line += f", {name}={value}"
    if "truncated" in fields:  # ours: what was cut (postgrey's logcheck rule allows a tail)
        line += f", truncated={fields['truncated']}"
    queue_id = request.get("queue_id")
    if queue_id and queue_id != "0":
        line = f"{queue_id}: {line}"
    return _postgrey_text(line)


def _postgrey_text(line: str) -> bytes:
    """A line as Net::Server writes postgrey's log: anything unprintable as %XX."""
    if not (line.isascii() and line.isprintable()):
        line = "".join(c if " " <= c <= "~" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
                       for c in line)
    return (line + "\n").encode("ascii")


def _postgrey_client(request: dict, ip: str) -> str:
    """The client as postgrey's "whitelisted:" line names it: ``NAME[ADDRESS]``, or the address
    alone without a name (Perl's truth: "unknown" is a name), the address as NetAddr::IP's
    ``addr`` writes it (an IPv6 address in eight groups, upper case: 2001:DB8:0:0:0:0:0:25)."""
    from greylist.core.keys import BadAddress, packed_ip

    try:
        packed = packed_ip(ip)
    except BadAddress:
        address = ip
    else:
        address = ip if len(packed) == 4 else ":".join(
            f"{packed[i] << 8 | packed[i + 1]:X}" for i in range(0, 16, 2))
    name = request.get("client_name")
    return f"{name}[{address}]" if name and name != "0" else address


#: options postgrey reads as `$opt{x} || default` ("" and "0" mean the default), and the
#: attributes of the plan that each sets
FALSE_IS_DEFAULT = {"--socketmode": ("socket_mode",), "--user": ("user", "user_given"), "--group": ("group",),
                    "--dbdir": ("dbdir",), "--pidfile": ("pidfile",), "--syslog-facility": ("facility",),
                    "--greylist-action": ("action",), "--greylist-text": ("text",),
                    "--x-greylist-header": ("header",)}


def _reset(plan: Plan, opt: str) -> None:
    """The option as if it were not given (a later one overrides an earlier, as Getopt::Long does)."""
    fresh = Plan()
    for name in FALSE_IS_DEFAULT[opt]:
        setattr(plan, name, getattr(fresh, name))


def _number(plan: Plan, flag: str, number: int, unit: str = "") -> None:
    """postgrey's `$opt{delay} || 300` and the like: 0 is the default (--delay=0 is 300 s,
    --max-age=0 35 days, --ipv4cidr=0 a /24, never every client in one network)."""
    if number:
        plan.flags[flag] = f"{number}{unit}"
    else:
        plan.flags.pop(flag, None)


def _whole(value: str, option: str) -> int:
    """A number as Getopt::Long's ``=i`` takes it (``+60`` too). A negative one, which
    postgrey also takes (``--delay=-5`` would pass every client at once), is refused."""
    text = value.strip().removeprefix("+")
    if not text.isdigit():
        raise PostgreyError(f"{option} takes a whole number of 0 or more, not {value!r}")
    return int(text)


def _reply_text(value: str, option: str) -> str:
    """Text that goes into the reply line: a line break would end it early and start
    another attribute (postgrey takes it as it is)."""
    from greylist.config import ConfigError, parse_text

    try:
        return parse_text(value)
    except ConfigError as exc:
        raise PostgreyError(f"{option}: {exc}") from None


def _existing(paths: list[str], warn) -> str:
    """The whitelist files that exist, joined; a missing file given by hand is warned about
    (as postgrey does), a missing ``.local`` companion is not."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif not path.endswith(".local"):
            warn(f"can't open {path}: No such file or directory")
    return ":".join(found)


def _optional_values(argv: list[str]) -> list[str]:
    """--auto-whitelist-clients takes an optional value (Getopt::Long's ``:s``): a bare one
    means 5, and a following number is its value."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--auto-whitelist-clients":
            if i + 1 < len(argv) and argv[i + 1].isdigit():
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            else:
                arg = f"{arg}="
        out.append(arg)
        i += 1
    return out


def _whole_names(argv: list[str]) -> None:
    """postgrey's Getopt::Long (posix_default) takes no abbreviation: ``--del=60`` is
    "Unknown option: del" and postgrey exits 1. Python's getopt would take it for
    ``--delay``, so an option mistyped in POSTGREY_OPTS would change what it means."""
    names = {option.rstrip("=") for option in LONG}
    values = {option[:-1] for option in LONG if option.endswith("=")}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return
        if arg.startswith("--"):
            name, given, _ = arg[2:].partition("=")
            if name not in names:
                raise PostgreyError(f"Unknown option: {name} (postgrey takes every option by its whole name)")
            i += name in values and not given  # its value is the next argument
        elif arg in ("-u", "-i"):
            i += 1
        i += 1


def parse(argv: list[str], warn=lambda text: None) -> Plan:
    _whole_names(argv)
    argv = _optional_values(argv)
    try:
        pairs, rest = getopt.gnu_getopt(argv, SHORT, LONG)
    except getopt.GetoptError as exc:
        raise PostgreyError(str(exc)) from None
    for stray in rest:
        # postgrey (Getopt::Long) leaves arguments that are no option alone, and Debian's
        # init script always passes "$POSTGREY_TEXT_OPT", an empty one unless POSTGREY_TEXT is set
        if stray:
            warn(f"argument {stray!r} is not an option: ignored, as postgrey ignores it")
    plan = Plan()
    clients: list[str] = []
    recipients: list[str] = []
    for opt, value in pairs:
        opt = ALIASES.get(opt, opt)
        if opt in REFUSED:
            raise PostgreyError(f"{opt} ({REFUSED[opt]}) is not supported by greylist postgrey")
        if opt in ("--help", "--man"):
            plan.help = True
        elif opt == "--version":
            plan.version_only = True
        elif opt == "--verbose":
            pass  # every decision is logged unless --quiet, which beats it in any order (postgrey's log_level)
        elif opt == "--quiet":
            plan.quiet = True
        elif opt == "--daemonize":
            plan.daemonize = True
        elif opt == "--unix":
            plan.listen = f"unix:{value}"
        elif opt == "--inet":
            host, _, port = value.rpartition(":")
            if not port.isdigit() or int(port) > 65535:
                raise PostgreyError(f"--inet takes [HOST:]PORT, a port up to 65535, not {value!r}")
            plan.listen = f"{host or 'localhost'}:{port}"  # postgrey binds localhost by default
        elif opt in FALSE_IS_DEFAULT and value in ("", "0"):
            # postgrey takes these as `$opt{x} || default`: Perl's false ("" and "0") is the
            # default, so --user=0 runs as postgrey, --socketmode=0 is 0666
            _reset(plan, opt)
        elif opt == "--socketmode":
            try:
                plan.socket_mode = int(value, 8)
            except ValueError:
                raise PostgreyError(f"--socketmode takes an octal mode such as 0660, not {value!r}") from None
        elif opt == "--user":
            plan.user, plan.user_given = value, True
        elif opt == "--group":
            plan.group = value
        elif opt == "--dbdir":
            plan.dbdir = os.path.abspath(value)
        elif opt == "--pidfile":
            plan.pidfile = value
        elif opt == "--delay":
            _number(plan, "delay", _whole(value, opt))
        elif opt == "--max-age":
            _number(plan, "max_age", _whole(value, opt), "d")
        elif opt == "--retry-window":
            text = value.strip().lower()
            if text.endswith("h") and text[:-1].isdigit():
                plan.flags["retry_window"] = f"{int(text[:-1])}h"
            elif text.isdigit():
                plan.flags["retry_window"] = f"{int(text)}d"
            else:
                raise PostgreyError("--retry-window must be either a number of days or a number followed "
                                    "by 'h' for hours ('6h' for example)")
        elif opt == "--lookup-by-host":
            plan.flags["key"] = "triplet"
        elif opt == "--lookup-by-subnet":
            pass  # postgrey's default
        elif opt == "--ipv4cidr":
            _number(plan, "subnet_v4", _whole(value, opt))
        elif opt == "--ipv6cidr":
            _number(plan, "subnet_v6", _whole(value, opt))
        elif opt == "--auto-whitelist-clients":
            plan.flags["auto_whitelist"] = str(_whole(value, opt)) if value != "" else "5"
        elif opt == "--whitelist-clients":
            clients.append(value)
        elif opt == "--whitelist-recipients":
            recipients.append(value)
        elif opt == "--syslog-facility":
            plan.facility = value
        elif opt == "--greylist-action":
            plan.action = _reply_text(value, opt)
        elif opt == "--greylist-text":
            plan.text = _reply_text(value, opt)
        elif opt == "--x-greylist-header":
            plan.header = _reply_text(value, opt)
        elif opt == "--privacy":
            plan.flags["privacy"] = "1"
        elif opt == "--exim":
            plan.one_request = True
        elif opt == "--hostname":
            plan.flags["hostname"] = value
        elif opt == "--listen-queue-size":
            plan.backlog = _whole(value, opt) or None  # 0: Net::Server's default, as large as allowed
        elif opt == "--store":
            plan.flags["store"] = value
        elif opt == "--mode":
            plan.flags["mode"] = value
        elif opt == "--accept-test-time":
            plan.test_time = True
    if plan.help or plan.version_only:
        return plan
    if not plan.listen:
        raise PostgreyError("--unix or --inet must be specified")
    plan.flags.setdefault("store", f"sqlite://{plan.dbdir}/greylist.sqlite")  # --store: ours, it wins
    plan.flags.setdefault("delay", "300")
    plan.flags.setdefault("max_age", "35d")
    plan.flags.setdefault("key", "triplet-subnet")
    plan.flags.setdefault("auto_whitelist", "5")
    clients = clients or [f"{CONFIG_DIR}/whitelist_clients", f"{CONFIG_DIR}/whitelist_clients.local"]
    plan.flags["whitelist"] = _existing(clients, warn)
    recipients = recipients or [f"{CONFIG_DIR}/whitelist_recipients", f"{CONFIG_DIR}/whitelist_recipients.local"]
    plan.flags["whitelist_recipients"] = _existing(recipients, warn)
    return plan


def _ids(plan: Plan) -> tuple[int | None, int | None]:
    """The uid and gid to run as: postgrey's --user (default postgrey) and --group (default
    the user's group). Only root can switch; anybody else runs as itself."""
    import grp
    import pwd

    if os.geteuid() != 0:
        if plan.user_given or plan.group:
            raise PostgreyError("--user and --group need root")
        return None, None
    try:
        entry = pwd.getpwnam(plan.user) if not plan.user.isdigit() else pwd.getpwuid(int(plan.user))
    except KeyError:
        if not plan.user_given:
            return None, None  # no postgrey user on this machine: stay as we are
        raise PostgreyError(f"--user {plan.user}: no such user") from None
    gid = entry.pw_gid
    if plan.group:
        try:
            gid = grp.getgrnam(plan.group).gr_gid if not plan.group.isdigit() else int(plan.group)
        except KeyError:
            raise PostgreyError(f"--group {plan.group}: no such group") from None
    return entry.pw_uid, gid


def write_pidfile(path: str) -> None:
    """The pid file, created new beside its place and renamed over it (never through a link)."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def give_to(path: str, uid: int | None, gid: int | None) -> None:
    """Our socket to the user we become (the link itself, were one put in its place)."""
    if uid is None and gid is None:
        return
    try:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
    except OSError as exc:
        raise PostgreyError(f"cannot give {path} to user {uid}, group {gid}: {exc.strerror}") from None


def remove_pidfile(path: str) -> None:
    """At exit, as Net::Server does, where the directory lets the user: only a pid file
    that is still ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            if f.read(32).strip() == str(os.getpid()):
                os.unlink(path)
    except (OSError, ValueError):
        pass  # another's now, or a directory the user may not write: left, as postgrey leaves it


def daemonize(facility: str, drop=lambda: None):
    """Detach as postgrey --daemonize does; from then on log lines go to syslog, through a
    process that ``drop``s root's privileges as the server will (it reads what clients wrote).

    The caller (an init script) gets its prompt back only when the server calls the function
    returned here: once its pid file is written and SIGHUP reloads it. Returning at the fork
    let an init script's ``start`` then ``reload`` find no pid file yet, or kill the server
    with a SIGHUP that came before its handler. A server that ends before it is ready makes
    the caller exit 1 (its reasons went to syslog)."""
    import syslog

    from greylist.adapters.logwriter import priority_of

    told, tell = os.pipe()
    if os.fork():
        os.close(tell)
        if os.read(told, 1):
            os._exit(0)
        sys.stderr.write("greylist postgrey: ERROR: the server ended as it started (its reasons are in syslog)\n")
        os._exit(1)
    os.close(told)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    read, write = os.pipe()
    if os.fork() == 0:  # the log forwarder: stderr lines to syslog, until the server exits
        try:
            # nothing of the server's or the caller's: the server's listening socket held here
            # would keep the port taken for a restart until this process has read the last
            # line, and the caller's stderr would keep an init script's output pipe open
            os.dup2(null, 2)
            os.closerange(3, read)
            os.closerange(read + 1, max(os.sysconf("SC_OPEN_MAX"), read + 1))
            drop()
            code = getattr(syslog, f"LOG_{facility.upper()}", syslog.LOG_MAIL)
            syslog.openlog("postgrey", syslog.LOG_PID, code)
            with os.fdopen(read, "rb") as lines:
                for line in lines:  # each at its priority, as postgrey's Net::Server logs its own
                    level, text = priority_of(line)
                    syslog.syslog(level, text.decode("ascii", "replace").rstrip("\n"))
        finally:
            os._exit(0)  # never the server's code in a second process
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    os.close(null)

    def ready() -> None:
        os.write(tell, b"1")
        os.close(tell)

    return ready


def unmigrated(plan: Plan) -> dict[str, object] | None:
    """The start's warning when postgrey's database lies in --dbdir and our database there is
    new: the binary was swapped and the migration forgotten, so every client postgrey knew
    (its triplets, its auto-whitelisted clients) is greylisted again. Said in the log, with
    the command that brings them over, rather than found from the complaints."""
    ours = f"{plan.dbdir}/greylist.sqlite"
    if plan.flags.get("store") != f"sqlite://{ours}" or not os.path.isfile(f"{plan.dbdir}/postgrey.db"):
        return None
    try:
        if os.stat(ours).st_size:
            return None
    except OSError:
        pass  # not there yet: made at this start
    return {"warning": f"postgrey's database is in {plan.dbdir} and {ours} is new: the clients postgrey "
                       "knew are greylisted again until it is migrated (safe while this server runs): "
                       f"greylist migrate postgrey://{plan.dbdir} sqlite://{ours}"}


def main(argv: list[str] | None = None) -> int:
    from greylist.adapters import reloads

    reloads.hold()  # greylist-postgrey starts here: a reload while it starts waits
    argv = sys.argv[1:] if argv is None else argv

    def warn(text: str) -> None:
        sys.stderr.write(f"greylist postgrey: WARNING: {text}\n")

    try:
        plan = parse(argv, warn)
    except PostgreyError as exc:
        sys.stderr.write(f"greylist postgrey: ERROR: {exc}\n")
        return 1
    if plan.version_only:
        sys.stdout.write(f"postgrey {POSTGREY_VERSION} (greylist {__version__})\n")
        return 0
    if plan.help:
        sys.stdout.write(USAGE)
        return 0
    try:
        config = load(plan.flags, os.environ)  # GREYLIST_* variables may add to postgrey's options
        uid, gid = _ids(plan)
    except (ConfigError, PostgreyError) as exc:
        sys.stderr.write(f"greylist postgrey: ERROR: {exc}\n")
        return 1
    from greylist.adapters.acceptor import drop_privileges
    from greylist.adapters.policyd import Replies, serve, unix_path

    pid_written = []
    socket_path = unix_path(plan.listen)
    tell_ready = []

    def after_bind() -> None:
        if plan.daemonize:
            tell_ready.append(daemonize(plan.facility, lambda: drop_privileges(uid, gid)))
        if plan.pidfile:
            write_pidfile(plan.pidfile)
            pid_written.append(os.getpid())
        # Net::Server hands the unix socket to the user before it drops root: with
        # --socketmode=0660, Postfix reaches the socket through that group. It hands over
        # the pid file too, and Debian's init script cannot then reload postgrey
        # (start-stop-daemon: "matching only on non-root pidfile ... is insecure"): ours
        # stays root's, so reload works
        if socket_path is not None:
            give_to(socket_path, uid, gid)
        drop_privileges(uid, gid)

    replies = Replies(plan.action, plan.text, plan.header, f"{POSTGREY_VERSION}-greylist-{__version__}")
    try:
        return serve(plan.listen, config, replies=replies, backlog=plan.backlog, socket_mode=plan.socket_mode,
                     quiet=plan.quiet, after_bind=after_bind, program="greylist-postgrey",
                     test_time=plan.test_time, one_request=plan.one_request, line_format=postgrey_line,
                     nightly_expiry=True, ready=lambda: [tell() for tell in tell_ready],
                     notes=[note for note in (unmigrated(plan),) if note is not None],
                     levels=True if plan.daemonize else None)  # its forwarder takes each line's priority
    except PostgreyError as exc:
        sys.stderr.write(f"greylist postgrey: ERROR: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"greylist postgrey: ERROR: cannot listen on {plan.listen}: {exc}\n")
        return 1
    finally:
        if pid_written == [os.getpid()]:
            remove_pidfile(plan.pidfile)


if __name__ == "__main__":
    raise SystemExit(main())
