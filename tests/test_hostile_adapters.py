"""Hostile and inexact LoRA adapters: each refused in one line naming its file, before anything
is allocated for it (the peak RSS of the process that tries stays flat), and nothing looked up
on the network. The adapters we can merge exactly (rank_pattern, alpha_pattern, rsLoRA) merge to
``W + scale B A`` computed here from the files.

Every hostile adapter is built here from one written by peft itself (``good_adapter``).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from videollama.cli import main
from videollama.config import VideoLlamaConfig
from videollama.model.videollama import VideoLlama
from videollama.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter

SMALL = {"preprocess.num_frames": 2, "preprocess.size": 32, "vision.image_size": 32, "vision.max_frames": 2}
TARGETS = ["decoder.layers.0.self_attn.q_proj", "decoder.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base") / "base"
    VideoLlama(VideoLlamaConfig.from_name("tiny").with_overrides(SMALL)).save_pretrained(out)
    return out


def good_adapter(base: Path, out: Path, *, r: int = 4, **config) -> Path:
    """A peft adapter written by peft (random non-zero B) on TARGETS."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = VideoLlama.from_pretrained(base)
    lora = LoraConfig(r=r, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False, **config)
    torch.manual_seed(1)
    inject_adapter_in_model(lora, model)
    lora.save_pretrained(str(out))
    save_file(get_peft_model_state_dict(model, save_embedding_layers=False), str(out / ADAPTER_WEIGHTS))
    return out


