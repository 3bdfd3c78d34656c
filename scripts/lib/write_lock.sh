#!/usr/bin/env bash
# Refresh locks/main.txt: install the newest releases pyproject.toml allows into a fresh VENV and
# write their exact versions (torch excluded, see setup_venv.sh). Run `make test` afterwards.
#
#   bash scripts/lib/write_lock.sh [VENV=.venv-lock] [EXTRAS=test,media,train,data,sparse] [OUT=locks/main.txt]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VENV="${1:-.venv-lock}"
EXTRAS="${2:-test,media,train,data,sparse}"
OUT="${3:-locks/main.txt}"

rm -rf "$VENV"
bash scripts/lib/setup_venv.sh "$VENV" "$EXTRAS" latest
TMP="$(mktemp "$OUT.XXXXXX")"
trap 'rm -f "$TMP"' EXIT
{
    echo "# Exact versions that make setup and CI install (pip constraints file)."
    echo "# Written by \`make lock\` on $(date -u +%F) with $("$VENV/bin/python" -V), $(uname -m)."
    echo "# torch is not here: TORCH_SPEC chooses the build (CPU: torch==2.13.0)."
    "$VENV/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(torch|nvidia-[a-z0-9-]+|triton)=='
} >"$TMP"
chmod 644 "$TMP"
mv "$TMP" "$OUT"
trap - EXIT
echo "wrote $OUT ($(grep -vc '^#' "$OUT") packages)"
