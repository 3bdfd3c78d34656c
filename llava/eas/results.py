"""`python -m llava.eas.results`: the "eas" section of docs/results.md on the embedded LLaVA-NeXT
(EMBEDDED_MODEL=tiny: the tiny model, section "eas-tiny").

Runs, through the project's own commands: TAMP at 0.5 (`bash scripts/prune/tamp.sh`), EAS with
K = 25 % and 50 % of the blocks on the dense and on the TAMP model (`bash scripts/eas/train.sh`),
TAMP on top of the K = 50 % EAS model (`python -m llava.pruners`), accuracy of every model
(`python -m llava.eval`), then times the prefill of dense and each EAS model in this process,
alternating models, several repeats, median of the thread's CPU time (wall time would also count
waiting for a core while other jobs run). Rerunnable; --reuse keeps models already in --work_dir;
--render FILE rewrites the section from a saved docs/eas_results[_tiny].json without measuring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llava.embedded import paths as embedded
from mmprune.base.entry import run_main
from mmprune.base.output import atomic_output_dir, check_output_dir, check_output_location, write_json_file
from mmprune.run.report import update_markdown_section

ROOT = embedded.REPO_ROOT
KS = ("0.25", "0.5")


def _run(cmd: list[str], env: dict | None = None) -> str:
    sys.stderr.write(f"$ {' '.join(cmd)}\n")
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: `{' '.join(cmd)}` failed with status {done.returncode}")
    return done.stdout


def _evaluate(model_dir: Path, max_samples: int | None) -> dict:
    cmd = [sys.executable, "-m", "llava.eval", "--model_path", str(model_dir)]
    if max_samples:
        cmd += ["--max_samples", str(max_samples)]
    return json.loads(_run(cmd).strip().splitlines()[-1])


def snapshot_dense(work: Path, reuse: bool, source: Path) -> Path:
    """A copy of the embedded checkpoint: every model of one run derives from the same weights,
    even if the embedded checkpoint is retrained or reassembled meanwhile."""
    dense = work / "dense"
    if not (reuse and dense.is_dir()):
        with atomic_output_dir(str(dense), overwrite=True) as staging:  # replaces only an earlier snapshot
            shutil.copytree(source, staging, dirs_exist_ok=True)
    return dense


MODEL_FOLDERS = ["dense", "tamp0.5", *(f"eas_{base}_k{k}" for base in ("dense", "tamp") for k in KS),
                 "eas_dense_k0.5_then_tamp0.5"]


def build_models(work: Path, reuse: bool, extra_train: list[str], source: Path) -> dict:
    """{name: (directory, base name)}, trained or reused."""
    dense = snapshot_dense(work, reuse, source)
    models = {"dense": (dense, None)}
    tamp = work / "tamp0.5"
    if not (reuse and tamp.is_dir()):
        _run(["bash", "scripts/prune/tamp.sh", "0.5", "--no_eval"],
             {"MODEL_PATH": str(dense), "OUTPUT_DIR": str(tamp), "OVERWRITE": "1"})
    models["TAMP 0.5"] = (tamp, None)
    for base_name, base_dir in (("dense", dense), ("TAMP 0.5", tamp)):
        for k in KS:
            out = work / f"eas_{'tamp' if base_dir == tamp else 'dense'}_k{k}"
            if not (reuse and out.is_dir()):
                _run(["bash", "scripts/eas/train.sh", k, "--no_eval", *extra_train],
                     {"MODEL_PATH": str(base_dir), "OUTPUT_DIR": str(out), "OVERWRITE": "1"})
            models[f"{base_name} + EAS K={k}"] = (out, base_name)
    then = work / "eas_dense_k0.5_then_tamp0.5"
    if not (reuse and then.is_dir()):
        _run([sys.executable, "-m", "llava.pruners", "--method", "tamp", "--llm_sparsity_ratio", "0.5",
              "--model_path", str(work / "eas_dense_k0.5"), "--save_model", str(then), "--overwrite", "--no_eval"])
    models["dense + EAS K=0.5, then TAMP 0.5"] = (then, "dense")
    return models


@torch.no_grad()
def time_prefill(entries: dict, n_prompts: int, repeats: int) -> dict:
    """Median CPU seconds (this thread) to prefill n_prompts eval prompts (batch 1, KV cache, last-position logits),
    whole model and decoder stack alone. entries: {name: (directory, fuse or None)}. Every prompt
    runs on every model back to back (rotating order), so load drift on a shared machine hits all."""
    from llava.data import encode_record, load_records, model_inputs
    from llava.convert.loading import load_model

    torch.set_num_threads(1)
    records = load_records(embedded.EVAL_DATA_PATH)[:n_prompts]
    cache = {}
    loaded = {}
    for name, (path, fuse) in entries.items():
        if str(path) not in cache:
            cache[str(path)] = load_model(path, "cpu")
        model = cache[str(path)][0]
        if fuse is None and hasattr(model, "eas_state"):  # the saved setting (entries may share a model)
            fuse = bool(model.config.eas.get("fuse", False))
        loaded[name] = (model, fuse)
    processor = next(iter(cache.values()))[1]
    prompts = [model_inputs(encode_record(processor, r, embedded.EVAL_IMAGE_FOLDER, with_answer=False,
                                          add_generation_prompt=True)) for r in records]
    clock = {"decoder": 0.0}
    for model, _ in cache.values():
        stack = model.model.language_model
        start = {}
        stack.register_forward_pre_hook(lambda *a, s=start: s.__setitem__("t", time.thread_time()))
        stack.register_forward_hook(lambda *a, s=start: clock.__setitem__(
            "decoder", clock["decoder"] + time.thread_time() - s["t"]))

    def prefill(name, inputs):
        model, fuse = loaded[name]
        if fuse is not None:
            model.eas_state.fuse = fuse
        clock["decoder"] = 0.0
        t0 = time.thread_time()
        model(**inputs, use_cache=True, logits_to_keep=1)
        return time.thread_time() - t0, clock["decoder"]

    names = list(loaded)
    for inputs in prompts[:4]:  # warm-up
        for name in names:
            prefill(name, inputs)
    whole = {name: [] for name in names}
    stack = {name: [] for name in names}
    for rep in range(repeats):
        totals = {name: [0.0, 0.0] for name in names}
        for i, inputs in enumerate(prompts):
            shift = (rep + i) % len(names)
            for name in names[shift:] + names[:shift]:
                t, dec = prefill(name, inputs)
                totals[name][0] += t
                totals[name][1] += dec
        for name in names:
            whole[name].append(totals[name][0])
            stack[name].append(totals[name][1])
    result = {name: {"prefill_s": statistics.median(whole[name]), "decoder_s": statistics.median(stack[name])}
              for name in names}
    result["_prompt_len"] = sum(p["input_ids"].shape[1] for p in prompts) / len(prompts)
    return result


def config_skipped(model_dir) -> list[int]:
    """The attention blocks an EAS checkpoint skips (none for a plain one)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("eas", {}).get("skipped_layers", [])


