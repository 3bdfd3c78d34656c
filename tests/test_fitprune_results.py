"""llava.fitprune_results and its measure and section modules: timing rounds, the linear-layer breakdown
and its text, --retime's checks."""

import pytest
import torch
from torch import nn

from llava import fitprune as lfp
from llava import fitprune_measure as fm, fitprune_results as fr, fitprune_section as fs
from llava.embedded import paths as embedded
from mmprune.base.entry import run_main
from mmprune.tokens.recipe import TokenRecipe


def test_linear_clock_counts_rows_of_every_call_by_module_name():
    layers = nn.ModuleList(nn.ModuleDict({"attn": nn.ModuleDict({"q_proj": nn.Linear(4, 4)}),
                                          "mlp": nn.Sequential(nn.Linear(4, 8), nn.ReLU())}) for _ in range(2))
    clock = fm.LinearClock(layers)
    x = torch.randn(1, 5, 4)
    for layer in layers:
        layer["attn"]["q_proj"](x)
        layer["mlp"](x[:, :3])
    layers[0]["attn"]["q_proj"](x[0, :2])  # 2-D input: 2 rows
    taken = clock.take()
    assert {k: v["rows"] for k, v in taken.items()} == {"q_proj": 12, "0": 6}
    assert all(v["ms"] >= 0 for v in taken.values())
    assert clock.take() == {}  # take() starts the counts again
    clock.remove()
    layers[0]["attn"]["q_proj"](x)
    assert clock.take() == {}


def test_linear_breakdown_rows_follow_the_recipe(embedded_llava, embedded_eval_records):
    """Rows through q_proj at layer l are the tokens entering it, through the MLP those left after
    its drop: text + visual kept, from the recipe's own per-layer targets."""
    model, processor = embedded_llava
    recipe = TokenRecipe([0.75, 0.5, 0.5, 0.25])
    records = embedded_eval_records[:3]
    prompts = fm.encode_prompts(processor, records)
    expected_q = expected_mlp = 0
    for inputs in prompts:
        n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        n_text = inputs["input_ids"].shape[1] - n_visual
        kept = recipe.kept_after(n_visual)
        expected_q += sum(n_text + v for v in [n_visual] + kept[:-1])
        expected_mlp += sum(n_text + v for v in kept)
    out = fm.linear_breakdown(model, processor, recipe, records, repeats=1)
    layers = model.config.text_config.num_hidden_layers
    dense_rows = sum(p["input_ids"].shape[1] for p in prompts) * layers / len(prompts)
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert out["dense"]["linears"][kind]["rows"] == dense_rows
        assert out["recipe"]["linears"][kind]["rows"] == pytest.approx(expected_q / len(prompts))
    for kind in ("gate_proj", "up_proj", "down_proj"):
        assert out["recipe"]["linears"][kind]["rows"] == pytest.approx(expected_mlp / len(prompts))
    assert expected_mlp < expected_q < dense_rows * len(prompts)
    assert out["prompts"] == 3 and out["one_token_decoder_ms"] > 0
    for name in ("dense", "recipe"):  # the linears are a part of the decoder's time
        assert sum(v["ms"] for v in out[name]["linears"].values()) < out[name]["decoder_ms"]
    assert getattr(model, "_mmprune_token_recipe", None) is None  # the recipe is removed again


def test_rounds_take_the_median_of_the_round_medians(monkeypatch):
    values = iter([100.0, 80.0, 120.0])

    def one_round(*args):
        dense = next(values)
        return {"dense": {"cpu": dense, "decoder_cpu": dense}, "0.5": {"cpu": 60.0, "decoder_cpu": 60.0}}

    monkeypatch.setattr(fm, "time_prefill", one_round)
    out = fm.time_prefill_rounds(None, None, {"dense": None, "0.5": None}, [], repeats=5, rounds=3)
    assert out["median"] == {"dense": {"cpu": 100.0, "decoder_cpu": 100.0}, "0.5": {"cpu": 60.0, "decoder_cpu": 60.0}}
    assert [r["dense"]["cpu"] for r in out["rounds"]] == [100.0, 80.0, 120.0]
    text = fs.round_spread([{"model": "dense", "recipes": {"0.5": {}}, "timing_rounds": out["rounds"]}], 5)
    assert "3 rounds, each a median of 5" in text and "dense 0.5: -40.0, -25.0, -50.0." in text


