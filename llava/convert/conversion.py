"""The converter (lmms-lab checkpoint -> new llava-hf folder) and the cached conversion on load."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llava.convert.configs import (
    CLIP_MEAN,
    CLIP_STD,
    LLAMA3_LLAVA_CHAT_TEMPLATE,
    _add_llava_tokens,
    _check_supported,
    _load_tokenizer,
    _read_config,
    _resolve_vision_config,
    _text_config,
    is_lmms_lab_checkpoint,
)
from llava.convert.weights import (
    EMBED_KEY,
    LM_HEAD_KEY,
    _dtype_name,
    _grow_rows,
    _plan_weights,
    _ShardWriter,
    parse_dtype,
)
from mmprune.base.errors import UserInputError
from mmprune.base.interrupt import signals_deferred
from mmprune.base.output import check_output_location, share_tree

CONVERTER_COMMAND = "python -m llava.convert --src LMMS_LAB_DIR --dst LLAVA_HF_DIR"
PROVENANCE_FILE = "mmprune_conversion.json"
VOCAB_MULTIPLE = 64
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _source_fingerprint(src: Path) -> list[list]:
    """Names, sizes and mtimes of the source's top-level files (to recognise a cached conversion)."""
    out = []
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# conversion


def convert_lmms_lab_to_hf(src_dir, dst_dir, dtype=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a llava-hf copy of the lmms-lab LLaVA-NeXT checkpoint in src_dir to dst_dir.

    dtype: None keeps the stored dtypes; "bfloat16"/"float16"/"float32" (or a torch dtype) casts
    every floating tensor. dst_dir must not exist; it is written in a temporary directory beside
    it and renamed at the end. src_dir is only read. Returns the destination path.
    """
    src, dst = Path(src_dir).expanduser().resolve(), Path(dst_dir).expanduser().absolute()
    cast = parse_dtype(dtype)
    if not src.is_dir():
        raise UserInputError(
            f"source {src} is not a directory; pass the lmms-lab checkpoint directory (config.json, "
            "tokenizer and weights), e.g. a local copy of lmms-lab/llama3-llava-next-8b"
        )
    cfg = _read_config(src)
    if cfg is None:
        raise UserInputError(f"{src} has no readable config.json; pass an lmms-lab LLaVA-NeXT checkpoint directory")
    if cfg.get("model_type") == "llava_next":
        raise UserInputError(f"{src} is already in the llava-hf layout; load it directly, no conversion needed")
    if not is_lmms_lab_checkpoint(src):
        raise UserInputError(
            f"{src / 'config.json'} has no mm_vision_tower/mm_projector_type fields; it is not an "
            "lmms-lab (original LLaVA-NeXT) checkpoint"
        )
    if dst.exists() or dst.is_symlink():
        raise UserInputError(f"destination {dst} already exists; choose a new --dst or delete it first")
    if _is_within(dst.resolve(), src):
        raise UserInputError(f"destination {dst} lies inside the source {src}; choose a directory outside it")
    check_output_location(str(dst), [str(src)], "--dst")  # e.g. a regular file on the way to dst
    _check_supported(src, cfg)

    from transformers import GenerationConfig, LlavaNextConfig, LlavaNextProcessor
    from transformers import __version__ as tf_version
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    plan, shapes = _plan_weights(src)
    vision_config = _resolve_vision_config(src, cfg, shapes)
    emb_rows, hidden = shapes[EMBED_KEY]
    if shapes[LM_HEAD_KEY] != (emb_rows, hidden):
        raise UserInputError(
            f"lm_head {shapes[LM_HEAD_KEY]} and embed_tokens {(emb_rows, hidden)} of {src} differ in shape; "
            "the checkpoint is inconsistent"
        )
    if cfg.get("hidden_size", hidden) != hidden:
        raise UserInputError(
            f"{src / 'config.json'} says hidden_size {cfg['hidden_size']} but the weights have {hidden}; "
            "the checkpoint is inconsistent"
        )
    proj1 = shapes["multi_modal_projector.linear_1.weight"]
    if proj1 != (hidden, vision_config.hidden_size):
        raise UserInputError(
            f"the projector's first layer is {proj1}, expected ({hidden}, {vision_config.hidden_size}) from the "
            "LLM width and the vision tower width; the checkpoint is inconsistent"
        )
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision_config.hidden_size:
        raise UserInputError(
            f"{src / 'config.json'} has mm_hidden_size {mm_hidden} but the vision tower is "
            f"{vision_config.hidden_size} wide"
        )

    tokenizer = _load_tokenizer(src)
    n_src_tokens = len(tokenizer)
    image_id, pad_id = _add_llava_tokens(tokenizer)
    n_tokens = len(tokenizer)
    vocab_rows = max(emb_rows, -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)

    stored = next((reader.dtype(k) for reader, pairs in plan for k, new in pairs if new == EMBED_KEY), None)
    out_dtype = cast or stored or torch.float32
    if "<|start_header_id|>" in tokenizer.get_vocab():
        chat_template = LLAMA3_LLAVA_CHAT_TEMPLATE
    else:
        chat_template = None
        print(
            f"mmprune: the tokenizer of {src} is not a Llama-3 tokenizer; the converted processor gets no "
            "chat template (build prompts yourself)",
            file=sys.stderr,
        )

    text_config = _text_config(cfg, vocab_rows, pad_id)
    text_config.dtype = out_dtype
    vision_config.dtype = out_dtype
    pins_hw = [[int(h), int(w)] for w, h in cfg["image_grid_pinpoints"]]
    strategy = "full" if cfg.get("mm_vision_select_feature") == "cls_patch" else "default"
    grid = vision_config.image_size // vision_config.patch_size
    config = LlavaNextConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_id,
        image_grid_pinpoints=pins_hw,
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias="multi_modal_projector.linear_1.bias" in shapes,
        image_seq_length=grid * grid,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.dtype = out_dtype

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    except OSError as exc:
        raise UserInputError(f"cannot write into {dst.parent} ({exc}); choose a writable --dst") from exc
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for reader, pairs in plan:
            for key, new in pairs:
                tensor = reader.get(key)
                if cast is not None and tensor.is_floating_point():
                    tensor = tensor.to(cast)
                if new in (EMBED_KEY, LM_HEAD_KEY):
                    tensor = _grow_rows(tensor, vocab_rows)
                writer.add(new, tensor)
        writer.finish()
        del plan

        config.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(str(src))
        else:
            gen = GenerationConfig(bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id)
        gen.pad_token_id = pad_id
        gen.save_pretrained(tmp)

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": vision_config.image_size},
            crop_size={"height": vision_config.image_size, "width": vision_config.image_size},
            image_grid_pinpoints=pins_hw,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            do_pad=True,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1,
            chat_template=chat_template,
            image_token="<image>",
        )
        processor.save_pretrained(tmp)

        provenance = {
            "converted_by": "llava.convert (mmprune)",
            "source": str(src),
            "source_fingerprint": _source_fingerprint(src),
            "transformers_version": tf_version,
            "dtype": _dtype_name(out_dtype),
            "added_tokens": {"<image>": image_id, "<pad>": pad_id},
            "source_tokenizer_size": n_src_tokens,
            "vocab_rows": {"source": emb_rows, "converted": vocab_rows},
            "new_rows_init": "mean of the existing rows (deterministic); the transformers converter "
            "samples around that mean instead",
            "image_grid_pinpoints_source_wh": cfg["image_grid_pinpoints"],
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        share_tree(str(tmp))  # safetensors writes 0600 files
        try:
            with signals_deferred():
                os.rename(tmp, dst)
        except OSError as exc:
            raise UserInputError(f"cannot move the converted model to {dst} ({exc}); choose a new --dst") from exc
    except BaseException:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------
# conversion on load


def _reuse_cached(src: Path, dst: Path) -> Path:
    try:
        prov = json.loads((dst / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        prov = None
    if (
        isinstance(prov, dict)
        and prov.get("source") == str(src)
        and prov.get("source_fingerprint") == _source_fingerprint(src)
    ):
        print(f"mmprune: using the llava-hf conversion of {src} cached in {dst}", file=sys.stderr)
        return dst
    raise UserInputError(f"{dst} exists but is not a conversion of the current {src}; delete it to convert again")


def _convert_on_load(src: Path, convert_cache_dir) -> Path:
    src = src.resolve()
    if convert_cache_dir is not None:
        cache = Path(convert_cache_dir).expanduser().absolute()
        tag = hashlib.sha1(str(src).encode()).hexdigest()[:10]
        dst = cache / f"{src.name}-llava-hf-{tag}"
        if dst.exists():
            return _reuse_cached(src, dst)
        print(
            f"mmprune: {src} is an lmms-lab (original LLaVA-NeXT) checkpoint; converting it to the "
            f"llava-hf layout in {dst} (kept for later loads)",
            file=sys.stderr,
        )
        try:
            return convert_lmms_lab_to_hf(src, dst)
        except UserInputError:
            if dst.exists():  # another process finished the same conversion first
                return _reuse_cached(src, dst)
            raise
    tmp_root = Path(tempfile.mkdtemp(prefix="mmprune-llava-hf-"))
    atexit.register(shutil.rmtree, tmp_root, ignore_errors=True)
    dst = tmp_root / src.name
    print(
        f"mmprune: {src} is an lmms-lab (original LLaVA-NeXT) checkpoint; converting it to the llava-hf "
        f"layout in the temporary directory {dst} (removed at exit; keep a copy with `{CONVERTER_COMMAND}` "
        "or pass convert_cache_dir)",
        file=sys.stderr,
    )
    try:
        return convert_lmms_lab_to_hf(src, dst)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
