"""Activation memory of a VideoLlama step, counted from the tensors the model's code creates.

The model files are walked op by op, as written (vision.py, resampler.py, decoder.py, layers.py,
videollama.py's lm_loss), and every tensor that autograd saves for backward is listed with its
shape. Nothing here imports torch. ``tests/test_plan.py`` checks the totals per block kind against
what autograd really saves (``torch.autograd.graph.saved_tensors_hooks``) on the tiny model, and
``bench/bench_plan.py`` the resulting peaks against the allocator's.

A step is a list of :class:`Stage` in forward order: root stages (vision embeddings, the final
vision norm, token embeddings, the decoder's final norm, the loss) and one stage per block
(``model.parts.BLOCK_TYPES``). The hidden state between two stages is counted by its consumer:
either the consumer's own ops save it (``saves_input``: a LayerNorm, or an fp32 RMSNorm, whose
first op saves x itself), or the consumer is checkpointed and the checkpoint keeps it for the
recomputation; otherwise it dies once consumed (a temporal block saves only ``h + time``).

Conventions, measured on torch 2.13 (CPU flash attention; CUDA's flash kernel saves the same):
SDPA saves q, k, v, its output and an fp32 log-sum-exp [batch, heads, queries]; a Linear saves its
input; LayerNorm its input and fp32 mean and rstd [rows]; an fp32 RMSNorm its input (``x.to(fp32)``
is x), the rsqrt [rows], ``x * rsqrt`` and, through the Linear after it, its output; a bf16 RMSNorm
an fp32 copy of x instead of x, and bf16 ``x * rsqrt``. quick_gelu saves x and sigmoid(1.702 x);
SwiGLU saves gate, up, silu(gate) and their product. Sizes are in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

F32, I64 = 4, 8


@dataclass
class Stage:
    name: str             # "vision.3", "temporal.1", "resampler", "cross_attn.0", "decoder.5", "loss", ...
    kind: str             # a block type (model.parts.BLOCK_TYPES) or "root"
    input: int            # the tensor it receives (the previous stage's output)
    saves_input: bool     # its own ops save that tensor
    internal: int         # what its ops save besides the input (without checkpointing)
    fwd_transient: int    # most bytes alive in its forward beyond what it saves (with autograd recording)
    no_grad: int          # most bytes alive in its forward without autograd (inference, or a checkpointed
                          # block's first forward), the input excluded
    bwd_transient: int    # most bytes its backward holds beyond its saved tensors (gradients of activations;
                          # saved tensors are released as their nodes run, which this nets out)
    params: int = 0       # parameters (elements): their gradients, FSDP's gathering
    checkpointed: bool = False
    shared: int = 0       # a tensor it keeps that other stages also read (the visual latents, kept by
                          # the first cross-attention block, checkpointed or not)
    grad: bool = True     # a gradient flows through it (False in a frozen prefix: autograd saves nothing)
    kv: int = 0           # the part of `internal` that is cross-attention keys/values of the latents

    @property
    def visual(self) -> int:
        """The part of :attr:`saved` that is visual latents and cross-attention keys/values."""
        if not self.grad:
            return 0
        return self.shared + (0 if self.checkpointed else self.kv)

    @property
    def saved(self) -> int:
        """Bytes this stage keeps from its forward until its backward."""
        if not self.grad:
            return 0
        if self.checkpointed:
            return self.input + self.shared   # the checkpoint keeps its inputs; backward recomputes the rest
        return self.internal + self.shared + (self.input if self.saves_input else 0)

    @property
    def recompute(self) -> int:
        """Bytes re-created in backward (checkpointed blocks only)."""
        return self.internal if self.checkpointed and self.grad else 0


def _rms_norm(rows: int, dim: int, act: int) -> tuple[int, int]:
    """(saved besides the input, peak without autograd) of layers.RMSNorm, counting its output
    (which the Linear after it saves). fp32: x itself is saved; bf16: an fp32 copy of it."""
    saved = rows * F32 + 2 * rows * dim * act + (rows * dim * F32 if act != F32 else 0)
    no_grad = 2 * rows * dim * max(act, F32) + rows * dim * act  # x**2 (or the fp32 copy) and x*rsqrt, output
    return saved, no_grad


def vision_stages(cfg, *, clips: int, frames: int, act: int) -> list[Stage]:
    """Patch embedding, the ViT and temporal blocks in their order, and the final LayerNorm."""
    v = cfg.vision
    n, s, d, i = v.num_patches, v.num_patches + 1, v.hidden_size, v.intermediate_size
    rows = clips * frames * s                 # ViT blocks: [(B F), 1+N, D]; temporal: [(B (1+N)), F, D]
    hd = rows * d * act                       # one hidden-sized tensor
    patches = clips * frames * n * d * act
    pixels = clips * frames * v.num_channels * v.image_size ** 2
    stages = [Stage(
        "vision.embed", "root", input=0, saves_input=False,
        # conv input (a bf16 cast of the video; in fp32 the video itself, counted as an input),
        # frame difference: the padded difference and proj's output (for the gate), the tanh gate;
        # pre_layrnorm: its input (cat + position embedding) and mean/rstd.
        internal=(pixels * act if act != F32 else 0) + (2 * patches + F32 if v.frame_diff else 0)
        + hd + 2 * rows * F32,
        fwd_transient=2 * patches + 2 * hd, no_grad=3 * patches + 2 * hd + (pixels * act if act != F32 else 0),
        bwd_transient=2 * hd + 2 * patches)]
    mlp_saved = 3 if v.hidden_act == "quick_gelu" else 2   # a, sigmoid(1.702 a), a * sigmoid; gelu: a, gelu(a)
    vit = Stage(
        "vision", "vision", input=hd, saves_input=True,
        # ln1 out, q, k, v, attention out, x + attn, ln2 out; fc1 out and the activation's; lse; 2 x mean/rstd
        internal=7 * hd + mlp_saved * rows * i * act + (4 + v.num_heads) * rows * F32,
        fwd_transient=max(rows * i * act, 2 * hd),
        no_grad=max(6 * hd, 2 * hd + 3 * rows * i * act),
        # the MLP's backward: the incoming gradient and two [rows, I] gradients, less the product already
        # released; then attention's: five hidden-sized gradients with the MLP's tensors released
        bwd_transient=max(hd + (mlp_saved - 1) * rows * i * act, 3 * hd - mlp_saved * rows * i * act))
    temporal = Stage(
        "temporal", "temporal", input=hd, saves_input=False,
        # h + time embedding, its LayerNorm's output, q, k, v, attention out, out_proj's (for the gate), lse
        internal=7 * hd + (2 + v.num_heads) * rows * F32,
        fwd_transient=3 * hd, no_grad=7 * hd, bwd_transient=4 * hd)   # x's, out's, q/k/v's gradients - out_proj's
    every = v.temporal_every
    j = 0
    for k in range(v.num_layers):
        stages.append(_named(vit, f"vision.{k}"))
        if every and (k + 1) % every == 0:
            stages.append(_named(temporal, f"temporal.{j}"))
            j += 1
    stages.append(Stage("vision.post_layernorm", "root", input=hd, saves_input=True, internal=2 * rows * F32,
                        fwd_transient=hd, no_grad=hd, bwd_transient=2 * hd))
    for st in stages[1:]:   # VisionEncoder.forward's local `patches` lives until it returns
        st.fwd_transient += patches
        st.no_grad += patches
    return stages


def resampler_stage(cfg, *, clips: int, frames: int, act: int) -> tuple[Stage, int]:
    """The Perceiver resampler as one stage, and the bytes of the latents it returns."""
    v, r = cfg.vision, cfg.resampler
    d = v.hidden_size
    m = frames * (v.num_patches + 1)          # media tokens per clip
    media = clips * m * d * act               # x + time embedding, [B, F*(1+N), D]
    if not r.num_latents:                     # no resampling: the media tokens are the latents
        return Stage("resampler", "resampler", input=media, saves_input=False, internal=0, fwd_transient=media,
                     no_grad=media, bwd_transient=media), media
    lat, inner, ff = clips * r.num_latents, r.num_heads * r.head_dim, r.ff_mult * d
    kv_rows = clips * (m + r.num_latents)
    per_layer = (2 * (clips * m + lat) * F32         # norm_media, norm_latents: mean/rstd
                 + lat * d * act                     # norm_latents' output (to_q's input)
                 + kv_rows * d * act                 # cat(media, latents) (to_kv's input)
                 + 2 * kv_rows * inner * act         # k, v: one to_kv output, chunked
                 + 2 * lat * inner * act             # q, attention out
                 + r.num_heads * lat * F32           # lse
                 + lat * d * act + 2 * lat * F32     # latents + attn (ff norm's input), its mean/rstd
                 + lat * d * act                     # ff norm output (fc1's input)
                 + 2 * lat * ff * act                # fc1 out, gelu out
                 + lat * d * act)                    # the layer's output (next layer's, or the final norm's, input)
    internal = media + r.depth * per_layer + 2 * lat * F32
    no_grad = media + clips * m * d * act + kv_rows * d * act + 2 * kv_rows * inner * act
    stage = Stage("resampler", "resampler", input=media, saves_input=False, internal=internal,
                  fwd_transient=media, no_grad=no_grad, bwd_transient=2 * media + 2 * kv_rows * inner * act)
    return stage, lat * d * act


def decoder_stages(cfg, *, clips: int, frames: int, rows: int, tokens: int, act: int) -> list[Stage]:
    """Token embedding, the cross-attention and Llama blocks in their order, and the final norm.

    ``rows``: text rows (about ``clips`` videos of ``frames`` frames); ``tokens``: tokens per row."""
    v, r, c = cfg.vision, cfg.resampler, cfg.decoder
    t = rows * tokens
    h, kvd = c.hidden_size, c.kv_heads * c.head_dim
    hd = t * h * act
    norm_saved, norm_peak = _rms_norm(t, h, act)
    x_saved = hd if act == F32 else 0     # a residual sum, saved as the next fp32 RMSNorm's input
    lat = clips * (r.num_latents or frames * (v.num_patches + 1))
    stages = [Stage("decoder.embed", "root", input=0, saves_input=False,
                    internal=t * I64 + 2 * t * c.head_dim * act,   # token ids; rotary cos/sin [B, 1, T, hd]
                    fwd_transient=hd, no_grad=hd, bwd_transient=hd)]
    ffx = c.cross_attn_ff_mult * h
    xheads = c.cross_attn_heads or c.num_heads
    cross = Stage(
        "cross_attn", "cross_attn", input=hd, saves_input=act == F32,
        # attn_norm; q; k, v of the latents [B, H, L, hd]; lse; attention out; o_proj out (for the gate);
        # x + attn; ff_norm; SwiGLU's four; down_proj out (for the gate)
        internal=2 * norm_saved + 3 * hd + 2 * lat * h * act + xheads * t * F32 + x_saved
        + 4 * t * ffx * act + hd,
        fwd_transient=2 * hd, no_grad=max(norm_peak + 4 * hd, 2 * hd + 3 * t * ffx * act),
        bwd_transient=max(hd + 2 * t * ffx * act, 3 * hd + 2 * lat * h * act - 4 * t * ffx * act),
        kv=2 * lat * h * act)
    gqa = c.kv_heads != c.num_heads
    kv = 2 * (hd if gqa else t * kvd * act)   # k, v as SDPA gets them (repeated to every head under GQA)
    llama = Stage(
        "decoder", "decoder", input=hd, saves_input=act == F32,
        # input_layernorm; q after rotary, k, v; lse; attention out; x + attn; post_attention_layernorm; SwiGLU's four
        internal=2 * norm_saved + hd + kv + c.num_heads * t * F32 + hd + x_saved + 4 * t * c.intermediate_size * act,
        fwd_transient=2 * hd + 2 * t * kvd * act,
        no_grad=max(norm_peak, 4 * hd + 2 * t * kvd * act + kv, 2 * hd + 3 * t * c.intermediate_size * act),
        bwd_transient=max(hd + 2 * t * c.intermediate_size * act, 4 * hd + kv - 4 * t * c.intermediate_size * act))
    every = c.cross_attn_every
    for k in range(c.num_layers):
        if every and k % every == 0:
            stages.append(_named(cross, f"cross_attn.{k // every}"))
            if k == 0:   # the visual latents: every cross-attention block's k_proj/v_proj saves them
                stages[-1].shared = lat * v.hidden_size * act
                # and the time stamp's sines and cosines [B, groups, 2P] (media_time.proj's input), a frame's
                # group without a resampler, a window's with one
                groups = clips * (1 if r.num_latents else frames)
                stages[-1].internal += groups * 2 * len(c.media_time_periods) * act
        stages.append(_named(llama, f"decoder.{k}"))
    stages.append(Stage("decoder.norm", "root", input=hd, saves_input=act == F32, internal=norm_saved,
                        fwd_transient=0, no_grad=norm_peak, bwd_transient=2 * hd))
    return stages


def loss_stage(cfg, *, rows: int, tokens: int, act: int) -> Stage:
    """lm_head and lm_loss: logits [B, T, V], (in bf16 their fp32 copy), the shifted copy
    ``logits[:, :-1].reshape(-1, V)`` and log_softmax's output, which cross-entropy saves."""
    vocab = cfg.decoder.vocab_size
    full, shifted = rows * tokens * vocab, rows * (tokens - 1) * vocab
    logits = full * act + (full * F32 if act != F32 else 0)
    # backward: nll's gradient and log_softmax's; then the slice's [B, T, V] gradient; then its bf16 cast
    bwd = max(2 * shifted * F32, shifted * F32 + full * F32, full * F32 + (full * act if act != F32 else 0))
    return Stage("loss", "root", input=rows * tokens * cfg.decoder.hidden_size * act, saves_input=False,
                 internal=shifted * F32 + rows * (tokens - 1) * I64, fwd_transient=logits + shifted * F32,
                 no_grad=rows * vocab * act, bwd_transient=bwd)


