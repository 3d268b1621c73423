"""Memory per device of a training step or of generation, before launch: ``videollama plan``.

Parameters, gradients and optimizer state are counted exactly on a meta-device model (no memory
is allocated, so ``videollama-13b`` is counted in a second). Activations come from
:mod:`videollama.model.activations`, which lists the tensors autograd saves per block kind from the
model's shapes. A step is then replayed stage by stage (forward, the loss, backward in reverse,
the optimizer step), adding at each moment what is alive, and the peak is the largest of those
moments; the breakdown is the memory at that moment.

Training: AdamW (two fp32 states per trainable parameter, and a step counter per tensor), fp32
gradients. fp32 on one device is the training loop without FSDP; bf16, or more than one device, is
FSDP2 full sharding (train/parallel.py): parameters (fp32: under bf16 mixed precision they are the
master weights), gradients and optimizer state are divided by the number of devices, and the bf16
(or fp32) copies of the root module (embeddings, norms, lm_head: gathered for the whole step) and
of the two largest blocks (the current one and the prefetched next) are added; in backward a
block's unsharded gradient and its fp32 reduce-scatter buffer. Inference is ``generate``: the
weights, the visual latents and every cross-attention block's keys/values, the static KV cache
(batch x layers x 2 x kv_heads x head_dim x (prompt + new tokens)) and the largest transient of
encoding, prefill or a decode step; each device holds a whole replica.

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

from dataclasses import dataclass, field, replace

from videollama.config import VideoLlamaConfig
from videollama.model.activations import (
    F32,
    I64,
    Stage,
    decoder_stages,
    loss_stage,
    resampler_stage,
    vision_stages,
)
from videollama.model.parts import BLOCK_TYPES, check_names
from videollama.model.plan_params import (  # noqa: F401 - nf4_bytes, stage_of: part of this module's API
    base_weight_bytes,
    lora_table,
    nf4_bytes,
    param_table,
    stage_of,
)

GiB = 2**30
MODES = ("train", "lora", "qlora", "infer")
TRAINING = ("train", "lora", "qlora")
LORA_R = 16       # --mode lora without a recipe: configs/lora-videoqa.yaml's rank
PRECISIONS = ("bf16", "fp32")
USABLE = 0.9   # of a device's memory: the rest for the CUDA context and the caching allocator's fragmentation
# What is alive at the peak, in this order; the items sum to the peak.
BREAKDOWN = ("parameters", "gradients", "optimizer_state", "gathered_parameters", "inputs", "activations",
             "visual_latents_and_cross_kv", "kv_cache", "transient")


@dataclass(frozen=True)
class Settings:
    mode: str = "train"
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    frames: int = 16
    tokens: int = 2048          # train: tokens per row; infer: prompt tokens
    new_tokens: int = 32        # infer only
    micro_batch: int = 1        # train: clips per micro-batch; infer: prompts
    precision: str = "bf16"
    checkpointing: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    texts_per_clip: int = 1     # train: text rows per clip
    lora_r: int = 0             # lora/qlora: the adapters' rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()   # recipe.LoraSection.target_modules
    lora_parts: tuple[str, ...] = ()     # recipe.LoraSection.parts

    @property
    def fsdp(self) -> bool:
        return self.mode in ("train", "lora") and (self.gpus > 1 or self.precision == "bf16")

    @property
    def lora(self) -> bool:
        return self.mode in ("lora", "qlora")


@dataclass
class Estimate:
    peak: int
    phase: str                  # the moment of the peak
    at_peak: dict[str, int]     # what is alive then; sums to peak
    totals: dict[str, int]      # each item at its own largest


@dataclass
class Plan:
    model: str
    settings: Settings
    params: int
    estimate: Estimate
    fits: bool
    usable: int
    max_micro_batch: int
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        s = self.settings
        return {"model": self.model, "mode": s.mode, "settings": {**s.__dict__, "checkpointing": list(s.checkpointing),
                                                                 "freeze": list(s.freeze), "fsdp": s.fsdp,
                                                                 "lora_targets": list(s.lora_targets),
                                                                 "lora_parts": list(s.lora_parts)},
                "params": self.params, "trainable_params": self.estimate.totals.get("trainable_params", 0), "peak_bytes": self.estimate.peak, "peak_gib": self.estimate.peak / GiB,
                "peak_phase": self.estimate.phase, "breakdown": self.estimate.at_peak, "totals": self.estimate.totals,
                "gpu_memory_gib": s.gpu_memory_gib, "usable_bytes": self.usable, "fits": self.fits,
                "max_micro_batch": self.max_micro_batch, "suggestions": self.suggestions, "notes": self.notes}


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
    n = s.gpus if s.fsdp else 1
    numel, trainable = {}, {}
    adapters = lora_table(config, s) if s.lora else ()
    for name, part, k in table:
        st = stage_of(name)
        numel[st] = numel.get(st, 0) + k
        if part not in s.freeze and not s.lora:
            trainable[st] = trainable.get(st, 0) + k
    for _, st, k in adapters:
        numel[st] = numel.get(st, 0) + k
        trainable[st] = trainable.get(st, 0) + k
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
    moments: list[tuple[str, dict]] = []
    live = visual = 0

    def alive(**more) -> dict:
        return {"activations": live - visual, "visual_latents_and_cross_kv": visual, **more}

    for st in stages:
        live, visual = live + st.saved, visual + st.visual
        # a stage no gradient flows through (a frozen prefix) runs as without autograd: its input is held too
        fwd = st.input + st.no_grad if not st.grad else st.no_grad if st.checkpointed else st.fwd_transient
        moments.append((f"forward, {st.name}", alive(transient=fwd)))
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
        moments.append((f"backward, {st.name}", alive(gradients=grads + g + root_grads,
                                                       transient=st.recompute + st.bwd_transient + extra)))
        live, visual = live - st.saved, visual - st.visual
        grads += g
    if s.fsdp:
        moments.append(("backward end, the root's reduce-scatter",
                        {"gradients": grads + root_grads + root_sharded, "transient": F32 * root_grads // pd}))
        grads += root_sharded
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
              "adapter_bytes": F32 * adapter_total, "adapted_layers": len(adapters)}
    return Estimate(sum(at_peak.values()), phase, at_peak, totals)


def _frozen_base(config, s: Settings, stages: list[Stage], adapters, act: int) -> None:
    """LoRA: what the stages save with every base weight frozen (activations.lora_internal) on the
    decoder side; a vision-side stage (ViT, temporal, resampler) keeps full training's count plus
    its adapters' rank-r intermediates (an upper bound: its frozen LayerNorms and gates save less)."""
    from videollama.model.activations import decoder_side, lora_internal

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
    base = {"parameters": act * total, "inputs": b * s.frames * config.vision.num_channels
            * config.vision.image_size ** 2 * F32 + b * length * I64}   # video; prompt ids and new tokens
    stages, latents = _stages(config, s, act, clips=b, rows=b, tokens=s.tokens)
    encode = [st for st in stages if not st.name.startswith(("decoder", "cross_attn"))]
    prefill = [st for st in stages if st.name.startswith(("decoder", "cross_attn"))]
    kv_cache = d.num_layers * 2 * b * d.kv_heads * d.head_dim * length * act
    visual = latents + _cross_kv(config, b, s.frames, act) if _any_cross(config) else 0
    moments = [(f"encoding, {st.name}", {"transient": st.input + st.no_grad}) for st in encode]
    held = {"visual_latents_and_cross_kv": visual, "kv_cache": kv_cache}
    moments += [(f"prefill, {st.name}", {**held, "transient": st.input + st.no_grad}) for st in prefill]
    step = d.num_heads * d.head_dim * length * act * 2 * b if d.kv_heads != d.num_heads else 0
    moments.append(("decode step", {**held, "transient": step + b * d.vocab_size * F32}))
    at_peak, phase = _peak(moments, base)
    totals = {**base, "gradients": 0, "optimizer_state": 0, "gathered_parameters": 0, "activations": 0,
              "activations_without_checkpointing": 0, "activations_with_checkpointing": 0, "activations_by_kind": {},
              "visual_latents_and_cross_kv": visual, "visual_latents": latents * _any_cross(config),
              "cross_attn_kv": _cross_kv(config, b, s.frames, act), "kv_cache": kv_cache,
              "largest_transient": max(m["transient"] for _, m in moments),   # the same keys as training's
              "trainable_params": 0, "frozen_params": total, "base_weight_bytes": 0, "nf4_weight_bytes": 0,
              "adapter_bytes": 0, "adapted_layers": 0}
    return Estimate(sum(at_peak.values()), phase, at_peak, totals)


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
    return int(config.decoder.cross_attn_every > 0)


