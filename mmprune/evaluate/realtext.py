"""Perplexity of a model's language decoder on real English text that the project did not write.

The corpus is read at run time from the source files of the running Python's standard library,
so every machine with the venv has it and nothing is downloaded. In this order:

1. `heapq.__about__`: François Pinard's essay on heaps and tournament sorts;
2. `this.s`: the Zen of Python (stored rot13 in `this.py`, decoded);
3. the docstrings of `argparse`, `cmd`, `codecs`, `difflib`, `optparse` and `textwrap` (module,
   public classes and functions, their public methods, in source order), without the paragraphs
   that hold doctest prompts (`>>>`).

These texts were picked because they are the same in CPython 3.10.13, 3.11.2, 3.11.7, 3.12.1 and
3.13.0 (58,664 characters, 9,043 words, sha256 `REFERENCE_SHA256`); the result records the Python
version and the sha256 of the text actually read, so two numbers are comparable exactly when their
hashes are. The files are parsed with `ast`, never imported: `python -OO` and import side effects do
not matter.

Perplexity: the text is tokenised once by the model's tokenizer (no special tokens); its first
`max_tokens` tokens are cut into consecutive chunks of `window` tokens (fewer when the model's
max_position_embeddings is smaller), and each forward is the tokenizer's BOS token (its EOS when it
has no BOS) followed by one chunk, so every text token is predicted once, from the earlier tokens of
its chunk. exp(mean NLL over those tokens); the loss is taken on float32 logits and summed in
float64. Without a BOS or EOS token, each chunk's first token is context only.

The forward is text-only through the language model: its embedding, then the decoder blocks one at
a time with the pruning driver (so it runs wherever pruning runs, offloaded blocks included), then
the final norm and the LM head. An EAS model (llava/eas) is not measured: its adapters pool over
the whole window, so each position would see the tokens it predicts.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import functools
import hashlib
import math
import platform
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mmprune.prune.calibration import capture_block_inputs, move_except
from mmprune.prune.driver import on_device, sweep
from mmprune.base.errors import NonFiniteActivationError, UserInputError
from mmprune.prune.pipeline import LanguageHead

DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 512
ESSAYS = (("heapq", "__about__"), ("this", "s"))  # (module, module-level string constant)
DOCSTRING_MODULES = ("argparse", "cmd", "codecs", "difflib", "optparse", "textwrap")
REFERENCE_SHA256 = "37fec84b166f6f45b941a19a7ad62771bdcab5ff65038e9b7e199bbd6792bbd3"  # CPython 3.10-3.13


@dataclass(frozen=True)
class Corpus:
    text: str
    source: str
    sha256: str


def _stdlib_tree(module: str) -> ast.Module:
    path = Path(sysconfig.get_path("stdlib")) / f"{module}.py"
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        raise UserInputError(f"the real-text corpus needs the standard library source {path}, which cannot be "
                             f"read ({exc}); pass --realtext_tokens 0 to skip the real-text perplexity") from None


def _string_constant(tree: ast.Module, name: str) -> str:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise UserInputError(f"the real-text corpus expects a string {name} in the standard library; this Python "
                         f"({platform.python_version()}) has none; pass --realtext_tokens 0 to skip it")


def _prose(doc: str) -> str:
    """A cleaned docstring without the paragraphs that hold doctest prompts (code, not English)."""
    return "\n\n".join(p for p in doc.split("\n\n") if p.strip() and ">>>" not in p)


def _docstrings(tree: ast.Module) -> list[str]:
    found: list[str] = []

    def visit(node, depth: int) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and _prose(doc):
            found.append(_prose(doc))
        if depth < 2:  # module -> classes and functions -> methods
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                        and not child.name.startswith("_"):
                    visit(child, depth + 1)

    visit(tree, 0)
    return found


@functools.lru_cache(maxsize=1)
def corpus() -> Corpus:
    """The English text, its description and its sha256 (built once per process)."""
    parts = []
    for module, name in ESSAYS:
        text = _string_constant(_stdlib_tree(module), name)
        parts.append(codecs.decode(text, "rot13") if module == "this" else text.strip())
    for module in DOCSTRING_MODULES:
        parts.extend(_docstrings(_stdlib_tree(module)))
    text = "\n\n".join(parts)
    source = (f"Python {platform.python_version()} standard library source: heapq.__about__ (essay), this.s "
              f"(Zen of Python), docstrings of {', '.join(DOCSTRING_MODULES)} without doctest paragraphs")
    return Corpus(text, source, hashlib.sha256(text.encode("utf-8")).hexdigest())


@dataclass
class RealTextResult:
    perplexity: float | None  # None when the loss is not finite (see error)
    mean_nll: float | None  # nats per predicted token
    tokens: int  # text tokens predicted
    windows: int
    window: int  # text tokens per forward (the prefix token comes on top)
    corpus_tokens: int  # tokens of the whole corpus with this tokenizer
    unknown_token_fraction: float | None  # share of predicted tokens that are the tokenizer's unk token
    prefix_token: str | None
    source: str
    characters: int
    sha256: str
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        if out["error"] is None:
            del out["error"]
        return out


def token_budget(text: str) -> int:
    """argparse type of --realtext_tokens: 0 (skip) or a positive token count."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (skip) or a positive token count, got {value}")
    return value