def mac_shares(dense_dir: Path, prompt_len: float, skipped: int) -> dict:
    """Attention and FFN MACs per token of one decoder block (causal QK^T and AV at the mean
    prompt length), and the share of block MACs that skipping `skipped` attention blocks removes."""
    text = json.loads((Path(dense_dir) / "config.json").read_text())["text_config"]
    d, m, heads, kv = text["hidden_size"], text["intermediate_size"], text["num_attention_heads"], text["num_key_value_heads"]
    hd = text.get("head_dim") or d // heads
    attn = d * hd * (2 * heads + 2 * kv) + int(2 * heads * hd * (prompt_len + 1) / 2)
    ffn = 3 * d * m
    layers = text["num_hidden_layers"]
    return {"attn_macs": attn, "ffn_macs": ffn, "prompt_len": prompt_len, "layers": layers, "hidden": d,
            "skipped_k2": skipped, "share_k2": skipped * attn / (layers * (attn + ffn))}


def _skip_counts(rows: list[dict]) -> str:
    """"K=0.25 skips 8 and K=0.5 skips 15", from the skipped layers of the dense EAS rows."""
    by_name = {r["name"]: r for r in rows}
    counts = [f"K={k} skips {len(by_name[f'dense + EAS K={k}']['skipped'].split(', '))}" for k in KS]
    return " and ".join(counts)


