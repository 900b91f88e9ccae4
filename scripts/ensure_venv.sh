#!/usr/bin/env bash
# Sourced by run.sh and test.sh: make sure .venv/ exists and holds metaseg-tf (with the extras in $1),
# re-installing only when pyproject.toml, requirements.txt or the extras change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
sources="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt" | sha256sum | cut -c1-16)"
want="$sources-[$EXTRAS]"
stamp="$VENV/.metaseg-install-stamp"
have="$(cat "$stamp" 2>/dev/null || true)"
# an install with the dev extras holds everything the plain install needs
if [ "$have" != "$want" ] && ! { [ -z "$EXTRAS" ] && [ "$have" = "$sources-[dev]" ]; }; then
  echo "[setup] installing metaseg-tf${EXTRAS:+[$EXTRAS]} and its dependencies (first run takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  target="$ROOT"
  [ -n "$EXTRAS" ] && target="$ROOT[$EXTRAS]"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
