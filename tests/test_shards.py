"""Shard writer and reader: bad data is skipped and counted, positions resume exactly.

Test clips are tiny (64x48 px, 1 s at 25 FPS, decoded to 4 frames of 16x16) so every test runs in
seconds. The bad videos come from tests/badvideos.py, the same table load_clip is tested with;
the good clips and the fuzz shard from tests/helpers.py.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from badvideos import BAD_VIDEOS
from helpers import FUZZ_PRE, add_member, build_fuzz_shard, good_meta, good_video
from videollama.config import PreprocessConfig
from videollama.data import errors
from videollama.data.loader import SkipBudgetExceeded, VideoTextLoader, iter_samples
from videollama.data.sources import expand_sources, group_members
from videollama.data.stages import IGNORE_INDEX, Sample, Skip
from videollama.data.writer import parse_size, write_shards

PRE = PreprocessConfig(num_frames=4, fps=8.0, size=16)

pytestmark = pytest.mark.usefixtures("no_hang")  # fail instead of hanging the suite (conftest.py)


def counts(items) -> tuple[list[str], dict[str, int]]:
    good, skipped = [], {}
    for item in items:
        if isinstance(item, Skip):
            skipped[item.reason] = skipped.get(item.reason, 0) + 1
        else:
            assert isinstance(item, Sample)
            good.append(item.key)
    return good, skipped


# ---- writer ----------------------------------------------------------------------------


def test_write_shards_roundtrip_and_rollover(tmp_path):
    videos = [good_video(i) for i in range(5)]
    samples = [(f"clip{i}", videos[i], good_meta(i)) for i in range(5)]
    paths = write_shards(samples, tmp_path / "out", prefix="train", max_count=2)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    # Read back with plain tarfile (the independent reference): names, bytes and JSON intact.
    members = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    assert sorted(members) == sorted(f"clip{i}.{ext}" for i in range(5) for ext in ("mp4", "json"))
    for i in range(5):
        assert members[f"clip{i}.mp4"] == videos[i]
        assert json.loads(members[f"clip{i}.json"]) == good_meta(i)
    assert not list((tmp_path / "out").glob("*.tmp"))
    # The webdataset library reads them as samples {__key__, mp4, json}.
    import webdataset as wds

    read = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert [s["__key__"] for s in read] == [f"clip{i}" for i in range(5)]
    assert all(s["mp4"] == videos[i] and json.loads(s["json"]) == good_meta(i) for i, s in enumerate(read))

    # The byte limit counts member headers and padded data: choose one that holds two samples.
    padded = [1024 + -(-len(v) // 512) * 512 + -(-len(json.dumps(good_meta(i))) // 512) * 512
              for i, v in enumerate(videos)]
    limit = max(a + b for a, b in zip(padded, padded[1:]))
    assert min(a + b + c for a, b, c in zip(padded, padded[1:], padded[2:])) > limit
    paths = write_shards(samples, tmp_path / "bytes", max_bytes=limit)
    assert len(paths) == 3
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["clip0.mp4", "clip0.json", "clip1.mp4", "clip1.json"]


def test_write_shards_rejects_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="no dots"):
        write_shards([("a.b", b"x", {})], tmp_path)
    with pytest.raises(ValueError, match="twice"):
        write_shards([("a", b"x", {}), ("a", b"y", {})], tmp_path / "dup")
    assert not list((tmp_path / "dup").glob("*.tar*"))  # the partial shard was removed


def test_parse_size():
    assert parse_size("1GB") == 10**9
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_size("4096") == 4096
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")


def test_shards_cli_from_folder_and_manifest(tmp_path, capsys):
    from videollama.cli import main

    src = tmp_path / "videos"
    (src / "sub").mkdir(parents=True)
    (src / "a.mp4").write_bytes(good_video(1))
    (src / "a.txt").write_text("a caption from a text file\n")
    (src / "sub" / "b.mp4").write_bytes(good_video(2))
    (src / "sub" / "b.json").write_text(json.dumps(good_meta(2)))
    (src / "c.mp4").write_bytes(good_video(3))  # no sidecar: empty caption
    (src / "broken.mp4").write_bytes(BAD_VIDEOS["garbage"][0]())
    (src / "empty.mp4").write_bytes(b"")
    (src / "sound.mp4").write_bytes(BAD_VIDEOS["audio_only"][0]())
    assert main(["data", "shards", "--input", str(src), "--out", str(tmp_path / "s1"), "--prefix", "p"]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 samples into 1 shards" in out
    assert "empty_file=1" in out and "invalid_container=1" in out and "no_video_stream=1" in out
    got = {s.key: s for s in iter_samples(tmp_path / "s1", preprocess=PRE)}
    assert sorted(got) == ["a", "c", "sub_b"]
    assert got["a"].meta["caption"] == "a caption from a text file"
    assert got["sub_b"].meta["qa"] == good_meta(2)["qa"]
    assert got["c"].meta["caption"] == ""

    manifest = tmp_path / "m" / "manifest.jsonl"
    manifest.parent.mkdir()
    (manifest.parent / "clips").mkdir()
    (manifest.parent / "clips" / "x.mp4").write_bytes(good_video(4))
    lines = [
        json.dumps({"video": "clips/x.mp4", **good_meta(4)}),
        json.dumps({"video": "clips/missing.mp4", "caption": "gone"}),
        "{not json",
    ]
    manifest.write_text("\n".join(lines) + "\n")
    assert main(["data", "shards", "--input", str(manifest), "--out", str(tmp_path / "s2")]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "missing_video=1" in out and "invalid_json=1" in out
    (sample,) = iter_samples(tmp_path / "s2", preprocess=PRE)
    assert sample.meta["caption"] == good_meta(4)["caption"] and sample.meta["source"] == "clips/x.mp4"


# ---- reader: sources and damaged tars --------------------------------------------------


def test_expand_sources(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    names = lambda units: [Path(u.path).name for u in units]  # noqa: E731
    assert names(expand_sources(tmp_path)) == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert names(expand_sources(str(tmp_path / "s-{000..001}.tar"))) == ["s-000.tar", "s-001.tar"]
    assert names(expand_sources(str(tmp_path / "*2.tar"))) == ["s-002.tar"]
    with pytest.raises(FileNotFoundError, match="nothing.tar: no such file"):
        expand_sources(tmp_path / "nothing.tar")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_sources(str(tmp_path / "*.zip"))


def test_truncation_at_every_cut_point(tmp_path):
    """Cut a shard at many places: complete samples before the cut come out, one TRUNCATED_TAR."""
    full = tmp_path / "full.tar"
    with tarfile.open(full, "w") as tar:
        for i in range(3):
            add_member(tar, f"k{i}.mp4", bytes([i]) * (700 + 300 * i))
            add_member(tar, f"k{i}.json", json.dumps({"caption": str(i)}).encode())
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    data_end = {m.name: m.offset_data + m.size for m in members}
    archive_end = members[-1].offset_data + (members[-1].size + 511) // 512 * 512  # end-of-archive block here
    data = full.read_bytes()
    cuts = sorted(set(range(0, archive_end + 512, 128)) | {archive_end + 511, archive_end + 512, len(data)})
    for cut in cuts:
        part = tmp_path / "part.tar"
        part.write_bytes(data[:cut])
        refs = list(group_members(str(part)))
        good = [r.key for r in refs if r.error is None]
        expected = [f"k{i}" for i in range(3) if max(data_end[f"k{i}.mp4"], data_end[f"k{i}.json"]) <= cut]
        assert good == expected, cut
        reasons = [r.error[0] for r in refs if r.error is not None]
        assert reasons == ([errors.TRUNCATED_TAR] if cut < archive_end + 512 else []), cut


def test_fuzz_shard_yields_exactly_the_good_samples(tmp_path):
    good, expected = build_fuzz_shard(tmp_path / "fuzz.tar")
    assert len(expected) == 12  # every reason code of errors.py, each at least once
    items = list(iter_samples(tmp_path / "fuzz.tar", preprocess=FUZZ_PRE))
    got, skipped = counts(items)
    assert got == good
    assert skipped == expected
    for item in items:
        if isinstance(item, Sample):
            assert item.video.shape == (16, 3, 16, 16) and item.video.dtype == torch.float32
            assert torch.isfinite(item.video).all()
    # The same result through two decoding worker processes.
    assert counts(iter_samples(tmp_path / "fuzz.tar", preprocess=FUZZ_PRE, num_workers=2)) == (good, expected)


# ---- the batching loader ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from videollama.data.tokenizer import train_tokenizer

    texts = [good_meta(i)["caption"] for i in range(20)] + [
        qa[k] for i in range(3) for qa in good_meta(i)["qa"] for k in ("question", "answer")
    ]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three shards of good samples (11 in all) plus one bad sample in the middle shard."""
    root = tmp_path_factory.mktemp("shards")
    samples = [(f"clip{i:02d}", good_video(i), good_meta(i)) for i in range(12)]
    samples[5] = ("clip05", BAD_VIDEOS["garbage"][0](), good_meta(5))
    write_shards(samples, root, max_count=4)
    return root, [f"clip{i:02d}" for i in range(12) if i != 5]


