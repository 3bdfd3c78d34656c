"""Outputs never destroy an input or a user's file, leave nothing behind when a run is stopped,
take relative paths from the caller's directory, and are readable by others (issue 12, point 3).

Most checks call the entry points in-process: they stop before any model is loaded. Three run a
subprocess: a signal sent to a real pruning run while it saves, the same for the core writers
(all three signals), and a script run from another directory with relative paths."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava.embedded import paths as embedded
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError
from mmprune.base import output
from script_runs import ROOT, copy_embedded_llava_data

NOTES = "my notes, not a model"


def notes_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text(NOTES)
    return path


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def expected_file_mode() -> int:
    return 0o666 & ~umask()


def no_leftovers(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def llava_pruners(argv):
    from llava.pruners.__main__ import main

    return run_main(main, argv)


def videollama2_pruners(argv):
    from videollama2.pruners.__main__ import main

    return run_main(main, argv)


def eas_train(argv):
    from llava.eas.train import main

    return run_main(main, argv)


def fitprune(argv):
    from llava.fitprune import main

    return run_main(main, argv)


# ---------------------------------------------------------------------------------------------
# 1. an output that is, lies inside or holds an input


@pytest.fixture
def llava_data(tmp_path):
    """A few embedded calibration records with their images and task split, in a folder of their own."""
    copy_embedded_llava_data(tmp_path / "data", 4)
    return tmp_path / "data"


def test_fitprune_output_inside_the_input_checkpoint_or_onto_the_task_split_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(embedded.CHECKPOINT_DIR, model)
    before = sorted(p.name for p in model.iterdir())
    assert fitprune(["--model_path", str(model), "--output", str(model / "recipe.json")]) == 2
    assert "overlaps the input" in last_error(capsys)
    assert sorted(p.name for p in model.iterdir()) == before
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"sharegpt4v": [0, 64]}))
    assert fitprune(["--task_split_path", str(split), "--output", str(split), "--overwrite"]) == 2
    assert "overlaps the input" in last_error(capsys)
    assert json.loads(split.read_text()) == {"sharegpt4v": [0, 64]}


def test_split_and_transform_never_write_onto_their_input(tmp_path, capsys):
    from llava.pruners import split_finetune_llava_next as split
    from videollama2 import avinstruct

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": 0, "image": "t/a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    kept = data.read_text()
    assert split.main(["--data_path", str(data), "--save_path", str(data)]) == 2
    assert "overlaps the input" in last_error(capsys) and data.read_text() == kept

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "v1.mp4").write_bytes(b"x")
    part = tmp_path / "part1.json"
    part.write_text(json.dumps([{"video_id": "v1", "conversations": [{"from": "human", "value": "<Q>q"},
                                                                     {"from": "gpt", "value": "a"}]}]))
    kept = part.read_text()
    argv = ["--video_dir", str(videos), "--dataset_path1", str(part), "--dataset_path2", str(part),
            "--save_path", str(part)]
    assert run_main(avinstruct.main, argv) == 2
    assert "overlaps the input" in last_error(capsys) and part.read_text() == kept


def test_prune_output_holding_the_task_split_or_eval_data_is_refused(tmp_path, llava_data, capsys):
    # the output folder is the one holding the task split and the data: --overwrite must not delete it
    argv = ["--data_path", str(llava_data / "data.json"), "--save_model", str(llava_data), "--overwrite", "--no_eval"]
    assert llava_pruners(argv) == 2
    assert "overlaps the input" in last_error(capsys)
    split_elsewhere = tmp_path / "splits"
    split_elsewhere.mkdir()
    shutil.move(llava_data / "task_split.json", split_elsewhere / "task_split.json")
    argv = ["--data_path", str(llava_data / "data.json"), "--task_split_path", str(split_elsewhere / "task_split.json"),
            "--save_model", str(split_elsewhere), "--overwrite", "--no_eval", "--nsamples", "4"]
    assert llava_pruners(argv) == 2
    assert "overlaps the input" in last_error(capsys)
    assert (split_elsewhere / "task_split.json").is_file()
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "eval.json").write_text("[]")
    assert eas_train(["--output_dir", str(eval_dir), "--overwrite", "--eval", "--eval_data_path",
                      str(eval_dir / "eval.json")]) == 2
    assert "overlaps the input" in last_error(capsys) and (eval_dir / "eval.json").is_file()


# ---------------------------------------------------------------------------------------------
# 2. --overwrite replaces only what this project wrote


@pytest.mark.parametrize("entry", ["llava", "videollama2", "eas"])
def test_overwrite_refuses_a_folder_or_file_this_project_did_not_write(tmp_path, capsys, entry):
    run, flag = {"llava": (llava_pruners, "--save_model"), "videollama2": (videollama2_pruners, "--save_model"),
                 "eas": (eas_train, "--output_dir")}[entry]
    notes = notes_folder(tmp_path / "notes")
    assert run([flag, str(notes), "--overwrite", "--no_eval"]) == 2
    line = last_error(capsys)
    assert "not written by this project" in line and str(notes) in line
    assert (notes / "notes.txt").read_text() == NOTES and len(list(notes.iterdir())) == 1
    plain = tmp_path / "plain.txt"
    plain.write_text(NOTES)
    assert run([flag, str(plain), "--overwrite", "--no_eval"]) == 2
    assert "not a folder" in last_error(capsys) and plain.read_text() == NOTES


@pytest.mark.parametrize("module,short", [
    ("llava.embedded.train", ["--pool", "2", "--vision-steps", "0", "--val-samples", "2"]),
    ("videollama2.embedded.train", ["--pool", "2", "--encoder-steps", "0", "--val-clips", "1"]),
])
def test_embedded_trainers_refuse_a_foreign_out_before_training(tmp_path, capsys, module, short):
    import importlib

    notes = notes_folder(tmp_path / "notes")
    began = time.monotonic()
    # `short`: a run that would reach the save quickly, were the folder not refused at once
    argv = ["--out", str(notes), "--minutes", "0.05", "--steps", "1", "--eval-every", "1000", *short]
    assert importlib.import_module(module).main(argv) == 2
    assert time.monotonic() - began < 30  # before the pool and the training
    assert "not written by this project" in last_error(capsys)
    assert (notes / "notes.txt").read_text() == NOTES


def test_fitprune_overwrite_replaces_only_a_recipe(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"my": "settings"}))
    assert fitprune(["--output", str(other), "--overwrite"]) == 2
    assert "not a token recipe written by this project" in last_error(capsys)
    assert json.loads(other.read_text()) == {"my": "settings"}


def test_split_and_transform_replace_only_their_own_kind_of_file(tmp_path, capsys):
    from llava.pruners import split_finetune_llava_next as split
    from videollama2 import avinstruct

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": 0, "image": "t/a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"todo": "calibrate"}))
    assert split.main(["--data_path", str(data), "--save_path", str(notes)]) == 2
    assert "not a task split" in last_error(capsys) and json.loads(notes.read_text()) == {"todo": "calibrate"}
    previous = tmp_path / "task_split.json"
    previous.write_text(json.dumps({"t": [0, 5]}))
    assert split.main(["--data_path", str(data)]) == 0  # an earlier split is replaced
    assert json.loads(previous.read_text()) == {"t": [0, 1]} and mode(previous) == expected_file_mode()

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "v1.mp4").write_bytes(b"x")
    part = tmp_path / "part1.json"
    part.write_text(json.dumps([{"video_id": "v1", "conversations": [{"from": "human", "value": "<Q>q"},
                                                                     {"from": "gpt", "value": "a"}]}]))
    argv = ["--video_dir", str(videos), "--dataset_path1", str(part), "--dataset_path2", str(part), "--save_path"]
    assert run_main(avinstruct.main, argv + [str(notes)]) == 2
    assert "not a transformed AVInstruct JSON" in last_error(capsys)
    assert json.loads(notes.read_text()) == {"todo": "calibrate"}
    out = tmp_path / "records.json"
    assert run_main(avinstruct.main, argv + [str(out)]) == 0
    assert run_main(avinstruct.main, argv + [str(out)]) == 0  # its own output is replaced
    assert len(json.loads(out.read_text())) == 2 and mode(out) == expected_file_mode()
    assert not no_leftovers(tmp_path)


def test_core_overwrite_replaces_marked_and_older_outputs_only(tmp_path):
    out = tmp_path / "out"
    with output.atomic_output_dir(str(out), overwrite=False) as staging:
        Path(staging, "a.txt").write_text("1")
    assert (out / output.MARKER).is_file()
    output.check_output_dir(str(out), True, [])
    with output.atomic_output_dir(str(out), overwrite=True) as staging:
        Path(staging, "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == sorted([output.MARKER, "b.txt"])
    older = tmp_path / "older"  # an output of a version before the marker: its report is the sign
    older.mkdir()
    (older / "pruning_report.json").write_text("{}")
    output.check_output_dir(str(older), True, [])
    notes = notes_folder(tmp_path / "notes")
    with pytest.raises(UserInputError, match="not written by this project"):
        output.check_output_dir(str(notes), True, [])
    with pytest.raises(UserInputError, match="not written by this project"):
        with output.atomic_output_dir(str(notes), overwrite=True) as staging:  # appeared while running
            Path(staging, "x").write_text("x")
    assert (notes / "notes.txt").read_text() == NOTES and not no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. signals during the save, and FitPrune's leftover


CORE_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mmprune.base.entry import run_main
    from mmprune.base.output import atomic_output_dir, atomic_output_file

    def main(argv):
        kind, target = argv
        if kind == "dir":
            with atomic_output_dir(target, overwrite=False) as staging:
                Path(staging, "model.safetensors").write_bytes(b"0" * 1_000_000)
                while True:
                    time.sleep(0.05)
        with atomic_output_file(target) as tmp:
            Path(tmp).write_text("partial")
            while True:
                time.sleep(0.05)

    sys.exit(run_main(main, sys.argv[1:]))
""")


