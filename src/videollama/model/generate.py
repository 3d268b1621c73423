"""Text generation with a KV cache, and the ``videollama generate`` command.

In the gpt-fast spirit: small pure functions. :func:`prefill` runs the prompt once and fills
the static KV caches; :func:`decode_step` runs one new token per row against them with
shapes that never change from step to step (the whole [B, max_len] cache, a [B, max_len] key
mask, per-row write positions as a tensor), so ``torch.compile`` compiles it once
(:func:`compiled_decode_step`). The visual latents and every cross-attention block's
keys/values are computed once per video, before the prompt. Greedy when ``temperature == 0``,
else temperature + nucleus sampling.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch

from videollama.model.decoder import KVCache
from videollama.model.videollama import VideoLlama, positions_from_mask

MediaKV = list[tuple[torch.Tensor, torch.Tensor]]


def prefill(model: VideoLlama, input_ids: torch.Tensor, *, attention_mask: torch.Tensor,
            media_kv: MediaKV | None, kv_caches: list[KVCache]) -> torch.Tensor:
    """Run the prompt [B, T] (attention_mask [B, T], 1 = real, left padding) through the model,
    filling kv_caches at positions 0..T-1; return the last position's logits [B, V]."""
    padded = not bool(attention_mask.all())
    hidden = model.decoder(input_ids, positions=positions_from_mask(attention_mask, input_ids),
                           key_mask=attention_mask if padded else None, media=media_kv,
                           kv_caches=kv_caches, start=0)  # [B, T, D]
    # Only the last position's logits are needed: skip a [B, T, V] projection of the prompt.
    return model.lm_head(hidden[:, -1])


def decode_one_token(model: VideoLlama, token: torch.Tensor, *, position: torch.Tensor,
                     key_mask: torch.Tensor | None, media_kv: MediaKV | None, kv_caches: list[KVCache],
                     start: int) -> torch.Tensor:
    """The growing-slice step (``generate(..., cache="dynamic")``, the reference for the static
    step): token, position: [B, 1]; key_mask: [B, start+1] or None when no row is padded.
    Writes cache slot ``start``; attends to slots 0..start; returns logits [B, V]."""
    logits = model.decode(token, positions=position, key_mask=key_mask, media=media_kv,
                          kv_caches=kv_caches, start=start)
    return logits[:, -1]


