"""The server and chat-page half of ``bench/bench_hostile.py``: hostile clients against a real
``videollama serve`` and a real ``videollama chat`` (subprocesses on 127.0.0.1, a tiny model).

While each case runs, a watcher asks ``/health`` every 0.1 s (its slowest answer and its misses
are reported) and samples the server process's RSS. Outcomes per case: the HTTP statuses the
hostile requests got; ``crash`` (the server died), ``hang`` (a request got no answer within
``HANG_S``), 500s. RSS growth per hostile request is (RSS after the case - RSS before) / requests.

The flood case also states the time to reject a skip-frame flood (each round's, against the 2 s
target): the sandboxed decoder's pixel-weighted work bound (data/container.py) stops it; the
server's ``--decode-timeout-s`` and request deadline are the backstop.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import hostile_chat

ROOT = Path(__file__).resolve().parent.parent
HANG_S = hostile_chat.HANG_S
KEY = hostile_chat.KEY
FLOOD_TARGET_S = 2.0
RSS_SPAN: dict[str, tuple[float, float]] = {}  # server -> (RSS after start, RSS after its last case), MB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's ``field`` of /proc/PID/status (VmRSS, VmHWM: its peak), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


class Server:
    """``videollama <command>`` as a subprocess; ``url`` once /health answers."""

    def __init__(self, command: list[str], work: Path, env: dict | None = None) -> None:
        self.port = _free_port()
        path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(work / "gradio"),
               **(env or {})}
        self.log = open(work / f"server-{command[0]}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "videollama.cli", *command, "--port", str(self.port),
                                      "--device", "cpu"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: see {self.log.name}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        return _rss_mb(self.proc.pid) if self.alive() else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Watch:
    """/health every 0.1 s and the server's RSS, while a case runs."""

    def __init__(self, server: Server) -> None:
        self.server, self.slowest, self.misses, self.peak = server, 0.0, 0, server.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = client.get(self.server.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.slowest = max(self.slowest, time.perf_counter() - t0)
                self.misses += not ok
                self.peak = max(self.peak, self.server.rss_mb())
                time.sleep(0.1)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_case(server: Server, name: str, surface: str, fn, rounds: int = 3) -> dict:
    """``fn`` ``rounds`` times against ``server``. RSS growth: over the first round (the server
    warming up to the case: allocator arenas, a decode worker) and per request over the later
    rounds (what a stream of such requests keeps adding)."""
    before = server.rss_mb()
    t0 = time.perf_counter()
    statuses, outcome, after_first, later, round_s = [], "defended", before, 0, []
    with Watch(server) as watch, ThreadPoolExecutor(1) as pool:
        for round_ in range(rounds):
            started = time.perf_counter()
            future = pool.submit(fn, server)
            try:
                got = future.result(timeout=HANG_S)
            except TimeoutError:
                outcome = "hang"
                break
            except Exception as e:  # noqa: BLE001 - a broken case is reported, not raised
                statuses, outcome = [f"{type(e).__name__}: {e}"[:120]], "error"
                break
            round_s.append(time.perf_counter() - started)
            if round_ == 0:
                statuses, after_first = got, server.rss_mb()
            else:
                later += sum(1 for s in got if isinstance(s, int))
    seconds = (time.perf_counter() - t0) / rounds
    if not server.alive():
        outcome = "crash"
    after = server.rss_mb()
    return {"surface": surface, "case": name, "outcome": outcome, "statuses": statuses, "seconds": seconds,
            "round_s": round_s, "health_slowest_s": watch.slowest, "health_misses": watch.misses, "first_round_mb": after_first - before,
            "rss_growth_mb_per_request": (after - after_first) / max(1, later), "peak_rss_mb": watch.peak,
            "fivehundreds": sum(1 for s in statuses if isinstance(s, int) and s >= 500 and s not in (503, 504))}


# ---- the API (`videollama serve`) -------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT = [{"role": "user", "content": "what moves?"}]


def _post(server, body=None, *, content=None, headers=None, timeout=HANG_S) -> int:
    headers = {**AUTH, **(headers or {})}
    kwargs = {"content": content} if content is not None else {"json": body}
    return httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=timeout, **kwargs).status_code


