#!/usr/bin/env bash
# One entry point for people and CI. Sets up everything it needs (idempotent; a second run
# takes a second or two), then runs one job:
#   bash scripts/dev.sh dashboard   serve the dashboard with Voila on 127.0.0.1, print its URL
#                                   (extra ARGS: --port N, --notebook PATH, --no-preheat)
#   bash scripts/dev.sh demo        print a released crosstab with its parameter card
#   bash scripts/dev.sh test [ARGS] run the whole test suite, notebooks and browser included
#                                   (extra ARGS go to pytest)
#   bash scripts/dev.sh lint        ruff over the whole tree (notebooks too), then mypy
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  # Debian packages (browsers come from Debian; playwright never downloads its own).
  as_root apt-get update -q >/dev/null
  as_root apt-get install -y -q "$@" >/dev/null
}

setup_python() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "pets_widgets needs Python 3.11 or newer" >&2; exit 1; }
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
  local stamp
  stamp=".venv/.setup-$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # pipefail keeps pip's failure; the filter itself may find nothing to print.
    .venv/bin/python -m pip install -q -U pip 2>&1 | { grep -v "^WARNING: Location" || true; }
    # PYTHONWARNINGS hides setuptools' notes about editable installs (harmless).
    PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -c scripts/constraints.txt \
      -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
    .venv/bin/python -c "import pets_widgets, phe.util; assert phe.util.HAVE_GMP"
    rm -f .venv/.setup-*
    touch "$stamp"
  fi
}

setup_chromium() {
  command -v chromium >/dev/null 2>&1 || apt_install chromium
}

job=${1:-dashboard}
shift || true
case "$job" in
  dashboard)
    setup_python
    # Never export MPLBACKEND=Agg: figures would vanish from the dashboard's kernels.
    unset MPLBACKEND
    exec .venv/bin/python -m pets_widgets dashboard "$@" ;;
  demo)
    setup_python
    exec .venv/bin/python -m pets_widgets demo "$@" ;;
  test)
    setup_python
    setup_chromium
    # Never export MPLBACKEND=Agg: figures would vanish from kernels, Voila and nbval.
    unset MPLBACKEND
    exec .venv/bin/python -m pytest "$@" ;;
  lint)
    setup_python
    .venv/bin/ruff check . "$@"
    exec .venv/bin/mypy ;;
  *)
    echo "usage: bash scripts/dev.sh {dashboard|demo|test|lint} [args]" >&2; exit 2 ;;
esac
