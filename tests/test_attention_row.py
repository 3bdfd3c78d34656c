import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from mmprune.prune.attention import last_token_attention
from mmprune.prune.calibration import capture_block_inputs


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_single_row_equals_last_row_of_full_attention(kv_heads):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=5e5)
    config._attn_implementation = "eager"
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 50, (1, 23))
    with torch.no_grad():
        full = model(input_ids=ids, output_attentions=True).attentions
    store = capture_block_inputs(model.layers[0], lambda s: model(input_ids=s), [ids], lambda s: torch.zeros(s.shape[1]))
    hidden, kwargs = store.inputs(0, "cpu")
    row = last_token_attention(model.layers[0], hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"))
    expected = full[0][0, :, -1, :].mean(dim=0)
    assert row.shape == (23,)
    assert torch.allclose(row, expected, atol=1e-6)
    assert float(row.sum()) == pytest.approx(1.0, abs=1e-5)


def test_keys_from_the_forward_give_the_same_row():
    """The pruner hands in k_proj's output from the block's forward instead of recomputing it."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 50, (1, 17))
    store = capture_block_inputs(model.layers[0], lambda s: model(input_ids=s), [ids], lambda s: torch.zeros(s.shape[1]))
    hidden, kwargs = store.inputs(0, "cpu")
    block = model.layers[0]
    with torch.no_grad():
        keys = block.self_attn.k_proj(block.input_layernorm(hidden)).reshape(17, -1)
    recomputed = last_token_attention(block, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"))
    reused = last_token_attention(block, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), keys)
    assert torch.equal(recomputed, reused)
    wrong = last_token_attention(block, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), keys.flip(0))
    assert not torch.allclose(recomputed, wrong)
