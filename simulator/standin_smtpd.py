#!/usr/bin/env python3
"""A stand-in for qmail-smtpd: proves the wrapper exec'd it, then accepts mail.

If STANDIN_REPORT names a file, it writes a JSON report there first (argv, pid,
parent pid, the UCSPI and greylist variables it inherited, and the SIGPIPE
disposition it was started with). Then it speaks a minimal accepting SMTP
session on stdin/stdout, as qmail-smtpd would, and exits on QUIT or EOF.
"""

import json
import os
import sys

report = os.environ.get("STANDIN_REPORT")
if report:
    with open(report, "w") as f:
        json.dump(
            {
                "argv": sys.argv,
                "pid": os.getpid(),
                "ppid": os.getppid(),
                "env": {k: v for k, v in os.environ.items()
                        if k.startswith(("TCP", "GREYLIST", "RELAY", "WHITE", "STANDIN"))},
            },
            f,
        )

out = sys.stdout.buffer
out.write(b"220 standin ESMTP\r\n")
out.flush()
in_data = False
for line in sys.stdin.buffer:
    cmd = line.strip().upper()
    if in_data:
        if cmd == b".":
            in_data = False
            out.write(b"250 ok queued\r\n")
    elif cmd.startswith(b"QUIT"):
        out.write(b"221 standin bye\r\n")
        out.flush()
        break
    elif cmd.startswith(b"DATA"):
        in_data = True
        out.write(b"354 go ahead\r\n")
    elif cmd.startswith(b"EHLO"):
        out.write(b"250-standin\r\n250 PIPELINING\r\n")
    else:
        out.write(b"250 ok\r\n")
    out.flush()
