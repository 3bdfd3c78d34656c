"""The quality grids' --calibration settings (mmprune/run/quality.py, llava/transfer.py,
videollama2/transfer.py, mmprune/evaluate/transfer.py): the option, calibration sets disjoint from their
evaluation splits by construction, English calibration text disjoint from the real-text corpus,
headings and dense per-split accuracy, partials of one setting only, and tiny end-to-end grids."""

import hashlib
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llava import quality as llava_quality
from llava import transfer as llava_transfer
from llava.embedded import paths as llava_paths
from llava.embedded import synthetic_vqa as vqa
from mmprune.run import quality as grid
from mmprune.evaluate import realtext
from mmprune.evaluate import transfer
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError
from videollama2 import quality as av_quality
from videollama2 import transfer as av_transfer
from videollama2.data import load_records as load_av_records
from videollama2.embedded import paths as av_paths
from videollama2.embedded import synthetic_av as av

QUALITY = {"llava": llava_quality, "av": av_quality}


def pixels(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


@pytest.mark.parametrize("model", sorted(QUALITY))
def test_the_option_parses_and_help_names_every_setting(model, capsys):
    module = QUALITY[model]
    assert module.parse_args([]).calibration == "in-task"
    assert module.parse_args(["--calibration", "cross-kind"]).calibration == "cross-kind"
    assert module.parse_args(["--calibration", "generic"]).calibration == "generic"
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--calibration", "other"])
    assert exit_.value.code == 2 and "invalid choice: 'other'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--calibration {in-task,cross-kind,generic}" in text
    for words in module.CALIBRATION_HELP.values():
        assert " ".join(words.split()) in text.replace("- ", "-")


def test_each_setting_has_its_own_outputs():
    names = {c: grid.output_names("weight-pruning", "results", "_tiny", c) for c in grid.CALIBRATIONS}
    assert names["in-task"] == grid.output_names("weight-pruning", "results", "_tiny")  # the old names
    assert names["cross-kind"] == {"section": "weight-pruning-cross-kind-tiny", "json": "results_cross_kind_tiny.json",
                                   "plot": "results_accuracy_cross_kind_tiny.png"}
    assert names["generic"]["json"] == "results_generic_tiny.json"
    assert len({n["section"] for n in names.values()}) == len({n["json"] for n in names.values()}) == 3


# ------------------------------------------------------------------------- LLaVA-NeXT calibration sets


@pytest.fixture(scope="module")
def llava_eval():
    records = json.loads(llava_paths.EVAL_DATA_PATH.read_text())
    hashes = set()
    for record in records:
        with Image.open(llava_paths.EVAL_IMAGE_FOLDER / record["image"]) as image:
            hashes.add(pixels(image))
    return records, hashes


def test_llava_cross_kind_calibrates_on_kinds_it_never_evaluates(llava_eval):
    records, eval_pixels = llava_eval
    samples = llava_transfer.cross_kind_samples(12, 42)
    kinds = [record["kind"] for record, _ in samples]
    assert sorted(kinds) == ["color"] * 6 + ["shape"] * 6
    evaluated = llava_transfer.evaluation_records(records, "cross-kind")
    assert {r["kind"] for r in evaluated} == {"count", "position"}
    assert len(evaluated) == sum(r["kind"] in ("count", "position") for r in records) == 150
    assert not {pixels(image) for _, image in samples} & eval_pixels  # images never held out
    # each answer is right for its drawn scene: the asked-about object is the only one with that shape/colour
    for record, _ in samples:
        question, answer = (turn["value"] for turn in record["conversations"])
        objects = record["objects"]
        if record["kind"] == "color":
            shape = re.search("|".join(vqa.SHAPES), question).group(0)
            assert [o["color"] for o in objects if o["shape"] == shape] == [answer]
        else:
            color = re.search("|".join(vqa.COLORS), question).group(0)
            assert [o["shape"] for o in objects if o["color"] == color] == [answer]
    # the seed decides everything
    again = llava_transfer.cross_kind_samples(12, 42)
    assert [r for r, _ in again] == [r for r, _ in samples]
    assert [pixels(i) for _, i in again] == [pixels(i) for _, i in samples]
    assert [r for r, _ in llava_transfer.cross_kind_samples(12, 43)] != [r for r, _ in samples]


def test_llava_generic_holds_no_question_of_the_task(llava_eval):
    records, eval_pixels = llava_eval
    samples = llava_transfer.generic_samples(16, 42)
    text_only = [record for record, image in samples if image is None]
    described = [(record, image) for record, image in samples if image is not None]
    assert len(text_only) == 16 // transfer.TEXT_SHARE == 4 and len(described) == 12
    assert all("image" not in record for record in text_only)
    questions = {r["conversations"][0]["value"] for r in records}
    for record, image in samples:
        assert record.get("kind") not in vqa.KINDS  # no record is one of the task's questions
        assert record["conversations"][0]["value"] not in questions
    assert not {pixels(image) for _, image in described} & eval_pixels
    # a caption names every object of its scene with its colour and shape, and the scene is the image
    for record, image in described:
        caption = record["conversations"][1]["value"]
        assert record["conversations"][0]["value"].split("\n", 1)[1] in vqa.DESCRIBE_PROMPTS
        for obj in record["objects"]:
            assert re.search(rf"\b[aA] {obj['color']} {obj['shape']} (at|on|in) the ", caption)
    assert llava_transfer.generic_samples(16, 42)[3][0] == samples[3][0]


def test_llava_caption_places_objects_like_the_position_answers():
    scene = vqa.Scene(64, 64, (240, 240, 240), (
        vqa.Obj("circle", "red", (215, 40, 40), 2, 2, 14),  # centre (8.5, 8.5): top left
        vqa.Obj("square", "blue", (40, 80, 215), 44, 25, 14),  # centre (50.5, 31.5): right, vertically in the middle
        vqa.Obj("triangle", "green", (40, 160, 60), 25, 25, 14)))  # centre (31.5, 31.5): the middle
    prompt, caption = vqa.describe_scene(vqa.task_rng("test", 0), scene)
    assert prompt in vqa.DESCRIBE_PROMPTS
    listed = "a red circle at the top left, a blue square on the right and a green triangle in the middle"
    assert caption in (f"The image shows three shapes on a plain light background: {listed}.",
                       f"A{listed[1:]} stand on a plain light background.")


# ------------------------------------------------------------------------- VideoLLaMA2-AV calibration sets


def test_av_cross_kind_calibrates_on_single_streams_and_evaluates_on_both():
    pairs = av_transfer.cross_kind_records(10, 42, "hard")
    assert sorted(r["kind"] for r, _ in pairs) == ["audio"] * 5 + ["video"] * 5
    for record, clip_seed in pairs:
        question = record["conversations"][0]["value"].removeprefix("<video>\n")
        answer = record["conversations"][1]["value"]
        assert (question, answer) in av.draw_spec(clip_seed, "hard").questions(record["kind"])
    records = load_av_records(av_paths.HARD_EVAL_DATA_PATH)
    evaluated = av_transfer.evaluation_records(records, "cross-kind")
    assert {r["kind"] for r in evaluated} == {"both"} and len(evaluated) == len(records) // 3
    # the held-out clips are drawn from clip seeds 100000 + i (eval seed 1): checked on the first clips
    for record in records[:6]:
        index = int(record["video"][len("eval_"):-len(".mp4")])
        question = record["conversations"][0]["value"].removeprefix("<video>\n")
        spec = av.draw_spec(100_000 + index, "hard")
        assert (question, record["conversations"][1]["value"]) in spec.questions(record["kind"])
    held_out = set(range(100_000, 100_000 + len(records) // 3)) | set(range(av.CALIB_CLIPS))
    training = (av_paths.SMOL_PARTS_DIR / "training_info.json").read_text()
    first_training = int(re.search(r'"train_clip_seeds": "(\d+) onwards"', training).group(1))
    seeds = [s for _, s in pairs] + av_transfer.clip_seeds(av_transfer.SEEDS_PER_CALIBRATION_SEED, 0)
    assert not set(seeds) & held_out and min(seeds) > first_training + 10**7
    assert av_transfer.cross_kind_records(10, 42, "hard") == pairs
    assert av_transfer.cross_kind_records(10, 43, "hard") != pairs
    with pytest.raises(UserInputError, match="seeds 0..9999"):
        av_transfer.clip_seeds(4, -1)


@pytest.mark.parametrize("variant", av.VARIANTS)
def test_av_generic_describes_clips_and_mixes_in_text(variant):
    pairs = av_transfer.calibration_records("generic", 12, 42, variant)
    text_only = [record for record, seed in pairs if seed is None]
    assert len(text_only) == 3 and all("video" not in r and "audio" not in r for r in text_only)
    for record, clip_seed in pairs:
        assert "kind" not in record
        if clip_seed is None:
            continue
        spec = av.draw_spec(clip_seed, variant)
        caption = record["conversations"][1]["value"]
        shapes = ", then ".join(f"a {s.color} {s.shape}" for s in spec.shapes)
        assert shapes in caption or shapes.replace("a ", "A ", 1) in caption
        for sound, start, *_ in spec.events():
            assert f" {sound} " in caption
    basic = av.ClipSpec((av.ShapeSpec("ring", "red", 22, (4, 4), (1, 0), (225, 45, 45)),
                         av.ShapeSpec("square", "blue", 22, (4, 4), (0, 1), (55, 95, 240))),
                        "beep", "late", 1.2, 0.5, 1500.0, 0.3, 10, 0)
    _, caption = av.describe_clip(random.Random(0), basic)
    assert caption.endswith("A beep sounds late in the clip.") and "a red ring, then a blue square" in caption.lower()


_ENCODE_CLIPS = """
import hashlib, io, av as pyav
from videollama2 import transfer
from videollama2.embedded import synthetic_av as av
digest, kinds = hashlib.sha256(), set()
for _, clip_seed in transfer.calibration_records("cross-kind", 12, 42, "hard"):
    data = av.encode_mp4(*av.make_clip(clip_seed, "hard")[1:])
    digest.update(data)
    kinds.update(int(frame.pict_type) for frame in pyav.open(io.BytesIO(data)).decode(video=0))
print(digest.hexdigest(), sorted(kinds))
"""


def test_av_transfer_clips_are_the_same_bytes_in_every_process():
    # x264's B-frame decisions differed between processes (about half the clips): one seed's
    # calibration must be the same for every method's worker
    outputs = [subprocess.run([sys.executable, "-c", _ENCODE_CLIPS], capture_output=True, text=True, check=True,
                              cwd=av_paths.REPO_ROOT).stdout
               for _ in range(2)]
    assert outputs[0] == outputs[1]
    assert outputs[0].split(" ", 1)[1].strip() == "[1, 2]"  # I and P frames (AV_PICTURE_TYPE_I, _P), no B


# ------------------------------------------------------------------------- English calibration text


def test_english_calibration_text_never_overlaps_the_realtext_corpus():
    corpus = realtext.corpus()
    realtext_modules = set(realtext.DOCSTRING_MODULES) | {m for m, _ in realtext.ESSAYS}
    assert not realtext_modules & {m.split("/")[0] for m in transfer.ENGLISH_MODULES}  # disjoint sources
    corpus_paragraphs = {hashlib.sha256(p.strip().encode()).hexdigest() for p in corpus.text.split("\n\n")}
    passages = transfer.english_passages()
    assert len(passages) >= 200
    for passage in passages:
        assert hashlib.sha256(passage.text.encode()).hexdigest() not in corpus_paragraphs
        for paragraph in passage.text.split("\n\n"):
            assert hashlib.sha256(paragraph.strip().encode()).hexdigest() not in corpus_paragraphs
            if len(paragraph) >= 40:
                assert paragraph not in corpus.text
        assert transfer.MIN_CHARS <= len(passage.text)
    source = transfer.english_source()
    assert source["sha256"] != corpus.sha256 and source["passages"] == len(passages)
    records = transfer.english_conversations(20, 42)
    assert len({r["source"] for r in records}) == 20  # without replacement
    assert records == transfer.english_conversations(20, 42) != transfer.english_conversations(20, 43)
    assert all(r["conversations"][1]["value"] in {p.text for p in passages} for r in records)
    with pytest.raises(UserInputError, match="--nsamples"):
        transfer.english_conversations(len(passages) + 1, 0)


# ------------------------------------------------------------------------- the section and the partials


class Args:
    sparsities = [0.5]
    patterns = ["2:4"]
    seeds = [42, 43]
    methods = ["wanda", "tamp"]
    nsamples = 8
    ecoflap_samples = None
    max_new_tokens = 4
    realtext_tokens = 0
    calibration = "cross-kind"


def kind_result(accuracy, count, position):
    return {"n": 20, "accuracy": accuracy, "answer_perplexity": 1.5,
            "per_kind": {"count": {"accuracy": count}, "position": {"accuracy": position}}}


def test_heading_names_the_setting_and_the_dense_split_accuracy_is_shown(tmp_path):
    Args.out_dir = str(tmp_path)
    runs = [{"method": m, "setting": s, "seed": seed, "calibration": "cross-kind", "achieved_sparsity": 0.5,
             **kind_result(0.5, 0.4, 0.6 + (seed - 42) / 10)}
            for seed in (42, 43) for m in ("wanda", "tamp") for s in ("0.5", "2:4")]
    section = grid.Section(name="t", json_name="t.json", plot_name="t.png",
                           heading=grid.section_heading("Weight pruning", "cross-kind", "toy"),
                           producer="python -m toy", command_prefix="", calibration="colour questions", defaults="d",
                           results_title="# R", kinds=llava_quality.KINDS, setting="cross-kind",
                           evaluation="count and position questions only",
                           meta={"model_path": "m", "eval_data_path": "e"})
    grid.write_section(Args, {"calibration": "cross-kind", "dense": kind_result(0.9, 0.8, 1.0), "runs": runs,
                              "minutes": 1.0, "commits": {"abc1234": 8}, "cpus": {"CPU A, AVX2 kernels": 8}}, section)
    text = (tmp_path / "results.md").read_text()
    assert "## Weight pruning, cross-kind calibration: toy" in text
    assert ", commit `" in text and (" (runs measured at commit `abc1234` (8 runs); on CPU CPU A, AVX2 kernels "
                                     "(8 runs)), torch ") in text
    titles = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(titles) == 4 and all(t.endswith(" (cross-kind calibration)") for t in titles)
    assert "calibration setting **cross-kind**: colour questions, 8 samples" in text
    assert "20 held-out samples (count and position questions only)" in text
    assert "dense accuracy 90.0% (count 80.0%, position 100.0%)." in text
    count = text.split("### Accuracy (%), count questions (cross-kind calibration)")[1].split("###")[0]
    position = text.split("### Accuracy (%), position questions (cross-kind calibration)")[1].split("###")[0]
    assert "| dense | 80.0 | 80.0 |" in count and "| wanda | 40.0 ± 0.0 | 40.0 ± 0.0 |" in count
    assert "| dense | 100.0 | 100.0 |" in position and "| tamp | 65.0 ± 5.0 | 65.0 ± 5.0 |" in position
    assert "colour questions (cross" not in text  # no kind outside the evaluation split gets a table
    assert "--calibration cross-kind`" in text
    assert json.loads((tmp_path / "t.json").read_text())["meta"]["calibration"] == "cross-kind"


def test_partials_of_another_setting_are_refused(tmp_path):
    def unit(name, calibration, dense=None):
        part = {"dense": dense, "minutes": 1.0,
                "runs": [{"method": "wanda", "seed": 42, "setting": "0.5"}]}
        if calibration is not None:
            part["calibration"] = calibration
        (tmp_path / name).write_text(json.dumps(part))
        return str(tmp_path / name)

    cross = unit("a.json", "cross-kind", dense={"accuracy": 0.9})
    old = unit("b.json", None)  # saved before the option existed: in-task
    with pytest.raises(UserInputError, match=r"b.json was measured with --calibration in-task, this run asks for "
                                             r"--calibration cross-kind"):
        grid.merge_partials(Args, [cross, old])
    assert grid.merge_partials(Args, [cross])["calibration"] == "cross-kind"

    class InTask(Args):
        calibration = "in-task"

    with pytest.raises(UserInputError, match="a.json was measured with --calibration cross-kind"):
        grid.merge_partials(InTask, [old, cross])


# ------------------------------------------------------------------------- tiny end-to-end grids

GRID_FLAGS = ["--methods", "wanda", "--sparsities", "0.5", "--patterns", "2:4", "--seeds", "1", "--nsamples", "4",
              "--eval_samples", "6", "--realtext_tokens", "32", "--jobs", "1"]
EVALUATED = {("llava", "cross-kind"): {"count", "position"}, ("av", "cross-kind"): {"both"},
             ("llava", "generic"): set(vqa.KINDS), ("av", "generic"): set(av.KINDS),
             ("llava", "in-task"): set(vqa.KINDS), ("av", "in-task"): set(av.KINDS)}


@pytest.mark.parametrize("model,calibration", sorted(EVALUATED))
def test_tiny_grid_runs_in_each_setting(model, calibration, tmp_path):
    module = QUALITY[model]
    out = tmp_path / "docs"
    assert run_main(module.main, GRID_FLAGS + ["--calibration", calibration, "--out_dir", str(out)]) == 0
    names = module.output_names(module.parse_args(["--calibration", calibration]))
    saved = json.loads((out / names["json"]).read_text())
    assert saved["calibration"] == saved["meta"]["calibration"] == calibration
    dense = saved["dense"]
    assert set(dense["per_kind"]) <= EVALUATED[(model, calibration)] and dense["n"] == 6
    if calibration == "cross-kind":
        assert set(dense["per_kind"]) == EVALUATED[(model, calibration)]
    assert [(r["method"], r["setting"], r["calibration"]) for r in saved["runs"]] == [
        ("wanda", "0.5", calibration), ("wanda", "2:4", calibration)]
    assert all(abs(r["achieved_sparsity"] - 0.5) < 1e-3 for r in saved["runs"])
    text = (out / "results.md").read_text()
    assert f"<!-- section:{names['section']} -->" in text and f", {calibration} calibration: the tiny" in text
    assert f"dense accuracy {100 * dense['accuracy']:.1f}%" in text


def test_tiny_workers_partials_resume_one_setting(tmp_path):
    """Two units saved by separate worker runs (--partial) merge with --from_partials only under the
    setting they were measured with."""
    threads = torch.get_num_threads()
    base = ["--sparsities", "0.5", "--patterns", "2:4", "--seeds", "1", "--nsamples", "4", "--eval_samples", "4",
            "--realtext_tokens", "0"]
    generic = base + ["--calibration", "generic"]
    parts = [str(tmp_path / "wanda.json"), str(tmp_path / "magnitude.json")]
    try:
        assert run_main(llava_quality.main, generic + ["--methods", "wanda", "--only_seed", "1",
                                                      "--partial", parts[0]]) == 0
        assert run_main(llava_quality.main, generic + ["--methods", "magnitude", "--only_seed", "1", "--skip_dense",
                                                      "--partial", parts[1]]) == 0
    finally:
        torch.set_num_threads(threads)
    assert [json.loads(open(p).read())["calibration"] for p in parts] == ["generic", "generic"]
    out = tmp_path / "docs"
    methods = ["--methods", "wanda", "magnitude", "--from_partials", *parts]
    assert run_main(llava_quality.main, generic + methods + ["--out_dir", str(out)]) == 0
    saved = json.loads((out / "results_generic_tiny.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["wanda", "wanda", "magnitude", "magnitude"]
    assert "weight-pruning-generic-tiny" in (out / "results.md").read_text()
    in_task = base + ["--calibration", "in-task"] + methods + ["--out_dir", str(tmp_path / "x")]
    assert run_main(llava_quality.main, in_task) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model", sorted(QUALITY))
def test_impossible_transfer_draws_stop_before_anything_is_made(model, tmp_path, capsys):
    module = QUALITY[model]
    out = tmp_path / "docs"
    assert run_main(module.main, ["--calibration", "generic", "--nsamples", "2000", "--out_dir", str(out)]) == 2
    most = transfer.TEXT_SHARE * (len(transfer.english_passages()) + 1) - 1  # 887 on Python 3.11.7
    assert transfer.generic_counts(most)[1] == len(transfer.english_passages()) < transfer.generic_counts(most + 1)[1]
    assert f"use --nsamples {most} or fewer with --calibration generic" in capsys.readouterr().err
    assert run_main(module.main, ["--calibration", "cross-kind", "--nsamples", "0", "--out_dir", str(out)]) == 2
    assert "error: --nsamples must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()
    transfer_module = llava_transfer if model == "llava" else av_transfer
    with pytest.raises(UserInputError, match="--calibration cross-kind evaluates on the"):
        transfer_module.evaluation_records([{"kind": "color"}, {"kind": "video"}, {}], "cross-kind")


def test_partials_of_single_settings_merge_into_one_table(tmp_path):
    """A worker may measure one setting (empty --patterns or --sparsities), so a long grid resumes
    in small units; the merged table holds every setting, and a grid of no setting is refused."""
    threads = torch.get_num_threads()
    base = ["--seeds", "1", "--nsamples", "4", "--eval_samples", "4", "--realtext_tokens", "0",
            "--calibration", "generic", "--methods", "wanda"]
    parts = [str(tmp_path / "u.json"), str(tmp_path / "nm.json")]
    try:
        assert run_main(llava_quality.main, base + ["--sparsities", "0.5", "--patterns", "--only_seed", "1",
                                                   "--partial", parts[0]]) == 0
        assert run_main(llava_quality.main, base + ["--sparsities", "--patterns", "2:4", "--only_seed", "1",
                                                   "--skip_dense", "--partial", parts[1]]) == 0
    finally:
        torch.set_num_threads(threads)
    assert [[r["setting"] for r in json.loads(open(p).read())["runs"]] for p in parts] == [["0.5"], ["2:4"]]
    out = tmp_path / "docs"
    merged = base + ["--sparsities", "0.5", "--patterns", "2:4", "--from_partials", *parts, "--out_dir", str(out)]
    assert run_main(llava_quality.main, merged) == 0
    saved = json.loads((out / "results_generic_tiny.json").read_text())
    assert sorted(r["setting"] for r in saved["runs"]) == ["0.5", "2:4"]
    none = base + ["--sparsities", "--patterns", "--out_dir", str(tmp_path / "none")]
    assert run_main(llava_quality.main, none) == 2
    assert not (tmp_path / "none").exists()


def test_a_section_measured_in_part_says_so(tmp_path):
    """Merged partials that cover only some of the grid's runs give a section marked partial, with
    the count and the seeds measured; the full grid has no such line."""
    from mmprune.run.quality import partial_note

    args = llava_quality.parse_args(["--methods", "wanda", "magnitude", "--sparsities", "0.5", "--patterns", "2:4",
                                     "--seeds", "1", "2"])
    runs = [{"seed": 1, "method": "wanda", "setting": "0.5"}, {"seed": 1, "method": "magnitude", "setting": "0.5"}]
    (line,) = [text for text in partial_note(args, runs, 2) if text]
    assert line.startswith("**Partial**: 2 of the grid's 6 runs") and "seeds so far: 1)" in line
    full = runs + [{"seed": s, "method": m, "setting": x} for s, m, x in
                   [(1, "wanda", "2:4"), (1, "magnitude", "2:4"), (2, "wanda", "0.5"), (2, "wanda", "2:4")]]
    assert partial_note(args, full, 2) == []


# ------------------------------------------------------------------------- kept readings, unit records, resuming


def test_a_regenerated_section_keeps_its_hand_written_reading(tmp_path):
    from mmprune.run.report import READING_BEGIN, READING_END, update_markdown_section

    path = str(tmp_path / "results.md")
    update_markdown_section(path, "s", f"table 1\n\n{READING_BEGIN}\n{READING_END}\n\nplot")
    text = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").write_text(text.replace(f"{READING_BEGIN}\n{READING_END}",
                                                      f"{READING_BEGIN}\nReading: pick A.\n\nAt 0.7, B.\n{READING_END}"))
    update_markdown_section(path, "s", f"table 2\n\n{READING_BEGIN}\n{READING_END}\n\nplot")
    text = (tmp_path / "results.md").read_text()
    assert "table 2" in text and "table 1" not in text
    assert f"table 2\n\n{READING_BEGIN}\nReading: pick A.\n\nAt 0.7, B.\n{READING_END}\n\nplot" in text
    update_markdown_section(path, "s", "table 3")  # a body without the block: the reading goes after it
    text = (tmp_path / "results.md").read_text()
    assert text.count("Reading: pick A.") == 1 and text.index("table 3") < text.index("Reading: pick A.")
    update_markdown_section(path, "other", "x")  # another section neither takes nor drops it
    assert (tmp_path / "results.md").read_text().count("Reading: pick A.") == 1


def test_units_record_flags_and_commit_and_the_table_names_the_commits(tmp_path):
    from mmprune.run import grid_units

    def unit(name, commit, flags, dense=None, runs=1, cpu="CPU A, AVX2 kernels"):
        part = {"calibration": "cross-kind", "dense": dense, "minutes": 1.0, "commit": commit, "flags": flags,
                "runs": [{"method": "wanda", "seed": 42, "setting": "0.5"}] * runs}
        if cpu:
            part["cpu"] = cpu
        (tmp_path / name).write_text(json.dumps(part))
        return str(tmp_path / name)

    same = grid_units.measure_flags(Args)
    assert same == {"nsamples": 8, "ecoflap_samples": None, "max_new_tokens": 4, "realtext_tokens": 0}
    # c.json's eval_samples is a flag Args does not have: not compared
    files = [unit("a.json", "abc1234", same, dense={"accuracy": 0.9}, runs=2), unit("b.json", None, {}, cpu=None),
             unit("c.json", "def5678", {**same, "eval_samples": 50}, cpu="CPU B, AVX512 kernels")]
    merged = grid.merge_partials(Args, files)
    assert merged["commits"] == {"abc1234": 2, "unrecorded": 1, "def5678": 1}
    assert merged["cpus"] == {"CPU A, AVX2 kernels": 2, "unrecorded": 1, "CPU B, AVX512 kernels": 1}
    assert grid_units.cpus_text(merged["cpus"]) == ("on CPUs CPU A, AVX2 kernels (2 runs); CPU B, AVX512 kernels "
                                                    "(1 run); 1 run saved before units recorded their CPU")
    assert grid_units.cpus_text({"unrecorded": 4}) == ""
    assert grid_units.cpu_name().endswith(" kernels")
    assert grid_units.commits_text(merged["commits"]) == ("runs measured at commits `abc1234` (2 runs), `def5678` "
                                                          "(1 run); 1 run saved before units recorded their commit")
    assert grid_units.commits_text({"abc1234": 3}) == "runs measured at commit `abc1234` (3 runs)"
    assert grid_units.commits_text({}) == ""
    other = unit("d.json", "abc1234", {**same, "nsamples": 16})
    with pytest.raises(UserInputError, match=r"d.json was measured with --nsamples 16, this run has --nsamples 8; "):
        grid.merge_partials(Args, files + [other])


def test_tiny_grid_resumes_from_its_units_dir(tmp_path, capsys):
    """--units_dir keeps each (seed, method) unit; a rerun measures only the missing ones, and a unit
    measured with other flags is refused with one error line before anything is written."""
    units, out = tmp_path / "units", tmp_path / "docs"
    flags = ["--methods", "wanda", "magnitude", "--sparsities", "0.5", "--patterns", "--seeds", "1", "--nsamples",
             "4", "--eval_samples", "4", "--realtext_tokens", "0", "--jobs", "1", "--calibration", "generic",
             "--units_dir", str(units), "--out_dir", str(out)]
    assert run_main(llava_quality.main, flags) == 0
    grid_name = "llava.quality-llava-next-tiny-generic-seed1"
    names = {"wanda": f"{grid_name}-wanda-0.5.json", "magnitude": f"{grid_name}-magnitude-0.5.json"}
    assert sorted(p.name for p in units.iterdir()) == sorted(names.values())
    first = json.loads((out / "results_generic_tiny.json").read_text())
    kept = (units / names["magnitude"]).read_bytes()
    saved = json.loads(kept)
    assert saved["flags"]["nsamples"] == 4 and saved["flags"]["model"] == "llava-next-tiny" and "commit" in saved
    (units / names["wanda"]).unlink()
    capsys.readouterr()
    assert run_main(llava_quality.main, flags) == 0
    assert "1 of 2 units already in" in capsys.readouterr().err
    assert (units / names["magnitude"]).read_bytes() == kept  # reused, not measured again
    again = json.loads((out / "results_generic_tiny.json").read_text())
    assert [(r["method"], r["accuracy"]) for r in again["runs"]] == [(r["method"], r["accuracy"]) for r in first["runs"]]
    assert again["dense"] == first["dense"]
    report = (out / "results.md").read_text()
    changed = [x if x != "4" or flags[i - 1] != "--nsamples" else "5" for i, x in enumerate(flags)]
    assert run_main(llava_quality.main, changed) == 2
    assert "was measured with --nsamples 4, this run has --nsamples 5" in capsys.readouterr().err
    assert (out / "results.md").read_text() == report
