"""Run reports: `pruning_report.json` (everything needed to judge and reproduce a run) and
`sparsity.png` (per-block sparsity by linear type, with DAS diversity when DAS ran)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from typing import Any

from mmprune import __version__
from mmprune.prune.pipeline import PruneOutcome

_BLOCK = re.compile(r"\.(\d+)\.(.+)$")


def split_linear_name(name: str) -> tuple[int, str]:
    """`...layers.3.self_attn.q_proj` -> (3, "q_proj")."""
    match = _BLOCK.search(name)
    if not match:
        return -1, name
    return int(match.group(1)), match.group(2).rsplit(".", 1)[-1]


def toolkit_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"mmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_report(outcome: PruneOutcome, *, method: str, options: dict, calibration: dict, timings: dict,
                 memory: dict, model: dict, evaluation: dict | None = None, extra: dict | None = None) -> dict:
    per_linear = [
        {"name": r.name, "shape": list(r.shape), "target": round(r.target, 6), "achieved": round(r.achieved, 6)}
        for r in outcome.results
    ]
    report: dict[str, Any] = {
        "method": method,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "toolkit_commit": toolkit_commit(),
        "versions": versions(),
        "model": model,
        "options": options,
        "target_sparsity": options.get("llm_sparsity_ratio"),
        "sparsity_type": options.get("sparsity_type"),
        "achieved_sparsity": round(outcome.achieved, 6),
        "pruned_linears": len(outcome.results),
        "per_linear": per_linear,
        "calibration": calibration,
        "time_seconds": {k: round(v, 3) for k, v in timings.items()},
        "peak_memory": {k: round(v, 1) for k, v in memory.items()},
    }
    if outcome.das is not None:
        report["das"] = {
            "group_scores": outcome.das.group_scores,
            "group_terms": outcome.das.group_terms,
            "group_sparsity": outcome.das.group_sparsity,
        }
    if outcome.selection is not None:
        report["amia"] = {"selected_token_fraction_per_block": outcome.selection.fractions()}
    if evaluation:
        report["evaluation"] = evaluation
    if extra:
        report.update(extra)
    return report


def write_report(path: str, report: dict) -> None:
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")


def plot_sparsity(path: str, outcome: PruneOutcome, title: str) -> None:
    """Top: achieved sparsity per block, one line per linear type. Bottom (DAS runs): the
    diversity score of each group per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_type: dict[str, dict[int, float]] = {}
    for r in outcome.results:
        block, kind = split_linear_name(r.name)
        by_type.setdefault(kind, {})[block] = r.achieved
    rows = 2 if outcome.das is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.2 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    for kind, values in by_type.items():
        blocks = sorted(values)
        ax.plot(blocks, [values[b] for b in blocks], marker="o", label=kind)
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    if outcome.das is not None:
        ax = axes[1][0]
        scores: dict[str, dict[int, float]] = {}
        for group, score in outcome.das.group_scores.items():
            if _BLOCK.search(group):
                block, kind = split_linear_name(group)
            else:
                block, kind = int(group.rsplit(".", 1)[-1]), "block"
            scores.setdefault(kind, {})[block] = score
        for kind, values in scores.items():
            blocks = sorted(values)
            ax.plot(blocks, [values[b] for b in blocks], marker="s", label=kind)
        ax.set_ylabel("DAS diversity score")
        ax.grid(alpha=0.3)
        ax.legend(ncol=4, fontsize=8)
    axes[-1][0].set_xlabel("decoder block")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


READING_BEGIN = "<!-- reading: written by hand, kept when the section is regenerated -->"
READING_END = "<!-- /reading -->"


def reading_of(section_text: str) -> str | None:
    """The hand-written reading between READING_BEGIN and READING_END of a section (None: no block)."""
    if READING_BEGIN not in section_text or READING_END not in section_text:
        return None
    return section_text.split(READING_BEGIN, 1)[1].split(READING_END, 1)[0].strip("\n")


