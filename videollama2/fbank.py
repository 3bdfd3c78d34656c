"""Kaldi-compatible log mel filterbank features in plain torch (torchaudio is not required).

Computes what `torchaudio.compliance.kaldi.fbank(waveform, num_mel_bins=128,
sample_frequency=16000, frame_length=25, frame_shift=10)` computes with its defaults, which is
what BEATs was trained on:

- frames of 25 ms every 10 ms, `snip_edges`: n = 1 + (N - 400) // 160, no dither;
- per frame: remove the DC offset, pre-emphasis 0.97 (x[j] -= 0.97 x[j-1], with x[-1] := x[0]),
  povey window (symmetric Hann to the power 0.85);
- zero-pad to the next power of two (512), power spectrum |FFT|^2;
- triangular mel filters on mel = 1127 ln(1 + f/700), equally spaced in mel from 20 Hz to the
  Nyquist frequency (no filter weight on the Nyquist bin);
- log(max(E, float eps)); no energy column, no mean subtraction.

The waveform is expected in Kaldi's scale (float samples times 2**15 for audio in [-1, 1]).
Tests compare it with kaldi-native-fbank, an independent C++ implementation of Kaldi's fbank.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

MEL_BINS = 128
SAMPLE_RATE = 16000
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0


def mel_scale(freq):
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    if torch.is_tensor(freq):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def frame_count(num_samples: int, frame_length: int, frame_shift: int) -> int:
    """Number of frames with snip_edges (only frames that fit completely)."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


@lru_cache(maxsize=16)
def _mel_filters(num_bins: int, fft_size: int, sample_rate: float, low_freq: float,
                 high_freq: float) -> torch.Tensor:
    """(num_bins, fft_size // 2 + 1) float64 triangular filters; the Nyquist column is zero."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel filter range [{low_freq}, {high_freq}] Hz does not fit 0..{nyquist} Hz")
    half = fft_size // 2
    bin_width = sample_rate / fft_size
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    step = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left = mel_low + index * step
    center = left + step
    right = center + step
    mel = mel_scale(bin_width * torch.arange(half, dtype=torch.float64)).unsqueeze(0)
    rising = (mel - left) / (center - left)
    falling = (right - mel) / (right - center)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.nn.functional.pad(weights, (0, 1))  # Nyquist bin: weight 0


@lru_cache(maxsize=16)
def _povey_window(length: int) -> torch.Tensor:
    n = torch.arange(length, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))
    return hann.pow(0.85)


def fbank(waveform: torch.Tensor, num_mel_bins: int = MEL_BINS, sample_frequency: float = SAMPLE_RATE,
          frame_length: float = FRAME_LENGTH_MS, frame_shift: float = FRAME_SHIFT_MS, low_freq: float = 20.0,
          high_freq: float = 0.0, preemphasis: float = 0.97) -> torch.Tensor:
    """Log mel filterbank energies (frames, num_mel_bins) of a mono waveform (N,) or (1, N).

    Computed in the waveform's floating dtype (float32 unless a float64 waveform is given)."""
    if waveform.dim() == 2:
        if waveform.shape[0] != 1:
            raise ValueError(f"fbank takes one channel, got a waveform of shape {tuple(waveform.shape)}")
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise ValueError(f"fbank takes a 1-D waveform, got shape {tuple(waveform.shape)}")
    dtype = waveform.dtype if waveform.is_floating_point() else torch.float32
    waveform = waveform.to(dtype)
    window_size = int(sample_frequency * frame_length * 0.001)
    window_shift = int(sample_frequency * frame_shift * 0.001)
    fft_size = 1 << (window_size - 1).bit_length()  # next power of two
    n_frames = frame_count(waveform.numel(), window_size, window_shift)
    if n_frames == 0:
        return waveform.new_zeros((0, num_mel_bins))
    frames = waveform.as_strided((n_frames, window_size), (window_shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    frames = frames * _povey_window(window_size).to(frames.device, dtype)
    spectrum = torch.fft.rfft(frames, n=fft_size)
    power = spectrum.real.pow(2) + spectrum.imag.pow(2)
    filters = _mel_filters(num_mel_bins, fft_size, float(sample_frequency), float(low_freq), float(high_freq))
    energies = power @ filters.to(power.device, dtype).T
    return torch.clamp(energies, min=torch.finfo(dtype).eps).log()
