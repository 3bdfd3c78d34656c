"""VideoLLaMA2(.1)-AV: a Qwen2 decoder fed with SigLIP+STC video tokens and BEATs audio tokens.

Module tree = the released checkpoint's parameter names (runtime name == checkpoint name, except
that transformers >= 5.6 dropped SigLIP's `vision_model.` level, which is mapped on load/save):

    model.embed_tokens, model.layers.{i}, model.norm, lm_head          Qwen2 (transformers' classes)
    model.vision_tower.vision_tower.vision_model.*                     SigLIP (transformers' class)
    model.mm_projector.*                                               STC connector
    model.audio_tower.*                                                BEATs
    model.mm_projector_a.*                                             audio MLP

A sample's prompt holds one placeholder id (-201 `<video>` for video or audio-visual samples,
-202 `<audio>` for audio only); `embed_inputs` replaces it by [video tokens ; audio tokens] and
returns the per-position modality ids (0 text, 1 video, 2 audio) with the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Qwen2Model, SiglipVisionConfig, SiglipVisionModel

from mmprune.base.errors import UserInputError
from videollama2.beats import BEATs
from videollama2.config import VideoLLaMA2Config
from videollama2.fbank import frame_count
from videollama2.stc import STCConnector

TEXT, VIDEO, AUDIO = 0, 1, 2
MODALITY_NAMES = {TEXT: "text", VIDEO: "video", AUDIO: "audio"}
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, AUDIO_TOKEN_INDEX = -200, -201, -202
PLACEHOLDERS = {"<image>": IMAGE_TOKEN_INDEX, "<video>": VIDEO_TOKEN_INDEX, "<audio>": AUDIO_TOKEN_INDEX}
PAD_MODALITY = -1


class SiglipTower(nn.Module):
    """SigLIP vision model; features are the hidden states after `select_layer` (-2: the output of
    the second-to-last layer, no post-layernorm), all patches (SigLIP has no CLS)."""

    def __init__(self, config: SiglipVisionConfig, select_layer: int):
        super().__init__()
        self.vision_tower = SiglipVisionModel(config)
        self.select_layer = select_layer
        layers = len(self.layers)
        self.used_layers = select_layer if select_layer >= 0 else layers + 1 + select_layer
        if not 0 <= self.used_layers <= layers:
            raise UserInputError(f"mm_vision_select_layer {select_layer} does not fit a {layers}-layer tower")

    @property
    def inner(self) -> nn.Module:
        return getattr(self.vision_tower, "vision_model", self.vision_tower)  # transformers < 5.6 had the level

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.encoder.layers

    @property
    def config(self) -> SiglipVisionConfig:
        return self.vision_tower.config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, patches, width)."""
        hidden = self.inner.embeddings(pixel_values.to(self.inner.embeddings.patch_embedding.weight.dtype))
        for layer in self.layers[: self.used_layers]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def build_audio_projector(in_dim: int, out_dim: int, depth: int) -> nn.Module:
    """`linear` (depth 1) or `mlp{depth}x_gelu`: Linear, then (GELU, Linear) depth-1 times."""
    if depth == 1:
        return nn.Linear(in_dim, out_dim)
    modules = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*modules)


@dataclass
class SplicedInputs:
    inputs_embeds: torch.Tensor  # (B, L', d)
    attention_mask: torch.Tensor  # (B, L') long
    modality_ids: torch.Tensor  # (B, L') int8: 0 text, 1 video, 2 audio, -1 padding
    labels: torch.Tensor | None  # (B, L') with IGNORE_INDEX on media and padding


