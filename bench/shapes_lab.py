"""Model-engineering runs on Shapes: what the "what helped" table in bench/results/demo.md measured.

    python bench/shapes_lab.py --name base                       # the shapes preset, 10 CPU-minutes
    python bench/shapes_lab.py --name lat16 --set resampler.num_latents=16 resampler.depth=1
    python bench/shapes_lab.py --name cap-first --pre-minutes 4 --minutes 8

A run trains the real ``VideoLlama`` on the Shapes training split for a fixed CPU-time budget
(one thread by default, so two runs side by side on two cores do not disturb each other's
clock) and reports held-out accuracy by question kind and template every few minutes, then with
one frame repeated. It is the demo's training minus everything that is not the model: the
corpus is decoded once (on a 4 FPS grid, into ``--cache``) and held in memory as uint8, windows
are drawn from that grid (start anywhere on it; evaluation takes the centred one), and accuracy
is teacher-forced exact match, which equals greedy exact match (greedy decoding reproduces the
answer iff every answer token, EOS included, is the argmax given the answer's prefix) at one
forward pass per batch. Results go to ``<out>/<name>.log`` and the weights to ``<out>/<name>.safetensors``.

``--mode``: ``qa1`` one random question per clip; ``caption``; ``all`` the caption and every
question of the clip through one encoder pass (the demo's fine-tuning, ``texts_per_clip: 0``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from videollama.config import VideoLlamaConfig
from videollama.data.stages import IGNORE_INDEX
from videollama.data.tokenizer import caption_prompt, encode_example, load_tokenizer, videoqa_prompt
from videollama.demo import question_type
from videollama.model.videollama import VideoLlama

GRID_FPS = 4.0
GRID = 20  # frames at 4 FPS: t = 0 .. 4.75 s of a 5 s Shapes clip


def _decode(job: tuple[str | bytes, int]) -> np.ndarray:
    from videollama.data.video import load_clip

    source, size = job
    frames, _ = load_clip(source, num_frames=GRID, fps=GRID_FPS, size=size, start=0.0, train=False, normalize=False)
    return (frames * 255).round().to(torch.uint8).numpy()


def load_corpus(data: Path, cache: Path, size: int) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """(train pixels [N, GRID, 3, S, S] uint8, train metadata, eval pixels, eval metadata)."""
    pixels_file, meta_file = cache / f"corpus_{size}.npz", cache / "corpus_meta.json"
    if pixels_file.exists() and meta_file.exists():
        with np.load(pixels_file, allow_pickle=False) as z:
            meta = json.loads(meta_file.read_text())
            return z["train"], meta["train"], z["eval"], meta["eval"]
    train_src, train_meta = [], []
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar}
            for name in sorted(members):
                if name.endswith(".json"):
                    meta = json.loads(tar.extractfile(members[name]).read())
                    train_meta.append({"caption": meta["caption"], "qa": meta["qa"]})
                    train_src.append(tar.extractfile(members[name[:-5] + ".mp4"]).read())
    qa = [json.loads(line) for line in (data / "eval" / "videoqa.jsonl").read_text().splitlines()]
    videos = sorted({row["video"] for row in qa})
    eval_meta = [{"video": v, "qa": [row for row in qa if row["video"] == v]} for v in videos]
    with Pool(2) as pool:
        train = np.stack(pool.map(_decode, [(s, size) for s in train_src], chunksize=16))
        held_out = np.stack(pool.map(_decode, [(str(data / "eval" / v), size) for v in videos], chunksize=16))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(pixels_file, train=train, eval=held_out)
    meta_file.write_text(json.dumps({"train": train_meta, "eval": eval_meta}))
    return train, train_meta, held_out, eval_meta


def pad(ids: list[list[int]], labels: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, ids))
    return (torch.tensor([row + [0] * (length - len(row)) for row in ids]),
            torch.tensor([row + [IGNORE_INDEX] * (length - len(row)) for row in labels]))


class Clips:
    """Windows of ``num_frames`` at the model's FPS, cut from the in-memory 4 FPS grid."""

    def __init__(self, pixels: np.ndarray, cfg: VideoLlamaConfig):
        pre = cfg.preprocess
        self.pixels, self.step = pixels, int(round(GRID_FPS / pre.fps))
        self.span = (pre.num_frames - 1) * self.step
        self.mean = torch.tensor(pre.mean).view(1, 1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std).view(1, 1, 3, 1, 1) * 255

    def video(self, index: list[int], starts: list[int]) -> torch.Tensor:
        frames = np.stack([self.pixels[i, s:s + self.span + 1:self.step] for i, s in zip(index, starts)])
        return (torch.from_numpy(frames).float() - self.mean) / self.std


def texts(meta: dict, mode: str, rng: random.Random) -> list[tuple[str, str]]:
    if mode == "qa1":
        q = rng.choice(meta["qa"])
        return [(videoqa_prompt(q["question"]), q["answer"])]
    rows = [(caption_prompt(), meta["caption"])]
    if mode == "all":
        rows += [(videoqa_prompt(q["question"]), q["answer"]) for q in meta["qa"]]
    return rows


