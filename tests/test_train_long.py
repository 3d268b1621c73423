"""Training on whole videos: the loader's whole-video mode (window budget, resume, the decoded-window
cache) and a frozen encoder's latent cache, on real Shapes-Long videos of 20-40 s mixed with
Shapes v1 clips, on the tiny preset with 4 s windows (4 frames at 1 FPS; max_windows 8).
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from videollama.config import VideoLlamaConfig
from videollama.data.errors import OVER_WINDOW_BUDGET
from videollama.data.loader import VideoTextLoader
from videollama.data.sources import expand_sources, index_units, read_sample
from videollama.data.windows import load_windows
from videollama.model.videollama import VideoLlama, Windows
from videollama.train.latents import LatentCache, encoder_digest, visual_inputs, window_key
from videollama.train.loop import train
from videollama.train.recipe import TrainConfig
from videollama.train.synthetic import SyntheticVideos

OVERRIDES = {"preprocess.num_frames": 4, "preprocess.fps": 1.0, "vision.max_frames": 4}
MODEL_CFG = VideoLlamaConfig.from_name("tiny").with_overrides(OVERRIDES)
PRE = MODEL_CFG.preprocess  # 4 s windows, at most 8 of them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six Shapes-Long videos of 20-40 s (5 to 10 windows: tiled up to 8, spread past it) in three
    shards, four Shapes v1 clips of 5 s (2 windows) in two, and a BPE tokenizer on all their text."""
    from videollama.data.shapes_long_synth import TrainDurations, synthesize_long
    from videollama.data.shapes_synth import synthesize
    from videollama.data.tokenizer import iter_training_texts, train_tokenizer

    root = tmp_path_factory.mktemp("long")
    synthesize_long(root / "long", train=6, durations=TrainDurations("20:40"), eval_durations=[], depths=[],
                    per_cell=0, per_duration=0, seed=4, shard_size=2)
    synthesize(root / "v1", train=4, eval=0, seed=5, workers=1, shard_size=2)
    tok = train_tokenizer(iter_training_texts([root / "long" / "train", root / "v1" / "train"]), 400)
    tok.save(str(root / "tokenizer.json"))
    return root


def sources(corpus: Path) -> list[str]:
    return [str(corpus / "long" / "train"), str(corpus / "v1" / "train")]


def loader(corpus: Path, **kw) -> VideoTextLoader:
    args = dict(tokenizer=str(corpus / "tokenizer.json"), preprocess=PRE, task="caption+videoqa", batch_size=3,
                max_len=64, seed=1, shuffle_buffer=4, windows="whole", window_budget=12, epochs=1)
    return VideoTextLoader(sources(corpus), **(args | kw))


def same_batch(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["video"], b["video"])
            and all(torch.equal(a["windows"][k], b["windows"][k]) for k in ("times", "video"))
            and all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "video_index")))


