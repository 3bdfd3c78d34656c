"""Tiny offline VideoLLaMA2-AV fixtures (docs/models.md section 3), shared by the tests.

`build_tiny_videollama2(dir)` writes a random-weight model of the released architecture in the
released key layout (sharded safetensors + index, SigLIP under `vision_model.`, BEATs' shared
relative-position table, unused SigLIP head and BEATs predictor) with a word-level tokenizer
carrying a Qwen2-style chat template:

- Qwen2 hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads;
- SigLIP 70x70 frames, 14-px patches (5x5 patches, an odd grid), width 32, 2 layers;
- STC depth 1, 32 -> 64; 4 frames -> Conv3d(2,2,2) -> 2 x 2 x 2 = 8 video tokens;
- BEATs embed 16, width 32, 2 layers, 2 heads, FFN 64, conv_pos 16 with 4 groups, 32 buckets;
  0.55 s of audio -> 53 frames -> 3 x 8 = 24 audio tokens; audio MLP 32 -> 64 -> 64.

`write_clip(path, ...)` writes a short synthetic mp4 (with or without an audio track),
`write_wav(path, ...)` a wav file and `write_clip_data` a calibration folder of such clips. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from videollama2.checkpoint import save_model
from videollama2.config import VideoLLaMA2Config
from videollama2.embedded import synthetic_av, tiny
from videollama2.model import VideoLLaMA2ForCausalLM

VIDEO_TOKENS = 8
AUDIO_TOKENS = 24


def tiny_config_dict(tokenizer, tie_word_embeddings: bool = False) -> dict:
    raw = tiny.build_config(tokenizer).raw
    raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, hidden_size_a=64, num_frames=4, stc_depth=1,
               audio_seconds=0.55, audio_clips=8, audio_clip_seconds=0.0625,
               tie_word_embeddings=tie_word_embeddings)
    raw["vision_config"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=70, patch_size=14, num_channels=3, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6)
    raw["mm_hidden_size"] = 32
    raw["audio_config"] = dict(embed_dim=16, encoder_embed_dim=32, encoder_layers=2, encoder_attention_heads=2,
                               encoder_ffn_embed_dim=64, conv_pos=16, conv_pos_groups=4, num_buckets=32,
                               max_distance=64)
    raw["mm_hidden_size_a"] = 32
    return raw


def build_tiny_model(seed: int = 0, tie_word_embeddings: bool = False):
    tokenizer = tiny.build_tokenizer()
    torch.manual_seed(seed)
    config = VideoLLaMA2Config(tiny_config_dict(tokenizer, tie_word_embeddings), "fixture")
    model = VideoLLaMA2ForCausalLM(config, vision_head=True, audio_predictor=True)
    with torch.no_grad():  # make every parameter distinct from its init (LayerNorms, gates, ...)
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval(), tokenizer


def build_tiny_videollama2(folder, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """With tie_word_embeddings the LM head is the input embedding, saved once (as SmolLM2's)."""
    folder = Path(folder)
    model, tokenizer = build_tiny_model(seed, tie_word_embeddings)
    save_model(model, folder, max_shard_bytes=200_000)
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
    return folder


def clip_arrays(seed: int = 0):
    spec = synthetic_av.draw_clip_spec(random.Random(seed), seed)
    return spec, synthetic_av.render_frames(spec), synthetic_av.render_audio(spec)


def write_clip(path, seed: int = 0, with_audio: bool = True):
    spec, frames, audio = clip_arrays(seed)
    Path(path).write_bytes(synthetic_av.encode_mp4(frames, audio if with_audio else None))
    return spec


def write_wav(path, seconds: float = 1.0, rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    import soundfile

    rng = np.random.default_rng(seed)
    data = (0.3 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    soundfile.write(str(path), data, rate, subtype="FLOAT")
    return data


def write_clip_data(data: Path, n: int, question: str, separate_audio: bool = False) -> None:
    """A calibration folder in `data`: clips clip{i}.mp4 (seed i) and data.json with a record per clip
    (`question` about it, answer "hum", audio from the clip's track); with `separate_audio` the last
    clip has no audio track and its record's audio is a wav file beside it."""
    data.mkdir()
    records = []
    for i in range(n):
        name = f"clip{i}.mp4"
        separate = separate_audio and i == n - 1
        write_clip(data / name, seed=i, with_audio=not separate)
        record = {"id": i, "video": name, "audio": name, "conversations": [
            {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": "hum"}]}
        if separate:
            write_wav(data / f"clip{i}.wav", seconds=1.0)
            record["audio"] = f"clip{i}.wav"
        records.append(record)
    (data / "data.json").write_text(json.dumps(records))