def _stall(port: int, declared: int, sent: int) -> int:
    """A client that declares ``declared`` bytes, sends ``sent`` and waits: the status it gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_S) as sock:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n")
        try:
            sock.sendall(head.encode() + b'{"messages": "' + b"x" * sent)
        except OSError:  # refused and closed while we were still sending
            pass
        try:
            data = sock.recv(65536)
        except OSError:  # reset after a refusal the client could not read: 0
            data = b""
    return int(data.split()[1]) if data else 0


def api_cases(work: Path, scale: float) -> dict:
    mib = int((1 << 20) * scale)
    media = work / "media"
    clip = (media / "good.mp4").read_bytes()
    video_url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    file_url = (media / "good.mp4").as_uri()

    def parts(url, n=1):
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}] * n
                 + [{"type": "text", "text": "what moves?"}]}]

    def sampling(server):
        bodies = [{"messages": TEXT, "max_tokens": 8}] * 5 + [{"messages": TEXT, "max_tokens": 8, "temperature": 1.9e-39}]
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda b: _post(server, b), bodies))
        raw = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, %s}'
        for extra in ('"temperature": NaN', '"temperature": 5e-324', '"top_p": 1e-320, "temperature": 1',
                      '"seed": 1180591620717411303424', '"seed": -1180591620717411303424', '"max_tokens": 1e400'):
            statuses.append(_post(server, content=raw % extra))
        return statuses

    cases = {
        "host_rebinding": lambda s: [httpx.get(s.url + "/v1/models", headers={**AUTH, "Host": "attacker.example"}).status_code],
        "origin_cross_site": lambda s: [_post(s, {"messages": TEXT}, headers={"Origin": "http://attacker.example"})],
        "no_api_key": lambda s: [httpx.get(s.url + "/v1/models").status_code, _post(s, {"messages": TEXT}, headers={"Authorization": ""})],
        f"json_{60 * scale:g}MiB_of_objects": lambda s: [_post(s, content=b'{"messages": [' + b"{}," * (20 * mib) + b"{}]}")],
        f"json_{60 * scale:g}MiB_of_zeros": lambda s: [_post(s, content=b'{"messages": [' + b"0," * (30 * mib) + b"0]}")],
        "json_deep_nesting": lambda s: [_post(s, content=b"[" * (1 << 20) + b"]" * (1 << 20))],
        f"8_stalled_bodies_of_{60 * scale:g}MiB": lambda s: list(ThreadPoolExecutor(8).map(
            lambda _: _stall(s.port, 62 * mib, 60 * mib), range(8))),
        "one_file_video_25_times": lambda s: [_post(s, {"messages": parts(file_url, 25), "max_tokens": 4})],
        "two_different_videos": lambda s: [_post(s, {"messages": parts(file_url) + parts(video_url), "max_tokens": 4})],
        "sampling_values": sampling,
        "malformed_urls": lambda s: [_post(s, {"messages": parts(u)}) for u in (
            "file:///a%00b.mp4", "http://127.0.0.1:99999/v.mp4", "http://[::1/x", "file:///%ff", "ftp://x/y")],
        "ssrf_and_outside_root": lambda s: [_post(s, {"messages": parts(u)}) for u in (
            "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd", "file:///dev/zero")],
    }
    flood = media / "skip_frame_flood.mp4"
    if flood.exists():
        flood_url = "data:video/mp4;base64," + base64.b64encode(flood.read_bytes()).decode()
        cases["skip_frame_flood"] = lambda s: [_post(s, {"messages": parts(flood_url), "max_tokens": 4})]
    return cases


def drip_case(scale: float) -> dict:
    """A download from a server that drips a byte every 0.4 s, with a 3 s fetch timeout (in
    process: the server refuses loopback addresses, as it must)."""
    import http.server

    from videollama.serve import media
    from videollama.serve.limits import APIError, ServeLimits

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"v")
                    self.wfile.flush()
                    time.sleep(0.4)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    t0 = time.perf_counter()
    try:
        media.fetch_http(f"http://videos.test:{server.server_address[1]}/v", ServeLimits(fetch_timeout_s=3.0),
                         ("videos.test",), resolve=lambda h, p: ["127.0.0.1"], allow_private=True)
        statuses, outcome = [200], "not defended"
    except APIError as e:
        statuses, outcome = [e.status], "defended"
    seconds = time.perf_counter() - t0
    server.shutdown()
    return {"surface": "fetch", "case": "drip_1_byte_per_0.4s_3s_timeout", "outcome": outcome, "statuses": statuses,
            "seconds": seconds, "health_slowest_s": 0.0, "health_misses": 0, "rss_growth_mb_per_request": 0.0,
            "first_round_mb": 0.0, "peak_rss_mb": 0.0, "fivehundreds": 0}


def run(work: Path, model: str, scale: float) -> list[dict]:
    """Every server and chat case; the servers are started and stopped here."""
    results = [drip_case(scale)]
    mib = 1 << 20
    common = ["--model", model, "--request-timeout-s", "30", "--body-timeout-s", "10",
              "--max-body-bytes", str(int(64 * mib * scale)), "--max-inflight-body-bytes", str(int(128 * mib * scale))]
    for command, cases in ((["serve", *common, "--allowed-local-media-path", str(work / "media")], api_cases(work, scale)),
                           (["chat", *common], hostile_chat.chat_cases(work, scale))):
        server = Server(command, work, env={"VIDEOLLAMA_API_KEY": KEY})
        try:
            start = server.rss_mb()
            for name, fn in cases.items():
                results.append(run_case(server, name, command[0], fn))
            RSS_SPAN[command[0]] = (start, server.rss_mb())
        finally:
            server.stop()
    return results


def write_results(results: list[dict], out: Path, cpu: str, scale: float) -> str:
    bad = [r for r in results if r["outcome"] in ("crash", "hang", "error", "not defended")]
    fives = sum(r["fivehundreds"] for r in results)
    slowest = max(r["health_slowest_s"] for r in results)
    misses = sum(r["health_misses"] for r in results)
    growth = max(r["rss_growth_mb_per_request"] for r in results)
    lines = [
        "## Hostile clients: `videollama serve` and `videollama chat` (`bench/bench_hostile.py --only serve`)",
        "",
        f"{len(results)} cases against real servers on 127.0.0.1 (a tiny model, `--request-timeout-s 30 "
        f"--body-timeout-s 10`, the body limits and the hostile sizes at scale {scale:g} of the defaults and of "
        "the issue's sizes, every other limit at its default; each case run 3 times); "
        f"CPU: {cpu}. **crashes {sum(r['outcome'] == 'crash' for r in results)}, hangs "
        f"{sum(r['outcome'] == 'hang' for r in results)}, 500s {fives}, not defended "
        f"{len(bad)}**; `/health` asked every 0.1 s throughout: slowest answer {slowest:.3f} s, {misses} misses; "
        f"server RSS growth per hostile request after a case's first round at most {growth:+.1f} MB "
        f"(first rounds: at most {max(r['first_round_mb'] for r in results):+.1f} MB, the allocator keeping "
        "what a large body once needed). Statuses are the first round's; seconds the mean of a round.",
        "",
        "Server RSS from start to after its last case: " + "; ".join(
            f"`{name}` {a:.0f} -> {b:.0f} MB" for name, (a, b) in RSS_SPAN.items()) + ".",
        "",
        "| surface | case | outcome | statuses | seconds | /health slowest (s) | first round RSS (MB) | "
        "RSS growth / later request (MB) | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        statuses = ", ".join(str(s) for s in r["statuses"])
        lines.append(f"| {r['surface']} | {r['case']} | {r['outcome']} | {statuses} | {r['seconds']:.2f} | "
                     f"{r['health_slowest_s']:.3f} | {r['first_round_mb']:+.1f} | {r['rss_growth_mb_per_request']:+.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    flood = next((r for r in results if r["case"] == "skip_frame_flood"), None)
    if flood is not None:
        rounds = flood.get("round_s") or [flood["seconds"]]
        verdict = "met" if max(rounds) < FLOOD_TARGET_S else "not met"
        lines += ["", f"Skip-frame flood (a 48 KB data: URL) rejected in {max(rounds):.2f} s at the slowest of its "
                      f"rounds ({', '.join(f'{s:.2f}' for s in rounds)} s): the {FLOOD_TARGET_S:g} s target is "
                      f"{verdict}. The sandboxed decoder's pixel-weighted work bound (data/container.py) stops it; "
                      "`--decode-timeout-s` and the request deadline are the backstop."]
    text = "\n".join(lines) + "\n"
    from machine import stamped  # bench/machine.py: the CPU, its ISA, measured peak and bandwidth
    out.write_text(stamped(text))
    return text


def main(scale: float, out: Path, build_model, build_media) -> int:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    work = Path(tempfile.mkdtemp(prefix="videollama-hostile-serve-"))
    build_model(work / "model")
    (work / "media").mkdir()
    build_media(work / "media")
    results = run(work, str(work / "model"), scale)
    print(write_results(results, out, cpu, scale))
    return 0