def wait_for(predicate, proc, seconds=300.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def assert_interrupted(proc, signum):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == f"error: interrupted by {signal.Signals(signum).name}; unfinished outputs were removed", last


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_signal_inside_the_core_writers_leaves_nothing(tmp_path, signum, kind):
    target = tmp_path / ("out" if kind == "dir" else "out.json")
    proc = subprocess.Popen([sys.executable, "-c", CORE_WRITER, kind, str(target)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any((p / "model.safetensors").is_file() if kind == "dir" else p.read_text() == "partial"
                         for p in tmp_path.glob(f".{target.name}.tmp-*")), proc)
    proc.send_signal(signum)
    assert_interrupted(proc, signum)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_while_a_pruning_run_saves_removes_the_staging_folder(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "llava.pruners", "--method", "magnitude", "--nsamples", "1",
                             "--no_eval", "--save_model", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a real moment of the save: save_pretrained has begun writing the weights
    wait_for(lambda: any(p.glob("*.safetensors") for p in tmp_path.glob(".out.tmp-*")), proc)
    proc.send_signal(signal.SIGTERM)
    assert_interrupted(proc, signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []


def test_fitprune_output_that_is_a_folder_fails_up_front(tmp_path, capsys):
    folder = notes_folder(tmp_path / "recipes")
    assert fitprune(["--output", str(folder), "--overwrite"]) == 2
    assert "is a folder" in last_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# 4 and 5. relative paths are the caller's; an output under a regular file fails up front


def run_from(cwd, script, *args, env=None):
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(ROOT / script), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("script,variable", [
    ("scripts/prune/tamp.sh", "OUTPUT_DIR"), ("scripts_videollama2/prune/tamp.sh", "OUTPUT_DIR"),
    ("scripts/fitprune/search.sh", "OUTPUT"), ("scripts/eas/train.sh", "OUTPUT_DIR"),
])
def test_relative_output_under_a_file_of_the_callers_folder_fails_up_front(tmp_path, script, variable):
    (tmp_path / "blocker").write_text(NOTES)
    # MODEL_PATH is relative and missing too: read from the repository root, the run would stop on it instead
    proc = run_from(tmp_path, script, env={variable: "blocker/out", "MODEL_PATH": "no_such_model"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{tmp_path / 'blocker'} is a file" in last, last
    assert (tmp_path / "blocker").read_text() == NOTES


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")


@needs_proc
@pytest.mark.parametrize("script,variable", [
    ("scripts/prune/tamp.sh", "OUTPUT_DIR"), ("scripts_videollama2/prune/tamp.sh", "OUTPUT_DIR"),
    ("scripts/prune/tamp.sh", "OFFLOAD_FOLDER"),
])
def test_output_under_proc_is_one_error_line(tmp_path, script, variable):
    # /proc passes the permission check for root but takes no new entries
    env = {variable: "/proc/mmprune-out/run"}
    if variable == "OFFLOAD_FOLDER":
        env.update(OUTPUT_DIR=str(tmp_path / "out"), MAX_MEMORY="cpu:1GiB", NSAMPLES="4")
    else:
        env["MODEL_PATH"] = "no_such_model"  # checked after the output: never reached
    proc = run_from(tmp_path, script, "0.5", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: output /proc/mmprune-out/run cannot be created: ") and "choose another" in last, last
    assert not os.path.lexists("/proc/mmprune-out") and list(tmp_path.iterdir()) == []


@needs_proc
@pytest.mark.parametrize("entry,flag", [(llava_pruners, "--save_model"), (videollama2_pruners, "--save_model"),
                                        (eas_train, "--output_dir"), (fitprune, "--output")])
def test_entry_points_refuse_an_output_where_nothing_can_be_created(tmp_path, capsys, entry, flag):
    target = "/proc/mmprune-out" if flag != "--output" else "/sys/mmprune-recipe.json"
    assert entry([flag, target, "--no_eval"] if entry is not fitprune else [flag, target]) == 2
    line = last_error(capsys)
    assert line.startswith(f"error: output {target} cannot be created: ") and "choose another" in line, line
    assert not os.path.lexists(target)


def test_the_creation_probe_leaves_nothing_behind(tmp_path):
    output.check_output_location(str(tmp_path / "a" / "b"), [], "--save_model")
    output.check_output_dir(str(tmp_path / "out"), False, [])
    assert list(tmp_path.iterdir()) == []


def test_relative_sparsity_dict_flag_is_the_callers(tmp_path):
    (tmp_path / "blocker").write_text(NOTES)
    proc = run_from(tmp_path, "scripts/prune/wanda.sh", "0.5", "--sparsity_dict", "plan.yaml", "--save_model",
                    "blocker/out", env={"MODEL_PATH": "no_such_model"})
    assert proc.returncode == 2 and f"{tmp_path / 'blocker'} is a file" in proc.stderr.strip().splitlines()[-1]


def test_paths_helper_makes_flags_and_variables_absolute(tmp_path):
    code = ('source "$1"; OUTPUT_DIR=rel/out; PYTHON=python3; DATA_PATH=/abs/d.json; '
            'absolutize_env OUTPUT_DIR PYTHON DATA_PATH; absolutize_args 0.5 --save_model a --no_eval '
            '--data_path=b.json --eval_samples 3 --out /abs/c; printf "%s\\n" "$OUTPUT_DIR" "$PYTHON" "$DATA_PATH" '
            '"${ABS_ARGS[@]}"')
    done = subprocess.run(["bash", "-c", code, "bash", str(ROOT / "scripts" / "lib" / "paths.sh")], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [
        f"{tmp_path}/rel/out", "python3", "/abs/d.json", "0.5", "--save_model", f"{tmp_path}/a", "--no_eval",
        f"--data_path={tmp_path}/b.json", "--eval_samples", "3", "--out", "/abs/c"]


@pytest.mark.slow
def test_script_run_from_another_folder_reads_and_writes_the_callers_relative_paths(tmp_path, llava_data):
    """DATA_PATH, TASK_SPLIT and OUTPUT_DIR relative to the caller; every output file 0644 (umask 022)."""
    caller = llava_data.parent
    proc = run_from(caller, "scripts/prune/wanda.sh", "0.5", "--no_eval",
                    env={"DATA_PATH": "data/data.json", "TASK_SPLIT": "data/task_split.json",
                         "OUTPUT_DIR": "runs/wanda", "NSAMPLES": "4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = caller / "runs" / "wanda"
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["calibration"]["data_path"] == str(llava_data / "data.json")
    assert report["calibration"]["nsamples_captured"] == 4
    assert (out / output.MARKER).is_file()
    modes = {p.name: mode(p) for p in out.iterdir()}
    assert set(modes.values()) == {expected_file_mode()}, modes
    assert mode(out) == 0o777 & ~umask()
    assert not no_leftovers(caller / "runs")


# ---------------------------------------------------------------------------------------------
# 6. file modes


def test_core_writers_give_every_file_the_umask_mode(tmp_path):
    out = tmp_path / "out"
    with output.atomic_output_dir(str(out), overwrite=False) as staging:
        save_file({"w": torch.zeros(2)}, os.path.join(staging, "model.safetensors"))  # safetensors writes 0600
        os.makedirs(os.path.join(staging, "sub"))
        Path(staging, "sub", "x.json").write_text("{}")
    assert {mode(p) for p in out.rglob("*") if p.is_file()} == {expected_file_mode()}
    assert mode(out) == mode(out / "sub") == 0o777 & ~umask()
    with output.atomic_output_file(str(tmp_path / "r.json")) as tmp:
        Path(tmp).write_text("{}")
    assert mode(tmp_path / "r.json") == expected_file_mode()


def test_result_generators_check_their_outputs_before_measuring(tmp_path, capsys):
    from llava import fitprune_results, quality
    from llava.eas import results as eas_results

    assert run_main(quality.main, ["--out_dir", str(embedded.IMAGE_FOLDER)]) == 2
    assert "overlaps the input" in last_error(capsys)
    from videollama2 import quality as av_quality
    from videollama2.embedded import paths as av_embedded

    assert run_main(av_quality.main, ["--out_dir", str(av_embedded.MEDIA_FOLDER)]) == 2
    assert "overlaps the input" in last_error(capsys)
    assert run_main(fitprune_results.main, ["--json", str(embedded.DATA_PATH)]) == 2
    assert "overlaps the input" in last_error(capsys)
    notes_folder(tmp_path / "work" / "dense")
    assert run_main(eas_results.main, ["--work_dir", str(tmp_path / "work")]) == 2
    assert "not written by this project" in last_error(capsys)
    assert (tmp_path / "work" / "dense" / "notes.txt").read_text() == NOTES


def test_sigterm_to_the_quality_sweep_stops_its_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "llava.quality", "--methods", "magnitude", "wanda", "--sparsities", "0.5",
                             "--patterns", "2:4", "--seeds", "1", "2", "--jobs", "2", "--out_dir", str(tmp_path / "docs")],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def workers():
        done = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in done.stdout.split()]

    wait_for(lambda: len(workers()) == 2, proc)
    children = workers()
    proc.send_signal(signal.SIGTERM)
    assert_interrupted(proc, signal.SIGTERM)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert not (tmp_path / "docs").exists()
