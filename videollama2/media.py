"""Video frames and audio features for VideoLLaMA2-AV, as the released preprocessing makes them.

Video (decord): F = `num_frames` frames at the mid-points of F equal segments of the N decoded
frames, idx_i = round((N - 1) / F * (i + 1/2)) (halves up); each frame squashed to the vision
tower's square size (bicubic), scaled to [0, 1] and normalised with mean = std = 0.5.

Audio, from a video's own track (decord, mono, 16 kHz): `audio_clips` clips of
`audio_clip_seconds` starting at i * max(D - clip, 0) / clips s (spacing "pytorchvideo": what
upstream gets from pytorchvideo 0.1.5's ConstantClipsPerVideoSampler, the release its unpinned
requirements install; D is the float duration, as there), concatenated, then cropped or
zero-padded to `audio_seconds` (released model: 8 clips of 2 s, 30 s). Spacing "even" puts them
at i * max(D - clip, 0) / (clips - 1) instead, so the last clip ends at D (the project's earlier
rule, kept for models trained with it: the tiny embedded one).
Audio from a file (soundfile): first channel, cropped at its start to `audio_seconds` or
zero-padded, resampled to 16 kHz (FFT resampling). Both are scaled by 2**15 and turned into
128-bin Kaldi fbank features (videollama2.fbank), then rounded to bfloat16 as upstream does
before the tower (`audio_fbank_dtype` "float32" skips the rounding).

Unlike the reference code, which substitutes silence or another sample when a file cannot be
read, every problem here is a UserInputError naming the file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmprune.run.checks import require_file
from mmprune.base.errors import UserInputError
from videollama2.fbank import fbank

SAMPLE_RATE = 16000
VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg"}
IMAGE_MEAN = IMAGE_STD = 0.5


@contextmanager
def _captured_stderr():
    """decord's C++ code logs to file descriptor 2; keep that out of the user's terminal and hand
    the text to the error message instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    log = tempfile.TemporaryFile(mode="w+b")
    os.dup2(log.fileno(), 2)
    captured = {"text": ""}
    try:
        yield captured
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        log.seek(0)
        captured["text"] = log.read().decode("utf-8", "replace")
        log.close()


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text[-200:]


def _require_file(path: Path, what: str, hint: str) -> None:
    require_file(path, what, hint)


def _check_finite(samples: np.ndarray, path: Path, what: str) -> None:
    """NaN or inf samples would only surface later as NaN activations, blamed on the dtype."""
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise UserInputError(f"{what} {path} holds {bad} NaN or inf audio samples; repair or replace the file "
                             "(or drop the record's \"audio\" field)")


def frame_indices(total: int, num_frames: int) -> list[int]:
    """Mid-points of num_frames equal segments of [0, total - 1], rounded halves up."""
    segment = (total - 1) / num_frames
    return [int(np.round(segment * (i + 0.5) + 1e-6)) for i in range(num_frames)]


def read_video_frames(path, num_frames: int) -> np.ndarray:
    """(num_frames, H, W, 3) uint8 RGB frames sampled uniformly."""
    from decord import VideoReader, cpu

    path = Path(path)
    _require_file(path, "video file", "check --data_folder (media are looked up as data_folder/<record video>)")
    try:
        with _captured_stderr():
            reader = VideoReader(str(path), ctx=cpu(0), num_threads=1)
            total = len(reader)
            if total == 0:
                raise UserInputError(f"video file {path} has no frames; replace or remove it")
            frames = reader.get_batch(frame_indices(total, num_frames)).asnumpy()
    except UserInputError:
        raise
    except Exception as exc:  # decord raises its own error types (DECORDError, RuntimeError)
        raise UserInputError(f"video file {path} cannot be read ({_reason(exc)}); replace or remove it") from None
    return frames


def resize_frames(frames: np.ndarray, image_size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, S, S, 3) uint8, squashed (no crop or pad), bicubic."""
    return np.stack([np.asarray(Image.fromarray(frame).resize((image_size, image_size), Image.BICUBIC))
                     for frame in frames])


def normalize_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32 scaled to [0, 1], then (x - 0.5) / 0.5."""
    pixels = torch.as_tensor(np.asarray(frames)).movedim(-1, -3).float() / 255.0
    return (pixels - IMAGE_MEAN) / IMAGE_STD


def preprocess_frames(frames: np.ndarray, image_size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, S, S) float32, as SigLIP's image processor without cropping."""
    return normalize_frames(resize_frames(frames, image_size))


def read_video_audio(path) -> np.ndarray:
    """The video's audio track, mono at 16 kHz, float32 in [-1, 1]."""
    from decord import AudioReader, cpu

    path = Path(path)
    _require_file(path, "video file", "check --data_folder (media are looked up as data_folder/<record audio>)")
    try:
        with _captured_stderr() as log:
            reader = AudioReader(str(path), ctx=cpu(0), sample_rate=SAMPLE_RATE, mono=True)
            samples = reader[:].asnumpy()
    except Exception as exc:
        text = f"{log.get('text', '')} {exc}"
        if "find audio stream" in text or "audio stream" in str(exc).lower():
            raise UserInputError(
                f"video file {path} has no audio track, but its record needs audio; give the record an audio "
                "file (\"audio\": \"<name>.wav\") or drop its \"audio\" field") from None
        raise UserInputError(f"the audio of video file {path} cannot be read ({_reason(exc)}); replace or "
                             "remove it") from None
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0:
        raise UserInputError(f"video file {path} has an empty audio track; replace it or drop the record's "
                             "\"audio\" field")
    _check_finite(samples, path, "the audio track of video file")
    return samples