def loss_of(model: VideoLlama, video, ids, labels, video_index) -> torch.Tensor:
    logits = model(ids, video=video, video_index=video_index).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model: VideoLlama, clips: Clips, metas: list[dict], tok, one_frame: bool = False) -> dict[str, float]:
    """Exact-match accuracy by kind and question template (teacher-forced == greedy)."""
    model.eval()
    centre = (GRID - clips.span) // 2
    hits: dict[str, list[bool]] = {}
    for first in range(0, len(metas), 50):
        index = list(range(first, min(first + 50, len(metas))))
        video = clips.video(index, [centre] * len(index))
        if one_frame:
            middle = video.shape[1] // 2
            video = video[:, middle:middle + 1].expand_as(video).contiguous()
        ids, labels, video_index, names = [], [], [], []
        for j, i in enumerate(index):
            for q in metas[i]["qa"]:
                a, b = encode_example(tok, videoqa_prompt(q["question"]), q["answer"], 64)
                ids.append(a), labels.append(b), video_index.append(j)
                names.append((q["kind"], question_type(q["question"])))
        ids_t, labels_t = pad(ids, labels)
        predicted = model(ids_t, video=video, video_index=torch.tensor(video_index)).logits[:, :-1].argmax(-1)
        target = labels_t[:, 1:]
        correct = ((predicted == target) | (target == IGNORE_INDEX)).all(1)
        for group, ok in zip(names, correct.tolist()):
            for name in group:
                hits.setdefault(name, []).append(ok)
    model.train()
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--preset", default="shapes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML", help="model config overrides")
    p.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of the (last) phase")
    p.add_argument("--mode", choices=["qa1", "caption", "all"], default="all")
    p.add_argument("--pre-minutes", type=float, default=0.0, help="a first phase of --pre-mode (fresh optimizer)")
    p.add_argument("--pre-mode", choices=["qa1", "caption", "all"], default="caption")
    p.add_argument("--batch", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=float, default=2.5, help="minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--cache", type=Path, default=Path("runs/lab/cache"))
    p.add_argument("--out", type=Path, default=Path("runs/lab"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = VideoLlamaConfig.from_name(a.preset)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    if overrides:
        cfg = cfg.with_overrides({k: yaml.safe_load(v) for k, v in overrides.items()})
    train, train_meta, held_out, held_out_meta = load_corpus(a.data, a.cache, cfg.preprocess.size)
    tok = load_tokenizer(a.data / "tokenizer.json")
    model = VideoLlama(cfg)
    rng = random.Random(a.seed)
    clips, eval_clips = Clips(train, cfg), Clips(held_out, cfg)
    a.out.mkdir(parents=True, exist_ok=True)
    log = (a.out / f"{a.name}.log").open("w")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    # One thread: CPU time is this run's own work, however busy the machine is.
    clock = time.process_time if a.threads == 1 else time.perf_counter
    say(f"# {a.name} params={sum(p.numel() for p in model.parameters())} {vars(a)}")
    phases = ([(a.pre_mode, a.pre_minutes)] if a.pre_minutes else []) + [(a.mode, a.minutes)]
    start, steps = clock(), 0
    for mode, minutes in phases:
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": rest, "weight_decay": 0.0}],
                                lr=a.lr, betas=(0.9, 0.95))
        budget, phase_start, step, next_eval, losses = minutes * 60, clock(), 0, a.eval_every * 60, []
        while (elapsed := clock() - phase_start) < budget:
            # Warm-up, then cosine over the CPU-time budget down to 5% of the peak.
            lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * elapsed / budget)))
            for group in opt.param_groups:
                group["lr"] = lr
            index = [rng.randrange(len(train_meta)) for _ in range(a.batch)]
            video = clips.video(index, [rng.randrange(GRID - clips.span) for _ in index])
            rows = [(j, prompt, target) for j, i in enumerate(index) for prompt, target in texts(train_meta[i], mode, rng)]
            encoded = [encode_example(tok, prompt, target, 64) for _, prompt, target in rows]
            ids, labels = pad([e[0] for e in encoded], [e[1] for e in encoded])
            loss = loss_of(model, video, ids, labels, torch.tensor([j for j, _, _ in rows]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            if elapsed >= next_eval:
                next_eval += a.eval_every * 60
                say(f"[{mode}] step {step} t={clock() - start:.0f}s loss={np.mean(losses[-50:]):.3f} "
                    f"{evaluate(model, eval_clips, held_out_meta, tok)}")
        steps += step
        say(f"[{mode}] phase done: {step} steps, {step * a.batch / budget:.1f} clips/s")
    say(f"FINAL steps={steps} t={clock() - start:.0f}s {evaluate(model, eval_clips, held_out_meta, tok)}")
    say(f"FINAL one frame {evaluate(model, eval_clips, held_out_meta, tok, one_frame=True)}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(a.out / f"{a.name}.safetensors"))


if __name__ == "__main__":
    main()