def make_loader(source, tokenizer, **kw):
    args = dict(
        tokenizer=tokenizer, preprocess=PRE, batch_size=3, max_len=48, seed=7, shuffle_buffer=4,
        skip_budget=0.5, skip_budget_min_samples=4,
    )
    args.update(kw)
    return VideoTextLoader(source, **args)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert torch.equal(x["video"], y["video"])
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["timestamps"], y["timestamps"])


def test_batches_shapes_padding_and_labels(dataset, tokenizer):
    from videollama.data.tokenizer import encode_example, make_example

    root, good = dataset
    loader = make_loader(root, tokenizer, epochs=1, train=False, task="videoqa", pad_id=0)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert keys == good  # train=False: shard order, no shuffle
    assert loader.skipped == {errors.INVALID_CONTAINER: 1}
    b = batches[0]
    assert b["video"].shape == (3, 4, 3, 16, 16) and b["timestamps"].shape == (3, 4)
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == b["labels"].shape
    # Each row is encode_example's output, right-padded: pad ids, and -100 labels on the pads.
    import random

    from videollama.data.stages import sample_seed

    for row, key in enumerate(b["keys"]):
        i = int(key[4:])
        source = str(sorted(root.glob("*.tar"))[0])
        rng = random.Random(sample_seed(7, 0, source, key))
        ids, labels = encode_example(tokenizer, *make_example(good_meta(i), "videoqa", rng), 48)
        n = len(ids)
        assert b["input_ids"][row, :n].tolist() == list(ids)
        assert b["labels"][row, :n].tolist() == list(labels)
        assert (b["input_ids"][row, n:] == 0).all() and (b["labels"][row, n:] == IGNORE_INDEX).all()


