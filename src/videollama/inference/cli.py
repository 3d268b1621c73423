"""``videollama generate``: answer a question about a video, or caption it, from a model directory.

The checks that need no weights (the tokenizer, the prompt's length, the numbers, the video
file) run before the model is loaded; the model is loaded as ``eval`` and ``serve`` load it
(:func:`~videollama.inference.load.load_for_inference`). The video is seen whole, under the
model's own window policy, decoded and encoded a chunk of windows at a time
(:func:`~videollama.inference.whole_video.encode_whole_video`); the answer comes from
:func:`~videollama.inference.generate.generate`. ``--show-frames`` prints the time of every frame
the model saw, a line per window, before the answer.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from videollama.inference.load import add_model_arguments, load_for_inference, refuse_run_dir
from videollama.inference.whole_video import DEFAULT_WINDOWS_PER_CHUNK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)  # --model, --adapter, --quantize
    parser.add_argument("--prompt", help="the prompt text, e.g. a question about the video (not with --template "
                        "caption, which asks for a caption)")
    parser.add_argument("--template", choices=["raw", "videoqa", "caption"], default="raw",
                        help="raw: the prompt as given; videoqa: wrap it as a question (the fine-tuned "
                        "format); caption: ask for a caption (the prompt is ignored)")
    parser.add_argument("--video", type=Path, help="a video file, seen whole; without it the model answers from "
                        "text only")
    parser.add_argument("--show-frames", action="store_true",
                        help="print the time of every frame the model saw (a line per window) before the answer")
    parser.add_argument("--windows-per-chunk", type=int, default=DEFAULT_WINDOWS_PER_CHUNK,
                        help="windows decoded and encoded at a time (memory holds one chunk of frames)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step where, measured on this host, it beats the eager step "
                        "(the choice and the compiled graphs are kept in the cache directory)")


# Below this, logits / temperature can overflow float32 (a 1e-39 temperature turns every logit
# into inf and the probabilities into NaN).
MIN_TEMPERATURE = 1e-6


def run(args: argparse.Namespace) -> int:
    # Lazy: the data package (PyAV, tokenizers) is only needed when this command runs.
    from videollama.data.tokenizer import caption_prompt, encode_prompt, videoqa_prompt

    # The tokenizer first: a directory without a usable one fails before any weights are read.
    refuse_run_dir(args.model)
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"generate: model directory {args.model} has no tokenizer.json (convert with "
                                "--tokenizer, or copy the tokenizer the model was trained with into it)")
    # Checked before the model is loaded: the prompt's length (in characters, before tokenizing:
    # a 100 MB prompt costs nothing) and the numbers.
    from videollama.data.safe_io import MAX_TEXT_CHARS, check_regular_file

    if args.prompt is None and args.template != "caption":
        raise ValueError(f"--template {args.template} needs --prompt TEXT (only --template caption needs none)")
    if args.prompt is not None and len(args.prompt) > MAX_TEXT_CHARS:
        raise ValueError(f"--prompt is {len(args.prompt)} characters, over the {MAX_TEXT_CHARS}-character cap")
    if args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf or not 0 < args.top_p <= 1 \
            or args.windows_per_chunk < 1:
        raise ValueError("need --max-new-tokens >= 1, --temperature >= 0 (finite), 0 < --top-p <= 1 and "
                         "--windows-per-chunk >= 1")
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise ValueError(f"--temperature {args.temperature} is too small to sample with (the logits divided by it "
                         f"overflow): use 0 for greedy decoding, or at least {MIN_TEMPERATURE}")
    if not -(2**63) <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if args.show_frames and args.video is None:
        raise ValueError("--show-frames needs --video")
    if args.video is not None:
        check_regular_file(args.video, "video")  # FileNotFoundError / not_a_file, before any weights
    import torch

    from videollama.inference.generate import generate

    model, tokenizer = load_for_inference(args.model, adapter=args.adapter, quantize=args.quantize,
                                          device=args.device)
    prompt = {"raw": lambda: args.prompt, "videoqa": lambda: videoqa_prompt(args.prompt),
              "caption": caption_prompt}[args.template]()
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) + args.max_new_tokens > model.config.decoder.max_seq_len:
        raise ValueError(f"the prompt is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that is over "
                         f"the model's max_seq_len {model.config.decoder.max_seq_len}")
    input_ids = torch.tensor([ids], device=args.device)
    latents = None
    if args.video is not None:
        from videollama.inference.whole_video import encode_whole_video

        # A bad video: BadSample, one line. The frames go chunk by chunk; the latents stay.
        video = encode_whole_video(model, args.video, windows_per_chunk=args.windows_per_chunk)
        latents = video.latents[None]  # [1, W * L, D_v]
        if args.show_frames:
            print(f"frames (s) of {video.num_windows} window(s) over {video.duration:.2f} s:")
            for w, times in enumerate(video.frame_times_list()):
                print(f"  window {w + 1}: " + " ".join(f"{t:.2f}" for t in times))
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new = generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, eos_token_id=model.config.decoder.eos_token_id, generator=generator,
                   compile=args.compile, visual_latents=latents)
    ids = [i for i in new[0].tolist() if i != model.config.decoder.eos_token_id]
    print(tokenizer.decode(ids, skip_special_tokens=True).strip())
    if args.compile:
        import sys

        from videollama.inference.generate import step_report

        for r in step_report():  # what --compile chose on this host, and what choosing cost
            ms = r.get("ms")
            why = (f"compiled {ms['compiled']:.2f} ms vs eager {ms['eager']:.2f} ms per step" if ms
                   else r.get("why", ""))
            print(f"decode step: {r['choice']} ({why}; warm-up {r['warm_s']:.1f} s)", file=sys.stderr)
    return 0
