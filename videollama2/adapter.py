"""VideoLLaMA2's adapter for the core (mmprune.base.adapters), registered for model_type
`videollama2_qwen2`: load, decoder blocks, calibration capture, modality labels (text, video, audio),
the model from its config alone, and save in the released layout. Registered through the
`mmprune.adapters` entry point (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

from mmprune.base.adapters import ModelAdapter, register
from mmprune.place.offload import is_dispatched
from videollama2.checkpoint.loading import load_tokenizer
from videollama2.checkpoint.reading import optional_modules
from videollama2.checkpoint.saving import save_model
from videollama2.config import VideoLLaMA2Config
from videollama2.model import MODALITY_NAMES, VideoLLaMA2ForCausalLM, decoder_layers
from videollama2.pruning import capture_decoder_inputs


def empty_model(model_path: Path) -> VideoLLaMA2ForCausalLM:
    """The model of a checkpoint folder's config (and which optional heads its weights hold), for the
    planner (call under init_empty_weights)."""
    return VideoLLaMA2ForCausalLM(VideoLLaMA2Config.from_dir(model_path), **optional_modules(model_path))


def load_videollama2(model_path, dtype="auto", device="cpu", **placement):
    """(model, tokenizer); `placement`: device_map, offload_dir, main_device (videollama2.checkpoint.load_model)."""
    model = VideoLLaMA2ForCausalLM.from_pretrained(model_path, dtype=dtype, device=device, **placement)
    return model, load_tokenizer(model_path)


def save(model, tokenizer, folder, max_shard_size=None, final_dir=None) -> None:
    """The released layout (the source's files kept unless max_shard_size re-shards); the tokenizer and
    side files are copied by save_model from the source checkpoint."""
    size = {"max_shard_bytes": max_shard_size, "keep_layout": False} if max_shard_size else {}
    save_model(model if is_dispatched(model) else model.to("cpu"), folder, final_dir=final_dir, **size)


ADAPTER = register(ModelAdapter(
    model_type="videollama2_qwen2", family="VideoLLaMA2", modality_names=MODALITY_NAMES, load=load_videollama2,
    decoder_blocks=decoder_layers, capture=capture_decoder_inputs, empty_model=empty_model, save=save,
))
