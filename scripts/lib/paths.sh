#!/usr/bin/env bash
# Sourced by every script of scripts/ and scripts_videollama2/. The scripts move to the repository
# root (the default paths are relative to it), so a relative path the caller gives would be read
# from there. Call these first, while still in the caller's directory:
#   absolutize_env VAR...   each set variable holding a relative path becomes absolute
#                           (PYTHON only when it names a file, e.g. .venv/bin/python, not `python3`;
#                           DEVICE_MAP only when it is a file, not auto/balanced/sequential)
#   absolutize_args ARG...  sets ABS_ARGS: ARG... with the value of every path flag made absolute
#                           (`--flag value` and `--flag=value`)
#   enter_repo ARG...       absolutize_env PYTHON, absolutize_args ARG..., then cd to the repository
#                           root and set PY: $PYTHON, else .venv/bin/python, else python3

PATH_FLAGS=" --model_path --data_path --image_folder --task_split_path --save_model --sparsity_dict"
PATH_FLAGS+=" --eval_data_path --eval_image_folder --data_folder --eval_data_folder --output --output_dir"
PATH_FLAGS+=" --out --save --token_recipe --tamp_model --offload_folder "
# a device map is a mode name or a JSON file: only the file is a path
DEVICE_MAP_MODES=" auto balanced sequential "

map_path() {
  case "$DEVICE_MAP_MODES" in *" $1 "*) printf '%s' "$1" ;; *) abs_path "$1" ;; esac
}

abs_path() {
  case "$1" in
    ''|/*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

absolutize_env() {
  local name value
  for name in "$@"; do
    value="${!name:-}"
    [ -n "$value" ] || continue
    if [ "$name" = PYTHON ] && [ "${value#*/}" = "$value" ]; then continue; fi  # a command name
    if [ "$name" = DEVICE_MAP ]; then export "$name=$(map_path "$value")"; continue; fi
    export "$name=$(abs_path "$value")"
  done
}

absolutize_args() {
  ABS_ARGS=()
  local arg flag
  while [ $# -gt 0 ]; do
    arg="$1"; shift
    case "$arg" in
      --device_map=*)
        ABS_ARGS+=("--device_map=$(map_path "${arg#*=}")") ;;
      --device_map)
        ABS_ARGS+=("$arg")
        if [ $# -gt 0 ]; then ABS_ARGS+=("$(map_path "$1")"); shift; fi ;;
      --*=*)
        flag="${arg%%=*}"
        case "$PATH_FLAGS" in *" $flag "*) arg="$flag=$(abs_path "${arg#*=}")" ;; esac
        ABS_ARGS+=("$arg") ;;
      --*)
        ABS_ARGS+=("$arg")
        case "$PATH_FLAGS" in
          *" $arg "*) if [ $# -gt 0 ]; then ABS_ARGS+=("$(abs_path "$1")"); shift; fi ;;
        esac ;;
      *) ABS_ARGS+=("$arg") ;;
    esac
  done
}

REPO_ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

enter_repo() {
  absolutize_env PYTHON
  absolutize_args "$@"
  cd "$REPO_ROOT_DIR"
  PY="${PYTHON:-}"
  if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
  fi
}
