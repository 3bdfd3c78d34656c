"""The shared quality grid's writing (mmprune/run/quality.py) on hand-made results, and the embedded
VideoLLaMA2-AV default's choice of model and task."""

import json

import pytest

from mmprune.run import quality as grid
from mmprune.run.report import block_term_means, modality_summary
from videollama2.embedded import paths as av_paths


def test_block_term_means_average_each_blocks_linears():
    terms = {"model.layers.0.self_attn.q_proj": {"text-text": 1.0, "text-video": 4.0},
             "model.layers.0.mlp.up_proj": {"text-text": 3.0},
             "model.layers.12.mlp.down_proj": {"text-text": 0.5, "text-video": 0.25},
             "model.layers.3": {"video-video": 2.0}}  # a block-granularity group
    assert block_term_means(terms) == {"0": {"text-text": 2.0, "text-video": 4.0}, "3": {"video-video": 2.0},
                                       "12": {"text-text": 0.5, "text-video": 0.25}}
    lines = modality_summary({"calibration": {}, "das": {"group_terms": terms}}).splitlines()
    assert lines[0].endswith("3 terms") and [int(line.split()[0]) for line in lines[2:]] == [0, 3, 12]


class Args:
    sparsities = [0.5, 0.7]
    patterns = ["2:4"]
    seeds = [42, 43]
    methods = ["magnitude", "wanda", "tamp", "sparsegpt"]
    nsamples = 8
    ecoflap_samples = None
    max_new_tokens = 4
    realtext_tokens = 128


def result(accuracy, video, both, ppl=None):
    return {"n": 30, "accuracy": accuracy, "answer_perplexity": 1.5,
            "per_kind": {"video": {"accuracy": video}, "both": {"accuracy": both}},
            "realtext": {"perplexity": ppl, "tokens": 128, "sha256": "ab" * 32, "window": 512}}


def grid_results():
    runs = []
    for seed, bump in ((42, 0.0), (43, 0.1)):
        for method in ("magnitude", "wanda", "tamp"):
            if method == "magnitude" and seed == 43:
                continue
            for setting in ("0.5", "0.7", "2:4"):
                run = {"method": method, "setting": setting, "seed": seed, "achieved_sparsity": 0.5,
                       **result(0.5 + bump, 0.4 + bump, 0.2, 100.0 if method == "magnitude" else 50.0)}
                if method == "tamp":
                    run["das_block_terms"] = {str(b): {"text-video": b + seed / 100, "video-audio": 1.0}
                                              for b in range(8)}
                runs.append(run)
    return {"dense": result(0.9, 0.8, 0.7, 20.0), "runs": runs, "minutes": 3.0}


def test_section_has_per_kind_tables_das_terms_and_plots(tmp_path):
    Args.out_dir = str(tmp_path)
    section = grid.Section(name="av-test", json_name="r.json", plot_name="r.png", heading="## Weight pruning: toy",
                           producer="python -m toy", command_prefix="", calibration="toy data", defaults="defaults",
                           results_title="# R", kinds={"video": "video questions", "both": "both streams",
                                                      "audio": "audio questions"},
                           das_terms=True, meta={"model_path": "m", "eval_data_path": "e"})
    grid.write_section(Args, grid_results(), section)
    text = (tmp_path / "results.md").read_text()
    assert "Not in this table (no runs): sparsegpt." in text
    assert "### Accuracy (%), video questions" in text and "### Accuracy (%), both streams" in text
    assert "audio questions" not in text  # the dense result has no audio kind
    # video-kind cells: mean ± half range over the two seeds (40 and 50 -> 45.0 ± 5.0)
    video_table = text.split("### Accuracy (%), video questions")[1].split("###")[0]
    assert "| wanda | 45.0 ± 5.0 | 45.0 ± 5.0 | 45.0 ± 5.0 |" in video_table
    assert "| magnitude | 40.0 | 40.0 | 40.0 |" in video_table
    # the DAS terms of tamp 0.5 seed 42 (the first one): blocks 0, 2, 4, 6, 7 and the mean over all 8
    das = text.split("### DAS diversity terms (tamp 0.5, seed 42)")[1].split("![")[0]
    assert "| term | block 0 | block 2 | block 4 | block 6 | block 7 | mean over blocks |" in das
    assert "| text-video | 0.4200 | 2.4200 | 4.4200 | 6.4200 | 7.4200 | 3.9200 |" in das
    assert "Realism check" in text and "holds" in text
    assert "`python -m toy --methods magnitude wanda tamp sparsegpt --sparsities 0.5 0.7 --patterns 2:4 --seeds 42 43" in text
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r_das_terms.png").stat().st_size > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["meta"]["seeds"] == [42, 43] and len(saved["runs"]) == 5 * 3  # magnitude once, wanda and tamp per seed


def test_av_default_model_and_task_follow_embedded_model(monkeypatch):
    monkeypatch.setenv("EMBEDDED_MODEL", "tiny")
    assert av_paths.default_checkpoint() == av_paths.CHECKPOINT_DIR
    assert av_paths.embedded_data().data_path == av_paths.DATA_PATH
    monkeypatch.setenv("EMBEDDED_MODEL", "smol")
    assert av_paths.embedded_data().eval_data_path == av_paths.HARD_EVAL_DATA_PATH
    # an embedded model brings its own task whatever the variable says
    assert av_paths.embedded_data(av_paths.CHECKPOINT_DIR).media_folder == av_paths.MEDIA_FOLDER
    monkeypatch.setenv("EMBEDDED_MODEL", "tiny")
    assert av_paths.embedded_data(av_paths.SMOL_CHECKPOINT_DIR).data_path == av_paths.HARD_DATA_PATH
    assert av_paths.is_embedded(av_paths.SMOL_CHECKPOINT_DIR) and not av_paths.is_tiny(av_paths.SMOL_CHECKPOINT_DIR)
    assert av_paths.results_suffix(av_paths.CHECKPOINT_DIR) == "_tiny"
    monkeypatch.setenv("EMBEDDED_MODEL", "big")
    from mmprune.base.errors import UserInputError

    with pytest.raises(UserInputError, match="EMBEDDED_MODEL='big' is not one of smol, tiny"):
        av_paths.embedded_data()


def test_av_banner_names_the_tiny_model_and_its_task(monkeypatch, capsys):
    from videollama2.pruners.__main__ import resolve_paths

    monkeypatch.setenv("EMBEDDED_MODEL", "tiny")
    monkeypatch.setattr("videollama2.pruners.__main__.REAL_MODEL", "/nonexistent/model")
    monkeypatch.setattr("videollama2.pruners.__main__.REAL_DATA", "/nonexistent/data.json")

    class A:
        model_path = data_path = data_folder = None

    assert resolve_paths(A) is True
    err = capsys.readouterr().err
    assert "EMBEDDED tiny VideoLLaMA2-AV" in err and "EMBEDDED synthetic audio-visual QA" in err
    assert A.data_path == str(av_paths.DATA_PATH) and A.data_folder == str(av_paths.MEDIA_FOLDER)
