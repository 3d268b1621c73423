"""Text generation with a static KV cache: the one generation path.

In the gpt-fast spirit: small pure functions. :func:`prefill` runs the prompt once and fills
the static KV caches; :func:`decode_step` runs one new token per row against them with
shapes that never change from step to step (the whole [B, max_len] cache, a [B, max_len] key
mask, per-row write positions as a tensor), so ``torch.compile`` compiles it once
(:func:`compiled_decode_step`). The visual latents and every cross-attention block's
keys/values are computed once per video, before the prompt. Greedy when ``temperature == 0``,
else temperature + nucleus sampling. :func:`generate` decodes a batch of prompts;
:func:`generate_batch` turns token prompts about a few videos into text (evaluation's whole
videos, curation's captioner's clips); :class:`~videollama.inference.batch.BatchDecoder` runs the same step for
requests that join and leave (serving).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from videollama.inference.whole_video import EncodedVideo, pad_videos
from videollama.model.decoder import KVCache, Media
from videollama.model.videollama import VideoLlama, Windows, positions_from_mask

log = logging.getLogger(__name__)


def prefill(model: VideoLlama, input_ids: torch.Tensor, *, attention_mask: torch.Tensor,
            media: Media | None, kv_caches: list[KVCache]) -> torch.Tensor:
    """Run the prompt [B, T] (attention_mask [B, T], 1 = real, left padding) through the model,
    filling kv_caches at slots 0..T-1; return the last position's logits [B, V]."""
    padded = not bool(attention_mask.all())
    start = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)  # [B]
    hidden = model.decoder(input_ids, positions=positions_from_mask(attention_mask, input_ids),
                           key_mask=attention_mask if padded else None, media=media,
                           kv_caches=kv_caches, write_pos=start)  # [B, T, D]
    # Only the last position's logits are needed: skip a [B, T, V] projection of the prompt.
    return model.lm_head(hidden[:, -1])


def decode_step(model: VideoLlama, token: torch.Tensor, *, position: torch.Tensor, write_pos: torch.Tensor,
                key_mask: torch.Tensor, media: Media | None, kv_caches: list[KVCache]) -> torch.Tensor:
    """One new token per row, static shapes: logits [B, V].

    token, position: [B, 1] long (the token fed and its rotary position); write_pos: [B] long,
    the cache slot each row writes; key_mask: bool [B, max_len], True at the slots each row's
    token may see, its own write slot included (the caller sets it); media: the rows' video
    context with its keys/values projected (:meth:`Media.projected`), or None.
    """
    hidden = model.decoder(token, positions=position, key_mask=key_mask, media=media,
                           kv_caches=kv_caches, write_pos=write_pos)  # [B, 1, D]
    return model.lm_head(hidden[:, -1])


# The process's compiled decode step ("step"), the step chosen per shape ("choices") and why
# compiling failed ("failed"): benchmarks and tests read or clear it to start afresh.
COMPILED: dict[str, object] = {}
STEP_ENV = "VIDEOLLAMA_STEP"  # auto (measure), compiled or eager: what compile=True runs


def compiled_decode_step():
    """:func:`decode_step` through ``torch.compile(dynamic=False)``, built once per process.

    Its inputs keep their shapes from step to step, so it compiles once per batch/cache shape
    (and once more for each of media / no media); the first call pays the compile (seconds to
    minutes on a CPU, C++ compiler needed), once per host: inductor's caches live in our cache
    directory (:func:`~videollama.inference.host.use_compile_cache`), so a later process loads
    the compiled graphs. :func:`run_step` falls back to eager on failure.
    """
    if "step" not in COMPILED:
        from videollama.inference.host import use_compile_cache

        use_compile_cache()
        # One graph per (rows, cache length, media or not): BatchDecoder's row buckets alone give
        # 2 x log2(max_batch) + 2 of them, over dynamo's default limit of 8 (past which it would
        # silently run eager).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        COMPILED["step"] = torch.compile(decode_step, dynamic=False)
    return COMPILED["step"]


def _step_key(model: VideoLlama, token: torch.Tensor, kv_caches: list[KVCache], media: Media | None) -> str:
    """What a step's speed depends on: the decoder's shapes, its int8 implementations, the rows,
    the cache length and the video keys/values' shape (or none)."""
    import hashlib

    from videollama.inference.quantize import Int8Linear

    impls = sorted({(m.impl, m.compiled_impl) for m in model.modules() if isinstance(m, Int8Linear)})
    p = next(model.decoder.parameters())
    ident = repr((model.config.decoder, impls, p.dtype, p.device.type))
    media_shape = "none" if media is None else "x".join(map(str, media.kv[0][0].shape[1:])) if media.kv else "latents"
    return (f"step/{hashlib.sha256(ident.encode()).hexdigest()[:16]}/rows{token.shape[0]}/"
            f"len{kv_caches[0].k.shape[2]}/media-{media_shape}")


