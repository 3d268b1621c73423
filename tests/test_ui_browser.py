"""The web chat UI (serve/ui.py) in a real headless browser: Debian's Chromium, driven by Selenium.

A tiny model is saved to disk and served by the real :class:`~videollama.serve.engine.Engine`,
the page mounted on the API's app on 127.0.0.1. The browser loads the page, uploads a Shapes
clip through the page's own file input, and the test checks:

* the gallery shows the model's frames: every frame of the windows the model sees of the whole
  video (``load_windows``, the policy eval uses), with the engine's timestamps as captions, and
  pixel for pixel the frames ``load_windows`` decodes;
* asking a question streams the answer into the chat (intermediate prefixes are seen in the
  DOM), and the final text equals the engine's own greedy answer to the same video and question,
  asked directly in the API's message format (a ``data:`` ``video_url``);
* nothing but the server's own origin is requested by the browser, and the server process
  opens no connection outside loopback (the page works on a machine without network).

Without Chromium and chromedriver the test FAILS (it is never skipped): ``make test`` installs
them as root with apt-get.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import socket
import time

import numpy as np
import pytest
import torch

from conftest import shapes_clip

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_hang")]

NUM_FRAMES, FPS, SIZE = 4, 1.0, 64
QUESTION = "what color is the square?"
FOLLOW_UP = "which way does it move?"
# What Chromium needs on a closed network (no background connections) and as root in CI.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1600"]
WAIT_S = 30.0


def find_browser() -> tuple[str, str]:
    """Paths of Chromium and its chromedriver ($VIDEOLLAMA_CHROMIUM / $VIDEOLLAMA_CHROMEDRIVER, or
    the Debian packages' commands); a clear failure, not a skip, when they are missing."""
    chromium = os.environ.get("VIDEOLLAMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("VIDEOLLAMA_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the web UI test needs Chromium and chromedriver (Debian: apt-get install -y chromium "
                    "chromium-driver; `make test` does this when run as root), or set VIDEOLLAMA_CHROMIUM "
                    f"and VIDEOLLAMA_CHROMEDRIVER; found chromium={chromium}, chromedriver={driver}")
    return chromium, driver


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model with open gates and sharpened attention (so that the video shapes the answer)
    and a Shapes tokenizer."""
    from videollama.config import VideoLlamaConfig
    from videollama.data import shapes
    from videollama.data.tokenizer import train_tokenizer
    from videollama.model import VideoLlama

    rng = random.Random(0)
    texts = []
    for _ in range(40):
        spec = shapes.sample_clip_spec(rng)
        texts += [shapes.caption(spec)] + [f"{q['question']} {q['answer']}" for q in shapes.questions(spec)]
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(2)
    cfg = VideoLlamaConfig.from_name("tiny").with_overrides({
        "preprocess.num_frames": NUM_FRAMES, "preprocess.fps": FPS, "preprocess.size": SIZE,
        "vision.max_frames": NUM_FRAMES, "decoder.vocab_size": tok.get_vocab_size(),
        # A context that holds the test's conversation: two questions and a first answer of up to the
        # page's default max tokens (the tiny preset's 128 positions do not, once that answer is
        # re-tokenised).
        "decoder.max_seq_len": 256})
    model = VideoLlama(cfg).eval()
    with torch.no_grad():
        for block in model.vision.temporal:
            block.gate.fill_(0.5)
        model.vision.frame_diff.gate.fill_(0.5)
        for block in model.decoder.cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
        model.lm_head.weight.mul_(20.0)  # sharp logits: greedy choices are not near-ties
        for layer in model.decoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("ui-model")
    model.save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    from videollama.serve.engine import Engine

    engine = Engine.from_model_dir(model_dir).start()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(shapes_clip(7))
    return path


@pytest.fixture
def outbound(monkeypatch):
    """Every address this process connects to outside loopback (there must be none)."""
    seen: list = []
    connect = socket.socket.connect

    def watched(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            seen.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", watched)
    return seen


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    service = Service(driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


class Server(str):
    """The page's base URL, with the example videos it offers."""

    examples: list


@pytest.fixture
def server(engine, tmp_path, monkeypatch):
    from videollama.serve.examples import shapes_examples
    from videollama.serve.ui import serving

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # uploads and gallery files
    (tmp_path / "examples").mkdir()
    examples = shapes_examples(tmp_path / "examples", n=2, seed=3)
    with serving(engine, host="127.0.0.1", port=0, examples=examples) as url:
        server = Server(url)
        server.examples = examples
        yield server


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def api_messages(video: bytes, question: str) -> list[dict]:
    """One user turn as an API client sends it: the video as a data: URL, then the question."""
    url = "data:video/mp4;base64," + base64.b64encode(video).decode("ascii")
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def engine_answer(engine, messages: list[dict]) -> str:
    """The engine's greedy answer through its in-process API (the UI's default max tokens)."""
    import asyncio

    from videollama.serve.ui import DEFAULT_MAX_TOKENS

    async def ask() -> str:
        return "".join([e async for e in engine.chat(messages, max_tokens=DEFAULT_MAX_TOKENS, temperature=0.0)
                        if isinstance(e, str)])

    return asyncio.run(ask())


# Records every distinct text of the latest bot message, as the DOM changes.
OBSERVE_ANSWER = """
window.__answers = [];
const root = document.querySelector('#chatbot');
new MutationObserver(() => {
  const bots = root.querySelectorAll('[data-testid="bot"] .message-content');
  if (!bots.length) return;
  const text = bots[bots.length - 1].textContent;
  if (window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
}).observe(root, {subtree: true, childList: true, characterData: true});
"""

FETCH_IMAGES = """
const done = arguments[arguments.length - 1];
const imgs = [...document.querySelectorAll('#frames .thumbnail-item img')];
Promise.all(imgs.map(async img => {
  const blob = await (await fetch(img.src)).blob();
  return await new Promise(r => { const f = new FileReader(); f.onload = () => r(f.result); f.readAsDataURL(blob); });
})).then(done, e => done('error: ' + e));
"""


def gallery(browser) -> tuple[list[str], list[np.ndarray]]:
    """The frames gallery's captions and images (the PNG files the page shows, decoded)."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#frames .caption-label")]
    urls = browser.execute_async_script(FETCH_IMAGES)
    assert isinstance(urls, list), urls
    return captions, [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB"))
                      for u in urls]


def wait_gallery(browser, timestamps, pixels) -> None:
    """Wait until the gallery shows ``pixels`` (uint8 [F, S, S, 3]) exactly, one image per
    timestamp, each captioned with its time (Shapes clips share their times, so the pixels are
    what tells one clip's gallery from another's)."""
    expected = [f"frame {i + 1} · {t:.2f} s" for i, t in enumerate(timestamps)]
    last: list = [None, 0]

    def shown():
        from selenium.common.exceptions import StaleElementReferenceException

        try:  # the gallery may be re-rendering under our feet: look again
            captions, images = gallery(browser)
        except (StaleElementReferenceException, AssertionError, OSError):
            return False
        last[:] = [captions, len(images)]
        return (captions == expected and len(images) == len(pixels)
                and all(np.array_equal(a, b) for a, b in zip(images, pixels)))

    try:
        wait_for(shown, "the gallery to show the model's frames")
    except AssertionError:
        raise AssertionError(f"the gallery shows {last[0]} ({last[1]} images), not {expected} with the "
                             "engine's pixels") from None


def ask(browser, question: str, expected: str) -> list[str]:
    """Ask in the page; wait for the last answer to become ``expected``; every text it showed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.execute_script("window.__answers = [];")
    box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)

    def settled():
        answers = browser.execute_script("return window.__answers")
        return answers if answers and answers[-1] == expected else None

    try:
        wait_for(settled, "the streamed answer")
    except AssertionError:
        raise AssertionError(f"the page's answer never became the engine's {expected!r}; it showed "
                             f"{browser.execute_script('return window.__answers')!r}") from None
    time.sleep(0.5)  # nothing more arrives after the end
    answers = browser.execute_script("return window.__answers")
    assert answers[-1] == expected
    user = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"] .message-content')
    assert user[-1].text == question
    return answers


def test_chat_page_in_chromium(engine, server, browser, video_file, outbound):
    from selenium.webdriver.common.by import By

    from videollama.data.windows import load_windows
    from videollama.serve.ui import DEFAULT_MAX_TOKENS

    video = video_file.read_bytes()
    preview = engine.preview(video)
    pixels, timestamps = preview.pixels, preview.times
    assert NUM_FRAMES == engine.model.config.preprocess.num_frames
    # The reference frames: load_windows' own decode of the whole video, as 0..255 bytes.
    reference, ref_times = load_windows(video, engine.model.config.preprocess, normalize=False)  # [W, F, 3, S, S]
    assert reference.shape[0] == 2  # a 5 s clip is two windows of 4 s (0-4 s and 1-5 s)
    reference = (reference.flatten(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [W*F, S, S, 3]
    assert len(timestamps) == len(reference)
    np.testing.assert_allclose(timestamps, ref_times.flatten().numpy(), atol=1e-3)
    answer = engine_answer(engine, api_messages(video, QUESTION))
    assert answer, "the tiny model's greedy answer is empty: nothing to compare"
    # The answer depends on the video: matching it below means the page sent this video.
    assert engine_answer(engine, api_messages(shapes_clip(8), QUESTION)) != answer

    # The page loads; a video uploaded through its file input shows the frames the model sees.
    browser.get(server)
    wait_for(lambda: browser.title == "VideoLlama chat", "the page's title")
    # A file that is no video: the page says so, in the engine's words, and shows no frames.
    broken = video_file.with_name("broken.mp4")
    broken.write_bytes(b"this is not a video" * 100)
    upload = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#video input[type=file]"), "the upload input")
    status = browser.find_element(By.ID, "status")
    upload[0].send_keys(str(broken))
    wait_for(lambda: "Cannot use this video: the video could not be read" in status.text, "the bad video's error")
    assert not browser.find_elements(By.CSS_SELECTOR, "#frames .thumbnail-item")
    browser.find_element(By.CSS_SELECTOR, '#video button[aria-label="Clear"]').click()
    upload = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#video input[type=file]"), "the upload input")
    upload[0].send_keys(str(video_file))
    assert np.array_equal(pixels, reference), "the engine's preview differs from load_clip's frames"
    wait_gallery(browser, timestamps, pixels)
    assert status.text.startswith(f"The model sees {len(reference)} frames in 2 windows")

    # A question: the answer streams in, through prefixes, and ends as the engine's own answer.
    browser.execute_script(OBSERVE_ANSWER)
    answers = ask(browser, QUESTION, answer)
    partial = [a for a in answers[:-1] if a]
    assert partial, f"the answer arrived in one piece, not streamed: {answers!r}"
    assert all(answer.startswith(a) for a in partial), answers

    # A second question continues the conversation, as the engine answers it.
    history = api_messages(video, QUESTION) + [{"role": "assistant", "content": answer},
                                              {"role": "user", "content": FOLLOW_UP}]
    second = engine_answer(engine, history)
    assert second and second != answer, "the follow-up's answer must differ to tell the turns apart"
    answers = ask(browser, FOLLOW_UP, second)
    assert [a for a in answers if a != answer and second.startswith(a) and a != second], answers
    bots = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"] .message-content')
    assert [b.get_attribute("textContent") for b in bots] == [answer, second]

    # Picking an example starts a fresh chat about it; a question asked at once, before its
    # frames are shown, is answered about that example; then its frames show.
    example = browser.find_elements(By.CSS_SELECTOR, "#examples button.gallery-item")
    assert len(example) == len(server.examples)
    clip = server.examples[1].read_bytes()
    example_preview = engine.preview(clip)
    example_pixels, example_times = example_preview.pixels, example_preview.times
    assert not np.array_equal(example_pixels, pixels)
    example_answer = engine_answer(engine, api_messages(clip, QUESTION))
    assert example_answer != answer
    # Hold every decode slot of the engine: the preview waits, while the chat needs none (the
    # example's encoding is in the engine's video cache since engine_answer above).
    slots = engine.videos.decode_slots
    held = 0
    try:
        while slots.acquire(blocking=False):
            held += 1
        assert held == engine.limits.decode_workers
        example[1].click()
        wait_for(lambda: not browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]'),
                 "the chat to clear")
        ask(browser, QUESTION, example_answer)
        assert not browser.find_elements(By.CSS_SELECTOR, "#frames .thumbnail-item"), "the preview was not held"
    finally:
        for _ in range(held):
            slots.release()
    wait_gallery(browser, example_times, example_pixels)
    bots = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"] .message-content')
    assert [b.get_attribute("textContent") for b in bots] == [example_answer]

    # Only the server's own origin was asked for anything; the server reached nothing outside.
    urls = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.add(message["params"]["url"])
    remote = sorted(u for u in urls if not u.startswith(server) and u.split(":", 1)[0] in ("http", "https", "ws", "wss"))
    assert not remote, f"the page requested other origins: {remote}"
    assert any(u.startswith(server + "gradio_api/upload") for u in urls)
    assert not outbound, f"the server connected outside loopback: {outbound}"

    # The OpenAI-compatible API beside the page answers the same from the same engine.
    import httpx

    reply = httpx.post(server + "v1/chat/completions", timeout=WAIT_S, json={
        "messages": api_messages(video, QUESTION), "max_tokens": DEFAULT_MAX_TOKENS, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == answer
