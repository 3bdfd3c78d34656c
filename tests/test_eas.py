"""EAS (mmprune/skip/eas.py, llava/eas): adapter math against slow versions, fused == unfused, the
search policy, and save/reload of a model with skipped attention on the embedded LLaVA-NeXT."""

import json
import math

import pytest
import torch
from near_ties import greedy_agreement

from mmprune.skip import eas
from mmprune.base.errors import UserInputError


def _random_pia(dim=8, rank=4, seed=0, scale=1.0):
    torch.manual_seed(seed)
    pia = eas.PIA(dim, rank, groups=2, tau=10.0, scale=scale).eval()
    with torch.no_grad():
        for p in pia.parameters():
            p.normal_(0, 0.5)
    return pia


def _slow_pia(pia, u, mask):
    """The formulas of the spec, token by token, with explicit block-diagonal matrices."""
    B_full, D_full = eas.block_diagonal(pia.B_weight), eas.block_diagonal(pia.D_weight)
    out = torch.empty_like(u)
    for b in range(u.shape[0]):
        rows = [u[b, t] for t in range(u.shape[1]) if mask[b, t]]
        pooled = sum(rows) / len(rows)
        w = torch.softmax((pia.router_weight @ pooled + pia.router_bias) / pia.tau, dim=0)
        g = pia.A_weight @ pooled + pia.A_bias
        for t in range(u.shape[1]):
            z = 0.5 * (g + pia.C_weight @ u[b, t] + pia.C_bias)
            out[b, t] = u[b, t] + pia.scale * (w[0] * (B_full @ z + pia.B_bias) + w[1] * (D_full @ z + pia.D_bias))
    return out


def test_masked_mean_matches_loop():
    u = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.stack([u[b][mask[b]].mean(0) for b in range(2)])
    assert torch.allclose(eas.masked_mean(u, mask), expected, atol=1e-6)
    assert torch.allclose(eas.masked_mean(u, None), u.mean(1), atol=1e-6)


def test_block_diagonal_exact():
    grouped = torch.arange(8.0).reshape(2, 2, 2)
    assert eas.block_diagonal(grouped).tolist() == [[0, 1, 0, 0], [2, 3, 0, 0], [0, 0, 4, 5], [0, 0, 6, 7]]


def test_pia_forward_matches_slow_version():
    pia = _random_pia(scale=0.7)
    u = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    w, g = pia.route(u, mask)
    assert torch.allclose(pia(u, w, g), _slow_pia(pia, u, mask), atol=1e-5)


def test_pia_starts_as_identity():
    pia = eas.PIA(8, 4).eval()
    u = torch.randn(1, 3, 8)
    w, g = pia.route(u, None)
    assert torch.equal(pia(u, w, g), u)


def test_affine_form_and_fold_are_exact():
    pia = _random_pia(dim=8, rank=4, scale=1.3)
    u = torch.randn(2, 5, 8)
    w, g = pia.route(u, None)
    U, beta = pia.affine(w, g)
    M = torch.eye(8) + U @ pia.C_weight  # (B, d, d)
    affine = torch.einsum("bij,blj->bli", M, u) + beta[:, None]
    assert torch.allclose(pia(u, w, g), affine, atol=1e-5)
    weight, bias, gamma = torch.randn(6, 8), torch.randn(6), torch.randn(8)
    folded, folded_bias = eas.fold_linear(weight, bias, gamma, U, pia.C_weight, beta)
    expected = torch.nn.functional.linear(gamma * pia(u, w, g), weight, bias)
    got = torch.einsum("bmd,bld->blm", folded, u) + folded_bias[:, None]
    assert torch.allclose(got, expected, atol=1e-4)
    assert folded.shape == (2, 6, 8)


def test_prompt_pool_mask_exact():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, -100, -100]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    mask = eas.prompt_pool_mask(5, 2, attention, labels)
    assert mask.int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_reinforce_update_matches_loop_and_values():
    theta = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    configs, losses, eta = [[0, 1], [1, 2], [0, 2]], [0.2, 1.0, 0.5], 2.0
    new = eas.reinforce_update(theta, configs, losses, eta)
    p = [1 / (1 + math.exp(-t)) for t in theta.tolist()]
    rewards = [math.exp(-l) for l in losses]
    mean = sum(rewards) / 3
    slow = theta.tolist()
    for config, reward in zip(configs, rewards):
        for i in config:
            slow[i] += eta * (reward - mean) * p[i] * (1 - p[i])
    assert new.tolist() == pytest.approx(slow, abs=1e-12)
    # config 0 (layers 0, 1) had the lowest loss: layer 0 gains, layer 2 (two worse configs) loses
    assert new[0] > theta[0] and new[2] < theta[2]


