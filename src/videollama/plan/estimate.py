"""The memory estimate of ``videollama plan``: the peak per device of a training step or of generation.

Parameters, gradients and optimizer state are counted exactly on a meta-device model (no memory
is allocated, so ``videollama-13b`` is counted in a second). Activations come from
:mod:`videollama.plan.activations`, which lists the tensors autograd saves per block kind from the
model's shapes. A step is then replayed stage by stage (forward, the loss, backward in reverse,
the optimizer step), adding at each moment what is alive, and the peak is the largest of those
moments; the breakdown is the memory at that moment.

Training: AdamW (two fp32 states per trainable parameter, and a step counter per tensor), fp32
gradients. fp32 on one device is the training loop without FSDP; bf16, or more than one device, is
FSDP2 (train/parallel.py): full sharding inside a node, hybrid across nodes (``Settings.shard``):
parameters (fp32: under bf16 mixed precision they are the master weights), gradients and optimizer
state are divided by the devices of a node, and the bf16
(or fp32) copies of the root module (embeddings, norms, lm_head: gathered for the whole step) and
of the two largest blocks (the current one and the prefetched next) are added; in backward a
block's unsharded gradient and its fp32 reduce-scatter buffer. Accumulating several micro-batches
(``Settings.accumulation``), the earlier ones' gradient is held in fp32 (shards: train/loop.py
reduce-scatters every micro-batch) through the last forward. Inference is ``generate``: the
weights, the visual latents and every cross-attention block's keys/values, the static KV cache
(batch x layers x 2 x kv_heads x head_dim x (prompt + new tokens)) and the largest transient of
encoding, prefill or a decode step; each device holds a whole replica. A whole video per prompt
(``Settings.windows``, from ``--video-seconds`` by the model's window policy) is decoded and encoded
``windows_per_chunk`` windows at a time into one buffer of its latents [W, L, D_v], the chunk's frames
dropped after it, then given to ``generate`` as ``visual_latents``: the encoder's transients are one
chunk's, while the latents [W * L, D_v] and every cross-attention block's keys and values
[H, W * L, hd] x 2 grow with the video; the text's KV cache does not.

LoRA (``--mode lora``, train/lora.py): every base weight frozen, stored as the training loop stores
it (fp32 on one device in fp32; under FSDP2 the sharded fp32 parameters and the gathered bf16 copies,
as for full training); the trainable parameters are the adapters of the layers
``train.lora.target_modules`` selects on a meta-device model (r x (in + out) per adapted linear,
r x (num_embeddings + dim) per embedding, two tensors each), with fp32 gradients and AdamW state.
Activations: what autograd saves with the base frozen (activations.lora_internal). QLoRA
(``--mode qlora``): as LoRA on one device without FSDP (train/loop.py runs it in one process), with
every ``nn.Linear`` but ``lm_head`` (train.lora.quantize_nf4) in bitsandbytes NF4: 4 bits per weight
(``ceil(n / 2)`` bytes), an 8-bit absmax per 64-value block (double quantization, bitsandbytes'
default ``compress_statistics=True``), an fp32 absmax per 256 of those blocks, and per tensor the
fp32 offset of the absmax and the 16-value fp32 NF4 code: 0.5 + 1/64 + 4/16384 = 0.5159 B per weight
(bitsandbytes.functional.quantize_4bit / quantize_blockwise). The other parameters (embeddings,
norms, lm_head, biases) are in the run's precision (bf16 by default), as are the activations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from videollama.config import VideoLlamaConfig
from videollama.plan.activations import (
    F32,
    I64,
    Stage,
    decoder_side,
    decoder_stages,
    lora_internal,
    loss_stage,
    resampler_stage,
    vision_stages,
)
from videollama.plan.params import base_weight_bytes, lora_table, param_table, stage_of
from videollama.plan.settings import TRAINING, Settings, usable_bytes, with_settings

# What is alive at the peak, in this order; the items sum to the peak.
BREAKDOWN = ("parameters", "gradients", "optimizer_state", "gathered_parameters", "inputs", "activations",
             "visual_latents_and_cross_kv", "kv_cache", "transient")


@dataclass
class Estimate:
    peak: int
    phase: str                  # the moment of the peak
    at_peak: dict[str, int]     # what is alive then; sums to peak
    totals: dict[str, int]      # each item at its own largest


# ---- the estimate -----------------------------------------------------------------------------------


def estimate(config: VideoLlamaConfig, s: Settings) -> Estimate:
    """The peak memory of one device for ``s`` (no validation: see :func:`plan`)."""
    table = param_table(config)
    act = F32 if s.precision == "fp32" else 2
    if s.mode not in TRAINING:
        return _infer(config, s, table, act)
    return _train(config, s, table, act)


def _stages(config, s: Settings, act: int, *, clips: int, rows: int, tokens: int) -> tuple[list[Stage], int]:
    vis = vision_stages(config, clips=clips, frames=s.frames, act=act)
    res, latents = resampler_stage(config, clips=clips, frames=s.frames, act=act)
    dec = decoder_stages(config, clips=clips, frames=s.frames, rows=rows, tokens=tokens, act=act)
    return vis + [res] + dec, latents

def _train(config, s: Settings, table, act: int) -> Estimate:
    b, rows, t = s.micro_batch, s.micro_batch * s.texts_per_clip, s.tokens
    stages, latents = _stages(config, s, act, clips=b, rows=rows, tokens=t)
    stages.append(loss_stage(config, rows=rows, tokens=t, act=act))
    n = s.shard
    adapters = lora_table(config, s) if s.lora else ()
    numel, trainable = _counts(s, table, adapters)
    _apply(stages, numel, s.checkpointing, trainable)
    if s.lora:
        _frozen_base(config, s, stages, adapters, act)
    total, train_total = sum(numel.values()), sum(trainable.values())
    train_tensors = 2 * len(adapters) if s.lora else sum(1 for name, part, _ in table if part not in s.freeze)
    pd = 2 if s.precision == "bf16" else F32          # the compute copies FSDP gathers
    root = sum(st.params for st in stages if st.kind == "root")
    largest = max((st.params for st in stages if st.kind != "root"), default=0)
    weights, nf4 = base_weight_bytes(config, s)
    adapter_total = sum(k for _, _, k in adapters)
    param_bytes = weights + F32 * adapter_total if s.lora else F32 * total
    base = {"parameters": param_bytes // n, "optimizer_state": (2 * F32 * train_total + F32 * train_tensors) // n,
            "inputs": b * s.frames * config.vision.num_channels * config.vision.image_size ** 2 * F32
            + 2 * rows * t * I64}
    gathered = pd * (root + 2 * largest) if s.fsdp else 0
    # accumulating (train/loop.py), the earlier micro-batches' gradients wait in fp32, sharded under FSDP
    # (reduce-scattered at once; across nodes the all-reduce waits for the last), each stage's until
    # the last backward reaches it, the root's until the end
    held = F32 * train_total // n if s.accumulation > 1 else 0
    moments, grads = _replay(stages, s, trainable, n=n, pd=pd, largest=largest, held=held)
    moments.append(("optimizer step", {"gradients": grads, "gathered_parameters": -gathered}))
    at_peak, phase = _peak(moments, {**base, "gathered_parameters": gathered})
    ac_all = [replace(st, checkpointed=st.kind != "root") for st in stages]
    no_ac = [replace(st, checkpointed=False) for st in stages]
    totals = {**base, "gradients": grads, "gathered_parameters": gathered,
              "activations": sum(st.saved - st.visual for st in stages),
              "activations_without_checkpointing": sum(st.saved - st.visual for st in no_ac),
              "activations_with_checkpointing": sum(st.saved - st.visual for st in ac_all),
              "activations_by_kind": _by_kind(stages),
              "visual_latents_and_cross_kv": sum(st.visual for st in stages),
              "visual_latents": latents * _any_cross(config),
              "cross_attn_kv": _cross_kv(config, b, s.frames, act), "kv_cache": 0,
              "largest_transient": max(m["transient"] for _, m in moments if "transient" in m),
              "trainable_params": train_total, "frozen_params": total - train_total,
              "base_weight_bytes": weights if s.lora else 0, "nf4_weight_bytes": nf4,
              "adapter_bytes": F32 * adapter_total, "adapted_layers": len(adapters), "encoding_peak": 0,
              "generation_peak": 0,
              **_video_totals(config, s, 0, _cross_kv(config, b, s.frames, act))}
    return Estimate(sum(at_peak.values()), phase, at_peak, totals)


def _counts(s: Settings, table, adapters) -> tuple[dict[str, int], dict[str, int]]:
    """Parameters per stage, all and trainable (LoRA: the adapters only)."""
    numel, trainable = {}, {}
    for name, part, k in table:
        st = stage_of(name)
        numel[st] = numel.get(st, 0) + k
        if part not in s.freeze and not s.lora:
            trainable[st] = trainable.get(st, 0) + k
    for _, st, k in adapters:
        numel[st] = numel.get(st, 0) + k
        trainable[st] = trainable.get(st, 0) + k
    return numel, trainable


def _replay(stages: list[Stage], s: Settings, trainable: dict, *, n: int, pd: int, largest: int,
            held: int) -> tuple[list[tuple[str, dict]], int]:
    """The moments of a step's forward and backward, what is alive at each, and the gradients
    held at the end (n: devices the state is sharded over; pd: bytes of a gathered parameter;
    largest: the largest block's parameters; held: the earlier micro-batches' gradient bytes)."""
    moments: list[tuple[str, dict]] = []
    live = visual = 0

    def alive(**more) -> dict:
        return {"activations": live - visual, "visual_latents_and_cross_kv": visual, **more}

    for st in stages:
        live, visual = live + st.saved, visual + st.visual
        # a stage no gradient flows through (a frozen prefix) runs as without autograd: its input is held too
        fwd = st.input + st.no_grad if not st.grad else st.no_grad if st.checkpointed else st.fwd_transient
        # the loss runs after the model's forward, whose root has freed every block's gathered copy
        blocks_gone = -2 * pd * largest if s.fsdp and st.name == "loss" else 0
        moments.append((f"forward, {st.name}", alive(transient=fwd, gradients=held, gathered_parameters=blocks_gone)))
    grads = root_grads = root_sharded = 0
    for st in reversed(stages):
        if not st.grad:
            continue
        k = trainable.get(st.name, 0)
        g, extra = F32 * k // n, 0
        if s.fsdp and st.kind == "root":     # unsharded until the root's reduce-scatter, after all blocks
            root_grads, root_sharded, g = root_grads + pd * k, root_sharded + g, 0
        elif s.fsdp:                         # the block's unsharded gradient and its fp32 reduce-scatter input
            extra = (pd + F32) * k
        # the loss's backward: the root's pre-backward has prefetched the last block only
        prefetched = -pd * largest if s.fsdp and st.name == "loss" else 0
        moments.append((f"backward, {st.name}", alive(gradients=grads + g + root_grads + held,
                                                       gathered_parameters=prefetched,
                                                       transient=st.recompute + st.bwd_transient + extra)))
        live, visual = live - st.saved, visual - st.visual
        grads += g
        held -= F32 * k // n if held and st.kind != "root" else 0
    if s.fsdp:
        moments.append(("backward end, the root's reduce-scatter",
                        {"gradients": grads + root_grads + root_sharded + held, "transient": F32 * root_grads // pd}))
        grads += root_sharded
    return moments, grads


def _frozen_base(config, s: Settings, stages: list[Stage], adapters, act: int) -> None:
    """LoRA: what the stages save with every base weight frozen (activations.lora_internal) on the
    decoder side; a vision-side stage (ViT, temporal, resampler) keeps full training's count plus
    its adapters' rank-r intermediates (an upper bound: its frozen LayerNorms and gates save less)."""
    adapted: dict[str, set] = {}
    for name, st, _ in adapters:
        adapted.setdefault(st, set()).add(name.rsplit(".", 1)[-1])
    b, rows, t = s.micro_batch, s.micro_batch * s.texts_per_clip, s.tokens
    v = config.vision
    vis_rows = b * s.frames * (v.num_patches + 1)
    kv_anywhere = any(st.startswith("cross_attn") and adapted[st] & {"k_proj", "v_proj"} for st in adapted)
    flows = media_grad = rotary = False
    for st in stages:
        if st.name == "decoder.embed":
            flows = False
        if st.name == "resampler":
            media_grad = st.grad
        kind = st.name if st.kind == "root" else st.kind
        mine = frozenset(adapted.get(st.name, ()))
        if kind == "loss":
            pass                        # logits, log_softmax: as in full training (lm_head's adapter: decoder.norm)
        elif decoder_side(kind):
            st.internal = lora_internal(config, kind, mine, clips=b, frames=s.frames, rows=rows, tokens=t, act=act,
                                        r=s.lora_r, dropout=s.lora_dropout > 0, input_grad=flows,
                                        media_grad=media_grad)
            if kind == "decoder" and st.grad and not rotary:   # rotary's cos/sin [B, 1, T, hd]: one pair
                st.internal += 2 * t * config.decoder.head_dim * act
                rotary = True
            if st.name == "cross_attn.0":   # the latents, kept by the adapters of k_proj/v_proj (one tensor)
                st.shared = st.shared if kv_anywhere and not s.lora_dropout else 0
            if not flows:
                st.saves_input = False
        elif mine:   # vision side: each adapter's rank-r intermediate (latents' rows for the resampler)
            st.internal += len(mine) * vis_rows * s.lora_r * act
        flows = st.grad


