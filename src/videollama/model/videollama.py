"""The composed VideoLlama model and its loss; the model directory format is model/model_dir.py.

    video [B, F, 3, H, W] -> vision (ViT per frame + temporal) -> post_layernorm
        -> resampler -> latents [B, L, D_v]
    input_ids [B, T] -> decoder (Llama + gated cross-attention to the latents) -> lm_head -> logits

``save_pretrained`` / ``from_pretrained`` read and write a model directory through
model/model_dir.py (strict: a missing, unexpected or misshapen tensor is an error that names the
tensor and the file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from videollama.config import VideoLlamaConfig
from videollama.constants import IGNORE_INDEX
from videollama.model.decoder import Decoder, KVCache, Media
from videollama.model.model_dir import read_config, read_state, save_model_dir
from videollama.model.resampler import PerceiverResampler
from videollama.model.vision import VisionEncoder


@dataclass
class Windows:
    """Where the windows of a batch's whole videos lie in time (the rows of ``video`` [N, F, 3, H, W]).

    times: [N, F] seconds, from the start of its video, of every frame of window n; video: [N]
    long, the video (0..V-1) window n belongs to, non-decreasing (a video's windows are
    consecutive rows, in time order). See ``videollama.data.windows`` for how they are chosen.
    """

    times: torch.Tensor
    video: torch.Tensor

    def check(self, frames: torch.Tensor) -> None:
        n, f = frames.shape[:2]
        if self.times.shape != (n, f) or self.video.shape != (n,):
            raise ValueError(f"windows must give times [{n}, {f}] and video [{n}] for video {tuple(frames.shape)}, "
                             f"got {tuple(self.times.shape)} and {tuple(self.video.shape)}")


@dataclass
class VideoLlamaOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # scalar, when labels were given


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy. logits: [B, T, V]; labels: [B, T] aligned with the inputs.

    Position t predicts labels[t+1]; labels equal to -100 are not counted. ``mean`` divides by
    the number of counted tokens (0 when there are none, never NaN); ``sum`` lets a training
    loop divide by a token count gathered across ranks or micro-batches. Computed in float32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:2])}")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)


class VideoLlama(nn.Module):
    def __init__(self, config: VideoLlamaConfig) -> None:
        super().__init__()
        self.config = config
        # The caller's device: "meta" inside `with torch.device("meta")`, where nothing is allocated.
        device = torch.empty(0).device
        # Built on the meta device, then allocated once and initialised once by init_weights (what
        # torch.nn.utils.skip_init does): the constructors' own default inits would be thrown away,
        # and the values would depend on how many random draws they made. So a model built here
        # equals one built on meta, allocated with to_empty and given init_weights() under the same seed.
        with torch.device("meta"):
            self.vision = VisionEncoder(config.vision)
            self.resampler = PerceiverResampler(config.resampler, dim=config.vision.hidden_size,
                                                max_frames=config.vision.max_frames)
            self.decoder = Decoder(config.decoder, media_dim=config.vision.hidden_size)
            self.lm_head = nn.Linear(config.decoder.hidden_size, config.decoder.vocab_size, bias=False)
        self.tie_weights()
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    # ---- construction ---------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter, from torch's global generator (seed it first for repeatability).

        Linear, convolution and embedding weights: normal(0, initializer_range), biases 0; layer
        norms: 1 and 0. Every other parameter belongs to a module with its own ``reset_parameters``
        (RMSNorm weights 1; tanh gates at the config's start value, 0 unless a preset opens them;
        class, time and temporal embeddings and resampler latents normal(0, 0.02)). This is the one
        statement of the rule: the constructor calls it, and a model built on the meta device
        calls it after ``to_empty`` (training does so after sharding, per rank).
        """
        self.tie_weights()  # to_empty may have untied lm_head from the embedding
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # only its own parameters; children come in this loop
        # The time code's projection is a Linear, visited after its MediaTime above: zero again, so
        # that a fresh model reads time as a model saved before it existed does (as the gates do).
        self.decoder.media_time.reset_parameters()

    def tie_weights(self) -> None:
        if self.config.decoder.tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    # ---- input checks -----------------------------------------------------------------
    def check_video(self, video: torch.Tensor) -> None:
        """Raise a ValueError unless video is [B, F, C, H, W] as the vision config expects."""
        v = self.config.vision
        if video.dim() != 5:
            raise ValueError(f"video must be 5-D [batch, frames, channels, height, width], got shape "
                             f"{tuple(video.shape)}")
        b, f, c, h, w = video.shape
        if c != v.num_channels:
            raise ValueError(f"video has {c} channels, the model expects {v.num_channels} (shape {tuple(video.shape)})")
        if h != v.image_size or w != v.image_size:
            raise ValueError(f"video frames are {h}x{w}, the model expects {v.image_size}x{v.image_size}")
        if f < 1 or f > v.max_frames:
            raise ValueError(f"video has {f} frames, the model takes 1 to {v.max_frames}")
        if not video.is_floating_point():
            raise ValueError(f"video must hold normalised floating-point pixels, got {video.dtype}")

    def check_tokens(self, input_ids: torch.Tensor, *, extra: int = 0) -> None:
        """Raise a ValueError unless input_ids is [B, T] of ids in [0, vocab) and T + extra fits."""
        d = self.config.decoder
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: at least one token is needed")
        if input_ids.shape[1] + extra > d.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens" + (f" + {extra} new" if extra else "")
                             + f" is longer than max_seq_len {d.max_seq_len}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= d.vocab_size:
            raise ValueError(f"token ids must be in [0, {d.vocab_size}), got values in [{lo}, {hi}]")

    # ---- forward ----------------------------------------------------------------------
    def encode_video(self, video: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """video: [N, F, 3, H, W] normalised pixels, N windows -> visual latents [N, L, D_v], each
        stamped with its absolute time. times: [N, F] seconds from its video's start of every frame;
        None: every row is a window at time 0 (a clip), frames ``1 / fps`` apart."""
        return self.stamp(self.window_latents(video), times if times is not None else self.clip_times(video))

    def window_latents(self, video: torch.Tensor) -> torch.Tensor:
        """The vision side alone: video [N, F, 3, H, W] -> latents [N, L, D_v], not yet stamped with
        time (what a frozen encoder's latent cache keeps: :meth:`stamp` is trained after it)."""
        self.check_video(video)
        tokens = self.vision(video, apply_post_layernorm=True)  # [N, F, 1+P, D_v]
        return self.resampler(tokens)

    def stamp(self, latents: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """latents [N, L, D_v] of N windows + their frames' times [N, F] -> stamped latents. Without a
        resampler each frame's tokens get their frame's time; resampled latents their window's start."""
        if times.dim() != 2 or times.shape[0] != latents.shape[0]:
            raise ValueError(f"times must be [windows, frames] = [{latents.shape[0]}, F], got {tuple(times.shape)}")
        groups = times if not self.config.resampler.num_latents else times[:, :1]
        return self.decoder.media_time(latents, groups)

    def clip_times(self, video: torch.Tensor) -> torch.Tensor:
        """[N, F] frame times of N clips, each one window at time 0: 0, 1/fps, 2/fps, ..."""
        n, f = video.shape[:2]
        fps = self.config.preprocess.fps
        return (torch.arange(f, dtype=torch.float64, device=video.device) / fps).expand(n, f)

    @staticmethod
    def gather_videos(latents: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Window latents [N, L, D] -> each video's windows end to end: [V, W_max * L, D], and the
        key mask [V, W_max * L] (True at real latents; None when every video has W_max windows).
        video: [N] long, non-decreasing: the video of each window (0..V-1, its windows in time order)."""
        n, length, d = latents.shape
        counts = torch.bincount(video)  # [V] windows per video
        if video.shape != (n,) or bool((video[1:] < video[:-1]).any()) or bool((counts == 0).any()):
            raise ValueError("windows must be grouped by video: video [N] non-decreasing, every video with a window")
        most = int(counts.max())
        slot = torch.arange(n, device=latents.device) - (counts.cumsum(0) - counts)[video]  # window's place in its video
        out = latents.new_zeros(len(counts), most, length, d)
        out[video, slot] = latents
        out = out.view(len(counts), most * length, d)
        if bool((counts == most).all()):
            return out, None
        mask = torch.zeros(len(counts), most, length, dtype=torch.bool, device=latents.device)
        mask[video, slot] = True
        return out, mask.view(len(counts), most * length)

    def visual_context(self, input_ids: torch.Tensor, video: torch.Tensor | None,
                       visual_latents: torch.Tensor | None, video_index: torch.Tensor | None = None, *,
                       windows: Windows | None = None, visual_mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The checked visual latents [V, L, D_v] of this batch's videos and their key mask [V, L] (or
        None: every latent real), or (None, None) for text only.

        video: [N, F, 3, H, W]: one window per video (a clip at time 0) or, with ``windows``, the
        windows of V whole videos; visual_latents [V, L, D_v] (with ``visual_mask``) instead of video.
        video_index [B]: the video each text row reads (None: row b reads video b)."""
        if video is not None and visual_latents is not None:
            raise ValueError("pass either video or visual_latents, not both")
        if windows is not None and video is None:
            raise ValueError("windows describe the rows of video: pass video with them")
        if video is not None:
            if windows is None:
                visual_latents, visual_mask = self.encode_video(video), None
            else:
                windows.check(video)
                visual_latents, visual_mask = self.gather_videos(self.encode_video(video, windows.times),
                                                                 windows.video)
        if visual_latents is None:
            if video_index is not None:
                raise ValueError("video_index needs video or visual_latents")
            return None, None
        self._check_latents(input_ids, visual_latents, visual_mask, video_index)
        return visual_latents, visual_mask

    def _check_latents(self, input_ids: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None,
                       video_index: torch.Tensor | None) -> None:
        d_v, n_latents = self.config.vision.hidden_size, self.config.resampler.num_latents
        per_window = n_latents or self.config.vision.num_patches + 1  # latents, or tokens of one frame
        ok = (latents.dim() == 3 and latents.shape[2] == d_v and latents.shape[1] > 0
              and latents.shape[1] % per_window == 0)
        if not ok:
            wanted = (f"[batch, windows x {n_latents}, {d_v}]" if n_latents
                      else f"[batch, frames x {per_window}, {d_v}]")
            raise ValueError(f"visual_latents must be {wanted}, got {tuple(latents.shape)}")
        if mask is not None and (mask.shape != latents.shape[:2] or mask.dtype != torch.bool):
            raise ValueError(f"visual_mask must be bool {tuple(latents.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
        videos = latents.shape[0]
        if video_index is None:
            if videos != input_ids.shape[0]:
                raise ValueError(f"batch size mismatch: input_ids has {input_ids.shape[0]} rows, "
                                 f"the videos give {videos}")
            return
        if video_index.shape != (input_ids.shape[0],):
            raise ValueError(f"video_index must be [{input_ids.shape[0]}] (one entry per row of input_ids), "
                             f"got shape {tuple(video_index.shape)}")
        if bool(((video_index < 0) | (video_index >= videos)).any()):
            raise ValueError(f"video_index values must be in [0, {videos}) (the videos given)")

    def forward(self, input_ids: torch.Tensor, video: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                visual_latents: torch.Tensor | None = None, video_index: torch.Tensor | None = None,
                windows: Windows | None = None, visual_mask: torch.Tensor | None = None) -> VideoLlamaOutput:
        """input_ids: [B, T]; video: [V, F, 3, H, W] (one 4-second window per video) or None (text
        only), or with ``windows`` the windows [N, F, 3, H, W] of V whole videos; labels: [B, T]
        aligned with input_ids (shifted inside, -100 ignored); attention_mask: [B, T], 1 = real
        token, for left-padded batches; visual_latents [V, L, D_v] (and visual_mask [V, L]) from
        :meth:`encode_video` / :meth:`gather_videos` instead of video. video_index: [B] long,
        optional: row b of input_ids is about video ``video_index[b]``, so several texts about one
        video share one pass of the encoder.
        """
        self.check_tokens(input_ids)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}")
        latents, latent_mask = self.visual_context(input_ids, video, visual_latents, video_index, windows=windows,
                                                   visual_mask=visual_mask)
        positions = positions_from_mask(attention_mask, input_ids)
        # An all-ones mask changes nothing: drop it so attention takes the plain causal fast path.
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        # With video_index each video is encoded, and each cross-attention block projects its
        # latents, once; the text rows of a video then gather that video's keys and values.
        media = (Media.from_latents(latents, index=video_index, key_mask=latent_mask)
                 if latents is not None else None)
        logits = self.decode(input_ids, positions=positions, key_mask=key_mask, media=media)
        loss = lm_loss(logits, labels) if labels is not None else None
        return VideoLlamaOutput(logits=logits, loss=loss)

    def decode(self, input_ids: torch.Tensor, *, positions: torch.Tensor, key_mask: torch.Tensor | None = None,
               media: Media | None = None, kv_caches: list[KVCache] | None = None,
               write_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens already checked (the arguments are :meth:`Decoder.forward`'s)."""
        return self.lm_head(self.decoder(input_ids, positions=positions, key_mask=key_mask, media=media,
                                         kv_caches=kv_caches, write_pos=write_pos))

    # ---- model directory (model/model_dir.py) ------------------------------------------
    def save_pretrained(self, directory: str | Path, *, tokenizer=None, max_shard_size: int = 5 * 2**30) -> None:
        """Write a model directory: config.json, preprocessor.json, the weights as safetensors
        (sharded above max_shard_size bytes; tied output weights stored once, as the embedding)
        and, given ``tokenizer`` (a ``tokenizers.Tokenizer`` or the path of a tokenizer.json),
        tokenizer.json: then ``videollama generate --model`` and ``videollama eval`` can use it."""
        save_model_dir(self, Path(directory), tokenizer=tokenizer, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, return_tokenizer: bool = False):
        """Load a model directory written by :meth:`save_pretrained` (or by ``videollama convert``).

        Returns the model, or ``(model, tokenizer)`` with ``return_tokenizer=True`` (the
        directory's tokenizer.json, an error if it has none)."""
        directory = Path(directory)
        config = read_config(directory)
        # Built on the meta device: no memory, no random init; the tensors are assigned below.
        with torch.device("meta"):
            model = cls(config)
        state = read_state(directory, config, model.state_dict(), device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()  # assign=True replaced the shared Parameter with two
        if return_tokenizer:
            from videollama.data.tokenizer import load_tokenizer

            return model, load_tokenizer(directory)
        return model


def positions_from_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Rotary positions [B, T]: 0..T-1, or counted over real tokens only for left-padded rows."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
