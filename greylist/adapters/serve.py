"""``greylist serve``: tcpserver's job and the greylisting dialogue in one process.

The run script changes by one word::

    exec greylist serve -v -R -l "$LOCAL" -x /etc/tcp.smtp.cdb -c "$MAXSMTPD" \\
      -u "$QMAILDUID" -g "$NOFILESGID" 0 smtp qmail-smtpd HOST checkpassword true 2>&1

It accepts SMTP connections itself, follows the tcprules cdb per connection
as tcpserver does (deny closes, a rule's variables reach the client's
environment and its greylisting settings), and asks the greylisting service.
A client that passes gets PROGRAM exactly as tcpserver would have run it (the
socket as descriptors 0 and 1, tcpserver's environment, at most ``-c`` at
once); the 70-90% that are tempfailed are answered in process, on one event
loop, without a process of their own. So a tempfail costs no fork and no exec,
and the store stays open across connections.

tcpserver(1) and tcprules(1) from ucspi-tcp are the specification: the
options, the environment, the order rules are looked up in, and the ``-v``
log lines (``status``, ``pid ... from``, ``ok``/``deny``, ``end ... status``),
so log tools and ``simulate replay`` keep working; our one ``greylist-serve:``
key=value line per connection stands beside them. In-process sessions are
logged with the server's own pid.
"""

from __future__ import annotations

import asyncio
import getopt
import os
import signal
import socket
import sys
from collections import deque

from greylist.adapters import reloads
from greylist.adapters.acceptor import (Acceptor, SocketSession, drop_privileges, largest_backlog,
                                       raise_descriptor_limit)
from greylist.adapters.logwriter import STOP_WAIT, LogWriter
from greylist.adapters.smtp import Dialogue, TempfailSession, encode, unavailable
from greylist.adapters.tcprules import Rules, RulesError
from greylist.config import LIST_SETTINGS, SETTINGS, ConfigError, load, usage
from greylist.core.keys import BadAddress, parse_ip
from greylist.core.policy import PASS
from greylist.service import COMMIT_WINDOW, Connection, Greylister, log_line

USAGE = ("usage: greylist serve [ -qQvRrhHpPUXdDoO1 ] [ -c limit ] [ -x rules.cdb ] [ -g gid ] [ -u uid ] "
         "[ -b backlog ] [ -l localname ] [ -t timeout ] [ --max-sessions N ] [ --grace SECONDS ] "
         "[ --delay 60 --store URL ... ] host port program [ args ... ]")

SHORT_OPTIONS = "qQvRrhHpPUXdDoO1c:x:g:u:b:l:t:"
#: Well-known ports, for a machine without /etc/services.
SERVICES = {"smtp": 25, "submission": 587, "smtps": 465, "urd": 465}
DEFAULT_MAX_SESSIONS = 10_000


class UsageError(ValueError):
    """The command line cannot be used; the message says which part."""


class Options:
    """tcpserver's options and ours, with tcpserver's defaults."""

    def __init__(self) -> None:
        self.verbosity = 1        # -q 0, -Q 1, -v 2
        self.remoteinfo = True    # -r / -R
        self.remotehost = True    # -h / -H
        self.paranoid = False     # -p / -P
        self.localname: str | None = None  # -l
        self.rules: str | None = None      # -x
        self.rules_missing_ok = False      # -X
        self.limit = 40           # -c
        self.uid: int | None = None        # -u
        self.gid: int | None = None        # -g
        self.backlog: int | None = None  # -b (tcpserver's 20 dropped SYNs in a burst: the largest)
        self.nodelay = False      # -D
        self.print_port = False   # -1
        self.ident_timeout = 26.0  # -t
        self.max_sessions = DEFAULT_MAX_SESSIONS
        self.grace = 10.0
        self.flags: dict[str, str] = {}
        self.host = ""
        self.port = 0
        self.program: list[str] = []


def _positive(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"{option} needs a positive whole number, not {text!r}")
    return value