def _apply(stages: list[Stage], numel: dict, checkpointing, trainable: dict) -> None:
    """Parameters, checkpointing, and no saved tensors where no gradient flows (a frozen prefix:
    the vision side, or the token embedding, when frozen)."""
    flows = vision_flows = False
    for st in stages:
        st.params = numel.get(st.name, 0)
        if st.name == "decoder.embed":      # a second chain starts at the token ids
            vision_flows, flows = flows, False
        if st.kind == "cross_attn":         # where the visual latents join it
            flows = flows or vision_flows
        flows = flows or trainable.get(st.name, 0) > 0
        st.grad = flows
        st.checkpointed = st.kind in checkpointing


def _infer(config, s: Settings, table, act: int) -> Estimate:
    b, d = s.micro_batch, config.decoder
    total = sum(k for _, _, k in table)
    length = s.tokens + s.new_tokens
    whole = s.whole_video
    # windows per pass of the encoder, and windows whose latents are held for the decoder
    clips, held_windows = (min(s.windows_per_chunk, s.windows), b * s.windows) if whole else (b, b)
    frames = clips * s.frames * config.vision.num_channels * config.vision.image_size ** 2 * F32
    # a clip's frames are the caller's for the whole run; a whole video's chunk lives while it is encoded
    base = {"parameters": act * total, "inputs": b * length * I64 + (0 if whole else frames)}
    encode = vision_stages(config, clips=clips, frames=s.frames, act=act)
    res, chunk_latents = resampler_stage(config, clips=clips, frames=s.frames, act=act)
    prefill = decoder_stages(config, clips=held_windows, frames=s.frames, rows=b, tokens=s.tokens, act=act)
    cross = _any_cross(config)
    latents = held_windows * _latents_per_window(config, s.frames) * config.vision.hidden_size * act * cross
    kv_cache = d.num_layers * 2 * b * d.kv_heads * d.head_dim * length * act
    visual = latents + _cross_kv(config, held_windows, s.frames, act) * cross
    # a whole video's latents are written chunk by chunk into one buffer [W, L, D_v], there from the start
    encoding = {"visual_latents_and_cross_kv": latents, "inputs": frames} if whole else {}
    moments = [(f"encoding, {st.name}", {**encoding, "transient": st.input + st.no_grad}) for st in encode + [res]]
    moments.append(("encoding, time stamps", {**encoding, "transient": 2 * chunk_latents}))  # unstamped, stamped
    held = {"visual_latents_and_cross_kv": visual, "kv_cache": kv_cache}
    moments += [(f"prefill, {st.name}", {**held, "transient": st.input + st.no_grad}) for st in prefill]
    step = d.num_heads * d.head_dim * length * act * 2 * b if d.kv_heads != d.num_heads else 0
    moments.append(("decode step", {**held, "transient": step + b * d.vocab_size * F32}))
    at_peak, phase = _peak(moments, base)
    encoding_peak = sum(_peak([m for m in moments if m[0].startswith("encoding")], base)[0].values())
    totals = {**base, "gradients": 0, "optimizer_state": 0, "gathered_parameters": 0, "activations": 0,
              "encoding_peak": encoding_peak,
              "generation_peak": sum(_peak([m for m in moments if not m[0].startswith("encoding")], base)[0].values()),
              "activations_without_checkpointing": 0, "activations_with_checkpointing": 0, "activations_by_kind": {},
              "visual_latents_and_cross_kv": visual, "visual_latents": latents,
              "cross_attn_kv": visual - latents, "kv_cache": kv_cache,
              "largest_transient": max(m["transient"] for _, m in moments),   # the same keys as training's
              "trainable_params": 0, "frozen_params": total, "base_weight_bytes": 0, "nf4_weight_bytes": 0,
              "adapter_bytes": 0, "adapted_layers": 0, **_video_totals(config, s, frames if whole else 0, visual - latents)}
    return Estimate(sum(at_peak.values()), phase, at_peak, totals)


