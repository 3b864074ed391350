#!/usr/bin/env bash
# The Debian packages `make test` needs beyond Python, installed the same way for `make test` and CI (.ci/run):
# the chat page's browser test (tests/services/test_chat_page.py) drives Debian's Chromium through chromedriver,
# and a CJK font draws its Chinese.
#
# Does nothing when the packages are already installed (as any user). Otherwise installs them with apt-get,
# as root or through a password-less sudo; without either it stops with one line saying what to run.
# Machines without dpkg (not Debian/Ubuntu) get a note: install Chromium and chromedriver yourself and point
# LMFORGE_CHROMIUM / LMFORGE_CHROMEDRIVER at them.
set -euo pipefail

PACKAGES=(chromium chromium-driver fonts-wqy-zenhei)

if ! command -v dpkg >/dev/null 2>&1; then
  echo "note: no dpkg here (not Debian/Ubuntu): install Chromium, chromedriver and a CJK font yourself and set" \
       "LMFORGE_CHROMIUM / LMFORGE_CHROMEDRIVER, or the chat page's browser tests skip" >&2
  exit 0
fi

if [ -n "${LMFORGE_CHROMIUM:-}" ] && [ -n "${LMFORGE_CHROMEDRIVER:-}" ]; then
  exit 0  # the browser test uses the Chromium and chromedriver these name, not Debian's
fi

missing=()
for p in "${PACKAGES[@]}"; do
  # dpkg -s exits 0 also for a package that was removed but not purged: check the status line
  if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo)
else
  echo "error: the browser tests need the Debian packages ${missing[*]}, and installing them needs root;" \
       "run: sudo tools/install-system-packages.sh (then make test again)" >&2
  exit 1
fi

echo "installing ${missing[*]} (apt-get)" >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
