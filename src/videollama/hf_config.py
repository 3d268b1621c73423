"""Reading Hugging Face configs: a ``LlamaConfig`` or ``CLIPVisionConfig``/``CLIPConfig`` dict ->
VideoLlamaConfig overrides, with every setting that would import silently wrong refused.

RoPE is read in every form transformers writes it (top-level ``rope_theta``/``rope_scaling`` in
transformers 4, ``rope_parameters`` in transformers >= 5), ``default``, ``linear`` and ``llama3``
types are implemented (videollama.model.layers), any other type is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a Hugging Face checkpoint directory")
    from videollama.data.safe_io import read_json_object

    return read_json_object(path, "config")



# RoPE variants the decoder implements (videollama.model.layers.rotary_inv_freq).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def rope_overrides(hf: dict[str, Any], where: str = "--llama") -> dict[str, Any]:
    """Decoder RoPE overrides from a Hugging Face config dict, in every form transformers writes.

    transformers 4: top-level ``rope_theta`` and ``rope_scaling`` (``{"rope_type" or "type", ...}``
    or null). transformers >= 5: ``rope_parameters`` (``{"rope_theta", "rope_type", ...}``).
    The precedence is transformers' own (``PreTrainedConfig.convert_rope_params_to_dict``): a
    non-empty ``rope_scaling`` replaces ``rope_parameters``, and a ``rope_theta`` inside the dict
    wins over the top-level one (default 10000). Types other than default, linear and llama3
    (dynamic, yarn, longrope, ...) are refused: importing them as plain RoPE is silently wrong.
    """
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope settings {rope!r} are not a mapping")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{where}: per-layer-type RoPE parameters {sorted(rope)} are not supported")
    theta = rope.get("rope_theta")
    if theta is None:
        theta = hf.get("rope_theta")
    theta = 10000.0 if theta is None else float(theta)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (VideoLlama implements "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}); as plain RoPE it would be silently wrong")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {partial} is not supported (RoPE on the whole head only)")
    out: dict[str, Any] = {"decoder.rope_theta": theta, "decoder.rope_type": rope_type}
    needed = {"default": (), "linear": ("factor",), "llama3": _LLAMA3_KEYS}[rope_type]
    missing = [k for k in needed if rope.get(k) is None]
    if missing:
        raise ValueError(f"{where}: rope_type {rope_type!r} needs {missing} in its rope parameters ({rope})")
    if rope_type in ("linear", "llama3"):
        out["decoder.rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        if not high > low:
            raise ValueError(f"{where}: llama3 RoPE high_freq_factor {high} must exceed low_freq_factor {low}")
        # As transformers' standardize_rope_params: a top-level value first (Phi-3 style), then the
        # rope dict's, then max_position_embeddings.
        original = (hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                    or hf["max_position_embeddings"])
        out["decoder.rope_low_freq_factor"] = low
        out["decoder.rope_high_freq_factor"] = high
        out["decoder.rope_original_max_position_embeddings"] = int(original)
    return out


def llama_overrides(hf: dict[str, Any], where: str = "--llama") -> dict[str, Any]:
    """Decoder config overrides from a Hugging Face LlamaConfig dict (``where`` prefixes errors)."""
    if hf.get("model_type") not in ("llama", None):
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not 'llama'")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{where}: attention_bias/mlp_bias checkpoints are not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ValueError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU/silu only)")
    return {
        "decoder.hidden_size": hf["hidden_size"],
        "decoder.intermediate_size": hf["intermediate_size"],
        "decoder.num_layers": hf["num_hidden_layers"],
        "decoder.num_heads": heads,
        "decoder.num_kv_heads": hf.get("num_key_value_heads") or heads,
        "decoder.rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        **rope_overrides(hf, where),
        "decoder.tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def clip_overrides(hf: dict[str, Any], hf_dir: Path) -> dict[str, Any]:
    """Vision config overrides from a CLIPVisionConfig / CLIPConfig dict (and its preprocessor)."""
    vc = hf.get("vision_config", hf) if hf.get("model_type") == "clip" else hf
    if vc.get("model_type", "clip_vision_model") not in ("clip_vision_model",):
        raise ValueError(f"--vision: model_type {vc.get('model_type')!r} is not a CLIP vision model")
    out = {
        "vision.image_size": vc["image_size"],
        "vision.patch_size": vc["patch_size"],
        "vision.num_channels": vc.get("num_channels", 3),
        "vision.hidden_size": vc["hidden_size"],
        "vision.intermediate_size": vc["intermediate_size"],
        "vision.num_layers": vc["num_hidden_layers"],
        "vision.num_heads": vc["num_attention_heads"],
        "vision.hidden_act": vc.get("hidden_act", "quick_gelu"),
        "vision.layer_norm_eps": vc.get("layer_norm_eps", 1e-5),
        "preprocess.size": vc["image_size"],
    }
    # The imported ViT was trained with its own normalisation: keep it, or its features are off.
    pre = hf_dir / "preprocessor_config.json"
    if pre.is_file():
        from videollama.data.safe_io import read_json_object

        p = read_json_object(pre, "preprocessor config")
        if "image_mean" in p and "image_std" in p:
            out["preprocess.mean"] = list(p["image_mean"])
            out["preprocess.std"] = list(p["image_std"])
    return out