def _video_totals(config, s: Settings, frame_chunk: int, cross_kv: int) -> dict[str, int]:
    """The report's whole-video lines (windows, latents and the chunk of frames: 0 for a clip)."""
    windows = s.windows if s.whole_video else 0
    blocks = _cross_blocks(config)
    return {"video_windows": windows, "video_latents": windows * _latents_per_window(config, s.frames),
            "frame_chunk": frame_chunk, "cross_attn_blocks": blocks, "cross_attn_kv_per_block": cross_kv // max(blocks, 1)}


def _peak(moments: list[tuple[str, dict]], base: dict) -> tuple[dict, str]:
    best, phase = None, ""
    for name, parts in moments:
        alive = dict.fromkeys(BREAKDOWN, 0)
        for k, v in [*base.items(), *parts.items()]:
            alive[k] = alive.get(k, 0) + v
        if best is None or sum(alive.values()) > sum(best.values()):
            best, phase = alive, name
    return best, phase


def _any_cross(config) -> int:
    return int(_cross_blocks(config) > 0)


def _cross_blocks(config) -> int:
    d = config.decoder
    return len(range(0, d.num_layers, d.cross_attn_every)) if d.cross_attn_every else 0


def _latents_per_window(config, frames: int) -> int:
    """The resampler's latents, or without one every frame token."""
    return config.resampler.num_latents or frames * (config.vision.num_patches + 1)


def _cross_kv(config, clips: int, frames: int, act: int) -> int:
    """Every cross-attention block's keys and values of ``clips`` windows' latents."""
    return _cross_blocks(config) * 2 * clips * _latents_per_window(config, frames) * config.decoder.hidden_size * act


def _by_kind(stages: list[Stage]) -> dict[str, int]:
    out: dict[str, int] = {}
    for st in stages:
        kind = "loss" if st.name == "loss" else st.kind
        out[kind] = out.get(kind, 0) + st.saved - st.visual
    return out


def max_micro_batch(config: VideoLlamaConfig, s: Settings, limit: int = 1 << 20) -> int:
    """The largest micro-batch (infer: batch) whose peak fits in the usable memory; 0 if none."""
    usable = usable_bytes(s)

    def fits(b: int) -> bool:
        return estimate(config, with_settings(s, micro_batch=b)).peak <= usable

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
