"""Model stages with a VideoLlama model directory: PMI alignment (``--scorer``) and automated
captions (``--captioner``).

Alignment of a text with a clip is the pointwise mutual information

    PMI(text, video) = mean log p(text | video) - mean log p(text | no video)

where the means run over the text's tokens and its EOS, as the caption template frames them
(``<s><video><|caption|>`` text ``</s>``, the training format), and "no video" is the same
decoder without any visual context (its cross-attention blocks skipped). A text that the video
makes more likely than the language prior alone has PMI > 0. That mean is the ``pmi`` column.

Two more reductions of the same per-token PMI ``log p(token | video) - log p(token | no video)``
are stored beside it (``pmi_sum``, ``pmi_span``), so that a run's table can be re-filtered by any
of them (``filter.pmi_reduce``): ``sum`` over the tokens (boilerplate tokens that the video does
not explain add about 0 instead of diluting a mean) and ``max_span``, the largest sum over a
contiguous run of tokens (the best-explained part of the text; negative stretches cut out).

The text-only prior is only as good as the decoder is at modelling text without a video, and a
decoder that was always trained with one is not: without its cross-attention it predicts even
the template's words ("moves", ".", EOS) badly, so every caption-like text, right or wrong, gains
a large PMI from words that say nothing about the video. ``filter.pmi_prior: marginal`` divides
by the prior that the PMI's definition actually needs, the marginal
p(text) = E_video p(text | video), estimated through the same video path as the numerator:

    log p(token | prefix) ~= log mean_{r in R} p(token | prefix, clip r)

over ``scorer.reference_clips`` reference clips R (evenly spaced over the clips that passed the
cheap filters; the same set for every batch). A token that no video explains (template words,
web boilerplate) then scores about 0, one the clip explains > 0, one it contradicts (the wrong
colour) < 0. Its mean, sum and max-span are the ``pmi_marginal``, ``pmi_marginal_sum`` and
``pmi_marginal_span`` columns. Frames come from the model's own preprocessing spec (its
preprocessor.json), the pixels evaluation would feed it.

Captions are generated greedily in batches, with the KV cache and each clip encoded once
(``videollama.inference.generate.generate_batch``, the evaluation path).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from videollama.curate.clipfiles import Spec
from videollama.curate.config import PMI_EXTRA_COLUMNS


def model_spec(model_dir: str | Path) -> tuple[Spec, dict[str, Any]]:
    """``((num_frames, fps, size), preprocess dict)`` of a VideoLlama model directory, without torch."""
    directory = Path(model_dir)
    path = directory / "preprocessor.json"
    if path.is_file():
        pre = json.loads(path.read_text())
    elif (directory / "config.json").is_file():
        pre = json.loads((directory / "config.json").read_text())["preprocess"]
    else:
        raise FileNotFoundError(f"{directory}: no preprocessor.json or config.json; not a VideoLlama model directory")
    return (int(pre["num_frames"]), float(pre["fps"]), int(pre["size"])), pre


class _ModelStage:
    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        import torch

        from videollama.model.videollama import VideoLlama

        self.device = torch.device(device)
        self.model, self.tokenizer = VideoLlama.from_pretrained(model_dir, device=self.device, return_tokenizer=True)
        self.model.eval()
        pre = self.model.config.preprocess
        self.spec: Spec = (pre.num_frames, pre.fps, pre.size)
        self.mean, self.std = pre.mean, pre.std

    def video(self, frames: list[np.ndarray]):
        """uint8 clips [F, S, S, 3] each -> normalised [U, F, 3, S, S] on the model's device."""
        from videollama.curate.clipscore import normalise

        return normalise(np.stack(frames).reshape(-1, *frames[0].shape[1:]), self.mean, self.std).view(
            len(frames), frames[0].shape[0], 3, self.spec[2], self.spec[2]).to(self.device)