def step_choice(model: VideoLlama, token: torch.Tensor, **kwargs) -> str:
    """"compiled" or "eager": which decode step runs for these inputs when compiling is asked for.

    $VIDEOLLAMA_STEP=compiled or eager decides outright; otherwise (auto) the choice is measured
    the first time a shape is seen on this host (compile, then both steps timed on these inputs:
    a step writes the same cache slot each time, so repeating it changes nothing) and kept in our
    cache directory. Either way the compiled step is compiled here, once per process, and the
    time that took (``warm_s``) goes into the record :func:`step_report` lists. A compile that
    fails warns once; every step is eager from then on."""
    from videollama.inference import tuning

    if "failed" in COMPILED:
        return "eager"
    key = _step_key(model, token, kwargs["kv_caches"], kwargs["media"])
    choices = COMPILED.setdefault("choices", {})
    if key in choices:
        return choices[key]["choice"]
    policy = os.environ.get(STEP_ENV, "auto").strip().lower()
    t = time.perf_counter()
    try:
        if policy in ("compiled", "eager"):
            record = {"choice": policy, "why": f"{STEP_ENV}={policy}"}
        else:
            if any(hasattr(m, "compiled_impl") for m in model.modules()):  # int8 linears: fused or not
                tuning.prepare_compiled(model)
                key = _step_key(model, token, kwargs["kv_caches"], kwargs["media"])
            record = dict(tuning.choose_step(key, lambda: decode_step(model, token, **kwargs),
                                             lambda: compiled_decode_step()(model, token, **kwargs)))
        if record["choice"] == "compiled":
            compiled_decode_step()(model, token, **kwargs)  # compiles now, not inside a timed step
    except Exception as e:  # noqa: BLE001 - inductor raises many kinds; eager is always correct
        _failed(e)
        return "eager"
    record["warm_s"] = time.perf_counter() - t
    record["rows"], record["cache_len"] = token.shape[0], kwargs["kv_caches"][0].k.shape[2]
    record["media"] = kwargs["media"] is not None
    choices[key] = record
    log.info("decode step at %d rows, cache %d%s: %s (%s), warm-up %.1f s", record["rows"], record["cache_len"],
             ", video" if record["media"] else "", record["choice"], _times(record), record["warm_s"])
    return record["choice"]


def _failed(e: Exception) -> None:
    COMPILED["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    warnings.warn(f"torch.compile of the decode step failed ({COMPILED['failed']}); decoding eagerly",
                  RuntimeWarning, stacklevel=3)


def _times(record: dict) -> str:
    ms = record.get("ms")
    if not ms:
        return record.get("why", "kept from an earlier measurement")
    return f"compiled {ms['compiled']:.2f} ms vs eager {ms['eager']:.2f} ms per step"


def step_report() -> list[dict]:
    """The decode-step choices this process made, one record per shape: choice, ms, warm_s, rows,
    cache_len, media."""
    return list(COMPILED.get("choices", {}).values())