def test_sample_skip_set_distinct_and_respects_zero_probability():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.5, 0.5])
    for _ in range(50):
        picks = eas.sample_skip_set(probs, 3, gen)
        assert picks == [0, 2, 3]


def test_ramp_and_resolve_k():
    assert [eas.ramp_k(s, 10, 4) for s in (0, 3, 4, 9, 10, 50)] == [1, 1, 2, 3, 4, 4]
    assert eas.ramp_k(0, 0, 3) == 3
    assert eas.resolve_k(0.5, 32) == 16 and eas.resolve_k(0.25, 4) == 1 and eas.resolve_k(2, 4) == 2
    for bad in (4, 0.1, 1.5):
        with pytest.raises(UserInputError):
            eas.resolve_k(bad, 4)


def test_search_finds_the_cheapest_layers():
    """Validation loss = cost of the skipped candidates: the policy must settle on the two cheapest."""
    cost = {1: 0.9, 2: 0.05, 3: 0.6, 4: 0.1, 5: 0.8}
    seen = []

    def train_step(skip, step):
        seen.append(skip)
        return 0.0

    cfg = eas.SearchConfig(k=2, steps=300, warmup=20, nas_turn=1, nas_samples=5, eta=20.0, seed=1)
    result = eas.search_skip_set(list(cost), cfg, train_step, lambda skip: sum(cost[i] for i in skip), progress=False)
    assert result.skip == [2, 4]
    assert [len(s) for s in seen[:20:5]] == [1, 1, 1, 1] and len(seen[-1]) == 2  # K ramps 1 -> 2
    assert result.probs[2] > result.probs[1] and result.probs[4] > result.probs[5]


# ------------------------------------------------------------------- embedded LLaVA-NeXT


@pytest.fixture(scope="module")
def embedded_model():
    from llava.convert import load_llava_next
    from llava.embedded import paths

    torch.set_num_threads(1)
    return load_llava_next(paths.CHECKPOINT_DIR)


def _eas_model(embedded_model, skipped=(2, 3)):
    import copy

    from llava import eas as leas

    model, processor = embedded_model
    model = copy.deepcopy(model)
    leas.install(model, list(skipped), rank=32)
    torch.manual_seed(0)
    _, layers = __import__("llava.model", fromlist=["decoder_layers"]).decoder_layers(model)
    with torch.no_grad():
        for p in eas.adapter_parameters(layers):
            p.normal_(0, 0.05)
    leas.write_settings(model, skipped, 32, 2, 10.0, 1.0)
    return model.eval(), processor


def _inputs(processor, n=2, with_answer=True):
    from llava.data import encode_record, load_records, model_inputs
    from llava.embedded import paths

    records = load_records(paths.EVAL_DATA_PATH)[:n]
    return [encode_record(processor, r, paths.EVAL_IMAGE_FOLDER, with_answer=with_answer,
                          add_generation_prompt=not with_answer) for r in records]


@torch.no_grad()
def test_fused_and_unfused_give_the_same_outputs(embedded_model):
    from llava.data import model_inputs

    model, processor = _eas_model(embedded_model)
    for encoded in _inputs(processor):
        inputs = model_inputs(encoded)
        model.eas_state.fuse = True
        fused = model(**inputs).logits
        assert all(r[2] is not None for r in model.eas_state.routes.values())  # the fused path ran
        model.eas_state.fuse = False
        unfused = model(**inputs).logits
        assert all(r[2] is None for r in model.eas_state.routes.values())
        assert torch.allclose(fused, unfused, atol=1e-4), (fused - unfused).abs().max()
    for encoded in _inputs(processor, with_answer=False):
        outputs = []
        for fuse in (True, False):
            model.eas_state.fuse = fuse
            outputs.append(model.generate(**model_inputs(encoded), max_new_tokens=6, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True))
        # the same tokens, unless rounding swaps two logits within the 1e-4 the two paths agree to
        prompt = encoded["input_ids"].shape[1]
        fused, unfused = (o.sequences[0, prompt:].tolist() for o in outputs)
        agree = greedy_agreement(fused, unfused, torch.cat(outputs[1].logits), 2e-4)
        for a, b in list(zip(outputs[0].logits, outputs[1].logits))[:agree + 1]:  # same contexts
            assert torch.allclose(a, b, atol=1e-4)


