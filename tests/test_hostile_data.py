"""Hostile text and file input to the training loader, `data shards`, `data inspect` and
`tokenizer train`: every bad item is a counted skip or one clear line, nothing hangs, nothing
outside a root is read, the good samples still come through."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from helpers import FUZZ_PRE, good_meta, good_video
from videollama.cli import main
from videollama.data.loader import VideoTextLoader, iter_samples
from videollama.data.read_policy import ReadPolicy
from videollama.data.stages import Skip
from videollama.data.tokenizer import MAX_TEXTS_PER_CLIP, train_tokenizer

pytestmark = pytest.mark.usefixtures("no_hang")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["a red square moves left number what which way does the go"] * 4, vocab_size=300)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _loader(sources, tok, **kw) -> VideoTextLoader:
    return VideoTextLoader(sources, tokenizer=tok, preprocess=FUZZ_PRE, task=kw.pop("task", "caption+videoqa"),
                           batch_size=1, max_len=96, epochs=1, skip_budget=1.0, train=False, **kw)


def test_bad_shard_members_are_counted_and_good_samples_come_through(tmp_path, tok):
    video = good_video(seed=0)
    qa = {"question": "which way does it go?", "answer": "left", "kind": "temporal"}
    bad_json = {
        "nested": b"[" * 100_000 + b"]" * 100_000,
        "latin1": '{"caption": "caf\xe9"}'.encode("latin-1"),
        "int_question": json.dumps({"caption": "a", "qa": [{**qa, "question": 5}]}).encode(),
        "int_options": json.dumps({"caption": "a", "qa": [{**qa, "options": [1, 2]}]}).encode(),
        "int_answer": json.dumps({"caption": "a", "qa": [{**qa, "answer": 5}]}).encode(),
        "qa_not_dicts": json.dumps({"caption": "a", "qa": ["q", "a"]}).encode(),
        "huge_caption": json.dumps({"caption": "x" * 20_000}).encode(),
    }
    members = [("good.mp4", video), ("good.json", json.dumps(good_meta(0)).encode())]
    for key, meta in bad_json.items():
        members += [(f"{key}.mp4", video), (f"{key}.json", meta)]
    # One sample with 5,000 questions: its rows are capped, not a 5,000-row batch.
    members += [("many.mp4", video), ("many.json", json.dumps({"caption": "a", "qa": [qa] * 5000}).encode())]
    _tar(tmp_path / "s.tar", members)
    loader = _loader(str(tmp_path / "s.tar"), tok, texts_per_clip=0)
    batches = list(loader)
    keys = [b["keys"][0] for b in batches]
    assert keys == ["good", "many"]
    assert batches[1]["input_ids"].shape[0] == MAX_TEXTS_PER_CLIP
    assert loader.skipped == {"invalid_json": 7}


def test_bad_jsonl_lines_and_paths_out_of_the_root_are_counted(tmp_path, tok):
    root = tmp_path / "set"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "ok.mp4").write_bytes(good_video(seed=1))
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(good_video(seed=2))  # a real video: only the root check keeps it out
    (root / "videos" / "link.mp4").symlink_to(secret)
    os.mkfifo(root / "videos" / "fifo.mp4")
    line = {"video": "videos/ok.mp4", "question": "which way?", "answer": "left"}
    lines = [json.dumps(line).encode(),
             b"{" * 50_000,
             b'{"video": "videos/ok.mp4", "question": "caf\xe9?", "answer": "x"}',
             json.dumps({**line, "video": "../secret.mp4"}).encode(),
             json.dumps({**line, "video": str(secret)}).encode(),
             json.dumps({**line, "video": "videos/link.mp4"}).encode(),
             json.dumps({**line, "video": "videos/fifo.mp4"}).encode(),
             json.dumps(line).encode() + b" " * (2 << 20)]
    (root / "qa.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    loader = _loader(str(root / "qa.jsonl"), tok, task="videoqa")
    assert len(list(loader)) == 1
    assert loader.skipped == {"invalid_json": 3, "outside_root": 3, "not_a_file": 1}
    # Opting out of the root check is explicit, and then the three outside paths decode.
    loader = _loader(str(root / "qa.jsonl"), tok, task="videoqa", policy=ReadPolicy(allow_outside_root=True))
    assert len(list(loader)) == 4


@pytest.mark.parametrize("special", ["fifo", "dev_zero", "directory", "loop"])
def test_special_files_as_sources_are_skipped_not_opened(tmp_path, tok, special):
    for suffix in (".tar", ".jsonl"):
        path = tmp_path / f"{special}{suffix}"
        if special == "fifo":
            os.mkfifo(path)
        elif special == "dev_zero":
            path.symlink_to("/dev/zero")
        elif special == "directory":
            path.mkdir()
            continue  # a folder is read as a folder of shards: tested elsewhere
        else:
            path.symlink_to(tmp_path / f"other{suffix}")
            (tmp_path / f"other{suffix}").symlink_to(path)
        if special == "loop":  # a link loop does not exist as far as the source list is concerned
            with pytest.raises(FileNotFoundError, match="no such file or folder"):
                list(iter_samples(str(path), preprocess=FUZZ_PRE))
            continue
        items = list(iter_samples(str(path), preprocess=FUZZ_PRE))
        assert [type(i) for i in items] == [Skip] and items[0].reason == "not_a_file", items


def test_data_shards_skips_bad_manifest_lines_and_paths_out_of_the_folder(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.mp4").write_bytes(good_video(seed=3))
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(good_video(seed=4))
    (root / "link.mp4").symlink_to(outside)
    os.mkfifo(root / "fifo.mp4")
    lines = [json.dumps({"video": "ok.mp4", "caption": "fine"}).encode(),
             json.dumps({"video": "../outside.mp4"}).encode(),
             json.dumps({"video": str(outside)}).encode(),
             json.dumps({"video": "link.mp4"}).encode(),
             json.dumps({"video": "fifo.mp4"}).encode(),
             b"[" * 100_000,
             b'{"video": "ok.mp4", "caption": "caf\xe9"}']
    (root / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert main(["data", "shards", "--input", str(root / "m.jsonl"), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 samples" in printed
    assert "skipped: invalid_json=2, not_a_file=1, outside_root=3" in printed


def test_data_shards_does_not_read_a_sidecar_that_links_out(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    (root / "v.mp4").write_bytes(good_video(seed=5))
    (tmp_path / "secret.txt").write_text("SECRET-OUTSIDE")
    (root / "v.txt").symlink_to(tmp_path / "secret.txt")
    (root / "w.mp4").write_bytes(good_video(seed=6))
    os.mkfifo(root / "w.json")
    assert main(["data", "shards", "--input", str(root), "--out", str(tmp_path / "o")]) == 0
    assert "skipped: not_a_file=1, outside_root=1" in capsys.readouterr().out
    for shard in (tmp_path / "o").glob("*.tar"):
        assert b"SECRET-OUTSIDE" not in shard.read_bytes()


def test_data_inspect_counts_what_it_cannot_read(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.tar")
    (tmp_path / "bad.jsonl").write_bytes(b'{"video": "/etc/passwd", "question": "q?", "answer": "a"}\n\xff\xfe\n')
    assert main(["data", "inspect", str(tmp_path / "fifo.tar"), str(tmp_path / "bad.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 0 and result["skipped"] == {"invalid_json": 1, "not_a_file": 1, "outside_root": 1}


def test_tokenizer_train_refuses_bad_input_in_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "nested.jsonl").write_bytes(b"[" * 100_000 + b"\n")
    (tmp_path / "typed.jsonl").write_text(json.dumps({"qa": [{"question": 5}, "x"]}) + "\n")
    for name, says in (("fifo.jsonl", "is a FIFO"), ("nested.jsonl", "nested too deeply"),
                       ("typed.jsonl", "each 'qa' item must be an object")):
        assert main(["tokenizer", "train", "--data", str(tmp_path / name), "--out", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("videollama: error:") and says in err and "\n" not in err, err


def test_safe_reader_refuses_a_bytes_item_at_read_time(tmp_path):
    """The last line of defence, below the metadata pre-check: the reader itself never unpickles."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from videollama.train.safe_dcp import SafeReader

    dcp.save({"x": {"lr": 0.1}}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    state = {"x": {"lr": 0.0}}
    with pytest.raises(CheckpointException, match="'x.lr' is stored as pickled bytes"):  # DCP wraps our refusal
        dcp.load(state, storage_reader=SafeReader(str(tmp_path / "c")), no_dist=True)
    assert state == {"x": {"lr": 0.0}}  # nothing was unpickled into it


def test_recipes_and_configs_are_read_bounded(tmp_path, capsys):
    from videollama.config import VideoLlamaConfig
    from videollama.train.recipe import TrainConfig

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))
    (tmp_path / "bomb.yaml").write_text(bomb)  # 9^10 strings, if expanded
    (tmp_path / "big.yaml").write_text("# padding\n" * 200_000 + "max_steps: 3\n")  # 2 MB
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 200 + "]" * 200 + "\n")
    for name, says in [("bomb.yaml", "aliases (*name) are not allowed"), ("big.yaml", "over the 1048576-byte cap"),
                       ("list.yaml", "must be a YAML mapping"), ("deep.yaml", "nested")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            TrainConfig.from_yaml(tmp_path / name)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(ValueError, match="over the 1048576-byte cap"):
        VideoLlamaConfig.load(tmp_path / "m")


def test_a_nul_byte_in_a_data_path_is_a_counted_skip(tmp_path, tok, capsys):
    # Every os call on such a path raises ValueError ("embedded null byte"), which ended the run.
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.mp4").write_bytes(good_video(seed=5))
    line = {"video": "ok.mp4", "caption": "fine", "question": "which way?", "answer": "left"}
    lines = [json.dumps(line), json.dumps({**line, "video": "ok\u0000.mp4"}), json.dumps({**line, "video": "\u0000"}),
             json.dumps(line)]
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "shards", "--input", str(root / "m.jsonl"), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 samples" in printed and "skipped: not_a_file=2" in printed
    loader = _loader(str(root / "m.jsonl"), tok, task="videoqa")
    assert len(list(loader)) == 2 and loader.skipped == {"not_a_file": 2}
    for argv in (["data", "shards", "--input", str(root / "m\0.jsonl"), "--out", str(tmp_path / "o2")],
                 ["generate", "--model", str(root), "--prompt", "hi", "--video", "clip\0.mp4"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("videollama: error:") and "\n" not in err and "embedded null byte" not in err, err


def test_one_read_policy_bounds_every_decode_of_the_loader(tmp_path, tok):
    # The policy handed to the loader reaches stage 8's decoders: with a frame cap of 1 the clip
    # (and the decoded-clip cache's grid) stops as a counted timeout; the default decodes it.
    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "ok.mp4").write_bytes(good_video(seed=0))
    (root / "qa.jsonl").write_text(json.dumps({"video": "videos/ok.mp4", "question": "which way?",
                                               "answer": "left"}) + "\n")
    assert len(list(_loader(str(root / "qa.jsonl"), tok, task="videoqa"))) == 1
    for cache in (None, tmp_path / "cache"):
        loader = _loader(str(root / "qa.jsonl"), tok, task="videoqa", cache_dir=cache,
                         policy=ReadPolicy(max_decoded_frames=1))
        assert list(loader) == [] and loader.skipped == {"timeout": 1}, cache


@pytest.mark.parametrize("field, value", [("max_decoded_frames", 0), ("clip_time_budget_s", -1.0),
                                          ("video_time_budget_s", float("inf"))])
def test_a_read_policy_out_of_range_is_refused_by_name(field, value):
    from videollama.train.recipe import TrainConfig

    with pytest.raises(ValueError, match=field):
        ReadPolicy(**{field: value})
    with pytest.raises(ValueError, match=f"data.{field}"):
        TrainConfig.from_dict({"data": {"sources": ["x"], field: value}}).validate()


def test_the_loader_takes_its_config_section(tmp_path, tok):
    # train/build.py hands the recipe's data section over whole: its settings and its read policy arrive.
    from videollama.train.recipe import DataSection

    (tmp_path / "qa.jsonl").write_text(json.dumps({"video": "v.mp4", "question": "which way?", "answer": "left"}) + "\n")
    section = DataSection(sources=[str(tmp_path / "qa.jsonl")], task="videoqa", texts_per_clip=0,
                          allow_outside_root=True, max_decoded_frames=7, cache_dir=str(tmp_path / "cache"))
    loader = VideoTextLoader.from_section(section, tokenizer=tok, preprocess=FUZZ_PRE, batch_size=2, max_len=96)
    assert loader.plan.policy == section.read_policy() == ReadPolicy(allow_outside_root=True, max_decoded_frames=7)
    assert (loader.plan.task, loader.plan.texts_per_clip, loader.plan.cache_dir) == ("videoqa", 0, str(tmp_path / "cache"))
    assert loader.plan.train and loader.batch_size == 2
