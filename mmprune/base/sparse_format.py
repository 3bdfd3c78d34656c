"""Sparse checkpoints in compressed-tensors' formats, written and read with the compressed-tensors
library (the format llm-compressor writes), and the bytes of a checkpoint's weight files.

- `sparse-bitmask` (any sparsity): per weight its nonzero values, one bit per entry and row offsets;
- `sparse-24-bitmask` (2:4): half the values and one bit per entry.
config.json gets the `quantization_config` block (quant_method `compressed-tensors`, its
`sparsity_config`: format, structure, global sparsity, the compressed modules as `targets`) that the
library's ModelCompressor writes, so a loader knows the format.

Who reads it: compressed-tensors up to 0.14 holds these compressors; 0.14.0.1 and later dropped them
(0.15+ has no sparse compression, and vLLM 0.32 refuses a checkpoint with sparsity targets), while
transformers 5.x needs compressed-tensors >= 0.15 for its integration. So the project pins 0.13.0
(extra `sparse`, the last release that has them and installs next to transformers 5) and its loaders
read a compressed checkpoint through `dense_copy`: the library decompresses it, file by file, into a
dense checkpoint equal bit for bit to the dense save, which transformers, lmms-eval and vLLM load.

    python -m mmprune.base.sparse_format dense-copy SRC DST     # the dense checkpoint of SRC
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from mmprune.base.errors import UserInputError

SAVE_FORMATS = ("dense", "compressed")
BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
CONFIG_KEY = "quantization_config"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INSTALL_HINT = "install the project's `sparse` extra (pip install -e '.[sparse]'; `make setup` does)"


def _library():
    """compressed-tensors' registries, or one clear error when the sparse compressors are missing."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import BaseCompressor, ModelCompressor
        from compressed_tensors.config import SparsityCompressionConfig
    except ImportError:
        raise UserInputError(f"compressed checkpoints need compressed-tensors 0.13; {INSTALL_HINT}") from None
    if BITMASK not in BaseCompressor.registered_names():
        raise UserInputError(f"compressed-tensors {compressed_tensors.__version__} has no sparse compressors "
                             f"(removed after 0.14); {INSTALL_HINT}")
    return BaseCompressor, ModelCompressor, SparsityCompressionConfig


def check_save_format(save_format: str) -> None:
    """Before any work: an unknown format, or `compressed` without the library, is one error line."""
    if save_format not in SAVE_FORMATS:
        raise UserInputError(f"--save_format must be one of {', '.join(SAVE_FORMATS)}, got {save_format!r}")
    if save_format == "compressed":
        _library()


def format_for(pattern: str) -> str:
    """The compressed-tensors format for a sparsity pattern: 2:4 has its own, everything else bitmask."""
    return BITMASK_24 if pattern == "2:4" else BITMASK


