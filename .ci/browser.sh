#!/usr/bin/env bash
# What the console's browser test needs beyond the virtualenv: Debian's Chromium (driven by Playwright) and
# axe-core from the npm registry, fetched into an ignored folder (never committed). Run by `tox` before the
# tests; installs with apt-get only when something is missing and we are root (CI is); otherwise says what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    echo "the console's browser test needs: ${missing[*]} (as root: apt-get install -y ${missing[*]})" >&2
    exit 0  # the test itself then fails naming what is missing
  fi
fi
AXE_VERSION=4.14.1
if [ ! -f .tox/axe-core/package/axe.min.js ]; then
  mkdir -p .tox/axe-core
  npm pack "axe-core@${AXE_VERSION}" --pack-destination .tox/axe-core >/dev/null
  tar -xzf ".tox/axe-core/axe-core-${AXE_VERSION}.tgz" -C .tox/axe-core package/axe.min.js
fi