def edited(base: Path, out: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of good_adapter with ``config`` keys replaced and ``tensors(state)`` applied to its weights."""
    good_adapter(base, out)
    if config:
        d = json.loads((out / ADAPTER_CONFIG).read_text())
        d.update(config)
        (out / ADAPTER_CONFIG).write_text(json.dumps(d))  # allow_nan: NaN is written as NaN, as Python does
    if tensors:
        state = load_file(out / ADAPTER_WEIGHTS)
        tensors(state)
        save_file(state, str(out / ADAPTER_WEIGHTS))
    return out


def _first(state, part: str) -> str:
    return next(k for k in sorted(state) if part in k)


def _nan_b(state):
    state[_first(state, "lora_B")][0, 0] = float("nan")


def _bool_a(state):
    key = _first(state, "lora_A")
    state[key] = state[key] > 0


def _rank_5_a(state):
    key = _first(state, "lora_A")
    state[key] = torch.randn(5, state[key].shape[1])


def _extra(state):
    state["decoder.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 96)


HOSTILE = {  # name -> (config changes, tensor changes, the file named, what the one line says)
    "huge_r": ({"r": 1_000_000}, None, ADAPTER_WEIGHTS, "r = 1000000"),
    "huge_rank_pattern": ({"rank_pattern": {"q_proj": 1_000_000, "down_proj": 3_000_000}}, None, ADAPTER_WEIGHTS,
                          "r = 1000000"),
    "pissa": ({"init_lora_weights": "pissa"}, None, ADAPTER_CONFIG, "init_lora_weights 'pissa' is not supported"),
    "olora": ({"init_lora_weights": "olora"}, None, ADAPTER_CONFIG, "init_lora_weights 'olora' is not supported"),
    "nan_alpha": ({"lora_alpha": float("nan")}, None, ADAPTER_CONFIG, "lora_alpha must be a finite number > 0"),
    "zero_alpha": ({"lora_alpha": 0}, None, ADAPTER_CONFIG, "lora_alpha must be a finite number > 0"),
    "nan_alpha_pattern": ({"alpha_pattern": {"q_proj": float("inf")}}, None, ADAPTER_CONFIG, "finite number > 0"),
    "dora": ({"use_dora": True}, None, ADAPTER_CONFIG, "use_dora = True is not supported"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, None, ADAPTER_CONFIG, "fan_in_fan_out = True is not supported"),
    "bias": ({"bias": "all"}, None, ADAPTER_CONFIG, "bias = 'all' is not supported"),
    "unknown_key": ({"lora_magic": 3}, None, ADAPTER_CONFIG, "unknown key 'lora_magic'"),
    "missing_target": ({"target_modules": [*TARGETS, "nope_proj"]}, None, ADAPTER_CONFIG,
                       "target module 'nope_proj' does not exist"),
    "nan_weights": (None, _nan_b, ADAPTER_WEIGHTS, "holds NaN or infinite values"),
    "bool_weights": (None, _bool_a, ADAPTER_WEIGHTS, "is BOOL, not a float tensor"),
    "wrong_shape": (None, _rank_5_a, ADAPTER_WEIGHTS, "has shape (5, 96)"),
    "extra_tensor": (None, _extra, ADAPTER_WEIGHTS, "unexpected ['decoder.layers.0.self_attn.k_proj.lora_A.weight']"),
}

# Runs `videollama merge` on each adapter in one child process (after one good merge has warmed
# up every import and code path) and reports each one's exit code, stderr and peak-RSS growth.
CHILD = r"""
import contextlib, io, json, resource, sys
from videollama.cli import main
base, good, out, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
assert main(["merge", "--model", base, "--adapter", good, "--out", out + "/warm"]) == 0
report = {}
for name, adapter in cases.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["merge", "--model", base, "--adapter", adapter, "--out", out + "/" + name])
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    report[name] = {"rc": rc, "err": err.getvalue(), "growth_mb": growth / 1024}
print(json.dumps(report))
"""


def test_hostile_adapters_are_refused_in_one_line_before_any_allocation(base: Path, tmp_path: Path):
    adapters = {}
    for name, (config, tensors, _, _) in HOSTILE.items():
        adapters[name] = str(edited(base, tmp_path / name, config, tensors))
    assert (tmp_path / "huge_r" / ADAPTER_CONFIG).stat().st_size < 2048  # a 2 KB config
    good = good_adapter(base, tmp_path / "good")
    done = subprocess.run([sys.executable, "-c", CHILD, str(base), str(good), str(tmp_path / "out"),
                           json.dumps(adapters)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, _, file, says) in HOSTILE.items():
        got = report[name]
        assert got["growth_mb"] < 200, (name, got["growth_mb"])
        lines = [ln for ln in got["err"].splitlines() if ln.strip()]
        assert got["rc"] == 2 and len(lines) == 1 and lines[0].startswith("videollama: error: "), (name, got)
        assert f"{name}/{file}" in lines[0] and says in lines[0], (name, lines[0])
        assert not (tmp_path / "out" / name).exists(), name


def test_a_header_that_claims_more_than_the_file_holds_is_refused_unread(base: Path, tmp_path: Path):
    adapter = good_adapter(base, tmp_path / "a")
    data = (adapter / ADAPTER_WEIGHTS).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    key = _first(header, "lora_A")
    header[key]["shape"] = [1_000_000, 96]  # 384 MB claimed by a file of a few KB
    header[key]["data_offsets"][1] = header[key]["data_offsets"][0] + 4 * 96 * 1_000_000
    text = json.dumps(header).encode()
    (adapter / ADAPTER_WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    with pytest.raises(ValueError, match="does not lie inside the file"):
        load_adapter(VideoLlama.from_pretrained(base), adapter)
    (adapter / ADAPTER_WEIGHTS).write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(VideoLlama.from_pretrained(base), adapter)


def test_loading_a_local_adapter_looks_nothing_up_on_the_hub(base: Path, tmp_path: Path, monkeypatch):
    adapter = edited(base, tmp_path / "a", {"base_model_name_or_path": "acme/videollama-base-not-local"})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tried = []

    def refuse(kind):
        def blocked(*args, **kwargs):
            tried.append((kind, args[1:] if kind == "connect" else args[:2]))
            raise OSError(f"network blocked by the test ({kind})")
        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    model = load_adapter(VideoLlama.from_pretrained(base), adapter)
    assert tried == []
    assert "lora" not in " ".join(n for n, _ in model.named_parameters())  # merged


def _reference(base: Path, adapter: Path, *, alpha: float, ranks: dict[str, int], alphas: dict[str, float],
               rslora: bool) -> dict[str, torch.Tensor]:
    plain, update = load_file(base / "model.safetensors"), load_file(adapter / ADAPTER_WEIGHTS)
    want = dict(plain)
    for module in TARGETS:
        short = module.rsplit(".", 1)[-1]
        A, B = update[f"{module}.lora_A.weight"], update[f"{module}.lora_B.weight"]  # [r, in], [out, r]
        r, a = ranks.get(short, 4), alphas.get(short, alpha)
        scale = a / math.sqrt(r) if rslora else a / r
        want[f"{module}.weight"] = (plain[f"{module}.weight"].double() + scale * B.double() @ A.double()).float()
    return want


@pytest.mark.parametrize("config", [
    {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"q_proj": 3.0}},
    {"use_rslora": True},
])
def test_exact_lora_variants_merge_to_the_low_rank_update(base: Path, tmp_path: Path, config):
    adapter = good_adapter(base, tmp_path / "a", **config)
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    merged = load_file(tmp_path / "m" / "model.safetensors")
    want = _reference(base, adapter, alpha=8.0, ranks=config.get("rank_pattern", {}),
                      alphas=config.get("alpha_pattern", {}), rslora=config.get("use_rslora", False))
    assert sorted(merged) == sorted(want)
    for key in want:
        torch.testing.assert_close(merged[key], want[key], rtol=0, atol=1e-5)
    assert any(not torch.equal(merged[f"{m}.weight"], load_file(base / "model.safetensors")[f"{m}.weight"])
               for m in TARGETS)