def parse_args(argv: list[str], environ) -> Options:
    """tcpserver's getopt-style options, our --settings, then host, port and program."""
    by_flag = {flag[2:]: name for name, flag, *_ in SETTINGS}
    long_options = [f"{flag}=" for flag in by_flag] + ["max-sessions=", "grace=", "help"]
    try:
        pairs, rest = getopt.getopt(argv, SHORT_OPTIONS, long_options)
    except getopt.GetoptError as exc:
        raise UsageError(f"{exc} (tcpserver's options -qQvRrhHpPUXdDoO1 -c -x -g -u -b -l -t "
                         "are supported, and our --settings)") from None
    o = Options()
    for opt, value in pairs:
        if opt == "--help":
            raise UsageError("help")
        if opt.startswith("--") and opt[2:] in by_flag:
            name = by_flag[opt[2:]]
            if name in LIST_SETTINGS and name in o.flags:
                value = f"{o.flags[name]}:{value}"  # a repeated --whitelist adds a file
            o.flags[name] = value
        elif opt == "--max-sessions":
            o.max_sessions = _positive(value, opt)
        elif opt == "--grace":
            try:
                o.grace = float(value)
            except ValueError:
                o.grace = -1.0
            if not 0 <= o.grace <= 3600:
                raise UsageError(f"--grace needs seconds from 0 to 3600, not {value!r}")
        elif opt in ("-q", "-Q", "-v"):
            o.verbosity = {"-q": 0, "-Q": 1, "-v": 2}[opt]
        elif opt in ("-r", "-R"):
            o.remoteinfo = opt == "-r"
        elif opt in ("-h", "-H"):
            o.remotehost = opt == "-h"
        elif opt in ("-p", "-P"):
            o.paranoid = opt == "-p"
        elif opt == "-l":
            o.localname = value
        elif opt == "-x":
            o.rules = value
        elif opt == "-X":
            o.rules_missing_ok = True
        elif opt == "-c":
            o.limit = _positive(value, opt)
        elif opt == "-u":
            o.uid = _positive(value, opt)
        elif opt == "-g":
            o.gid = _positive(value, opt)
        elif opt == "-U":
            o.uid = _positive(environ.get("UID", ""), "-U ($UID)")
            o.gid = _positive(environ.get("GID", ""), "-U ($GID)")
        elif opt == "-b":
            o.backlog = _positive(value, opt)
        elif opt == "-t":
            o.ident_timeout = float(_positive(value, opt))
        elif opt == "-D":
            o.nodelay = True
        elif opt == "-d":
            o.nodelay = False
        elif opt == "-1":
            o.print_port = True
        # -o / -O (IP options) are accepted as tcpserver's are: Linux drops source routes
    if len(rest) < 3:
        raise UsageError("need host, port and program")
    o.host, port, o.program = rest[0], rest[1], rest[2:]
    o.port = parse_port(port)
    return o


def parse_port(text: str) -> int:
    if text.isdigit():
        port = int(text)
        if port > 65535:
            raise UsageError(f"port {text} is out of range")
        return port
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        if text in SERVICES:
            return SERVICES[text]
        raise UsageError(f"unknown port name {text!r}") from None


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket: ``0`` is every IPv4 address, ``::`` every address (IPv4 too)."""
    if host in ("0", "0.0.0.0"):
        family, address = socket.AF_INET, "0.0.0.0"
    elif ":" in host:
        family, address = socket.AF_INET6, host
    else:
        try:
            parse_ip(host)
            family, address = socket.AF_INET, host
        except BadAddress:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if not infos:
                raise OSError(f"cannot resolve {host}")
            family, address = infos[0][0], infos[0][4][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and address == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((address, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Peer:
    """One accepted connection, as tcpserver would describe it to PROGRAM."""

    __slots__ = ("sock", "ip", "port", "local_ip", "local_port", "host", "info", "local_host", "v6")

    def __init__(self, sock: socket.socket, remote, local) -> None:
        self.sock = sock
        self.ip = parse_ip(remote[0])  # IPv4-mapped addresses become the IPv4 client
        self.port = remote[1]
        self.local_ip = parse_ip(local[0])
        self.local_port = local[1]
        self.v6 = ":" in self.ip
        self.host: str | None = None
        self.info: str | None = None
        self.local_host: str | None = None

    def environment(self, base: dict[str, str], rule_env: dict[str, str]) -> dict[str, str]:
        """tcpserver's variables (absent ones removed), then the rule's."""
        env = dict(base)
        env["PROTO"] = "TCP6" if self.v6 else "TCP"
        env["TCPLOCALIP"] = self.local_ip
        env["TCPLOCALPORT"] = str(self.local_port)
        env["TCPREMOTEIP"] = self.ip
        env["TCPREMOTEPORT"] = str(self.port)
        for name, value in (("TCPLOCALHOST", self.local_host), ("TCPREMOTEHOST", self.host),
                            ("TCPREMOTEINFO", self.info)):
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        env.update(rule_env)
        return env


def _safe(text: str | None) -> str:
    """A value in a tcpserver log line: as tcpserver's safecats (100 chars, odd bytes as ?)."""
    if not text:
        return ""
    out = "".join("?" if c < "!" or c > "~" or c == "%" else c for c in text[:100])
    return out + ("..." if len(text) > 100 else "")


