"""``greylist-wrap PROGRAM [ARGS...]``: the UCSPI wrapper that replaces cqgreylist.

tcpserver runs it once per SMTP connection, in front of qmail-smtpd::

    tcpserver ... 0 smtp greylist-wrap qmail-smtpd HOST checkpassword true 2>&1

It decides from TCPREMOTEIP, then either replaces itself with PROGRAM
(``os.execvp``: same pid, same environment, no shell, no parent left behind)
or speaks the tempfail dialogue itself and exits.

It starts once per connection, so it imports only ``os``, ``time``, ``select``,
``_socket`` and the store it uses: no argparse, logging, re, dataclasses,
redis or asyncio (test_pass_path_imports_nothing_heavy in tests/adapters/test_wrap.py
enforces this for each store).
"""

from __future__ import annotations

import os
import sys
import time

from greylist.config import ConfigError, load, split_flags
from greylist.core.keys import BadAddress, parse_ip
from greylist.core.policy import PASS, Verdict

EX_TEMPFAIL = 111  # qmail's "temporary failure" exit status

USAGE = "usage: greylist-wrap [--delay 60] [--store URL] [--on-error pass|tempfail] ... PROGRAM [ARGS...]"


def log(fields: dict[str, object]) -> None:
    from greylist import service as decision

    decision.log("greylist-wrap", fields)


def say(reply: str) -> None:
    from greylist.service import write
    from greylist.adapters.smtp import encode

    write(1, encode(reply))


def refuse(host_setting: str, fields: dict[str, object]) -> int:
    """Log why we cannot decide and answer 421: the client keeps its mail and retries."""
    from greylist.adapters.hostname import smtp_hostname
    from greylist.adapters.smtp import unavailable

    log(fields)
    say(unavailable(smtp_hostname(host_setting)))
    return EX_TEMPFAIL


def runnable(name: str) -> str | None:
    """Why PROGRAM cannot be run (not found, not executable), or None: checked before the
    log line, so that a connection logs one line even when its program is missing."""
    if "/" in name:
        candidates = [name]
    else:
        candidates = [f"{d or '.'}/{name}" for d in os.environ.get("PATH", os.defpath).split(":")]
    for path in candidates:
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return None
    return "not an executable file" if "/" in name else "not found in PATH"


def run_program(program: list[str], host_setting: str, fields: dict[str, object]) -> int:
    """Log the connection's line and hand the connection to PROGRAM; returns only if it cannot run."""
    import _signal

    problem = runnable(program[0])
    if problem is not None:
        return refuse(host_setting, dict(fields, verdict="error", error=f"cannot run {program[0]}: {problem}"))
    log(fields)

    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec:
    # qmail-smtpd must get the default dispositions a shell would give it.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(_signal, name):
            _signal.signal(getattr(_signal, name), _signal.SIG_DFL)
    try:
        os.execvp(program[0], program)
    except OSError as exc:  # it vanished or broke since the check: a second line, for this rare case
        fields = dict(fields, verdict="error", error=f"cannot run {program[0]}: {exc.strerror}")
        return refuse(host_setting, fields)
    return EX_TEMPFAIL  # pragma: no cover - execvp does not return


def serve_tempfail(config, verdict: Verdict, rfd: int = 0, wfd: int = 1) -> None:
    """Speak the greylisting dialogue until QUIT, EOF, or a bound (idle, session, lines, bytes)."""
    import select

    from greylist.adapters.hostname import smtp_hostname
    from greylist.adapters.smtp import Dialogue, TempfailSession

    session = TempfailSession(Dialogue(
        smtp_hostname(config.hostname), config.message, config.enhanced, verdict.retry_in))
    deadline = time.monotonic() + config.session_limit

    def send(data: bytes) -> bool:
        try:
            os.write(wfd, data)
            return True
        except OSError:
            return False

    if not send(session.greeting()):
        return
    while not session.closed:
        left = deadline - time.monotonic()
        if left <= 0:
            send(session.expired())
            return
        try:
            ready, _, _ = select.select([rfd], [], [], min(config.timeout, left))
        except (OSError, ValueError):
            return
        if not ready:
            send(session.idle() if left > config.timeout else session.expired())
            return
        try:
            data = os.read(rfd, 4096)
        except OSError:
            return
        if not data:
            return  # EOF, possibly mid-line: nothing more to say
        if not send(session.feed(data)):
            return


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        from greylist.config import usage

        os.write(1, (USAGE + "\n\n" + usage()).encode())
        return 0
    environ = os.environ
    pid = os.getpid()
    host_setting = environ.get("GREYLIST_HOSTNAME", "")
    try:
        flags, program = split_flags(argv)
        config = load(flags, environ)
    except ConfigError as exc:
        return refuse(host_setting, {"pid": pid, "verdict": "error", "error": str(exc)})
    host_setting = config.hostname
    if not program:
        return refuse(host_setting, {"pid": pid, "verdict": "error", "error": USAGE})
    if config.keying.needs_envelope:
        return refuse(host_setting, {"pid": pid, "verdict": "error", "error": (
            f"GREYLIST_KEY={config.key} needs the envelope sender and recipient, which the "
            "wrapper never sees: use greylist-spp (qmail-spp) or greylist policyd (Postfix), "
            "or key on ip or subnet")})
    raw = environ.get("TCPREMOTEIP")
    try:
        ip = parse_ip(raw or "")
    except BadAddress:
        if "RELAYCLIENT" in environ or "WHITELISTED" in environ:
            ip = raw or ""  # tcprules let it through: no address needed
        else:
            problem = "TCPREMOTEIP is not set" if raw is None else f"TCPREMOTEIP {raw!r} is not an IP address"
            return refuse(host_setting, {"pid": pid, "verdict": "error",
                                         "error": problem + " (run me under tcpserver)"})

    from greylist.service import Connection, Greylister

    outcome = Greylister(config, keep_store=False).decide(Connection.from_environ(ip, environ))
    fields = {"pid": pid, **outcome.fields()}
    if outcome.verdict.action == PASS:
        return run_program(program, host_setting, fields)
    log(fields)
    serve_tempfail(config, outcome.verdict)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
