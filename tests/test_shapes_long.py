"""Shapes-Long against docs/SHAPES.md "Long mode": sampling, text, pixels of decoded MP4s, the synth-long CLI.

Positions, timing rules and rounding are re-derived here from the page (own position formula,
Decimal rounding), not taken from the generator.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal

import av
import numpy as np
import pytest

from videollama.data import evalset, shapes
from videollama.data import shapes_long as sl
from videollama.data import shapes_long_synth as synth
from videollama.data.shapes_long import LongObject, LongSpec

PALETTE = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230),
           "yellow": (230, 210, 40), "purple": (150, 60, 200), "white": (235, 235, 235)}  # fmt: skip
UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def position(o: LongObject, t):
    """SHAPES.md: still before the event, constant speed during [start, end), still after."""
    moved = o.speed * np.clip(np.asarray(t, dtype=float) - o.start_s, 0, o.end_s - o.start_s)
    return o.x + UNIT[o.motion][0] * moved, o.y + UNIT[o.motion][1] * moved


def tenths(seconds: float) -> int:
    value = round(seconds * 10)
    assert abs(seconds * 10 - value) < 1e-9, f"{seconds} is not a whole number of tenths"
    return value


def half_up(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def check_spec(spec: LongSpec) -> None:
    """Every rule of the page that one spec can break."""
    T = spec.duration_s
    assert 16 <= spec.background <= 64
    assert 1 <= len(spec.objects) <= 3
    assert len({(o.color, o.shape) for o in spec.objects}) == len(spec.objects)
    assert [o.x for o in spec.objects] == sorted(o.x for o in spec.objects)
    events = sorted((o for o in spec.objects if o.motion != "still"), key=lambda o: o.start_s)
    assert 1 <= len(events) <= len(spec.objects)
    for o in spec.objects:
        assert 28 <= o.size <= 44 and isinstance(o.size, int)
        if o.motion == "still":
            assert o.speed == 0.0 and o.start_s == o.end_s == 0.0
            continue
        assert o.motion in ("left", "right", "up", "down") and 12.0 <= o.speed <= 24.0
        assert 30 <= tenths(o.end_s) - tenths(o.start_s) <= 60  # 3.0..6.0 s, whole tenths
    # Events never overlap: 2 s clear at each end and at least 2 s between events.
    assert tenths(events[0].start_s) >= 20 and tenths(events[-1].end_s) <= 10 * T - 20
    for a, b in zip(events, events[1:]):
        assert tenths(b.start_s) - tenths(a.end_s) >= 20
    # Every frame: each whole object inside the central square, no two bounding boxes overlapping.
    times = np.arange(10 * T) / 10
    boxes = []
    for o in spec.objects:
        x, y = position(o, times)
        assert x.min() >= 40 and x.max() + o.size <= 280 and y.min() >= 0 and y.max() + o.size <= 240
        boxes.append((x, y, o.size))
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            (ax, ay, a), (bx, by, b) = boxes[i], boxes[j]
            assert ((ax + a <= bx) | (bx + b <= ax) | (ay + a <= by) | (by + b <= ay)).all(), spec


def test_sampling_distributions_and_constraints():
    rng = random.Random(11)
    specs = [sl.sample_long_spec(rng, rng.choice([20, 25, 30, 60, 120])) for _ in range(1500)]
    for spec in specs:
        check_spec(spec)
    counts = Counter(len(s.objects) for s in specs)
    assert all(abs(counts[n] / 1500 - 1 / 3) < 0.06 for n in (1, 2, 3)), counts
    # k is uniform in 1..n: among three-object videos each k has a third.
    ks = Counter(len(s.events()) for s in specs if len(s.objects) == 3)
    assert all(abs(ks[k] / ks.total() - 1 / 3) < 0.08 for k in (1, 2, 3)), ks
    events = [e for s in specs for e in s.events()]
    directions = Counter(e.motion for e in events)
    assert all(abs(directions[d] / len(events) - 0.25) < 0.04 for d in ("left", "right", "up", "down"))
    assert abs(np.mean([e.speed for e in events]) - 18.0) < 0.3
    lengths = Counter(tenths(e.end_s) - tenths(e.start_s) for e in events)
    assert set(lengths) == set(range(30, 61))  # every tenth from 3.0 to 6.0 s
    # Rounding a uniform draw gives the end points half the weight of the inner values.
    inner = np.mean([lengths[t] for t in range(31, 60)])
    assert 0.3 < (lengths[30] + lengths[60]) / 2 / inner < 0.7, lengths
    # A single event's start is uniform over [2, T - duration - 2].
    singles = [(s.duration_s, s.events()[0]) for s in specs if len(s.events()) == 1]
    where = np.array([(e.start_s - 2) / (T - (e.end_s - e.start_s) - 4) for T, e in singles])
    assert abs(where.mean() - 0.5) < 0.04 and where.min() < 0.02 and where.max() > 0.98
    # Positions use the whole allowed range.
    xs = np.array([o.x for s in specs for o in s.objects if o.motion == "still"])
    assert xs.min() < 45 and xs.max() > 230


@pytest.mark.parametrize("duration", [20, 30, 60, 600])
def test_needle_split_start_formula(duration):
    rng = random.Random(duration)
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0, 0.1):
        for _ in range(40):
            spec = sl.sample_long_spec(rng, duration, depth=depth)
            check_spec(spec)
            (event,) = spec.events()
            length = Decimal(str(event.end_s)) - Decimal(str(event.start_s))
            want = half_up(2 + Decimal(str(depth)) * (duration - length - 4))
            assert Decimal(str(event.start_s)) == want, (depth, event)
            assert spec.depth == depth


def test_rounding_is_half_up_on_exact_ties():
    # depth 0.75 of a free time of 26.2 s is 19.65 s: the start is 2 + 19.65 = 21.65 -> 21.7.
    assert sl.round_tenths(0.75 * 262) == 197 and sl.round_tenths(0.25 * 262) == 66
    assert sl.round_tenths(196.49) == 196


def test_bad_durations_and_depths_are_refused():
    for bad in (19, 3601, 30.5):
        with pytest.raises(ValueError, match="duration"):
            sl.sample_long_spec(random.Random(0), bad)
    with pytest.raises(ValueError, match="depth"):
        sl.sample_long_spec(random.Random(0), 30, depth=1.5)


def _hand_spec() -> LongSpec:
    """Two events in a 20 s video; objects of distinct colours, listed out of x order on purpose."""
    return LongSpec(duration_s=20, background=30, objects=(
        LongObject("blue", "circle", 36, 200.0, 150.0, "up", 15.0, 10.0, 14.4),
        LongObject("red", "square", 30, 60.0, 20.0, "right", 20.0, 3.0, 7.0),
        LongObject("green", "triangle", 40, 100.0, 180.0),
    ))  # fmt: skip


def test_caption_and_questions_of_hand_made_specs():
    spec = _hand_spec()
    check_spec(LongSpec(20, 30, tuple(sorted(spec.objects, key=lambda o: o.x))))
    assert sl.caption(spec) == ("the red square moves right from 3.0 to 7.0 seconds, "
                                "then the blue circle moves up from 10.0 to 14.4 seconds.")
    spec = LongSpec(20, 30, tuple(sorted(spec.objects, key=lambda o: o.x)))  # as the generator lists them
    assert sl.questions(spec) == [
        {"question": "which way does the red square move?", "answer": "right", "kind": "needle"},
        {"question": "which way does the green triangle move?", "answer": "still", "kind": "needle"},
        {"question": "which way does the blue circle move?", "answer": "up", "kind": "needle"},
        {"question": "which object moves right?", "answer": "the red square", "kind": "needle"},
        {"question": "which object moves up?", "answer": "the blue circle", "kind": "needle"},
        {"question": "which object moves first?", "answer": "the red square", "kind": "order"},
        {"question": "which object moves last?", "answer": "the blue circle", "kind": "order"},
        {"question": "how many objects move?", "answer": "two", "kind": "count"},
        {"question": "when does the red square move?", "answer": "from 3.0 to 7.0 seconds", "kind": "grounding"},
        {"question": "when does the blue circle move?", "answer": "from 10.0 to 14.4 seconds", "kind": "grounding"},
    ]
    assert sl.grounding_items(spec) == [
        {"question": "when does the red square move?", "segments": [[3.0, 7.0]]},
        {"question": "when does the blue circle move?", "segments": [[10.0, 14.4]]},
    ]
    # The page's own example caption.
    example = LongSpec(60, 20, (LongObject("red", "circle", 30, 200.0, 50.0, "left", 12.0, 12.0, 16.5),
                                LongObject("blue", "square", 30, 60.0, 150.0, "up", 12.0, 30.2, 34.0)))
    assert sl.caption(example) == ("the red circle moves left from 12.0 to 16.5 seconds, "
                                   "then the blue square moves up from 30.2 to 34.0 seconds.")
    # Two events the same way: no "which object moves left?"; one event: no order questions.
    same_way = LongSpec(30, 20, (LongObject("red", "circle", 30, 100.0, 10.0, "left", 12.0, 2.0, 5.0),
                                 LongObject("red", "square", 30, 150.0, 150.0, "left", 12.0, 9.0, 12.0)))
    asked = {q["question"]: q["answer"] for q in sl.questions(same_way)}
    assert "which object moves left?" not in asked and asked["how many objects move?"] == "two"
    one = LongSpec(30, 20, (LongObject("white", "square", 30, 100.0, 10.0, "down", 12.0, 2.0, 5.0),))
    assert [q["kind"] for q in sl.questions(one)] == ["needle", "needle", "count", "grounding"]


def test_incremental_frames_equal_frames_drawn_from_scratch():
    specs = [_hand_spec()] + [sl.sample_long_spec(random.Random(s), 24) for s in range(3)]
    for spec in specs:
        previous, num_changed, k = None, 0, -1
        for k, (frame, changed) in enumerate(sl.iter_frames(spec)):  # the buffer is reused: compare now
            drawn = sl.render_frame(spec, k / 10)
            assert np.array_equal(frame, drawn), k
            if previous is not None and not changed:
                assert np.array_equal(drawn, previous), f"frame {k} differs but was not marked changed"
            previous, num_changed = drawn, num_changed + changed
        assert k + 1 == spec.num_frames
        # Only the frames of events and the first frame after each event (and at t = 0) are new.
        moving = sum(round(10 * (e.end_s - e.start_s)) for e in spec.events())
        assert num_changed == moving + len(spec.events()) + 1


def decode(mp4: bytes) -> tuple[np.ndarray, list[float], float]:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 10 and (stream.width, stream.height) == (320, 240)
        frames, times = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * frame.time_base))
        return np.stack(frames), times, container.duration / av.time_base


def centroid_of(frame: np.ndarray, color: str) -> np.ndarray:
    """Centre of the pixels near ``color`` (codec blur is symmetric, so edges cancel out)."""
    near = np.abs(frame.astype(int) - PALETTE[color]).sum(-1) < 90
    rows, cols = np.nonzero(near)
    assert rows.size > 200, f"no {color} object found"
    return np.array([cols.mean(), rows.mean()]) + 0.5


def test_decoded_video_shows_the_objects_where_the_spec_puts_them():
    spec = _hand_spec()
    frames, times, duration = decode(sl.encode_video(spec))
    assert frames.shape == (200, 240, 320, 3)
    assert times == pytest.approx([k / 10 for k in range(200)])
    assert duration == pytest.approx(20.0, abs=0.11)
    by_color = {o.color: o for o in spec.objects}
    # Before, during and after each event; t = 7.0 and 14.4 are the events' ends.
    for k in (0, 29, 30, 50, 69, 70, 99, 120, 144, 150, 199):
        for color, o in by_color.items():
            x, y = position(o, k / 10)
            want = np.array([x + o.size / 2, y + (2 * o.size / 3 if o.shape == "triangle" else o.size / 2)])
            got = centroid_of(frames[k], color)
            assert np.abs(got - want).max() < 1.0, f"{color} at frame {k}: {got} vs {want}"
    # Everything else is the background.
    painted = np.abs(frames[100].astype(int) - 30).max(-1) > 40
    assert painted.sum() == pytest.approx(30 * 30 + np.pi * 18**2 + 40 * 40 / 2, rel=0.08)


def _synth(out, *extra, workers=1, seed=5):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args(["--out", str(out), "--train", "2", "--duration", "20:24", "--durations", "20",
                              "--depths", "0,1", "--per-cell", "1", "--per-duration", "1", "--seed", str(seed),
                              "--workers", str(workers), *extra])
    assert synth.run(args) == 0


def _read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_synth_long_writes_the_files_of_the_page(tmp_path):
    _synth(tmp_path)
    with tarfile.open(tmp_path / "train" / "shapes-long-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.rsplit(".", 1)[0] for name in members})
    assert keys == ["long-train-0000000", "long-train-0000001"]
    train_specs = set()
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        spec = LongSpec.from_dict(meta["spec"])
        train_specs.add(spec)
        assert meta["source"] == "shapes-long-v1" and meta["fps"] == 10 and 20 <= meta["duration_s"] <= 24
        assert meta["caption"] == sl.caption(spec) and meta["qa"] == sl.questions(spec)
        assert meta["num_frames"] == 10 * meta["duration_s"]
        grounding = [q for q in meta["qa"] if q["kind"] == "grounding"]
        assert [q["answer"] for q in grounding] == [f"from {e['start_s']:.1f} to {e['end_s']:.1f} seconds"
                                                   for e in meta["events"]]
        frames, _, _ = decode(members[f"{key}.mp4"])
        assert len(frames) == meta["num_frames"]

    needle = tmp_path / "eval" / "needle"
    qa = _read_lines(needle / "videoqa.jsonl")
    assert {q["kind"] for q in qa} <= {"needle", "count"}  # k = 1: no order questions
    assert {(q["duration_s"], q["depth"]) for q in qa} == {(20, 0.0), (20, 1.0)}
    for i, line in enumerate(qa):  # the evaluation-set reader accepts every line
        item = evalset.parse_eval_line(line, f"videoqa.jsonl:{i + 1}")
        assert item.extra["duration_s"] == 20 and (needle / item.video).is_file()
    specs = {rec["video"]: LongSpec.from_dict(rec["spec"]) for rec in _read_lines(needle / "specs.jsonl")}
    grounding = _read_lines(needle / "grounding.jsonl")
    assert len(grounding) == 2
    for line in grounding:
        assert set(line) == {"video", "question", "segments", "duration_s", "depth"}
        (event,) = specs[line["video"]].events()
        assert line["segments"] == [[event.start_s, event.end_s]]
        assert line["depth"] == specs[line["video"]].depth
    whole = tmp_path / "eval" / "whole"
    (line,) = _read_lines(whole / "caption.jsonl")
    assert "depth" not in line and line["duration_s"] == 20
    assert all("depth" not in q for q in _read_lines(whole / "videoqa.jsonl"))
    whole_specs = {LongSpec.from_dict(r["spec"]) for r in _read_lines(whole / "specs.jsonl")}
    assert not (set(specs.values()) | whole_specs) & train_specs


def test_synth_long_output_does_not_depend_on_workers(tmp_path):
    _synth(tmp_path / "one", workers=1)
    _synth(tmp_path / "two", workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) == 1 + 6 + 5  # the train shard; needle: 4 line files + 2 videos; whole: 4 + 1 video
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_an_evaluation_video_never_repeats_a_training_video(monkeypatch, tmp_path):
    # Force a collision: the training split holds the first video the whole split would draw.
    (_, first_whole), = synth.whole_specs(5, [20], 1, set())
    monkeypatch.setattr(synth, "train_specs", lambda seed, count, durations: [("long-train-0000000", first_whole)])
    _synth(tmp_path, "--per-duration", "2")
    whole = _read_lines(tmp_path / "eval" / "whole" / "specs.jsonl")
    assert [r["video"] for r in whole] == ["videos/whole-0020s-0001.mp4", "videos/whole-0020s-0002.mp4"]
    assert first_whole not in {LongSpec.from_dict(r["spec"]) for r in whole}


def test_specs_are_deterministic_and_round_trip():
    a = [sl.sample_long_spec(random.Random(3), 30) for _ in range(3)]
    assert a == [sl.sample_long_spec(random.Random(3), 30) for _ in range(3)]
    assert LongSpec.from_dict(json.loads(json.dumps(a[0].to_dict()))) == a[0]
    assert synth.train_specs(1, 3, synth.TrainDurations("20:600")) == synth.train_specs(1, 3, synth.TrainDurations("20:600"))


def test_duration_options():
    rng = random.Random(0)
    ranged = synth.TrainDurations("30:600")
    drawn = [ranged.draw(rng) for _ in range(400)]
    assert min(drawn) >= 30 and max(drawn) <= 600 and len(set(drawn)) > 200
    listed = synth.TrainDurations("30,60")
    assert {listed.draw(rng) for _ in range(50)} == {30, 60}
    for bad in ("600:30", "10:60", "abc", "30:60:90"):
        with pytest.raises(ValueError):
            synth.TrainDurations(bad)
    assert synth.parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("0,1.5", "0.25,0.251", ""):
        with pytest.raises(ValueError):
            synth.parse_depths(bad)


def test_incremental_encoding_gives_the_bytes_of_encoding_every_rgb_frame():
    spec = _hand_spec()
    every_frame = shapes.encode_mp4((frame.copy() for frame, _ in sl.iter_frames(spec)), fps=10)
    assert sl.encode_video(spec) == every_frame