class SparseWriter:
    """Compresses the `targets` weights (names ending in `.weight`) of each shard as it is written.
    A target stays dense where the format could not give it back bit for bit: a 2:4 target that is
    not 2:4 sparse (the format would drop weights), a weight holding -0.0 (a bitmask has no sign)."""

    def __init__(self, fmt: str, targets: set[str]):
        base, _, config = _library()
        self.config = config.load_from_registry(fmt, sparsity_structure="2:4" if fmt == BITMASK_24 else "unstructured")
        self.compressor = base.load_from_registry(fmt, config=self.config)
        self.targets = set(targets)
        self.compressed: list[str] = []   # module names, as saved
        self.left_dense: list[str] = []
        self.zeros = self.entries = 0
        self.bytes = {"dense": 0, "compressed": 0}  # the targets' tensor bytes before and after

    def _fits(self, tensor) -> bool:
        if tensor.dim() != 2:
            return False
        import torch

        if bool((torch.signbit(tensor) & (tensor == 0)).any()):  # the bitmask keeps no sign of a zero
            return False
        if self.config.format != BITMASK_24:
            return True
        if tensor.shape[1] % 4:
            return False
        return bool(((tensor.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())

    def __call__(self, shard: dict) -> dict:
        chosen = {name for name in shard if name in self.targets}
        for name in sorted(chosen):
            tensor = shard[name]
            if not self._fits(tensor):
                chosen.discard(name)
                self.left_dense.append(name.removesuffix(".weight"))
                continue
            self.zeros += int((tensor == 0).sum())
            self.entries += tensor.numel()
            self.bytes["dense"] += tensor.numel() * tensor.element_size()
        if not chosen:
            return shard
        modules = {name.removesuffix(".weight") for name in chosen}
        out = self.compressor.compress(shard, compression_targets=modules)
        self.compressed += sorted(modules)
        self.bytes["compressed"] += sum(v.numel() * v.element_size() for k, v in out.items()
                                        if k.rsplit(".", 1)[0] in modules and k not in shard)
        return out

    def write_config(self, folder) -> dict:
        """The sparsity config into folder/config.json (as ModelCompressor writes it); returns a summary."""
        _, model_compressor, _ = _library()
        self.config.targets = sorted(self.compressed)
        self.config.global_sparsity = self.zeros / self.entries if self.entries else 0.0
        model_compressor(sparsity_config=self.config).update_config(str(folder))
        return {"format": self.config.format, "compressed_modules": len(self.compressed),
                "left_dense": sorted(self.left_dense), "global_sparsity": round(self.config.global_sparsity, 6),
                "tensor_bytes": dict(self.bytes)}


# ------------------------------------------------------------------------------------------ reading


def _config(folder) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def compression_of(folder) -> str | None:
    """The sparse compressed-tensors format of a checkpoint folder, None for a dense one."""
    block = _config(folder).get(CONFIG_KEY)
    if not isinstance(block, dict) or block.get("quant_method") != "compressed-tensors":
        return None
    sparsity = block.get("sparsity_config") or {}
    fmt = sparsity.get("format")
    if block.get("config_groups"):
        raise UserInputError(f"{folder} is a quantized compressed-tensors checkpoint; only sparse ones (formats "
                             f"{BITMASK}, {BITMASK_24}) are read here: load it with transformers directly")
    return fmt if fmt not in (None, "dense") else None


def write_dense_copy(src, dst) -> Path:
    """The dense checkpoint of the compressed one in `src`, into the new folder `dst`: each weight file
    is decompressed on its own (a module's compressed tensors lie in one file, as SparseWriter writes
    them), config.json loses its quantization_config, every other file is copied."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, model_compressor, _ = _library()
    src, dst = Path(src), Path(dst)
    config = _config(src)
    compressor = model_compressor.from_compression_config(config[CONFIG_KEY]).sparsity_compressor
    dst.mkdir(parents=True)
    index_name = "model.safetensors.index.json"
    weight_map, total = {}, 0
    for entry in sorted(src.iterdir()):
        if entry.suffix == ".safetensors":
            with safe_open(str(entry), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
                metadata = handle.metadata()
            dense = dict(compressor.decompress_from_state_dict(tensors))
            save_file(dense, str(dst / entry.name), metadata=metadata)
            weight_map.update({key: entry.name for key in dense})
            total += sum(v.numel() * v.element_size() for v in dense.values())
        elif entry.name not in ("config.json", index_name):
            if entry.is_dir():
                shutil.copytree(entry, dst / entry.name)
            else:
                shutil.copy2(entry, dst / entry.name)
    if (src / index_name).is_file():
        index = json.loads((src / index_name).read_text(encoding="utf-8"))
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (dst / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    del config[CONFIG_KEY]
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def dense_checkpoint(folder) -> Path:
    """`folder` itself when dense; for a compressed checkpoint its dense copy in a temporary folder
    (removed when the process exits)."""
    fmt = compression_of(folder)
    if fmt is None:
        return Path(folder)
    root = Path(tempfile.mkdtemp(prefix="mmprune-dense-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    print(f"mmprune: {folder} holds {fmt} weights (compressed-tensors); loading its dense copy, written to {root} "
          "and removed at exit", file=sys.stderr)
    return write_dense_copy(folder, root / Path(folder).name)


def weight_bytes(folder) -> int:
    """Bytes on disk of a checkpoint folder's weight files (its top level)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def main(argv=None) -> int:
    from mmprune.base.entry import OneLineErrorParser, run_main

    parser = OneLineErrorParser(prog="python -m mmprune.base.sparse_format",
                                description="Write the dense checkpoint of a compressed-tensors sparse checkpoint.")
    parser.add_argument("command", choices=["dense-copy"])
    parser.add_argument("src", type=Path, help="compressed checkpoint folder")
    parser.add_argument("dst", type=Path, help="new folder for the dense copy (must not exist)")
    args = parser.parse_args(argv)

    def job(_argv) -> int:
        if compression_of(args.src) is None:
            raise UserInputError(f"{args.src} is no compressed-tensors sparse checkpoint (its config.json has no "
                                 "sparsity_config); it loads as it is")
        if args.dst.exists():
            raise UserInputError(f"{args.dst} exists; choose a new folder for the dense copy")
        print(f"wrote {write_dense_copy(args.src, args.dst)}")
        return 0

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
