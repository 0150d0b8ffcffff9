"""Client addresses, parsed for real before anything else sees them.

cqgreylist put the TCPREMOTEIP string straight into a file path and read IPv6
addresses as directory ``0``. Here every address goes through the C library's
``inet_pton`` (via ``_socket``: the ``socket`` module would import ``enum``
and ``selectors``, 6 ms at every SMTP connection), and only its canonical
form is used from then on. An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``,
what an IPv6 listener reports for an IPv4 client) is the IPv4 client.
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


class BadAddress(ValueError):
    """TCPREMOTEIP (or a log field) is not an IP address."""


def parse_ip(text: str) -> str:
    """Return the canonical text form of an IPv4 or IPv6 address, or raise BadAddress."""
    packed = packed_ip(text)
    if len(packed) == 4:
        # an IPv4 text that inet_pton took is canonical already (four decimal numbers,
        # no leading zeros: tests/core/test_keys.py holds the C library to it);
        # inet_ntop's sprintf cost 2,700 instructions a decision
        return text if ":" not in text else inet_ntop(AF_INET, packed)
    return inet_ntop(AF_INET6, packed)


#: the last address packed, and its bytes: a decision packs its client's address three
#: times (canonical form, whitelist, network)
_last_packed: tuple[object, bytes] = (object(), b"")  # equal to no text


def packed_ip(text: str) -> bytes:
    """The address as 4 bytes (IPv4, including IPv4-mapped IPv6) or 16 bytes (IPv6)."""
    global _last_packed
    last = _last_packed
    if text == last[0]:
        return last[1]
    if not isinstance(text, str) or not text or len(text) > 45:
        raise BadAddress(f"not an IP address: {text!r}")
    try:
        if ":" in text:
            packed = inet_pton(AF_INET6, text)
            if packed[:12] == _V4_MAPPED:
                packed = packed[12:]
        else:
            packed = inet_pton(AF_INET, text)
    except (OSError, ValueError, UnicodeError):
        raise BadAddress(f"not an IP address: {text!r}") from None
    _last_packed = (text, packed)
    return packed


# --- what a greylisting entry is keyed on ---------------------------------

KEY_MODES = ("ip", "subnet", "triplet", "triplet-subnet")
MAX_ADDRESS = 512


def network_of(ip: str, v4_bits: int = 24, v6_bits: int = 64) -> str:
    """The client's network in canonical CIDR form: ``192.0.2.0/24``, ``2001:db8::/64``."""
    packed = packed_ip(ip)
    size = len(packed)
    if size == 4:
        if v4_bits == 24 and ":" not in ip:  # canonical (see parse_ip): the first three numbers
            return f"{ip[:ip.rindex('.')]}.0/24"
        family, host_bits, bits = AF_INET, 32 - v4_bits, v4_bits
    else:
        family, host_bits, bits = AF_INET6, 128 - v6_bits, v6_bits
    number = int.from_bytes(packed, "big") >> host_bits << host_bits
    return f"{inet_ntop(family, number.to_bytes(size, 'big'))}/{bits}"


