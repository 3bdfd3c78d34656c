"""A model placed by accelerate with some decoder blocks offloaded (to disk through `dispatch_model`,
to a CPU store through `cpu_offload`) prunes block by block to exactly what the plain model gives,
and stays offloaded: the hooks then serve the pruned weights."""

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from transformers import LlavaNextForConditionalGeneration

from fixtures_llava import build_tiny_llava_next, write_image_data
from llava.convert import load_llava_next
from llava.data import encode_record, load_records, model_inputs
from llava.model import MODALITY_NAMES, capture_decoder_inputs, decoder_layers
from mmprune.prune.driver import block_linears
from mmprune.place.offload import materialized
from mmprune.prune.pipeline import PhaseTimer, PruneConfig, prune_decoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    path = build_tiny_llava_next(root / "model")
    data = root / "data"
    write_image_data(data, [(40, 56), (56, 56), (28, 28)], task_split=False)
    return root, path, data


def _prune(model, processor, data, method):
    records = load_records(data / "data.json")
    samples = [encode_record(processor, r, data, with_answer=True) for r in records]
    prefix, layers = decoder_layers(model)
    store = capture_decoder_inputs(model, iter(samples), "cpu", "cpu", len(samples))
    prune_decoder(layers, prefix, store, PruneConfig(method=method, sparsity=0.5), MODALITY_NAMES, PhaseTimer())
    return layers, samples


def _weights(layers):
    out = {}
    for i, block in enumerate(layers):
        with materialized(block, "cpu", keep_changes=False):
            for rel, linear in block_linears(block).items():
                out[f"{i}.{rel}"] = linear.weight.detach().clone()
    return out


@pytest.mark.parametrize("method", ["tamp", "sparsegpt"])
@pytest.mark.parametrize("placement", ["disk", "cpu"])
def test_offloaded_blocks_prune_like_the_plain_model(tiny, method, placement):
    root, path, data = tiny
    plain, processor = load_llava_next(path, dtype=torch.float32)
    expected_layers, samples = _prune(plain, processor, data, method)
    expected = _weights(expected_layers)

    model, _ = load_llava_next(path, dtype=torch.float32)
    prefix, layers = decoder_layers(model)
    if placement == "disk":
        device_map = {"": "cpu", f"{prefix}.1": "disk", f"{prefix}.2": "disk"}
        model = dispatch_model(model, device_map=device_map, offload_dir=str(root / f"offload-{method}"))
    else:
        cpu_offload(layers[1], execution_device="cpu")
        cpu_offload(layers[2], execution_device="cpu")
    assert layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    _prune(model, processor, data, method)

    got = _weights(layers)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name] == 0, expected[name] == 0), f"{name}: masks differ"
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    # still offloaded, and the hooks hand the pruned weights to a normal forward
    assert layers[2].mlp.down_proj.weight.device.type == "meta"
    assert not torch.equal(expected["1.self_attn.q_proj"], plain_dense_q(path))
    with torch.no_grad():
        ours = model(**model_inputs(samples[0]), use_cache=False).logits
        reference = plain(**model_inputs(samples[0]), use_cache=False).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def plain_dense_q(path):
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return decoder_layers(model)[1][1].self_attn.q_proj.weight.detach()


def test_materialized_block_runs_on_the_pruning_device():
    """A block offloaded for one execution device (here "meta", standing in for the CPU store of
    a model pruned on a GPU) runs on the device it is materialized on, then goes back."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    expected = block(x)
    cpu_offload(block, execution_device=torch.device("meta"))
    assert block[0].weight.device.type == "meta"
    with materialized(block, "cpu", keep_changes=False):
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert block[0].weight.device.type == "meta"
    offloading = [m._hf_hook for m in block.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    assert offloading and all(h.execution_device == torch.device("meta") for h in offloading)
