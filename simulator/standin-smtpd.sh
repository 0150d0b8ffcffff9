#!/bin/sh
# A stand-in for qmail-smtpd (simulate live, benchmarks, tests): a minimal
# accepting SMTP session (greeting, 250 to each command, 354 and a queued 250
# for DATA, 221 on QUIT). Plain sh, so that its own start-up cost (about 1 ms)
# does not hide ours. With STANDIN_REPORT set it first writes its pid, argv and
# environment there (simulator/commands.py reads it), to prove what it was given.
if [ -n "$STANDIN_REPORT" ]; then
  {
    echo "pid $$"
    echo "ppid $PPID"
    for a in "$0" "$@"; do echo "arg $a"; done
    env | sed 's/^/env /'
  } > "$STANDIN_REPORT"
fi
printf '220 standin ESMTP\r\n'
while IFS= read -r line; do
  case "$line" in
    [Qq][Uu][Ii][Tt]*) printf '221 standin bye\r\n'; exit 0 ;;
    [Dd][Aa][Tt][Aa]*)
      printf '354 go ahead\r\n'
      while IFS= read -r body; do
        case "$body" in .|."$(printf '\r')") break ;; esac
      done
      printf '250 ok queued\r\n' ;;
    [Ee][Hh][Ll][Oo]*) printf '250-standin\r\n250 PIPELINING\r\n' ;;
    *) printf '250 ok\r\n' ;;
  esac
done