def _named(stage: Stage, name: str) -> Stage:
    return replace(stage, name=name)


# ---- LoRA: the base weights frozen ----------------------------------------------------------------
#
# With every base weight frozen (train/lora.py), an op saves only what the gradient of its other,
# non-parameter inputs needs: a frozen Linear saves nothing (its input was kept for the weight's
# gradient), ``norm.weight * h`` saves nothing (h was kept for the weight's), ``tanh(gate) * out``
# keeps only tanh(gate) (4 B); the embedding saves no token ids. An adapted Linear (peft:
# ``base(x) + B(A(dropout(x))) * scale``) saves its input x for A's gradient (with dropout > 0 each
# adapter its own dropout output and mask instead) and the rank-r intermediate A x for B's. Measured
# against ``saved_tensor_bytes`` in tests/test_plan.py. A stage whose input needs no gradient (the
# first adapted block after a frozen embedding) saves neither that input nor its first norm's rsqrt.

DROPOUT_MASK = 1   # bytes per element of a dropout mask: CUDA's fused dropout keeps a bool mask
                   # (on the CPU torch multiplies by a float noise tensor instead: ``act`` bytes)


def decoder_side(kind: str) -> bool:
    """Whether :func:`lora_internal` counts a stage of this kind (a block kind, or a root stage's name)."""
    return kind in ("decoder", "cross_attn", "decoder.embed", "decoder.norm", "loss")


