"""The prompt of a chat request: OpenAI messages -> the model directory's token ids.

The template is eval's (``videollama.data.tokenizer.videoqa_prompt`` + ``encode_prompt``, the
functions ``videollama eval --task videoqa`` builds its prompts with): one user turn with a video
and a question gives exactly eval's prompt, ``<s><video><|question|>Q<|answer|>``. Later turns
append the assistant's answer and ``</s>``, then ``<|question|>Q<|answer|>``; system text comes
first, as plain text. Message text may not contain the special tokens' strings (no injection).

A request is about one video at most, counted here, before any video is read: its parts must all
name the same source (the same URL, or the same bytes in process); two different ones are a 400.
"""

from __future__ import annotations

from videollama.serve.limits import APIError, ServeLimits


def video_source(part: dict):
    """What a video part names, to compare without reading it: its URL, or its bytes."""
    if part.get("type") == "video":
        return ("bytes", part.get("video"))
    video_url = part.get("video_url")
    return ("url", video_url.get("url") if isinstance(video_url, dict) else video_url)


def build_prompt(tokenizer, messages: list, limits: ServeLimits) -> tuple[list[int], list[dict]]:
    """Token ids of the conversation, ending ready for the answer, and its video part ([] or one:
    repeats of the same source count once)."""
    from videollama.data.tokenizer import (
        ANSWER,
        QUESTION,
        SPECIAL_TOKENS,
        VIDEO,
        encode_prompt,
        videoqa_prompt,
    )

    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages, over the server's limit of {limits.max_messages} "
                       "(--max-messages)", param="messages")
    turns, videos, chars, system = [], [], 0, []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if role not in ("system", "user", "assistant") or not isinstance(parts, list):
            raise APIError(400, f"messages[{i}] needs a role (system, user, assistant) and content",
                           param=f"messages[{i}]")
        texts = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("video_url", "video") and role == "user":
                if videos and video_source(part) != video_source(videos[0]):
                    raise APIError(400, "a conversation may be about one video only (every video part must "
                                   "name the same source)", param=f"messages[{i}].content", code="one_video_only")
                videos[:] = videos or [part]
            else:
                raise APIError(400, f"messages[{i}]: unsupported content part {kind!r} (text, or video_url "
                               "in a user message)", param=f"messages[{i}].content")
        text = " ".join(t.strip() for t in texts if t.strip())
        chars += len(text)
        if any(s in text for s in SPECIAL_TOKENS):
            raise APIError(400, f"messages[{i}] contains a reserved token ({', '.join(SPECIAL_TOKENS)})",
                           param=f"messages[{i}].content")
        if role == "system":
            system.append(text)
        else:
            turns.append((role, text))
    if chars > limits.max_prompt_chars:
        raise APIError(400, f"the messages hold {chars} characters, over the server's limit of "
                       f"{limits.max_prompt_chars} (--max-prompt-chars)", param="messages")
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    prompt = " ".join(system)
    for role, text in turns:
        if role == "user":
            prompt += videoqa_prompt(text)[len(VIDEO):] if prompt or not videos else videoqa_prompt(text)
        else:
            prompt += f"{text}</s>"
    if videos and not prompt.startswith(VIDEO):
        prompt = VIDEO + prompt
    assert prompt.endswith(ANSWER) and QUESTION in prompt
    return encode_prompt(tokenizer, prompt), videos
