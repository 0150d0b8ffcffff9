"""The greylisting service: the one place that assembles a decision.

Every protocol adapter (the UCSPI wrapper, the qmail-spp plugin, the Postfix
policy server) and the simulator hand a :class:`Connection` to
:meth:`Greylister.decide` and get an :class:`Outcome` back. In between, in
this order: tcprules' RELAYCLIENT / WHITELISTED, the client and recipient
whitelists, the key, the store (:func:`~greylist.core.check.check`), what
happens when the store fails (``on_error``), shadow mode, and the fields of
the one log line. A feature added here exists behind every front end and in
simulation alike, because there is no other copy of this pipeline.

Time comes from the injected ``clock`` (``time.time`` in production, the
virtual clock in the simulator). Kept light: the wrapper and the plugin
import it once per SMTP connection.
"""

from __future__ import annotations

import os
import time

from greylist.core.check import check
from greylist.core.policy import PASS, TEMPFAIL, Verdict
from greylist.core.values import Value

#: Reasons the service adds to the policy's own (new, too-soon, passed, known, auto-whitelisted).
RELAYCLIENT = "relayclient"
WHITELISTED = "whitelisted"
WHITELISTED_RECIPIENT = "whitelisted-recipient"
STORE_ERROR = "store-error"
INTERNAL_ERROR = "internal-error"

ENFORCE = "enforce"
SHADOW = "shadow"


class Connection(Value):
    """What a front end knows about a client, translated from its protocol.

    ip: the canonical client address (:func:`~greylist.core.keys.parse_ip`).
    host: the client's host name ("" when unknown).
    host_verified: the name was verified (forward-confirmed: tcpserver -p, Postfix's
        client_name); an unverified name is the client's own claim (its PTR record)
        and never whitelists, unless the hostname_verified setting says it is verified.
    sender, recipient: the envelope, where the protocol shows it (None otherwise).
    relay, whitelisted: tcprules set RELAYCLIENT or WHITELISTED for this client.
    settings: per-client GREYLIST_* variables not yet in the service's
        configuration (a front end that serves many clients, with tcprules);
        they beat the run script's flags.
    """

    __slots__ = ("ip", "host", "sender", "recipient", "relay", "whitelisted", "settings", "host_verified")

    def __init__(self, ip: str, host: str = "", sender: str | None = None,
                 recipient: str | None = None, relay: bool = False, whitelisted: bool = False,
                 settings: dict[str, str] | None = None, host_verified: bool = False) -> None:
        self.ip = ip
        self.host = host
        self.host_verified = host_verified
        self.sender = sender
        self.recipient = recipient
        self.relay = relay
        self.whitelisted = whitelisted
        self.settings = settings

    @classmethod
    def from_environ(cls, ip: str, environ, sender: str | None = None,
                     recipient: str | None = None) -> "Connection":
        """A connection as tcpserver (and qmail-spp) describe it in the environment."""
        return cls(ip, environ.get("TCPREMOTEHOST", ""), sender, recipient,
                   "RELAYCLIENT" in environ, "WHITELISTED" in environ)


class Outcome:
    """The answer for one connection: what to do, what enforcing would have done, the log line.

    verdict: what the front end must do (always a pass in shadow mode).
    shadow: in shadow mode, the verdict enforcing would have given; else None.
    config: the settings that applied (per client), for the reply's text.
    """

    __slots__ = ("verdict", "shadow", "config", "connection", "key", "extra", "decision_ms")

    def __init__(self, verdict: Verdict, shadow: Verdict | None, config, connection: Connection,
                 key: str | None, extra: dict[str, object], decision_ms: float) -> None:
        self.verdict = verdict
        self.shadow = shadow
        self.config = config
        self.connection = connection
        self.key = key
        self.extra = extra
        self.decision_ms = decision_ms

    @property
    def enforced(self) -> Verdict:
        """The verdict greylisting reached, whether or not it was enforced."""
        return self.shadow if self.shadow is not None else self.verdict

    def fields(self) -> dict[str, object]:
        """The fields of the connection's one log line, in a fixed order (built on demand:
        the simulator decides hundreds of thousands of times and logs none)."""
        conn, decided = self.connection, self.enforced
        fields: dict[str, object] = {"ip": conn.ip}
        if conn.sender is not None or conn.recipient is not None:
            fields["from"] = conn.sender or "<>"
            fields["to"] = conn.recipient or ""
        fields["verdict"] = self.verdict.action
        if self.shadow is not None:
            fields["shadow"] = self.shadow.action
        fields["reason"] = decided.reason
        fields["age"] = decided.age
        if decided.action == TEMPFAIL:
            fields["retry_in"] = decided.retry_in
        if self.key is not None and self.key != conn.ip:
            fields["key"] = self.key
        fields.update(self.extra)
        fields["decision_ms"] = self.decision_ms
        return fields


