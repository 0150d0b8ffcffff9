"""SIGHUP held back from a server's start until its handler is in place.

SIGHUP's default action ends a process. A reload that came while a server was
still starting (reading its whitelists, opening its store, binding: a few
hundred milliseconds) killed it: systemd's ``ExecReload=kill -HUP $MAINPID``
right after ``systemctl start`` (a configuration tool does just that), or an
init script's reload after its start. Blocked from the server's first line on,
such a SIGHUP waits, and reloads the server once it can.
"""

from __future__ import annotations

import signal


def hold() -> None:
    """Block SIGHUP. A process forked before :func:`release` keeps it blocked (the syslog
    forwarder of ``--daemonize``: no harm); the servers fork their clients' programs after."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def release() -> None:
    """Unblock SIGHUP once its handler is installed: one that came meanwhile reloads now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
