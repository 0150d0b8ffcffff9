"""``greylist-spp``: a qmail-spp plugin that greylists the triplet at RCPT time.

qmail-spp runs it for each RCPT command (``[rcpt]`` in control/smtpplugins)
with TCPREMOTEIP, SMTPMAILFROM and SMTPRCPTTO set. It answers in qmail-spp's
plugin syntax on stdout: ``E451 ...`` refuses this recipient for now (the
client keeps the message and retries), and printing nothing lets the RCPT go
on to qmail's own checks. A log line goes to stderr, which qmail-spp logs.

Settings are the wrapper's (flags before nothing, or GREYLIST_* variables,
also per netblock through tcprules); set GREYLIST_KEY=triplet to greylist
the whitepaper's triplet. Like the wrapper, it runs once per recipient, so it
imports only what it needs.
"""

from __future__ import annotations

import os
import sys

from greylist.config import ConfigError, load, split_flags
from greylist.core.keys import BadAddress, parse_ip
from greylist.core.policy import TEMPFAIL, Verdict


def reply(config, verdict: Verdict) -> str:
    """The qmail-spp command for a tempfail: E + the whole SMTP reply line."""
    from greylist.adapters.smtp import tempfail_text

    return f"E451 {tempfail_text(config.message, config.enhanced, verdict.retry_in)}\n"


def _log(fields: dict[str, object]) -> None:
    from greylist.service import log

    log("greylist-spp", fields)


def _out(text: str) -> None:
    from greylist.service import write

    write(1, text.encode("utf-8", "replace"))


def main(argv: list[str] | None = None) -> int:
    environ = os.environ
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        from greylist.config import usage

        _out("usage: greylist-spp [--key triplet] [--store URL] ... (run by qmail-spp at RCPT)\n\n"
             + usage())
        return 0
    fields: dict[str, object] = {"pid": os.getpid()}
    try:
        flags, rest = split_flags(argv)
        if rest:
            raise ConfigError(f"unexpected argument {rest[0]!r} (greylist-spp takes only --settings)")
        config = load(flags, environ)
    except ConfigError as exc:
        _log({**fields, "verdict": "error", "error": str(exc)})
        _out("E451 greylisting is misconfigured, please try again later\n")
        return 0
    recipient = environ.get("SMTPRCPTTO")
    if recipient is None:
        _log({**fields, "verdict": "pass", "error": "SMTPRCPTTO is not set: run greylist-spp in the "
                                                      "[rcpt] section of control/smtpplugins"})
        return 0
    raw = environ.get("TCPREMOTEIP", "")
    try:
        ip = parse_ip(raw)
    except BadAddress:
        if "RELAYCLIENT" not in environ and "WHITELISTED" not in environ:
            _log({**fields, "verdict": "error", "error": f"TCPREMOTEIP {raw!r} is not an IP address"})
            _out("E451 cannot tell who you are, please try again later\n")
            return 0
        ip = raw  # tcprules let it through: no address needed
    from greylist.service import Connection, Greylister

    sender = environ.get("SMTPMAILFROM", "")
    outcome = Greylister(config, keep_store=False).decide(
        Connection.from_environ(ip, environ, sender, recipient))
    _log({**fields, **outcome.fields()})
    if outcome.verdict.action == TEMPFAIL:
        _out(reply(config, outcome.verdict))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