#: how long a long-lived server (policyd, serve) may hold decisions before committing them
COMMIT_WINDOW = 0.2
#: a server that decided this recently is busy: its decisions write the held rows
FLUSH_BUSY = 0.02
#: after a store failure a long-lived server leaves the store alone this long (doubled at
#: each failure less than STORE_FAILURES_APART after the last, up to STORE_RETRY_MAX):
#: decisions meanwhile follow on_error at once. Trying at every decision, a Redis that
#: hangs (a partition from another MX, a stopped server) held every client of the one
#: event loop for its timeout, 100 ms a decision: ten answers a second for the whole MX.
#: And a store that reads but cannot write (a full disk) failed only when the held
#: decisions were written, unlogged: every retry was greylisted as new, for ever
STORE_RETRY = 1.0
STORE_RETRY_MAX = 10.0
STORE_FAILURES_APART = 60.0


class StoreResting(Exception):
    """The store failed a moment ago and is not tried again yet (see STORE_RETRY)."""


class Greylister:
    """The greylisting service for one configuration.

    ``store``: an open store to use; otherwise one is opened from
    ``config.store`` when first needed and kept (``keep_store=False``: closed
    after each decision). A store that fails is closed and opened again at
    the next decision. ``clock``: seconds since the epoch, injected.
    ``report``: where a long-lived server logs a store failure that no decision
    meets (held decisions it could not write, at a window's end or a round's),
    given as a log line's fields; without it, the next decision says it.
    """

    def __init__(self, config, store=None, clock=time.time, keep_store: bool = True,
                 commit_window: float = 0.0, in_rounds: bool = False, report=None) -> None:
        self.config = config
        self.report = report
        self.clock = clock
        self.keep_store = keep_store
        self.commit_window = commit_window
        self.in_rounds = in_rounds  # the server calls write_owed at the end of each loop round
        self._flush_timer = None
        self._flush_loop = None
        self._last_decision = 0.0
        self._store = store
        self._own_store = store is None
        self._base = _prepared(config)  # policy and keying built and checked once, not per decision
        self._whitelists: dict[tuple[str, str], object] = {}
        self._configs: dict[tuple, object] = {}
        self._store_rest = 0.0        # seconds the store is left alone after its last failure
        self._store_failed_at = float("-inf")  # when that was (time.monotonic)
        self._store_tried_at = 0.0    # when it may be tried again
        self._store_failure = ""      # what it said then
        self._unsaid: list[str] = []  # what it said as it was closed, for the next log line

    # -- the pipeline ---------------------------------------------------------
    def decide(self, conn: Connection) -> Outcome:
        """The outcome for one connection (or one recipient of it). Never raises for a
        store failure (that follows on_error); raises ConfigError for per-client
        settings that cannot be used."""
        started = time.perf_counter()
        config, policy, keying, by_ip, envelope, hashed = self._config_for(conn.settings) if conn.settings \
            else self._base
        extra: dict[str, object] = {}
        key = None
        try:
            verdict = None
            if conn.relay or conn.whitelisted or config.whitelist or config.whitelist_recipients:
                verdict = self._listed(config, conn, extra)
            if verdict is None:
                # Connection.ip is canonical already: only networks need work
                client = conn.ip if by_ip else keying.client(conn.ip)
                if envelope:
                    key = keying.key_for(client, conn.sender, conn.recipient)
                    awl = conn.ip  # the auto-whitelist counts the client address, as postgrey does
                else:
                    key, awl = client, None
                if hashed is not None:  # --privacy: the store holds hashes only
                    key = hashed(key)
                    awl = awl and hashed(awl)
                verdict = self._check(config, policy, key, awl, extra)
        except Exception as exc:  # a failing store, or a bug of ours: never lose mail
            verdict = self._failed(config, exc, extra)
        shadow = None
        if config.mode == SHADOW:
            shadow = verdict
            verdict = Verdict(PASS, verdict.reason, verdict.age)
        return Outcome(verdict, shadow, config, conn, key, extra,
                       (time.perf_counter() - started) * 1000.0)

    def _listed(self, config, conn: Connection, extra: dict) -> Verdict | None:
        """The verdict for a client that skips greylisting, else None."""
        if conn.relay:
            return Verdict(PASS, RELAYCLIENT)
        if conn.whitelisted:
            return Verdict(PASS, WHITELISTED)
        if config.whitelist:
            listed = self._whitelist("clients", config.whitelist, extra)
            if listed is not None:
                if listed.matches(conn.ip):
                    return Verdict(PASS, WHITELISTED)
                if conn.host and listed.has_names and listed.matches_name(conn.host):
                    if conn.host_verified or config.hostname_verified:
                        return Verdict(PASS, WHITELISTED)
                    extra["hostname_ignored"] = (f"{conn.host} is listed but not verified (run tcpserver "
                                                 "-p and set GREYLIST_HOSTNAME_VERIFIED=1)")
        if conn.recipient is not None and config.whitelist_recipients:
            listed = self._whitelist("recipients", config.whitelist_recipients, extra)
            if listed is not None and listed.matches(conn.recipient):
                return Verdict(PASS, WHITELISTED_RECIPIENT)
        return None

    def _whitelist(self, kind: str, path: str, extra: dict):
        """A compiled whitelist, loaded once until :meth:`reload`; one that cannot be
        read is logged and skipped (greylisting still applies, nothing is lost)."""
        cached = self._whitelists.get((kind, path))
        if cached is not None:
            return cached
        from greylist.whitelist import WhitelistError, load_clients, load_recipients

        try:
            # only a process that starts once per connection (keep_store=False: the wrapper,
            # the plugin) gains from a compiled cache; a server compiles once and writes nothing
            listed = load_clients(path, cache=not self.keep_store) if kind == "clients" else load_recipients(path)
        except WhitelistError as exc:
            extra["whitelist_error"] = str(exc)
            return None
        if listed.warnings:  # said once per load: lines that can never match
            extra["whitelist_warning"] = "; ".join(listed.warnings[:5]) + (
                f" (and {len(listed.warnings) - 5} more)" if len(listed.warnings) > 5 else "")
        self._whitelists[(kind, path)] = listed
        return listed

    def _open(self, url: str):
        from greylist.stores import open_store

        store = open_store(url)
        if self.commit_window:
            try:
                store.hold_commits(self.commit_window, self.in_rounds)
            except BaseException:
                store.close()  # a database it may not write, say: nothing is held yet
                raise
        self._store = store
        return store

    def try_store(self) -> str | None:
        """A long-lived server opens its store at start, as the user it runs as: a store it
        cannot use (a wrong --dbdir, Redis down) is said then, not first at the first
        request, which then follows on_error as any decision does. None: it opened."""
        from greylist.stores import StoreError

        if self._store is not None or not self._own_store:
            return None
        try:
            self._open(self.config.store)
        except (StoreError, OSError) as exc:
            self._store = None
            return str(exc)
        return None

    def _check(self, config, policy, key: str, client: str | None, extra: dict) -> Verdict:
        store = self._store
        if store is None:
            if time.monotonic() < self._store_tried_at:
                raise StoreResting(self._store_failure)
            store = self._open(config.store)
        try:
            return check(store, key, self.clock(), policy, client, extra)
        finally:
            if store.warnings:
                extra["store_warning"] = "; ".join(store.warnings)
                store.warnings.clear()
            if not self.keep_store and self._own_store:
                self.close()

    def _failed(self, config, exc: Exception, extra: dict) -> Verdict:
        """A store failure follows on_error; anything else is our bug: logged as one and
        answered with a tempfail (the client keeps the mail), never a silent pass."""
        from greylist.stores.base import StoreError

        if isinstance(exc, (StoreError, OSError, StoreResting)):
            if isinstance(exc, StoreResting):
                extra["store_retry_in"] = max(0.0, self._store_tried_at - time.monotonic())
            elif self._own_store:
                self._store_failed(exc)  # opened again at the next decision (a server's: later)
            self._say_unsaid(extra)
            extra["error"] = str(exc)
            extra["on_error"] = config.on_error
            action = TEMPFAIL if config.on_error == "tempfail" else PASS
            return Verdict(action, STORE_ERROR, 0.0, config.delay)
        extra["error"] = f"internal error {type(exc).__name__}: {exc}"
        return Verdict(TEMPFAIL, INTERNAL_ERROR, 0.0, config.delay)

    def _config_for(self, settings: dict[str, str]) -> tuple:
        """(config, policy, keying) with a client's tcprules variables on top (cached per set)."""
        items = tuple(sorted((k, v) for k, v in settings.items() if k.startswith("GREYLIST_")))
        if not items:
            return self._base
        entry = self._configs.get(items)
        if entry is None:
            from greylist.config import override

            if len(self._configs) > 1000:
                self._configs.clear()
            entry = self._configs[items] = _prepared(override(self.config, dict(items)))
        return entry

    def prepare(self) -> None:
        """Import and read now what decisions would import or read later: a server calls
        this before it drops privileges, after which it may no longer read its own
        installation (a Python under /root is unreadable to qmaild or postgrey)."""
        import _bisect  # noqa: F401 - whitelists' network lookup
        private_key()  # imports SHA-1 now: a tcprules rule may turn on GREYLIST_PRIVACY

        from greylist.stores import StoreError, parse_url, store_class

        try:
            store_class(parse_url(self.config.store)).prepare_server()
        except StoreError:
            pass  # reported per connection, as on_error says
        extra: dict[str, object] = {}
        if self.config.whitelist:
            listed = self._whitelist("clients", self.config.whitelist, extra)
            if listed is not None and listed.patterns:
                listed.matches_name("prepare.invalid")  # compiles the patterns (imports re2)
        if self.config.whitelist_recipients:
            self._whitelist("recipients", self.config.whitelist_recipients, extra)

    # -- lifetime ---------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Decisions the store holds uncommitted: :meth:`flush` them within the window."""
        store = self._store
        return store is not None and store.pending

    def flush_in_time(self, loop) -> None:
        """After a decision of a long-lived server: decisions the store now holds are
        flushed within the window, by a timer on ``loop`` (this package's or asyncio's)."""
        self._last_decision = time.monotonic()
        self._flush_later(loop)

    def _flush_later(self, loop) -> None:
        if self._flush_timer is None and self.pending:
            self._flush_loop = loop
            self._flush_timer = loop.call_later(self.commit_window, self._timed_flush)

    def _timed_flush(self) -> None:
        """At the window's end. On a busy server its decisions write what is held, a few
        rows each, from the window's end on (the timer writing all of it at once held
        every client for a millisecond or more); the timer then only looks again, and
        writes what is left itself once decisions pause or stop writing (whitelisted)."""
        self._flush_timer = None
        store = self._store
        if (store is not None and store.pending and time.monotonic() - self._last_decision < FLUSH_BUSY
                and store.writes_as_it_decides()):
            self._flush_timer = self._flush_loop.call_later(FLUSH_BUSY, self._timed_flush)
            return
        self.flush(wait=False)
        if self.pending:  # another connection holds the write lock: the rows stay held, tried again
            self._flush_timer = self._flush_loop.call_later(self.commit_window, self._timed_flush)

    def write_owed(self) -> None:
        """The end of a round of the server's event loop (``in_rounds``): what the round's
        decisions left to write, written together."""
        store = self._store
        if store is not None and store.owed:  # most rounds owe nothing
            self._writing(store.write_owed)

    def flush(self, wait: bool = True) -> None:
        """Commit held decisions (the window's timer, with ``wait`` False: never waiting
        for another connection's write lock; a server stopping)."""
        store = self._store
        if store is not None and store.pending:
            self._writing(lambda: store.flush(wait))

    def _store_failed(self, exc: Exception) -> None:
        """Close a store that failed; a server leaves it alone for a while (STORE_RETRY),
        its decisions meanwhile following on_error, each logged with the failure."""
        self._unsaid = self.close()  # held decisions it could not write, say (and what was unsaid)
        if not self.keep_store:
            return  # a wrapper decides once: its next process tries afresh
        now = time.monotonic()
        if now - self._store_failed_at > STORE_FAILURES_APART:
            self._store_rest = 0.0
        self._store_rest = min(2 * self._store_rest or STORE_RETRY, STORE_RETRY_MAX)
        self._store_failed_at = now
        self._store_tried_at = now + self._store_rest
        self._store_failure = str(exc)

    def _say_unsaid(self, fields: dict) -> None:
        """What a closed store said that no line has logged yet goes into this one."""
        if self._unsaid:
            said = fields.get("store_warning")  # what the failing store said in the decision comes first
            fields["store_warning"] = "; ".join([*([said] if said else []), *self._unsaid])
            self._unsaid = []

    def _writing(self, write) -> None:
        """A store that fails while writing what decisions held is a store that failed, as
        in a decision (those clients are greylisted once more; the decisions of its rest
        follow on_error and log the failure). Anything else is our bug, raised to the
        event loop, which logs it as one (the store has rolled back)."""
        try:
            write()
        except Exception as exc:
            from greylist.stores.base import StoreError

            if not isinstance(exc, (StoreError, OSError)):
                raise
            if self._own_store:
                self._store_failed(exc)
            if self.report is not None:
                # said now: on a quiet server the next decision may be hours away, and a
                # stopping one makes none (both kept it to themselves)
                fields: dict[str, object] = {"error": str(exc), "on_error": self.config.on_error}
                self._say_unsaid(fields)
                if self._store_rest:
                    fields["store_retry_in"] = self._store_rest
                self.report(fields)

    def reload(self) -> list[str]:
        """Read whitelists again and reopen the store at the next decision (SIGHUP), even
        one that failed a moment ago (the admin may have mended it). Returns what the
        store said as it closed (see :meth:`close`).

        Decisions held because another connection keeps the write lock (an admin's sqlite3
        shell) go to a store opened at once, and wait there for the lock as before: the
        close waited its busy timeout with every client, then lost them (their clients
        greylisted once more)."""
        from greylist.stores.base import StoreError

        self._whitelists.clear()
        self._configs.clear()
        self._store_rest = self._store_tried_at = 0.0
        if not self._own_store:
            return []
        store, carried = self._store, {}
        if store is not None:
            try:
                carried = store.hand_over()
            except (StoreError, OSError):
                pass  # a failing store: its close says what it could not write
        said = self.close()
        if carried:
            try:
                self._open(self.config.store).take_over(carried)
            except (StoreError, OSError) as exc:
                return [*said, f"{len(carried)} held rows not written: {exc}"]
            said.append(f"{len(carried)} held rows kept for the reopened store")
            if self._flush_loop is not None:
                self._flush_later(self._flush_loop)
        return said

    def close(self) -> list[str]:
        """Close the store, writing what it holds; what it said meanwhile (held decisions it
        could not write, say), which a stopping server logs."""
        store, self._store = self._store, None
        said, self._unsaid = self._unsaid, []  # what a failed store said that nobody logged yet
        if store is None or not self._own_store:
            return said
        from greylist.stores.base import StoreError

        try:
            store.close()
        except (StoreError, OSError):
            pass  # closing a broken connection may fail too: what it held, it has said
        except Exception as exc:  # noqa: BLE001 - our bug: said, never hidden (held rows may be lost)
            store.warnings.append(f"internal error {type(exc).__name__} closing the store: {exc} "
                                  "(a bug of ours: decisions it held may not be written)")
        said = [*said, *store.warnings]
        store.warnings.clear()
        return said

    def __enter__(self) -> "Greylister":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepared(config) -> tuple:
    """What a decision needs of a configuration, computed once: (config, policy, keying,
    keyed on the address alone, keyed on the envelope, the key hash or None)."""
    keying = config.keying
    return (config, config.policy, keying, keying.mode == "ip", keying.needs_envelope,
            private_key() if config.privacy else None)


