#!/usr/bin/env bash
# The main job: set up .venv/ if needed, then run the default experiment on the embedded synthetic phantom.
# Extra arguments go to `metaseg pipeline` (see `.venv/bin/metaseg pipeline --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_venv.sh" ""
cd "$ROOT"
exec metaseg pipeline "$@"
