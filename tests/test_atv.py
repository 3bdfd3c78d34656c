"""ATV-Pruning (mmprune/prune/selection/atv.py): drift, the k formula, the token choice, the block visitor against a
slow recomputation, equality with Wanda when every token is kept, exact patterns, and the scripts."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaModel

from mmprune.prune.selection.atv import ATVConfig, DriftSelection, keep_mask, keep_mask_slow, token_drift, visual_budget
from mmprune.prune.calibration import capture_block_inputs
from mmprune.prune.driver import block_linears, block_output, sweep
from mmprune.base.errors import UserInputError
from mmprune.prune.masks import nm_pattern_holds, unstructured_row_mask
from mmprune.prune.methods.wanda import WandaPruner
from mmprune.prune.sparsity import SparsityPattern

TEXT_IMAGE = {0: "text", 1: "image"}
TEXT_VIDEO_AUDIO = {0: "text", 1: "video", 2: "audio"}


# ---------------------------------------------------------------------------------------------
# The rule on small tensors, by hand


def test_drift_by_hand():
    x_in = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    x_out = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [4.0, 3.0], [1.0, 1.0]])
    # same direction 0; orthogonal 1; opposite 2; cos = 24/25 -> 0.04; cos = 1/sqrt(2)
    expected = torch.tensor([0.0, 1.0, 2.0, 0.04, 1 - 1 / math.sqrt(2)])
    assert torch.allclose(token_drift(x_in, x_out), expected, atol=1e-6)
    assert torch.allclose(token_drift(x_in.unsqueeze(0), x_out.unsqueeze(0)), expected, atol=1e-6)
    assert token_drift(x_in.half(), x_out.half()).dtype == torch.float32


@pytest.mark.parametrize("mean,n_text,n_visual,alpha,k", [
    (0.25, 6, 100, 1.0, 2),     # 1.5 -> 2
    (0.25, 10, 100, 1.0, 2),    # 2.5 -> 2: half to even, as Python's round in the public code
    (0.375, 10, 100, 1.0, 4),   # 3.75 -> 4
    (0.125, 4, 100, 1.0, 0),    # 0.5 -> 0
    (0.125, 4, 100, 3.0, 2),    # alpha scales the drift: 1.5 -> 2
    (0.5, 10, 100, 4.0, 10),    # min(1, 2) = 1: k = n_text
    (0.5, 10, 3, 4.0, 3),       # ... at most n_visual
    (0.9, 10, 100, 0.0, 0),     # alpha 0: text tokens only
    (0.3, 0, 100, 1.0, 0),      # no text, no visual budget
])
def test_budget_formula(mean, n_text, n_visual, alpha, k):
    assert visual_budget(mean, n_text, n_visual, alpha) == k


def test_keep_mask_by_hand_with_ties():
    drift = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3])
    group = torch.tensor([-1, 0, 0, 0, 0])  # token 0 is text: always counted
    want = {0: [0], 1: [0, 2], 2: [0, 2, 3], 3: [0, 2, 3, 4], 4: [0, 1, 2, 3, 4]}
    for k, kept in want.items():  # the tie at 0.5 goes to the lower position first
        mask = keep_mask(drift, group, torch.tensor([k]))
        assert mask.nonzero().flatten().tolist() == kept


def test_keep_mask_two_groups_by_hand():
    drift = torch.tensor([0.0, 0.2, 0.9, 0.4, 0.1, 0.7])
    group = torch.tensor([-1, 0, 1, 0, 1, -1])
    assert keep_mask(drift, group, torch.tensor([1, 1])).nonzero().flatten().tolist() == [0, 2, 3, 5]
    assert keep_mask(drift, group, torch.tensor([0, 2])).nonzero().flatten().tolist() == [0, 2, 4, 5]
    assert keep_mask(drift, group, torch.tensor([2, 0])).nonzero().flatten().tolist() == [0, 1, 3, 5]


@pytest.mark.parametrize("seed", range(20))
def test_keep_mask_fast_equals_slow(seed):
    rng = random.Random(seed)
    n, groups = rng.randint(1, 60), rng.randint(0, 3)
    drift = [rng.choice([0.0, 0.1, 0.25, 0.5, 1.0]) for _ in range(n)]  # few values: many ties
    group = [rng.randint(-1, groups - 1) for _ in range(n)]
    k = [rng.randint(0, n) for _ in range(groups)]
    fast = keep_mask(torch.tensor(drift), torch.tensor(group), torch.tensor(k, dtype=torch.long))
    assert fast.tolist() == keep_mask_slow(drift, group, k)


def _states(drifts):
    """Unit-norm (x_in, x_out) pairs in 2-D whose drift 1 - cos is each of `drifts`."""
    angle = torch.tensor([math.acos(1 - d) for d in drifts])
    x_in = torch.stack([torch.ones_like(angle), torch.zeros_like(angle)], 1)
    x_out = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return x_in, x_out


def test_drift_selection_mean_over_all_visual_tokens_of_all_samples():
    sel = DriftSelection(ATVConfig(), TEXT_IMAGE)
    # sample 0: 4 text tokens, image drifts 1 and 0; sample 1: 2 text tokens, image drifts 0 and 0
    ids0, d0 = torch.tensor([0, 1, 1, 0, 0, 0]), [0.3, 1.0, 0.0, 0.3, 0.3, 0.3]
    ids1, d1 = torch.tensor([0, 1, 1, 0]), [0.5, 0.0, 0.0, 0.5]
    for sample, (ids, d) in enumerate([(ids0, d0), (ids1, d1)]):
        sel.add(sample, token_drift(*_states(d)), ids)
    sel.finish_block(0)
    # mean over the 4 image tokens = 0.25 (text drifts do not count); k0 = round(0.25 * 4) = 1,
    # k1 = round(0.25 * 2) = round(0.5) = 0
    assert sel.kept(0).tolist() == [True, True, False, True, True, True]
    assert sel.kept(1).tolist() == [True, False, False, True]
    block = sel.report[0]
    assert block["mean_drift"]["image"] == pytest.approx(0.25, abs=1e-6)
    assert block["visual_kept"] == {"image": 1} and block["visual_tokens"] == {"image": 4}
    assert block["visual_kept_share"]["image"] == 0.25
    assert block["counted_token_share"] == 7 / 10


def test_separate_and_pooled_modalities_by_hand():
    # 6 text tokens; video drifts 0.5, 0.5, 0.5, 0.5; audio drifts 0.1, 0.1, 0.0, 0.0
    ids = torch.tensor([0] * 6 + [1] * 4 + [2] * 4)
    drifts = [0.0] * 6 + [0.5] * 4 + [0.1, 0.1, 0.0, 0.0]
    separate = DriftSelection(ATVConfig(), TEXT_VIDEO_AUDIO)
    pooled = DriftSelection(ATVConfig(grouping="pooled"), TEXT_VIDEO_AUDIO)
    for sel in (separate, pooled):
        sel.add(0, token_drift(*_states(drifts)), ids)
        sel.finish_block(0)
    # separate: video k = round(0.5 * 6) = 3 (first three, ties by position), audio k = round(0.05 * 6) = 0
    assert separate.kept(0).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    # pooled: mean (4 * 0.5 + 2 * 0.1) / 8 = 0.275 -> k = round(1.65) = 2 of the pooled set, both video
    assert pooled.kept(0).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert separate.report[0]["visual_kept"] == {"video": 3, "audio": 0}
    assert pooled.report[0]["visual_kept"] == {"video": 2, "audio": 0}
    assert pooled.report[0]["pooled_mean_drift"] == pytest.approx(0.275, abs=1e-6)
    assert separate.report[0]["mean_drift"] == pytest.approx({"video": 0.5, "audio": 0.05}, abs=1e-6)


@pytest.mark.parametrize("alpha,grouping", [(-1.0, "separate"), (float("nan"), "separate"), (1.0, "both")])
def test_bad_config_is_a_user_error(alpha, grouping):
    with pytest.raises(UserInputError):
        ATVConfig(alpha=alpha, grouping=grouping)


# ---------------------------------------------------------------------------------------------
# The block visitor through the sequential driver, against a slow recomputation


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaModel(config).eval()


def captured(model, n_samples=4, length=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, 40, (1, length), generator=g) for _ in range(n_samples)]
    # every third token visual, plus a visual run: n_visual = 11, n_text = 14
    modality = lambda s: ((torch.arange(s.shape[1]) % 3 == 0) | (torch.arange(s.shape[1]) < 4)).to(torch.int8)  # noqa: E731
    return capture_block_inputs(model.layers[0], lambda s: model(input_ids=s), samples, modality)


def plan(model, ratio):
    return {f"layers.{i}.{n}": ratio for i, layer in enumerate(model.layers)
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def slow_atv_picks(inputs, outputs, ids, alpha):
    """ATV's counted tokens the obvious way: drift 1 - cos(x_in, x_out) per token in float64, the
    mean over every image token of every sample, k = min(round(min(1, alpha * mean) * n_text),
    n_image) per sample, every text token plus the k image tokens of highest drift (lower position
    first on ties), in token order."""
    drifts = [[1.0 - float(a.double() @ b.double() / (a.double().norm() * b.double().norm())) for a, b in zip(x, y)]
              for x, y in zip(inputs, outputs)]
    image = [d for ds, m in zip(drifts, ids) for d, i in zip(ds, m.tolist()) if i == 1]
    mean = sum(image) / len(image)
    picks = []
    for ds, m in zip(drifts, ids):
        m = m.tolist()
        text = [t for t, i in enumerate(m) if i != 1]
        ranked = sorted((t for t, i in enumerate(m) if i == 1), key=lambda t: (-ds[t], t))
        k = min(round(min(1.0, alpha * mean) * len(text)), len(ranked))
        picks.append(torch.tensor(sorted(text + ranked[:k])))
    return picks


@torch.no_grad()
def slow_atv_block(layer, hidden, kwargs, modality, alpha, ratio):
    """Prune one block the obvious way; returns the pruned block's outputs (the next inputs)."""
    outputs = [block_output(layer, h, kw)[0] for h, kw in zip(hidden, kwargs)]
    chosen = [p.tolist() for p in slow_atv_picks([h[0] for h in hidden], outputs, modality, alpha)]
    linears = block_linears(layer)
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    count = {n: 0 for n in linears}
    seen = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, args[0][0]))
               for n, m in linears.items()]
    for h, kw, rows in zip(hidden, kwargs, chosen):
        block_output(layer, h, kw)
        for n in linears:
            sums[n] += seen[n][rows].double().pow(2).sum(0)
            count[n] += len(rows)
    for handle in handles:
        handle.remove()
    for n, m in linears.items():
        score = m.weight.abs().double() * (sums[n] / count[n]).sqrt()
        m.weight[unstructured_row_mask(score, ratio)] = 0
    return [block_output(layer, h, kw) for h, kw in zip(hidden, kwargs)]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 3.0])
