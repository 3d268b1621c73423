"""The parts of a VideoLlama model: which part a parameter belongs to, the blocks of each kind,
and the Hugging Face name prefixes. The one place that knows the model's layout by name.

Parts (each parameter belongs to exactly one):

    vision       the CLIP ViT: patch/class/position embeddings, pre/post layer norms, its blocks
    temporal     what we add for time: temporal attention blocks, temporal embedding, frame difference
    resampler    the Perceiver resampler (or, with num_latents 0, only its time embedding)
    decoder      the Llama blocks and the final norm
    cross_attn   the gated cross-attention blocks, and the time stamps of the latents they read
                 (``decoder.media_time``)
    embeddings   the token embedding and the output head

The vision side is ``vision + temporal + resampler``, the decoder side the other three. Recipes
name parts in ``freeze`` and block kinds in ``parallel.activation_checkpointing``; ``videollama info``
counts parameters by part; FSDP shards each block; convert renames by the prefixes below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

PARTS = ("vision", "temporal", "resampler", "decoder", "cross_attn", "embeddings")
VISION_SIDE = ("vision", "temporal", "resampler")
DECODER_SIDE = ("decoder", "cross_attn", "embeddings")
# Kinds of block: each is sharded by FSDP on its own and may be activation-checkpointed.
BLOCK_TYPES = ("vision", "temporal", "resampler", "decoder", "cross_attn")

# The submodules of `vision.` that are Hugging Face CLIPVisionModel's own (`vision_model.` there).
CLIP_MODULES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# Hugging Face prefix -> ours.
LLAMA_PREFIXES = (("model.", "decoder."), ("lm_head.", "lm_head."))
CLIP_PREFIXES = (("vision_model.", "vision."),) + tuple(
    # transformers >= 5 saves a bare CLIPVisionModel without the `vision_model.` prefix.
    (p, "vision." + p) for p in CLIP_MODULES
)


def part_of(name: str) -> str:
    """The part (one of PARTS) that the parameter or buffer called ``name`` belongs to."""
    if name.startswith("vision."):
        return "vision" if name[len("vision."):].startswith(CLIP_MODULES) else "temporal"
    if name.startswith("resampler."):
        return "resampler"
    if name.startswith(("decoder.cross_attn_layers.", "decoder.media_time.")):
        return "cross_attn"
    if name.startswith(("decoder.embed_tokens.", "lm_head.")):
        return "embeddings"
    if name.startswith("decoder."):
        return "decoder"
    raise ValueError(f"parameter {name!r} belongs to no known part")


# Parameters a model directory written before they existed lacks: such a directory loads with
# them at their initial value, zero, which leaves what the model computes unchanged.
ADDED_ZERO_INIT = ("decoder.media_time.proj.weight",)


def check_names(names: list[str], allowed: tuple[str, ...], what: str, noun: str = "") -> None:
    """Raise a ValueError naming the unknown entries of ``names`` (recipe validation)."""
    bad = sorted(set(names) - set(allowed))
    if bad:
        raise ValueError(f"{what}: unknown {noun + ' ' if noun else ''}{bad}; choose from {list(allowed)}")


def blocks(model, block_type: str) -> Iterator[tuple[object | None, int, object]]:
    """Yield ``(container, index, block)`` for every block of a kind of a VideoLlama.

    ``container[index] is block`` for blocks held in a ModuleList, so a wrapper (activation
    checkpointing) can replace it; the resampler is a single module (container None).
    """
    check_names([block_type], BLOCK_TYPES, "block type")
    if block_type == "resampler":
        if getattr(model, "resampler", None) is not None:
            yield None, 0, model.resampler
        return
    container = {
        "vision": lambda: model.vision.encoder.layers,
        "temporal": lambda: getattr(model.vision, "temporal", None),
        "decoder": lambda: model.decoder.layers,
        "cross_attn": lambda: getattr(model.decoder, "cross_attn_layers", None),
    }[block_type]()
    if container is None:
        return
    for i, block in enumerate(container):
        yield container, i, block


# Containers of numbered blocks, as they appear in parameter names.
_NUMBERED = re.compile(r"^(decoder\.layers|decoder\.cross_attn_layers|vision\.encoder\.layers|vision\.temporal"
                       r"|resampler\.layers)\.(\d+)\.")


def block_counts(config) -> dict[str, int]:
    """How many numbered blocks each container of a model built from ``config`` holds."""
    v, r, d = config.vision, config.resampler, config.decoder
    return {
        "decoder.layers": d.num_layers,
        "decoder.cross_attn_layers": len(range(0, d.num_layers, d.cross_attn_every)) if d.cross_attn_every else 0,
        "vision.encoder.layers": v.num_layers,
        "vision.temporal": v.num_layers // v.temporal_every if v.temporal_every else 0,
        "resampler.layers": r.depth if r.num_latents else 0,
    }


def check_layout(config, names: Iterable[str], where: str) -> None:
    """Raise unless the tensor ``names`` of a checkpoint have the block counts ``config`` says.

    Cheap, and done before the model is built: a config.json claiming 20,000 layers must fail at
    once, not after building them."""
    found = dict.fromkeys(block_counts(config), 0)
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            found[m.group(1)] = max(found[m.group(1)], int(m.group(2)) + 1)
    for container, want in block_counts(config).items():
        if found[container] != want:
            raise ValueError(f"{where}: the weights hold {found[container]} blocks {container}.N but the config "
                             f"says {want}; config.json and the weights do not belong together")
