"""One side of the peer benchmark, run as its own process by bench/peer.py (in .venv-peer, where
llm-compressor and this package are both installed):

    python -m bench.peer_side --side ours|theirs --method wanda|sparsegpt --nsamples N --out FILE

Both sides prune the embedded tiny LLaVA-NeXT at 50 % unstructured on the same calibration
records (`select_task`, seed 42, encoded by `llava.data.encode_record`), load the model from disk
and save the pruned one. Imports (and one warm-up load of the model, which pulls in the rest of
transformers' lazy imports) happen before the clock starts; the timed part is load + encode +
calibrate + prune + save. Memory: the process's peak resident
set above what it held after the imports.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.common import _reset_hwm, _status_kb, rss_mb  # noqa: E402
from llava.embedded import paths as embedded  # noqa: E402

SEED = 42
# llm-compressor prunes only the decoder linears, like ours (tests/peer/test_llmcompressor.py)
IGNORE = ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def run_ours(method: str, nsamples: int, out_dir: str) -> None:
    from llava.pruners.__main__ import main as prune_main

    argv = ["--model_path", str(embedded.CHECKPOINT_DIR), "--data_path", str(embedded.DATA_PATH),
            "--image_folder", str(embedded.IMAGE_FOLDER), "--task_split_path", str(embedded.TASK_SPLIT_PATH),
            "--nsamples", str(nsamples), "--seed", str(SEED), "--method", method, "--llm_sparsity_ratio", "0.5",
            "--sparsity_type", "unstructured", "--save_model", out_dir, "--no_eval", "--device", "cpu",
            "--dtype", "float32"]
    if prune_main(argv) != 0:
        raise SystemExit(f"our {method} run failed")


def run_theirs(method: str, nsamples: int, out_dir: str) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from torch.utils.data import DataLoader
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava.data import encode_record, load_records, model_inputs, select_task

    path = str(embedded.CHECKPOINT_DIR)
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    records = select_task(load_records(embedded.DATA_PATH), embedded.TASK_SPLIT_PATH, embedded.CALIBRATION_TASK,
                          nsamples, SEED)
    batches = [model_inputs(encode_record(processor, r, embedded.IMAGE_FOLDER, with_answer=True)) for r in records]
    loader = DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda batch: batch[0])
    if method == "wanda":
        modifier = WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=IGNORE)
    else:
        modifier = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=IGNORE,
                                     block_size=128, dampening_frac=0.01)
    pruned = oneshot(model=model, processor=processor, dataset=loader, recipe=[modifier], pipeline="sequential")
    pruned.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=["ours", "theirs"], required=True)
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # everything either side imports, before the clock
    import transformers  # noqa: F401

    import llava.pruners.__main__  # noqa: F401
    import mmprune.run.report  # noqa: F401 (matplotlib)
    if args.side == "theirs":
        import llmcompressor  # noqa: F401
        import llmcompressor.modifiers.pruning  # noqa: F401
    # transformers imports most of itself lazily on the first load: load once on both sides so
    # neither pays it inside the clock (and the files are in the page cache for both)
    import gc

    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    warm = LlavaNextForConditionalGeneration.from_pretrained(str(embedded.CHECKPOINT_DIR), dtype=torch.float32)
    AutoProcessor.from_pretrained(str(embedded.CHECKPOINT_DIR))
    del warm
    gc.collect()
    base = rss_mb()
    reset = _reset_hwm()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        (run_ours if args.side == "ours" else run_theirs)(args.method, args.nsamples, os.path.join(tmp, "pruned"))
        seconds = time.perf_counter() - start
        peak = _status_kb("VmHWM") / 1024
        model_file = os.path.join(tmp, "pruned", "model.safetensors")
        sparsity = None
        if os.path.exists(model_file):  # achieved sparsity of the decoder linears, as a sanity check
            from safetensors.torch import load_file

            state = load_file(model_file)
            names = [k for k in state if "language_model" in k and ".layers." in k and k.endswith("_proj.weight")]
            sparsity = sum(int((state[k] == 0).sum()) for k in names) / sum(state[k].numel() for k in names)
    with open(args.out, "w") as f:
        json.dump({"side": args.side, "method": args.method, "seconds": seconds, "peak_total_mb": peak,
                   "peak_above_imports_mb": peak - base if reset else None, "rss_after_imports_mb": base,
                   "achieved_sparsity": sparsity, "transformers": transformers.__version__}, f)


if __name__ == "__main__":
    main()
