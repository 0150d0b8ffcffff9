"""``redis://HOST:PORT/DB`` and ``redis+unix:///PATH.sock``: one store for many MX hosts.

Each client is one key, ``greylist:<address>``, holding ``FIRST LAST PASSES``
with a TTL of the time until the record goes stale, so Redis expires entries
itself and no cron job is needed. A new client's key is created with
``SET ... NX`` (exactly one of several simultaneous connections creates it,
whichever MX they reach), and a pass overwrites it with a fresh TTL. Every
decision touches exactly one key, so the store works on Redis Cluster: point
an MX at any master node, and the wrapper follows a ``MOVED`` reply to the
node that holds the client's slot (once per command).

Connect and command timeouts are bounded (100 ms by default, ``?timeout=`` in
seconds); when Redis is down or slow the store raises StoreError and the
wrapper follows GREYLIST_ON_ERROR.

Two connections speak to Redis. The wrapper, which starts once per SMTP
connection, uses :class:`RespConnection`: the RESP protocol over a plain
``_socket`` socket, 0.3 ms to import where ``import redis`` costs about 120 ms.
A pass's update is sent without waiting for its reply, which is read with the
next command's or when the store is closed (the wrapper closes it before it
execs qmail-smtpd): a known client costs one round trip, not two.

The admin commands and the simulator use redis-py (``pip install
greylist[redis]``) through :class:`RedisPyConnection` when it is installed.
Both return the same raw replies, so :class:`RedisStore` has one code path.
"""

from __future__ import annotations

from time import monotonic

from greylist.core.policy import Record
from greylist.stores.base import SCAN, SHARED, TTL, Store, StoreError

DEFAULT_TIMEOUT = 0.1
PREFIX = "greylist:"

# Compare-and-delete for expiry beside running wrappers: delete only if unchanged.
_DELETE_IF = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class ReplyError(StoreError):
    """Redis answered with an error reply."""


