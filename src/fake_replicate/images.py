"""Real images for the fake's outputs: a gradient per (prompt, seed, index), in PNG, WebP or JPEG, cached.

Each file is marked with its prediction and index (a PNG `tEXt` chunk, a JPEG comment, WebP XMP), so
every file's bytes differ although the pixels come from a cache of at most 64 gradients per size.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import struct
import zlib
from collections import OrderedDict
from typing import Final

from PIL import Image

# --------------------------------------------------------------------------- images


def _palette_entry(index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two colours (top, bottom) of palette entry ``index`` (deterministic)."""
    hue = (index * 0.6180339887) % 1.0
    top = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    bottom = colorsys.hsv_to_rgb((hue + 0.35) % 1.0, 0.8, 0.35)
    return (
        (round(top[0] * 255), round(top[1] * 255), round(top[2] * 255)),
        (round(bottom[0] * 255), round(bottom[1] * 255), round(bottom[2] * 255)),
    )


PALETTE_SIZE: Final = 64


def palette_index(prompt: str, seed: int | None, index: int) -> int:
    digest = hashlib.blake2b(f"{prompt}\0{seed}\0{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % PALETTE_SIZE


MARK_BYTES: Final = 96
_XMP_PLACEHOLDER: Final = b"\0" * MARK_BYTES


def render(width: int, height: int, colour: int, fmt: str = "png") -> bytes:
    """A real width x height image (``png``, ``webp`` or ``jpg``): a vertical gradient of palette entry ``colour``."""
    top, bottom = _palette_entry(colour)
    strip = Image.new("RGB", (1, 256))
    strip.putdata([tuple(top[k] + (bottom[k] - top[k]) * i // 255 for k in range(3)) for i in range(256)])
    image = strip.resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    if fmt == "webp":
        # method 0: the fastest encoder; the XMP placeholder is overwritten per file (see mark()).
        image.save(buffer, "WEBP", quality=80, method=0, xmp=_XMP_PLACEHOLDER)
    elif fmt == "jpg":
        image.save(buffer, "JPEG", quality=80)
    else:
        image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def render_png(width: int, height: int, colour: int) -> bytes:
    return render(width, height, colour, "png")


def mark(data: bytes, fmt: str, text: str) -> bytes:
    """``data`` (from render()) with ``text`` written into its metadata."""
    if fmt == "png":
        return with_text_chunk(data, "Comment", text)
    payload = text.encode("latin-1", "replace")[:MARK_BYTES]
    if fmt == "jpg":  # a COM segment right after SOI
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
    at = data.rfind(_XMP_PLACEHOLDER)
    if at < 0:
        return data
    return data[:at] + payload.ljust(MARK_BYTES, b" ") + data[at + MARK_BYTES :]


def with_text_chunk(png: bytes, keyword: str, text: str) -> bytes:
    """Insert a ``tEXt`` chunk right after IHDR (bytes 8..33 of any PNG)."""
    data = keyword.encode("latin-1") + b"\0" + text.encode("latin-1", "replace")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:33] + chunk + png[33:]


class PngCache:
    """LRU of rendered images keyed by (width, height, palette entry, format), bounded in bytes."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.renders = 0
        self._items: OrderedDict[tuple[int, int, int, str], bytes] = OrderedDict()

    def get(self, width: int, height: int, colour: int, fmt: str = "png") -> bytes:
        key = (width, height, colour, fmt)
        png = self._items.get(key)
        if png is not None:
            self._items.move_to_end(key)
            return png
        png = render(width, height, colour, fmt)
        self.renders += 1
        self._items[key] = png
        self.size += len(png)
        while self.size > self.max_bytes and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped)
        return png

    def clear(self) -> None:
        self._items.clear()
        self.size = 0
