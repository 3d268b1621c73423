"""The byte-level BPE tokenizer, its special tokens, and the prompt templates (the only copy).

The tokenizer is a Hugging Face ``tokenizers`` byte-level BPE, saved as ``tokenizer.json``
(loadable by ``transformers.PreTrainedTokenizerFast`` too). No normaliser: every string
round-trips, ``decode(encode(x)) == x``. Special tokens come first, in a fixed order, so
their ids never change between vocabularies:

    0 <pad>   1 <s> (BOS)   2 </s> (EOS)   3 <video>   4 <|caption|>   5 <|question|>   6 <|answer|>

Prompts (the model sees the video through cross-attention, never as tokens; ``<video>``
marks where the text starts to be about it):

    caption:  <s><video><|caption|>                      -> target  "a red square moves left." </s>
    videoqa:  <s><video><|question|>{question}<|answer|> -> target  "left" </s>
    multiple choice adds a line "options: a | b | c" after the question.

``videollama tokenizer train --data SHARDS_OR_TEXT... --vocab-size 65536 --out DIR``
"""

from __future__ import annotations

import argparse
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tokenizers is imported lazily, inside the functions that need it
    from tokenizers import Tokenizer

PAD, BOS, EOS, VIDEO = "<pad>", "<s>", "</s>", "<video>"
CAPTION, QUESTION, ANSWER = "<|caption|>", "<|question|>", "<|answer|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, VIDEO, CAPTION, QUESTION, ANSWER)  # ids 0..6, in this order
PAD_ID, BOS_ID, EOS_ID, VIDEO_ID = 0, 1, 2, 3
# The most texts of one clip trained on in one step (texts_per_clip 0: "all of them").
MAX_TEXTS_PER_CLIP = 64
MAX_TEXT_CHARS = 16_384  # as videollama.data.safe_io.MAX_TEXT_CHARS (this module imports nothing of ours)
IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch cross_entropy's default)


# ---------------------------------------------------------------------------------------
# Training, saving, loading
# ---------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; the vocabulary stops early if merges run out.

    All 256 byte symbols are in the initial alphabet, so any string (any script, emoji,
    control characters) encodes without an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is below {len(SPECIAL_TOKENS) + 256} (special tokens + bytes)")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: no text is invented, so decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _check_special_tokens(tok, "the trained tokenizer")
    return tok


