"""``greylist policyd``: a Postfix policy server on the same core.

Postfix asks it once per recipient (``check_policy_service`` in
``smtpd_recipient_restrictions``) with the policy delegation protocol:
``name=value`` lines, an empty line, and one ``action=...`` reply followed by
an empty line, several requests per connection. A tempfail is
``action=DEFER_IF_PERMIT <message>`` (Postfix answers 450 4.7.1 unless a later
restriction rejects anyway); anything else is ``action=DUNNO``, and a client
that passed after waiting gets an ``X-Greylist`` header, as postgrey adds.

Requests are bounded (line and request size, attribute count); a garbage or
incomplete request is answered DUNNO and logged, never with a crash. Each
connection gets its own thread and its own service (and store connection),
closed when the connection ends.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import sys
import threading
import time

from greylist.service import Connection, Greylister, log
from greylist.core.keys import BadAddress, parse_ip
from greylist.core.policy import PASSED, TEMPFAIL, Verdict
from greylist.adapters.smtp import tempfail_text

MAX_LINE = 2048
MAX_REQUEST = 32 * 1024
MAX_ATTRIBUTES = 100
IDLE_TIMEOUT = 300.0


class RequestError(ValueError):
    """The request cannot be read; the connection is answered and closed."""


def read_request(rfile) -> dict[str, str] | None:
    """One request's attributes, or None at a clean end of the connection."""
    attrs: dict[str, str] = {}
    size = 0
    while True:
        line = rfile.readline(MAX_LINE + 1)
        if not line:
            if attrs or size:
                raise RequestError("connection closed in the middle of a request")
            return None
        size += len(line)
        if len(line) > MAX_LINE or (not line.endswith(b"\n") and len(line) == MAX_LINE + 1):
            raise RequestError(f"a line longer than {MAX_LINE} bytes")
        if size > MAX_REQUEST:
            raise RequestError(f"a request larger than {MAX_REQUEST} bytes")
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if not text:
            return attrs
        name, eq, value = text.partition("=")
        if not eq:
            attrs.setdefault("_garbage", text[:60])
            continue
        if len(attrs) >= MAX_ATTRIBUTES:
            raise RequestError(f"more than {MAX_ATTRIBUTES} attributes")
        attrs[name.strip()] = value


def action_for(config, verdict: Verdict, shadow: bool = False) -> str:
    """The action line; in shadow mode nobody was delayed, so no X-Greylist header."""
    if verdict.action == TEMPFAIL:
        # Postfix puts 450 4.7.1 in front itself: the text only, with the hint if asked for.
        text = tempfail_text(config.message, config.enhanced, verdict.retry_in)
        return f"action=DEFER_IF_PERMIT {text.removeprefix('4.7.1 ')}"
    if verdict.reason == PASSED and not shadow:
        host = config.hostname or os.uname().nodename
        return (f"action=PREPEND X-Greylist: delayed {int(verdict.age)} seconds by greylist at {host}; "
                f"{time.strftime('%a, %d %b %Y %H:%M:%S %z')}")
    return "action=DUNNO"


def answer(greylister, attrs: dict[str, str]) -> tuple[str, dict[str, object]]:
    """The reply line for one request, and its log fields."""
    if attrs.get("request") != "smtpd_access_policy":
        return "action=DUNNO", {"verdict": "error", "error": "not an smtpd_access_policy request"
                                + (f" ({attrs['_garbage']!r})" if "_garbage" in attrs else "")}
    state = attrs.get("protocol_state", "RCPT").upper()
    if state != "RCPT":
        return "action=DUNNO", {"verdict": "pass", "reason": f"not at RCPT ({state})"}
    try:
        ip = parse_ip(attrs.get("client_address", ""))
    except BadAddress as exc:
        return "action=DUNNO", {"verdict": "error", "error": str(exc)}
    sender, recipient = attrs.get("sender", ""), attrs.get("recipient", "")
    # client_name is Postfix's verified name (its PTR resolves back to the address);
    # reverse_client_name is the unverified PTR, the client's own claim: never used
    host = attrs.get("client_name") or ""
    if host == "unknown":
        host = ""
    outcome = greylister.decide(Connection(ip, host, sender, recipient or "<>", host_verified=True))
    return action_for(outcome.config, outcome.verdict, outcome.shadow is not None), outcome.fields()


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: PolicyServer = self.server  # type: ignore[assignment]
        self.connection.settimeout(server.idle_timeout)
        # One service per client connection (its thread): the store is opened at the
        # first request and closed when the connection ends, not left to the collector.
        with Greylister(server.config) as greylister:
            self._serve(server, greylister)

    def _serve(self, server: "PolicyServer", greylister: Greylister) -> None:
        while True:
            try:
                attrs = read_request(self.rfile)
            except RequestError as exc:
                server.log({"verdict": "error", "error": str(exc)})
                self._send("action=DUNNO")
                return
            except (OSError, socket.timeout):
                return
            if attrs is None:
                return
            try:
                reply, fields = answer(greylister, attrs)
            except Exception as exc:  # noqa: BLE001 - a bug of ours must not stop mail
                reply, fields = "action=DUNNO", {"verdict": "error",
                                                 "error": f"internal error {type(exc).__name__}: {exc}"}
            server.log(fields)
            if not self._send(reply):
                return

    def _send(self, reply: str) -> bool:
        try:
            self.wfile.write(reply.encode("utf-8", "replace") + b"\n\n")
            self.wfile.flush()
            return True
        except OSError:
            return False


class PolicyServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def setup(self, config, idle_timeout: float) -> None:
        self.config = config
        self.idle_timeout = idle_timeout
        self.log_lock = threading.Lock()

    def log(self, fields: dict[str, object]) -> None:
        with self.log_lock:
            log("greylist-policyd", fields)


class UnixPolicyServer(PolicyServer, socketserver.UnixStreamServer):
    address_family = socket.AF_UNIX


def make_server(listen: str, config, idle_timeout: float = IDLE_TIMEOUT) -> PolicyServer:
    """A server on ``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:/path``."""
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of an earlier run
        server: PolicyServer = UnixPolicyServer(path, Handler)
        os.chmod(path, 0o660)
    else:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit():
            raise ValueError(f"--listen {listen!r}: use HOST:PORT or unix:/path")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("PolicyServer6", (PolicyServer,), {"address_family": family})
        server = server_class((host, int(port)), Handler)
    server.setup(config, idle_timeout)
    return server


def serve(listen: str, config) -> int:
    server = make_server(listen, config)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    where = listen if listen.startswith("unix:") else "%s:%d" % server.server_address[:2]
    server.log({"started": where, "store": config.store, "key": config.key, "delay": config.delay})
    print(f"greylist policyd: listening on {where}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
        if listen.startswith("unix:"):
            try:
                os.unlink(listen[len("unix:"):])
            except OSError:
                pass
    return 0
