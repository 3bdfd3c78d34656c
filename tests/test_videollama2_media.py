"""Media processing: frame sampling, frame preprocessing, audio from a video's track or a file,
and the errors for files that cannot be used."""

import numpy as np
import pytest
import torch

from fixtures_videollama2 import clip_arrays, write_clip, write_wav
from mmprune.base.errors import UserInputError
from videollama2 import media
from videollama2.media import MediaLoader


def test_frame_indices_are_segment_midpoints_rounded_half_up():
    assert media.frame_indices(16, 8) == [1, 3, 5, 7, 8, 10, 12, 14]
    assert media.frame_indices(6, 5) == [1, 2, 3, 4, 5]  # exact halves go up
    assert media.frame_indices(17, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert media.frame_indices(3, 8) == [0, 0, 1, 1, 1, 1, 2, 2]  # short videos repeat frames
    assert media.frame_indices(100, 16)[:3] == [3, 9, 15]


def test_preprocess_matches_the_siglip_image_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    _, frames, _ = clip_arrays(3)
    ours = media.preprocess_frames(frames[:4], 70)
    processor = SiglipImageProcessorPil(size={"height": 70, "width": 70}, resample=3, do_rescale=True,
                                        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3)
    from PIL import Image
    reference = processor([Image.fromarray(f) for f in frames[:4]], return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (4, 3, 70, 70)
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=0)


def test_video_frames_and_audio_from_the_track(tmp_path):
    spec = write_clip(tmp_path / "clip.mp4", seed=5)
    _, rendered, wave = clip_arrays(5)
    frames = media.read_video_frames(tmp_path / "clip.mp4", 8)
    assert frames.shape == (8, 64, 64, 3)
    decoded_error = np.abs(frames.astype(float) - rendered[[1, 3, 5, 7, 8, 10, 12, 14]].astype(float)).mean()
    assert decoded_error < 8  # H.264 at crf 26
    track = media.read_video_audio(tmp_path / "clip.mp4")
    assert abs(track.shape[0] - 32000) <= 1024  # AAC pads the last frame
    aligned = np.corrcoef(track[:32000], wave)[0, 1]
    assert aligned > 0.9  # encoder delay is compensated: same timing
    loader = MediaLoader(num_frames=8, image_size=70, audio_seconds=2.0, audio_clips=8, audio_clip_seconds=0.25)
    assert loader.video(tmp_path / "clip.mp4").shape == (8, 3, 70, 70)
    features = loader.audio(tmp_path / "clip.mp4")
    assert features.shape == (198, 128)
    # the sound event is where the clip says it is: louder frames inside it
    energy = features.mean(dim=1)
    start = int(spec.sound_start * 100)
    inside = energy[start + 5:start + int(spec.sound_length * 100) - 5].mean()
    outside = torch.cat([energy[:max(start - 10, 1)], energy[start + int(spec.sound_length * 100) + 10:]]).mean()
    assert inside > outside + 1.0


def test_clip_sampling_of_the_released_setting():
    rate = 16000
    samples = np.arange(10 * rate, dtype=np.float32)
    joined = media.clip_concat(samples, 8, 2.0, rate)
    assert joined.shape[0] == 16 * rate
    # pytorchvideo 0.1.5 (upstream): 8 s of room split in 8 -> starts 0, 1, ..., 7 s
    assert [int(joined[i * 2 * rate]) for i in range(8)] == [i * rate for i in range(8)]
    even = media.clip_concat(samples, 8, 2.0, rate, spacing="even")  # the last clip ends at 10 s
    assert [int(even[i * 2 * rate]) for i in range(8)] == [int(i * 8 / 7 * rate) for i in range(8)]
    short = media.clip_concat(np.ones(rate, dtype=np.float32), 8, 2.0, rate)
    assert short.shape[0] == 8 * rate  # each clip is the whole (shorter) audio
    assert media.fit_length(joined, 30 * rate).shape[0] == 480000


def test_clip_starts_use_pytorchvideos_float_duration():
    # 32022 samples: 32022 / 16000 - 2 = 0.0013749999... s of room in float arithmetic, so clip 4
    # starts at 0.5 * that * 16000 = 10.99999 -> sample 10 (the exact fraction 11/8000 s gives 11)
    assert int(media.clip_starts(32022, 8, 2.0, 16000)[4] * 16000) == 10
    assert int(media.clip_starts(32022, 8, 2.0, 16000, "even")[7] * 16000) == 22  # 22/16000 s of room


def test_fbank_rounded_to_bfloat16_as_upstream_and_cast_by_the_tower():
    samples = np.sin(np.arange(16000) / 7.0).astype(np.float32) * 0.3
    full = media.audio_features(samples, "float32")
    rounded = media.audio_features(samples)
    assert full.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, full.to(torch.bfloat16)) and not torch.equal(rounded.float(), full)
    from videollama2.config import VideoLLaMA2Config

    released = VideoLLaMA2Config({"model_type": "videollama2_qwen2", "hidden_size": 8, "num_hidden_layers": 1,
                                  "intermediate_size": 16,
                                  "num_attention_heads": 1, "vocab_size": 4, "mm_audio_tower": "beats"})
    loader = MediaLoader.for_config(released, 0)
    assert (loader.audio_clip_spacing, loader.audio_fbank_dtype) == ("pytorchvideo", "bfloat16")


