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
        return inet_ntop(AF_INET, packed)
    return inet_ntop(AF_INET6, packed)


def packed_ip(text: str) -> bytes:
    """The address as 4 bytes (IPv4, including IPv4-mapped IPv6) or 16 bytes (IPv6)."""
    if not isinstance(text, str) or not text or len(text) > 45:
        raise BadAddress(f"not an IP address: {text!r}")
    try:
        if ":" in text:
            packed = inet_pton(AF_INET6, text)
            if packed[:12] == _V4_MAPPED:
                return packed[12:]
            return packed
        return inet_pton(AF_INET, text)
    except (OSError, ValueError, UnicodeError):
        raise BadAddress(f"not an IP address: {text!r}") from None
