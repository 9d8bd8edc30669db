#!/usr/bin/env bash
# Makes sure the system Chromium that tests/test_report_browser.py drives through Playwright is installed (Debian
# packages chromium and chromium-driver; Playwright never downloads a browser here). Idempotent: does nothing when
# both are present. Needs root (or sudo) only when it has something to install.
set -euo pipefail
if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "ensure_chromium: chromium is missing and this user cannot install it (no root, no sudo);" \
             "the browser tests will be skipped" >&2
        exit 0
    fi
fi
echo "ensure_chromium: installing chromium and chromium-driver (Debian packages)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
test -x /usr/bin/chromium
