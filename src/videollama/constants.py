"""Limits and constants that several packages share. Imports nothing: anything may import it.

The caps bound what one untrusted input may cost before it is parsed; each is far above any real
input (a Shapes JSONL line is about 150 bytes, a caption about 60 characters).
"""

# The label of positions that carry no loss (PyTorch cross_entropy's default ignore_index): the
# prompt of every example, and the padding of a batch.
IGNORE_INDEX = -100

# Characters of one question, answer, caption or prompt, checked before tokenizing (a 2,048-token
# context holds far fewer characters than this).
MAX_TEXT_CHARS = 16_384
# Texts of one clip trained on in one step (its caption and questions).
MAX_TEXTS_PER_CLIP = 64

# A JSONL line (one eval item or manifest row), and a JSON sidecar or shard member.
MAX_LINE_BYTES = 1 << 20
MAX_JSON_BYTES = 1 << 20
# Nesting of any JSON we parse: deep enough for every real file, shallow enough for the parser.
MAX_JSON_DEPTH = 32
