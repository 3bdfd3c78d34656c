"""scripts/lib/disk_room.sh: on a small disk the other side venvs make room for the one being set up;
the main .venv, the venv being set up and (with KEEP_SIDE_VENVS=1) every venv are kept."""

import os
import subprocess
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "scripts" / "lib" / "disk_room.sh"


def make_room(root: Path, venv: str, need_mb: int, keep: bool = False) -> subprocess.CompletedProcess:
    # a disk of 4,000 MB on which each venv folder under root takes 1,000 MB
    script = f"""
set -euo pipefail
source {LIB}
free_mb() {{ echo $(( 4000 - 1000 * $(find {root} -mindepth 1 -maxdepth 1 -name '.venv*' | wc -l) )); }}
make_room_for_venv {root}/{venv} {need_mb} {root}
"""
    env = dict(os.environ, KEEP_SIDE_VENVS="1" if keep else "0")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True)


def folders(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_removes_side_venvs_only_until_there_is_room(tmp_path):
    for name in (".venv", ".venv-peer", ".venv-lmms-eval"):
        (tmp_path / name).mkdir()
    # 1,000 MB free, 2,000 needed: one side venv goes (the first in the list), the rest stays
    result = make_room(tmp_path, ".venv-vllm", 2000)
    assert folders(tmp_path) == {".venv", ".venv-lmms-eval"}
    assert result.stderr.count("removing") == 1 and ".venv-peer" in result.stderr


def test_enough_room_removes_nothing(tmp_path):
    for name in (".venv", ".venv-peer"):
        (tmp_path / name).mkdir()
    result = make_room(tmp_path, ".venv-vllm", 2000)
    assert folders(tmp_path) == {".venv", ".venv-peer"} and result.stderr == ""


def test_never_removes_the_venv_being_set_up_or_the_main_venv(tmp_path):
    for name in (".venv", ".venv-peer", ".venv-vllm"):
        (tmp_path / name).mkdir()
    # 1,000 MB free, 3,500 needed: .venv-vllm (being set up) and .venv stay, and a warning says so
    result = make_room(tmp_path, ".venv-peer", 3500)
    assert folders(tmp_path) == {".venv", ".venv-peer"}
    assert "warning: 2000 MB free" in result.stderr


def test_keep_side_venvs(tmp_path):
    for name in (".venv", ".venv-peer", ".venv-lmms-eval"):
        (tmp_path / name).mkdir()
    result = make_room(tmp_path, ".venv-vllm", 2000, keep=True)
    assert folders(tmp_path) == {".venv", ".venv-peer", ".venv-lmms-eval"}
    assert "removing" not in result.stderr and "warning: 1000 MB free" in result.stderr