def _check_special_tokens(tok: Tokenizer, where: str) -> None:
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != expected_id:
            raise ValueError(f"{where}: special token {token!r} has id {tok.token_to_id(token)}, expected {expected_id}")


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` (a file, or a folder holding one) and check the special tokens."""
    from tokenizers import Tokenizer

    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer file (expected tokenizer.json, see `videollama tokenizer train`)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception with a serde message
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
    _check_special_tokens(tok, str(path))
    return tok


# ---------------------------------------------------------------------------------------
# Prompt templates and training examples
# ---------------------------------------------------------------------------------------


def caption_prompt() -> str:
    return f"{VIDEO}{CAPTION}"


def videoqa_question(question: str, options: Sequence[str] | None = None) -> str:
    """The text between a VideoQA prompt's markers: the question, and a line of options if any.

    ``videoqa_question(videoqa_question(q, options)) == videoqa_question(q, options)``, so a tool
    that hands over the whole text (the lmms-eval tasks) gets the prompt the harness builds."""
    question = question.strip()
    if options:
        question += "\noptions: " + " | ".join(o.strip() for o in options)
    return question


def videoqa_prompt(question: str, options: Sequence[str] | None = None) -> str:
    """Open-ended question, or multiple choice when ``options`` are given (answer = an option's text)."""
    return f"{VIDEO}{QUESTION}{videoqa_question(question, options)}{ANSWER}"


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """BOS + the prompt's tokens: what generation starts from."""
    return [BOS_ID] + tok.encode(prompt, add_special_tokens=False).ids


def encode_example(tok: Tokenizer, prompt: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    """``input_ids = BOS + prompt + target + EOS`` and ``labels`` of the same length.

    ``labels`` is ``-100`` on BOS and the prompt and equals ``input_ids`` on target + EOS;
    it is *not* shifted (the loss predicts ``labels[i + 1]`` from position ``i``).

    Truncation rule: when the example is longer than ``max_len``, prompt tokens are dropped
    from the prompt's *start* (right after BOS), because its end (the question and the
    ``<|answer|>`` marker) is what the target follows from. The target is never cut: if
    BOS + target + EOS alone exceeds ``max_len``, this raises ``ValueError``.
    """
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
    target_ids = tok.encode(target, add_special_tokens=False).ids + [EOS_ID]
    room = max_len - 1 - len(target_ids)  # prompt tokens that fit beside BOS and the target
    if room < 0:
        raise ValueError(
            f"target of {len(target_ids)} tokens (with EOS) does not fit max_len={max_len} with BOS: {target[:80]!r}"
        )
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room :]
    input_ids = [BOS_ID] + prompt_ids + target_ids
    labels = [IGNORE_INDEX] * (1 + len(prompt_ids)) + target_ids
    return input_ids, labels


TASKS = ("caption", "videoqa", "caption+videoqa")


def _qa_examples(meta: dict, task: str) -> list[tuple[str, str]]:
    """``(prompt, answer)`` for every QA item of a sample's JSON; raises if it has none."""
    where = meta.get("key", "sample")
    qa = meta.get("qa")
    if not qa or not isinstance(qa, list):
        raise ValueError(f"{where}: task {task!r} needs a non-empty 'qa' list in the sample's JSON")
    for q in qa:
        ok = (isinstance(q, dict) and _text(q.get("question")) and _text(q.get("answer"))
              and (q.get("options") is None or (isinstance(q["options"], list) and all(map(_text, q["options"])))))
        if not ok:
            raise ValueError(f"{where}: each 'qa' item needs string 'question' and 'answer' (and a list of string "
                             f"'options', if any) of at most {MAX_TEXT_CHARS} characters")
    return [(videoqa_prompt(q["question"], q.get("options")), q["answer"]) for q in qa]


def _text(value) -> bool:
    """A string a tokenizer may be given: capped in characters, so a huge one costs nothing."""
    return isinstance(value, str) and len(value) <= MAX_TEXT_CHARS


def make_example(meta: dict, task: str, rng: random.Random) -> tuple[str, str]:
    """``(prompt, target)`` from a shard sample's JSON: its caption, or one random QA item.

    ``meta`` has ``caption`` and, for ``task="videoqa"``, a non-empty ``qa`` list of
    ``{question, answer, ...}``.
    """
    where = meta.get("key", "sample")
    if task == "caption":
        if not _text(meta.get("caption")):
            raise ValueError(f"{where}: no 'caption' string (of at most {MAX_TEXT_CHARS} characters) in the sample's JSON")
        return caption_prompt(), meta["caption"]
    if task == "videoqa":
        return rng.choice(_qa_examples(meta, task))
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def make_examples(meta: dict, task: str, rng: random.Random, texts_per_clip: int = 1) -> list[tuple[str, str]]:
    """Every ``(prompt, target)`` one clip trains on in one step.

    ``task``: ``caption``, ``videoqa``, or ``caption+videoqa`` (the caption and the questions
    together). ``texts_per_clip``: how many of the clip's texts to use, drawn at random without
    replacement; 0 takes them all, in order. The rows share one pass of the video encoder (see
    ``VideoLlama.forward(video_index=...)``): the encoder is most of a step's cost and a clip
    has one caption and 3-10 questions, so using them all multiplies what a step teaches.
    With the default of 1 and a single task this is ``[make_example(meta, task, rng)]``.
    """
    where = meta.get("key", "sample")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if texts_per_clip < 0:
        raise ValueError(f"texts_per_clip must be >= 0, not {texts_per_clip}")
    if task != "caption+videoqa" and texts_per_clip == 1:
        return [make_example(meta, task, rng)]
    texts: list[tuple[str, str]] = []
    if task in ("caption", "caption+videoqa"):
        captions = meta.get("captions") if isinstance(meta.get("captions"), list) else [meta.get("caption")]
        if not captions or not all(map(_text, captions)):
            raise ValueError(f"{where}: no 'caption' string (of at most {MAX_TEXT_CHARS} characters) in the sample's JSON")
        texts += [(caption_prompt(), c) for c in captions]
    if task in ("videoqa", "caption+videoqa"):
        texts += _qa_examples(meta, task)
    if texts_per_clip == 0 or texts_per_clip >= len(texts):
        return texts[:MAX_TEXTS_PER_CLIP]  # a sample with 50,000 questions must not make a 50,000-row batch
    return rng.sample(texts, texts_per_clip)


def normalize_answer(text: str) -> str:
    """The Shapes scoring rule: lower-case, trim white space, drop one final period."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


# ---------------------------------------------------------------------------------------
# Reading training text: shards, JSONL, plain text
# ---------------------------------------------------------------------------------------


def _texts_from_record(record: dict) -> Iterator[str]:
    """Caption(s), questions and answers of a shard JSON or a JSONL line."""
    for key in ("caption", "text", "question", "answer"):
        if isinstance(record.get(key), str):
            yield record[key]
    captions = record.get("captions") or []
    qa = record.get("qa") or []
    if not isinstance(captions, list) or not isinstance(qa, list):
        raise ValueError("'captions' and 'qa' must be lists")
    yield from (c for c in captions if isinstance(c, str))
    for item in qa:
        if not isinstance(item, dict):
            raise ValueError("each 'qa' item must be an object")
        for key in ("question", "answer"):
            if isinstance(item.get(key), str):
                yield item[key]
        options = item.get("options") or []
        yield from (o for o in options if isinstance(o, str)) if isinstance(options, list) else ()


def iter_training_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Texts from ``.tar`` shards (``KEY.json``), ``.jsonl`` files and plain text files (one per line).

    A folder is read recursively (files with those suffixes, plus ``.txt``). Only regular files
    are read, lines and JSON members are bounded in size and depth (videollama.data.safe_io).
    """
    from videollama.data.safe_io import MAX_JSON_BYTES, check_regular_file, iter_lines

    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".tar", ".jsonl", ".txt") and p.is_file())
            yield from iter_training_texts(files)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        elif path.suffix == ".tar":
            check_regular_file(path, "shard")
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.isfile() and member.name.endswith(".json"):
                            if member.size > MAX_JSON_BYTES:
                                raise ValueError(f"{path}:{member.name}: {member.size} bytes, over the "
                                                 f"{MAX_JSON_BYTES}-byte cap")
                            data = tar.extractfile(member).read()
                            yield from _texts_from_record(_parse_json(data, f"{path}:{member.name}"))
            except tarfile.TarError as e:
                raise ValueError(f"{path}: unreadable tar shard ({e})") from e
        else:
            for n, line in iter_lines(path):
                if isinstance(line, ValueError):
                    raise line
                if path.suffix == ".jsonl":
                    yield from _texts_from_record(_parse_json(line, f"{path}:{n}"))
                else:
                    yield line.rstrip("\n")


def _parse_json(data: str | bytes, where: str) -> dict:
    from videollama.data.safe_io import parse_json

    try:
        record = parse_json(data, "the record")
    except ValueError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from e
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


# ---------------------------------------------------------------------------------------
# CLI: videollama tokenizer train
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_verb", metavar="VERB", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer", description="train a byte-level BPE")
    train.add_argument("--data", nargs="+", required=True, help="tar shards, JSONL files, text files or folders")
    train.add_argument("--vocab-size", type=int, default=65536, help="target vocabulary size (an upper bound)")
    train.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to merge")
    train.add_argument("--out", required=True, help="output folder; gets tokenizer.json")


def run(args: argparse.Namespace) -> int:
    if args.tokenizer_verb != "train":
        raise ValueError(f"unknown tokenizer verb {args.tokenizer_verb!r}")
    count = 0

    def counted(texts: Iterator[str]) -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    # Bad input (OSError, ValueError naming the file) becomes one line from the command line.
    tok = train_tokenizer(counted(iter_training_texts(args.data)), args.vocab_size, min_frequency=args.min_frequency)
    if count == 0:
        raise ValueError(f"no training text found in {' '.join(args.data)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    size = tok.get_vocab_size()
    note = "" if size == args.vocab_size else f" (asked for {args.vocab_size}; the corpus ran out of merges)"
    print(f"trained on {count} texts; vocabulary size {size}{note}; wrote {out / 'tokenizer.json'}")
    return 0
