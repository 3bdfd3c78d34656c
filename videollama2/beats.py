"""BEATs audio encoder (Chen et al., 2022) as used by VideoLLaMA2-AV, with the released
checkpoint's parameter names (`model.audio_tower.*` minus the prefix).

Forward on Kaldi fbank features F (B, n_frames, 128):
  normalise (F - mean) / (2 std); 16x16 patches (Conv2d, no bias) -> (B, T'*F', embed), time-major;
  LayerNorm; Linear to the encoder width; add GELU(convolutional positional embedding);
  LayerNorm (post-LN models); encoder layers with a bucketed relative position bias computed once
  from layer 0's table and gated per query in every layer; deep-norm residual scaling.

The relative position table exists only in layer 0 (the reference implementation shares layer
0's module with every other layer), and the encoder computes the bias once and passes it to
every layer as `position_bias`, so each layer can be run alone (the pruning driver replays
layers one by one with the captured call arguments).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

ATTENTION_ALPHA = 32.0  # the reference scales q by 1/alpha and the shifted logits back by alpha


@dataclass
class BEATsConfig:
    """Defaults are the BEATs configuration VideoLLaMA2-AV builds when none is given."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = True  # builds the (unused) `predictor` classification head
    predictor_class: int = 527
    fbank_mean: float = 15.41663
    fbank_std: float = 6.55582
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, values: dict | None) -> "BEATsConfig":
        """Known fields from `values`; other keys (dropouts, layer drop, ...) do not change inference."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int,
                              device=None) -> torch.Tensor:
    """(Q, K) bucket index of key position minus query position, bidirectional: half the buckets
    for positive offsets; within a half, exact buckets for small offsets and log-spaced ones up to
    max_distance."""
    context = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
    memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
    relative = memory - context
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    scaled = torch.log(distance.clamp_min(1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = torch.clamp(exact + scaled.long(), max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


class BEATsAttention(nn.Module):
    """Multi-head self-attention with the gated relative position bias (batch first)."""

    def __init__(self, cfg: BEATsConfig, owns_position_table: bool):
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        if dim % heads:
            raise ValueError(f"BEATs width {dim} is not divisible by {heads} heads")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim ** -0.5
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if cfg.relative_position_embedding and owns_position_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def compute_bias(self, length: int, device=None) -> torch.Tensor:
        """(heads, length, length) bias from this layer's table; the buckets are made on `device` (the
        activations' device: an offloaded table sits on the meta device until its hook loads it)."""
        table = self.relative_attention_bias
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance,
                                            device if device is not None else table.weight.device)
        return table(buckets).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, self.head_dim

        def split(t):
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        q = split(self.q_proj(x) * (self.scaling / ATTENTION_ALPHA))
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        logits = q @ k.transpose(-1, -2)
        logits = (logits - logits.amax(dim=-1, keepdim=True)) * ATTENTION_ALPHA
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)
            if self.gru_rel_pos:
                unscaled_q = q * (ATTENTION_ALPHA / self.scaling)
                gates = torch.sigmoid(self.grep_linear(unscaled_q).view(batch, heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            logits = logits + bias
        probs = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(out)


class BEATsLayer(nn.Module):
    """Transformer layer; post-LN with deep-norm residual scaling (the released BEATs) or pre-LN."""

    def __init__(self, cfg: BEATsConfig, index: int):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = BEATsAttention(cfg, owns_position_table=index == 0)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        if cfg.activation_fn not in ("gelu", "relu"):
            raise ValueError(f"unsupported BEATs activation {cfg.activation_fn!r}")
        self.activation = F.gelu if cfg.activation_fn == "gelu" else F.relu
        self.layer_norm_first = cfg.layer_norm_first
        self.residual_scale = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.residual_scale + self.fc2(self.activation(self.fc1(x))))


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is g * v / ||v||, the norm taken over all dims but the kernel
    dim (parameters `weight_g` (1, 1, K) and `weight_v`, as in the checkpoint)."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.groups = groups
        self.padding = kernel_size // 2
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel_size * channels)))

    def weight(self) -> torch.Tensor:
        v = self.weight_v.float()
        scale = torch.rsqrt(v.pow(2).sum(dim=(0, 1), keepdim=True) + 1e-6)
        return self.weight_g * (v * scale).to(self.weight_v.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class TrimLast(nn.Module):
    """Drop the extra last step that an even kernel with padding K // 2 produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :-self.trim] if self.trim else x


class BEATsEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups),
                                      TrimLast(cfg.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(BEATsLayer(cfg, i) for i in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.layer_norm_first = cfg.layer_norm_first
        self.relative_position_embedding = cfg.relative_position_embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        bias = self.layers[0].self_attn.compute_bias(x.shape[1], x.device) if self.relative_position_embedding else None
        for layer in self.layers:
            x = layer(x, position_bias=bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.input_patch_size,
                                         stride=cfg.input_patch_size, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        self.encoder = BEATsEncoder(cfg)
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None

    def token_count(self, n_frames: int, n_bins: int = 128) -> int:
        patch = self.cfg.input_patch_size
        return (n_frames // patch) * (n_bins // patch)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, n_frames, n_bins) fbank -> (B, T' * F', encoder width), time-major."""
        x = (fbank - self.cfg.fbank_mean) / (2 * self.cfg.fbank_std)
        x = self.patch_embedding(x.unsqueeze(1).to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x)
