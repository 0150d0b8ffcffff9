"""One client's verdict for any front end: whitelists, key, store, failures.

The wrapper (client only), the qmail-spp plugin and the Postfix policy server
(client, sender and recipient) all come here, so a whitelist, a key mode or a
store failure behaves the same behind every front end. Kept light: the
wrapper and the plugin import it once per SMTP connection or recipient.
"""

from __future__ import annotations

import os
import time

from greylist.core.policy import PASS, TEMPFAIL, Verdict, whitelisted

def decide_client(config, ip: str, host: str = "", sender: str | None = None,
                  recipient: str | None = None, store=None) -> tuple[Verdict, dict[str, object]]:
    """The verdict and the log fields for a client (already a canonical address).

    ``store``: an open store to use (policyd keeps one); otherwise one is
    opened from config.store and closed again. Store failures follow
    config.on_error; a whitelist that cannot be read is logged and skipped
    (greylisting still applies, nothing is lost).
    """
    fields: dict[str, object] = {}
    started = time.perf_counter()
    try:
        verdict = _whitelisted(config, ip, host, recipient, fields)
        if verdict is None:
            keying = config.keying
            client = keying.client(ip)
            key = keying.key_for(client, sender, recipient)
            if key != ip:
                fields["key"] = key
            verdict = _check(config, key, client if keying.needs_envelope else None, store)
    except Exception as exc:  # a failing store (or a bug of ours) must not lose mail
        from greylist.stores.base import StoreError

        if not isinstance(exc, (StoreError, OSError)):
            exc = f"internal error {type(exc).__name__}: {exc}"
        action = TEMPFAIL if config.on_error == "tempfail" else PASS
        verdict = Verdict(action, "store-error", 0.0, config.delay)
        fields["error"] = str(exc)
        fields["on_error"] = config.on_error
    fields["decision_ms"] = (time.perf_counter() - started) * 1000.0
    return verdict, fields


def _whitelisted(config, ip: str, host: str, recipient: str | None,
                 fields: dict[str, object]) -> Verdict | None:
    """The verdict for a whitelisted client or recipient, else None (errors go into fields)."""
    if not config.whitelist and not (recipient is not None and config.whitelist_recipients):
        return None
    from greylist.whitelist import WhitelistError, load_clients, load_recipients

    if config.whitelist:
        try:
            if load_clients(config.whitelist).matches(ip, host):
                return whitelisted()
        except WhitelistError as exc:  # skipped; the recipient list still counts
            fields["whitelist_error"] = str(exc)
    if recipient is not None and config.whitelist_recipients:
        try:
            if load_recipients(config.whitelist_recipients).matches(recipient):
                return Verdict(PASS, "whitelisted-recipient")
        except WhitelistError as exc:
            fields["whitelist_error"] = str(exc)
    return None


def _check(config, key: str, client: str | None, store) -> Verdict:
    from greylist.core.check import check

    if store is not None:
        return check(store, key, time.time(), config.policy, client)
    from greylist.stores import open_store

    opened = open_store(config.store)
    try:
        return check(opened, key, time.time(), config.policy, client)
    finally:
        opened.close()


def log(program: str, fields: dict[str, object]) -> None:
    """One key=value line on stderr (tcpserver's or qmail-spp's log); a closed stderr loses nothing else."""
    write(2, log_line(program, fields))


def write(fd: int, data: bytes) -> None:
    """Write to a pipe or socket that the other side may have closed already."""
    try:
        os.write(fd, data)
    except OSError:
        pass


def log_line(program: str, fields: dict[str, object]) -> bytes:
    """One key=value line; values quoted when they hold spaces, quotes or odd bytes."""
    parts = [f"{program}:"]
    for key, value in fields.items():
        if isinstance(value, float):
            text = f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"
        else:
            text = str(value)
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').encode(
                "ascii", "backslashreplace").decode("ascii") + '"'
        parts.append(f"{key}={text}")
    return (" ".join(parts) + "\n").encode("ascii", "backslashreplace")
