"""VideoLLaMA2-AV model code: released key names, checkpoint round trips, splicing and modality ids."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_videollama2 import AUDIO_TOKENS, VIDEO_TOKENS, build_tiny_model, build_tiny_videollama2
from mmprune.base.errors import UserInputError
from videollama2.beats import relative_position_buckets
from videollama2.checkpoint import save_model
from videollama2.adapter import load_videollama2
from videollama2.model import AUDIO, IGNORE_INDEX, TEXT, VIDEO, VIDEO_TOKEN_INDEX
from videollama2.stc import STCConnector

RELEASED_KEYS = [
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
    "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc2.bias",
    "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
    "model.vision_tower.vision_tower.vision_model.head.probe",
    "model.mm_projector.s1.b1.conv1.conv.weight", "model.mm_projector.s1.b1.conv1.bn.weight",
    "model.mm_projector.s1.b1.conv2.conv.weight", "model.mm_projector.s1.b1.se.fc1.weight",
    "model.mm_projector.s1.b1.se.fc2.bias", "model.mm_projector.s1.b1.conv3.bn.bias",
    "model.mm_projector.s1.b1.downsample.conv.weight", "model.mm_projector.s1.b1.downsample.bn.weight",
    "model.mm_projector.sampler.0.weight", "model.mm_projector.sampler.0.bias",
    "model.mm_projector.s2.b1.conv2.bn.weight", "model.mm_projector.readout.0.weight",
    "model.mm_projector.readout.2.bias",
    "model.audio_tower.patch_embedding.weight", "model.audio_tower.layer_norm.weight",
    "model.audio_tower.post_extract_proj.weight", "model.audio_tower.encoder.pos_conv.0.weight_g",
    "model.audio_tower.encoder.pos_conv.0.weight_v", "model.audio_tower.encoder.pos_conv.0.bias",
    "model.audio_tower.encoder.layer_norm.weight",
    "model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight",
    "model.audio_tower.encoder.layers.1.self_attn.grep_a",
    "model.audio_tower.encoder.layers.1.self_attn.grep_linear.weight",
    "model.audio_tower.encoder.layers.1.self_attn.k_proj.bias",
    "model.audio_tower.encoder.layers.1.self_attn.out_proj.weight",
    "model.audio_tower.encoder.layers.0.self_attn_layer_norm.weight",
    "model.audio_tower.encoder.layers.0.fc1.weight", "model.audio_tower.encoder.layers.0.final_layer_norm.bias",
    "model.audio_tower.predictor.weight",
    "model.mm_projector_a.0.weight", "model.mm_projector_a.2.bias",
]
RELEASED_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.",
                     "model.vision_tower.vision_tower.vision_model.", "model.mm_projector.",
                     "model.audio_tower.", "model.mm_projector_a.")


def shard_tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_videollama2(tmp_path_factory.mktemp("vl2") / "tiny")


def sample_inputs(seed=0, placeholder_at=5, length=12):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (1, length), generator=generator)
    ids[0, placeholder_at] = VIDEO_TOKEN_INDEX
    video = torch.randn(1, 4, 3, 70, 70, generator=generator)
    audio = torch.randn(1, 53, 128, generator=generator) * 3 + 5
    return ids, video, audio


def test_saved_checkpoint_uses_the_released_key_names(checkpoint):
    tensors = shard_tensors(checkpoint)
    missing = [k for k in RELEASED_KEYS if k not in tensors]
    assert not missing, missing
    assert all(k.startswith(RELEASED_PREFIXES) for k in tensors), [k for k in tensors if not k.startswith(RELEASED_PREFIXES)]
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1
    # BEATs shares layer 0's relative position table: stored once
    assert not any("layers.1.self_attn.relative_attention_bias" in k for k in tensors)


def test_round_trip_reloads_identical_outputs_and_files(checkpoint, tmp_path):
    model, tokenizer = load_videollama2(checkpoint)
    again, _ = load_videollama2(checkpoint)
    ids, video, audio = sample_inputs()
    with torch.no_grad():
        assert torch.equal(model(ids, video=video, audio=audio).logits, again(ids, video=video, audio=audio).logits)
    out = tmp_path / "resaved"
    save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in checkpoint.iterdir())
    before, after = shard_tensors(checkpoint), shard_tensors(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert json.loads((out / "config.json").read_text()) == json.loads((checkpoint / "config.json").read_text())
    assert (out / "model.safetensors.index.json").read_text() == (checkpoint / "model.safetensors.index.json").read_text()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>system")


def test_released_variants_tied_tables_audio_bin_and_bf16_round_trip(checkpoint, tmp_path):
    """A checkpoint that stores BEATs' shared table in every layer, keeps BEATs in audio_tower.bin
    only, and is bf16 loads and saves back to the same files."""
    src = tmp_path / "variant"
    src.mkdir()
    tensors = {k: v.to(torch.bfloat16) for k, v in shard_tensors(checkpoint).items()}
    table = tensors["model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight"]
    tensors["model.audio_tower.encoder.layers.1.self_attn.relative_attention_bias.weight"] = table.clone()
    audio = {k: v for k, v in tensors.items() if k.startswith("model.audio_tower.")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("model.audio_tower.")}
    from safetensors.torch import save_file
    save_file(rest, str(src / "model.safetensors"), metadata={"format": "pt"})
    torch.save(audio, str(src / "audio_tower.bin"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (checkpoint / name).exists():
            (src / name).write_bytes((checkpoint / name).read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16")))
    model, _ = load_videollama2(src)
    assert model.dtype == torch.bfloat16
    out = tmp_path / "out"
    save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == rest.keys() and all(torch.equal(saved[k], rest[k]) for k in rest)
    saved_audio = torch.load(str(out / "audio_tower.bin"), weights_only=True)
    assert saved_audio.keys() == audio.keys()
    assert all(torch.equal(saved_audio[k], audio[k]) and saved_audio[k].dtype == torch.bfloat16 for k in audio)


def test_missing_weights_and_wrong_model_type_are_user_errors(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UserInputError, match="model_type"):
        load_videollama2(bad)
    with pytest.raises(UserInputError, match="does not exist"):
        load_videollama2(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    with pytest.raises(UserInputError, match="no weights"):
        load_videollama2(partial)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    first = sorted(set(index["weight_map"].values()))[0]
    (partial / first).write_bytes((checkpoint / first).read_bytes())
    with pytest.raises(UserInputError, match="does not exist"):
        load_videollama2(partial)


def test_splice_puts_video_then_audio_at_the_placeholder_with_modality_ids():
    model, _ = build_tiny_model()
    ids, video, audio = sample_inputs(placeholder_at=5, length=12)
    labels = ids.clone()
    labels[0, :8] = IGNORE_INDEX
    with torch.no_grad():
        spliced = model.embed_inputs(ids, None, labels, video, audio)
        video_tokens, audio_tokens = model.encode_video(video), model.encode_audio(audio)
    assert video_tokens.shape[1] == VIDEO_TOKENS == model.video_token_count()
    assert audio_tokens.shape[1] == AUDIO_TOKENS == model.audio_token_count()
    modality = spliced.modality_ids[0]
    expected = [TEXT] * 5 + [VIDEO] * VIDEO_TOKENS + [AUDIO] * AUDIO_TOKENS + [TEXT] * 6
    assert modality.tolist() == expected
    embeds = spliced.inputs_embeds[0]
    assert torch.equal(embeds[5:5 + VIDEO_TOKENS], video_tokens[0])
    assert torch.equal(embeds[5 + VIDEO_TOKENS:5 + VIDEO_TOKENS + AUDIO_TOKENS], audio_tokens[0])
    assert torch.equal(embeds[:5], model.model.embed_tokens(ids[0, :5]))
    assert spliced.labels[0, :5 + VIDEO_TOKENS + AUDIO_TOKENS].eq(IGNORE_INDEX).all()
    assert torch.equal(spliced.labels[0, 5 + VIDEO_TOKENS + AUDIO_TOKENS:], labels[0, 6:])


def test_batched_forward_matches_single_samples_with_padding():
    model, _ = build_tiny_model()
    a_ids, video, audio = sample_inputs(0, 3, 10)
    b_ids, video2, audio2 = sample_inputs(1, 6, 14)
    ids = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    ids[0, :10], mask[0, :10] = a_ids[0], 1
    ids[1], mask[1] = b_ids[0], 1
    with torch.no_grad():
        batch = model(ids, mask, torch.cat([video, video2]), torch.cat([audio, audio2])).logits
        single_a = model(a_ids, video=video, audio=audio).logits
        single_b = model(b_ids, video=video2, audio=audio2).logits
    n = single_a.shape[1]
    torch.testing.assert_close(batch[0, :n], single_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1], single_b[0], atol=1e-5, rtol=1e-4)


def test_placeholder_errors():
    model, _ = build_tiny_model()
    ids, video, audio = sample_inputs()
    with pytest.raises(UserInputError, match="placeholder"):
        model.embed_inputs(ids.clamp_min(0), None, None, video, audio)
    with pytest.raises(UserInputError, match="no video or audio"):
        model.embed_inputs(ids, None, None, None, None)


def test_relative_position_buckets_reference_values():
    # BEATs default: 320 buckets (160 per direction, 80 exact), max distance 800
    buckets = relative_position_buckets(1, 1200, 320, 800)[0]
    assert buckets[0] == 0 and buckets[1] == 161 and buckets[79] == 160 + 79
    assert buckets[80] == 160 + 80 and buckets[800] == 319 and buckets[1199] == 319
    reverse = relative_position_buckets(1200, 1, 320, 800)[:, 0]
    assert reverse[1] == 1 and reverse[80] == 80 and reverse[1199] == 159
    assert (buckets[1:].diff() >= 0).all()


def test_stc_grid_floors_odd_sizes():
    stc = STCConnector(8, 16, depth=1, padding=0)
    assert stc.output_grid(16, 27) == (8, 13, 13)  # the released model: 1352 tokens for 16 frames
    assert stc.token_count(16, 27 * 27) == 1352 and stc.token_count(8, 27 * 27) == 676
    assert stc(torch.randn(1, 4, 25, 8)).shape == (1, 8, 16)
    assert STCConnector(8, 16, depth=1, padding=1).output_grid(16, 27) == (9, 14, 14)
