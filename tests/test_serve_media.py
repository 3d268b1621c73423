"""serve's media sources (allowlists, SSRF defence, size caps), sandboxed decoding and video cache."""

from __future__ import annotations

import base64
import http.server
import threading
import time

import pytest
import torch

from videollama.data import shapes
from videollama.serve import frames, media
from videollama.serve.cache import VideoCache, VideoEntry
from videollama.serve.limits import APIError, ServeLimits

pytestmark = pytest.mark.usefixtures("no_hang")


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("0.0.0.0", False), ("100.64.0.1", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
])
def test_public_address(address, public):
    assert media.public_address(address) is public


def test_domain_allowlist():
    allowed = ("videos.example.com", ".cdn.example.org", "*.media.example.net")
    assert media.domain_allowed("videos.example.com", allowed)
    assert media.domain_allowed("VIDEOS.example.com.", allowed)
    assert media.domain_allowed("a.cdn.example.org", allowed)
    assert media.domain_allowed("x.media.example.net", allowed)
    assert not media.domain_allowed("evil.videos.example.com", allowed)
    assert not media.domain_allowed("videos.example.com.evil.net", allowed)
    assert not media.domain_allowed("notcdn.example.org", allowed)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        # Recorded before anything is sent: the client may read the whole body (and the test check
        # this list) before this thread runs another line.
        self.server.hosts.append(self.headers["Host"])
        if self.path == "/drip":  # a byte at a time, each well within a per-read timeout
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"v")
                self.wfile.flush()
                time.sleep(0.2)
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        body = b"v" * (5000 if self.path == "/big" else 100)
        self.send_response(200)
        if self.path != "/big":  # /big declares no length: the cap must hold while reading
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hosts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_fetch_pins_the_address_refuses_redirects_and_caps_size(http_server):
    port = http_server.server_address[1]
    limits = ServeLimits(max_video_bytes=1000, fetch_timeout_s=5)
    resolve = lambda host, port: ["127.0.0.1"]  # noqa: E731 - the name resolves to the test server
    data = media.fetch_http(f"http://videos.test:{port}/ok", limits, ("videos.test",), resolve=resolve,
                            allow_private=True)
    assert data == b"v" * 100 and http_server.hosts == [f"videos.test:{port}"]  # Host keeps the name
    with pytest.raises(APIError, match="redirects"):
        media.fetch_http(f"http://videos.test:{port}/redirect", limits, ("videos.test",), resolve=resolve,
                         allow_private=True)
    with pytest.raises(APIError) as e:
        media.fetch_http(f"http://videos.test:{port}/big", limits, ("videos.test",), resolve=resolve,
                         allow_private=True)
    assert e.value.status == 413
    # Without the test switch the same transfer is refused: the name resolves to loopback.
    with pytest.raises(APIError) as e:
        media.fetch_http(f"http://videos.test:{port}/ok", limits, ("videos.test",), resolve=resolve)
    assert e.value.code == "private_address"
    # One private address among public ones is enough to refuse (DNS rebinding by a second record).
    with pytest.raises(APIError) as e:
        media.fetch_http("http://videos.test/ok", limits, ("videos.test",), resolve=lambda h, p: ["8.8.8.8", "10.0.0.1"])
    assert e.value.code == "private_address"
    with pytest.raises(APIError, match="credentials"):
        media.fetch_http("http://user:pw@videos.test/ok", limits, ("videos.test",), resolve=resolve)


def test_the_fetch_timeout_is_a_total(http_server):
    """A server that drips a byte every 0.2 s never trips a per-read timeout; the download's
    limit is a total, and so is what is left of the request's deadline."""
    port = http_server.server_address[1]
    resolve = lambda host, port: ["127.0.0.1"]  # noqa: E731
    limits = ServeLimits(fetch_timeout_s=1.0, max_video_bytes=1000)
    with pytest.raises(APIError) as e:
        media.fetch_http(f"http://videos.test:{port}/drip", limits, ("videos.test",), resolve=resolve, allow_private=True)
    assert e.value.status == 400 and e.value.code == "fetch_timeout"
    deadline = time.monotonic() + 0.5  # the request's own deadline comes first: a 504
    with pytest.raises(APIError) as e:
        media.fetch_http(f"http://videos.test:{port}/drip", ServeLimits(fetch_timeout_s=30), ("videos.test",),
                         resolve=resolve, allow_private=True, deadline=deadline)
    assert e.value.status == 504 and e.value.code == "timeout"


