"""A Llama decoder in VideoLLaMA2's Qwen2 form gives Llama's logits, and tied embeddings survive
the released checkpoint layout."""

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fixtures_videollama2 import tiny_config_dict
from videollama2.checkpoint import save_model
from videollama2.config import VideoLLaMA2Config
from videollama2.embedded import tiny
from videollama2.llama_decoder import qwen2_fields_from_llama, qwen2_state_from_llama
from videollama2.model import VideoLLaMA2ForCausalLM


def smol_shaped_llama(seed=0):
    # SmolLM2's traits at toy size: GQA, tied embeddings, RoPE base 1e5, RMSNorm eps 1e-5
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=39, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # norms away from 1, so a mixed-up weight would show
            param.add_(0.05 * torch.randn_like(param))
    return model


def av_model_with(llama):
    raw = tiny_config_dict(tiny.build_tokenizer())
    raw.update(qwen2_fields_from_llama(llama.config))
    raw["hidden_size_a"] = llama.config.hidden_size
    model = VideoLLaMA2ForCausalLM(VideoLLaMA2Config(raw, "test"))
    state = qwen2_state_from_llama(llama.state_dict(), llama.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(not k.startswith("model.layers.") and k != "model.embed_tokens.weight" for k in missing)
    return model.eval()


def test_qwen2_form_gives_llamas_logits_and_ties_survive_save_and_reload(tmp_path):
    llama = smol_shaped_llama()
    model = av_model_with(llama)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 39, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())

    save_model(model, tmp_path / "av", max_shard_bytes=100_000)
    keys = set(json.loads((tmp_path / "av" / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" not in keys and "model.layers.0.self_attn.q_proj.bias" in keys
    reloaded = VideoLLaMA2ForCausalLM.from_pretrained(tmp_path / "av")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, got)
