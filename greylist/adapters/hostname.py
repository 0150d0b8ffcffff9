"""The host name in our SMTP replies, found the way a qmail admin expects."""

from __future__ import annotations

import os

QMAIL_ME = "/var/qmail/control/me"


def smtp_hostname(configured: str = "", me_path: str = QMAIL_ME) -> str:
    """GREYLIST_HOSTNAME, else the first line of control/me, else the machine's name."""
    if configured:
        return configured
    try:
        with open(me_path, "rb") as f:
            line = f.readline(256).strip()
        name = line.decode("ascii", "replace")
        if name and all(c.isalnum() or c in ".-_" for c in name):
            return name
    except OSError:
        pass
    return os.uname().nodename or "localhost"