def test_every_text_of_a_clip_becomes_a_row(dataset, tokenizer):
    """texts_per_clip=0: the caption and every question of each clip are rows of one batch, mapped
    back to their clip by video_index, each encoded exactly as encode_example encodes it."""
    from videollama.data.tokenizer import caption_prompt, encode_example, videoqa_prompt

    root, good = dataset
    loader = make_loader(root, tokenizer, epochs=1, train=False, task="caption+videoqa", texts_per_clip=0)
    b = next(iter(loader))
    assert b["video"].shape[0] == 3 and b["input_ids"].shape[0] == 3 * 3  # caption + 2 questions each
    assert b["video_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for clip, key in enumerate(b["keys"]):
        meta = good_meta(int(key[4:]))
        texts = [(caption_prompt(), meta["caption"])] + [(videoqa_prompt(q["question"]), q["answer"]) for q in meta["qa"]]
        for j, (prompt, target) in enumerate(texts):
            ids, labels = encode_example(tokenizer, prompt, target, 48)
            row = 3 * clip + j
            assert b["input_ids"][row, : len(ids)].tolist() == ids
            assert b["labels"][row, : len(labels)].tolist() == labels
            assert (b["labels"][row, len(labels):] == IGNORE_INDEX).all()
    # k texts: k rows per clip, drawn from that clip's own texts; one text: video_index = 0..B-1.
    b2 = next(iter(make_loader(root, tokenizer, epochs=1, train=False, task="caption+videoqa", texts_per_clip=2)))
    assert b2["video_index"].tolist() == [0, 0, 1, 1, 2, 2]
    b1 = next(iter(make_loader(root, tokenizer, epochs=1, train=False, task="videoqa")))
    assert b1["video_index"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="task must be one of"):
        make_loader(root, tokenizer, task="summaries")


def test_resume_with_more_workers_matches_uninterrupted_run(dataset, tokenizer):
    root, good = dataset
    # The uninterrupted reference: 0 workers, two epochs of 11 samples in batches of 3 (8 batches).
    reference = list(make_loader(root, tokenizer, epochs=2))
    assert len(reference) == 8
    epoch0 = [k for b in reference[:4] for k in b["keys"]][:11]
    assert sorted(epoch0) == good and epoch0 != good  # shuffled, complete
    # Workers do not change the batches.
    assert_same_batches(list(make_loader(root, tokenizer, epochs=2, num_workers=2)), reference)

    for k in (2, 4, 5):  # mid-epoch, across the epoch boundary, inside the second epoch
        first = make_loader(root, tokenizer, epochs=2)
        assert_same_batches(take(iter(first), k), reference[:k])
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        resumed = make_loader(root, tokenizer, epochs=2, num_workers=2)
        resumed.load_state_dict(state)
        assert_same_batches(list(resumed), reference[k:])
        assert resumed.skipped == {errors.INVALID_CONTAINER: 2}  # counts carried across the restart


def test_infinite_epochs_reshuffle_deterministically(dataset, tokenizer):
    root, _ = dataset
    a = take(iter(make_loader(root, tokenizer, batch_size=11)), 3)
    b = take(iter(make_loader(root, tokenizer, batch_size=11)), 3)
    assert_same_batches(a, b)
    orders = [batch["keys"] for batch in a]
    assert all(sorted(o) == sorted(orders[0]) for o in orders)  # whole epochs (batch = epoch size)
    assert len({tuple(o) for o in orders}) == 3  # a new order each epoch
    # A different random clip start per epoch too (1 s videos, 0.5 s windows).
    assert not torch.equal(a[0]["timestamps"][0], a[1]["timestamps"][a[1]["keys"].index(orders[0][0])])


@pytest.mark.parametrize("shards_per_rank", ["whole shards", "samples of one shard"])
def test_two_ranks_see_every_sample_once(dataset, tokenizer, shards_per_rank, tmp_path):
    root, good = dataset
    source = root
    if shards_per_rank == "samples of one shard":  # fewer shards than ranks: split by sample
        samples = [(f"one{i}", good_video(i), good_meta(i)) for i in range(5)]
        source, good = write_shards(samples, tmp_path)[0], [f"one{i}" for i in range(5)]
    seen = []
    for rank in range(2):
        loader = make_loader(source, tokenizer, epochs=1, rank=rank, world_size=2, skip_budget=1.0)
        seen.append([k for b in loader for k in b["keys"]])
    assert seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == sorted(good)

    state = make_loader(source, tokenizer, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2 but this loader has world_size=4"):
        make_loader(source, tokenizer, rank=0, world_size=4).load_state_dict(state)


def test_skip_budget_exceeded_is_a_clear_error(tmp_path, tokenizer):
    build_fuzz_shard(tmp_path / "fuzz.tar")
    loader = make_loader(
        tmp_path / "fuzz.tar", tokenizer, preprocess=FUZZ_PRE, train=False, skip_budget=0.01,
        skip_budget_min_samples=5,
    )
    with pytest.raises(SkipBudgetExceeded, match=r"unusable .* more than the skip budget of 1\.0%.*empty_file: 1"):
        list(loader)
    # Within budget the same shard trains: exactly the good samples, every bad one counted.
    good, expected = build_fuzz_shard(tmp_path / "fuzz.tar")
    loader = make_loader(tmp_path / "fuzz.tar", tokenizer, preprocess=FUZZ_PRE, epochs=1, train=False, skip_budget=1.0)
    assert [k for b in loader for k in b["keys"]] == good
    assert loader.skipped == expected


def test_all_bad_data_never_loops_forever(tmp_path, tokenizer):
    write_shards([("x", BAD_VIDEOS["garbage"][0](), good_meta(0))], tmp_path)
    loader = make_loader(tmp_path, tokenizer, skip_budget=1.0)  # infinite epochs, no budget to stop it
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader))