def keep_reading(old_section: str, body: str) -> str:
    """`body` with the old section's reading in its (empty) reading block, or after it if `body`
    has no block: regenerating a section never drops what a person wrote about it."""
    reading = reading_of(old_section)
    if not reading:
        return body
    block = f"{READING_BEGIN}\n{reading}\n{READING_END}"
    if READING_BEGIN in body and READING_END in body:
        head, rest = body.split(READING_BEGIN, 1)
        return head + block + rest.split(READING_END, 1)[1]
    return body.rstrip("\n") + "\n\n" + block


def update_markdown_section(path: str, section: str, body: str, title: str = "# Results") -> None:
    """Replace the text between `<!-- section:NAME -->` and `<!-- /section:NAME -->` in `path`,
    keeping the old section's hand-written reading (keep_reading).

    Several generators (the quality table, FitPrune, EAS) each own one section of the same file;
    a missing file starts with `title`, a missing section is appended. Written atomically.
    """
    begin, end = f"<!-- section:{section} -->", f"<!-- /section:{section} -->"
    text = open(path).read() if os.path.exists(path) else f"{title}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        old, tail = rest.split(end, 1)
        text = head + f"{begin}\n{keep_reading(old, body).strip()}\n{end}" + tail
    else:
        text = text.rstrip("\n") + f"\n\n{begin}\n{body.strip()}\n{end}\n"
    from mmprune.base.output import atomic_output_file

    with atomic_output_file(path) as tmp, open(tmp, "w") as handle:
        handle.write(text)


def block_term_means(group_terms: dict) -> dict[str, dict[str, float]]:
    """{block index (a string, as JSON keeps it): {term: mean over the block's groups}} of DAS's
    per-group diversity terms (groups are linears or blocks; both names carry the block index)."""
    blocks: dict[int, dict[str, list[float]]] = {}
    for group, values in group_terms.items():
        index = int(re.search(r"\.(\d+)(?:\.|$)", group).group(1))  # block groups end at the index
        for term, value in values.items():
            blocks.setdefault(index, {}).setdefault(term, []).append(value)
    return {str(i): {t: sum(v) / len(v) for t, v in sorted(terms.items())} for i, terms in sorted(blocks.items())}


def modality_summary(report: dict) -> str:
    """Calibration token counts and the per-block mean of each DAS term, as printable lines."""
    lines = []
    counts = report["calibration"].get("tokens_per_modality")
    if counts:
        lines.append("calibration tokens: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    terms = report.get("das", {}).get("group_terms")
    if terms:
        blocks = block_term_means(terms)
        names = sorted({t for b in blocks.values() for t in b})
        lines.append(f"DAS diversity terms (mean over each block's linears): {len(names)} terms")
        lines.append("  block " + " ".join(f"{n:>13}" for n in names))
        for index in sorted(blocks, key=int):
            cells = [blocks[index].get(n, float("nan")) for n in names]
            lines.append(f"  {int(index):5d} " + " ".join(f"{c:13.4f}" for c in cells))
    atv = report.get("atv", {}).get("per_block")
    if atv:
        names = list(next(iter(atv.values()))["mean_drift"])
        statistic = "the Hessian" if "sparsegpt" in report else "||X||"  # atv-obs or atv
        lines.append(f"ATV per block: mean drift and share of each modality's tokens counted in {statistic}")
        lines.append("  block " + " ".join(f"{n + ' drift':>14} {n + ' kept':>13}" for n in names)
                     + "   all tokens counted")
        for index in sorted(atv, key=int):
            b = atv[index]
            cells = " ".join(f"{b['mean_drift'][n]:14.4f} {b['visual_kept_share'][n]:13.3f}" for n in names)
            lines.append(f"  {int(index):5d} {cells} {b['counted_token_share']:20.3f}")
    return "\n".join(lines)
