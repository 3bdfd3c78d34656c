"""OBS (SparseGPT) with TAMP's token and layer signals, and with ATV-Pruning's tokens (atv-obs): the
token Hessians against slow explicit sums, the presets against SparseGPT when every token counts with
weight 1 at a uniform allocation (both trees, bit for bit), selections too small for a full-rank
Hessian damped as SparseGPT damps, exact N:M patterns and unstructured counts, the presets' scripts
and flags."""

import json

import pytest
import torch
from torch import nn

from mmprune.base.errors import UserInputError
from mmprune.prune.calibration import CalibrationStore, capture_block_inputs
from mmprune.prune.driver import block_output, sweep
from mmprune.prune.masks import nm_pattern_holds
from mmprune.prune.methods import sparsegpt as sgpt
from mmprune.prune.methods.sparsegpt import HessianAccumulator, SparseGPTPruner, eigenvalues_above, sparsegpt_prune_
from mmprune.prune.pipeline import PRESETS, LanguageHead, PhaseTimer, PruneConfig, prune_decoder
from mmprune.prune.selection.atv import ATVConfig
from mmprune.prune.selection.token_rules import AttentionWeightConfig, DriftRule, SelectorRule, attention_weights
from mmprune.prune.sparsity import SparsityPattern
from script_runs import ROOT, load_tensors, run_bash
from test_atv import slow_atv_picks
from test_baselines import names, tiny_lm

OBS_PRESETS = ["das-sparsegpt", "owl-sparsegpt", "ecoflap-sparsegpt", "amia-sparsegpt", "attn-sparsegpt", "tamp-obs",
               "tamp-obs-attn", "atv-obs"]
MODALITIES = {0: "text", 1: "image"}


