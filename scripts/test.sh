#!/usr/bin/env bash
# The test suite: set up .venv/ with the dev extras if needed, then run pytest.
# Set METASEG_REAL_DATA=/path/to/shared/data to include the tests on real MRI.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_venv.sh" "dev"
cd "$ROOT"
exec python -m pytest "$@"