class Session(SocketSession):
    """An in-process tempfail dialogue on a non-blocking socket."""

    __slots__ = ("server", "session")

    def __init__(self, server: "Server", sock: socket.socket, session: TempfailSession, config) -> None:
        super().__init__(server.loop, sock, config.timeout, config.session_limit)
        self.server = server
        self.session = session
        if self.send(session.greeting()):
            self.start()
        else:
            self.close()

    def received(self, data: bytes) -> None:
        reply = self.session.feed(data)
        if (reply and not self.send(reply)) or self.session.closed:
            self.close()

    def idled(self) -> None:
        self.send(self.session.idle())

    def expired(self) -> None:
        self.send(self.session.expired())

    def closing(self) -> None:
        self.server.session_ended(self)


class Server:
    """The accept loop, tcprules, the service, children for passes, sessions for tempfails."""

    def __init__(self, options: Options, config, environ: dict[str, str]) -> None:
        self.o = options
        self.config = config
        self.base_env = dict(environ)
        self.greylister = Greylister(config, commit_window=COMMIT_WINDOW, report=self.store_failed)
        self.rules = Rules(options.rules, options.rules_missing_ok) if options.rules else None
        self.pid = os.getpid()
        self.children: dict[int, str] = {}
        self.waiting: deque = deque()  # passes waiting for a child slot: (peer, env, fields)
        self.sessions: set[Session] = set()
        self.pending = 0  # connections accepted and not yet answered or handed over
        self.acceptor: Acceptor | None = None
        self.stopping = False
        self.listener: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.local_names: dict[str, str | None] = {}
        self.hostnames: dict[str, str] = {}
        self.max_sessions = options.max_sessions
        self.lookups = None
        self.log_writer: LogWriter  # made with the loop, in start(), before anything is logged

    # -- logging ------------------------------------------------------------------
    def store_failed(self, fields: dict[str, object]) -> None:
        """A store failure that no connection's decision met (see Greylister's report)."""
        self.log([log_line("greylist-serve", {"pid": self.pid, **fields})])

    def log(self, lines: list[bytes]) -> None:
        """tcpserver's lines and ours, in order, never waiting for a stuck log reader."""
        self.log_writer.write(b"".join(lines))

    def tcp_line(self, text: str) -> bytes:
        return f"tcpserver: {text}\n".encode("ascii", "replace")

    def status_line(self) -> bytes:
        return self.tcp_line(f"status: {len(self.children)}/{self.o.limit}")

    # -- lifetime -------------------------------------------------------------------
    def start(self, sock: socket.socket) -> None:
        self.listener = sock
        self.loop = asyncio.new_event_loop()
        loop = self.loop
        self.log_writer = LogWriter(loop, "greylist-serve")
        loop.set_exception_handler(self.internal_error)
        self.acceptor = Acceptor(loop, sock, self.accepted, self.at_bound, self.accept_failed)
        for signum, handler in ((signal.SIGCHLD, self.reap), (signal.SIGTERM, self.stop),
                                (signal.SIGHUP, self.reload), (signal.SIGINT, self.stop)):
            loop.add_signal_handler(signum, handler)
        reloads.release()  # a SIGHUP that came as it started reloads it now
        self.acceptor.resume()
        if self.o.verbosity >= 2:
            self.log([self.status_line()])

    def run(self) -> int:
        try:
            self.loop.run_forever()
        finally:
            said = self.greylister.close()
            if said:
                self.log([log_line("greylist-serve", {"store_warning": "; ".join(said)})])
            self.loop.close()
            self.log_writer.drain(STOP_WAIT)
        return 0

    def stop(self) -> None:
        """SIGTERM: stop accepting, let sessions finish within the grace period, then exit.
        PROGRAM children go on, as under tcpserver."""
        if self.stopping:
            return
        self.stopping = True
        self.acceptor.close()
        for peer, _env, _fields in self.waiting:  # they keep their mail and retry
            self._refuse(peer.sock)
        self.waiting.clear()
        self.log([log_line("greylist-serve", {"pid": self.pid, "stopping": len(self.sessions),
                                              "grace": self.o.grace})])
        if not self.sessions and not self.pending:
            self.loop.stop()
        else:
            self.loop.call_later(self.o.grace, self._end_of_grace)

    def _end_of_grace(self) -> None:
        for session in list(self.sessions):
            session.send(session.session.expired())
            session.close()
        self.loop.stop()

    def reload(self) -> None:
        """SIGHUP: whitelists read again, the store reopened, host names looked up again."""
        said = self.greylister.reload()
        self.hostnames.clear()
        self.local_names.clear()
        self.log([log_line("greylist-serve", {"pid": self.pid, "reloaded": "whitelists and store",
                                              **({"store_warning": "; ".join(said)} if said else {})})])

    # -- accepting ------------------------------------------------------------------
    def busy(self) -> int:
        return len(self.sessions) + self.pending + len(self.waiting)

    def at_bound(self) -> bool:
        """Full: accepting pauses, and resumes when a session ends (the backlog holds the rest)."""
        return self.busy() >= self.max_sessions

    def internal_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """A callback raised (the store's timed flush, say): a bug of ours, logged as one
        on our log, not as asyncio's traceback on stderr; the loop goes on."""
        exc = context.get("exception")
        callback = getattr(context.get("handle"), "_callback", None)
        where = getattr(callback, "__qualname__", None) or (
            type(callback).__name__ if callback is not None else "a callback")
        error = (f"internal error {type(exc).__name__} in {where}: {exc}" if exc is not None
                 else f"internal error: {context.get('message')}")
        self.log([log_line("greylist-serve", {"pid": self.pid, "verdict": "error", "error": error})])

    def accept_failed(self, exc: OSError) -> None:
        self.log([log_line("greylist-serve", {"pid": self.pid, "error": f"accept: {exc.strerror}",
                                              "sessions": len(self.sessions)})])

    def accepted(self, sock: socket.socket, remote) -> None:
        self.pending += 1
        try:
            self.connected(sock, remote)
        except Exception as exc:  # noqa: BLE001 - one client must never stop the server
            self.pending -= 1  # (raised before decide(), which handles its own errors)
            self.log([log_line("greylist-serve", {"pid": self.pid, "verdict": "error",
                                                  "error": f"internal error {type(exc).__name__}: {exc}"})])
            self._refuse(sock)

    def connected(self, sock: socket.socket, remote) -> None:
        sock.setblocking(False)
        if self.o.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = Peer(sock, remote, sock.getsockname())
        peer.local_host = self.o.localname
        if self.o.remotehost or self.o.remoteinfo or (self.o.localname is None
                                                       and peer.local_ip not in self.local_names):
            self.loop.create_task(self._look_up(peer, remote))
        else:
            if self.o.localname is None:
                peer.local_host = self.local_names[peer.local_ip]
            self.decide(peer)

    async def _look_up(self, peer: Peer, remote) -> None:
        """tcpserver's data gathering: host names (-h, -p), ident (-r), the local name."""
        try:
            if self.o.localname is None:
                if peer.local_ip not in self.local_names:
                    self.local_names[peer.local_ip] = await self._name_of(peer.local_ip)
                peer.local_host = self.local_names[peer.local_ip]
            if self.o.remotehost:
                peer.host = await self._name_of(peer.ip)
                if peer.host is not None and self.o.paranoid and not await self._confirms(peer.host, peer.ip):
                    peer.host = None
            if self.o.remoteinfo:
                peer.info = await self._ident(peer)
        except Exception as exc:  # noqa: BLE001 - a lookup that fails leaves the name unset
            self.log([log_line("greylist-serve", {"pid": self.pid, "ip": peer.ip,
                                                  "error": f"lookup: {type(exc).__name__}: {exc}"})])
        self.decide(peer)

    async def _name_of(self, ip: str) -> str | None:
        try:
            name, _ = await self.loop.getnameinfo((ip, 0), socket.NI_NAMEREQD)
        except (OSError, UnicodeError):
            return None
        return name or None

    async def _confirms(self, name: str, ip: str) -> bool:
        try:
            infos = await self.loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return False
        return any(_canonical(info[4][0]) == ip for info in infos)

    async def _ident(self, peer: Peer) -> str | None:
        """RFC 1413, as tcpserver's -r: ask the client's port 113 who owns the connection."""
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                peer.ip, 113, local_addr=(peer.local_ip, 0)), self.o.ident_timeout)
            writer.write(f"{peer.port} , {peer.local_port}\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), self.o.ident_timeout)
        except (OSError, asyncio.TimeoutError, ValueError):
            return None
        finally:
            if writer is not None:
                writer.close()
        parts = line.decode("latin-1").split(":", 3)
        if len(parts) == 4 and parts[1].strip().upper() == "USERID":
            return parts[3].strip()[:100] or None
        return None

    # -- deciding ---------------------------------------------------------------------
    def decide(self, peer: Peer) -> None:
        """Rules, the service, then a session or PROGRAM. Never raises: one client's
        trouble (or a bug of ours) is logged and answered 421, and the server goes on."""
        self.pending -= 1
        try:
            self._decide(peer)
        except Exception as exc:  # noqa: BLE001
            self.log([log_line("greylist-serve", {"pid": self.pid, "ip": peer.ip, "verdict": "error",
                                                  "error": f"internal error {type(exc).__name__}: {exc}"})])
            if peer.sock.fileno() >= 0:
                self._refuse(peer.sock)
                self._ended()

    def _decide(self, peer: Peer) -> None:
        sock, ip = peer.sock, peer.ip
        lines: list[bytes] = []
        verbose = self.o.verbosity >= 2
        try:
            rule = self.rules.lookup(ip, peer.host, peer.info) if self.rules else None
        except RulesError as exc:
            if self.o.verbosity >= 1:
                lines.append(self.tcp_line(f"warning: dropping connection, {exc}"))
            self.log(lines)
            sock.close()
            self._ended()
            return
        rule_env = rule.env if rule is not None else {}
        if rule is not None and rule.deny:
            if verbose:
                lines += [self.tcp_line(f"pid {self.pid} from {ip}"),
                          self.tcp_line(f"deny {self.pid} {self._ends(peer)}")]
                self.log(lines)
            sock.close()
            self._ended()
            return
        conn = Connection(ip, peer.host or "", relay="RELAYCLIENT" in rule_env,
                          whitelisted="WHITELISTED" in rule_env, settings=rule_env or None,
                          host_verified=self.o.paranoid)
        try:
            outcome = self.greylister.decide(conn)
        except ConfigError as exc:  # a rule's GREYLIST_* variable we cannot use
            self.log([log_line("greylist-serve", {"pid": self.pid, "ip": ip, "verdict": "error",
                                                  "error": str(exc)})])
            self._refuse(sock)
            self._ended()
            return
        self.greylister.flush_in_time(self.loop)
        fields = outcome.fields()
        if outcome.verdict.action == PASS:
            self.hand_over(peer, peer.environment(self.base_env, rule_env), fields)
            return
        if verbose:
            lines += [self.tcp_line(f"pid {self.pid} from {ip}"),
                      self.tcp_line(f"ok {self.pid} {self._ends(peer)}")]
        lines.append(log_line("greylist-serve", {"pid": self.pid, "port": peer.port, **fields}))
        self.log(lines)
        config = outcome.config
        dialogue = Dialogue(self._hostname(config), config.message, config.enhanced,
                            outcome.verdict.retry_in)
        session = Session(self, sock, TempfailSession(dialogue), config)
        if not session.closed:
            self.sessions.add(session)

    def _ends(self, peer: Peer) -> str:
        """``LOCALHOST:LOCALIP:LOCALPORT REMOTEHOST:REMOTEIP:REMOTEINFO:REMOTEPORT``."""
        return (f"{_safe(peer.local_host)}:{_safe(peer.local_ip)}:{peer.local_port} "
                f"{_safe(peer.host)}:{_safe(peer.ip)}:{_safe(peer.info)}:{peer.port}")

    def _hostname(self, config) -> str:
        name = self.hostnames.get(config.hostname)
        if name is None:
            from greylist.adapters.hostname import smtp_hostname

            name = self.hostnames[config.hostname] = smtp_hostname(config.hostname)
        return name

    def _refuse(self, sock: socket.socket) -> None:
        """421: we cannot serve this client now; it keeps its mail and retries."""
        try:
            sock.setblocking(True)
            sock.settimeout(1.0)
            sock.send(encode(unavailable(self._hostname(self.config))))
        except OSError:
            pass
        sock.close()

    # -- passes: PROGRAM as tcpserver runs it -----------------------------------------
    def hand_over(self, peer: Peer, env: dict[str, str], fields: dict) -> None:
        if len(self.children) >= self.o.limit:
            self.waiting.append((peer, env, fields))  # tcpserver defers; the client waits for its greeting
            return
        self.spawn(peer, env, fields)

    def spawn(self, peer: Peer, env: dict[str, str], fields: dict) -> None:
        sock = peer.sock
        fd = sock.fileno()
        lines: list[bytes] = []
        try:
            sock.setblocking(True)  # PROGRAM reads and writes it as tcpserver's children do
            pid = os.posix_spawnp(
                self.o.program[0], self.o.program, env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM,
                           signal.SIGHUP, signal.SIGINT),
                setsigmask=())
        except OSError as exc:
            lines.append(log_line("greylist-serve", {"pid": self.pid, "port": peer.port, **fields,
                                                     "error": f"cannot run {self.o.program[0]}: {exc.strerror}"}))
            self.log(lines)
            self._refuse(sock)
            self._ended()
            return
        sock.close()
        self.children[pid] = peer.ip
        if self.o.verbosity >= 2:
            lines += [self.status_line(), self.tcp_line(f"pid {pid} from {peer.ip}"),
                      self.tcp_line(f"ok {pid} {self._ends(peer)}")]
        lines.append(log_line("greylist-serve", {"pid": pid, "port": peer.port, **fields}))
        self.log(lines)
        self._ended()

    def reap(self) -> None:
        lines: list[bytes] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if self.children.pop(pid, None) is not None and self.o.verbosity >= 2:
                lines += [self.tcp_line(f"end {pid} status {status}"), self.status_line()]
        if lines:
            self.log(lines)
        while self.waiting and len(self.children) < self.o.limit:
            self.spawn(*self.waiting.popleft())

    # -- sessions -------------------------------------------------------------------
    def session_ended(self, session: Session) -> None:
        self.sessions.discard(session)
        self._ended()

    def _ended(self) -> None:
        if self.stopping:
            if not self.sessions and not self.pending:
                self.loop.stop()
        elif not self.acceptor.accepting and self.busy() < self.max_sessions:
            self.acceptor.resume()


