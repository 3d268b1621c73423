"""The BPE tokenizer: round trips, fixed special tokens, parity with transformers, prompts, CLI."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
from transformers import PreTrainedTokenizerFast

from videollama import cli
from videollama.data import shapes
from videollama.data import tokenizer as T


def shapes_texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        spec = shapes.sample_clip_spec(rng)
        texts.append(shapes.caption(spec))
        for qa in shapes.questions(spec):
            texts += [qa["question"], qa["answer"]]
    return texts


GENERAL = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is slicing a tomato on a wooden board, then he puts it in a bowl.",
    "Zwei Hunde spielen im Schnee; ein Kind läuft vorbei.",
    "東京の街を歩く人々のタイムラプス映像。",
    "Une femme fait du vélo près de la rivière à Montréal.",
]

# Strings the tokenizer never saw: other scripts, emoji, combining marks, odd white space.
UNSEEN = [
    "",
    " ",
    "a red square moves left.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\nand CRLF",
    "emoji 🎬🦙 and ZWJ family 👩‍👩‍👧",
    "e\u0301 (decomposed) vs \u00e9 (composed) stay different",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, 한국어",
    "control \x00 \x07 \x1b[0m and \u200b zero width",
    "numbers 3.14159 2,048 65536 -100",
    "code: def f(x): return {'a': [1, 2]}  # comment",
    "<video> inside text with <|question|> markers and </s>",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = T.train_tokenizer(shapes_texts() + GENERAL * 5, vocab_size=1000)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, path


def test_round_trip_on_unseen_text(trained):
    tok, _ = trained
    for text in UNSEEN + GENERAL:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    # The corpus is actually learned: a Shapes caption is a handful of tokens, not bytes.
    caption = "a purple triangle moves down and a white circle stays still."
    assert len(tok.encode(caption).ids) <= 14 < len(caption.encode())


def test_special_tokens_have_fixed_ids_and_are_never_split(trained):
    tok, _ = trained
    assert [tok.token_to_id(t) for t in T.SPECIAL_TOKENS] == list(range(len(T.SPECIAL_TOKENS)))
    assert (T.PAD_ID, T.BOS_ID, T.EOS_ID, T.VIDEO_ID) == (0, 1, 2, 3)
    for i, token in enumerate(T.SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False).ids == [i]
        ids = tok.encode(f"before{token}after", add_special_tokens=False).ids
        assert ids.count(i) == 1
        assert tok.decode(ids, skip_special_tokens=True) == "beforeafter"
    # Ordinary text never produces a special id, even text that spells half a marker.
    for text in UNSEEN[:-1] + GENERAL + ["<vid eo>", "< s>", "<|caption", "|>"]:
        assert not set(tok.encode(text, add_special_tokens=False).ids) & set(range(len(T.SPECIAL_TOKENS)))
    # A second training run on other text gives the same special ids.
    other = T.train_tokenizer(GENERAL, vocab_size=300)
    assert [other.token_to_id(t) for t in T.SPECIAL_TOKENS] == list(range(len(T.SPECIAL_TOKENS)))


def test_transformers_fast_tokenizer_encodes_identically(trained):
    tok, path = trained
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    strings = UNSEEN + GENERAL + shapes_texts(40, seed=9) + [T.caption_prompt(), T.videoqa_prompt("how many?")]
    for text in strings:
        ours = tok.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ours, text
        assert hf.convert_ids_to_tokens(ours) == tok.encode(text, add_special_tokens=False).tokens


def test_encode_example_masks_bos_and_prompt(trained):
    tok, _ = trained
    prompt = T.videoqa_prompt("which way does the red circle move?")
    input_ids, labels = T.encode_example(tok, prompt, "left", max_len=64)
    prompt_ids = T.encode_prompt(tok, prompt)
    assert input_ids[: len(prompt_ids)] == prompt_ids and prompt_ids[0] == T.BOS_ID
    assert prompt_ids[1] == T.VIDEO_ID and prompt_ids[-1] == tok.token_to_id(T.ANSWER)
    target = input_ids[len(prompt_ids) :]
    assert target[-1] == T.EOS_ID and tok.decode(target, skip_special_tokens=True) == "left"
    assert len(labels) == len(input_ids)
    assert labels == [-100] * len(prompt_ids) + target

    # Truncation drops the prompt's first tokens and keeps its end and the whole target.
    caption = "a red square moves left and a blue circle stays still."
    full_ids, _ = T.encode_example(tok, prompt, caption, max_len=1000)
    n_target = len(tok.encode(caption).ids) + 1
    short_ids, short_labels = T.encode_example(tok, prompt, caption, max_len=n_target + 4)
    assert len(short_ids) == n_target + 4
    assert short_ids[0] == T.BOS_ID and short_ids[1:] == full_ids[-(n_target + 3) :]
    assert short_labels == [-100] * 4 + short_ids[4:]
    # Exactly fitting target: no prompt left, still BOS + target + EOS.
    ids, labels = T.encode_example(tok, prompt, caption, max_len=n_target + 1)
    assert ids == [T.BOS_ID] + full_ids[-n_target:] and labels[0] == -100 and labels[1:] == ids[1:]
    with pytest.raises(ValueError, match="does not fit max_len"):
        T.encode_example(tok, prompt, caption, max_len=n_target)


def test_prompts_and_make_example():
    assert T.caption_prompt() == "<video><|caption|>"
    assert T.videoqa_prompt(" how many objects are there? ") == "<video><|question|>how many objects are there?<|answer|>"
    mc = T.videoqa_prompt("what color is the circle?", ["red", "blue", "green"])
    assert mc == "<video><|question|>what color is the circle?\noptions: red | blue | green<|answer|>"

    meta = {"key": "k1", "caption": "a red square stays still.", "qa": [
        {"question": "how many objects are there?", "answer": "one", "kind": "static"},
        {"question": "which way does the red square move?", "answer": "still", "kind": "temporal"},
    ]}  # fmt: skip
    assert T.make_example(meta, "caption", random.Random(0)) == (T.caption_prompt(), "a red square stays still.")
    rng = random.Random(0)
    picked = {T.make_example(meta, "videoqa", rng) for _ in range(30)}
    assert picked == {(T.videoqa_prompt(q["question"]), q["answer"]) for q in meta["qa"]}
    with pytest.raises(ValueError, match="k2: task 'videoqa' needs"):
        T.make_example({"key": "k2", "caption": "x"}, "videoqa", rng)
    with pytest.raises(ValueError, match="unknown task"):
        T.make_example(meta, "summarise", rng)


def test_make_examples_takes_one_some_or_every_text():
    meta = {"key": "k1", "caption": "a red square stays still.", "qa": [
        {"question": "how many objects are there?", "answer": "one", "kind": "static"},
        {"question": "which way does the red square move?", "answer": "still", "kind": "temporal"},
    ]}  # fmt: skip
    caption = (T.caption_prompt(), meta["caption"])
    questions = [(T.videoqa_prompt(q["question"]), q["answer"]) for q in meta["qa"]]
    # One text of a single task is make_example's choice, drawn from the same generator.
    assert T.make_examples(meta, "videoqa", random.Random(3)) == [T.make_example(meta, "videoqa", random.Random(3))]
    assert T.make_examples(meta, "caption+videoqa", random.Random(0), 0) == [caption, *questions]
    assert T.make_examples(meta, "videoqa", random.Random(0), 0) == questions
    assert T.make_examples(meta, "caption", random.Random(0), 0) == [caption]
    two = T.make_examples(meta, "caption+videoqa", random.Random(0), 2)
    assert len(two) == 2 and len(set(two)) == 2 and set(two) <= {caption, *questions}
    # Evaluation-set caption lines hold several references: every one is a text.
    refs = {"captions": ["one.", "two."]}
    assert T.make_examples(refs, "caption", random.Random(0), 0) == [(T.caption_prompt(), "one."), (T.caption_prompt(), "two.")]
    with pytest.raises(ValueError, match="needs a non-empty 'qa'"):
        T.make_examples({"key": "k2", "caption": "x"}, "caption+videoqa", random.Random(0), 0)
    with pytest.raises(ValueError, match="texts_per_clip"):
        T.make_examples(meta, "videoqa", random.Random(0), -1)


def test_normalize_answer():
    assert T.normalize_answer("  Red. ") == "red"
    assert T.normalize_answer("The Blue Circle.\n") == "the blue circle"
    assert T.normalize_answer("left") == "left"
    assert T.normalize_answer("a.b") == "a.b"  # only a final period goes
    assert T.normalize_answer("still..") == "still."


def test_load_tokenizer_errors(tmp_path, trained):
    _, path = trained
    assert T.load_tokenizer(path.parent).get_vocab() == T.load_tokenizer(path).get_vocab()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        T.load_tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad}: not a valid tokenizer.json"):
        T.load_tokenizer(tmp_path)
    # A valid tokenizer.json whose special tokens are not ours (or in another order).
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel()
    foreign.train_from_iterator(GENERAL, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>"]))
    foreign.save(str(bad))
    with pytest.raises(ValueError, match="special token '<pad>' has id 1, expected 0"):
        T.load_tokenizer(bad)


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, meta in samples:
            for name, data in [(f"{key}.json", json.dumps(meta).encode()), (f"{key}.mp4", b"\x00" * 16)]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cli_trains_from_shard_jsonl_and_text(tmp_path, capsys):
    rng = random.Random(1)
    samples = []
    for i in range(60):
        spec = shapes.sample_clip_spec(rng)
        samples.append((f"s{i:03d}", {"caption": shapes.caption(spec), "qa": shapes.questions(spec)}))
    _write_shard(tmp_path / "shard-000000.tar", samples)
    (tmp_path / "extra.jsonl").write_text(json.dumps({"video": "v.mp4", "captions": ["zebras graze quietly"]}) + "\n")
    (tmp_path / "notes.txt").write_text("xylophone music plays\n\n")

    texts = list(T.iter_training_texts([tmp_path / "shard-000000.tar", tmp_path / "extra.jsonl", tmp_path / "notes.txt"]))
    expected = []
    for _, meta in samples:
        expected.append(meta["caption"])
        for qa in meta["qa"]:
            expected += [qa["question"], qa["answer"]]
    assert texts == expected + ["zebras graze quietly", "xylophone music plays"]

    out = tmp_path / "tok"
    rc = cli.main(["tokenizer", "train", "--data", str(tmp_path / "shard-000000.tar"), str(tmp_path / "extra.jsonl"),
                   str(tmp_path / "notes.txt"), "--vocab-size", "65536", "--out", str(out)])  # fmt: skip
    assert rc == 0
    tok = T.load_tokenizer(out)
    printed = capsys.readouterr().out
    assert f"trained on {len(texts)} texts; vocabulary size {tok.get_vocab_size()}" in printed
    # A tiny corpus runs out of merges long before 65,536.
    assert len(T.SPECIAL_TOKENS) + 256 < tok.get_vocab_size() < 65536
    assert "Ġsquare" in tok.get_vocab() and "Ġtriangle" in tok.get_vocab()
    for text in texts[:50]:
        assert tok.decode(tok.encode(text).ids) == text

    capsys.readouterr()
    assert cli.main(["tokenizer", "train", "--data", str(tmp_path / "missing.tar"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videollama: error:") and "missing.tar: no such file" in err and "\n" not in err
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list(T.iter_training_texts([tmp_path / "missing.tar"]))
    (tmp_path / "broken.jsonl").write_text('{"caption": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2: invalid JSON"):
        list(T.iter_training_texts([tmp_path / "broken.jsonl"]))


def test_vocab_65536_on_a_small_corpus(capsys):
    texts = shapes_texts(2000, seed=3) + GENERAL * 20
    tok = T.train_tokenizer(texts, vocab_size=65536)
    size = tok.get_vocab_size()
    with capsys.disabled():
        print(f"\nvocab reached at --vocab-size 65536 on {len(texts)} short texts: {size}")
    assert 300 < size < 65536
    assert [tok.token_to_id(t) for t in T.SPECIAL_TOKENS] == list(range(len(T.SPECIAL_TOKENS)))
    assert max(tok.get_vocab().values()) == size - 1  # ids are dense
