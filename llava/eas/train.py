"""`python -m llava.eas`: EAS on a LLaVA-NeXT checkpoint: search which attention blocks to skip,
retrain the PIA adapters for that skip set, save a model that every tool of the project loads.

    python -m llava.eas --output_dir DIR [--model_path DIR] [--k 0.5] [--skip_layers 2,3] ...

Steps (docs/eas.md): (1) supernet training of a PIA on every candidate layer (1..L-1) with K
sampled layers skipped per step, scored by a REINFORCE policy on validation loss; (2) the top-K
layers by policy probability are skipped and fresh adapters are trained for them from the base
model; (3) skipped layers lose their attention, the config gets an "eas" field, the model is
saved. Everything but the adapters stays frozen.

Training data: the embedded default draws fresh single-question samples from
`llava.embedded.synthetic_vqa` with task names "eas_train" / "eas_val" (the held-out eval split
is a different task and seed and is never read for training). With --data_path, records of one
task of a LLaVA-NeXT raw-format file (the calibration split by default); a fixed 10% of them is
the validation set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from llava.adapter import save_weights
from llava.convert.loading import load_llava_next
from llava.data import collate, encode_conversation, encode_record, load_records, model_inputs, select_task
from llava.eas import settings_of, write_settings
from llava.embedded import paths as embedded, synthetic_vqa as vqa
from llava.model import decoder_layers
from mmprune.skip import eas
from mmprune.run.checks import check_seed, resolve_device
from mmprune.run.cli import check_eval_samples
from mmprune.base.entry import OneLineErrorParser, run_main
from mmprune.base.errors import UserInputError
from mmprune.base.output import atomic_output_dir, check_output_dir

TRAIN_TASK = "eas_train"
VAL_TASK = "eas_val"
REAL_MODEL, REAL_DATA = embedded.REAL_MODEL, embedded.REAL_DATA


def parse_args(argv):
    parser = OneLineErrorParser(prog="python -m llava.eas", description=__doc__.split("\n\n")[0])
    io = parser.add_argument_group("model and data")
    io.add_argument("--model_path", default=None, help=f"llava-hf / lmms-lab checkpoint (default {REAL_MODEL}, "
                                                       "else the embedded tiny model)")
    io.add_argument("--output_dir", required=True, help="where the EAS model is written (refused if it exists)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    io.add_argument("--data_path", default=None, help="LLaVA-NeXT raw-format JSON to train on (default: "
                                                      f"{REAL_DATA} if present, else the synthetic generator)")
    io.add_argument("--image_folder", default=None)
    io.add_argument("--task_split_path", default=None, help="task_split.json (default: beside the data JSON)")
    io.add_argument("--task_name", default="sharegpt4v", help="task of --data_path to train on")
    eas_args = parser.add_argument_group("EAS")
    eas_args.add_argument("--k", type=float, default=None,
                          help="attention blocks to skip: a count, or a fraction of the blocks (default 0.5; "
                               "with --skip_layers it must agree with them)")
    eas_args.add_argument("--skip_layers", default=None,
                          help="comma-separated layers to skip: no search, only adapter training")
    eas_args.add_argument("--rank", type=int, default=None, help="PIA hidden size r (default min(128, d/4))")
    eas_args.add_argument("--groups", type=int, default=2)
    eas_args.add_argument("--tau", type=float, default=10.0, help="router temperature")
    eas_args.add_argument("--scale", type=float, default=1.0)
    eas_args.add_argument("--dropout", type=float, default=0.1)
    eas_args.add_argument("--fuse", action="store_true",
                          help="save the model with PIA folded into the FFN at inference (default: unfused, "
                               "faster on the embedded model; docs/eas.md)")
    eas_args.add_argument("--search_steps", type=int, default=300)
    eas_args.add_argument("--warmup_steps", type=int, default=100,
                          help="search warm-up: K ramps from 1 and the policy is not updated")
    eas_args.add_argument("--nas_turn", type=int, default=3, help="steps between policy updates")
    eas_args.add_argument("--nas_samples", type=int, default=5, help="configurations scored per update")
    eas_args.add_argument("--eta", type=float, default=1.0, help="policy step size")
    eas_args.add_argument("--finetune_steps", type=int, default=500, help="adapter training with the skip set fixed")
    eas_args.add_argument("--batch_size", type=int, default=16)
    eas_args.add_argument("--lr", type=float, default=1e-3)
    eas_args.add_argument("--weight_decay", type=float, default=0.0)
    eas_args.add_argument("--val_batches", type=int, default=4, help="fixed validation batches (cycled)")
    eas_args.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None)
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 for tiny models)")
    run.add_argument("--eval", dest="eval", action="store_true", default=None,
                     help="evaluate base and EAS model (default: on for the embedded model only)")
    run.add_argument("--no_eval", dest="eval", action="store_false")
    run.add_argument("--eval_data_path", default=None)
    run.add_argument("--eval_image_folder", default=None)
    run.add_argument("--eval_samples", type=int, default=None)
    return parser.parse_args(argv)


def resolve_paths(args) -> bool:
    """Real paths when present, else the embedded default (banner). Returns: embedded model?"""
    notes = []
    embedded_model = embedded.resolve_model(args, notes)
    if args.data_path is None and os.path.isfile(REAL_DATA):
        args.data_path = REAL_DATA
    if args.data_path is None:
        notes.append(f"data:  {REAL_DATA} not found -> fresh synthetic VQA (tasks {TRAIN_TASK!r}/{VAL_TASK!r})")
    else:
        eval_path = os.path.realpath(embedded.EVAL_DATA_PATH)
        if os.path.realpath(args.data_path) == eval_path or (
                args.eval_data_path and os.path.realpath(args.data_path) == os.path.realpath(args.eval_data_path)):
            raise UserInputError(f"--data_path {args.data_path} is the held-out eval split; EAS never trains on "
                                 "it: pass a training or calibration file")
        args.image_folder = args.image_folder or os.path.dirname(os.path.abspath(args.data_path))
        args.task_split_path = args.task_split_path or os.path.join(
            os.path.dirname(os.path.abspath(args.data_path)), "task_split.json")
    embedded.announce(notes)
    return embedded_model


# ------------------------------------------------------------------------------ data


class Batches:
    """Training batches (fresh each step) and fixed validation batches."""

    def __init__(self, processor, args):
        self.processor, self.batch_size = processor, args.batch_size
        self.pad = processor.tokenizer.pad_token_id
        if args.data_path is None:
            self.stream = vqa.iter_samples(TRAIN_TASK, args.seed)
            self.records = None
            val = vqa.generate(VAL_TASK, args.val_batches * args.batch_size, args.seed)
            encoded = [encode_conversation(processor, vqa.to_record(s, VAL_TASK, i), s.image) for i, s in enumerate(val)]
        else:
            records = select_task(load_records(args.data_path), args.task_split_path, args.task_name, None, args.seed)
            # a fixed 10% (by id hash) validates; the rest trains
            is_val = [int(hashlib.sha1(str(r.get("id", i)).encode()).hexdigest(), 16) % 10 == 0
                      for i, r in enumerate(records)]
            self.records = [r for r, v in zip(records, is_val) if not v]
            val_records = [r for r, v in zip(records, is_val) if v][:args.val_batches * args.batch_size]
            if not self.records or not val_records:
                raise UserInputError(f"task {args.task_name!r} has {len(records)} records; EAS needs at least 20 "
                                     "to train and validate: choose a larger task")
            self.image_folder = args.image_folder
            self.rng = random.Random(args.seed)
            encoded = [encode_record(processor, r, args.image_folder) for r in val_records]
        self.val = [collate(encoded[i:i + self.batch_size], self.pad) for i in range(0, len(encoded), self.batch_size)]

    def train(self) -> dict:
        if self.records is None:
            samples = [next(self.stream) for _ in range(self.batch_size)]
            encoded = [encode_conversation(self.processor, vqa.to_record(s, TRAIN_TASK, i), s.image)
                       for i, s in enumerate(samples)]
        else:
            encoded = [encode_record(self.processor, r, self.image_folder)
                       for r in self.rng.sample(self.records, min(self.batch_size, len(self.records)))]
        return collate(encoded, self.pad)


def _loss(model, batch, device) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return model(**inputs, labels=batch["labels"].to(device), use_cache=False).loss


# ------------------------------------------------------------------------------ training


class AdapterTrainer:
    """AdamW on the adapters of the current candidate layers, warm-up + cosine over `steps`."""

    def __init__(self, model, layers, args, steps: int):
        self.model, self.layers, self.args, self.steps = model, layers, args, steps
        self.params = eas.adapter_parameters(layers)
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
        self.warmup = max(1, int(0.03 * steps))

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.args.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def step(self, batch, skip, step: int) -> float:
        state = self.model.eas_state
        state.skip = set(skip)
        for layer in self.layers:
            if hasattr(layer, "eas_pia"):
                layer.eas_pia.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)
        loss = _loss(self.model, batch, self.args.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss.item()


@torch.no_grad()
def validation_loss(model, layers, batch, skip, device) -> float:
    state = model.eas_state
    state.skip = set(skip)
    for layer in layers:
        if hasattr(layer, "eas_pia"):
            layer.eas_pia.eval()
    return _loss(model, batch, device).item()


def search(model, layers, batches: Batches, args, k: int) -> eas.SearchResult:
    candidates = list(range(1, len(layers)))
    eas.attach(model, layers, candidates, args.rank, args.groups, args.tau, args.scale, args.dropout, fuse=False)
    trainer = AdapterTrainer(model, layers, args, args.search_steps)
    turn = {"n": 0}

    def val(skip):
        batch = batches.val[turn["n"] % len(batches.val)]
        return validation_loss(model, layers, batch, skip, args.device)

    def train_step(skip, step):
        if step >= args.warmup_steps and (step - args.warmup_steps) % args.nas_turn == 0:
            turn["n"] += 1  # a new validation batch for each policy update
        return trainer.step(batches.train(), skip, step)

    cfg = eas.SearchConfig(k=k, steps=args.search_steps, warmup=args.warmup_steps, nas_turn=args.nas_turn,
                           nas_samples=args.nas_samples, eta=args.eta, seed=args.seed)
    return eas.search_skip_set(candidates, cfg, train_step, val)


def finetune(model, layers, batches: Batches, args, skip) -> dict:
    """Fresh adapters on the skip set only, trained from the base model."""
    for layer in layers:
        if hasattr(layer, "eas_pia"):
            del layer.eas_pia
    torch.manual_seed(args.seed + 1)
    eas.attach(model, layers, skip, args.rank, args.groups, args.tau, args.scale, args.dropout, fuse=False)
    trainer = AdapterTrainer(model, layers, args, args.finetune_steps)
    bar = tqdm(range(args.finetune_steps), desc=f"EAS adapters (skip {skip})", file=sys.stderr)
    losses = []
    for step in bar:
        losses.append(trainer.step(batches.train(), skip, step))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    val = [validation_loss(model, layers, b, skip, args.device) for b in batches.val]
    return {"final_train_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
            "validation_loss": round(sum(val) / len(val), 5)}


def parse_skip_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise UserInputError(f"--skip_layers {text!r}: give comma-separated layer numbers") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    uses_embedded = resolve_paths(args)
    if args.eval is None:
        args.eval = uses_embedded
    check_output_dir(args.output_dir, args.overwrite, [args.model_path, args.data_path, args.image_folder,
                                                        args.task_split_path, args.eval_data_path, args.eval_image_folder],
                     flag="--output_dir / OUTPUT_DIR")
    skip = parse_skip_layers(args.skip_layers)
    if args.k is not None:
        eas.check_k(args.k)
    eas.check_settings(lr=args.lr, weight_decay=args.weight_decay, tau=args.tau, scale=args.scale, dropout=args.dropout,
                       groups=args.groups, rank=args.rank, eta=args.eta, search=skip is None,
                       search_steps=args.search_steps, warmup_steps=args.warmup_steps,
                       counts={f"--{name}": getattr(args, name) for name in (
                           "finetune_steps", "batch_size", "val_batches", "nas_turn", "nas_samples")})
    check_eval_samples(args)
    check_seed(args.seed)
    args.device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    start = time.monotonic()
    model, processor = load_llava_next(args.model_path)
    if settings_of(model) is not None:
        raise UserInputError(f"{args.model_path} already skips attention (EAS); start from the model it was made from")
    model.to(args.device)
    if args.device == "cpu":
        from mmprune.run.cli import set_cpu_threads

        set_cpu_threads(model, args.threads)
    _, layers = decoder_layers(model)
    config = model.config.get_text_config()
    args.rank = args.rank or max(args.groups, min(128, config.hidden_size // 4))
    if skip is not None:
        eas.check_skip_layers(skip, len(layers), args.k)
        k = len(skip)
    else:
        k = eas.resolve_k(0.5 if args.k is None else args.k, len(layers))
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()

    eval_records = eval_folder = None
    evaluation = {}
    if args.eval:
        from llava.eval import evaluate

        eval_path = args.eval_data_path or str(embedded.EVAL_DATA_PATH)
        eval_folder = args.eval_image_folder or (str(embedded.EVAL_IMAGE_FOLDER) if not args.eval_data_path
                                                 else os.path.dirname(os.path.abspath(eval_path)))
        eval_records = load_records(eval_path)[:args.eval_samples]
        evaluation["base"] = evaluate(model, processor, eval_records, eval_folder, desc="evaluate base")

    batches = Batches(processor, args)
    search_info = {}
    if skip is not None:
        search_info = {"searched": False}
    else:
        result = search(model, layers, batches, args, k)
        skip = result.skip
        search_info = {"searched": True, "probs": result.probs, "history": result.history}
    sys.stderr.write(f"EAS: skipping the attention of layers {skip}\n")
    train_info = finetune(model, layers, batches, args, skip)

    eas.finalize(layers, skip, model.eas_state)
    model.eas_state.fuse = args.fuse
    model.eval()
    settings = write_settings(model, skip, args.rank, args.groups, args.tau, args.scale, fuse=args.fuse,
                              base_model=str(args.model_path), k=len(skip), num_layers=len(layers))
    if args.eval:
        from llava.eval import evaluate

        evaluation["eas"] = evaluate(model, processor, eval_records, eval_folder, desc="evaluate EAS")
    minutes = (time.monotonic() - start) / 60
    report = {"settings": settings, "search": search_info, "training": train_info,
              "options": {k_: v for k_, v in vars(args).items()}, "minutes": round(minutes, 2),
              "adapter_parameters": sum(p.numel() for p in eas.adapter_parameters(layers)),
              "evaluation": evaluation or None}
    with atomic_output_dir(args.output_dir, args.overwrite) as staging:
        save_weights(model, staging)  # llava-hf layout
        processor.save_pretrained(staging)
        with open(os.path.join(staging, "eas_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    summary = {"output_dir": args.output_dir, "skipped_layers": skip, "minutes": round(minutes, 2)}
    if evaluation:
        summary["base_accuracy"] = evaluation["base"]["accuracy"]
        summary["eas_accuracy"] = evaluation["eas"]["accuracy"]
        sys.stderr.write(f"\naccuracy base {summary['base_accuracy']:.3f} -> EAS {summary['eas_accuracy']:.3f}\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