def decode_step(model: VideoLlama, token: torch.Tensor, *, position: torch.Tensor, write_pos: torch.Tensor,
                key_mask: torch.Tensor, media_kv: MediaKV | None, kv_caches: list[KVCache],
                media_rows: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row, static shapes: logits [B, V].

    token, position: [B, 1] long (the token fed and its rotary position); write_pos: [B] long,
    the cache slot each row writes; key_mask: bool [B, max_len], True at the slots each row's
    token may see, its own write slot included (the caller sets it); media_kv: per
    cross-attention block (k, v) [B, H, L, hd], or None; media_rows: bool [B] or None, which rows
    read media_kv (the others pass the cross-attention blocks unchanged, as with no video).
    """
    hidden = model.decoder(token, positions=position, key_mask=key_mask, media=media_kv,
                           kv_caches=kv_caches, start=write_pos, media_rows=media_rows)  # [B, 1, D]
    return model.lm_head(hidden[:, -1])


_COMPILED: dict[str, object] = {}


def compiled_decode_step():
    """:func:`decode_step` through ``torch.compile(dynamic=False)``, built once per process.

    Its inputs keep their shapes from step to step, so it compiles once per batch/cache shape
    (and once more for each of media / no media); the first call pays the compile (seconds to
    minutes on a CPU, C++ compiler needed). :func:`run_step` falls back to eager on failure.
    """
    if "step" not in _COMPILED:
        # One graph per (rows, cache length, media or not): BatchDecoder's row buckets alone give
        # 2 x log2(max_batch) + 2 of them, over dynamo's default limit of 8 (past which it would
        # silently run eager).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED["step"] = torch.compile(decode_step, dynamic=False)
    return _COMPILED["step"]


def run_step(compile: bool, *args, **kwargs) -> torch.Tensor:
    """:func:`decode_step`, compiled when ``compile``; a failed compile warns once and then
    runs eager for the rest of the process (``_COMPILED["failed"]`` records why)."""
    if compile and "failed" not in _COMPILED:
        try:
            return compiled_decode_step()(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - inductor raises many kinds; eager is always correct
            _COMPILED["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"torch.compile of the decode step failed ({_COMPILED['failed']}); "
                          "decoding eagerly", RuntimeWarning, stacklevel=2)
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
             visual_latents: torch.Tensor | None = None, compile: bool = False,
             cache: str = "static") -> torch.Tensor:
    """New tokens [B, T_new] (T_new <= max_new_tokens) after prompts input_ids [B, T].

    video: [B, F, 3, H, W] or None; visual_latents: [B, L, D_v] instead of video (to ask one
    video several questions without re-encoding it); attention_mask: [B, T] with 1 for real
    tokens, prompts LEFT-padded. A row that has emitted eos_token_id emits the pad id after;
    generation stops early once every row has. cache: "static" (the default: the fixed-shape
    :func:`decode_step`, compiled with ``compile=True``) or "dynamic" (the growing-slice
    :func:`decode_one_token`, eager; kept as the reference).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cache not in ("static", "dynamic"):
        raise ValueError(f"cache must be 'static' or 'dynamic', not {cache!r}")
    if compile and cache != "static":
        raise ValueError("compile=True needs cache='static' (the dynamic cache changes shape every step)")
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

    latents = model.visual_context(input_ids, video, visual_latents)
    # Every cross-attention block's keys/values, once per video rather than once per token.
    media_kv = model.decoder.project_media(latents) if latents is not None else None
    max_len = t + max_new_tokens
    if compile:  # a cache length rounded up to 64 slots: other lengths reuse the compiled step
        max_len = min(-(-max_len // 64) * 64, max(model.config.decoder.max_seq_len, max_len))
    kv_caches = model.decoder.new_kv_cache(b, max_len)
    padded = not bool(attention_mask.all())
    pad_id = model.config.decoder.pad_token_id

    logits = prefill(model, input_ids, attention_mask=attention_mask, media_kv=media_kv, kv_caches=kv_caches)
    position = positions_from_mask(attention_mask, input_ids)[:, -1:]  # [B, 1]
    if cache == "static":
        # Static shapes: the key mask covers the whole cache, the write slot is a tensor.
        key_mask = torch.zeros(b, max_len, dtype=torch.bool, device=input_ids.device)
        key_mask[:, :t] = attention_mask.bool()
        write_pos = torch.full((b,), t, dtype=torch.long, device=input_ids.device)
    else:
        key_mask = attention_mask
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
        if cache == "static":
            key_mask[:, t + step] = True
            logits = run_step(compile, model, token[:, None], position=position, write_pos=write_pos,
                              key_mask=key_mask, media_kv=media_kv, kv_caches=kv_caches)
            write_pos += 1
        else:
            key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)  # [B, t+step+1]
            logits = decode_one_token(model, token[:, None], position=position,
                                      key_mask=key_mask if padded else None, media_kv=media_kv,
                                      kv_caches=kv_caches, start=t + step)
    return torch.stack(new_tokens, dim=1)


# ---- the `videollama generate` command -------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from videollama.inference import add_model_arguments

    add_model_arguments(parser)  # --model, --adapter, --quantize
    parser.add_argument("--prompt", required=True, help="the prompt text, e.g. a question about the video")
    parser.add_argument("--template", choices=["raw", "videoqa", "caption"], default="raw",
                        help="raw: the prompt as given; videoqa: wrap it as a question (the fine-tuned "
                        "format); caption: ask for a caption (the prompt is ignored)")
    parser.add_argument("--video", type=Path, help="a video file; without it the model answers from text only")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (first call compiles; int8 weights are fast only so)")


# Below this, logits / temperature can overflow float32 (a 1e-39 temperature turns every logit
# into inf and the probabilities into NaN).
MIN_TEMPERATURE = 1e-6


def run(args: argparse.Namespace) -> int:
    # Lazy: the data package (PyAV, tokenizers) is only needed when this command runs.
    from videollama.data.tokenizer import caption_prompt, encode_prompt, videoqa_prompt

    # The tokenizer first: a directory without a usable one fails before any weights are read.
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"generate: model directory {args.model} has no tokenizer.json (convert with "
                                "--tokenizer, or copy the tokenizer the model was trained with into it)")
    # Checked before the model is loaded: the prompt's length (in characters, before tokenizing:
    # a 100 MB prompt costs nothing) and the numbers.
    from videollama.data.safe_io import MAX_TEXT_CHARS, check_regular_file

    if len(args.prompt) > MAX_TEXT_CHARS:
        raise ValueError(f"--prompt is {len(args.prompt)} characters, over the {MAX_TEXT_CHARS}-character cap")
    if args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf or not 0 < args.top_p <= 1:
        raise ValueError("need --max-new-tokens >= 1, --temperature >= 0 (finite) and 0 < --top-p <= 1")
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise ValueError(f"--temperature {args.temperature} is too small to sample with (the logits divided by it "
                         f"overflow): use 0 for greedy decoding, or at least {MIN_TEMPERATURE}")
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.video is not None:
        check_regular_file(args.video, "video")  # FileNotFoundError / not_a_file, before any weights
    from videollama.inference import load_for_inference

    model, tokenizer = load_for_inference(args.model, adapter=args.adapter, quantize=args.quantize,
                                          device=args.device)
    prompt = {"raw": lambda: args.prompt, "videoqa": lambda: videoqa_prompt(args.prompt),
              "caption": caption_prompt}[args.template]()
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) + args.max_new_tokens > model.config.decoder.max_seq_len:
        raise ValueError(f"the prompt is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that is over "
                         f"the model's max_seq_len {model.config.decoder.max_seq_len}")
    input_ids = torch.tensor([ids], device=args.device)
    video = None
    if args.video is not None:
        from videollama.data import load_clip

        pre = model.config.preprocess
        frames, _ = load_clip(args.video, num_frames=pre.num_frames, fps=pre.fps, size=pre.size,
                              mean=pre.mean, std=pre.std)  # a bad video: BadSample, one line
        video = torch.as_tensor(frames, dtype=torch.float32, device=args.device)[None]  # [1, F, 3, S, S]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new = generate(model, input_ids, video, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, eos_token_id=model.config.decoder.eos_token_id, generator=generator,
                   compile=args.compile)
    ids = [i for i in new[0].tolist() if i != model.config.decoder.eos_token_id]
    print(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return 0
