"""Import Hugging Face weights into a VideoLlama model directory.

The decoder uses Hugging Face Llama parameter names and the ViT uses Hugging Face CLIP
names, so importing is a rename table (the one place that knows both name spaces):

    LlamaForCausalLM   model.*           -> decoder.*        lm_head.weight -> lm_head.weight
    CLIPVisionModel    vision_model.*    -> vision.*         (transformers 5: no prefix -> vision.*)
    CLIPModel          vision_model.*    -> vision.*         (text tower and projections dropped)

Everything the checkpoints do not have (temporal aggregation, resampler, gated cross-attention)
keeps its fresh initialisation; the gates start at zero, so the converted model computes exactly
what the imported image ViT and text-only Llama compute.

Usage: videollama convert [--llama HF_DIR] [--vision HF_CLIP_DIR] [--preset NAME] [--tokenizer T]
                          [--vocab-size N] --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from videollama.config import VideoLlamaConfig
from videollama.hf_config import clip_overrides, llama_overrides, read_hf_config
from videollama.model.parts import CLIP_PREFIXES, LLAMA_PREFIXES, part_of

# (checkpoint prefix, our prefix); keys matching no prefix are dropped (listed in DROPPED_*).
LLAMA_RENAMES = list(LLAMA_PREFIXES)
CLIP_RENAMES = list(CLIP_PREFIXES)
# Keys a CLIP checkpoint may carry that the video encoder does not use.
CLIP_DROPPED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
# Non-persistent buffers some transformers versions still save.
IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")

_VOCAB_TENSORS = ("decoder.embed_tokens.weight", "lm_head.weight")


def rename(key: str, table: list[tuple[str, str]]) -> str | None:
    """Our name for a checkpoint key, or None when the key has no counterpart."""
    if key.endswith(IGNORED_SUFFIXES):
        return None
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


# ---- reading Hugging Face checkpoint directories -------------------------------------------


def read_safetensors_dir(hf_dir: Path) -> dict[str, Any]:
    """All tensors of a (possibly sharded) safetensors checkpoint. Pickled checkpoints are refused."""
    from safetensors.torch import load_file

    from videollama.model.model_dir import weight_files

    if not (hf_dir / "model.safetensors.index.json").is_file() and not (hf_dir / "model.safetensors").exists():
        if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
            raise ValueError(f"{hf_dir}: only pickled weights (*.bin/*.pt) found; VideoLlama reads safetensors "
                             "only (never unpickles). Re-save the model with save_pretrained(safe_serialization=True).")
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, Any] = {}
    for path in weight_files(hf_dir):  # the one index reader: files inside the folder, headers checked
        try:
            tensors.update(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return tensors


# ---- the conversion ---------------------------------------------------------------------------


def target_vocab(*, vocab_size: int | None, tokenizer_size: int | None, checkpoint_vocab: int | None,
                 preset_vocab: int) -> int:
    """The converted model's vocabulary: ``vocab_size`` if given (never below the tokenizer's size),
    else the tokenizer's size, else the Llama checkpoint's (its embeddings kept), else the preset's."""
    if vocab_size is not None and tokenizer_size is not None and vocab_size < tokenizer_size:
        raise ValueError(f"convert: --vocab-size {vocab_size} is smaller than the tokenizer's {tokenizer_size} "
                         "tokens: the ids above it would have no embedding")
    for size in (vocab_size, tokenizer_size, checkpoint_vocab):
        if size is not None:
            return size
    return preset_vocab


