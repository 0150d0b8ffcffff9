#!/bin/sh
# A scripted SMTP session through greylist-wrap, as tcpserver would run it:
# the first connection from a new client is greylisted; its retry after the
# delay is handed to the SMTP server (here a stand-in for qmail-smtpd).
set -e
cd "$(dirname "$0")/.."
store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT
export GREYLIST_STORE="file://$store" GREYLIST_DELAY=2 GREYLIST_HOSTNAME=mx.example TCPREMOTEIP=192.0.2.25
session='HELO client.example\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nQUIT\r\n'
echo "== first connection from $TCPREMOTEIP"
printf "$session" | .venv/bin/greylist-wrap .venv/bin/python simulator/standin_smtpd.py
echo "== retry after ${GREYLIST_DELAY}s"
sleep 2
printf 'HELO client.example\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nQUIT\r\n' \
  | .venv/bin/greylist-wrap .venv/bin/python simulator/standin_smtpd.py
echo "== the store"
.venv/bin/greylist show "$TCPREMOTEIP"
