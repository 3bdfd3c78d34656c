"""STC connector (spatial-temporal convolution) of VideoLLaMA2, with the released parameter names
(`model.mm_projector.*` minus the prefix).

x (B, T, h*w, C_in), row-major patches
  -> per frame: s1 = RegStage(depth, C_in -> C)           (B*T, C, h, w)
  -> sampler = Conv3d(C, C, kernel 2, stride 2) + SiLU     (B, C, T/2, h/2, w/2), floor
  -> per time step: s2 = RegStage(depth, C -> C)
  -> flatten t-major (t, h, w), readout = Linear, GELU, Linear -> (B, T/2 * h/2 * w/2, C)

A RegStage block is a RegNet bottleneck (bottle ratio 1, group size 1, squeeze-excite 0.25):
1x1 conv+norm+SiLU -> 3x3 depthwise conv+norm+SiLU -> SE -> 1x1 conv+norm -> add shortcut
(1x1 conv+norm when the width changes) -> SiLU. Norms are LayerNorm over channels.
`stc_connector_v35` (VideoLLaMA2.1) samples with padding 0; the older `stc_connector` with 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_EPS = 1e-5


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNorm(nn.Module):
    """Conv2d (no bias) + channel LayerNorm (+ SiLU); parameters `conv.*`, `bn.*`."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = ChannelLayerNorm(out_chs, eps=NORM_EPS)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(nn.functional.silu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Bottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = ConvNorm(in_chs, out_chs, 1)
        self.conv2 = ConvNorm(out_chs, out_chs, 3, groups=out_chs)
        self.se = SqueezeExcite(out_chs, int(round(in_chs * se_ratio)))
        self.conv3 = ConvNorm(out_chs, out_chs, 1, act=False)
        self.downsample = ConvNorm(in_chs, out_chs, 1, act=False) if in_chs != out_chs else None
        self.act3 = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act3(self.conv3(self.se(self.conv2(self.conv1(x)))) + shortcut)


class RegStage(nn.Module):
    """Blocks b1..b{depth}; the first changes the width."""

    def __init__(self, depth: int, in_chs: int, out_chs: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_chs if i == 0 else out_chs, out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


class STCConnector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, depth: int = 4, padding: int = 0, downsample=(2, 2, 2)):
        super().__init__()
        self.downsample = tuple(downsample)
        self.padding = padding
        self.s1 = RegStage(depth, in_dim, hidden) if depth else nn.Identity()
        self.sampler = nn.Sequential(
            nn.Conv3d(hidden, hidden, kernel_size=self.downsample, stride=self.downsample, padding=padding, bias=True),
            nn.SiLU())
        self.s2 = RegStage(depth, hidden, hidden) if depth else nn.Identity()
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def output_grid(self, frames: int, side: int) -> tuple[int, int, int]:
        """(t, h, w) after the sampler for `frames` frames of side x side patches."""
        def out(n, k):
            return (n + 2 * self.padding - k) // k + 1
        t, s = self.downsample[0], self.downsample[1]
        return out(frames, t), out(side, s), out(side, self.downsample[2])

    def token_count(self, frames: int, patches: int) -> int:
        return math.prod(self.output_grid(frames, math.isqrt(patches)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, patches, dim = x.shape
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"STC needs a square patch grid, got {patches} patches per frame")
        x = x.reshape(batch * frames, side, side, dim).permute(0, 3, 1, 2)
        x = self.s1(x)
        x = x.reshape(batch, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C, T, h, w)
        x = self.sampler(x)
        steps = x.shape[2]
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * steps, x.shape[1], x.shape[3], x.shape[4])
        x = self.s2(x)
        x = x.reshape(batch, steps, *x.shape[1:]).permute(0, 1, 3, 4, 2).reshape(batch, -1, x.shape[1])
        return self.readout(x)
