"""The plain-torch Kaldi fbank against kaldi-native-fbank, an independent C++ implementation of
Kaldi's `compute-fbank-feats` (torchaudio's `compliance.kaldi.fbank` follows the same recipe)."""

import math

import numpy as np
import pytest
import torch

from videollama2.fbank import _mel_filters, fbank, frame_count

knf = pytest.importorskip("kaldi_native_fbank")


def kaldi_reference(samples: np.ndarray, num_bins: int, frame_length_ms: float = 25.0, rate: int = 16000):
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.samp_freq = rate
    opts.frame_opts.frame_length_ms = frame_length_ms
    opts.frame_opts.frame_shift_ms = 10.0
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    computer = knf.OnlineFbank(opts)
    computer.accept_waveform(rate, samples.tolist())
    computer.input_finished()
    return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])


def signal(seconds=1.3, rate=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t * (1 + t)) \
        + 0.05 * rng.standard_normal(t.size) + 0.02  # a DC offset too
    return (wave * 2 ** 15).astype(np.float32)


@pytest.mark.parametrize("num_bins,frame_ms", [(80, 25.0), (64, 25.0), (100, 25.0), (128, 50.0)])
def test_matches_kaldi_native_fbank(num_bins, frame_ms):
    wave = signal()
    reference = kaldi_reference(wave, num_bins, frame_ms)
    ours = fbank(torch.from_numpy(wave), num_mel_bins=num_bins, frame_length=frame_ms).numpy()
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=0)


def test_beats_setting_128_bins_25ms():
    """Kaldi itself refuses 128 bins with a 512-point FFT (mel bin 3 gets no FFT bin); torchaudio,
    which BEATs used, computes it with that bin at log(eps). Every other bin must agree with the
    same computation at a resolution Kaldi accepts, so compare the filters' construction and the
    frames of a real run."""
    with pytest.raises(Exception):
        kaldi_reference(signal(), 128, 25.0)
    filters = _mel_filters(128, 512, 16000.0, 20.0, 0.0)
    assert filters.shape == (128, 257) and torch.all(filters[:, -1] == 0)
    assert (filters.sum(dim=1) == 0).nonzero().flatten().tolist() == [3]
    wave = torch.from_numpy(signal(seconds=30.0))
    features = fbank(wave)
    assert features.shape == (2998, 128) and frame_count(480000, 400, 160) == 2998
    assert torch.all(features[:, 3] == math.log(torch.finfo(torch.float32).eps))
    # 30 s of audio -> 187 x 8 BEATs patches = 1496 audio tokens in the released model
    assert (features.shape[0] // 16) * (128 // 16) == 1496


def test_silence_is_floored_not_minus_infinity():
    features = fbank(torch.zeros(16000))
    assert torch.isfinite(features).all() and features.max() == math.log(torch.finfo(torch.float32).eps)


def test_float64_input_agrees():
    wave = signal(seconds=0.5)
    single = fbank(torch.from_numpy(wave), num_mel_bins=80)
    double = fbank(torch.from_numpy(wave).double(), num_mel_bins=80)
    assert double.dtype == torch.float64
    torch.testing.assert_close(single.double(), double, atol=2e-3, rtol=0)
