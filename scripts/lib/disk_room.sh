#!/usr/bin/env bash
# Sourced by the side-venv setups (tests/peer, lmms-eval, vLLM). Each side venv holds its own torch
# (about 2-3 GB in all), and `make test` sets up three of them after the main .venv: on a small disk
# (a CI machine may have a few GB) the others, which are only caches that their scripts set up again
# when next needed, make room for the one being set up. KEEP_SIDE_VENVS=1 keeps them.
#
#   make_room_for_venv VENV NEEDED_MB ROOT     before setting up VENV (ROOT: the repository root)
SIDE_VENVS=(.venv-peer .venv-lmms-eval .venv-vllm .venv-lmms-eval-lock .venv-vllm-lock)

free_mb() {
    df -Pm "$1" | awk 'NR == 2 { print $4 }'
}

make_room_for_venv() {
    local venv="$1" need="$2" root="$3" free other
    mkdir -p "$(dirname "$venv")"
    free="$(free_mb "$(dirname "$venv")")"
    [ "$free" -ge "$need" ] && return 0
    if [ "${KEEP_SIDE_VENVS:-0}" != 1 ]; then
        for other in "${SIDE_VENVS[@]}"; do
            [ -d "$root/$other" ] || continue
            [ -e "$venv" ] && [ "$root/$other" -ef "$venv" ] && continue
            echo "note: $free MB free, $venv needs about $need MB: removing $root/$other (set up again when next needed; KEEP_SIDE_VENVS=1 keeps it)" >&2
            rm -rf "${root:?}/$other"
            free="$(free_mb "$(dirname "$venv")")"
            [ "$free" -ge "$need" ] && return 0
        done
    fi
    echo "warning: $free MB free, setting up $venv needs about $need MB; it may fail for want of disk space" >&2
}