class MovedError(Exception):
    """Redis Cluster: ``MOVED slot host:port``, the key lives on another node."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


class Address:
    """Where a Redis URL points; parsed by hand (urllib.parse would import re)."""

    def __init__(self, url) -> None:
        from greylist.stores import parse_url

        where = parse_url(url) if isinstance(url, str) else url
        if where.scheme not in ("redis", "redis+unix"):
            raise StoreError(f"not a Redis URL: {where.url!r}")
        url, scheme, rest = where.url, where.scheme, where.location
        self.url = url
        self.timeout = DEFAULT_TIMEOUT
        self.db = 0
        self.password: str | None = None
        self.username: str | None = None
        self.host = "127.0.0.1"
        self.port = 6379
        self.unix_path: str | None = None
        for name, value in where.options.items():
            try:
                if name == "timeout":
                    self.timeout = float(value)
                    if not 0 < self.timeout <= 60:
                        raise ValueError
                elif name == "db":
                    self.db = int(value)
                elif name == "password":
                    self.password = value
            except ValueError:
                raise StoreError(f"{url}: bad value for {name}: {value!r}") from None
        if scheme == "redis+unix":
            if not rest.startswith("/"):
                raise StoreError(f"{url}: use redis+unix:///absolute/path.sock")
            self.unix_path = rest
            return
        auth, at, hostpart = rest.rpartition("@")
        if at:
            user, colon, password = auth.partition(":")
            self.username = user or None if colon else None
            self.password = password if colon else auth
        hostport, _, db = hostpart.partition("/")
        if db:
            try:
                self.db = int(db)
            except ValueError:
                raise StoreError(f"{url}: the database must be a number, not {db!r}") from None
        if hostport.startswith("["):
            host, _, port = hostport[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
        self.host = host or "127.0.0.1"
        if port:
            try:
                self.port = int(port)
            except ValueError:
                raise StoreError(f"{url}: the port must be a number, not {port!r}") from None

    def moved_to(self, target: str) -> "Address":
        """The same settings, pointed at the cluster node a MOVED reply named."""
        host, _, port = target.rpartition(":")
        moved = Address.__new__(Address)
        moved.__dict__.update(self.__dict__)
        moved.host, moved.port, moved.unix_path = host.strip("[]") or self.host, int(port), None
        return moved

    def __str__(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"


def _encode(args: tuple) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "surrogateescape")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


#: Bounds on what a server may send us: our values are tens of bytes, a SCAN batch 1,000 keys.
MAX_BULK = 1 << 20
MAX_ARRAY = 100_000
MAX_LINE = 64 * 1024


class RespConnection:
    """RESP2 over a plain socket: just enough protocol for one store, no dependencies.

    Each command has one deadline (the URL's timeout) for all its reads, so a server
    that trickles a byte at a time cannot hold a connection longer than that; a reply
    that is not well-formed RESP, or larger than a greylist store ever sends, is an
    error of the store, never taken for an answer.
    """

    def __init__(self, address: Address) -> None:
        self.pending = 0  # replies of send-only commands not read yet
        self.deadline = 0.0
        self._open(address)

    def _open(self, address: Address) -> None:
        import _socket

        self.address = address
        self.buffer = b""
        self.broken = True  # until connected
        try:
            if address.unix_path:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                target: object = address.unix_path
            else:
                # A bytes host name skips the IDNA codec, which would import re.
                host = address.host.encode("ascii", "strict") if address.host.isascii() else address.host
                family, kind, proto, _, target = _socket.getaddrinfo(
                    host, address.port, 0, _socket.SOCK_STREAM)[0]
                sock = _socket.socket(family, kind, proto)
            sock.settimeout(address.timeout)
            sock.connect(target)
            self.broken = False
            if not address.unix_path:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise StoreError(f"redis at {address}: cannot connect: {_reason(exc)}") from None
        self.sock = sock
        if address.password is not None:
            args = ("AUTH", address.username, address.password) if address.username else ("AUTH", address.password)
            self.execute(*args)
        if address.db:
            self.execute("SELECT", address.db)

    def execute(self, *args: object, follow: bool = True):
        self._reconnect()
        self.deadline = monotonic() + self.address.timeout
        try:
            self.sock.sendall(_encode(args))
            self._drain()
            return self._reply()
        except MovedError as moved:
            if not follow:
                raise ReplyError(f"redis at {self.address}: MOVED again to {moved.target}") from None
            # Redis Cluster: the key's slot lives on another node. Go there and ask again.
            self._broken()
            self._open(self.address.moved_to(moved.target))
            return self.execute(*args, follow=False)
        except OSError as exc:
            self._broken()
            raise StoreError(f"redis at {self.address}: {_reason(exc)}") from None

    def send(self, *args: object) -> None:
        """Send a command whose reply is read later (before the next reply, or at close)."""
        self._reconnect()
        try:
            self.sock.sendall(_encode(args))
        except OSError as exc:
            self._broken()
            raise StoreError(f"redis at {self.address}: {_reason(exc)}") from None
        self.pending += 1

    def _drain(self) -> None:
        while self.pending:
            self.pending -= 1
            try:
                self._reply()
            except (ReplyError, MovedError):
                pass  # a lost update costs one more tempfail at most

    def _broken(self) -> None:
        """Forget a connection that failed; the next command connects again."""
        self.pending = 0
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _reconnect(self) -> None:
        if self.broken:
            self._open(self.address)  # raises StoreError while the server is still away

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                return line
            if len(self.buffer) > MAX_LINE:
                raise OSError(71, "protocol error: a reply line without end")
            self._fill()

    def _fill(self) -> None:
        left = self.deadline - monotonic()
        if left <= 0:
            raise OSError(110, f"no whole reply within {self.address.timeout:g} s")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise OSError(104, "connection closed by the server")
        self.buffer += data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            text = rest.decode(errors="replace")
            if text.startswith("MOVED "):
                raise MovedError(text.split()[-1])
            raise ReplyError(f"redis at {self.address}: {text}")
        if kind == b":":
            return _number(rest, line)
        if kind == b"$":
            size = _number(rest, line)
            if size == -1:
                return None
            if not 0 <= size <= MAX_BULK:
                raise OSError(71, f"protocol error: bulk length {size}")
            while len(self.buffer) < size + 2:
                self._fill()
            data, self.buffer = self.buffer[:size], self.buffer[size + 2 :]
            return data
        if kind == b"*":
            count = _number(rest, line)
            if count == -1:
                return None
            if not 0 <= count <= MAX_ARRAY:
                raise OSError(71, f"protocol error: array length {count}")
            return [self._reply() for _ in range(count)]
        raise OSError(71, f"protocol error: unexpected reply {line[:40]!r}")

    def close(self) -> None:
        self.deadline = monotonic() + self.address.timeout
        try:
            self._drain()  # a write sent last is confirmed before we go
        except OSError:
            pass
        self._broken()


class RedisPyConnection:
    """The same raw replies through redis-py, for the admin commands and the simulator."""

    def __init__(self, address: Address) -> None:
        import redis

        self.address = address
        self.redis = redis
        self.pending = 0
        kwargs = dict(db=address.db, password=address.password, username=address.username,
                      socket_timeout=address.timeout, socket_connect_timeout=address.timeout)
        if address.unix_path:
            pool = redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection,
                                        path=address.unix_path, **kwargs)
        else:
            pool = redis.ConnectionPool(host=address.host, port=address.port, **kwargs)
        self.pool = pool
        try:
            self.conn = pool.make_connection()
            self.conn.connect()
        except redis.RedisError as exc:
            raise StoreError(f"redis at {address}: cannot connect: {exc}") from None

    def execute(self, *args: object):
        args = _bytes_safe(args)
        try:
            self.conn.send_command(*args)
            self._drain()
            return self.conn.read_response()
        except self.redis.ResponseError as exc:
            raise ReplyError(f"redis at {self.address}: {exc}") from None
        except (self.redis.RedisError, OSError) as exc:
            self.pending = 0
            raise StoreError(f"redis at {self.address}: {exc}") from None

    def send(self, *args: object) -> None:
        args = _bytes_safe(args)
        try:
            self.conn.send_command(*args)
        except (self.redis.RedisError, OSError) as exc:
            self.pending = 0
            raise StoreError(f"redis at {self.address}: {exc}") from None
        self.pending += 1

    def _drain(self) -> None:
        while self.pending:
            self.pending -= 1
            try:
                self.conn.read_response()
            except self.redis.ResponseError:
                pass  # as above: a lost update costs one more tempfail at most

    def close(self) -> None:
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass
        try:
            self.conn.disconnect()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timed out"
    return exc.strerror or str(exc)


def _number(text: bytes, line: bytes) -> int:
    if not text or not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())) or len(text) > 20:
        raise OSError(71, f"protocol error: not a number in {line[:40]!r}")
    return int(text)


def _bytes_safe(args: tuple) -> tuple:
    """Keys may hold undecodable bytes (surrogates from os.environ): sent as those bytes."""
    return tuple(a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a for a in args)


def _value(record: Record) -> bytes:
    return b"%.3f %.3f %d" % (record.first_seen, record.last_seen, record.passes)


def _record(data: bytes | None) -> Record | None:
    if data is None:
        return None
    parts = data.split()
    try:
        return Record(float(parts[0]), float(parts[1]), int(parts[2]))
    except (IndexError, ValueError):
        return None  # not ours: treated as absent, and overwritten on the next write


def _ttl_ms(ttl: float | None) -> tuple:
    if ttl is None:
        return ()
    return ("PX", max(1, int(ttl * 1000)))


class RedisStore(Store):
    capabilities = frozenset({SCAN, TTL, SHARED})
    OPTIONS = ("timeout", "db", "password")

    def __init__(self, url: str, lean: bool = True) -> None:
        super().__init__()
        self.nx_get: bool | None = None  # does the server accept SET NX GET (Redis >= 7)?
        address = Address(url)
        self.url = address.url.partition("?")[0]
        if lean:
            self.conn = RespConnection(address)
        else:
            try:
                self.conn = RedisPyConnection(address)
            except ImportError:
                self.conn = RespConnection(address)

    @classmethod
    def open(cls, where, lean: bool = True) -> "RedisStore":
        return cls(where, lean)

    def _do(self, *args: object):
        self.count("command")
        return self.conn.execute(*args)

    def get(self, key: str) -> Record | None:
        return _record(self._do("GET", PREFIX + key))

    def add(self, key: str, record: Record, ttl: float | None = None) -> bool:
        return self._do("SET", PREFIX + key, _value(record), "NX", *_ttl_ms(ttl)) is not None

    def get_or_add(self, key: str, record: Record, ttl: float | None = None) -> Record | None:
        """One round trip: ``SET NX GET`` (Redis 7) creates the key or returns what is there."""
        if self.nx_get is False:
            return super().get_or_add(key, record, ttl)
        try:
            old = self._do("SET", PREFIX + key, _value(record), "NX", "GET", *_ttl_ms(ttl))
        except ReplyError as exc:
            # only a syntax error says the server is older than 7.0; any other refusal (a
            # Redis full at maxmemory, a read-only replica) is the store failing now, and
            # was taken for an old server: three commands a new key for the process's life
            if "syntax error" not in str(exc):
                raise
            self.nx_get = False  # Redis before 7.0: three commands at worst
            return super().get_or_add(key, record, ttl)
        if old is None:
            return None
        existing = _record(old)
        if existing is None:
            self.put(key, record, ttl)  # not a record of ours: replace it
        return existing

    def put(self, key: str, record: Record, ttl: float | None = None) -> None:
        """Sent without waiting: its reply is read with the next command's, or at close,
        so a known client's update costs no round trip of its own."""
        self.count("command")
        self.conn.send("SET", PREFIX + key, _value(record), *_ttl_ms(ttl))

    def delete(self, key: str, expected: Record | None = None) -> bool:
        if expected is None:
            return self._do("DEL", PREFIX + key) == 1
        return self._do("EVAL", _DELETE_IF, 1, PREFIX + key, _value(expected)) == 1

    def _keys(self):
        cursor = b"0"
        while True:
            cursor, keys = self._do("SCAN", cursor, "MATCH", PREFIX + "*", "COUNT", 1000)
            yield from keys
            if cursor in (b"0", 0, "0"):
                return

    def scan(self):
        batch: list[bytes] = []
        for key in self._keys():
            batch.append(key)
            if len(batch) >= 500:
                yield from self._fetch(batch)
                batch = []
        if batch:
            yield from self._fetch(batch)

    def _fetch(self, keys: list[bytes]):
        for key, value in zip(keys, self._do("MGET", *keys)):
            record = _record(value)
            if record is None:
                if value is not None:
                    self.count("unreadable")
                continue
            name = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
            yield name[len(PREFIX):], record

    def size(self) -> int:
        return sum(1 for _ in self._keys())

    def close(self) -> None:
        self.conn.close()
