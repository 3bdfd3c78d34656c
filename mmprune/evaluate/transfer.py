"""Model-agnostic parts of the quality grids' transfer calibration (docs/method.md, "Calibration
settings of the quality grids"): text-only instruction conversations built from real English text,
and the mix of the `generic` setting.

The English text is read at run time from docstrings of Python standard library modules, like the
real-text perplexity corpus (mmprune/evaluate/realtext.py), but from other modules: `ENGLISH_MODULES` and
the corpus's modules are disjoint, so no calibration text is ever scored by the real-text
perplexity (tests/test_quality_transfer.py checks the sha256 of every passage against the corpus's
paragraphs). Each passage is one public docstring (module, class, function or method) of at least
`MIN_CHARS` characters of prose, cut after whole paragraphs at `MAX_CHARS`; the conversation asks
about the documented name and the answer is the passage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import platform
import random
from dataclasses import dataclass

import numpy as np

from mmprune.base.errors import UserInputError
from mmprune.evaluate.realtext import DOCSTRING_MODULES, ESSAYS, _prose, _stdlib_tree

# Prose-rich modules present in CPython 3.10-3.13; none is a source of the real-text corpus.
ENGLISH_MODULES = ("logging/__init__", "threading", "subprocess", "shutil", "inspect", "statistics",
                   "email/message", "unittest/case", "http/client", "socket", "traceback", "contextlib",
                   "random", "queue")
MIN_CHARS = 200  # one-line docstrings say little
MAX_CHARS = 1200  # keeps a text record near the length of an image conversation
PROMPTS = ("Explain {name} from the Python standard library.", "What does {name} do?",
           "Describe {name} in a few sentences.")
TEXT_SHARE = 4  # generic setting: one calibration record in TEXT_SHARE is text-only


@dataclass(frozen=True)
class Passage:
    module: str  # e.g. "logging"
    name: str  # documented name, e.g. "logging.Handler.emit"
    text: str


def _passage(doc: str) -> str:
    """Whole paragraphs of the docstring's prose, as many as fit MAX_CHARS (at least the first)."""
    kept: list[str] = []
    for paragraph in _prose(doc).split("\n\n"):
        if paragraph.strip().endswith(":") and len(paragraph) < 40:
            continue  # a heading ("Examples:") whose doctest paragraphs were dropped
        if kept and sum(map(len, kept)) + len(paragraph) > MAX_CHARS:
            break
        kept.append(paragraph.strip())
    return "\n\n".join(p for p in kept if p)


def _module_passages(path: str) -> list[Passage]:
    module = path.removesuffix("/__init__").replace("/", ".")
    found: list[Passage] = []

    def visit(node, name: str, depth: int) -> None:
        doc = ast.get_docstring(node, clean=True)
        text = _passage(doc) if doc else ""
        if len(text) >= MIN_CHARS:
            found.append(Passage(module, name, text))
        if depth < 2:  # module -> classes and functions -> methods
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                        and not child.name.startswith("_"):
                    visit(child, f"{name}.{child.name}", depth + 1)

    visit(_stdlib_tree(path), module, 0)
    return found


@functools.lru_cache(maxsize=1)
def english_passages() -> tuple[Passage, ...]:
    """Every passage, in module then source order."""
    realtext_modules = set(DOCSTRING_MODULES) | {module for module, _ in ESSAYS}
    assert not realtext_modules & set(ENGLISH_MODULES), "calibration text must not come from the real-text corpus"
    return tuple(p for path in ENGLISH_MODULES for p in _module_passages(path))


def english_source() -> dict:
    """What the English calibration text is, for the results' settings: source, passages, sha256."""
    passages = english_passages()
    text = "\n\n".join(p.text for p in passages)
    modules = ", ".join(m.removesuffix("/__init__").replace("/", ".") for m in ENGLISH_MODULES)
    return {"source": f"Python {platform.python_version()} standard library docstrings of {modules}",
            "passages": len(passages), "characters": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def check_text_records(n: int) -> None:
    """n text-only records can be drawn (run before the model loads: --nsamples of the generic setting)."""
    available = len(english_passages())
    if n > available:
        raise UserInputError(f"the English calibration text has {available} passages, fewer than the {n} "
                             f"text-only records asked for; use --nsamples {TEXT_SHARE * (available + 1) - 1} or "
                             "fewer with --calibration generic")


def english_conversations(n: int, seed: int) -> list[dict]:
    """n text-only conversations (LLaVA / AVInstruct raw format, no media), passages drawn without
    replacement by numpy's default_rng(seed), in drawn order."""
    check_text_records(n)
    passages = english_passages()
    picks = np.random.default_rng(seed).choice(len(passages), size=n, replace=False)
    rng = random.Random(f"transfer:english:{seed}")
    records = []
    for i, index in enumerate(int(k) for k in picks):
        passage = passages[index]
        question = rng.choice(PROMPTS).format(name=passage.name)
        records.append({"id": f"english_{seed}_{i:05d}", "source": f"{passage.module}: {passage.name}",
                        "conversations": [{"from": "human", "value": question},
                                          {"from": "gpt", "value": passage.text}]})
    return records


def generic_counts(n: int) -> tuple[int, int]:
    """(media records, text-only records) of a generic calibration set of n records."""
    text = n // TEXT_SHARE
    return n - text, text


def interleave(media: list, text: list, seed: int) -> list:
    """media and text records in one deterministic shuffled order (methods that use only some of
    the samples, such as ECoFLaP's zeroth-order scores, then see both kinds)."""
    out = list(media) + list(text)
    random.Random(f"transfer:mix:{seed}").shuffle(out)
    return out


def cross_kind_records(records: list, calibration: str, evaluated_kinds) -> list:
    """The held-out records a setting is evaluated on: all of them, or under cross-kind calibration
    those of the kinds it did not calibrate on (`evaluated_kinds`)."""
    if calibration != "cross-kind":
        return records
    kept = [r for r in records if r.get("kind") in evaluated_kinds]
    if not kept:
        raise UserInputError(f"--calibration cross-kind evaluates on the {' and '.join(evaluated_kinds)} "
                             "questions, and the held-out file has none of them (field \"kind\"); use "
                             "the embedded held-out split, or --calibration in-task or generic")
    return kept
