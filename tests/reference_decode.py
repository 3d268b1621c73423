"""The growing-slice decode: the reference that the static-cache path is checked against.

Before the static cache, each step wrote its token into the KV cache and attended to slots
0..start only, the cache growing by one slot a step, with a key mask that grows with it. It
is kept here, out of ``src/``, as the independent path the tests (and bench/bench_decode.py's
"before" rows) compare ``videollama.inference.generate`` with. Eager only: its shapes change
every step.
"""

from __future__ import annotations

import torch

from videollama.inference.generate import prefill, sample
from videollama.model.decoder import KVCache, Media
from videollama.model.videollama import VideoLlama, positions_from_mask


def decode_one_token(model: VideoLlama, token: torch.Tensor, *, position: torch.Tensor, key_mask: torch.Tensor,
                     media: Media | None, kv_caches: list[KVCache], start: int) -> torch.Tensor:
    """token, position: [B, 1]; key_mask: [B, start+1], 1 at the real tokens (this one included).
    Writes cache slot ``start``; attends to slots 0..start (the key mask's width); returns logits [B, V]."""
    write_pos = torch.full((token.shape[0],), start, dtype=torch.long, device=token.device)
    logits = model.decode(token, positions=position, key_mask=key_mask, media=media, kv_caches=kv_caches,
                          write_pos=write_pos)
    return logits[:, -1]


@torch.inference_mode()
def reference_generate(model: VideoLlama, input_ids: torch.Tensor, video: torch.Tensor | None = None, *,
                       max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                       eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
                       generator: torch.Generator | None = None,
                       visual_latents: torch.Tensor | None = None) -> torch.Tensor:
    """What ``generate`` returns, by growing-slice steps: new tokens [B, T_new]."""
    model.check_tokens(input_ids, extra=max_new_tokens)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device).long()
    latents, _ = model.visual_context(input_ids, video, visual_latents)
    media = Media.projected(model.decoder, latents) if latents is not None else None
    kv_caches = model.decoder.new_kv_cache(b, t + max_new_tokens)
    pad_id = model.config.decoder.pad_token_id

    logits = prefill(model, input_ids, attention_mask=attention_mask, media=media, kv_caches=kv_caches)
    position = positions_from_mask(attention_mask, input_ids)[:, -1:]  # [B, 1]
    key_mask = attention_mask
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = sample(logits, temperature=temperature, top_p=top_p, generator=generator).masked_fill(finished, pad_id)
        new_tokens.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        position = position + 1
        key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)  # [B, t+step+1]
        logits = decode_one_token(model, token[:, None], position=position, key_mask=key_mask, media=media,
                                  kv_caches=kv_caches, start=t + step)
    return torch.stack(new_tokens, dim=1)