def _cross_kv(config, clips: int, frames: int, act: int) -> int:
    d, r, v = config.decoder, config.resampler, config.vision
    n_cross = len(range(0, d.num_layers, d.cross_attn_every)) if d.cross_attn_every else 0
    lat = r.num_latents or frames * (v.num_patches + 1)
    return n_cross * 2 * clips * lat * d.hidden_size * act


def _by_kind(stages: list[Stage]) -> dict[str, int]:
    out: dict[str, int] = {}
    for st in stages:
        kind = "loss" if st.name == "loss" else st.kind
        out[kind] = out.get(kind, 0) + st.saved - st.visual
    return out


# ---- validation, fit, the largest micro-batch -------------------------------------------------------


def settings_for(config: VideoLlamaConfig, **kw) -> Settings:
    """Settings with the defaults of ``config`` filled in and every value checked (ValueError)."""
    d, v = config.decoder, config.vision
    mode = kw.get("mode") or "train"
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    new = kw.get("new_tokens")
    new = 32 if new is None else new
    frames = _value(kw, "frames", config.preprocess.num_frames)
    default_tokens = d.max_seq_len if mode in TRAINING else max(1, d.max_seq_len - new)
    lora = mode in ("lora", "qlora")
    from videollama.train.recipe import LoraSection

    defaults = LoraSection()
    s = Settings(mode=mode, gpus=_value(kw, "gpus", 1), gpu_memory_gib=_value(kw, "gpu_memory_gib", 80.0),
                 frames=frames, tokens=_value(kw, "tokens", default_tokens), new_tokens=new,
                 micro_batch=_value(kw, "micro_batch", 1), precision=kw.get("precision") or "bf16",
                 checkpointing=tuple(kw.get("checkpointing") or ()), freeze=tuple(kw.get("freeze") or ()),
                 texts_per_clip=_value(kw, "texts_per_clip", 1),
                 lora_r=_value(kw, "lora_r", LORA_R) if lora else 0,
                 lora_dropout=float(_value(kw, "lora_dropout", defaults.dropout)) if lora else 0.0,
                 lora_targets=tuple(_value(kw, "lora_targets", defaults.target_modules)) if lora else (),
                 lora_parts=tuple(_value(kw, "lora_parts", defaults.parts)) if lora else ())
    for name, value in (("--gpus", s.gpus), ("--micro-batch", s.micro_batch), ("--frames", s.frames),
                        ("--seq", s.tokens), ("--new-tokens", s.new_tokens), ("texts_per_clip", s.texts_per_clip)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not s.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory must be > 0 GiB, got {s.gpu_memory_gib!r}")
    if s.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {s.precision!r}")
    check_names(list(s.checkpointing), BLOCK_TYPES, "--activation-checkpointing", "block kinds")
    if s.frames > v.max_frames:
        raise ValueError(f"--frames {s.frames}: the model takes 1 to {v.max_frames} frames (vision.max_frames)")
    if lora:
        if isinstance(s.lora_r, bool) or not isinstance(s.lora_r, int) or s.lora_r < 1:
            raise ValueError(f"--lora-r must be an integer >= 1, got {s.lora_r!r}")
        if not 0.0 <= s.lora_dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {s.lora_dropout!r}")
        if s.freeze:
            raise ValueError("freeze does not apply to --mode lora/qlora: every base weight is frozen")
        lora_table(config, s)   # train.lora.target_modules' own errors: no match, a tied embedding/lm_head
    if mode == "qlora" and s.gpus != 1:
        raise ValueError(f"--mode qlora runs on one GPU in one process without FSDP (train/loop.py), not --gpus {s.gpus}")
    if mode in TRAINING and s.tokens < 2:
        raise ValueError("--seq must be >= 2 for training (the loss predicts token t+1 from token t)")
    if s.tokens + (s.new_tokens if mode == "infer" else 0) > d.max_seq_len:
        extra = f" + {s.new_tokens} new tokens" if mode == "infer" else ""
        raise ValueError(f"--seq {s.tokens}{extra} is longer than the model's max_seq_len {d.max_seq_len}")
    return s


def _value(kw: dict, key: str, default):
    return default if kw.get(key) is None else kw[key]


def usable_bytes(s: Settings) -> int:
    return int(s.gpu_memory_gib * GiB * USABLE)


def max_micro_batch(config: VideoLlamaConfig, s: Settings, limit: int = 1 << 20) -> int:
    """The largest micro-batch (infer: batch) whose peak fits in the usable memory; 0 if none."""
    usable = usable_bytes(s)

    def fits(b: int) -> bool:
        return estimate(config, _with(s, micro_batch=b)).peak <= usable

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


def _with(s: Settings, **changes) -> Settings:
    return Settings(**{**s.__dict__, **changes})


def plan(config: VideoLlamaConfig, s: Settings, *, model_name: str | None = None) -> Plan:
    """Estimate, fit, the largest micro-batch, and what to change when it does not fit."""
    from videollama.model.plan_report import notes_for, suggestions_for

    est = estimate(config, s)
    usable = usable_bytes(s)
    fits = est.peak <= usable
    p = Plan(model=model_name or config.name, settings=s, params=sum(k for _, _, k in param_table(config)),
             estimate=est, fits=fits, usable=usable, max_micro_batch=max_micro_batch(config, s))
    p.notes = notes_for(config, s)
    if not fits:
        p.suggestions = suggestions_for(config, s, est)
    return p


def add_arguments(parser) -> None:
    from videollama.model.plan_report import add_arguments as add

    add(parser)


def run(args) -> int:
    from videollama.model.plan_report import run as run_plan

    return run_plan(args)


__all__ = ["GiB", "Estimate", "Plan", "Settings", "estimate", "max_micro_batch", "param_table", "plan",
           "settings_for", "stage_of"]