def convert(*, llama: str | Path | None = None, vision: str | Path | None = None, preset: str = "videollama-13b",
            vocab_size: int | None = None, tokenizer=None, overrides: dict[str, Any] | None = None, seed: int = 0,
            log=print):
    """Build a VideoLlama with imported weights. Returns the model (fp32, CPU).

    The vocabulary (:func:`target_vocab`): ``vocab_size`` if given, else the size of ``tokenizer``
    (a ``tokenizers.Tokenizer`` with VideoLlama's special tokens; it only sizes the model and sets
    its special ids here, ``save_pretrained(tokenizer=...)`` writes it), else the Llama checkpoint's,
    else the preset's. When it differs from the Llama checkpoint's, the embeddings and the output
    head keep their fresh initialisation.
    """
    import torch

    from videollama.model.videollama import VideoLlama

    preset_decoder = VideoLlamaConfig.from_name(preset).decoder
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer is not None else None
    # A --vocab-size below the tokenizer's fails here, before any checkpoint is read.
    target_vocab(vocab_size=vocab_size, tokenizer_size=tokenizer_size, checkpoint_vocab=None, preset_vocab=0)
    cfg_over: dict[str, Any] = {}
    imported: dict[str, torch.Tensor] = {}
    if llama is not None:
        cfg_over.update(_import_llama(Path(llama), imported, vocab_size=vocab_size, tokenizer_size=tokenizer_size,
                                      preset_decoder=preset_decoder, has_tokenizer=tokenizer is not None, log=log))
    else:
        cfg_over["decoder.vocab_size"] = target_vocab(vocab_size=vocab_size, tokenizer_size=tokenizer_size,
                                                      checkpoint_vocab=None, preset_vocab=preset_decoder.vocab_size)
    if tokenizer is not None:
        # The tokenizer's own special ids (ours: checked by load_tokenizer), not the checkpoint's.
        from videollama.data.tokenizer import BOS, EOS, PAD

        for name, token in (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", PAD)):
            if tokenizer.token_to_id(token) is not None:
                cfg_over[f"decoder.{name}"] = tokenizer.token_to_id(token)
    if vision is not None:
        cfg_over.update(_import_clip(Path(vision), imported))
    cfg_over.update(overrides or {})
    cfg = VideoLlamaConfig.from_name(preset).with_overrides(cfg_over)
    cfg.name = f"{preset}-converted"

    torch.manual_seed(seed)
    model = VideoLlama(cfg)
    load_imported(model, imported, parts=[p for p, src in (("decoder", llama), ("vision", vision)) if src])
    n = sum(v.numel() for v in imported.values())
    log(f"convert: imported {len(imported)} tensors ({n / 1e6:.1f}M parameters); "
        "temporal aggregation, resampler and cross-attention are freshly initialised with gates at 0.")
    return model


def _import_llama(llama: Path, imported: dict, *, vocab_size: int | None, tokenizer_size: int | None,
                  preset_decoder, has_tokenizer: bool, log) -> dict[str, Any]:
    """A Hugging Face Llama directory's tensors, renamed into ``imported``; returns the config
    overrides it implies (shapes, RoPE, vocabulary, special ids, context length)."""
    hf = read_hf_config(llama)
    tensors = read_safetensors_dir(llama)          # first: refuses pickles before anything else
    cfg_over = dict(_checked(llama_overrides, hf, llama, f"--llama {llama / 'config.json'}"))
    for k, v in tensors.items():
        new = rename(k, LLAMA_RENAMES)
        if new is not None:
            imported[new] = v
    if "lm_head.weight" not in imported and not hf.get("tie_word_embeddings", False):
        raise ValueError(f"{llama}: lm_head.weight missing and tie_word_embeddings is false")
    ckpt_vocab = hf.get("vocab_size")
    if isinstance(ckpt_vocab, bool) or not isinstance(ckpt_vocab, int) or ckpt_vocab < 1:
        raise ValueError(f"{llama / 'config.json'}: vocab_size must be a positive integer, got {ckpt_vocab!r}")
    target = target_vocab(vocab_size=vocab_size, tokenizer_size=tokenizer_size, checkpoint_vocab=ckpt_vocab,
                          preset_vocab=preset_decoder.vocab_size)
    if target != ckpt_vocab:
        for k in _VOCAB_TENSORS:
            imported.pop(k, None)
        log(f"convert: target vocabulary {target} != checkpoint vocabulary {ckpt_vocab}: "
            "embeddings and output head are RE-INITIALISED (train them with the new tokenizer).")
    elif has_tokenizer:
        log(f"convert: warning: the model has the checkpoint's vocabulary ({ckpt_vocab}), so its embeddings "
            "are kept: they mean something only with the tokenizer the checkpoint was trained with.")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(hf.get(name), int) and target == ckpt_vocab:
            cfg_over[f"decoder.{name}"] = hf[name]
    cfg_over["decoder.vocab_size"] = target
    cfg_over["decoder.max_seq_len"] = min(hf.get("max_position_embeddings", 2048), preset_decoder.max_seq_len)
    return cfg_over


def _import_clip(vision: Path, imported: dict) -> dict[str, Any]:
    """A Hugging Face CLIP (vision) directory's tensors, renamed into ``imported``; returns the
    config overrides it implies."""
    hf_v = read_hf_config(vision)
    tensors = read_safetensors_dir(vision)
    cfg_over = dict(_checked(clip_overrides, hf_v, vision, vision))
    for k, v in tensors.items():
        if k.startswith(CLIP_DROPPED_PREFIXES):
            continue
        new = rename(k, CLIP_RENAMES)
        if new is not None:
            imported[new] = v
    return cfg_over


def _checked(fn, hf: dict, path: Path, *args):
    try:
        return fn(hf, *args)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: missing required key {e}") from None
    except (TypeError, ZeroDivisionError, AttributeError) as e:  # a value of the wrong type, or 0
        raise ValueError(f"{path / 'config.json'}: a value is invalid ({type(e).__name__}: {e})") from None


def load_imported(model, imported: dict, parts: list[str]) -> None:
    """Copy imported tensors into ``model``. Every imported tensor must exist with the same shape,
    and every tensor of an imported part that a checkpoint has a counterpart for must be covered."""
    import torch

    own = model.state_dict()
    for k, v in imported.items():
        if k not in own:
            raise ValueError(f"convert: checkpoint tensor {k!r} has no counterpart in VideoLlama")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"convert: tensor {k!r}: checkpoint shape {tuple(v.shape)} != model shape "
                             f"{tuple(own[k].shape)}")
    # The model parts (videollama.model.parts) that each checkpoint has a counterpart for.
    from_checkpoints = {"decoder": ("decoder", "embeddings"), "vision": ("vision",)}
    covered = {part for p in parts for part in from_checkpoints[p]}
    expected = {k for k in own if part_of(k) in covered}
    # Vocabulary tensors may be deliberately left out (re-initialised); tied heads share storage.
    missing = sorted(k for k in expected - set(imported) if k not in _VOCAB_TENSORS)
    if missing:
        raise ValueError(f"convert: checkpoint lacks tensors the model needs: {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}")
    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers()))
        for k, v in imported.items():
            params[k].copy_(v.to(params[k].dtype))