@dataclass
class VideoLLaMA2Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: object = None
    modality_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class VideoLLaMA2ForCausalLM(nn.Module):
    """The audio-visual VideoLLaMA2-Qwen2 model (either tower may be absent)."""

    def __init__(self, config: VideoLLaMA2Config, vision_head: bool = False, audio_predictor: bool = False):
        super().__init__()
        self.config = config
        text = config.text_config()
        self.model = Qwen2Model(text)
        hidden = text.hidden_size
        if config.has_vision:
            vision = config.vision_config(use_head=vision_head)
            self.model.vision_tower = SiglipTower(vision, config.select_layer)
            self.model.mm_projector = STCConnector(vision.hidden_size, hidden, config.stc_depth, config.stc_padding)
        if config.has_audio:
            audio = config.audio_config(predictor=audio_predictor)
            if config.audio_projector_width != hidden:
                raise UserInputError(f"{config.source}: hidden_size_a {config.audio_projector_width} must equal the "
                                     f"LLM width {hidden} to splice audio tokens")
            self.model.audio_tower = BEATs(audio)
            self.model.mm_projector_a = build_audio_projector(audio.encoder_embed_dim, hidden,
                                                              config.audio_projector_depth)
        self.lm_head = nn.Linear(hidden, text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---------------------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        """Where inputs go: the main device when accelerate placed the model (the head may be
        offloaded to the meta device), else the head's device."""
        if getattr(self, "_hf_hook", None) is not None:
            from mmprune.place.offload import main_device

            return main_device(self)
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def vision_tower(self) -> SiglipTower | None:
        return getattr(self.model, "vision_tower", None)

    @property
    def audio_tower(self) -> BEATs | None:
        return getattr(self.model, "audio_tower", None)

    @property
    def image_size(self) -> int:
        return self.vision_tower.config.image_size

    def video_token_count(self) -> int:
        """Video tokens per sample: the STC grid of num_frames frames."""
        vision = self.vision_tower.config
        side = vision.image_size // vision.patch_size
        return self.model.mm_projector.token_count(self.config.num_frames, side * side)

    def audio_frame_count(self) -> int:
        return frame_count(self.config.audio_samples, 400, 160)

    def audio_token_count(self) -> int:
        return self.audio_tower.token_count(self.audio_frame_count())

    # ---------------------------------------------------------------------------- encoders

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) normalised frames -> (B, tokens, d)."""
        if self.vision_tower is None:
            raise UserInputError("this checkpoint has no vision tower, but the sample has a video")
        batch, frames = video.shape[:2]
        features = self.vision_tower(video.flatten(0, 1))
        features = features.reshape(batch, frames, *features.shape[1:])
        return self.model.mm_projector(features.to(self.model.mm_projector.readout[0].weight.dtype))

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, n_frames, 128) fbank -> (B, tokens, d)."""
        if self.audio_tower is None:
            raise UserInputError("this checkpoint has no audio tower, but the sample has audio")
        # upstream hands the tower its fbank already in the model dtype (bfloat16 -> half)
        features = self.audio_tower(fbank.to(self.audio_tower.patch_embedding.weight.dtype))
        return self.model.mm_projector_a(features)

    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, video: torch.Tensor | None = None,
                     audio: torch.Tensor | None = None, video_tokens: torch.Tensor | None = None,
                     audio_tokens: torch.Tensor | None = None) -> SplicedInputs:
        """Replace each sample's placeholder by its media tokens (video first, then audio); samples are
        right-padded to the longest result. `video_tokens` / `audio_tokens` are already encoded
        media (B, tokens, d), used instead of encoding `video` / `audio`."""
        batch = input_ids.shape[0]
        embed = self.model.embed_tokens
        media = []
        if video_tokens is None and video is not None:
            video_tokens = self.encode_video(video.to(self.device))
        if audio_tokens is None and audio is not None:
            audio_tokens = self.encode_audio(audio.to(self.device))
        if video_tokens is not None:
            media.append((video_tokens, VIDEO))
            video = video_tokens
        if audio_tokens is not None:
            media.append((audio_tokens, AUDIO))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = []
        for b in range(batch):
            ids = input_ids[b][attention_mask[b].bool()]
            places = (ids < 0).nonzero().flatten().tolist()
            if len(places) > 1:
                raise UserInputError(f"sample {b} has {len(places)} media placeholders; one <video> (or <audio>) "
                                     "per conversation is supported")
            if not places:
                if media:
                    raise UserInputError(f"sample {b} has media but no <video>/<audio> placeholder in its prompt")
                parts = [(embed(ids), torch.full((ids.numel(),), TEXT, dtype=torch.int8))]
                label_parts = [labels[b][attention_mask[b].bool()]] if labels is not None else []
            else:
                if not media:
                    raise UserInputError(f"sample {b} has a media placeholder but no video or audio was given")
                p = places[0]
                if int(ids[p]) == AUDIO_TOKEN_INDEX and video is not None:
                    raise UserInputError(f"sample {b}: an <audio> placeholder cannot take a video")
                pieces = [(m[b], modality) for m, modality in media]
                parts = [(embed(ids[:p]), torch.full((p,), TEXT, dtype=torch.int8))]
                parts += [(f, torch.full((f.shape[0],), modality, dtype=torch.int8)) for f, modality in pieces]
                parts.append((embed(ids[p + 1:]), torch.full((ids.numel() - p - 1,), TEXT, dtype=torch.int8)))
                if labels is not None:
                    row_labels = labels[b][attention_mask[b].bool()]
                    n_media = sum(f.shape[0] for f, _ in pieces)
                    label_parts = [row_labels[:p], row_labels.new_full((n_media,), IGNORE_INDEX), row_labels[p + 1:]]
            # media tokens come from wherever a placement put the towers: join them on the text's device
            embeds = torch.cat([e.to(parts[0][0].device, embed.weight.dtype) for e, _ in parts])
            modality = torch.cat([m for _, m in parts])
            row_labels = torch.cat(label_parts) if labels is not None else None
            rows.append((embeds, modality, row_labels))
        length = max(e.shape[0] for e, _, _ in rows)
        out_embeds = rows[0][0].new_zeros((batch, length, rows[0][0].shape[-1]))
        out_mask = torch.zeros((batch, length), dtype=torch.long, device=out_embeds.device)
        out_modality = torch.full((batch, length), PAD_MODALITY, dtype=torch.int8)
        out_labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=out_embeds.device) \
            if labels is not None else None
        for b, (embeds, modality, row_labels) in enumerate(rows):
            n = embeds.shape[0]
            out_embeds[b, :n] = embeds
            out_mask[b, :n] = 1
            out_modality[b, :n] = modality
            if row_labels is not None:
                out_labels[b, :n] = row_labels.to(out_labels.device)
        return SplicedInputs(out_embeds, out_mask, out_modality, out_labels)

    # ---------------------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                video: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                last_logits_only: bool = False, logits_to_keep: int = 0) -> VideoLLaMA2Output:
        """`logits_to_keep` > 0: the head runs on that many last positions only (no loss then);
        `last_logits_only` is logits_to_keep=1."""
        if last_logits_only:
            logits_to_keep = 1
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        modality = None
        if past_key_values is None or video is not None or audio is not None:
            spliced = self.embed_inputs(input_ids, attention_mask, labels, video, audio)
            embeds, mask, modality, labels = (spliced.inputs_embeds, spliced.attention_mask,
                                              spliced.modality_ids, spliced.labels)
        else:
            embeds, mask = self.model.embed_tokens(input_ids), attention_mask
        if mask is not None and bool(mask.all()) and past_key_values is None:
            mask = None  # no padding: let sdpa use its causal path (as during calibration)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, past_key_values=past_key_values,
                         use_cache=use_cache)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None and not logits_to_keep:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return VideoLLaMA2Output(logits, loss, out.past_key_values if use_cache else None, modality, labels)

    def lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                video_tokens: torch.Tensor | None = None, audio_tokens: torch.Tensor | None = None,
                labelled_only: bool = False) -> torch.Tensor:
        """Next-token cross-entropy on the labelled positions, from already encoded media (training).
        `labelled_only` runs the head only where a label is (the same mean; cheaper with a large
        vocabulary)."""
        spliced = self.embed_inputs(input_ids.to(self.device), attention_mask, labels.to(self.device),
                                    video_tokens=video_tokens, audio_tokens=audio_tokens)
        mask = None if bool(spliced.attention_mask.all()) else spliced.attention_mask
        hidden = self.model(inputs_embeds=spliced.inputs_embeds, attention_mask=mask, use_cache=False).last_hidden_state
        if labelled_only:
            targets = spliced.labels[:, 1:]
            keep = targets != IGNORE_INDEX
            return F.cross_entropy(self.lm_head(hidden[:, :-1][keep]).float(), targets[keep])
        logits = self.lm_head(hidden)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), spliced.labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)

    # ---------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, model_dir, dtype="auto", device="cpu", **placement) -> "VideoLLaMA2ForCausalLM":
        """`placement`: device_map, offload_dir, main_device (videollama2.checkpoint.loading.load_model)."""
        from videollama2.checkpoint.loading import load_model

        return load_model(cls, model_dir, dtype=dtype, device=device, **placement)

    def save_pretrained(self, folder) -> None:
        from videollama2.checkpoint.saving import save_model

        save_model(self, folder)


def decoder_layers(model: VideoLLaMA2ForCausalLM) -> tuple[str, nn.ModuleList]:
    """Runtime name and list of the Qwen2 decoder layers."""
    return "model.layers", model.model.layers