def normalize_sender(address: str) -> str:
    """The envelope sender as a retry will present it again (postgrey's rules).

    Lower case; the bounce-address tags that change with every message removed:
    BATV (``prvs=1234abcdef=user@dom``), SRS (``SRS0=hash=tt=orig.dom=user@fwd``
    -> ``user@orig.dom``), a ``+extension``; and the digits of VERP-style bounce
    addresses (``list-bounces-123-user=dom@list``) replaced by ``#``.
    """
    a = address.strip().strip("<>").lower()
    if not a:
        return "<>"
    local, at, domain = a.rpartition("@")
    if not at:
        local, domain = a, ""
    if "=" in local:  # every tag form has one; most senders have none (three startswith saved)
        if local.startswith("prvs=") and local.count("=") == 2:
            # BATV, prvs=TAG=user, also seen reversed as prvs=user=TAG: the tag is the part
            # that looks like one (ten digits or letters at its start), as postgrey decides
            _, a, b = local.split("=")
            tag_a, tag_b = _looks_like_tag(a), _looks_like_tag(b)
            local = a if (tag_b and not tag_a) else b
        elif local.startswith(("prvs=", "btv1==", "msprvs1=")):  # BATV variants
            tag_end = local.find("=", local.index("=") + 1 if not local.startswith("btv1==") else 6)
            if tag_end > 0:
                local = local[tag_end + 1:]
        if local.startswith(("srs0=", "srs1=")):
            parts = local.split("=")
            # SRS0=HHH=TT=orig.domain=user ; SRS1 nests one more hop before them
            if len(parts) >= 5:
                domain, local = parts[-2], parts[-1]
    plus = local.find("+")
    if plus > 0:
        local = local[:plus]
    local = _digits_as_hash(local)
    return f"{local}@{domain}" if domain else local


_MARK_DIGITS = str.maketrans("0123456789", "\0" * 10)


def _digits_as_hash(text: str) -> str:
    """Each run of digits as one "#" (postgrey's ``s/\\d+/#/g``). An ASCII address without
    NUL (every real one) in C string operations: character by character in Python, this
    was the largest part of building a key."""
    if text.isascii() and "\0" not in text:
        marked = text.translate(_MARK_DIGITS)
        if "\0" not in marked:
            return text
        while "\0\0" in marked:
            marked = marked.replace("\0\0", "\0")
        return marked.replace("\0", "#")
    out, digits = [], False
    for ch in text:
        if ch.isdigit():
            if not digits:
                out.append("#")
            digits = True
        else:
            out.append(ch)
            digits = False
    return "".join(out)


def _looks_like_tag(text: str) -> bool:
    return len(text) >= 10 and all(c.isdigit() or "a" <= c <= "z" for c in text[:10])


def normalize_recipient(address: str) -> str:
    return address.strip().strip("<>").lower()


class Keying:
    """How a connection (or a recipient of it) maps to a store key.

    ip: the client address, as cqgreylist. subnet: its /24 (IPv4) or /64
    (IPv6), so a provider retrying from another host of its network is the
    same client. triplet: client address + normalised sender + recipient, the
    whitepaper's triplet; triplet-subnet: the same with the client's network.
    """

    __slots__ = ("mode", "v4_bits", "v6_bits")

    def __init__(self, mode: str = "ip", v4_bits: int = 24, v6_bits: int = 64) -> None:
        if mode not in KEY_MODES:
            raise ValueError(f"key mode must be one of {', '.join(KEY_MODES)}, not {mode!r}")
        if not 8 <= v4_bits <= 32 or not 16 <= v6_bits <= 128:
            raise ValueError("subnet sizes: IPv4 /8 to /32, IPv6 /16 to /128")
        self.mode = mode
        self.v4_bits = v4_bits
        self.v6_bits = v6_bits

    def client(self, ip: str) -> str:
        """The client part of the key (and the auto-whitelist's unit): address or network."""
        if self.mode in ("subnet", "triplet-subnet"):
            return network_of(ip, self.v4_bits, self.v6_bits)
        return parse_ip(ip)

    def key_for(self, client: str, sender: str | None = None, recipient: str | None = None) -> str:
        """The key of a client already reduced by :meth:`client`."""
        if not self.needs_envelope:
            return client
        if sender is None or recipient is None:
            raise BadAddress("triplet keys need the envelope sender and recipient")
        # bounded: an address is at most 254 characters (RFC 5321), a key never much more
        return f"{client}|{normalize_sender(sender)[:MAX_ADDRESS]}|{normalize_recipient(recipient)[:MAX_ADDRESS]}"

    @property
    def needs_envelope(self) -> bool:
        return self.mode in ("triplet", "triplet-subnet")  # asked at every decision