def private_key():
    """postgrey's --privacy: a key becomes the SHA-1 of its text, in hex. A client address
    hashed so is exactly postgrey's auto-whitelist key, so ``migrate`` carries those over.
    (Imported here, when a configuration is read: before privileges drop. CPython's own
    SHA-1, not hashlib, which loads OpenSSL: 3.7 MB of resident memory.)"""
    try:
        from _sha1 import sha1
    except ImportError:  # pragma: no cover - a Python built without it
        from hashlib import sha1

    def hashed(text: str) -> str:
        return sha1(text.encode("utf-8", "surrogateescape")).hexdigest()

    return hashed


# -- writing log lines: one per connection, on stderr -----------------------

def log(program: str, fields: dict[str, object]) -> None:
    """One key=value line on stderr (tcpserver's or qmail-spp's log); a closed stderr loses nothing else."""
    write(2, log_line(program, fields))


def write(fd: int, data: bytes) -> None:
    """Write to a pipe or socket that the other side may have closed already."""
    try:
        os.write(fd, data)
    except OSError:
        pass


_PLAIN = frozenset(' "=\\')  # characters that make a value need quotes


def log_line(program: str, fields: dict[str, object]) -> bytes:
    """One key=value line; values quoted when they hold spaces, quotes or odd bytes.

    Nearly every line needs no quotes, and a server writes one per request: the
    whole line is checked at once (each value adds one space and one "=" at
    most, so the counts tell whether any value holds either), and only a line
    that fails is built again value by value."""
    texts = [f"{key}={_text(value)}" for key, value in fields.items()]
    line = f"{program}: " + " ".join(texts)
    n = len(texts)
    if (line.count(" ") == n and line.count("=") == n and line.isascii() and line.isprintable()
            and '"' not in line and "\\" not in line and "= " not in line and line[-1] != "="):
        return (line + "\n").encode("ascii")
    return quoted_line(program, fields)


def quoted_line(program: str, fields: dict[str, object]) -> bytes:
    """The line built value by value, each quoted as it needs."""
    parts = [f"{program}:"]
    for key, value in fields.items():
        text = _text(value)
        if not text or not _PLAIN.isdisjoint(text) or not text.isascii() or not text.isprintable():
            text = '"' + "".join(_escape(c) for c in text) + '"'
        parts.append(f"{key}={text}")
    return (" ".join(parts) + "\n").encode("ascii", "backslashreplace")


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"
    return str(value)


def shown(text: str) -> str:
    """Text a client controls (a triplet's sender, say), as a terminal may print it: its
    control characters as escapes, so that ``greylist expire -v`` never hands an admin's
    terminal a client's escape sequence (a title, a cleared screen, worse)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    """A character of a quoted log value: controls and non-ASCII as escapes (Python's, so
    a reader gets the value back), so a value (a sender's address, say) can never start a
    line of its own."""
    if c == "\\" or c == '"':
        return "\\" + c
    if " " <= c <= "~":
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