def token_log_probs(logits, labels):
    """Per-token log-probabilities of the labelled tokens. logits [B, T, V]; labels [B, T] ->
    (log p [B, T-1], mask [B, T-1] bool; position t scores labels[t + 1])."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    return logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask, mask


def max_span_sum(values: list[float]) -> float:
    """The largest sum of a non-empty contiguous run of ``values`` (Kadane)."""
    best = current = values[0]
    for v in values[1:]:
        current = max(v, current + v)
        best = max(best, current)
    return best


class PmiScorer(_ModelStage):
    """:meth:`score` returns, per clip, the PMI of each candidate text (``scores``: the mean with the
    text-only prior; also ``pmi_sum``, ``pmi_span`` and, given reference clips, the marginal-prior
    ``pmi_marginal``, ``pmi_marginal_sum``, ``pmi_marginal_span``; see the module docstring) and the
    clip's embedding."""

    REDUCED = PMI_EXTRA_COLUMNS
    MAX_ROWS = 1024  # text rows per decoder pass of the marginal prior (texts x reference clips)

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        super().__init__(model_dir, device)
        self._reference: tuple[tuple[str, ...], Any] | None = None  # (clip ids, latents [R, L, D_v])

    def reference_latents(self, ids: list[str], frames: list[np.ndarray]):
        """The reference clips, encoded once per reference set: their visual latents [R, L, D_v]
        with each cross-attention block's keys and values of them (``Media.projected``)."""
        import torch

        from videollama.model.decoder import Media

        if self._reference is None or self._reference[0] != tuple(ids):
            with torch.inference_mode():
                latents = self.model.encode_video(self.video(frames))
                self._reference = (tuple(ids), (latents, Media.projected(self.model.decoder, latents)))
        return self._reference[1]

    def _marginal_log_probs(self, input_ids, label_ids, reference):
        """Per-token log of the mean over the R reference clips of p(token | prefix, clip):
        [B, T-1], 0 where masked. ``reference``: from :meth:`reference_latents`. Each reference
        clip's keys and values are projected once; the lm head runs on the labelled positions only."""
        import torch

        latents, media = reference
        n_ref = latents.shape[0]
        per_pass = max(1, self.MAX_ROWS // n_ref)
        target_all, mask_all = label_ids[:, 1:], label_ids[:, 1:] != -100
        out = torch.zeros(target_all.shape, dtype=torch.float32, device=input_ids.device)
        for first in range(0, input_ids.shape[0], per_pass):
            ids = input_ids[first:first + per_pass]
            k = ids.shape[0]
            rows = ids.repeat_interleave(n_ref, 0)  # [k * R, T]: text i with reference r at row i * R + r
            positions = torch.arange(rows.shape[1], device=rows.device).expand(rows.shape[0], -1)
            which = torch.arange(n_ref, device=rows.device).repeat(k)
            hidden = self.model.decoder(rows, positions=positions, media=replace(media, index=which))[:, :-1]
            mask = mask_all[first:first + per_pass].repeat_interleave(n_ref, 0)  # [k * R, T-1]
            logp = torch.log_softmax(self.model.lm_head(hidden[mask]).float(), dim=-1)  # [N, V]
            target = target_all[first:first + per_pass].repeat_interleave(n_ref, 0)[mask]
            picked = torch.zeros(mask.shape, dtype=torch.float32, device=rows.device)
            picked[mask] = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            marginal = torch.logsumexp(picked.view(k, n_ref, -1), dim=1) - math.log(n_ref)  # [k, T-1]
            out[first:first + k] = marginal * mask_all[first:first + k]
        return out

    def score(self, clips: list[tuple[np.ndarray, list[str]]], reference=None) -> list[dict[str, Any]]:
        """``clips``: (uint8 frames [F, S, S, 3], candidate texts) each; ``reference``: the
        reference clips from :meth:`reference_latents`, or None (no marginal prior)."""
        import torch

        from videollama.data.tokenizer import caption_prompt, encode_example

        dec = self.model.config.decoder
        rows, labels, index, where = [], [], [], []
        for c, (_, texts) in enumerate(clips):
            for t, text in enumerate(texts):
                try:
                    ids, lab = encode_example(self.tokenizer, caption_prompt(), text, dec.max_seq_len)
                except ValueError:  # longer than the context: it cannot be a caption of this model
                    continue
                rows.append(ids)
                labels.append(lab)
                index.append(c)
                where.append((c, t))
        keys = ("scores", "logp_video", "logp_text", *self.REDUCED)
        results = [{k: [None] * len(texts) for k in keys} for _, texts in clips]
        with torch.inference_mode():
            latents = self.model.encode_video(self.video([f for f, _ in clips]))  # [U, L, D_v]
            if rows:
                # Right padding: a causal decoder's real tokens never attend to the pads after them.
                width = max(len(r) for r in rows)
                input_ids = torch.full((len(rows), width), dec.pad_token_id, dtype=torch.long)
                label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
                for i, (r, lab) in enumerate(zip(rows, labels)):
                    input_ids[i, :len(r)] = torch.tensor(r)
                    label_ids[i, :len(lab)] = torch.tensor(lab)
                input_ids = input_ids.to(self.device)
                label_ids = label_ids.to(self.device)
                idx = torch.tensor(index, device=self.device)
                lp_video, mask = token_log_probs(self.model(input_ids, visual_latents=latents[idx]).logits, label_ids)
                lp_text, _ = token_log_probs(self.model(input_ids).logits, label_ids)
                count = mask.sum(1).clamp_min(1)
                with_video, without = lp_video.sum(1) / count, lp_text.sum(1) / count  # [B] means
                per_token = (lp_video - lp_text).double()  # [B, T-1], 0 where masked
                marginal = None
                if reference is not None:
                    marginal = (lp_video - self._marginal_log_probs(input_ids, label_ids, reference)).double()
                for i, (c, t) in enumerate(where):
                    r = results[c]
                    r["logp_video"][t] = float(with_video[i])
                    r["logp_text"][t] = float(without[i])
                    r["scores"][t] = float(with_video[i]) - float(without[i])
                    r["pmi_sum"][t] = float(per_token[i].sum())
                    r["pmi_span"][t] = max_span_sum(per_token[i][mask[i]].tolist())
                    if marginal is not None:
                        r["pmi_marginal"][t] = float(marginal[i].sum() / count[i])
                        r["pmi_marginal_sum"][t] = float(marginal[i].sum())
                        r["pmi_marginal_span"][t] = max_span_sum(marginal[i][mask[i]].tolist())
            pooled = latents.float().mean(dim=1)  # [U, D_v]
            pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for c, result in enumerate(results):
            result["embedding"] = [float(x) for x in pooled[c]]
        return results


class Captioner(_ModelStage):
    """:meth:`caption` generates one caption per clip, greedily, in one batch."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", max_new_tokens: int = 48):
        super().__init__(model_dir, device)
        self.max_new_tokens = max_new_tokens

    def caption(self, frames: list[np.ndarray]) -> list[str]:
        from videollama.data.tokenizer import caption_prompt, encode_prompt
        from videollama.inference.generate import generate_batch

        prompt = list(encode_prompt(self.tokenizer, caption_prompt()))
        video = self.video(frames)
        return generate_batch(self.model, self.tokenizer, [prompt] * len(frames), list(video),
                              list(range(len(frames))), max_new_tokens=self.max_new_tokens)
