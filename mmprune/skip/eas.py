"""EAS: skip redundant attention blocks of a decoder and keep the information flow with a
propagation-of-information adapter (PIA): Wu et al., arXiv 2403.15226; docs/eas.md.

Model-agnostic pieces:

* `PIA`: the adapter (router, pooled propagated vector, two grouped up-maps), its affine form
  PIA(u) = M u + beta for fixed router weights and pooled vector, and `fold_gated_ffn`, which
  moves that affine map into the gate/up projections of a gated FFN (exact in eval mode);
* `attach`: turns Llama-style decoder layers (input_layernorm, self_attn, post_attention_layernorm,
  mlp.{gate,up,down}_proj, mlp.act_fn: Llama and Qwen2 alike) into layers that either run
  normally or skip their attention: y = x + FFN(gamma_post * PIA(input_layernorm(x)));
* the redundancy search: `sample_skip_set`, `reinforce_update`, `search_skip_set`.

Pooling: training pools over prompt positions (before the first supervised label); inference over
the prefill (padding masked), and the pooled router weights and vector are kept for decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmprune.base.errors import UserInputError

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------- PIA


def masked_mean(u: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, d) -> (B, d) float32 mean over positions where mask (B, L) is true (all if None)."""
    u = u.float()
    if mask is None:
        return u.mean(dim=1)
    weights = mask.to(u.dtype)
    count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.einsum("bl,bld->bd", weights, u) / count


def block_diagonal(grouped: torch.Tensor) -> torch.Tensor:
    """(groups, out/groups, in/groups) -> the (out, in) block-diagonal matrix."""
    return torch.block_diag(*grouped.unbind(0))