def lora_internal(cfg, kind: str, adapted: frozenset, *, clips: int, frames: int, rows: int, tokens: int,
                  act: int, r: int, dropout: bool, input_grad: bool, media_grad: bool = False,
                  mask: int | None = None) -> int:
    """What a decoder-side stage saves besides its input (and the latents, one tensor kept by the
    adapters of k_proj/v_proj: see estimate.py) with frozen base weights and LoRA adapters on the linear
    layers ``adapted`` (leaf names: q_proj, gate_proj...; ``embed_tokens``/``lm_head`` for the root
    stages). ``kind``: decoder, cross_attn, decoder.embed, decoder.norm or loss (its adapter only).
    ``input_grad``: whether the stage's input needs a gradient; ``media_grad``: the latents'.
    The forward is walked op by op, tracking which tensors need a gradient (an op saves only what
    the gradients of its inputs that need one use)."""
    v, rs, c = cfg.vision, cfg.resampler, cfg.decoder
    mask = DROPOUT_MASK if mask is None else mask
    t = rows * tokens
    h = c.hidden_size
    hd = t * h * act
    saved = 0

    def adapters(names, elems: int, n_rows: int, grad: bool, kept: bool = False) -> bool:
        """The adapters on ``names`` sharing one input (``elems`` values, ``kept``: saved anyway);
        returns whether their output needs a gradient."""
        nonlocal saved
        k = len(adapted & set(names))
        if not k:
            return grad
        if dropout:    # each its own dropout: the output (A's input) and, where x needs a gradient, the mask
            saved += k * elems * (act + (mask if grad else 0))
        elif not kept:
            saved += elems * act
        saved += k * n_rows * r * act
        return True

    def norm(grad: bool) -> None:     # RMSNorm's own saves besides an fp32 input: rsqrt; in bf16 the fp32 copy
        nonlocal saved
        if grad:
            saved += t * F32 + (t * h * F32 if act != F32 else 0)

    if kind == "decoder.embed":
        return t * I64 + t * r * act if "embed_tokens" in adapted else 0
    if kind == "decoder.norm":
        norm(input_grad)
        adapters(["lm_head"], t * h, t, input_grad)
        return saved
    if kind == "loss":
        return 0
    x_saved = hd if act == F32 else 0        # the residual sum, saved as the second norm's fp32 input
    if kind == "decoder":
        ff, heads, kv = c.intermediate_size, c.num_heads, 2 * (hd if c.kv_heads != c.num_heads
                                                                 else t * c.kv_heads * c.head_dim * act)
        norm(input_grad)
        q = adapters(["q_proj"], t * h, t, input_grad, kept=bool(adapted & {"k_proj", "v_proj"}) and not dropout)
        k = adapters(["k_proj"], t * h, t, input_grad, kept="v_proj" in adapted and not dropout)
        v_ = adapters(["v_proj"], t * h, t, input_grad)
        attn = q or k or v_
    elif kind == "cross_attn":
        ff, heads, kv = c.cross_attn_ff_mult * h, c.cross_attn_heads or c.num_heads, 0
        lat = clips * (rs.num_latents or frames * (v.num_patches + 1))
        norm(input_grad)
        q = adapters(["q_proj"], t * h, t, input_grad)
        # k_proj/v_proj read the latents: without dropout their adapters keep the latents themselves
        # (counted once, by estimate.py, as the first block's shared tensor): only the rank-r intermediates here;
        # with dropout each adapter keeps its own dropout of them
        k = adapters(["k_proj"], lat * v.hidden_size, lat, media_grad, kept=True)
        v_ = adapters(["v_proj"], lat * v.hidden_size, lat, media_grad, kept=True)
        kv = 2 * lat * h * act
        attn = q or k or v_
    else:
        raise ValueError(f"no frozen-base count for stage kind {kind!r}")
    if attn:                                  # SDPA: q, k, v, the output, the fp32 log-sum-exp
        saved += 2 * hd + kv + heads * t * F32
    o = adapters(["o_proj"], t * h, t, attn, kept=attn)
    mid = input_grad or o                     # x + attention
    if mid:
        saved += x_saved
    norm(mid)
    gate = adapters(["gate_proj"], t * h, t, mid, kept="up_proj" in adapted and not dropout)
    up = adapters(["up_proj"], t * h, t, mid)
    saved += (gate + up + gate) * t * ff * act   # silu saves gate; the product: up (if gate needs a gradient), silu(gate)
    adapters(["down_proj"], t * ff, t, gate or up)
    return saved
