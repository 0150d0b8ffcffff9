#!/bin/sh
# A stand-in for qmail-smtpd in `simulate live`: a minimal accepting SMTP
# session (greeting, 250 to each command, 354 for DATA, 221 on QUIT). Plain
# sh, so that its own start-up cost (about 1 ms) does not hide the wrapper's.
printf '220 standin ESMTP\r\n'
while IFS= read -r line; do
  case "$line" in
    [Qq][Uu][Ii][Tt]*) printf '221 standin bye\r\n'; exit 0 ;;
    [Dd][Aa][Tt][Aa]*) printf '354 go ahead\r\n' ;;
    *) printf '250 ok\r\n' ;;
  esac
done
