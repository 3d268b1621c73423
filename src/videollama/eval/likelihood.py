"""The log-likelihood of a continuation given a prompt and a video: multiple choice by option likelihood.

One teacher-forced forward pass scores a batch of ``(prompt, continuation)`` rows about a few
videos; each video's visual latents are computed once (by the caller: :func:`encode_videos` for
clips, ``inference.whole_video.encode_whole_video`` for whole videos) and shared by every row
about it. A row's score is the SUM of the log-probabilities of its
continuation tokens, each given the prompt and the continuation tokens before it (no EOS is
added: the continuation is scored as given); the token count comes with it, so that a caller may
take the mean instead.

The prompt is tokenized as generation tokenizes it (``encode_prompt``: BOS + the prompt) and the
continuation on its own, as training tokenizes a target after the prompt (``encode_example``).
Used by the lmms-eval model (``videollama.eval.lmms``); imports nothing of lmms-eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ContinuationScore:
    """``logprob``: sum over the continuation's ``num_tokens`` tokens; ``greedy``: whether greedy
    decoding from the prompt would produce exactly these tokens."""

    logprob: float
    num_tokens: int
    greedy: bool


def encode_videos(model: Any, videos: list[torch.Tensor]) -> torch.Tensor:
    """U clips [F, 3, S, S] -> visual latents [U, L, D_v] on the model's device and dtype."""
    param = next(model.parameters())
    with torch.inference_mode():
        video = torch.stack(videos).to(device=param.device, dtype=param.dtype)  # [U, F, 3, S, S]
        return model.encode_video(video)


def score_continuations(model: Any, prompts: list[list[int]], continuations: list[list[int]],
                        latents: torch.Tensor | None, video_index: list[int], *,
                        visual_mask: torch.Tensor | None = None) -> list[ContinuationScore]:
    """Score B rows in one left-padded forward pass.

    prompts: B token lists (BOS included); continuations: B non-empty token lists; latents: U
    videos' visual latents [U, L, D_v] (None: text only), with ``visual_mask`` [U, L] for whole
    videos padded to the longest (``inference.whole_video.pad_videos``); video_index: for each row,
    which video (the rows of a video read its latents, never copied per row).
    Raises ValueError when a row does not fit the model's context (``max_seq_len``).
    """
    from videollama.inference.generate import left_pad

    if len(prompts) != len(continuations) or len(prompts) != len(video_index):
        raise ValueError(f"{len(prompts)} prompts, {len(continuations)} continuations, {len(video_index)} video indices")
    if any(not c for c in continuations):
        raise ValueError("every continuation needs at least one token")
    dec = model.config.decoder
    rows = [p + c for p, c in zip(prompts, continuations)]
    too_long = [len(r) for r in rows if len(r) > dec.max_seq_len]
    if too_long:
        raise ValueError(f"a prompt + continuation of {max(too_long)} tokens is longer than max_seq_len={dec.max_seq_len}")
    input_ids, attention_mask = left_pad(rows, dec.pad_token_id)  # [B, T] each
    param = next(model.parameters())
    with torch.inference_mode():
        index = None if latents is None else torch.tensor(video_index, device=latents.device)  # [B]
        logits = model(input_ids.to(param.device), attention_mask=attention_mask.to(param.device),
                       visual_latents=latents, visual_mask=visual_mask, video_index=index).logits  # [B, T, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    width = input_ids.shape[1]
    scores = []
    for row, cont in enumerate(continuations):
        n = len(cont)
        # Left padding puts every row's last token at width - 1; position t predicts token t + 1.
        predicting = logprobs[row, width - n - 1 : width - 1]  # [n, V]
        target = torch.tensor(cont, device=predicting.device)  # [n]
        token_logprobs = predicting.gather(-1, target[:, None]).squeeze(-1)  # [n]
        scores.append(ContinuationScore(logprob=float(token_logprobs.sum()), num_tokens=n,
                                        greedy=bool((predicting.argmax(-1) == target).all())))
    return scores
