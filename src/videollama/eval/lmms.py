"""VideoLlama as an lmms-eval model: ``lmms-eval --model videollama --model_args pretrained=DIR``.

Registered through the ``lmms_eval.models`` entry point of our package (pyproject.toml), which
lmms-eval reads at start-up: no fork or patch of lmms-eval. ``--model_args``:

    pretrained=DIR        the model directory (required)
    adapter=DIR           a peft LoRA adapter, merged at load time
    quantize=int8|int4    weight-only quantization (torchao)
    device=cpu|cuda|...   default: cuda when available, else cpu
    reduction=sum|mean    how ``loglikelihood`` reduces a continuation's token log-probabilities
    max_new_tokens=N      when the task's ``generation_kwargs`` give none (default 16)

``--batch_size N`` is the number of prompts (or scored options) per forward pass.

Everything a request carries is answered the way ``videollama eval`` answers it: each video is
seen whole under the model directory's own window policy
(``inference.whole_video.encode_whole_video``), decoded and encoded once however many requests ask
about it (requests are grouped by video, and batched in the harness's order, so the
batches are the harness's batches), the task's text becomes our VideoQA prompt
(``videoqa_prompt``), and answers come from the same greedy generation and the same text
post-processing. A video that fails to load answers "" (scored wrong, as the harness scores a
skipped item) and gives every option of a multiple-choice question the same, worst score.

``loglikelihood`` returns, per ``(context, continuation)``, the NEGATIVE log-likelihood of the
continuation (summed over its tokens, or averaged with ``reduction=mean``; computed by
``videollama.eval.likelihood``) and whether greedy decoding would produce it. The sign is lmms-eval's
convention, not the docstring's: its ``multiple_choice`` scoring takes the option with the
SMALLEST value (its models return a loss), and so do its tasks' own ``process_results`` (EgoSchema's).

lmms-eval (and so this module) runs in its own environment: ``make lmms-eval`` (README,
"Public benchmarks with lmms-eval").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

log = logging.getLogger(__name__)

MODEL_ID = "videollama"
REDUCTIONS = ("sum", "mean")
DEFAULT_MAX_NEW_TOKENS = 16  # the harness's VideoQA default (videollama.eval.harness)


def manifest() -> ModelManifest:
    """What the ``lmms_eval.models`` entry point gives lmms-eval."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VideoLlamaLmms")


@dataclass
class _Work:
    """One request, ready to batch: which video, which prompt, and what to do with it."""

    position: int  # in the list of requests lmms-eval passed
    task: str
    video: str
    prompt: list[int]
    payload: Any  # generation: the task's generation_kwargs; likelihood: the continuation's token ids