def capture(model, n=4, length=20):
    """Block 0's inputs of `n` random prompts; every third token is an "image" token, with answers."""
    samples = [torch.randint(0, 48, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(n)]
    return capture_block_inputs(model.model.layers[0], lambda s: model(input_ids=s), samples,
                                lambda s: (torch.arange(s.shape[1]) % 3 == 0).to(torch.int8),
                                labels_of=lambda s: s.clone())


def slow_hessian(samples, picks=None, weights=None):
    """(2/n) sum over samples and their counted tokens of w_t x_t x_t^T, one token at a time, float64."""
    h = torch.zeros(samples[0].shape[1], samples[0].shape[1], dtype=torch.float64)
    for s, x in enumerate(samples):
        rows = range(x.shape[0]) if picks is None else picks[s].tolist()
        for t in rows:
            w = 1.0 if weights is None else float(weights[s][t])
            h += 2.0 * w * torch.outer(x[t].double(), x[t].double())
    return h / len(samples)


def test_subset_and_weighted_hessians_equal_a_slow_explicit_sum():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(9, 5, generator=g)]
    picks = [torch.tensor([5, 0, 3]), torch.tensor([2]), torch.arange(9)]
    weights = [torch.rand(x.shape[0], generator=g) + 0.1 for x in xs]
    acc = HessianAccumulator()
    for x, p, w in zip(xs, picks, weights):
        acc.add("subset", x[p])
        acc.add("weighted", x, w)
    torch.testing.assert_close(acc.hessian["subset"].double(), slow_hessian(xs, picks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.hessian["weighted"].double(), slow_hessian(xs, weights=weights), rtol=1e-5,
                               atol=1e-5)
    ones = HessianAccumulator()
    plain = HessianAccumulator()
    for x in xs:
        ones.add("q", x, torch.ones(x.shape[0]))
        plain.add("q", x)
    assert torch.equal(ones.hessian["q"], plain.hessian["q"])  # weight 1 is SparseGPT's Hessian bit for bit


def test_attention_weights_hand_checked():
    attention = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    # N a = [2.5, 1.5, 0.75, 0.25, 0]; clamped to [0.1, 2] -> [2, 1.5, 0.75, 0.25, 0.1], mean 0.92
    w = attention_weights(attention, AttentionWeightConfig(floor=0.1, cap=2.0))
    expected = torch.tensor([2.0, 1.5, 0.75, 0.25, 0.1]) / 0.92
    torch.testing.assert_close(w, expected)
    assert float(w.mean()) == pytest.approx(1.0) and float(w.min()) > 0
    assert torch.equal(attention_weights(attention, AttentionWeightConfig(1.0, 1.0)), torch.ones(5))
    for floor, cap in ((0.0, 1.0), (2.0, 1.0), (0.1, float("inf"))):
        with pytest.raises(UserInputError, match="floor"):
            AttentionWeightConfig(floor, cap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigenvalues_above_a_level_equal_counting_the_eigenvalues(dtype):
    g = torch.Generator().manual_seed(1)
    for n, rank in ((7, 7), (40, 40), (40, 9), (64, 3)):
        x = torch.randn(rank, n, generator=g, dtype=dtype)
        psd = x.T @ x
        indefinite = torch.randn(n, n, generator=g, dtype=dtype)
        indefinite = indefinite + indefinite.T  # Bunch-Kaufman takes 2x2 pivots on these
        for matrix in (psd, indefinite, torch.zeros(n, n, dtype=dtype)):
            eig = torch.linalg.eigvalsh(matrix)
            for level in (-1.0, 0.0, 1e-3, float(eig.median()), float(eig.max()) + 1):
                gaps = (eig - level).abs()
                if float(gaps.min()) < 1e-4 * max(float(eig.abs().max()), 1.0):
                    continue  # an eigenvalue at the level itself: either answer is rounding
                assert eigenvalues_above(matrix, level) == int((eig > level).sum()), (n, rank, level)


def _hessian_spy(monkeypatch):
    """Records the Hessian (and dead columns) each linear is pruned with; the real function runs."""
    seen = []
    original = sgpt.sparsegpt_prune_

    def spy(weight, hessian, *args):
        seen.append((hessian.clone(), args[-1]))
        return original(weight, hessian, *args)

    monkeypatch.setattr(sgpt, "sparsegpt_prune_", spy)
    return seen


def _q_inputs(model, store):
    """The input of block 0's q_proj for every sample (the dense block, before any pruning)."""
    layer = model.model.layers[0]
    kept = []
    handle = layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: kept.append(a[0][0].detach().clone()))
    with torch.no_grad():
        for s in range(len(store)):
            hidden, kwargs = store.inputs(s, "cpu")
            layer(hidden, **kwargs)
    handle.remove()
    return kept


def image_and_last(features, attention, modality_ids):
    """A selector plugged in as a plain function: the image tokens and the last token."""
    chosen = (modality_ids == 1).clone()
    chosen[-1] = True
    return chosen.nonzero()[:, 0]


def position_weights(features, attention, modality_ids):
    return 1.0 + torch.arange(features.shape[0], dtype=torch.float32) / features.shape[0]


@pytest.mark.parametrize("kind", ["subset", "weights"])
def test_pruner_hessian_is_the_slow_sum_over_the_rule_tokens(monkeypatch, kind):
    model = tiny_lm(5)
    store = capture(model)
    xs = _q_inputs(model, store)
    ids = [m.long() for m in store.modality_ids]
    rule = SelectorRule("test", kind, image_and_last if kind == "subset" else position_weights, "input", "block",
                        needs_attention=False)
    seen = _hessian_spy(monkeypatch)
    pruner = SparseGPTPruner("layers", SparsityPattern(), names(model), blocksize=16, tokens=rule)
    sweep(model.model.layers[:1], store, pruner, "cpu", "obs")
    if kind == "subset":
        picks = [image_and_last(x, None, m) for x, m in zip(xs, ids)]
        expected = slow_hessian(xs, picks=picks)
        tokens = sum(p.numel() for p in picks)
    else:
        expected = slow_hessian(xs, weights=[position_weights(x, None, m) for x, m in zip(xs, ids)])
        tokens = sum(x.shape[0] for x in xs)
    q_hessian = seen[0][0]  # q_proj comes first, then k/v share its Hessian
    torch.testing.assert_close(q_hessian.double(), expected, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(h, q_hessian) for h, _ in seen[1:3])
    fact = pruner.hessians["layers.0.self_attn.q_proj"]
    assert fact["linears"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert fact["tokens"] == tokens and fact["total_tokens"] == sum(x.shape[0] for x in xs)
    delta = 0.01 * float(q_hessian.diagonal().mean())  # the damping SparseGPT added
    assert fact["rank"] == int((torch.linalg.eigvalsh(q_hessian) > delta).sum())
    assert fact["rank_bound"] == min(tokens, 32)


def last_token_only(features, attention, modality_ids):
    return torch.tensor([features.shape[0] - 1])


def test_too_small_selection_is_damped_as_sparsegpt_damps_and_reported(monkeypatch):
    model = tiny_lm(6)
    store = capture(model)  # 4 samples: 4 tokens against 32 or 64 input columns
    seen = _hessian_spy(monkeypatch)
    rule = SelectorRule("last", "subset", last_token_only, "input", "block", needs_attention=False)
    plan = names(model)
    pruner = SparseGPTPruner("layers", SparsityPattern(), plan, blocksize=16, tokens=rule)
    sweep(model.model.layers, store, pruner, "cpu", "obs")
    assert len(pruner.hessians) == 4 * len(model.model.layers)
    for fact in pruner.hessians.values():
        assert fact["tokens"] == len(store) < fact["columns"]
        assert fact["rank"] <= fact["rank_bound"] == len(store)
        assert fact["damping"] == 0.01  # H + 0.01 mean(diag) I factors: no raised damping
    assert not pruner.damping
    assert_damped_as_sparsegpt_damps(model, *seen[0], 16, pruner.results)


def assert_damped_as_sparsegpt_damps(model, hessian, dead, blocksize, results):
    """The first q_proj of `model` (a pruned tiny_lm(6)) is what SparseGPT's own call with its usual
    damping gives on the same Hessian; every count exact, every weight finite."""
    dense = tiny_lm(6).model.layers[0].self_attn.q_proj.weight.detach().clone()
    info = sparsegpt_prune_(dense, hessian, 0.5, SparsityPattern(), blocksize, 0.01, dead)
    assert info["damping"] == 0.01
    assert torch.equal(dense, model.model.layers[0].self_attn.q_proj.weight)
    for r in results:
        assert r.zeros == round(0.5 * r.shape[0] * r.shape[1])
    for layer in model.model.layers:
        assert all(torch.isfinite(p).all() for p in layer.parameters())


class OneLinear(nn.Module):
    """A block of one square linear and no attention."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, hidden, **kwargs):
        return self.proj(hidden)


def image_tokens(features, attention, modality_ids):
    return (modality_ids == 1).nonzero()[:, 0]


def test_dead_and_unseen_columns_and_an_all_zero_selection():
    g = torch.Generator().manual_seed(3)
    store = CalibrationStore(device="cpu")
    for _ in range(3):
        x = torch.randn(1, 12, 8, generator=g)
        ids = (torch.arange(12) % 3 == 0).to(torch.int8)
        x[0, :, 2] = 0  # dead: zero on every token
        x[0, ids == 1, 4] = 0  # unseen: zero on the picked (image) tokens only
        store.hidden.append(x)
        store.kwargs.append({})
        store.modality_ids.append(ids)
        store.labels.append(None)
    torch.manual_seed(0)
    blocks = nn.ModuleList([OneLinear(8)])
    rule = SelectorRule("image", "subset", image_tokens, "input", "block", needs_attention=False)
    pruner = SparseGPTPruner("layers", SparsityPattern(), {"layers.0.proj": 0.5}, blocksize=4, tokens=rule)
    sweep(blocks, store, pruner, "cpu", "obs")
    fact = pruner.hessians["layers.0.proj"]
    assert fact["dead_columns"] == 1 and fact["unseen_columns"] == 1 and fact["tokens"] == 12
    weight = blocks[0].proj.weight
    assert (weight[:, 2] == 0).all() and torch.isfinite(weight).all()
    assert int((weight == 0).sum()) == 32
    # a selection whose every row is zero: nothing to scale the damping by, so the unit scale
    zero = torch.randn(6, 8, generator=g)
    info = sparsegpt_prune_(zero, torch.zeros(8, 8), 0.5, SparsityPattern(), 4, 0.01, torch.zeros(8, dtype=torch.bool))
    assert info["damping"] == 0.01 and int((zero == 0).sum()) == 24 and torch.isfinite(zero).all()


def _prune_tiny(method, pattern=SparsityPattern(), seed=7, **cfg):
    model = tiny_lm(seed)
    store = capture(model)
    head = LanguageHead(model.model.norm, model.lm_head)
    config = PruneConfig(method=method, sparsity=pattern.ratio if pattern.is_nm else 0.5, pattern=pattern, **cfg)
    outcome = prune_decoder(model.model.layers, "layers", store, config, MODALITIES, PhaseTimer(), head)
    return model, outcome


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("method", ["amia-sparsegpt", "attn-sparsegpt", "tamp-obs", "atv-obs"])
def test_nm_patterns_are_exact(method, n, m):
    model, outcome = _prune_tiny(method, SparsityPattern(n, m))
    for layer in model.model.layers:
        for linear in (mod for mod in layer.modules() if isinstance(mod, nn.Linear)):
            assert nm_pattern_holds(linear.weight, n, m)
    assert outcome.achieved == 0.5


@pytest.mark.parametrize("method,allocation", [("das-sparsegpt", "das"), ("owl-sparsegpt", "owl"),
                                               ("ecoflap-sparsegpt", "ecoflap"), ("tamp-obs", "das"),
                                               ("tamp-obs-attn", "das")])
def test_allocations_feed_the_obs_pruner_exactly(method, allocation):
    _, outcome = _prune_tiny(method)
    _, allocated = _prune_tiny(allocation)  # the Wanda-score preset with the same allocation
    assert outcome.plan == allocated.plan and len(set(outcome.plan.values())) > 1
    for r in outcome.results:
        assert r.zeros == round(outcome.plan[r.name] * r.shape[0] * r.shape[1])
    assert abs(outcome.achieved - 0.5) <= 1e-3


def test_token_report_in_the_outcome():
    _, outcome = _prune_tiny("amia-sparsegpt")
    tokens = outcome.details["sparsegpt"]["tokens"]
    assert tokens["rule"] == "amia" and tokens["kind"] == "subset" and tokens["features"] == "input"
    assert tokens["scope"] == "block"
    assert 0 < tokens["summary"]["token_share"] < 1 and tokens["summary"]["hessians"] == 4 * 3
    _, outcome = _prune_tiny("attn-sparsegpt")
    tokens = outcome.details["sparsegpt"]["tokens"]
    assert tokens["kind"] == "weights" and tokens["summary"]["token_share"] == 1
    assert 0 < tokens["summary"]["effective_token_share"] <= 1


# ---------------------------------------------------------------------------------------------
# atv-obs: ATV-Pruning's tokens (text + the top-k image tokens by drift) in SparseGPT's Hessian


@pytest.mark.parametrize("alpha", [0.0, 5.0, 1e12])  # k = 0, 4 of 7 (mean drift 0.059), all
def test_atv_obs_hessian_is_the_slow_sum_over_atvs_tokens(monkeypatch, alpha):
    model = tiny_lm(5)
    store = capture(model)
    xs = _q_inputs(model, store)  # block 0 dense, before the sweep prunes it
    ids = [m.long() for m in store.modality_ids]
    layer = model.model.layers[0]
    with torch.no_grad():
        inputs = [store.inputs(s, "cpu") for s in range(len(store))]
        picks = slow_atv_picks([h[0] for h, _ in inputs], [block_output(layer, h, kw)[0] for h, kw in inputs],
                               ids, alpha)
    seen = _hessian_spy(monkeypatch)
    pruner = SparseGPTPruner("layers", SparsityPattern(), names(model), blocksize=16,
                             tokens=DriftRule(ATVConfig(alpha=alpha), MODALITIES))
    sweep(model.model.layers[:1], store, pruner, "cpu", "obs")
    q_hessian = seen[0][0]
    torch.testing.assert_close(q_hessian.double(), slow_hessian(xs, picks=picks), rtol=1e-5, atol=1e-4)
    tokens = sum(p.numel() for p in picks)
    image = sum(int((m == 1).sum()) for m in ids)
    kept = tokens - sum(int((m != 1).sum()) for m in ids)
    if alpha == 0:
        assert kept == 0
    elif alpha == 1e12:  # n_text 13 >= n_image 7: every token, SparseGPT's Hessian
        assert kept == image and torch.equal(q_hessian, plain_hessian(xs))
    else:
        assert 0 < kept < image  # a proper top-k: the test tells drift orders apart
    # one selection per block and sample: all four Hessians (q/k/v, o, gate/up, down) over the same tokens
    assert len(pruner.hessians) == 4
    assert all(f["tokens"] == tokens and f["total_tokens"] == 4 * 20 for f in pruner.hessians.values())
    block = pruner.tokens.drift.report[0]
    assert block["visual_kept"] == {"image": kept} and block["visual_tokens"] == {"image": image}
    assert block["counted_token_share"] == tokens / 80


def plain_hessian(xs):
    plain = HessianAccumulator()
    for x in xs:
        plain.add("q", x)
    return plain.hessian["q"]


def test_atv_and_atv_obs_select_the_same_tokens():
    """One rule for both pruners: on the same dense block 0 the two presets keep the same tokens."""
    _, wanda = _prune_tiny("atv")
    _, obs = _prune_tiny("atv-obs")
    assert wanda.details["atv"]["per_block"]["0"] == obs.details["atv"]["per_block"]["0"]
    assert obs.details["atv"]["alpha"] == 1.0 and obs.details["atv"]["modalities"] == "separate"


def test_atv_obs_exact_unstructured_counts_and_report():
    _, outcome = _prune_tiny("atv-obs", atv=ATVConfig(alpha=5.0))
    for r in outcome.results:
        assert r.zeros == round(0.5 * r.shape[0] * r.shape[1])
    assert outcome.achieved == 0.5
    tokens = outcome.details["sparsegpt"]["tokens"]
    assert tokens["rule"] == "atv" and tokens["kind"] == "subset"
    assert tokens["alpha"] == 5.0 and tokens["modalities"] == "separate"
    assert 0 < tokens["summary"]["token_share"] < 1 and tokens["summary"]["hessians"] == 4 * 3
    blocks = outcome.details["atv"]["per_block"]
    assert sorted(blocks) == ["0", "1", "2"] and 0 < blocks["0"]["visual_kept_share"]["image"] < 1
    for name, fact in tokens["per_hessian"].items():  # each Hessian counts its block's ATV tokens
        assert fact["token_share"] == blocks[name.split(".")[1]]["counted_token_share"]


def test_atv_obs_too_small_selection_is_damped_as_sparsegpt_damps_and_reported(monkeypatch):
    model = tiny_lm(6)
    store = capture(model, n=2)  # alpha 0: the 13 text tokens of 2 samples, 26 < 32 or 64 columns
    seen = _hessian_spy(monkeypatch)
    config = PruneConfig(method="atv-obs", sparsity=0.5, atv=ATVConfig(alpha=0.0))
    outcome = prune_decoder(model.model.layers, "layers", store, config, MODALITIES, PhaseTimer())
    tokens = outcome.details["sparsegpt"]["tokens"]
    assert tokens["summary"]["rank_bound_below_columns"] == tokens["summary"]["hessians"] == 4 * 3
    assert tokens["summary"]["raised_damping"] == 0 and not outcome.details["sparsegpt"]["raised_damping"]
    for fact in tokens["per_hessian"].values():
        assert fact["tokens"] == 26 < fact["columns"]
        assert fact["rank"] <= fact["rank_bound"] == 26 and fact["damping"] == 0.01
    assert all(b["visual_kept"] == {"image": 0} for b in outcome.details["atv"]["per_block"].values())
    hessian, dead = seen[0]
    assert int(torch.linalg.matrix_rank(hessian.double(), rtol=1e-4)) <= 26  # singular up to float32 rounding
    assert_damped_as_sparsegpt_damps(model, hessian, dead, 128, outcome.results)


# every token with weight 1 (AMIA never stops before the whole set at scale 0; floor = cap = 1) and a
# uniform allocation (the plain SparseGPT run's own sparsity_dict.yaml)
EVERY_TOKEN = {
    "das-sparsegpt": ["--sparsity_dict", "{dict}"],
    "owl-sparsegpt": ["--sparsity_dict", "{dict}"],
    "ecoflap-sparsegpt": ["--sparsity_dict", "{dict}"],
    "amia-sparsegpt": ["--amia_mmd_scale", "0"],
    "attn-sparsegpt": ["--token_weight_floor", "1", "--token_weight_cap", "1"],
    "tamp-obs": ["--sparsity_dict", "{dict}", "--amia_mmd_scale", "0"],
    "tamp-obs-attn": ["--sparsity_dict", "{dict}", "--token_weight_floor", "1", "--token_weight_cap", "1"],
}


def _entry(tree):
    if tree == "llava":
        from llava.pruners.__main__ import main
    else:
        from videollama2.pruners.__main__ import main
    return main


def _run(tree, out, *flags):
    argv = ["--nsamples", "4", "--no_eval", "--realtext_tokens", "0", "--save_model", str(out), *flags]
    assert _entry(tree)(argv) == 0
    return load_tensors(out), json.loads((out / "pruning_report.json").read_text())


@pytest.fixture(scope="module", params=["llava", "videollama2"])
def sparsegpt_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "sparsegpt"
    tensors, _ = _run(request.param, out, "--method", "sparsegpt")
    return request.param, out, tensors


# atv-obs keeps every token only where n_text >= n_visual, which the embedded calibration records are
# not (LLaVA-NeXT's image has more tokens than its question): tests/test_atv.py checks it on long questions
@pytest.mark.parametrize("method", [m for m in OBS_PRESETS if m != "atv-obs"])
def test_every_token_weight_one_uniform_equals_sparsegpt_bit_for_bit(sparsegpt_run, method, tmp_path):
    tree, reference_dir, reference = sparsegpt_run
    flags = [f.format(dict=reference_dir / "sparsity_dict.yaml") for f in EVERY_TOKEN[method]]
    tensors, report = _run(tree, tmp_path / method, "--method", method, *flags)
    assert report["options"]["resolved_method"] == method
    assert tensors.keys() == reference.keys()
    for key in reference:
        assert torch.equal(tensors[key], reference[key]), f"{tree} {method}: {key} differs"
    tokens = report["sparsegpt"].get("tokens")
    if PRESETS[method][2] != "all":
        assert tokens["summary"]["token_share"] == 1.0
        assert tokens["summary"].get("effective_token_share", 1.0) == 1.0


def test_public_flags_map_sparsegpt_with_amia_onto_the_presets():
    from mmprune.run.cli import resolve_method

    def resolved(**flags):
        args = dict(method=None, prune_method="sparsegpt", token_selection="amia", score_method=None)
        return resolve_method(type("Args", (), {**args, **flags})())

    assert resolved() == ("amia-sparsegpt", None, None)
    assert resolved(score_method="density_sum") == ("tamp-obs", None, None)
    assert resolved(score_method="outlier_sum") == ("amia-sparsegpt", "owl", None)
    assert resolved(token_selection="naive", score_method="density_sum") == ("sparsegpt", "das", None)
    with pytest.raises(UserInputError, match="--token_selection amia applies to"):
        resolved(prune_method="magnitude")


@pytest.mark.parametrize("flags,needle", [
    (["--token_weight_floor", "0"], "--token_weight_floor"),
    (["--token_weight_floor", "2", "--token_weight_cap", "1"], "--token_weight_cap"),
    (["--amia_mmd_scale", "-1"], "--amia_mmd_scale"),
])
def test_bad_token_flags_give_one_error_line(flags, needle, tmp_path, capsys):
    from llava.pruners.__main__ import main
    from mmprune.base.entry import run_main

    out = tmp_path / "out"
    assert run_main(main, ["--method", "tamp-obs", "--save_model", str(out), "--no_eval", *flags]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
    assert not out.exists()


@pytest.mark.parametrize("tree,folder", [("llava", "scripts/prune"), ("videollama2", "scripts_videollama2/prune")])
def test_every_preset_has_its_two_line_script(tree, folder):
    for method in OBS_PRESETS:
        lines = (ROOT / folder / f"{method}.sh").read_text().splitlines()
        assert lines[-2:] == ['source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"', f'prune_main {method} "$@"']


@pytest.mark.parametrize("script,args", [("scripts/prune/tamp-obs.sh", ["0.5"]),
                                         ("scripts_videollama2/prune/amia-sparsegpt.sh", ["0.5", "2:4"])])
def test_scripts_run_on_the_embedded_defaults(script, args, tmp_path):
    out = tmp_path / "out"
    run_bash(ROOT / script, *args, "--no_eval", "--realtext_tokens", "0",
             env={"OUTPUT_DIR": str(out), "NSAMPLES": "8"})
    report = json.loads((out / "pruning_report.json").read_text())
    assert abs(report["achieved_sparsity"] - 0.5) <= 1e-3
    assert "tokens" in report["sparsegpt"]
    if "2:4" in args:
        pruned = [t for k, t in load_tensors(out).items() if k.startswith("model.layers.") and k.endswith("proj.weight")]
        assert pruned and all(nm_pattern_holds(t, 2, 4) for t in pruned)
