#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:6379 (the shared rate limit tests' storage). Starts one when the
# binary is installed but nothing answers; installs it with apt when it is missing and this runs as root.
set -uo pipefail
ready() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
ready && exit 0
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "no Redis found; install redis-server or set PARTICALIZE_TEST_REDIS_URL" >&2
    exit 1
  fi
fi
dir=/var/lib/redis logfile=/var/log/redis/ci.log
if ! { mkdir -p "$dir" "$(dirname "$logfile")" && [ -w "$dir" ] && [ -w "$(dirname "$logfile")" ]; } 2>/dev/null; then
  dir="${TMPDIR:-/tmp}" logfile="${TMPDIR:-/tmp}/particalize-redis.log"
fi
redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir "$dir" \
  --logfile "$logfile" >/dev/null
for _ in $(seq 1 30); do ready && exit 0; sleep 0.5; done
echo "Redis did not come up on 127.0.0.1:6379 (log: $logfile)" >&2
exit 1
