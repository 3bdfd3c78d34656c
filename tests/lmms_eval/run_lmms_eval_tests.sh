#!/usr/bin/env bash
# lmms-eval against llava.eval, record by record (tests/lmms_eval), in the lmms-eval venv.
#
#   bash tests/lmms_eval/run_lmms_eval_tests.sh [pytest args]     (from anywhere; or make test-lmms-eval)
#
# Sets up .venv-lmms-eval as scripts/eval/lmms_eval.sh does (same lock, TORCH_SPEC and
# LMMS_EVAL_VENV), then runs `python -m pytest -q tests/lmms_eval` there, offline, one CPU thread
# per process. Exit status: the setup's if it fails, else pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LMMS_EVAL_SETUP_ONLY=1 bash scripts/eval/lmms_eval.sh
VENV="${LMMS_EVAL_VENV:-.venv-lmms-eval}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/lmms_eval "$@"
