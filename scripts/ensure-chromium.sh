#!/usr/bin/env bash
# Make sure Debian's Chromium is at /usr/bin/chromium (tests/test_browser.py drives it headless).
# Installs the `chromium` package with apt when it is missing and we are root; otherwise says how.
set -uo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log="$(mktemp)"
  if apt-get update -qq >"$log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >>"$log" 2>&1 \
    && [ -x /usr/bin/chromium ]; then
    rm -f "$log"
    exit 0
  fi
  cat "$log" >&2
  rm -f "$log"
  echo "installing Debian's chromium with apt-get failed (see above)" >&2
  exit 1
fi
echo "no /usr/bin/chromium: install Debian's chromium package (sudo apt-get install chromium)," \
  "or set PARTICALIZE_TEST_BROWSER=0 to skip the browser test" >&2
exit 1
