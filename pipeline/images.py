"""The one decompression-bomb limit for every stage that opens images (a module of its own, so that scan
does not depend on the model-running code that caption, tag and cache share)."""

from __future__ import annotations

from PIL import Image


def allow_pixels(max_pixels: int) -> None:
    """scan.max_pixels as Pillow's limit: scan accepts an image only under it, and caption, tag and cache
    must open whatever scan accepted."""
    Image.MAX_IMAGE_PIXELS = max_pixels