def add_realtext_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--realtext_tokens", type=token_budget, default=DEFAULT_TOKENS, metavar="N",
                        help="perplexity of the language decoder on this many tokens of English text from the "
                             "Python standard library (mmprune/evaluate/realtext.py; default %(default)s, 0 skips it)")


def language_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, LanguageHead]:
    """(text decoder, its blocks, final norm + LM head) of a llava-hf LLaVA-NeXT (language_model inside
    model.model), a VideoLLaMA2 model or a plain *ForCausalLM (the decoder is model.model)."""
    inner = model.model
    decoder = getattr(inner, "language_model", inner)
    return decoder, decoder.layers, LanguageHead(decoder.norm, model.lm_head)


def make_windows(ids: list[int], max_tokens: int, window: int, prefix: int | None) -> list[list[int]]:
    """Consecutive chunks of `window` ids from the first max_tokens, each led by `prefix` when there is one
    (a chunk of one token without a prefix predicts nothing and is dropped)."""
    used = ids[:max_tokens]
    chunks = [used[i:i + window] for i in range(0, len(used), window)]
    return [[prefix] + c for c in chunks] if prefix is not None else [c for c in chunks if len(c) > 1]


class _Replay:
    """Driver visitor that only carries the hidden states from block to block."""

    keep_outputs = False
    modifies_block = False

    def begin_block(self, *args) -> None:
        pass

    def observe(self, *args) -> None:
        pass

    def end_block(self, *args) -> None:
        pass


@torch.no_grad()
def windows_nll(model: nn.Module, windows: list[list[int]], device=None) -> float:
    """Summed NLL of tokens 1.. of every window, text-only through the language decoder, block by block."""
    decoder, blocks, head = language_parts(model)
    embed = decoder.get_input_embeddings()
    device = device or embed.weight.device
    tied = head.lm_head.weight is embed.weight
    move_except(decoder, blocks, device)  # embedding and rotary tables; the blocks move one at a time
    if tied:  # move_except made a new embedding parameter: keep the head on it
        head.lm_head.weight = embed.weight
    with on_device(embed, device, keep_changes=False):  # an offloaded embedding is read once, not per window
        store = capture_block_inputs(
            blocks[0], lambda w: decoder(input_ids=torch.tensor([w], device=device), use_cache=False), windows,
            modality_ids_of=None, store_device=str(device), total=len(windows), desc="real-text windows")
    sweep(blocks, store, _Replay(), device, desc="real-text perplexity")
    total = 0.0
    with on_device(head.final_norm, device, keep_changes=False), on_device(head.lm_head, device, keep_changes=False):
        for hidden, w in zip(store.hidden, windows):
            logits = head.lm_head(head.final_norm(hidden.to(device)))[0, :-1].float()
            total += float(F.cross_entropy(logits, torch.tensor(w[1:], device=device), reduction="sum"))
    return total


def realtext_perplexity(model: nn.Module, tokenizer, max_tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW,
                        device=None) -> RealTextResult:
    """Perplexity of `model`'s language decoder on the first `max_tokens` tokens of `corpus()`."""
    if max_tokens < 1 or window < 2:
        raise UserInputError(f"real-text perplexity needs max_tokens >= 1 and window >= 2, got {max_tokens}, {window}")
    started = time.perf_counter()
    text = corpus()
    ids = tokenizer(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    decoder, _, _ = language_parts(model)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    limit = getattr(decoder.config, "max_position_embeddings", None)
    if limit:
        window = min(window, limit - (prefix is not None))
    windows = make_windows(ids, max_tokens, window, prefix)
    targets = [t for w in windows for t in w[1:]]
    if not targets:
        raise UserInputError(f"--realtext_tokens {max_tokens} leaves no token to predict; use at least 2")
    unk = tokenizer.unk_token_id
    was_training = model.training
    model.eval()
    mean, error = None, None
    try:
        if hasattr(model, "eas_state"):  # EAS adapters pool over the whole window: tokens would see their future
            error = "not measured: the EAS adapters pool over every position, so the model is not causal"
        else:
            mean = windows_nll(model, windows, device) / len(targets)
    except NonFiniteActivationError as exc:
        error = str(exc).split(";")[0]
    finally:
        model.train(was_training)
    if mean is not None and not math.isfinite(mean):
        mean, error = None, "the loss is not finite"
    perplexity = math.exp(mean) if mean is not None and mean < 700 else None  # beyond 700 exp overflows
    return RealTextResult(
        perplexity=perplexity, mean_nll=mean, tokens=len(targets), windows=len(windows), window=window,
        corpus_tokens=len(ids),
        unknown_token_fraction=sum(t == unk for t in targets) / len(targets) if unk is not None else None,
        prefix_token=tokenizer.convert_ids_to_tokens(prefix) if prefix is not None else None,
        source=text.source, characters=len(text.text), sha256=text.sha256,
        seconds=round(time.perf_counter() - started, 3), error=error)