def test_evaluation_jsonl_sources(tmp_path, tokenizer):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        (videos / f"v{i}.mp4").write_bytes(good_video(i))
    qa = tmp_path / "videoqa.jsonl"
    qa.write_text("\n".join(
        json.dumps({"video": f"v{i % 3}.mp4", "question": "what color?", "answer": "red", "kind": "static"})
        for i in range(4)
    ) + "\n" + json.dumps({"video": "gone.mp4", "question": "q?", "answer": "a"}) + "\n")
    loader = make_loader(qa, tokenizer, epochs=1, train=False, task="videoqa", video_root=str(videos), batch_size=2)
    batches = list(loader)
    assert [b["keys"] for b in batches] == [["videoqa.jsonl:1", "videoqa.jsonl:2"], ["videoqa.jsonl:3", "videoqa.jsonl:4"]]
    assert loader.skipped == {errors.MISSING_VIDEO: 1}
    # The answer is what the labels supervise.
    target = tokenizer.decode([t for t in batches[0]["labels"][0].tolist() if t != IGNORE_INDEX])
    assert "red" in target

    captions = tmp_path / "caption.jsonl"
    (tmp_path / "v.mp4").write_bytes(good_video(0))  # relative to the JSONL's folder this time
    captions.write_text(json.dumps({"video": "v.mp4", "captions": ["a red square.", "a square."]}) + "\n")
    (batch,) = list(make_loader(captions, tokenizer, epochs=1, train=False, task="caption", batch_size=4))
    assert batch["video"].shape == (1, 4, 3, 16, 16)