# ---- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llama", help="Hugging Face LlamaForCausalLM directory (safetensors)")
    parser.add_argument("--vision", help="Hugging Face CLIPVisionModel or CLIPModel directory (safetensors)")
    parser.add_argument("--preset", default="videollama-13b",
                        help="preset for everything not imported (default: videollama-13b)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="target vocabulary (default: the --tokenizer's size, else the Llama checkpoint's, "
                             "else the preset's); a size other than the Llama checkpoint's re-initialises "
                             "embeddings and head; never below the tokenizer's size")
    parser.add_argument("--tokenizer", help="tokenizer.json (or a folder holding it) to copy into the model "
                                            "directory; it sets the vocabulary unless --vocab-size is given")
    parser.add_argument("--seed", type=int, default=0, help="seed for the freshly initialised parts")
    parser.add_argument("--out", required=True, help="output model directory")


def run(args: argparse.Namespace) -> int:
    if not args.llama and not args.vision:
        raise ValueError("convert: nothing to import: give --llama and/or --vision")
    out = Path(args.out)
    # Writing the model directory over (or inside) an input would overwrite its config.json and
    # delete its weight shards before they were read.
    for flag, source in (("--llama", args.llama), ("--vision", args.vision)):
        if source is None:
            continue
        source = Path(source).resolve()
        folder = source if source.is_dir() else source.parent
        if out.resolve() == folder or out.resolve().is_relative_to(folder):
            raise ValueError(f"--out {out} is, or is inside, the {flag} input {folder}: writing there would "
                             "destroy it; give another folder")
    from videollama.model.model_dir import TOKENIZER_NAME

    tokenizer = None
    if args.tokenizer:
        from videollama.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)  # checked before anything is written
    model = convert(llama=args.llama, vision=args.vision, preset=args.preset, vocab_size=args.vocab_size,
                    tokenizer=tokenizer, seed=args.seed)
    # Without --tokenizer, a Llama checkpoint's own tokenizer goes with its embeddings when they are kept.
    ckpt_tokenizer = None
    if tokenizer is None and args.llama:
        candidate = Path(args.llama) / TOKENIZER_NAME
        kept = model.config.decoder.vocab_size == read_hf_config(Path(args.llama))["vocab_size"]
        if candidate.is_file() and kept:
            ckpt_tokenizer = candidate
    stale = out / TOKENIZER_NAME
    if tokenizer is None and ckpt_tokenizer is None and stale.is_file():
        stale.unlink()  # an earlier conversion's tokenizer would silently pair with this model's vocabulary
        print(f"convert: removed {stale} left by an earlier conversion")
    model.save_pretrained(out, tokenizer=tokenizer)
    if ckpt_tokenizer is not None:
        _copy_checkpoint_tokenizer(ckpt_tokenizer, out / TOKENIZER_NAME, model.config.decoder.vocab_size)
    elif tokenizer is None:
        print(f"convert: warning: {out} has no {TOKENIZER_NAME}: `videollama generate` and `videollama eval` "
              "cannot use it until one is added (convert again with --tokenizer, or copy one in).")
    print(f"convert: wrote {out}")
    return 0