def reference_windows(corpus: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every sample's windows as videollama.data.windows.load_windows gives them, by key."""
    out = {}
    for ref in index_units(expand_sources(sources(corpus))):
        _, video = read_sample(ref)
        out[ref.key] = load_windows(video, PRE)
    return out


# ---- the loader's whole-video mode ---------------------------------------------------------------


def test_whole_video_batches_keep_the_window_budget_mix_long_and_short_and_hold_every_window(corpus: Path):
    reference = reference_windows(corpus)
    batches = list(loader(corpus))
    seen = [k for b in batches for k in b["keys"]]
    assert sorted(seen) == sorted(reference)  # one epoch: every video once, none skipped
    mixed = False
    for b in batches:
        n, videos = b["video"].shape[0], len(b["keys"])
        assert n <= 12 and videos <= 3
        assert b["windows"]["times"].shape == (n, PRE.num_frames) and b["windows"]["video"].shape == (n,)
        Windows(b["windows"]["times"], b["windows"]["video"]).check(b["video"])
        assert b["video_index"].tolist() == sorted(b["video_index"].tolist())
        assert set(b["video_index"].tolist()) == set(range(videos))  # every video has its texts
        assert b["input_ids"].shape[0] == b["labels"].shape[0] == b["video_index"].shape[0]
        counts = torch.bincount(b["windows"]["video"], minlength=videos).tolist()
        mixed |= min(counts) <= 2 and max(counts) >= 5
        first = 0
        for key, count in zip(b["keys"], counts):
            frames, times = reference[key]  # the model's policy, decoded by the one window walk
            assert torch.equal(b["video"][first:first + count], frames), key
            assert torch.equal(b["windows"]["times"][first:first + count], times), key
            first += count
    assert mixed, "no batch held a long and a short video together"
    # A batch leaves when the next video would break the budget: consecutive batches could not merge.
    for a, b in itertools.pairwise(batches):
        assert a["video"].shape[0] + torch.bincount(b["windows"]["video"])[0] > 12 or len(a["keys"]) == 3


def test_a_video_over_the_window_budget_is_skipped_and_counted(corpus: Path):
    reference = reference_windows(corpus)
    over = {k for k, (frames, _) in reference.items() if frames.shape[0] > 6}
    assert over and len(over) < len(reference)
    it = loader(corpus, window_budget=6, skip_budget=1.0)
    keys = [k for b in it for k in b["keys"]]
    assert sorted(keys) == sorted(set(reference) - over)
    assert it.skipped == {OVER_WINDOW_BUDGET: len(over)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_batches_an_uninterrupted_run_gives(corpus: Path, workers: int):
    # Endless epochs: the batches run across an epoch boundary, where a batch carries over.
    straight = loader(corpus, epochs=None)
    expected = list(itertools.islice(straight, 9))
    for stop in (1, 2, 4):
        first = loader(corpus, epochs=None, num_workers=workers)
        head = list(itertools.islice(first, stop))
        assert all(same_batch(a, b) for a, b in zip(head, expected))
        state = json.loads(json.dumps(first.state_dict()))  # it travels in a checkpoint as JSON
        again = loader(corpus, epochs=None, num_workers=workers)
        again.load_state_dict(state)
        rest = list(itertools.islice(again, 9 - stop))
        assert all(same_batch(a, b) for a, b in zip(rest, expected[stop:])), stop


def test_the_decoded_window_cache_decodes_once_and_gives_the_decoded_floats(corpus: Path, tmp_path: Path,
                                                                             monkeypatch):
    plain = list(loader(corpus))
    cached = list(loader(corpus, cache_dir=str(tmp_path)))
    assert len(list(tmp_path.glob("*.npz"))) == 10  # one entry per video
    assert all(same_batch(a, b) for a, b in zip(plain, cached)) and len(plain) == len(cached)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the windows are cached")

    monkeypatch.setattr("videollama.data.window_cache.open_windows", no_decoding)
    again = list(loader(corpus, cache_dir=str(tmp_path)))
    assert all(same_batch(a, b) for a, b in zip(plain, again)) and len(plain) == len(again)
    # The budget is checked on a cached entry too.
    it = loader(corpus, cache_dir=str(tmp_path), window_budget=6, skip_budget=1.0)
    list(it)
    assert it.skipped.get(OVER_WINDOW_BUDGET, 0) > 0


# ---- the latent cache ----------------------------------------------------------------------------


class CountingModel(torch.nn.Module):
    """Wraps a VideoLlama and counts the windows its encoder is asked for."""

    def __init__(self, model: VideoLlama):
        super().__init__()
        self.model, self.encoded, self.calls = model, 0, 0

    def window_latents(self, video: torch.Tensor) -> torch.Tensor:
        self.encoded += video.shape[0]
        self.calls += 1
        return self.model.window_latents(video)


def synthetic_batch(seed: int = 0, budget: int = 16) -> dict:
    return next(SyntheticVideos(model_cfg=MODEL_CFG, batch_size=4, seq_len=12, seed=seed, rank=0, world_size=1,
                                window_budget=budget, palette=5))


def test_the_latent_cache_encodes_each_distinct_window_once(tmp_path: Path):
    torch.manual_seed(0)
    model = VideoLlama(MODEL_CFG).eval()
    counting = CountingModel(model)
    cache = LatentCache(digest="d" * 64, max_bytes=2**30, directory=tmp_path, windows_per_call=3)
    batches = [synthetic_batch(seed) for seed in range(4)]
    distinct: set[str] = set()
    for b in batches:
        got = cache.latents(counting, b["video"], torch.device("cpu"))
        distinct |= {window_key(w) for w in b["video"]}
        assert counting.encoded == len(distinct)  # each new window once, however often it repeats
        with torch.no_grad():
            torch.testing.assert_close(got, model.window_latents(b["video"]), rtol=1e-5, atol=1e-6)
    windows = sum(b["video"].shape[0] for b in batches)
    assert windows > len(distinct) and cache.record()["latent_hit_rate"] == pytest.approx(1 - len(distinct) / windows)
    # On disk: a new cache for the same encoder reads them; another encoder never does.
    again = CountingModel(model)
    LatentCache(digest="d" * 64, max_bytes=2**30, directory=tmp_path).latents(again, batches[0]["video"], "cpu")
    assert again.encoded == 0
    other = CountingModel(model)
    LatentCache(digest="e" * 64, max_bytes=2**30, directory=tmp_path).latents(other, batches[0]["video"], "cpu")
    assert other.encoded == len({window_key(w) for w in batches[0]["video"]})


def test_the_latent_cache_stays_within_its_bytes_least_recently_used_first_out():
    model = CountingModel(VideoLlama(MODEL_CFG))
    frames = torch.randn(6, PRE.num_frames, 3, PRE.size, PRE.size)
    one = MODEL_CFG.resampler.num_latents * MODEL_CFG.vision.hidden_size * 4  # bytes of one window's latents
    cache = LatentCache(digest="d" * 64, max_bytes=3 * one)
    cache.latents(model, frames[:3], "cpu")
    cache.latents(model, frames[:1], "cpu")  # window 0 is now the most recently used
    cache.latents(model, frames[3:4], "cpu")  # evicts window 1, the least recently used
    assert cache.bytes_held <= 3 * one and model.encoded == 4
    cache.latents(model, frames[[0, 2, 3]], "cpu")
    assert model.encoded == 4
    cache.latents(model, frames[1:2], "cpu")
    assert model.encoded == 5


def test_the_encoder_digest_follows_the_vision_side_only():
    model = VideoLlama(MODEL_CFG)
    before = encoder_digest(model, "fp32")
    with torch.no_grad():
        model.decoder.layers[0].mlp.up_proj.weight.add_(1.0)
        model.decoder.media_time.proj.weight.add_(1.0)  # the time code trains after the cache
    assert encoder_digest(model, "fp32") == before
    assert encoder_digest(model, "bf16") != before
    with torch.no_grad():
        model.resampler.latents.add_(1e-3)
    assert encoder_digest(model, "fp32") != before


@pytest.mark.parametrize("kind", ["whole", "clip"])
def test_cached_latents_give_the_logits_of_the_plain_forward(kind: str):
    torch.manual_seed(0)
    model = VideoLlama(MODEL_CFG)
    with torch.no_grad():  # open the gates and the time code, so that every path matters
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.5)
        model.decoder.media_time.proj.weight.normal_(0, 0.5)
    b = synthetic_batch(3)
    if kind == "clip":
        b = {"video": b["video"][:3], "input_ids": b["input_ids"][:3], "labels": b["labels"][:3]}
        plain = model(b["input_ids"], b["video"]).logits
    else:
        windows = Windows(b["windows"]["times"], b["windows"]["video"])
        plain = model(b["input_ids"], b["video"], windows=windows, video_index=b["video_index"]).logits
    cache = LatentCache(digest="d" * 64, max_bytes=2**30)
    cached = model(b["input_ids"], **visual_inputs(model, b, torch.device("cpu"), cache)).logits
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)


