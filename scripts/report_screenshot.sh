#!/usr/bin/env bash
# PNG screenshot of a gradflow HTML report, taken with headless Chromium (Debian: apt-get install -y chromium).
#
#   scripts/report_screenshot.sh [REPORT.html] [OUT.png] [WIDTH] [HEIGHT]
#
# Without REPORT.html (or with "-"), a report is made first: examples/01_simple_mlp.py analyses a sigmoid MLP
# with a small initialisation (vanishing gradients) and writes its self-contained HTML report, which is then
# captured. OUT.png defaults to report.png; the window is WIDTH x HEIGHT CSS pixels (default 1280 x 2400;
# use e.g. 390 2400 for a phone-sized capture). Set CHROMIUM to use another browser binary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$CHROMIUM" ]; then
  echo "report_screenshot.sh: chromium not found: apt-get install -y chromium" >&2
  exit 3
fi
report=${1:--}
out=${2:-report.png}
width=${3:-1280}
height=${4:-2400}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$report" = "-" ]; then
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" examples/01_simple_mlp.py --out "$work" --steps 4 >/dev/null
  report="$work/sigmoid-small-init.html"
fi
[ -f "$report" ] || { echo "report_screenshot.sh: no such report: $report" >&2; exit 2; }
report=$(realpath "$report")
out=$(realpath -m "$out")

"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$work/profile" --hide-scrollbars \
  --window-size="$width,$height" --screenshot="$out" "file://$report" >"$work/chromium.log" 2>&1 || {
  cat "$work/chromium.log" >&2
  exit 1
}
[ -s "$out" ] || { echo "report_screenshot.sh: chromium wrote no screenshot" >&2; cat "$work/chromium.log" >&2; exit 1; }
echo "$out"