def _copy_checkpoint_tokenizer(source: Path, dest: Path, vocab_size: int) -> None:
    """Copy a Llama checkpoint's tokenizer.json byte for byte, saying what it can and cannot do.

    It is copied as is (not rewritten) so that it stays the checkpoint's exact tokenizer; a
    tokenizer without VideoLlama's special tokens (every Llama one) is still copied, with a warning:
    ``generate`` and ``eval`` refuse it, since their prompts are built from those tokens.
    """
    import shutil

    from tokenizers import Tokenizer

    from videollama.data.tokenizer import load_tokenizer

    try:
        size = Tokenizer.from_file(str(source)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the Rust side raises a bare Exception with a serde message
        if dest.is_file() and dest.resolve() != source.resolve():
            dest.unlink()  # an earlier conversion's
        print(f"convert: warning: {source} is not a valid tokenizer.json ({e}); not copied: "
              f"{dest.parent} has no {dest.name}, `videollama generate` and `videollama eval` cannot use it")
        return
    if source.resolve() != dest.resolve():
        shutil.copyfile(source, dest)
    print(f"convert: copied the checkpoint's {source} to {dest}")
    if size > vocab_size:
        print(f"convert: warning: {dest} has {size} tokens, more than the model's vocabulary {vocab_size}")
    try:
        load_tokenizer(dest)
    except ValueError as e:
        print(f"convert: warning: {dest} lacks VideoLlama's special tokens ({e}); `videollama generate` and "
              "`videollama eval` need them and will refuse it (train with `videollama tokenizer train` or "
              "convert with --tokenizer to use them).")
