"""``videollama generate``: answer a question about a video, or caption it, from a model directory.

The checks that need no weights (the tokenizer, the prompt's length, the numbers, the video
file) run before the model is loaded; the model is loaded as ``eval`` and ``serve`` load it
(:func:`~videollama.inference.load.load_for_inference`), and the answer comes from
:func:`~videollama.inference.generate.generate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from videollama.inference.load import add_model_arguments, load_for_inference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)  # --model, --adapter, --quantize
    parser.add_argument("--prompt", required=True, help="the prompt text, e.g. a question about the video")
    parser.add_argument("--template", choices=["raw", "videoqa", "caption"], default="raw",
                        help="raw: the prompt as given; videoqa: wrap it as a question (the fine-tuned "
                        "format); caption: ask for a caption (the prompt is ignored)")
    parser.add_argument("--video", type=Path, help="a video file; without it the model answers from text only")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step where, measured on this host, it beats the eager step "
                        "(the choice and the compiled graphs are kept in the cache directory)")


def run(args: argparse.Namespace) -> int:
    # Lazy: the data package (PyAV, tokenizers) is only needed when this command runs.
    from videollama.data.tokenizer import caption_prompt, encode_prompt, videoqa_prompt

    # The tokenizer first: a directory without a usable one fails before any weights are read.
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"generate: model directory {args.model} has no tokenizer.json (convert with "
                                "--tokenizer, or copy the tokenizer the model was trained with into it)")
    # Checked before the model is loaded: the prompt's length (in characters, before tokenizing:
    # a 100 MB prompt costs nothing) and the numbers.
    from videollama.data.safe_io import MAX_TEXT_CHARS, check_regular_file

    if len(args.prompt) > MAX_TEXT_CHARS:
        raise ValueError(f"--prompt is {len(args.prompt)} characters, over the {MAX_TEXT_CHARS}-character cap")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
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
    video = None
    if args.video is not None:
        from videollama.data import load_clip

        pre = model.config.preprocess
        frames, _ = load_clip(args.video, num_frames=pre.num_frames, fps=pre.fps, size=pre.size,
                              mean=pre.mean, std=pre.std)  # a bad video: BadSample, one line
        video = torch.as_tensor(frames, dtype=torch.float32, device=args.device)[None]  # [1, F, 3, S, S]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new = generate(model, input_ids, video, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, eos_token_id=model.config.decoder.eos_token_id, generator=generator,
                   compile=args.compile)
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