def test_breakdown_text_states_rows_time_and_the_fixed_part():
    linears = lambda q, mlp: {"q_proj": {"ms": q, "rows": 100.0}, "gate_proj": {"ms": mlp, "rows": 100.0}}
    b = {"prompts": 30, "one_token_decoder_ms": 40.0,
         "dense": {"decoder_ms": 200.0, "linears": linears(50.0, 100.0)},
         "recipe": {"decoder_ms": 150.0, "linears": {"q_proj": {"ms": 40.0, "rows": 80.0},
                                                      "gate_proj": {"ms": 80.0, "rows": 40.0}}}}
    text = fs.breakdown_text(b, "dense", 5)
    assert "rows through the decoder's linear layers -40.0 %, their time -20.0 % (150.0 -> 120.0 ms" in text
    assert "q_proj -20.0, gate_proj -20.0" in text
    assert "50.0 -> 30.0 ms (-40.0 %)" in text and "200.0 -> 150.0 ms (-25.0 %)" in text
    assert "takes 40.0 ms, 20.0 % of a dense prompt's" in text


def test_retime_and_reuse_need_an_earlier_run(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert run_main(fr.main, ["--retime", "--json", str(missing), "--markdown", str(tmp_path / "r.md")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fr.parse_args(["--retime", "--reuse"])
    with pytest.raises(SystemExit):
        fr.parse_args(["--timing_rounds", "0"])


def test_the_saved_recipe_rebuilds_from_its_keep_fractions():
    result = {"recipes": {"0.5": {"keep_fraction": [0.8, 0.4]}}}
    assert lfp.as_recipe(fm.recipe_of(result, 0.5)).keep_fraction == [0.8, 0.4]


def test_render_rewrites_the_section_from_the_json_with_its_own_settings(tmp_path, monkeypatch):
    import json

    saved = json.loads((embedded.REPO_ROOT / "docs" / "fitprune_results_tiny.json").read_text())
    saved["settings"] = {"nsamples": 66, "timing_prompts": 7, "repeats": 3}
    (tmp_path / "r.json").write_text(json.dumps(saved))
    markdown = tmp_path / "r.md"
    markdown.write_text("# Results\n")
    monkeypatch.setattr(fr, "measure_all", lambda *a: pytest.fail("--render measured"))
    assert run_main(fr.main, ["--render", "--json", str(tmp_path / "r.json"), "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    assert "<!-- section:fitprune" in text and "on 7 eval prompts" in text and "median of 3 repeats" in text
    assert f"{saved['results'][0]['eval']['dense']['accuracy']:.3f}" in text


def test_retime_keeps_the_earlier_search_setting_and_saves_the_new_timing_settings(tmp_path, monkeypatch):
    import json

    saved = json.loads((embedded.REPO_ROOT / "docs" / "fitprune_results_tiny.json").read_text())
    saved["settings"] = {"nsamples": 12, "timing_prompts": 7, "repeats": 3}
    (tmp_path / "r.json").write_text(json.dumps(saved))
    seen = {}

    def measured(args, earlier):
        seen.update(nsamples=args.nsamples, earlier=earlier)
        return earlier

    monkeypatch.setattr(fr, "measure_all", measured)
    argv = ["--retime", "--no-width_check", "--repeats", "2", "--json", str(tmp_path / "r.json"),
            "--markdown", str(tmp_path / "r.md")]
    assert run_main(fr.main, argv) == 0
    assert seen == {"nsamples": 12, "earlier": saved["results"]}
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["settings"] == {"nsamples": 12, "timing_prompts": 30, "repeats": 2}
    assert "Recipes searched on 12 " in (tmp_path / "r.md").read_text()
