"""The Shapes corpus against SHAPES.md: pixels measured from decoded MP4s, text, sampling, synth CLI.

The text checks re-derive captions and answers from what the decoded video shows
(segmentation of PyAV's frames), not from the spec the generator used.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from collections import Counter

import av
import numpy as np
import pytest
from scipy import ndimage

from videollama.data import shapes, shapes_synth
from videollama.data.shapes import ClipSpec, ObjectSpec

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}


def decode(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 25
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def measure_objects(frame: np.ndarray) -> dict[tuple[str, str], dict]:
    """Segment one decoded frame: {(color, shape): {left, centroid, area}} per visible object."""
    rgb = frame.astype(np.int32)
    background = np.median(rgb.reshape(-1, 3), axis=0)
    foreground = np.abs(rgb - background).max(axis=-1) > 40
    names = list(PALETTE)
    dist = np.stack([np.abs(rgb - np.array(PALETTE[n])).sum(-1) for n in names])  # (6, H, W)
    nearest = dist.argmin(0)
    found = {}
    for ci, color in enumerate(names):
        labels, n = ndimage.label(foreground & (nearest == ci))
        for lab in range(1, n + 1):
            component = labels == lab
            rows, cols = np.nonzero(component)
            if rows.size < 100:  # chroma-blurred edge specks
                continue
            # Sub-pixel centroid: weight each pixel near the component by how far its colour
            # has gone from the background towards the object's colour (codec blur is symmetric).
            near = ndimage.binary_dilation(component, iterations=3)
            direction = np.array(PALETTE[color]) - background
            weight = np.clip((rgb[near] - background) @ direction / (direction @ direction), 0, 1)
            near_rows, near_cols = np.nonzero(near)
            centroid = np.array([near_cols @ weight, near_rows @ weight]) / weight.sum() + 0.5
            height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            fill = rows.size / (height * width)
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            assert (color, shape) not in found, f"two {color} {shape}s measured"
            found[(color, shape)] = {
                "left": cols.min(),
                "top": rows.min(),
                "centroid": centroid,
                "area": rows.size,
                "side": (width + height) / 2,
            }
    return found


def expected_centroid(obj: ObjectSpec, t: float) -> np.ndarray:
    x, y = obj.position(t)
    s = obj.size
    # A filled triangle's centroid is 2/3 of the way from apex to base.
    return np.array([x + s / 2, y + (2 * s / 3 if obj.shape == "triangle" else s / 2)])


def spoken_caption(objects: list[tuple[str, str, str]]) -> str:
    """The SHAPES.md caption rule, written independently: [(color, shape, motion)] left to right."""
    phrase = {"still": "stays still"} | {d: f"moves {d}" for d in ("left", "right", "up", "down")}
    parts = [f"a {c} {s} {phrase[m]}" for c, s, m in objects]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def spoken_answers(objects: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    """{question: (answer, kind)} per the SHAPES.md table, from measured objects."""
    qa = {"how many objects are there?": (["one", "two", "three"][len(objects) - 1], "static")}
    colors = Counter(c for c, _, _ in objects)
    shape_counts = Counter(s for _, s, _ in objects)
    motions = Counter(m for _, _, m in objects)
    for c, s, m in objects:
        if shape_counts[s] == 1:
            qa[f"what color is the {s}?"] = (c, "static")
        if colors[c] == 1:
            qa[f"what shape is the {c} object?"] = (s, "static")
        qa[f"which way does the {c} {s} move?"] = (m, "temporal")
        if m != "still" and motions[m] == 1:
            qa[f"which object moves {m}?"] = (f"the {c} {s}", "temporal")
    return qa


def test_shapes_example_from_the_spec_page():
    spec = ClipSpec(
        background=30,
        objects=(
            # Deliberately not in x order: the text must sort objects left to right itself.
            ObjectSpec("blue", "circle", 30, "still", 0.0, 150.0, 100.0),
            ObjectSpec("red", "square", 30, "left", 20.0, 140.0, 20.0),
        ),
    )
    assert shapes.caption(spec) == "a red square moves left and a blue circle stays still."
    assert shapes.questions(spec) == [
        {"question": "what color is the square?", "answer": "red", "kind": "static"},
        {"question": "what color is the circle?", "answer": "blue", "kind": "static"},
        {"question": "what shape is the red object?", "answer": "square", "kind": "static"},
        {"question": "what shape is the blue object?", "answer": "circle", "kind": "static"},
        {"question": "how many objects are there?", "answer": "two", "kind": "static"},
        {"question": "which way does the red square move?", "answer": "left", "kind": "temporal"},
        {"question": "which way does the blue circle move?", "answer": "still", "kind": "temporal"},
        {"question": "which object moves left?", "answer": "the red square", "kind": "temporal"},
    ]


def test_shapes_uniqueness_conditions():
    # Two red objects, two squares, two moving right: none of those questions may appear.
    spec = ClipSpec(
        background=20,
        objects=(
            ObjectSpec("red", "square", 30, "right", 15.0, 41.0, 10.0),
            ObjectSpec("red", "circle", 30, "right", 15.0, 41.0, 60.0),
            ObjectSpec("green", "square", 30, "up", 15.0, 200.0, 150.0),
        ),
    )
    asked = {q["question"]: q["answer"] for q in shapes.questions(spec)}
    assert asked == {
        "what color is the circle?": "red",
        "what shape is the green object?": "square",
        "how many objects are there?": "three",
        "which way does the red square move?": "right",
        "which way does the red circle move?": "right",
        "which way does the green square move?": "up",
        "which object moves up?": "the green square",
    }
    assert shapes.caption(spec).startswith("a red square moves right, a red circle moves right and ")


def test_rasterisation_is_exact_at_pixel_centres():
    square = ObjectSpec("green", "square", 30, "right", 20.0, 100.3, 50.6)
    triangle = ObjectSpec("white", "triangle", 40, "up", 12.5, 200.0, 150.0)
    spec = ClipSpec(background=20, objects=(square, triangle))
    frames = shapes.render_frames(spec)
    assert frames.shape == (125, 240, 320, 3) and frames.dtype == np.uint8
    # Frame 25 is t = 1 s: the square has moved 20 px right; pixel (i, j) is in when its
    # centre (j + 0.5, i + 0.5) is inside [x, x + 30) x [y, y + 30).
    for k, x0 in [(0, 100), (25, 120), (124, 199)]:  # 100.3 + 20 * 4.96 = 199.5
        rows, cols = np.nonzero((frames[k] == PALETTE["green"]).all(-1))
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (51, 80, x0, x0 + 29), k
        assert rows.size == 30 * 30
    # The triangle points up. At t = 2 s it has moved 25 px up: apex at (220, 125). Row 125's
    # centres are 0.5 px below the apex, where the triangle is 0.5 px wide: no centre inside;
    # row 126 (1.5 px down, 1.5 px wide) holds the two centres 219.5 and 220.5; the base row
    # 164 (39.5 px down, 39.5 px wide) holds 40.
    rows, cols = np.nonzero((frames[50] == PALETTE["white"]).all(-1))
    assert rows.min() == 126 and rows.max() == 164
    assert (rows == 126).sum() == 2 and (rows == 164).sum() == 40
    assert abs(cols.mean() + 0.5 - 220.0) < 0.1
    # Everything else is the background level.
    painted = (frames[50] != 20).any(-1)
    assert painted.sum() == 900 + rows.size


def _specs_for_pixel_test(n: int) -> list[ClipSpec]:
    """The first seeded batch of ``n`` clips in which every motion, shape and count appears."""
    for seed in range(100):
        rng = random.Random(seed)
        specs = [shapes.sample_clip_spec(rng) for _ in range(n)]
        objects = [o for s in specs for o in s.objects]
        if (
            {o.motion for o in objects} == set(shapes.MOTIONS)
            and {o.shape for o in objects} == set(shapes.SHAPES)
            and {len(s.objects) for s in specs} == {1, 2, 3}
        ):
            return specs
    raise AssertionError("no seed covers every motion and shape")


@pytest.mark.parametrize("spec", _specs_for_pixel_test(6), ids=lambda s: f"{len(s.objects)}obj")
def test_decoded_pixels_match_motion_order_and_text(spec):
    frames = decode(shapes.encode_mp4(shapes.render_frames(spec)))
    assert frames.shape == (125, 240, 320, 3)

    times = [0, 50, 100, 124]
    measured = {k: measure_objects(frames[k]) for k in times}
    pairs = {(o.color, o.shape) for o in spec.objects}
    for k in times:
        assert set(measured[k]) == pairs, f"frame {k}: measured {set(measured[k])}, spec has {pairs}"
        # Every coloured pixel lies inside the central 240x240 square.
        fg = np.abs(frames[k].astype(int) - spec.background).max(-1) > 40
        assert not fg[:, :38].any() and not fg[:, 282:].any()

    seen = []
    for obj in spec.objects:
        key = (obj.color, obj.shape)
        for k in times:
            got = measured[k][key]["centroid"]
            want = expected_centroid(obj, k / 25)
            # Rasterising to whole pixels moves the centroid by up to 0.5 px; the codec adds a little.
            assert np.abs(got - want).max() < 0.75, f"{key} frame {k}: centroid {got} vs {want}"
            assert abs(measured[k][key]["side"] - obj.size) < 2.5
        # Direction and speed from the pixels alone, over 124 frames.
        dx, dy = measured[124][key]["centroid"] - measured[0][key]["centroid"]
        speed = np.hypot(dx, dy) / (124 / 25)
        if speed < 0.5:
            motion = "still"
        elif abs(dx) > abs(dy):
            motion = "right" if dx > 0 else "left"
        else:
            motion = "down" if dy > 0 else "up"
        assert motion == obj.motion
        assert abs(speed - obj.speed) < 0.4, f"{key}: measured {speed:.2f} px/s, spec {obj.speed:.2f}"
        seen.append((measured[0][key]["left"], obj.color, obj.shape, motion))

    # Left-to-right order: caption and spec must list objects as the first frame shows them.
    by_pixels = [(c, s, m) for _, c, s, m in sorted(seen)]
    lefts = sorted(left for left, *_ in seen)
    if all(b - a >= 2 for a, b in zip(lefts, lefts[1:])):  # measured edges are +-1 px
        assert [(o.color, o.shape, o.motion) for o in spec.objects] == by_pixels
        assert shapes.caption(spec) == spoken_caption(by_pixels)
    answers = spoken_answers(by_pixels)
    got = shapes.questions(spec)
    assert {q["question"]: (q["answer"], q["kind"]) for q in got} == answers
    assert len(got) == len(answers)


def test_sampling_distribution_and_constraints():
    rng = random.Random(7)
    specs = [shapes.sample_clip_spec(rng) for _ in range(600)]
    objects = [o for s in specs for o in s.objects]
    motions = Counter(o.motion for o in objects)
    for m in shapes.MOTIONS:  # 1/5 each; +-0.05 is over 4 standard deviations at ~1200 objects
        assert abs(motions[m] / len(objects) - 0.2) < 0.05, motions
    counts = Counter(len(s.objects) for s in specs)
    assert set(counts) == {1, 2, 3} and all(abs(c / 600 - 1 / 3) < 0.07 for c in counts.values())
    assert {o.color for o in objects} == set(PALETTE)
    times = np.arange(126) / 25  # every frame, and the end of the 5 s
    for s in specs:
        assert 16 <= s.background <= 64
        assert [o.x for o in s.objects] == sorted(o.x for o in s.objects)
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
        boxes = []
        for o in s.objects:
            assert 28 <= o.size <= 44 and isinstance(o.size, int)
            assert (o.speed == 0.0) if o.motion == "still" else (12.0 <= o.speed <= 24.0)
            x, y = o.position(times)
            assert x.min() >= 40 and x.max() + o.size <= 280 and y.min() >= 0 and y.max() + o.size <= 240
            boxes.append((x, y, o.size))
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (ax, ay, a), (bx, by, b) = boxes[i], boxes[j]
                apart = (ax + a <= bx) | (bx + b <= ax) | (ay + a <= by) | (by + b <= ay)
                assert apart.all(), f"overlap in {s}"
    # Positions really use the whole allowed range (uniform, not clamped to a corner).
    xs = np.array([o.x for o in objects if o.motion == "still"])
    assert xs.min() < 60 and xs.max() > 220


def test_sampling_is_deterministic():
    a = [shapes.sample_clip_spec(random.Random(3)) for _ in range(3)]
    b = [shapes.sample_clip_spec(random.Random(3)) for _ in range(3)]
    assert a == b
    assert ClipSpec.from_dict(json.loads(json.dumps(a[0].to_dict()))) == a[0]


def _synth(out, *, train, eval, workers, shard_size=4, seed=5):
    parser = argparse.ArgumentParser()
    shapes_synth.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(out), "--train", str(train), "--eval", str(eval), "--seed", str(seed),
         "--workers", str(workers), "--shard-size", str(shard_size)]
    )  # fmt: skip
    assert shapes_synth.run(args) == 0


def test_synth_cli_end_to_end(tmp_path):
    _synth(tmp_path, train=6, eval=3, workers=1)
    shards = sorted((tmp_path / "train").glob("shapes-*.tar"))
    assert [p.name for p in shards] == ["shapes-000000.tar", "shapes-000001.tar"]
    train_specs = []
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    keys = sorted({n.rsplit(".", 1)[0] for n in members})
    assert len(keys) == 6 and all(f"{k}.mp4" in members and f"{k}.json" in members for k in keys)
    for k in keys:
        meta = json.loads(members[f"{k}.json"])
        assert meta["source"] == "shapes-v1"
        spec = ClipSpec.from_dict(meta["spec"])
        assert meta["caption"] == shapes.caption(spec)
        assert meta["qa"] == shapes.questions(spec)
        train_specs.append(spec)
    frames = decode(members[f"{keys[0]}.mp4"])
    assert frames.shape == (125, 240, 320, 3)
    assert np.abs(frames.astype(int) - shapes.render_frames(train_specs[0]).astype(int)).mean() < 2.0

    ev = tmp_path / "eval"
    captions = [json.loads(line) for line in (ev / "caption.jsonl").read_text().splitlines()]
    qa = [json.loads(line) for line in (ev / "videoqa.jsonl").read_text().splitlines()]
    assert len(captions) == 3
    assert all(set(c) == {"video", "captions"} and (ev / c["video"]).is_file() for c in captions)
    assert all(set(q) == {"video", "question", "answer", "kind"} for q in qa)
    assert {q["video"] for q in qa} == {c["video"] for c in captions}
    assert {q["kind"] for q in qa} == {"static", "temporal"}
    eval_specs = [ClipSpec.from_dict(json.loads(line)["spec"]) for line in (ev / "specs.jsonl").read_text().splitlines()]
    for c, spec in zip(captions, eval_specs):
        assert c["captions"] == [shapes.caption(spec)]
    assert not set(eval_specs) & set(train_specs)
    assert decode((ev / captions[0]["video"]).read_bytes()).shape == (125, 240, 320, 3)


def test_eval_split_skips_a_clip_that_is_in_train(monkeypatch, tmp_path):
    # Force a collision: make eval clip 0 use train clip 0's seed.
    real = shapes_synth.clip_seed
    monkeypatch.setattr(shapes_synth, "clip_seed", lambda s, split, i: real(s, "train", 0) if split == "eval" and i == 0
                        else real(s, split, i))  # fmt: skip
    _synth(tmp_path, train=2, eval=2, workers=1)
    videos = [json.loads(line)["video"] for line in (tmp_path / "eval" / "caption.jsonl").read_text().splitlines()]
    assert videos == ["videos/eval-0000001.mp4", "videos/eval-0000002.mp4"]


def test_synth_output_does_not_depend_on_worker_count(tmp_path):
    _synth(tmp_path / "one", train=3, eval=2, workers=1, shard_size=2)
    _synth(tmp_path / "two", train=3, eval=2, workers=2, shard_size=2)
    for rel in ["train/shapes-000000.tar", "train/shapes-000001.tar", "eval/videoqa.jsonl",
                "eval/videos/eval-0000001.mp4"]:  # fmt: skip
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
