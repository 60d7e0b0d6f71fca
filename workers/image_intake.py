"""Images in API requests: data URLs always; http(s) URLs only when an allow-list permits them; ``file://`` URLs
only below a folder the server names (``allowed_local_media_path``, vLLM's option: offline batches of local
images)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image

from vlmguard.errors import InvalidInput
from vlmguard.images import image_from_bytes, image_from_data_url


def make_image_resolver(allowlist: list[str], *, timeout_s: float = 10.0, max_bytes: int = 20 * 1024 * 1024,
                        local_root: str | Path | None = None) -> Callable[[str], Image.Image]:
    """``resolve(url) -> RGB image`` with clear :class:`InvalidInput` errors.

    ``allowlist`` holds URL prefixes (``https://images.example.org/``); an empty list turns URLs off.
    Redirects are not followed (they could leave the allow-list). ``local_root``: ``file://`` URLs of files below
    this folder are read (symbolic links resolved first, so none leads out of it); None turns them off.
    """
    root = Path(local_root).resolve() if local_root is not None else None

    def resolve(url: str) -> Image.Image:
        if not isinstance(url, str) or not url:
            raise InvalidInput("image URL is empty")
        if url.startswith("data:"):
            return image_from_data_url(url)
        if url.startswith("file:"):
            return _local_image(url, root, max_bytes)
        if not url.startswith(("http://", "https://")):
            raise InvalidInput("image URL must be a data URL (data:image/png;base64,...) or an http(s) URL")
        if not allowlist:
            raise InvalidInput("image URLs are turned off on this server; send the image as a data URL "
                               "(data:image/png;base64,...)")
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise InvalidInput(f"image URL is not a valid URL: {e}") from None
        if not any(_on_allowlist(url, target, prefix) for prefix in allowlist):
            raise InvalidInput("image URL is not on this server's allow-list")

        try:
            with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
                with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise InvalidInput(f"fetching the image URL failed: HTTP {resp.status_code}")
                    data = bytearray()
                    for chunk in resp.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise InvalidInput(f"image at URL exceeds {_size(max_bytes)}")
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise InvalidInput(f"fetching the image URL failed: {type(e).__name__}") from None
        return image_from_bytes(bytes(data), what="image at URL")

    return resolve


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def _local_image(url: str, root: Path | None, max_bytes: int) -> Image.Image:
    """The image a ``file://`` URL names, when it lies below ``root``."""
    if root is None:
        raise InvalidInput("file:// image URLs are turned off on this server (allowed_local_media_path; "
                           "vlmguard run-batch --allowed-local-media-path); send the image as a data URL")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise InvalidInput("a file:// image URL names a local path: file:///path/to/image.png")
    path = Path(unquote(parts.path)).resolve()
    if not path.is_relative_to(root):
        raise InvalidInput(f"image file is not below this server's allowed folder {root}")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise InvalidInput(f"image file exceeds {_size(max_bytes)}: {path}")
            data = f.read()
    except FileNotFoundError:
        raise InvalidInput(f"image file not found: {path}") from None
    except OSError as e:
        raise InvalidInput(f"image file cannot be read: {path} ({e.strerror or e})") from None
    return image_from_bytes(data, what=f"image file {path.name}")


def _on_allowlist(url: str, target: httpx.URL, prefix: str) -> bool:
    """``url`` (parsed: ``target``) starts with ``prefix`` as a string *and* as a URL: the same scheme, host and
    port, no user info, no dot segments, and a path that starts with the prefix's path (end an entry with ``/``
    to admit one folder only). A string prefix alone lets a prefix without its
    trailing slash match other hosts (``https://images.example.org.evil.com/``,
    ``https://images.example.org@evil.com/``), and dot segments (``/img/../x``, ``/img/%2e%2e/x``) out of a path."""
    if not url.startswith(prefix) or target.userinfo:
        return False
    if any(seg in (".", "..") for seg in target.path.replace("\\", "/").split("/")):  # decoded: %2e%2e too
        return False
    try:
        allowed = httpx.URL(prefix)
    except httpx.InvalidURL:
        return False
    return ((target.scheme, target.host, target.port) == (allowed.scheme, allowed.host, allowed.port)
            and target.path.startswith(allowed.path))