@torch.no_grad()
def test_skipped_layers_drop_attention_and_decode_matches_full_pass(embedded_model):
    """Prompt prefill then cached steps give the same logits as one pass whose pooling is
    restricted to the prompt (the routes are frozen after the prefill)."""
    from llava.data import model_inputs
    from llava.model import decoder_layers

    model, processor = _eas_model(embedded_model)
    _, layers = decoder_layers(model)
    assert not hasattr(layers[2], "self_attn") and hasattr(layers[1], "self_attn")
    full = _inputs(processor, n=1)[0]
    start = int((full["labels"][0] != -100).nonzero()[0])
    prompt = {k: v[:, :start] if k in ("input_ids", "attention_mask") else v for k, v in model_inputs(full).items()}
    out = model(**prompt, use_cache=True)
    assert out.past_key_values.get_seq_length() == start
    rest = model(input_ids=full["input_ids"][:, start:], attention_mask=full["attention_mask"],
                 past_key_values=out.past_key_values, use_cache=True).logits
    # one pass with labels: pooling over the prompt (before the first label), as in training
    one_pass = model(**model_inputs(full), labels=full["labels"]).logits
    assert torch.allclose(one_pass[:, start:], rest, atol=1e-4)
    assert torch.allclose(one_pass[:, start - 1], out.logits[:, -1], atol=1e-4)


@torch.no_grad()
def test_saved_model_reloads_with_the_same_logits(embedded_model, tmp_path):
    from llava.adapter import save_weights
    from llava.data import model_inputs
    from llava.convert import load_model
    from llava.convert import load_llava_next

    model, processor = _eas_model(embedded_model)
    encoded = _inputs(processor, n=1)[0]
    before = model(**model_inputs(encoded)).logits
    save_weights(model, tmp_path)  # as scripts/eas/train.sh saves
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eas"]["skipped_layers"] == [2, 3]
    for loader in (lambda p: load_model(p, "cpu"), load_llava_next):
        reloaded, _ = loader(tmp_path)
        after = reloaded(**model_inputs(encoded)).logits
        assert torch.equal(before, after)


def test_incomplete_checkpoint_is_refused(embedded_model, tmp_path):
    from llava.adapter import save_weights
    from llava.convert import load_model

    model, processor = _eas_model(embedded_model)
    save_weights(model, tmp_path)  # as scripts/eas/train.sh saves
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["eas"]["skipped_layers"] = [1, 2, 3]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="adapters for"):
        load_model(tmp_path, "cpu")


def test_train_cli_end_to_end_and_reload(tmp_path):
    """A few steps of search and adapter training on the embedded default; the saved model loads
    through llava.eval and reproduces the logits the trainer had."""
    from llava.data import model_inputs
    from llava.eas.train import main
    from llava.convert import load_model

    out = tmp_path / "eas"
    args = ["--output_dir", str(out), "--k", "0.5", "--search_steps", "6", "--warmup_steps", "2",
            "--nas_turn", "2", "--nas_samples", "2", "--finetune_steps", "3", "--batch_size", "4",
            "--val_batches", "1", "--no_eval"]
    assert main(args) == 0
    report = json.loads((out / "eas_report.json").read_text())
    skipped = report["settings"]["skipped_layers"]
    assert len(skipped) == 2 and 0 not in skipped and report["search"]["searched"]
    assert len(report["search"]["history"]) == 2
    model, processor = load_model(out, "cpu")
    _, layers = __import__("llava.model", fromlist=["decoder_layers"]).decoder_layers(model)
    assert sorted(i for i, layer in enumerate(layers) if not hasattr(layer, "self_attn")) == skipped
    # adapters were trained: B or D moved away from their zero init
    assert any(layers[i].eas_pia.B_weight.abs().sum() > 0 for i in skipped)
    with pytest.raises(UserInputError, match="already exists"):
        main(args)


def test_train_script_refuses_existing_output_and_bad_k(tmp_path):
    import os
    import subprocess
    import sys

    from llava.embedded import paths

    env = dict(os.environ, OUTPUT_DIR=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    script = str(paths.REPO_ROOT / "scripts" / "eas" / "train.sh")
    done = subprocess.run(["bash", script, "0.5"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "already exists" in done.stderr
    done = subprocess.run(["bash", script, "half"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "is not a number" in done.stderr
