"""The SmolLM2 trainers' LoRA on decoder linears (peft): which layers and linears, loading an earlier
adapter, and merging it exactly as `smol assemble` does (the VideoLLaMA2-AV trainer uses these too)."""

from __future__ import annotations

from pathlib import Path

from llava.embedded import smol
from mmprune.base.errors import UserInputError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_indices(spec: str, count: int) -> list:
    if spec == "all":
        return list(range(count))
    chosen = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        chosen.update(range(int(first), int(last or first) + 1))
    if not chosen or min(chosen) < 0 or max(chosen) >= count:
        raise UserInputError(f"--lora-layers {spec!r}: layers run from 0 to {count - 1}")
    return sorted(chosen)


def add_lora(model, args):
    """peft LoRA on the chosen decoder linears; the other trainable parts stay trainable."""
    from peft import LoraConfig, get_peft_model

    layers = layer_indices(args.lora_layers, model.config.text_config.num_hidden_layers)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise UserInputError(f"--lora-targets: unknown {unknown}; choose from {','.join(LORA_TARGETS)}")
    names = [name for name, _ in model.named_modules()
             if name.startswith("model.language_model.layers.") and name.rsplit(".", 1)[-1] in targets
             and int(name.split(".")[3]) in layers]
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                        target_modules=names, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, config)
    for p in trainable:  # get_peft_model freezes everything but the adapter
        p.requires_grad_(True)
    return peft_model, {"rank": config.r, "alpha": config.lora_alpha, "layers": layers, "targets": targets,
                        "modules": len(names)}


def load_adapter(peft_model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (folder / smol.ADAPTER_TENSORS).is_file():
        raise UserInputError(f"--init-adapter {folder} has no {smol.ADAPTER_TENSORS}")
    result = set_peft_model_state_dict(peft_model, load_file(folder / smol.ADAPTER_TENSORS))
    if result.unexpected_keys:
        raise UserInputError(f"--init-adapter {folder} does not fit --lora-layers/--lora-targets "
                             f"({result.unexpected_keys[:2]})")


def merge_lora_in_place(peft_model, adapter_dir: Path):
    """The plain model with the saved adapter merged exactly as `smol assemble` merges it."""
    deltas = smol.lora_deltas(adapter_dir)
    model = peft_model.unload()  # LoRA layers out, base weights untouched
    weights = dict(model.named_parameters())
    tensors = {name: weights[name].data for name in deltas}
    smol.merge_deltas(tensors, deltas)
    for name, tensor in tensors.items():
        weights[name].data = tensor
    return model
