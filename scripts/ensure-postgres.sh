#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 (the test suite's second database).
# Starts the Debian cluster when it is installed but stopped; installs it with apt when it is missing.
set -uo pipefail
url="${PARTICALIZE_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
ready && exit 0
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "no PostgreSQL found; install it or set PARTICALIZE_TEST_POSTGRES_URL ($url)" >&2
    exit 1
  fi
fi
version="$(ls /etc/postgresql | sort -V | tail -n1)"
pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || pg_ctlcluster "$version" main start
for _ in $(seq 1 30); do ready && exit 0; sleep 1; done
echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1
