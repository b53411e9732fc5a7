#!/usr/bin/env bash
# Checks the web page of `selective serve` in headless Chromium, against a server that is already running.
#
#   scripts/check_web_page.sh BASE_URL SCREENSHOT.png      e.g. scripts/check_web_page.sh http://127.0.0.1:8080 /tmp/page.png
#
# It loads BASE_URL/, waits for the model name, streams a completion (max_tokens 40, fixed seed) and checks
# that the output grew in several steps and the status reports tokens, time to first token and tokens/s,
# writes the screenshot, then checks Stop, an error message from the server (temperature -1 must be
# refused with a 4xx JSON error), and a two-turn chat whose second request carries the first turn
# (a second screenshot goes to SCREENSHOT-chat.png). Exits non-zero with a message on any failure.
#
# Needs Debian's chromium (installed with apt-get when missing and running as root) and node/npm;
# playwright-core is installed into $PLAYWRIGHT_DIR (default /tmp/selective-web-check), not into the project.
# Env: CHROMIUM (default /usr/bin/chromium), CHECK_TIMEOUT_MS (per generation, default 180000).
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 BASE_URL SCREENSHOT.png" >&2
  exit 2
fi
base=$1
shot=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PLAYWRIGHT_DIR=${PLAYWRIGHT_DIR:-/tmp/selective-web-check}
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

die() { echo "check_web_page: FAILED: $*" >&2; exit 1; }

if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "check_web_page: installing chromium with apt-get" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null \
      || die "apt-get install chromium failed"
  fi
  [ -x "$CHROMIUM" ] || die "no Chromium at $CHROMIUM (install Debian's package: apt-get install -y chromium)"
fi
command -v node >/dev/null || die "node is not installed (apt-get install -y nodejs npm)"

if [ ! -f "$PLAYWRIGHT_DIR/node_modules/playwright-core/package.json" ]; then
  command -v npm >/dev/null || die "npm is not installed (apt-get install -y npm)"
  mkdir -p "$PLAYWRIGHT_DIR"
  echo "check_web_page: installing playwright-core into $PLAYWRIGHT_DIR" >&2
  npm install --prefix "$PLAYWRIGHT_DIR" --no-audit --no-fund --loglevel=error 'playwright-core@1' >&2 \
    || die "npm install playwright-core failed"
fi

# Fail early, with a plain message, when nothing answers at BASE_URL.
if command -v curl >/dev/null; then
  curl -fsS -o /dev/null --max-time 10 "${base%/}/v1/models" || die "no server answers GET ${base%/}/v1/models"
fi

mkdir -p "$(dirname "$shot")"
exec node "$here/check_web_page.mjs" "$base" "$shot"