def markdown(rows: list[dict], meta: dict) -> str:
    by_name = {r["name"]: r for r in rows}
    fold_slower = (by_name["dense + EAS K=0.5, PIA folded into the FFN"]["prefill_s"]
                   > by_name["dense + EAS K=0.5"]["prefill_s"])
    tiny = meta["hidden"] <= 256  # a width at which per-operation overhead, not MACs, sets CPU time
    lines = [
        f"## EAS: attention skipping with PIA adapters on {meta['title']}",
        "",
        f"Generated by `{meta['command']}` in {meta['minutes']:.1f} min"
        + (" (`--reuse`: models trained by an earlier run, training minutes in the last column)"
           if meta["reuse"] else "") + " on this machine's CPU"
        + (f" ({meta['cores']} cores, 1-minute load average {meta['load_average_1min'][0]:.1f} at the start, "
           f"{meta['load_average_1min'][1]:.1f} at the end)" if "load_average_1min" in meta else "")
        + ", from the embedded checkpoint with model.safetensors sha1 "
        f"{meta['dense_sha1']}…; EAS trainings with the default settings"
        + (f" plus `{meta['train_args']}`" if meta["train_args"] else "") + f". Accuracy: `python -m llava.eval` on the {meta['eval_n']} held-out eval "
        "records (greedy exact match). Prefill: median over "
        f"{meta['repeats']} alternating repeats of {meta['n_prompts']} eval prompts, batch 1, one thread, "
        "KV cache, last-position logits, "
        + ("CPU time of the thread; " if meta.get("clock") == "cpu" else "")
        + "*whole* = model forward (vision tower included), *decoder* = "
        f"the Llama stack alone. The decoder has {meta['layers']} blocks (d {meta['hidden']}), so "
        f"{_skip_counts(rows)}; layer 0 is never skipped. Adapters trained on fresh synthetic samples "
        "(task `eas_train`, validation `eas_val`), never on the eval split; everything else frozen. "
        "TAMP's unstructured zeros give no CPU speedup: only skipping does.",
        "",
        "| model | skipped layers | accuracy | answer ppl | prefill whole (s) | speedup | prefill decoder (s) | speedup | search + training (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['skipped'] or '-'} | {r['accuracy']:.3f} | {r['answer_perplexity']:.3f} | "
            f"{r['prefill_s']:.3f} | {r['speedup']:.2f}x | {r['decoder_s']:.3f} | {r['decoder_speedup']:.2f}x | "
            f"{r['train_minutes'] if r['train_minutes'] is not None else '-'} |")
    reaches = 1 - 1 / meta["decoder_speedup_k2"] >= meta["share_k2"]
    lines += ["", f"Where the time goes: per prompt token, one decoder block spends {meta['attn_macs']:,} MACs in "
              f"attention (q/k/v/o and QK^T, AV at the mean prompt length {meta['prompt_len']:.0f}) and "
              f"{meta['ffn_macs']:,} in the FFN, so skipping {meta['skipped_k2']} of {meta['layers']} attention "
              f"blocks removes about {meta['share_k2']:.0%} of the decoder-block MACs. "
              + (f"At d = {meta['hidden']} a batch-1 CPU prefill is bound by per-operation overhead, and "
                 if tiny else "")
              + ("the" if tiny else "The") + " adapter with its routing (pooling, router, propagated vector) adds small operations of its own"
              + ("; the decoder's gain still reaches the MAC share" if reaches
                 else ", so the decoder's measured gain stays below the MAC share")
              + "; the per-example fold "
              + ("adds more at prefill than it saves" if fold_slower else "saves a little more at prefill")
              + ". Measured prefill speedup "
              f"of dense + EAS K=0.5: {meta['speedup_k2']:.2f}x whole, {meta['decoder_speedup_k2']:.2f}x decoder; "
              f"as a gauge of run-to-run noise, the TAMP model (architecture identical to dense) measured "
              f"{meta['speedup_tamp']:.2f}x / {meta['decoder_speedup_tamp']:.2f}x.", ""]
    lines += ["Search probabilities p = sigmoid(theta) per candidate layer at the end of the search:", ""]
    for r in rows:
        if r.get("probs"):
            probs = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(r["probs"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"- {r['name']}: {probs}")
    lines += ["", "Speedups are against the dense model (same process, same prompts, interleaved). The "
              "*folded* row is the K=0.5 model with the PIA folded into gate/up per example at prefill "
              "(its accuracy is the unfused row's: same model, outputs equal up to float rounding, "
              "tests/test_eas.py); saved models run unfused by default. One seed per row."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava.eas.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/mmprune-eas-results"))
    parser.add_argument("--reuse", action="store_true", help="keep models already in --work_dir")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--eval_samples", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--n_prompts", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--train_args", default="", help="extra flags for python -m llava.eas (quoted)")
    parser.add_argument("--render", type=Path, default=None,
                        help="only rewrite the docs section from a saved eas_results.json (no measuring)")
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        update_markdown_section(str(args.results), saved["meta"].get("section", "eas"),
                                markdown(saved["rows"], saved["meta"]))
        return 0
    source = embedded.default_checkpoint()
    suffix = embedded.results_suffix(source)
    saved_json = args.results.parent / f"eas_results{suffix}.json"  # beside the markdown, for --render
    # before training anything: the model folders it replaces are its own, and no output is an input
    inputs = [source, embedded.DATA_ROOT]
    check_output_location(str(args.results), inputs, "--results")
    check_output_location(str(saved_json), inputs, "--results")
    for name in MODEL_FOLDERS:
        check_output_dir(str(args.work_dir / name), True, inputs, flag="--work_dir")
    start = time.monotonic()
    load_start = os.getloadavg()[0]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    models = build_models(args.work_dir, args.reuse, args.train_args.split(), source)
    rows = []
    for name, (path, _) in models.items():
        result = _evaluate(path, args.eval_samples)
        row = {"name": name, "path": str(path), "accuracy": result["accuracy"],
               "answer_perplexity": result["answer_perplexity"], "n": result["n"], "skipped": None,
               "train_minutes": None, "probs": None}
        report = Path(path) / "eas_report.json"
        skipped = config_skipped(path)
        if skipped:
            row["skipped"] = ", ".join(map(str, skipped))
        if report.is_file():
            info = json.loads(report.read_text())
            row["train_minutes"] = info["minutes"]
            row["probs"] = info["search"].get("probs")
        rows.append(row)
    entries = {name: (path, None) for name, (path, _) in models.items()}
    fused_name = "dense + EAS K=0.5, PIA folded into the FFN"
    entries[fused_name] = (models["dense + EAS K=0.5"][0], True)
    rows.append(dict(next(r for r in rows if r["name"] == "dense + EAS K=0.5"), name=fused_name, probs=None))
    timing = time_prefill(entries, args.n_prompts, args.repeats)
    dense = timing["dense"]
    for row in rows:
        t = timing[row["name"]]
        row.update(prefill_s=t["prefill_s"], decoder_s=t["decoder_s"], speedup=dense["prefill_s"] / t["prefill_s"],
                   decoder_speedup=dense["decoder_s"] / t["decoder_s"])
    digest = hashlib.sha1((models["dense"][0] / "model.safetensors").read_bytes()).hexdigest()[:12]
    meta = {"command": "python -m llava.eas.results" + (" --reuse" if args.reuse else ""), "minutes": (time.monotonic() - start) / 60,
            "dense_sha1": digest, "train_args": args.train_args, "reuse": args.reuse,
            "eval_n": rows[0]["n"], "repeats": args.repeats, "n_prompts": args.n_prompts,
            "cores": os.cpu_count(), "load_average_1min": [load_start, os.getloadavg()[0]],
            "title": embedded.model_title(source), "section": "eas" + suffix.replace("_", "-"), "clock": "cpu",
            **mac_shares(models["dense"][0], timing["_prompt_len"],
                         len(config_skipped(models["dense + EAS K=0.5"][0])))}
    by_name = {r["name"]: r for r in rows}
    for key, name in (("k2", "dense + EAS K=0.5"), ("tamp", "TAMP 0.5")):
        meta[f"speedup_{key}"] = by_name[name]["speedup"]
        meta[f"decoder_speedup_{key}"] = by_name[name]["decoder_speedup"]
    update_markdown_section(str(args.results), meta["section"], markdown(rows, meta))
    write_json_file(str(saved_json), {"rows": rows, "meta": meta})
    print(json.dumps({"minutes": round(meta["minutes"], 1), "rows": [
        {k: r[k] for k in ("name", "skipped", "accuracy", "speedup", "decoder_speedup")} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
