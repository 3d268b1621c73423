"""LoRA and QLoRA through peft: training, export in peft's format, merge, and inference with --adapter.

The references are peft's own loaders (``inject_adapter_in_model`` + ``set_peft_model_state_dict`` +
``load_peft_weights`` on a fresh model) and the low-rank update ``W + (alpha / r) B A`` computed
here from the files. Runs use the tiny preset shrunk to 2 frames of 32x32 on synthetic data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers import small_cfg
from videollama.cli import main
from videollama.config import VideoLlamaConfig
from videollama.model.videollama import VideoLlama
from videollama.train.checkpoint import export
from videollama.train.distributed import setup_distributed
from videollama.train.loop import checkpoint_if_due, setup_run, train, train_step
from videollama.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_lora_param

SMALL = {"preprocess.num_frames": 2, "preprocess.size": 32, "vision.image_size": 32, "vision.max_frames": 2}
# Every part: Llama blocks, cross-attention blocks (by a pattern) and the vision encoder's attention.
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj",
                                                 "decoder.cross_attn_layers.*.attn.o_proj", "out_proj"],
        "parts": ["decoder", "vision"]}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A model directory of the shrunk tiny preset (random weights, seed 0): the base to adapt."""
    torch.manual_seed(0)
    model = VideoLlama(VideoLlamaConfig.from_name("tiny").with_overrides(SMALL))
    with torch.no_grad():  # open the gates: the cross-attention path then matters
        for block in model.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_cfg(base: Path, **top):
    return small_cfg(**{"model": {"preset": None, "init_from": str(base), "overrides": {}}, "lora": dict(LORA), **top})


def run_in_process(cfg, run_dir: Path, steps: int, *, save: bool = True):
    """The run's own model after ``steps`` steps and (``save``) a checkpoint, and its state before the first."""
    env = setup_distributed(60)
    try:
        run = setup_run(cfg, run_dir, env)
        before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        data = iter(run.loader)
        for _ in range(steps):
            train_step(run, data)
        if save:
            checkpoint_if_due(run, stop=True)
        return run, before
    finally:
        dist.destroy_process_group()


def inputs(cfg: VideoLlamaConfig, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    v = cfg.vision
    return {"input_ids": torch.randint(3, cfg.decoder.vocab_size, (2, 10), generator=g),
            "video": torch.randn(2, 2, 3, v.image_size, v.image_size, generator=g)}


def test_only_lora_parameters_train_and_base_weights_stay_bit_identical(base: Path, tmp_path: Path):
    run, before = run_in_process(lora_cfg(base), tmp_path / "run", steps=4)
    after = run.model.state_dict()
    lora = [k for k in after if is_lora_param(k)]
    # The adapters sit on every part the recipe names: Llama blocks, cross-attention, vision.
    assert any(k.startswith("decoder.layers.") for k in lora)
    assert any(k.startswith("decoder.cross_attn_layers.") and ".attn.o_proj." in k for k in lora)
    assert any(k.startswith("vision.encoder.layers.") and ".out_proj." in k for k in lora)
    assert not any(".cross_attn_layers." in k and ".attn.q_proj." in k for k in lora)  # parts: not cross_attn
    for k, v in after.items():
        if is_lora_param(k):
            assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]), f"frozen {k} changed"
    lora_B = [k for k in lora if ".lora_B." in k]
    assert all(torch.count_nonzero(before[k]) == 0 for k in lora_B)  # B starts at 0: the base model at step 0
    trainable = {id(p) for p in run.trainable}
    assert trainable == {id(p) for n, p in run.model.named_parameters() if is_lora_param(n)}
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == trainable


