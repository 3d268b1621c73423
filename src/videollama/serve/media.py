"""A request's video: its bytes from a ``video_url`` (serve/frames.py decodes them, out of process).

Sources (anything else is refused with a 400):

* ``data:video/...;base64,...``: decoded only if its size is within ``max_video_bytes`` (413);
* ``file:///abs/path``: only under ``--allowed-local-media-path`` (after resolving links), a
  regular file, size-capped;
* ``http(s)://host/...``: only when ``host`` is in ``--allowed-media-domains`` (exact name, or
  ``.example.com`` / ``*.example.com`` for its subdomains). The name is resolved once; every
  address must be public (private, loopback, link-local, multicast, reserved, unspecified and
  IPv4-mapped forms of them are refused); the connection goes to that pinned address (Host
  header and TLS SNI keep the name), redirects are refused, the download is capped in bytes and
  time. That is the SSRF defence of CVE-2025-6242.

A URL that does not parse (a NUL byte, port 99999, ``http://[::1/x``) is a 400 like any other
refusal. The download's time limit is a total, connect to last byte, never longer than what is
left of the request's deadline (a server that drips a byte at a time cannot stretch it).

Decoding the bytes into the model's windows is serve/frames.py's (sandboxed children).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import time
import urllib.parse
from pathlib import Path

from videollama.serve.limits import APIError, ServeLimits, deadline_error, too_large


def _bad(message: str, code: str = "invalid_video_url") -> APIError:
    return APIError(400, message, code=code, param="messages")


# ---- bytes ------------------------------------------------------------------------------------

def video_bytes(url: str, limits: ServeLimits, *, allowed_local_path: Path | None = None,
                allowed_domains: tuple[str, ...] = (), resolve=None, deadline: float | None = None) -> bytes:
    """The bytes a ``video_url`` names, within the server's allowlists and ``max_video_bytes``;
    ``deadline``: the request's (``time.monotonic()``), which a download never outlasts."""
    if not isinstance(url, str) or not url:
        raise _bad("video_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    try:
        if scheme == "data":
            return _data_url(url, limits)
        if scheme == "file":
            return _file_url(url, limits, allowed_local_path)
        if scheme in ("http", "https"):
            return fetch_http(url, limits, allowed_domains, resolve=resolve, deadline=deadline)
    except (ValueError, UnicodeError) as e:  # what urllib and os say of a malformed URL or path
        raise _bad(f"the video URL is malformed: {e}") from None
    raise _bad(f"video_url scheme {scheme or '(none)'!r} is not supported: use data:, file: or http(s):")


def _data_url(url: str, limits: ServeLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:video/") or not header.lower().endswith(";base64"):
        raise _bad("a data URL video must be data:video/<type>;base64,<data>")
    # The decoded size is known from the text's length: refuse before decoding anything.
    size = len(payload) * 3 // 4
    if size > limits.max_video_bytes + 3:
        raise too_large("the video", size, limits.max_video_bytes, "--max-video-bytes", "messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise _bad("the data URL's base64 payload is not valid base64") from None
    if len(data) > limits.max_video_bytes:
        raise too_large("the video", len(data), limits.max_video_bytes, "--max-video-bytes", "messages")
    return data


def _file_url(url: str, limits: ServeLimits, root: Path | None) -> bytes:
    from videollama.data.errors import BadSample
    from videollama.data.safe_io import check_regular_file

    if root is None:
        raise _bad("file:// video URLs are disabled on this server (no --allowed-local-media-path)")
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise _bad(f"file URL with a host ({parsed.netloc!r}) is not supported")
    path = Path(urllib.parse.unquote(parsed.path, errors="strict"))
    if "\x00" in str(path):
        raise _bad("a file:// URL may not hold a NUL byte")
    if not path.is_absolute():
        raise _bad("a file:// URL needs an absolute path")
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        raise _bad(f"{path} is outside the allowed local media folder", code="outside_allowed_path")
    try:
        info = check_regular_file(real, "video")
    except (OSError, ValueError, BadSample) as e:
        raise _bad(f"{path}: {e}") from None
    if info.st_size > limits.max_video_bytes:
        raise too_large(f"{path}", info.st_size, limits.max_video_bytes, "--max-video-bytes", "messages")
    with open(real, "rb") as f:
        data = f.read(limits.max_video_bytes + 1)
    if len(data) > limits.max_video_bytes:
        raise too_large(f"{path}", len(data), limits.max_video_bytes, "--max-video-bytes", "messages")
    return data


def domain_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            entry = entry[1:]
        if host == entry or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


def public_address(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_reserved or ip.is_unspecified)


def _resolve(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def fetch_http(url: str, limits: ServeLimits, allowed_domains: tuple[str, ...], *, resolve=None,
               allow_private: bool = False, deadline: float | None = None) -> bytes:
    """GET an allowlisted http(s) URL at one pinned public address; no redirects, capped size,
    at most ``--fetch-timeout-s`` in all (and never past ``deadline``, the request's).

    ``resolve(host, port) -> [address]`` replaces DNS (tests); ``allow_private`` only for tests
    of the transfer itself against a loopback server.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        raise _bad("the video URL has no host")
    if parts.username or parts.password:
        raise _bad("credentials in a video URL are not accepted")
    if not domain_allowed(host, allowed_domains):
        raise _bad(f"fetching videos from {host!r} is not allowed on this server (--allowed-media-domains)",
                   code="domain_not_allowed")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    budget = limits.fetch_timeout_s
    by_deadline = deadline is not None and deadline - time.monotonic() < budget
    if by_deadline:
        budget = deadline - time.monotonic()
        if budget <= 0:
            raise deadline_error(limits)
    try:
        addresses = (resolve or _resolve)(host, port)
    except OSError as e:
        raise _bad(f"cannot resolve {host!r}: {e}") from None
    if not addresses:
        raise _bad(f"{host!r} resolves to no address")
    if not allow_private and not all(public_address(a) for a in addresses):
        raise _bad(f"{host!r} resolves to a private, loopback or otherwise non-public address: refused",
                   code="private_address")
    pinned = addresses[0]
    netloc = f"[{pinned}]:{port}" if ":" in pinned else f"{pinned}:{port}"
    target = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
    # The transfer runs on an event loop of its own, so that one timer bounds all of it: httpx's
    # own timeouts are per read, and a byte every few seconds would reset them forever.
    try:
        return asyncio.run(asyncio.wait_for(_download(url, target, headers, extensions, limits), budget))
    except asyncio.TimeoutError:
        if by_deadline:
            raise deadline_error(limits) from None
        raise _bad(f"fetching {url} took over {budget:g} s (--fetch-timeout-s)", "fetch_timeout") from None


async def _download(url: str, target: str, headers: dict, extensions: dict, limits: ServeLimits) -> bytes:
    import httpx

    cap = limits.max_video_bytes
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=limits.fetch_timeout_s, trust_env=False) as client:
            async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                if response.is_redirect:
                    raise _bad(f"{url} redirects; redirects are not followed")
                if response.status_code != 200:
                    raise _bad(f"{url} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cap:
                    raise too_large(url, int(declared), cap, "--max-video-bytes", "messages")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise too_large(url, size, cap, "--max-video-bytes", "messages")
                    chunks.append(chunk)
    except httpx.HTTPError as e:
        raise _bad(f"fetching {url} failed: {type(e).__name__}: {e}") from None
    return b"".join(chunks)