def test_sources_other_than_data_file_http_are_refused(tmp_path):
    limits = ServeLimits(max_video_bytes=100)
    for url in ("ftp://x/v.mp4", "gopher://x", "/etc/passwd", "data:text/plain;base64,aGk=", "data:video/mp4,raw"):
        with pytest.raises(APIError) as e:
            media.video_bytes(url, limits, allowed_local_path=tmp_path)
        assert e.value.status == 400, url
    with pytest.raises(APIError, match="disabled"):
        media.video_bytes((tmp_path / "v.mp4").as_uri(), limits)
    (tmp_path / "big.mp4").write_bytes(bytes(101))
    with pytest.raises(APIError) as e:
        media.video_bytes((tmp_path / "big.mp4").as_uri(), limits, allowed_local_path=tmp_path)
    assert e.value.status == 413
    with pytest.raises(APIError) as e:
        media.video_bytes(tmp_path.as_uri(), limits, allowed_local_path=tmp_path)  # a folder
    assert e.value.status == 400
    ok = "data:video/mp4;base64," + base64.b64encode(bytes(100)).decode()
    assert media.video_bytes(ok, limits) == bytes(100)


def test_isolated_decode_is_bit_identical_to_load_windows():
    from videollama.config import VideoLlamaConfig
    from videollama.data.windows import load_windows

    pre = VideoLlamaConfig.from_name("tiny").preprocess
    import random

    mp4 = shapes.encode_mp4(shapes.iter_frames(shapes.sample_clip_spec(random.Random(3))))
    video = frames.decode_video(mp4, pre, ServeLimits())
    expected, stamps = load_windows(mp4, pre)  # the whole video under the policy, as eval decodes it
    assert torch.equal(video.frames, expected)
    windows = expected.shape[0]
    assert video.pixels.dtype == torch.uint8 and video.pixels.shape == (windows, pre.num_frames, 3, pre.size, pre.size)
    assert video.timestamps == [[round(float(t), 4) for t in window] for window in stamps]


def test_hostile_videos_cost_a_worker_not_the_server():
    from badvideos import BAD_VIDEOS
    from videollama.config import VideoLlamaConfig

    pre = VideoLlamaConfig.from_name("tiny").preprocess
    limits = ServeLimits(decode_timeout_s=10, decode_memory_bytes=512 << 20)
    for name, (make, _) in BAD_VIDEOS.items():
        with pytest.raises(APIError) as e:
            frames.decode_video(make(), pre, limits)
        assert e.value.status == 400, name


def _entry(key, n):
    t = torch.zeros(n, dtype=torch.uint8)
    return VideoEntry(key, t, [(t.clone(), t.clone())], [0.0])


def test_cache_is_lru_bounded_by_bytes_and_entries():
    cache = VideoCache(max_bytes=1000, max_entries=3)
    for key in "abc":
        cache.put(_entry(key, 100))  # 300 bytes each
    assert len(cache) == 3 and cache.nbytes == 900
    assert cache.get("a") is not None  # a is now the most recent
    cache.put(_entry("d", 100))  # over 3 entries and 1000 bytes: b goes
    assert [k for k in "abcd" if k in cache] == ["a", "c", "d"]
    cache.put(_entry("e", 200))  # 600 bytes: the two least recent (c, then a) go
    assert [k for k in "abcde" if k in cache] == ["d", "e"] and cache.nbytes == 900
    cache.put(_entry("huge", 400))  # larger than the whole cache: not kept
    assert "huge" not in cache and cache.nbytes == 900
    assert (cache.hits, cache.misses, cache.evictions) == (1, 0, 3)
    assert cache.get("zz") is None and cache.misses == 1