class PIA(nn.Module):
    """Propagation-of-information adapter on d-wide normalised inputs u, hidden size r.

    Weights are plain parameters (no nn.Linear), so weight pruners that walk a block's linears
    leave the adapter dense. B and D start at zero: the adapter starts as the identity.
    """

    def __init__(self, dim: int, rank: int, groups: int = 2, tau: float = 10.0, scale: float = 1.0,
                 dropout: float = 0.1):
        super().__init__()
        if dim % groups or rank % groups:
            raise UserInputError(f"PIA: hidden size {dim} and rank {rank} must both be divisible by "
                                 f"the {groups} groups; choose another --rank")
        self.dim, self.rank, self.groups = dim, rank, groups
        self.tau, self.scale = tau, scale
        self.dropout = nn.Dropout(dropout)
        self.A_weight = nn.Parameter(torch.empty(rank, dim))
        self.A_bias = nn.Parameter(torch.zeros(rank))
        self.C_weight = nn.Parameter(torch.empty(rank, dim))
        self.C_bias = nn.Parameter(torch.zeros(rank))
        self.B_weight = nn.Parameter(torch.zeros(groups, dim // groups, rank // groups))
        self.B_bias = nn.Parameter(torch.zeros(dim))
        self.D_weight = nn.Parameter(torch.zeros(groups, dim // groups, rank // groups))
        self.D_bias = nn.Parameter(torch.zeros(dim))
        self.router_weight = nn.Parameter(torch.zeros(2, dim))
        self.router_bias = nn.Parameter(torch.zeros(2))
        nn.init.xavier_uniform_(self.A_weight)
        nn.init.xavier_uniform_(self.C_weight)

    def route(self, u: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights w (B, 2) and propagated vector g (B, r), float32, from the pooled u."""
        pooled = masked_mean(u, mask)
        w = torch.softmax(F.linear(pooled, self.router_weight.float(), self.router_bias.float()) / self.tau, dim=-1)
        g = F.linear(pooled, self.A_weight.float(), self.A_bias.float())  # pool(W_A u + b_A), linear
        return w, g

    def mixed_up(self, w: torch.Tensor) -> torch.Tensor:
        """Per example w1*W_B + w2*W_D as grouped blocks (B, groups, d/groups, r/groups), float32."""
        return (w[:, 0, None, None, None] * self.B_weight.float()
                + w[:, 1, None, None, None] * self.D_weight.float())

    def mixed_bias(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, :1] * self.B_bias.float() + w[:, 1:] * self.D_bias.float()

    def forward(self, u: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """PIA(u) (B, L, d) for router weights w and propagated vector g of each example."""
        z = 0.5 * self.dropout(g[:, None, :] + F.linear(u.float(), self.C_weight.float(), self.C_bias.float()))
        batch, length, _ = z.shape
        z = z.reshape(batch, length, self.groups, self.rank // self.groups)
        up = torch.einsum("blgr,bgor->blgo", z, self.mixed_up(w)).reshape(batch, length, self.dim)
        return (u.float() + self.scale * (up + self.mixed_bias(w)[:, None, :])).to(u.dtype)

    def affine(self, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank affine form of the eval-mode adapter: PIA(u) = u + U (C u) + beta.

        Returns U (B, d, r) = (s/2)(w1 W_B + w2 W_D) and beta (B, d) = U (g + b_C) + s(w1 b_B + w2 b_D);
        M = I + U W_C.
        """
        mixed = self.mixed_up(w)
        U = 0.5 * self.scale * torch.stack([block_diagonal(m) for m in mixed])
        beta = torch.einsum("bdr,br->bd", U, g + self.C_bias.float()) + self.scale * self.mixed_bias(w)
        return U, beta


@dataclass
class FoldedFFN:
    """Per-example gate/up weights (B, m, d) and biases (B, m) with gamma and PIA folded in."""

    gate_weight: torch.Tensor
    gate_bias: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor


def fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor, U: torch.Tensor,
                C: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W' u + b' = W (gamma * (u + U C u + beta)) + b, per example, in the low-rank form
    W' = W diag(gamma) + ((W diag(gamma)) U) C: 2 m d r MACs instead of a dense m d d product.
    The input weight is read, never modified."""
    scaled = weight.float() * gamma.float()[None, :]
    folded = scaled[None] + torch.einsum("md,bdr,re->bme", scaled, U, C.float())
    folded_bias = torch.einsum("md,bd->bm", scaled, beta)
    if bias is not None:
        folded_bias = folded_bias + bias.float()
    return folded.to(weight.dtype), folded_bias.to(weight.dtype)


def fold_gated_ffn(mlp: nn.Module, gamma: torch.Tensor, pia: PIA, w: torch.Tensor, g: torch.Tensor) -> FoldedFFN:
    U, beta = pia.affine(w, g)
    gate = fold_linear(mlp.gate_proj.weight, mlp.gate_proj.bias, gamma, U, pia.C_weight, beta)
    up = fold_linear(mlp.up_proj.weight, mlp.up_proj.bias, gamma, U, pia.C_weight, beta)
    return FoldedFFN(*gate, *up)


def _per_example_linear(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if weight.shape[0] == 1:  # batch 1: a plain linear, as fast as the unmodified FFN
        return F.linear(u, weight[0], bias[0])
    return torch.baddbmm(bias[:, None, :], u, weight.transpose(1, 2))


def fused_ffn(mlp: nn.Module, u: torch.Tensor, folded: FoldedFFN) -> torch.Tensor:
    """The gated FFN on u with folded gate/up weights (the original down projection)."""
    gate = _per_example_linear(u, folded.gate_weight, folded.gate_bias)
    up = _per_example_linear(u, folded.up_weight, folded.up_bias)
    return mlp.down_proj(mlp.act_fn(gate) * up)


# ------------------------------------------------------------------------------ runtime state


def prompt_pool_mask(length: int, batch: int, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """(B, L) bool: positions PIA pools over. Padding (attention_mask 0) is excluded; with labels,
    only positions before each row's first supervised label."""
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == mask.shape:
        mask &= attention_mask.bool().to(mask.device)
    positions = torch.arange(length, device=mask.device)
    if labels is not None and labels.shape == mask.shape:
        supervised = labels.to(mask.device) != IGNORE_INDEX
        first = torch.where(supervised.any(dim=1), supervised.int().argmax(dim=1), length)
        mask &= positions[None, :] < first[:, None]
    return mask


@dataclass
class EASState:
    """Shared by the layers of one model: which layers skip now, and the per-example routing.

    `active` is set while the top-level model runs (see `attach`); layers called on their own
    (e.g. by a calibration driver) pool over all their positions and use the unfused adapter.
    """

    skip: set = field(default_factory=set)
    fuse: bool = True
    active: bool = False
    decode: bool = False
    pool_mask: torch.Tensor | None = None
    routes: dict = field(default_factory=dict)  # layer -> (w, g, FoldedFFN | None), kept for decode


def skipped_layer_forward(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """y = x + FFN(gamma_post * PIA(input_layernorm(x))): no attention, no cache update."""
    state: EASState = layer.eas_state
    index = layer.eas_index
    pia: PIA = layer.eas_pia
    u = layer.input_layernorm(hidden_states)
    gamma = layer.post_attention_layernorm.weight
    if state.active and state.decode:
        if index not in state.routes:
            raise RuntimeError(f"EAS layer {index}: decode step without a prefill; run the prompt first")
        w, g, folded = state.routes[index]
    else:
        mask = state.pool_mask if state.active else None
        if mask is not None and mask.shape != u.shape[:2]:
            mask = None
        w, g = pia.route(u, mask)
        folded = None
        if state.active and state.fuse and not pia.training:  # dropout off: PIA is affine
            folded = fold_gated_ffn(layer.mlp, gamma, pia, w, g)
        if state.active:
            state.routes[index] = (w, g, folded)
    if folded is not None:
        return hidden_states + fused_ffn(layer.mlp, u, folded)
    return hidden_states + layer.mlp(gamma * pia(u, w, g))


class _EASLayerMixin:
    """Mixed into the class of each candidate decoder layer: skip or run the base forward."""

    def forward(self, hidden_states, *args, **kwargs):
        if self.eas_index in self.eas_state.skip:
            return skipped_layer_forward(self, hidden_states)
        return super().forward(hidden_states, *args, **kwargs)


_LAYER_CLASSES: dict[type, type] = {}


def _eas_class(base: type) -> type:
    if issubclass(base, _EASLayerMixin):
        return base
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"EAS{base.__name__}", (_EASLayerMixin, base), {})
    return _LAYER_CLASSES[base]


def _model_pre_hook(state: EASState):
    def hook(module, args, kwargs):
        state.active = True
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # "cache" from transformers 5.24
        state.decode = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if state.decode:
            return None
        state.routes.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape[:2] if ids is not None else kwargs["inputs_embeds"].shape[:2]
        device = ids.device if ids is not None else kwargs["inputs_embeds"].device
        state.pool_mask = prompt_pool_mask(shape[1], shape[0], kwargs.get("attention_mask"), kwargs.get("labels"), device)
        return None

    return hook


def _model_post_hook(state: EASState):
    def hook(module, args, kwargs, output):
        state.active = False
        state.pool_mask = None
        return None

    return hook


def attach(model: nn.Module, layers: nn.ModuleList, candidates, rank: int, groups: int = 2, tau: float = 10.0,
           scale: float = 1.0, dropout: float = 0.1, fuse: bool = True) -> EASState:
    """Give each candidate layer a PIA and a forward that skips its attention when the layer is in
    `state.skip`; hook the top-level `model` to track prefill/decode and the pooling mask.
    Returns the shared state (also `model.eas_state`). Idempotent per layer."""
    state = getattr(model, "eas_state", None)
    if state is None:
        state = EASState(fuse=fuse)
        model.eas_state = state
        model.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True)
        model.register_forward_hook(_model_post_hook(state), with_kwargs=True, always_call=True)
    for index in candidates:
        if not 0 < index < len(layers):
            raise UserInputError(f"EAS cannot skip layer {index}: candidates are layers 1..{len(layers) - 1} "
                                 "(the first layer is never skipped)")
        layer = layers[index]
        if not hasattr(layer, "eas_pia"):
            param = next(layer.parameters())
            dim = layer.post_attention_layernorm.weight.shape[0]
            layer.eas_pia = PIA(dim, rank, groups, tau, scale, dropout).to(param.device, param.dtype)
            layer.eas_pia.train(layer.training)
        layer.eas_state, layer.eas_index = state, index
        layer.__class__ = _eas_class(type(layer))
    return state


def finalize(layers: nn.ModuleList, skipped, state: EASState) -> None:
    """Fix the skip set: skipped layers lose their attention, the other layers their PIA."""
    skipped = set(skipped)
    for index, layer in enumerate(layers):
        if index in skipped:
            if getattr(layer, "self_attn", None) is not None:
                del layer.self_attn
        elif hasattr(layer, "eas_pia"):
            del layer.eas_pia
    state.skip = skipped


def adapter_parameters(layers: nn.ModuleList) -> list[nn.Parameter]:
    return [p for layer in layers if hasattr(layer, "eas_pia") for p in layer.eas_pia.parameters()]


# ------------------------------------------------------------------------------- search


def check_k(k: float) -> None:
    """K before the model is known: a whole count >= 1 or a fraction in (0, 1)."""
    if not math.isfinite(k) or k <= 0 or (k >= 1 and k != int(k)):
        raise UserInputError(f"K={k:g}: give a whole number of blocks (>= 1) or a fraction in (0, 1)")


def check_settings(*, lr: float, weight_decay: float, tau: float, scale: float, dropout: float, groups: int,
                   rank: int | None, eta: float, counts: dict[str, int], search: bool,
                   search_steps: int, warmup_steps: int) -> None:
    """EAS hyper-parameters, before the model loads; `counts`: flag -> value that must be >= 1."""
    def refuse(flag, value, rule):
        raise UserInputError(f"{flag} must be {rule}, got {value!r}")

    for flag, value in (("--lr", lr), ("--tau", tau), ("--eta", eta)):
        if not math.isfinite(value) or value <= 0:
            refuse(flag, value, "a positive number")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        refuse("--weight_decay", weight_decay, "zero or positive")
    if not math.isfinite(scale):
        refuse("--scale", scale, "a finite number")
    if not 0 <= dropout < 1:
        refuse("--dropout", dropout, "in [0, 1)")
    for flag, value in counts.items():
        if value < 1:
            refuse(flag, value, "at least 1")
    if groups < 1:
        refuse("--groups", groups, "at least 1")
    if rank is not None and (rank < 1 or rank % groups):
        refuse("--rank", rank, f"a positive multiple of --groups ({groups})")
    if search_steps < 0 or warmup_steps < 0:
        refuse("--search_steps" if search_steps < 0 else "--warmup_steps", min(search_steps, warmup_steps),
               "zero or positive")
    if search and search_steps <= warmup_steps:
        raise UserInputError(f"--search_steps ({search_steps}) must exceed --warmup_steps ({warmup_steps}): the "
                             "policy is only updated after the warm-up, so the search would pick the first K "
                             "layers untested; raise --search_steps or pass --skip_layers")


def check_skip_layers(skip: list[int], num_layers: int, k: float | None) -> None:
    """An explicit skip set: every layer in 1..L-1, and a K given with it must agree with it."""
    for index in skip:
        if not 0 < index < num_layers:
            raise UserInputError(f"--skip_layers: layer {index} cannot be skipped; choose among 1..{num_layers - 1}")
    if k is not None and resolve_k(k, num_layers) != len(skip):
        raise UserInputError(f"K={k:g} means {resolve_k(k, num_layers)} skipped blocks, but --skip_layers names "
                             f"{len(skip)} ({', '.join(map(str, skip))}); drop K or make the two agree")


def resolve_k(k: float, num_layers: int) -> int:
    """K as a count (>= 1) or a fraction of the blocks (< 1), rounded; at most num_layers - 1."""
    count = int(round(k * num_layers)) if 0 < k < 1 else int(k)
    if count != k and k >= 1:
        raise UserInputError(f"K={k}: give a whole number of blocks or a fraction in (0, 1)")
    if not 1 <= count <= num_layers - 1:
        raise UserInputError(f"K={k} gives {count} blocks to skip; the model has {num_layers} blocks and the "
                             f"first is never skipped: choose 1..{num_layers - 1} (or a fraction)")
    return count


def sample_skip_set(probs: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k distinct candidate positions drawn without replacement in proportion to probs."""
    return sorted(torch.multinomial(probs, k, replacement=False, generator=generator).tolist())


def reinforce_update(theta: torch.Tensor, configs: list[list[int]], losses: list[float], eta: float) -> torch.Tensor:
    """theta_i += eta * (R_k - mean R) * p_i (1 - p_i) for every configuration k holding i;
    R_k = exp(-loss_k), p = sigmoid(theta) before the update. Returns the new theta."""
    p = torch.sigmoid(theta)
    rewards = torch.exp(-torch.tensor(losses, dtype=torch.float64))
    advantage = (rewards - rewards.mean()).to(theta.dtype)
    member = torch.zeros(len(configs), theta.numel(), dtype=theta.dtype)
    for row, config in enumerate(configs):
        member[row, config] = 1.0
    return theta + eta * (advantage @ member) * p * (1 - p)


def ramp_k(step: int, warmup: int, k: int) -> int:
    """Skipped blocks per supernet step: 1 at the start of warm-up, k at its end and after."""
    if warmup <= 0 or step >= warmup:
        return k
    return min(k, 1 + (k - 1) * step // warmup)


@dataclass
class SearchConfig:
    k: int
    steps: int = 300
    warmup: int = 100
    nas_turn: int = 3  # steps between policy updates after warm-up
    nas_samples: int = 5  # configurations scored per update
    eta: float = 1.0
    seed: int = 0


@dataclass
class SearchResult:
    skip: list[int]  # layer indices, sorted
    probs: dict[int, float]
    history: list[dict]


def search_skip_set(candidates: list[int], cfg: SearchConfig, train_step: Callable[[list[int], int], float],
                    val_loss: Callable[[list[int]], float], progress: bool = True) -> SearchResult:
    """The sampled skip-set search: supernet training of the adapters (`train_step(skip, step)`
    runs one optimiser step with those layers skipped and returns its loss) with a REINFORCE
    policy over the candidates scored on validation loss (`val_loss(skip)`, no grad).
    Returns the top-k candidates by p = sigmoid(theta) (ties: lower layer first)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    theta = torch.zeros(len(candidates), dtype=torch.float64)
    history = []
    bar = tqdm(range(cfg.steps), desc=f"EAS search (K={cfg.k})", disable=not progress)
    for step in bar:
        picks = sample_skip_set(torch.sigmoid(theta), ramp_k(step, cfg.warmup, cfg.k), generator)
        loss = train_step([candidates[i] for i in picks], step)
        if step >= cfg.warmup and (step - cfg.warmup) % cfg.nas_turn == 0:
            probs = torch.sigmoid(theta)
            configs = [sample_skip_set(probs, cfg.k, generator) for _ in range(cfg.nas_samples)]
            losses = [val_loss([candidates[i] for i in c]) for c in configs]
            theta = reinforce_update(theta, configs, losses, cfg.eta)
            history.append({"step": step, "train_loss": round(loss, 5),
                            "configs": [[candidates[i] for i in c] for c in configs],
                            "val_losses": [round(v, 5) for v in losses],
                            "probs": [round(float(p), 5) for p in torch.sigmoid(theta)]})
        bar.set_postfix(loss=f"{loss:.3f}")
    probs = torch.sigmoid(theta)
    order = sorted(range(len(candidates)), key=lambda i: (-float(probs[i]), i))
    return SearchResult(skip=sorted(candidates[i] for i in order[:cfg.k]),
                        probs={candidates[i]: float(probs[i]) for i in range(len(candidates))}, history=history)