def read_audio_file(path) -> tuple[np.ndarray, int]:
    """(first channel as float32, sample rate) of an audio file (wav, flac, ...)."""
    import soundfile

    path = Path(path)
    _require_file(path, "audio file", "check --data_folder (media are looked up as data_folder/<record audio>)")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, ValueError) as exc:
        raise UserInputError(f"audio file {path} cannot be read ({_reason(exc)}); replace or remove it") from None
    if data.shape[0] == 0:
        raise UserInputError(f"audio file {path} holds no samples; replace or remove it")
    _check_finite(data[:, 0], path, "audio file")
    return data[:, 0], int(rate)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """FFT resampling (band-limited; the length becomes ceil(n * target / rate))."""
    if rate == target:
        return samples
    n = samples.shape[0]
    n_out = int(np.ceil(n * target / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    out = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    keep = min(spectrum.shape[0], out.shape[0])
    out[:keep] = spectrum[:keep]
    return (np.fft.irfft(out, n_out) * (n_out / n)).astype(np.float32)


CLIP_SPACINGS = ("pytorchvideo", "even")


def clip_starts(n_samples: int, clips: int, clip_seconds: float, rate: int = SAMPLE_RATE,
                spacing: str = "pytorchvideo") -> list[Fraction]:
    """Start times (s) of the audio clips (see the module docstring)."""
    if spacing == "pytorchvideo":
        # float duration minus the clip, then exact fractions: pytorchvideo's own arithmetic
        room = Fraction(max(n_samples / rate - clip_seconds, 0))
        step = room / clips
    elif spacing == "even":
        room = max(Fraction(n_samples, rate) - Fraction(clip_seconds).limit_denominator(1000), Fraction(0))
        step = room / max(clips - 1, 1)
    else:
        raise ValueError(f"unknown audio clip spacing {spacing!r}; expected one of {CLIP_SPACINGS}")
    return [step * i for i in range(clips)]


def clip_concat(samples: np.ndarray, clips: int, clip_seconds: float, rate: int = SAMPLE_RATE,
                spacing: str = "pytorchvideo") -> np.ndarray:
    """`clips` clips of `clip_seconds` spread over the audio, concatenated (a clip past the end is
    cut short)."""
    clip = Fraction(clip_seconds).limit_denominator(1000)
    starts = clip_starts(samples.shape[0], clips, clip_seconds, rate, spacing)
    return np.concatenate([samples[int(start * rate): int((start + clip) * rate)] for start in starts])


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Crop at the start or zero-pad at the end to exactly `length` samples."""
    if samples.shape[0] >= length:
        return samples[:length]
    return np.pad(samples, (0, length - samples.shape[0]))


FBANK_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def audio_features(samples: np.ndarray, dtype: str = "bfloat16") -> torch.Tensor:
    """(n_frames, 128) fbank of a 16 kHz waveform in [-1, 1], computed in float32 and stored in
    `dtype` (upstream rounds it to bfloat16; the tower casts it to its own dtype)."""
    features = fbank(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)) * 2 ** 15)
    return features.to(FBANK_DTYPES[dtype])


def is_video_path(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


class MediaLoader:
    """Frames and fbank features for one model configuration, cached per file (least recently used
    entries are dropped beyond `cache_bytes`)."""

    def __init__(self, num_frames: int, image_size: int, audio_seconds: float = 30.0, audio_clips: int = 8,
                 audio_clip_seconds: float = 2.0, cache: bool = True, cache_bytes: int = 1 << 30,
                 audio_clip_spacing: str = "pytorchvideo", audio_fbank_dtype: str = "bfloat16"):
        self.num_frames = num_frames
        self.image_size = image_size
        self.audio_samples = int(round(audio_seconds * SAMPLE_RATE))
        self.audio_seconds = audio_seconds
        self.audio_clips = audio_clips
        self.audio_clip_seconds = audio_clip_seconds
        self.audio_clip_spacing = audio_clip_spacing
        self.audio_fbank_dtype = audio_fbank_dtype
        self._cache: OrderedDict | None = OrderedDict() if cache else None
        self._cache_bytes = cache_bytes
        self._held = 0

    @classmethod
    def for_config(cls, config, image_size: int, cache: bool = True) -> "MediaLoader":
        return cls(config.num_frames, image_size, config.audio_seconds, config.audio_clips,
                   config.audio_clip_seconds, cache, audio_clip_spacing=config.audio_clip_spacing,
                   audio_fbank_dtype=config.audio_fbank_dtype)

    def _cached(self, key, compute):
        if self._cache is None:
            return compute()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = compute()
        size = value.numel() * value.element_size()
        if size <= self._cache_bytes:
            self._cache[key] = value
            self._held += size
            while self._held > self._cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._held -= dropped.numel() * dropped.element_size()
        return value

    def video(self, path) -> torch.Tensor:
        """(T, 3, S, S)."""
        return self._cached(("video", str(path)), lambda: preprocess_frames(
            read_video_frames(path, self.num_frames), self.image_size))

    def audio(self, path) -> torch.Tensor:
        """(n_frames, 128) fbank, from a video's track or an audio file."""
        return self._cached(("audio", str(path)), lambda: self._audio(path))

    def _audio(self, path) -> torch.Tensor:
        if is_video_path(path):
            samples = clip_concat(read_video_audio(path), self.audio_clips, self.audio_clip_seconds,
                                  spacing=self.audio_clip_spacing)
            return audio_features(fit_length(samples, self.audio_samples), self.audio_fbank_dtype)
        samples, rate = read_audio_file(path)
        samples = fit_length(samples, int(round(self.audio_seconds * rate)))
        return audio_features(fit_length(resample(samples, rate), self.audio_samples), self.audio_fbank_dtype)
