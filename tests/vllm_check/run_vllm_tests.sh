#!/usr/bin/env bash
# vLLM against llava.eval, record by record (tests/vllm_check), in the vLLM venv.
#
#   bash tests/vllm_check/run_vllm_tests.sh [pytest args]     (from anywhere; or make test-vllm)
#
# Sets up .venv-vllm as scripts/eval/vllm_generate.sh does (same lock, TORCH_SPEC and VLLM_VENV), then
# runs `python -m pytest -q tests/vllm_check` there, offline. Exit status: the setup's if it fails, else pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
VLLM_SETUP_ONLY=1 bash scripts/eval/vllm_generate.sh
VENV="${VLLM_VENV:-.venv-vllm}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm_check "$@"