def test_atv_pruner_equals_slow_recomputation_over_two_blocks(alpha):
    fast, slow = tiny_llama(3), tiny_llama(3)
    pruner = WandaPruner("layers", SparsityPattern(), plan(fast, 0.5), atv=ATVConfig(alpha=alpha),
                         modality_names=TEXT_IMAGE)
    sweep(fast.layers, captured(fast), pruner, "cpu", "test")
    store = captured(slow)
    hidden, kwargs, modality = store.hidden, store.kwargs, store.modality_ids
    for layer in slow.layers:  # each block sees the pruned earlier blocks' outputs
        hidden = slow_atv_block(layer, hidden, kwargs, modality, alpha, 0.5)
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        assert torch.equal(a == 0, b == 0), name
    kept = [b["visual_kept_share"]["image"] for b in pruner.atv.report.values()]
    assert len(kept) == 2 and all(0 <= s <= 1 for s in kept)
    if alpha == 0:
        assert kept == [0.0, 0.0]
    assert all(abs(r.achieved - 0.5) < 1e-9 for r in pruner.results)


def test_atv_keeping_every_token_is_wanda_through_the_driver():
    atv_model, wanda_model = tiny_llama(4), tiny_llama(4)
    atv = WandaPruner("layers", SparsityPattern(), plan(atv_model, 0.5), atv=ATVConfig(alpha=1e12),
                      modality_names=TEXT_IMAGE)
    sweep(atv_model.layers, captured(atv_model), atv, "cpu", "test")
    sweep(wanda_model.layers, captured(wanda_model), WandaPruner("layers", SparsityPattern(), plan(wanda_model, 0.5)),
          "cpu", "test")
    assert all(b["counted_token_share"] == 1.0 for b in atv.atv.report.values())
    for a, b in zip(atv_model.parameters(), wanda_model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Both entry points in-process on the random tiny fixtures


LONG_QUESTION = " ".join(["what color is the cat in this picture ?"] * 8)  # more text than image tokens


@pytest.fixture(scope="module")
def llava_fixture(tmp_path_factory):
    from fixtures_llava import build_tiny_llava_next, write_image_data

    root = tmp_path_factory.mktemp("atv_llava")
    hf = build_tiny_llava_next(root / "hf")
    data = root / "data"
    write_image_data(data, [(40, 56), (56, 56), (56, 40), (28, 28)], LONG_QUESTION)
    return hf, data


@pytest.fixture(scope="module")
def videollama2_fixture(tmp_path_factory):
    from fixtures_videollama2 import build_tiny_videollama2, write_clip_data

    root = tmp_path_factory.mktemp("atv_vl2")
    model_dir = build_tiny_videollama2(root / "model")
    data = root / "data"
    write_clip_data(data, 4, LONG_QUESTION)
    return model_dir, data


def run_llava(fixture, out, *extra):
    from llava.pruners.__main__ import main

    hf, data = fixture
    assert main(["--model_path", str(hf), "--data_path", str(data / "data.json"), "--nsamples", "4",
                 "--save_model", str(out), "--no_eval", *extra]) == 0
    return json.loads((out / "pruning_report.json").read_text())


def run_videollama2(fixture, out, *extra):
    from videollama2.pruners.__main__ import main

    model_dir, data = fixture
    assert main(["--model_path", str(model_dir), "--data_path", str(data / "data.json"), "--nsamples", "4",
                 "--save_model", str(out), "--no_eval", *extra]) == 0
    return json.loads((out / "pruning_report.json").read_text())


TREES = {"llava": (run_llava, "llava_fixture", lambda k: ".layers." in k and "language_model" in k and k.endswith("proj.weight")),
         "videollama2": (run_videollama2, "videollama2_fixture",
                         lambda k: k.startswith("model.layers.") and k.endswith("proj.weight"))}


def tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("tree,grouping", [("llava", "separate"), ("videollama2", "separate"),
                                           ("videollama2", "pooled")])
def test_atv_keeping_every_token_equals_wanda(tree, grouping, tmp_path, request):
    run, fixture_name, _ = TREES[tree]
    fixture = request.getfixturevalue(fixture_name)
    atv = run(fixture, tmp_path / "atv", "--method", "atv", "--atv_alpha", "1e12", "--atv_modalities", grouping)
    run(fixture, tmp_path / "wanda", "--method", "wanda")
    for block in atv["atv"]["per_block"].values():  # every visual token was counted
        assert block["counted_token_share"] == 1.0
        assert all(share == 1.0 for share in block["visual_kept_share"].values())
    a, w = tensors(tmp_path / "atv"), tensors(tmp_path / "wanda")
    assert a.keys() == w.keys()
    for key in a:
        assert torch.equal(a[key], w[key]), key


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_atv_obs_keeping_every_token_equals_sparsegpt(tree, pattern, tmp_path, request):
    """atv-obs: SparseGPT's Hessian over ATV's tokens; with every token kept, SparseGPT bit for bit."""
    run, fixture_name, is_decoder_linear = TREES[tree]
    fixture = request.getfixturevalue(fixture_name)
    obs = run(fixture, tmp_path / "atv-obs", "--method", "atv-obs", "--atv_alpha", "1e12", "--sparsity_type", pattern)
    run(fixture, tmp_path / "sparsegpt", "--method", "sparsegpt", "--sparsity_type", pattern)
    assert obs["method"] == "atv-obs" and obs["achieved_sparsity"] == 0.5
    assert all(block["counted_token_share"] == 1.0 for block in obs["atv"]["per_block"].values())
    assert obs["sparsegpt"]["tokens"]["rule"] == "atv" and obs["sparsegpt"]["tokens"]["summary"]["token_share"] == 1.0
    a, s = tensors(tmp_path / "atv-obs"), tensors(tmp_path / "sparsegpt")
    assert a.keys() == s.keys()
    for key in a:
        assert torch.equal(a[key], s[key]), key
    pruned = [v for k, v in a.items() if is_decoder_linear(k)]
    assert pruned and sum(int((v == 0).sum()) for v in pruned) * 2 == sum(v.numel() for v in pruned)
    if pattern == "2:4":
        assert all(nm_pattern_holds(v, 2, 4) for v in pruned)


@pytest.mark.parametrize("tree", TREES)
def test_atv_obs_alpha_zero_takes_the_hessian_over_the_text_tokens(tree, tmp_path, request):
    run, fixture_name, _ = TREES[tree]
    report = run(request.getfixturevalue(fixture_name), tmp_path / "out", "--method", "atv-obs", "--atv_alpha", "0",
                 "--atv_modalities", "pooled")
    counts = report["calibration"]["tokens_per_modality"]
    tokens = report["sparsegpt"]["tokens"]
    assert tokens["alpha"] == 0.0 and tokens["modalities"] == "pooled" and report["atv"]["modalities"] == "pooled"
    assert tokens["summary"]["token_share"] == pytest.approx(counts["text"] / sum(counts.values()))
    assert all(f["tokens"] == counts["text"] for f in tokens["per_hessian"].values())
    assert report["achieved_sparsity"] == 0.5


@pytest.mark.parametrize("tree", TREES)
def test_atv_alpha_zero_counts_the_text_tokens_only(tree, tmp_path, request):
    run, fixture_name, _ = TREES[tree]
    report = run(request.getfixturevalue(fixture_name), tmp_path / "atv", "--method", "atv", "--atv_alpha", "0")
    assert report["method"] == "atv" and report["options"]["atv_alpha"] == 0.0
    counts = report["calibration"]["tokens_per_modality"]
    names = {"image"} if tree == "llava" else {"video", "audio"}
    for block in report["atv"]["per_block"].values():
        assert set(block["mean_drift"]) == names and all(d > 0 for d in block["mean_drift"].values())
        assert block["visual_kept"] == {n: 0 for n in names}
        assert block["visual_tokens"] == {n: counts[n] for n in names}
        assert block["counted_token_share"] == pytest.approx(counts["text"] / sum(counts.values()))


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_atv_exact_sparsity_and_patterns(tree, pattern, tmp_path, request):
    run, fixture_name, is_decoder_linear = TREES[tree]
    fixture = request.getfixturevalue(fixture_name)
    report = run(fixture, tmp_path / "out", "--method", "atv", "--sparsity_type", pattern)
    assert report["achieved_sparsity"] == 0.5
    pruned = {k: v for k, v in tensors(tmp_path / "out").items() if is_decoder_linear(k)}
    assert pruned and sum(int((v == 0).sum()) for v in pruned.values()) * 2 == sum(v.numel() for v in pruned.values())
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        for key, weight in pruned.items():
            assert nm_pattern_holds(weight, n, m), key
            assert int((weight.reshape(weight.shape[0], -1, m) == 0).sum(-1).max()) == n, key


def test_bad_alpha_stops_before_anything_is_written(tmp_path, capsys):
    from llava.pruners.__main__ import main
    from mmprune.base.entry import run_main

    out = tmp_path / "out"
    assert run_main(main, ["--method", "atv", "--atv_alpha", "-1", "--save_model", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--atv_alpha" in last
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The scripts end to end on the embedded tiny defaults


@pytest.mark.slow
@pytest.mark.parametrize("script,pattern", [("scripts/prune/atv.sh", "unstructured"),
                                            ("scripts_videollama2/prune/atv.sh", "2:4")])
def test_atv_scripts_on_the_embedded_default(script, pattern, tmp_path):
    from script_runs import ROOT, run_bash

    out = tmp_path / "atv"
    proc = run_bash(ROOT / script, "0.5", pattern, "--eval_samples", "20",
                    env={"OUTPUT_DIR": str(out), "NSAMPLES": "16"}, timeout=600)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "atv" and abs(summary["achieved_sparsity"] - 0.5) <= 1e-3
    assert "ATV per block" in proc.stderr
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["atv"]["alpha"] == 1.0 and len(report["atv"]["per_block"]) == len(
        {e["name"].split(".layers.")[1].split(".")[0] for e in report["per_linear"]})
    assert "evaluation" in report
    if pattern == "2:4":
        for key, weight in tensors(out).items():
            if key.startswith("model.layers.") and key.endswith("proj.weight"):
                assert nm_pattern_holds(weight, 2, 4), key
