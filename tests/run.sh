#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine with Python 3.11, then run it.
#   bash tests/run.sh [pytest args...]
# System services the tests start themselves: PostgreSQL (initdb/pg_ctl into a temp dir), a single-node Slurm
# (deploy/slurm/cluster.sh), headless Chromium (viewer tests). They are installed here when missing and root can apt.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
have_initdb() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_initdb || need_apt+=(postgresql)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
command -v slurmctld >/dev/null 2>&1 || need_apt+=(slurm-wlm munge)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "tests/run.sh: missing ${need_apt[*]} (not root or no apt-get); tests needing them will skip" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -U pip
.venv/bin/python -m pip install -q -e ".[dev,postgres,slurm,kubernetes]"

export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest "$@"
