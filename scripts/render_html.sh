#!/usr/bin/env bash
# Render a page written by `nmtkit translate --html` to a PNG with headless Chromium:
#   scripts/render_html.sh out.html out.png [WIDTHxHEIGHT]     (default 1400x1000)
# Needs a Chromium binary: `chromium`, `chromium-browser` or `google-chrome` on PATH, or set CHROMIUM=/path/to/it.
# The page is self-contained (inline CSS, no scripts or links), so rendering needs no network.
# --no-sandbox lets it run as root in containers; --disable-gpu avoids GPU probing on headless machines.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 PAGE.html OUT.png [WIDTHxHEIGHT]" >&2
    exit 2
fi
page=$1
out=$2
size=${3:-1400x1000}

browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then
            browser=$candidate
            break
        fi
    done
fi
if [[ -z $browser ]]; then
    echo "$0: no Chromium found (tried chromium, chromium-browser, google-chrome); install one or set CHROMIUM" >&2
    exit 1
fi
if [[ ! -f $page ]]; then
    echo "$0: page not found: $page" >&2
    exit 2
fi

"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size="${size/x/,}" --screenshot="$(realpath -m "$out")" "file://$(realpath "$page")"
echo "$out"
