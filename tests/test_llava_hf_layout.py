"""Every LLaVA-NeXT checkpoint the project writes names its weights as the hub's llava-hf checkpoints do.

Where the rule comes from: transformers reads a llava-hf checkpoint through its checkpoint conversion
mapping (transformers/conversion_mapping.py): the entry `llava_next` moves `language_model.lm_head` to
`lm_head`, `language_model.model` to `model.language_model`, and `vision_tower`,
`multi_modal_projector`, `image_newline` under `model.`; the entry `CLIPVisionModel`
(`PrefixChange(prefix_to_remove="vision_model")`) drops the CLIP tower's `vision_model.` (transformers
>= 5.6 builds the tower without that level). The llava-hf releases' index files (e.g.
llava-hf/llava-v1.6-mistral-7b-hf, model.safetensors.index.json) accordingly list
`language_model.model.layers.0.self_attn.q_proj.weight`, `language_model.lm_head.weight`,
`vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight`, `multi_modal_projector.linear_1.weight`,
`image_newline`; vLLM's LLaVA-NeXT loader needs `vision_tower.vision_model.*` too. transformers 5.x's
own `save_pretrained` of a model built from its config writes `vision_tower.embeddings.*` instead,
which vLLM refuses; these tests fail if that layout comes back.

`expected_keys(config)` turns the runtime names of a model built from the config alone into the
llava-hf names with LOAD_RULES read backwards (each runtime prefix has one rule), then every saved
checkpoint's key set must equal it, and transformers must load it with no missing or unexpected key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

from llava.embedded import layout

# llava-hf checkpoint prefix -> runtime prefix, the renames transformers' loading applies (see above)
LOAD_RULES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)


def expected_keys(config) -> set[str]:
    """The llava-hf key set of a LLaVA-NeXT of `config` (tied copies are not stored)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    runtime = remove_tied_weights_from_state_dict(model.state_dict(), model)
    keys = set()
    for name in runtime:
        (saved, prefix), = [(s, r) for s, r in LOAD_RULES if name.startswith(r)]
        keys.add(saved + name[len(prefix):])
    assert len(keys) == len(runtime)
    return keys


def saved_keys(folder: Path) -> set[str]:
    keys = set()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():  # the index names exactly the stored keys
        assert set(json.loads(index.read_text())["weight_map"]) == keys
    return keys


def assert_llava_hf_layout(folder: Path, reference: LlavaNextForConditionalGeneration | None = None) -> None:
    config = AutoConfig.from_pretrained(folder)
    keys = saved_keys(folder)
    assert keys == expected_keys(config), (sorted(keys - expected_keys(config))[:5],
                                            sorted(expected_keys(config) - keys)[:5])
    assert not any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") for k in keys)
    loaded, info = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if reference is not None:
        expected, got = reference.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k].float(), got[k]) for k in expected)


def test_the_rules_name_every_weight_once():
    """A hand-checked case: the tiny model's config gives the names of the llava-hf index files."""
    keys = expected_keys(AutoConfig.from_pretrained(layout.CHECKPOINT_DIR))
    assert {"image_newline", "language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
            "language_model.model.norm.weight", "multi_modal_projector.linear_1.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
            "vision_tower.vision_model.pre_layrnorm.weight", "vision_tower.vision_model.post_layernorm.bias",
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "language_model.model.layers.0.self_attn.q_proj.weight"} <= keys


def test_transformers_own_save_is_not_the_llava_hf_layout(tmp_path):
    """Why the project names the weights itself: the flat CLIP names of transformers 5.x's save."""
    config = AutoConfig.from_pretrained(layout.CHECKPOINT_DIR)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    from transformers.core_model_loading import revert_weight_conversion

    own = set(revert_weight_conversion(model, model.state_dict()))
    from llava.adapter import llava_hf_name

    assert {llava_hf_name(n) for n in model.state_dict()} == expected_keys(config) | (
        {"language_model.lm_head.weight"} if config.tie_word_embeddings else set())
    if own != expected_keys(config):  # transformers 5.x: flat tower names
        assert any(k.startswith("vision_tower.embeddings.") for k in own)


def test_committed_tiny_checkpoint():
    assert_llava_hf_layout(layout.CHECKPOINT_DIR)


def test_assembled_smol_checkpoint():
    if not (layout.SMOL_CHECKPOINT_DIR / "assembly.json").is_file():
        pytest.skip("the SmolLM2 model is assembled by `make setup`")
    keys = saved_keys(layout.SMOL_CHECKPOINT_DIR)
    assert keys == expected_keys(AutoConfig.from_pretrained(layout.SMOL_CHECKPOINT_DIR))


@pytest.mark.parametrize("placed", [False, True])
def test_adapter_save_writes_the_llava_hf_layout(tmp_path, placed):
    """The pruners' save (llava.adapter.save), for a model in memory and one offloaded to disk, sharded."""
    from llava.adapter import save
    from llava.convert import load_llava_next

    reference = LlavaNextForConditionalGeneration.from_pretrained(layout.CHECKPOINT_DIR, dtype=torch.float32)
    device_map = None
    if placed:
        device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
                      "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
                      "model.language_model.norm": "cpu", "model.language_model.layers": "disk", "lm_head": "disk"}
    model, processor = load_llava_next(layout.CHECKPOINT_DIR, dtype=torch.float32, device_map=device_map,
                                       offload_folder=tmp_path / "offload" if placed else None)
    save(model, processor, tmp_path / "out", max_shard_size=400_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    assert_llava_hf_layout(tmp_path / "out", reference)
    AutoProcessor.from_pretrained(tmp_path / "out")


def test_converted_lmms_lab_checkpoint(tmp_path):
    from fixtures_llava import build_tiny_llava_next, build_tiny_lmms_lab

    from llava.convert import convert_lmms_lab_to_hf

    hf = build_tiny_llava_next(tmp_path)
    converted = convert_lmms_lab_to_hf(build_tiny_lmms_lab(hf, tmp_path / "lmms-lab"), tmp_path / "converted",
                                       max_shard_bytes=100_000)
    assert_llava_hf_layout(converted)


def test_eas_output(tmp_path):
    """An EAS model: the llava-hf names plus its adapters, without the skipped layers' attention."""
    from llava.adapter import save_weights
    from llava.eas import install

    model = LlavaNextForConditionalGeneration.from_pretrained(layout.CHECKPOINT_DIR, dtype=torch.float32)
    install(model, [1], rank=2)
    save_weights(model, tmp_path)
    keys = saved_keys(tmp_path)
    plain = expected_keys(AutoConfig.from_pretrained(layout.CHECKPOINT_DIR))
    attention = {k for k in plain if k.startswith("language_model.model.layers.1.self_attn.")}
    adapters = {k for k in keys if ".eas_pia." in k}
    assert attention and adapters
    assert keys == (plain - attention) | adapters
    assert all(k.startswith("language_model.model.layers.1.eas_pia.") for k in adapters)