# ---- training ----------------------------------------------------------------------------------


def long_cfg(corpus: Path, **top) -> TrainConfig:
    d = {
        "model": {"preset": "tiny", "overrides": dict(OVERRIDES)},
        "tokenizer": str(corpus / "tokenizer.json"),
        "data": {"kind": "webdataset", "sources": sources(corpus), "task": "caption+videoqa", "texts_per_clip": 2,
                 "max_len": 64, "windows": "whole", "window_budget": 12},
        "optimizer": {"lr": 2e-3}, "schedule": {"warmup_steps": 1},
        "global_batch": 3, "micro_batch": 3, "max_steps": 4, "freeze": ["vision", "temporal", "resampler"],
        "log": {"tensorboard": False, "progress": False},
        "checkpoint": {"every": 2, "keep": 3}, "seed": 2, "deterministic": True,
    }
    for k, v in top.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return TrainConfig.from_dict(d)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_the_latent_cache_equals_training_without_it(corpus: Path, tmp_path: Path):
    # The gates start open so that the frozen encoder's latents reach the loss at every step.
    gates = {"decoder.cross_attn_gate_init": 1.0}
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    train(long_cfg(corpus, model={"preset": "tiny", "overrides": OVERRIDES | gates}, max_steps=3), plain)
    train(long_cfg(corpus, model={"preset": "tiny", "overrides": OVERRIDES | gates}, max_steps=3,
                   data={"latent_cache": True}), cached)
    a, b = records(plain), records(cached)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["loss"], y["loss"])
    assert len({r["loss"] for r in a}) == 3  # it trains: the loss moves
    assert "latent_hit_rate" not in a[0]
    assert b[-1]["latent_windows"] >= b[-1]["latent_encoded"] > 0
    assert b[-1]["latent_hit_rate"] == pytest.approx(1 - b[-1]["latent_encoded"] / b[-1]["latent_windows"])


def test_resume_with_latents_on_disk_continues_the_curve_bitwise(corpus: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = long_cfg(corpus, data={"latent_cache": True, "latent_cache_dir": str(tmp_path / "latents"),
                                 "cache_dir": str(tmp_path / "windows")})
    train(cfg, run)
    first = {r["step"]: r["loss"] for r in records(run)}
    assert sorted(first) == [0, 1, 2, 3]
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # a crash after step 3: step 2's checkpoint survived
    (run / "checkpoints" / "latest").write_text("step-00000002\n")
    assert train(cfg, run)["start_step"] == 2
    again = {r["step"]: r["loss"] for r in records(run)}
    assert again == first
    assert records(run)[-1]["latent_encoded"] == 0  # every latent came from the disk


def test_the_latent_cache_needs_the_whole_vision_side_frozen(corpus: Path):
    with pytest.raises(ValueError, match="needs the whole vision side frozen"):
        long_cfg(corpus, freeze=["vision", "temporal"], data={"latent_cache": True})
    with pytest.raises(ValueError, match="latent_cache_dir is set but"):
        long_cfg(corpus, data={"latent_cache_dir": "x"})
    with pytest.raises(ValueError, match="data.windows must be one of"):
        long_cfg(corpus, data={"windows": "all"})
