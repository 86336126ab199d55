#!/usr/bin/env bash
# Install everything gradflow_agent, its demo and its tests need, on a fresh Debian machine.
# torch comes first and pinned, so that no later requirement pulls another (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=()
  for bin in prometheus promtool prometheus-pushgateway prometheus-alertmanager amtool chromium; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  if ((${#missing[@]})); then
    echo "install.sh: installing Debian packages for: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus prometheus-pushgateway prometheus-alertmanager chromium fonts-dejavu-core >/dev/null
  fi
else
  echo "install.sh: not root or no apt-get: install prometheus, prometheus-pushgateway," \
       "prometheus-alertmanager and chromium yourself (the tests that need them say so)" >&2
fi

"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
"$PY" -m ipykernel install --sys-prefix >/dev/null 2>&1 || true