def _canonical(text: str) -> str | None:
    try:
        return parse_ip(text)
    except BadAddress:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ
    try:
        options = parse_args(argv, environ)
        config = load(options.flags, environ)
    except UsageError as exc:
        if str(exc) == "help":
            sys.stdout.write(USAGE + "\n\n" + usage())
            return 0
        sys.stderr.write(f"greylist serve: {exc}\n{USAGE}\n")
        return 100
    except ConfigError as exc:
        sys.stderr.write(f"greylist serve: {exc}\n")
        return 100
    if config.keying.needs_envelope:
        sys.stderr.write(f"greylist serve: GREYLIST_KEY={config.key} needs the envelope, which is "
                         "decided at RCPT time: use greylist-spp or key on ip or subnet\n")
        return 100
    descriptors = raise_descriptor_limit()
    # leave room for children's sockets, the store, the log and the rules
    options.max_sessions = max(1, min(options.max_sessions, descriptors - options.limit - 32))
    try:
        sock = listen(options.host, options.port, options.backlog or largest_backlog())
    except OSError as exc:
        sys.stderr.write(f"tcpserver: fatal: unable to bind: {exc.strerror or exc}\n")
        return 111
    server = Server(options, config, dict(environ))
    # Everything imported later, imported while we may still read our own installation:
    # the service's store module and whitelists, host names, asyncio's lookup threads.
    import concurrent.futures.thread  # noqa: F401
    import greylist.adapters.hostname  # noqa: F401

    server.greylister.prepare()
    try:
        drop_privileges(options.uid, options.gid)
    except OSError as exc:
        sys.stderr.write(f"tcpserver: fatal: unable to drop privileges: {exc.strerror}\n")
        return 111
    if options.print_port:
        sys.stdout.write(f"{sock.getsockname()[1]}\n")
        sys.stdout.flush()
    server.start(sock)
    server.log([log_line("greylist-serve", {
        "pid": server.pid, "started": (f"[{options.host}]" if ":" in options.host else options.host)
        + f":{sock.getsockname()[1]}", "store": config.store,
        "mode": config.mode, "delay": config.delay, "limit": options.limit,
        "max_sessions": options.max_sessions})])
    unusable = server.greylister.try_store()
    if unusable is not None:
        server.log([log_line("greylist-serve", {"pid": server.pid, "error": f"store unusable at start: {unusable}",
                                                "on_error": config.on_error})])
    return server.run()


if __name__ == "__main__":
    raise SystemExit(main())