def test_audio_file_first_channel_resampled_and_padded(tmp_path):
    data = write_wav(tmp_path / "a.wav", seconds=1.0, rate=44100, channels=2)
    samples, rate = media.read_audio_file(tmp_path / "a.wav")
    assert rate == 44100 and np.allclose(samples, data[:, 0], atol=1e-6)
    t = np.arange(44100) / 44100
    tone = media.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 44100)
    assert tone.shape[0] == 16000
    spectrum = np.abs(np.fft.rfft(tone))
    assert abs(np.argmax(spectrum) - 1000) <= 1  # 1 Hz bins over one second
    loader = MediaLoader(num_frames=8, image_size=70, audio_seconds=2.0)
    assert loader.audio(tmp_path / "a.wav").shape == (198, 128)


def test_bad_media_files_are_named_in_the_error(tmp_path):
    write_clip(tmp_path / "silent.mp4", seed=1, with_audio=False)
    with pytest.raises(UserInputError, match="silent.mp4 has no audio track"):
        media.read_video_audio(tmp_path / "silent.mp4")
    assert media.read_video_frames(tmp_path / "silent.mp4", 4).shape[0] == 4  # the frames are fine
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    with pytest.raises(UserInputError, match="broken.mp4 cannot be read"):
        media.read_video_frames(tmp_path / "broken.mp4", 4)
    with pytest.raises(UserInputError, match="broken.mp4"):
        media.read_video_audio(tmp_path / "broken.mp4")
    with pytest.raises(UserInputError, match="missing.wav does not exist"):
        media.read_audio_file(tmp_path / "missing.wav")
    (tmp_path / "noise.wav").write_bytes(b"RIFF1234WAVEjunk")
    with pytest.raises(UserInputError, match="noise.wav cannot be read"):
        media.read_audio_file(tmp_path / "noise.wav")
    with pytest.raises(UserInputError, match="nothing.mp4 does not exist"):
        media.read_video_frames(tmp_path / "nothing.mp4", 4)


def test_embedded_tiny_model_keeps_the_rules_it_was_trained_with_and_eval_dtype_follows_upstream():
    from videollama2.config import VideoLLaMA2Config
    from videollama2.embedded import paths
    from videollama2.eval import inference_dtype

    tiny = VideoLLaMA2Config.from_dir(paths.CHECKPOINT_DIR)
    assert (tiny.audio_clip_spacing, tiny.audio_fbank_dtype) == ("even", "float32")
    assert inference_dtype("upstream", "cuda:0") == "float16" and inference_dtype("upstream", "cpu") == "float32"
    assert inference_dtype("bfloat16", "cuda") == "bfloat16"