def run_step(compile: bool, *args, **kwargs) -> torch.Tensor:
    """:func:`decode_step`, compiled when ``compile`` and :func:`step_choice` says compiling wins
    here; a failed compile warns once and then runs eager for the rest of the process
    (``COMPILED["failed"]`` records why)."""
    if compile and step_choice(*args, **kwargs) == "compiled":
        try:
            return compiled_decode_step()(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - inductor raises many kinds; eager is always correct
            _failed(e)
    return decode_step(*args, **kwargs)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> next token ids [B]. Greedy at temperature 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always >= 1 token).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: VideoLlama, input_ids: torch.Tensor, video: torch.Tensor | None = None, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None,
             visual_latents: torch.Tensor | None = None, compile: bool = False, windows: Windows | None = None,
             visual_mask: torch.Tensor | None = None, video_index: torch.Tensor | None = None) -> torch.Tensor:
    """New tokens [B, T_new] (T_new <= max_new_tokens) after prompts input_ids [B, T].

    video: [B, F, 3, H, W] (one clip per row) or, with ``windows``, the windows [N, F, 3, H, W]
    of whole videos, or None; visual_latents: [V, L, D_v] (and visual_mask [V, L]) instead of
    video (to ask one video several questions without re-encoding it); video_index: [B], the
    video each row reads (None: row b reads video b); attention_mask: [B, T] with 1 for real
    tokens, prompts LEFT-padded. A row that has emitted eos_token_id emits the pad id after;
    generation stops early once every row has. compile: run the fixed-shape
    :func:`decode_step` through ``torch.compile`` (the first call compiles).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    model.check_tokens(input_ids, extra=max_new_tokens)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                         f"input_ids {tuple(input_ids.shape)}")
    elif not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded: every row's last token must be real")
    attention_mask = attention_mask.to(input_ids.device).long()

    latents, latent_mask = model.visual_context(input_ids, video, visual_latents, video_index, windows=windows,
                                                visual_mask=visual_mask)
    # Every cross-attention block's keys/values, once per video rather than once per token.
    media = (Media.projected(model.decoder, latents, index=video_index, key_mask=latent_mask)
             if latents is not None else None)
    max_len = t + max_new_tokens
    if compile:  # a cache length rounded up to 64 slots: other lengths reuse the compiled step
        max_len = min(-(-max_len // 64) * 64, max(model.config.decoder.max_seq_len, max_len))
    kv_caches = model.decoder.new_kv_cache(b, max_len)
    pad_id = model.config.decoder.pad_token_id

    logits = prefill(model, input_ids, attention_mask=attention_mask, media=media, kv_caches=kv_caches)
    position = positions_from_mask(attention_mask, input_ids)[:, -1:]  # [B, 1]
    # Static shapes: the key mask covers the whole cache, the write slot is a tensor.
    key_mask = torch.zeros(b, max_len, dtype=torch.bool, device=input_ids.device)
    key_mask[:, :t] = attention_mask.bool()
    write_pos = torch.full((b,), t, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = sample(logits, temperature=temperature, top_p=top_p, generator=generator)  # [B]
        token = token.masked_fill(finished, pad_id)
        new_tokens.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        position = position + 1
        key_mask[:, t + step] = True
        logits = run_step(compile, model, token[:, None], position=position, write_pos=write_pos,
                          key_mask=key_mask, media=media, kv_caches=kv_caches)
        write_pos += 1
    return torch.stack(new_tokens, dim=1)


# ---- token prompts about a few videos -> text (evaluation, curation's captioner) ----------------

def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``input_ids`` [B, T] left-padded with ``pad_id`` and ``attention_mask`` [B, T]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def answer_text(tokenizer: Any, ids: list[int], *, eos_id: int, pad_id: int) -> str:
    """New tokens of one row -> text: everything before the first EOS, without padding."""
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    ids = [i for i in ids if i != pad_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_batch(model: VideoLlama, tokenizer: Any, prompts: list[list[int]],
                   videos: Sequence[torch.Tensor] | Sequence[EncodedVideo], video_index: list[int], *,
                   max_new_tokens: int) -> list[str]:
    """Greedy generation for one batch of B prompts about U distinct videos; returns B strings.

    ``videos``: U clips [F, 3, S, S], each one window at time 0, encoded here once (curation's
    captioner, short clips); or U whole videos already encoded
    (:func:`~videollama.inference.whole_video.encode_whole_video`), padded to the longest with a
    key mask. ``video_index``: for each prompt, which video. Whole videos are shared by index:
    the questions about one video read its latents and cross-attention keys/values once, with no
    per-row copies.
    """
    dec = model.config.decoder
    input_ids, attention_mask = left_pad(prompts, dec.pad_token_id)
    # Never ask for more than the context holds: the prompt plus new tokens must fit max_seq_len.
    budget = dec.max_seq_len - input_ids.shape[1]
    if budget < 1:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens leaves no room in max_seq_len={dec.max_seq_len}")
    if len(video_index) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(video_index)} video indices")
    param = next(model.parameters())
    with torch.inference_mode():
        if videos and isinstance(videos[0], EncodedVideo):
            latents, mask = pad_videos(list(videos))  # [U, L_max, D_v], [U, L_max] or None
            visual = {"visual_latents": latents, "visual_mask": mask,
                      "video_index": torch.tensor(video_index, device=latents.device)}
        else:
            video = torch.stack(list(videos)).to(device=param.device, dtype=param.dtype)  # [U, F, 3, S, S]
            latents = model.encode_video(video)  # [U, L, D_v]
            visual = {"visual_latents": latents[torch.tensor(video_index, device=latents.device)]}  # [B, L, D_v]
        new_tokens = generate(
            model, input_ids.to(param.device), max_new_tokens=min(max_new_tokens, budget), temperature=0.0,
            eos_token_id=dec.eos_token_id, attention_mask=attention_mask.to(param.device), **visual,
        )  # [B, T_new]
    return [answer_text(tokenizer, row, eos_id=dec.eos_token_id, pad_id=dec.pad_token_id)
            for row in new_tokens.tolist()]
