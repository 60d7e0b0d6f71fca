"""Images in API requests: data URLs always; http(s) URLs only when an allow-list permits them."""
from __future__ import annotations

from typing import Callable

from PIL import Image

from vlmguard.errors import InvalidInput
from vlmguard.images import image_from_bytes, image_from_data_url


def make_image_resolver(allowlist: list[str], *, timeout_s: float = 10.0,
                        max_bytes: int = 20 * 1024 * 1024) -> Callable[[str], Image.Image]:
    """``resolve(url) -> RGB image`` with clear :class:`InvalidInput` errors.

    ``allowlist`` holds URL prefixes (``https://images.example.org/``); an empty list turns URLs off.
    Redirects are not followed (they could leave the allow-list).
    """

    def resolve(url: str) -> Image.Image:
        if not isinstance(url, str) or not url:
            raise InvalidInput("image URL is empty")
        if url.startswith("data:"):
            return image_from_data_url(url)
        if not url.startswith(("http://", "https://")):
            raise InvalidInput("image URL must be a data URL (data:image/png;base64,...) or an http(s) URL")
        if not allowlist:
            raise InvalidInput("image URLs are turned off on this server; send the image as a data URL "
                               "(data:image/png;base64,...)")
        if not any(url.startswith(prefix) for prefix in allowlist):
            raise InvalidInput("image URL is not on this server's allow-list")
        import httpx

        try:
            with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
                with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise InvalidInput(f"fetching the image URL failed: HTTP {resp.status_code}")
                    data = bytearray()
                    for chunk in resp.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise InvalidInput(f"image at URL exceeds {max_bytes // (1024 * 1024)} MiB")
        except httpx.HTTPError as e:
            raise InvalidInput(f"fetching the image URL failed: {type(e).__name__}") from None
        return image_from_bytes(bytes(data), what="image at URL")

    return resolve