class VideoLlamaLmms(lmms):
    """A simple (not chat) lmms-eval model: the task's text is the question about its one video."""

    is_simple = True

    def __init__(self, pretrained: str, adapter: str | None = None, quantize: str | None = None,
                 device: str | None = None, batch_size: int | str = 8, max_batch_size: int | None = None,
                 reduction: str = "sum", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"videollama: unknown --model_args {', '.join(sorted(unknown))} (known: pretrained, "
                             "adapter, quantize, device, reduction, max_new_tokens)")
        if reduction not in REDUCTIONS:
            raise ValueError(f"videollama: reduction must be one of {', '.join(REDUCTIONS)}, not {reduction!r}")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"videollama: --batch_size must be a number, not {batch_size!r}") from None
        if self.batch_size < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"videollama: batch_size and max_new_tokens must be >= 1 ({batch_size}, {max_new_tokens})")
        from videollama.inference.load import load_for_inference

        self.model, self.tokenizer = load_for_inference(pretrained, adapter=adapter, quantize=quantize, device=device)
        self.reduction = reduction
        self.max_new_tokens = int(max_new_tokens)

    # ---- lmms-eval's interface --------------------------------------------------------------
    def generate_until(self, requests: list) -> list[str]:
        works = [self._work(i, req, generation=True) for i, req in enumerate(requests)]
        answers = [""] * len(requests)
        for batch, latents in self._batches(works):
            ready = [(w, latents[w.video]) for w in batch if latents.get(w.video) is not None and self._fits(w, 1)]
            if not ready:
                continue
            texts = self._generate([w.prompt for w, _ in ready], [lat for _, lat in ready], batch[0].payload)
            for (w, _), text in zip(ready, texts):
                answers[w.position] = _cut_at_stop(text, w.payload.get("until"))
        return answers

    def loglikelihood(self, requests: list) -> list:
        """Per request ``(minus the log-likelihood, is_greedy)``, as lmms-eval 0.7 can take it (see ``_as_response``)."""
        from videollama.eval.likelihood import score_continuations
        from videollama.inference.whole_video import pad_videos

        works = [self._work(i, req, generation=False) for i, req in enumerate(requests)]
        # A video that did not load, or a row that does not fit the context: the worst score.
        results: list[tuple[float, bool]] = [(float("inf"), False)] * len(requests)
        for batch, latents in self._batches(works):
            ready = [w for w in batch if latents.get(w.video) is not None]
            for w in [w for w in ready if not w.payload]:  # an empty continuation is certain
                results[w.position] = (0.0, True)
            ready = [w for w in ready if w.payload and self._fits(w, len(w.payload))]
            if not ready:
                continue
            distinct = list(dict.fromkeys(w.video for w in ready))
            stacked, mask = pad_videos([latents[v] for v in distinct])  # [U, L_max, D_v], [U, L_max] or None
            scores = score_continuations(self.model, [w.prompt for w in ready], [w.payload for w in ready],
                                         stacked, [distinct.index(w.video) for w in ready], visual_mask=mask)
            for w, s in zip(ready, scores):
                value = s.logprob if self.reduction == "sum" else s.logprob / s.num_tokens
                results[w.position] = (-value, s.greedy)
        return [_as_response(r) for r in results]

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError("videollama: multi-round generation is not supported")

    # ---- requests -> batches ----------------------------------------------------------------
    def _work(self, position: int, request: Any, *, generation: bool) -> _Work:
        from videollama.data.tokenizer import encode_prompt, videoqa_prompt

        context, second, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) or []
        if len(visuals) != 1 or not isinstance(visuals[0], str):
            raise NotImplementedError(f"videollama: task {task!r} gives {len(visuals)} visual(s) "
                                      f"({', '.join(type(v).__name__ for v in visuals) or 'none'}) for doc {doc_id}; "
                                      "the model answers about exactly one video, given as a path")
        prompt = encode_prompt(self.tokenizer, videoqa_prompt(context))
        if generation:
            payload = dict(second or {})
        else:  # multiple_choice gives the option text; loglikelihood tasks may give doc_to_target
            continuation = second if isinstance(second, str) else second(doc)
            payload = self.tokenizer.encode(str(continuation), add_special_tokens=False).ids
        return _Work(position=position, task=task, video=visuals[0], prompt=prompt, payload=payload)

    def _batches(self, works: list[_Work]) -> Iterator[tuple[list[_Work], dict[str, Any]]]:
        """Batches of ``batch_size`` in the harness's order, with the latents of their videos.

        Requests about one video become neighbours (videos in order of first appearance, requests
        in their own order, each task on its own), so every video is decoded and encoded once:
        the latents of a batch's videos are kept for the next batch. A video that does not load
        maps to None.
        """
        first: dict[tuple[str, str], int] = {}
        for w in works:
            first.setdefault((w.task, w.video), w.position)
        tasks = list(dict.fromkeys(w.task for w in works))
        latents: dict[str, Any] = {}
        for task in tasks:
            ordered = sorted((w for w in works if w.task == task), key=lambda w: (first[(w.task, w.video)], w.position))
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start : start + self.batch_size]
                wanted = list(dict.fromkeys(w.video for w in batch))
                latents = {v: latents[v] for v in wanted if v in latents}
                latents.update(self._encode([v for v in wanted if v not in latents]))
                yield batch, latents

    def _encode(self, paths: list[str]) -> dict[str, Any]:
        """Each video whole under the model directory's policy (an ``EncodedVideo``), or None when
        it does not load (``encode_whole_video`` says so with BadSample or FileNotFoundError)."""
        from videollama.data.errors import BadSample
        from videollama.inference.whole_video import encode_whole_video

        out = {}
        for path in paths:
            try:
                out[path] = encode_whole_video(self.model, path)
            except (BadSample, FileNotFoundError) as e:
                log.warning("videollama: %s did not load, its requests are answered as wrong: %s: %s",
                            path, type(e).__name__, e)
                out[path] = None
        return out

    def _fits(self, w: _Work, room: int) -> bool:
        """Whether the prompt leaves ``room`` tokens in the context (the harness skips a question that does not)."""
        max_len = self.model.config.decoder.max_seq_len
        if len(w.prompt) + room <= max_len:
            return True
        log.warning("videollama: a prompt of %d tokens leaves no room for %d more in max_seq_len=%d; "
                    "scored as wrong", len(w.prompt), room, max_len)
        return False

    # ---- generation -------------------------------------------------------------------------
    def _generate(self, prompts: list[list[int]], row_videos: list[Any], gen_kwargs: dict) -> list[str]:
        """Greedy (unless the task asks to sample) in one left-padded batch, decoded as the harness
        decodes; the rows about one video share its latents (``row_videos``: each row's EncodedVideo)."""
        import torch

        from videollama.inference.generate import answer_text, generate, left_pad  # generation, imported once
        from videollama.inference.whole_video import pad_videos

        dec = self.model.config.decoder
        input_ids, attention_mask = left_pad(prompts, dec.pad_token_id)  # [B, T] each
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        budget = dec.max_seq_len - input_ids.shape[1]  # the prompt plus new tokens must fit max_seq_len
        sample = bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature") or 0.0) > 0
        device = next(self.model.parameters()).device
        distinct = list({id(v): v for v in row_videos}.values())
        latents, mask = pad_videos(distinct)  # [U, L_max, D_v], [U, L_max] or None
        index = torch.tensor([next(i for i, v in enumerate(distinct) if v is row) for row in row_videos])
        new_tokens = generate(
            self.model, input_ids.to(device), max_new_tokens=min(max_new, budget),
            temperature=float(gen_kwargs["temperature"]) if sample else 0.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0) if sample else 1.0,
            eos_token_id=dec.eos_token_id, attention_mask=attention_mask.to(device),
            visual_latents=latents, visual_mask=mask, video_index=index.to(latents.device),
        )  # [B, T_new]
        return [answer_text(self.tokenizer, row, eos_id=dec.eos_token_id, pad_id=dec.pad_token_id)
                for row in new_tokens.tolist()]


@functools.cache
def _tuples_reach_the_task() -> bool:
    """Whether lmms-eval hands a model's ``(value, is_greedy)`` to the task unchanged.

    lmms-eval 0.7 passes every response through ``unwrap_generation_output``, which keeps a
    ``GenerationResult``'s ``text`` as it is but turns anything else that is not a string into its
    ``str()``: a loglikelihood tuple would reach ``multiple_choice`` scoring as text and fail there.
    """
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # an lmms-eval before that function: responses are stored as returned
        return True
    return unwrap_generation_output((0.0, True))[0] == (0.0, True)


def _as_response(result: tuple[float, bool]) -> Any:
    if _tuples_reach_the_task():
        return result
    from lmms_eval.api.instance import GenerationResult

    return GenerationResult(text=result)  # its text goes through unchanged (see above)


def _cut_at_stop(text: str, until: Any) -> str:
    """The text before the first of the task's stop strings (``until``), as lmms-eval's models cut."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text