def test_exported_adapter_loads_with_peft_and_gives_the_runs_logits(base: Path, tmp_path: Path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    run, _ = run_in_process(lora_cfg(base), tmp_path / "run", steps=3)
    out = export(tmp_path / "run", tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    saved = json.loads((out / ADAPTER_CONFIG).read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8.0
    assert saved["base_model_name_or_path"] == str(base)

    fresh = VideoLlama.from_pretrained(base)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(out)), fresh)
    result = set_peft_model_state_dict(fresh, load_peft_weights(str(out)))
    assert not result.unexpected_keys
    x = inputs(fresh.config)
    run.model.eval()
    fresh.eval()
    with torch.no_grad():
        want, got = run.model(**x).logits, fresh(**x).logits
        plain = VideoLlama.from_pretrained(base).eval()(**x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (want - plain).abs().max() > 1e-4  # the adapter changed the model's output


def test_merge_equals_base_plus_the_low_rank_update(base: Path, tmp_path: Path):
    run_in_process(lora_cfg(base), tmp_path / "run", steps=3)
    adapter = export(tmp_path / "run", tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, plain = load_file(tmp_path / "merged" / "model.safetensors"), load_file(base / "model.safetensors")
    update = load_file(adapter / ADAPTER_WEIGHTS)
    scale = LORA["alpha"] / LORA["r"]
    assert sorted(merged) == sorted(plain)
    adapted = set()
    for key in update:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        A, B = update[key], update[f"{module}.lora_B.weight"]  # [r, in], [out, r]
        delta = B.double() @ A.double() * scale
        assert delta.abs().max() > 1e-5  # a real update, not zero
        torch.testing.assert_close(merged[f"{module}.weight"].double(), plain[f"{module}.weight"].double() + delta,
                                   rtol=0, atol=1e-5)
        adapted.add(f"{module}.weight")
    assert len(adapted) > 10
    for key in set(plain) - adapted:
        assert torch.equal(merged[key], plain[key]), key
    # `export --merged` of the run gives the same model directory's weights.
    export(tmp_path / "run", tmp_path / "merged2", merged=True)
    again = load_file(tmp_path / "merged2" / "model.safetensors")
    for key in merged:
        torch.testing.assert_close(again[key], merged[key], rtol=0, atol=1e-6)


def test_lora_run_resumes_from_its_checkpoint_bitwise(base: Path, tmp_path: Path):
    cfg = lora_cfg(base, max_steps=4, checkpoint={"every": 0})
    train(cfg, tmp_path / "straight")
    run_in_process(cfg, tmp_path / "split", steps=2)  # stops after step 2 with a checkpoint
    summary = train(cfg, tmp_path / "split")  # a new process would do the same: resume at 2
    assert summary["start_step"] == 2 and summary["trainable_params"] < summary["params"] / 10
    a = load_file(export(tmp_path / "straight", tmp_path / "a") / ADAPTER_WEIGHTS)
    b = load_file(export(tmp_path / "split", tmp_path / "b") / ADAPTER_WEIGHTS)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_recipe_rejects_bad_lora_sections(base: Path):
    for bad, says in [({"r": -1}, "r >= 0"), ({"parts": ["nose"]}, "unknown parts"),
                      ({"quantize": "fp8"}, "lora.quantize"), ({"target_modules": []}, "target_modules is empty")]:
        with pytest.raises(ValueError, match=says):
            small_cfg(lora={**LORA, **bad})
    with pytest.raises(ValueError, match="match no linear layer"):
        train(lora_cfg(base, lora={**LORA, "target_modules": ["qq_proj"]}), base.parent / "nothing")
    from videollama.train.lora import target_modules
    from videollama.train.recipe import LoraSection

    with torch.device("meta"):
        tied = VideoLlama(VideoLlamaConfig.from_name("tiny").with_overrides({"decoder.tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="ties lm_head"):
        target_modules(tied, LoraSection(r=4, target_modules=["q_proj", "embed_tokens"], parts=["decoder", "embeddings"]))
    assert len(target_modules(tied, LoraSection(r=4, target_modules=["q_proj"]))) == 2 * 2  # decoder + cross-attn q


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_qlora_on_cpu_says_it_needs_a_gpu(base: Path, tmp_path: Path, capsys):
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(json.dumps(lora_cfg(base, lora={**LORA, "quantize": "nf4"}).to_dict()))
    rc = main(["train", "--config", str(recipe), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "needs a CUDA GPU and bitsandbytes" in err and err.startswith("videollama: error:")


@pytest.mark.gpu
def test_qlora_trains_adapters_on_an_nf4_base(base: Path, tmp_path: Path):
    import bitsandbytes as bnb

    cfg = lora_cfg(base, lora={**LORA, "quantize": "nf4"}, deterministic=False)
    run, before = run_in_process(cfg, tmp_path / "run", steps=4, save=False)
    q = run.model.decoder.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.dtype == torch.uint8
    after = run.model.state_dict()
    for k, v in after.items():
        if is_lora_param(k):
            assert not torch.equal(v, before[k]), k
        elif isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    # The NF4 model's logits stay near the full-precision base plus the same adapter.
    from peft import set_peft_model_state_dict

    from videollama.train.lora import adapter_state, apply_lora

    ref = VideoLlama.from_pretrained(base, device="cuda")
    apply_lora(ref, run.cfg.lora, quantize=False)
    set_peft_model_state_dict(ref, adapter_state(run.model))
    x = {k: v.cuda() for k, v in inputs(ref.config).items()}
    with torch.no_grad():
        got, want = run.model.eval()(**x).logits.float(), ref.eval()(**x).logits
    assert torch.isfinite(got).all()
    err = (got - want).abs().mean() / want.abs().mean()
    assert 0 < err < 0.3, err  # NF4 rounding moves the logits, a little


# ---- 2 ranks under torchrun -------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_fsdp_lora_matches_one_rank(base: Path, tmp_path: Path):
    from test_train_dist import losses, run_ok, train_cmd

    cfg = lora_cfg(base, max_steps=20, global_batch=4, micro_batch=2, checkpoint={"every": 0, "keep": 1},
                   data={"kind": "synthetic", "synthetic_seq_len": 16}, guards={"timeout_s": 120})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(cfg.to_dict()))
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok(train_cmd(recipe, one), timeout=300)
    run_ok(train_cmd(recipe, two, nproc=2), timeout=300)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(20))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert max(a.values()) - min(a.values()) > 1e-2  # a training curve, not a constant
    assert json.loads((two / "summary.json").read_text())["mesh"] == {"shard": 2}
    wa = load_file(export(one, tmp_path / "a") / ADAPTER_WEIGHTS)
    wb = load_file(export(two, tmp_path / "b") / ADAPTER_WEIGHTS)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5)


# ---- inference with --adapter -----------------------------------------------------------------


def random_adapter(base: Path, out: Path) -> Path:
    """A peft adapter written by peft itself, with non-zero random B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    model = VideoLlama.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                        init_lora_weights=False)
    torch.manual_seed(1)
    inject_adapter_in_model(config, model)
    config.save_pretrained(str(out))
    save_file(get_peft_model_state_dict(model), str(out / ADAPTER_WEIGHTS))
    return out


def test_generate_and_eval_with_adapter_equal_the_merged_model(tmp_path: Path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_harness import WORDS, _write_clip
    from test_generate import make_model_dir

    base = tmp_path / "base"
    base.mkdir()
    make_model_dir(base, **{"preprocess.num_frames": 4})
    adapter = random_adapter(base, tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    capsys.readouterr()

    def say(*model_args):
        assert main(["generate", *model_args, "--prompt", "a red square", "--max-new-tokens", "8"]) == 0
        return capsys.readouterr().out.strip()

    with_adapter, merged, plain = (say("--model", str(base), "--adapter", str(adapter)),
                                   say("--model", str(tmp_path / "merged")), say("--model", str(base)))
    assert with_adapter == merged and with_adapter != plain

    _write_clip(tmp_path / "clip.mp4", color=(220, 40, 40), direction=1)
    items = [{"video": "clip.mp4", "question": q, "answer": "red", "kind": "static"}
             for q in ("what color is the square?", "which way does the red square move?")]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    assert WORDS

    def predictions(name, *model_args):
        out = tmp_path / name
        assert main(["eval", *model_args, "--task", "videoqa", "--data", str(tmp_path / "qa.jsonl"), "--out",
                     str(out), "--max-new-tokens", "4", "--device", "cpu"]) == 0
        return [json.loads(x)["prediction"] for x in (out / "predictions.jsonl").read_text().splitlines()]

    a = predictions("e1", "--model", str(base), "--adapter", str(adapter))
    b = predictions("e2", "--model", str(tmp_path / "merged"))
    assert a == b and a != predictions("e3", "--model", str(base))


def test_bad_adapter_is_one_line_error(base: Path, tmp_path: Path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    for adapter, says in [(tmp_path / "missing", "no such folder"), (tmp_path / "bad", "only LoRA adapters")]:
        rc = main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m")])
        err = capsys.readouterr().err
        assert rc == 2 and says in err, err


def test_meta_init_under_fsdp_starts_the_adapters_at_zero(tmp_path: Path):
    # Built on the meta device and initialised after sharding, B must still start at 0: the step-0
    # loss is the base model's own (init_weights alone would draw B like any linear layer).
    cfg = {"max_steps": 1, "parallel": {"meta_init": True, "fsdp": True}, "checkpoint": {"every": 0, "at_end": False}}
    plain = train(small_cfg(**cfg), tmp_path / "plain")
    lora = train(small_cfg(**cfg, lora=dict(LORA)), tmp_path / "lora")
    first = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])["loss"] for n in ("plain", "lora")]
    assert abs(first[0] - first[1]) < 1e-6, first
    assert lora["trainable_params"] < plain["trainable_params"] / 10


def test_adapter_on_a_tied_embedding_is_refused(tmp_path: Path, capsys):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = VideoLlamaConfig.from_name("tiny").with_overrides({**SMALL, "decoder.tie_word_embeddings": True})
    VideoLlama(cfg).save_pretrained(tmp_path / "tied")
    model = VideoLlama.from_pretrained(tmp_path / "tied")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"], init_lora_weights=False)
    inject_adapter_in_model(config, model)
    config.save_pretrained(str(tmp_path / "ad"))
    save_file(get_peft_model_state_dict(model), str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    rc = main(["merge", "--model", str(tmp_path / "tied"), "--adapter", str(tmp_path / "ad"), "--out",
               str(tmp_path / "m")])
    assert rc == 2 and "ties together" in capsys.readouterr().err
