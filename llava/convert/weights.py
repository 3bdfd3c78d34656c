"""Weight side of the conversion: dtype names, lmms-lab weight files and key map, grown rows, shard writer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmprune.base.errors import UserInputError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating dtype, or a name such as "bfloat16" -> torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise UserInputError(f"dtype {dtype} is not a floating dtype; use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise UserInputError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files, in index order (safetensors preferred over .bin)."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserInputError(f"cannot read the weight index {index}: {exc}; restore the file") from exc
            files = []
            for name in dict.fromkeys(weight_map.values()):
                f = src / name
                if not f.is_file():
                    raise UserInputError(
                        f"{index} names the shard {name}, which is missing from {src}; "
                        "download the complete checkpoint"
                    )
                files.append(f)
            return files
        if (src / single_name).is_file():
            return [src / single_name]
    raise UserInputError(
        f"no weights in {src}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json); "
        "download the complete checkpoint"
    )


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _TensorSource:
    """Reads tensors from one weight file lazily (safetensors) or via an mmap'ed torch.load."""

    def __init__(self, path: Path):
        self.path = path
        self._st = None
        self._sd = None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._st = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # corrupt or truncated file
                raise UserInputError(f"cannot read {path}: {exc}; re-download the shard") from exc
        else:
            try:
                self._sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise UserInputError(f"cannot read {path}: {exc}; re-download the shard") from exc

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st is not None else self._sd[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        if self._st is not None:
            return _SAFETENSORS_DTYPES.get(self._st.get_slice(key).get_dtype())
        return self._sd[key].dtype


def _map_key(key: str) -> str | None:
    """Original LLaVA-NeXT key -> llava-hf on-disk key; None for buffers that are dropped.

    Raises KeyError for keys this converter does not know.
    """
    if key.endswith(".position_ids") or key.endswith("rotary_emb.inv_freq"):
        return None  # non-persistent buffers in current transformers
    if key.startswith("model.vision_tower.vision_tower."):
        rest = key[len("model.vision_tower.vision_tower.") :]
        if rest.startswith("vision_model."):
            return "vision_tower." + rest
        raise KeyError(key)
    if key.startswith("model.mm_projector.0."):
        return "multi_modal_projector.linear_1." + key[len("model.mm_projector.0.") :]
    if key.startswith("model.mm_projector.2."):
        return "multi_modal_projector.linear_2." + key[len("model.mm_projector.2.") :]
    if key == "model.image_newline":
        return "image_newline"
    if key == "model.embed_tokens.weight" or key == "model.norm.weight" or key.startswith("model.layers."):
        return "language_model." + key
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(key)


EMBED_KEY = "language_model.model.embed_tokens.weight"
LM_HEAD_KEY = "language_model.lm_head.weight"
REQUIRED_KEYS = (
    EMBED_KEY,
    LM_HEAD_KEY,
    "language_model.model.norm.weight",
    "image_newline",
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_2.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
)


def _plan_weights(src: Path) -> tuple[list[tuple[_TensorSource, list[tuple[str, str]]]], dict[str, tuple]]:
    """Per source file, the (source key, destination key) pairs; plus every destination shape."""
    plan, shapes, unknown = [], {}, []
    for f in _weight_files(src):
        reader = _TensorSource(f)
        pairs = []
        for key in reader.keys():
            try:
                new = _map_key(key)
            except KeyError:
                unknown.append(key)
                continue
            if new is None:
                continue
            if new in shapes:
                raise UserInputError(f"the key {key} appears twice in {src}; the checkpoint is inconsistent")
            shapes[new] = reader.shape(key)
            pairs.append((key, new))
        plan.append((reader, pairs))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UserInputError(
            f"{src} holds weights this converter does not know: {shown}; only the Llama-based "
            "LLaVA-NeXT layout (model.layers, model.mm_projector.0/2, model.vision_tower.vision_tower, "
            "model.image_newline, lm_head) is supported"
        )
    missing = [k for k in REQUIRED_KEYS if k not in shapes]
    if missing:
        raise UserInputError(
            f"{src} lacks the weights {', '.join(missing)} (llava-hf names); download the complete "
            "lmms-lab checkpoint (its vision tower must be saved in it)"
        )
    return plan, shapes


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing rows (computed in float32)."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most max_bytes (one tensor may exceed)."""

    def __init__(self, out_dir: Path, max_bytes: int):
        from safetensors.torch import save_file

        self._save = save_file
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buffer, self.buffer_bytes = {}, 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out_dir / f".part-{len(self.parts):05d}.safetensors"
        self._save(self.buffer, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.parts)
        if n == 1:
            self.parts[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
