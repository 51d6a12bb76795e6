"""Real images for the fake's outputs: a gradient per (prompt, seed, index), in JPEG or PNG, cached.

Each file carries its request id and index in its metadata (a JPEG comment, a PNG `tEXt` chunk), so
every file's bytes differ although the pixels come from a cache of at most 64 gradients per size. An
image the safety checker flagged is black, as fal's are.
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

PALETTE_SIZE: Final = 64
BLACK: Final = -1
"""The palette index of a flagged image."""


def palette_index(prompt: str, seed: int | None, index: int) -> int:
    digest = hashlib.blake2b(f"{prompt}\0{seed}\0{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % PALETTE_SIZE


def _colours(index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The two colours (top, bottom) of palette entry ``index``."""
    if index == BLACK:
        return (0, 0, 0), (0, 0, 0)
    hue = (index * 0.6180339887) % 1.0
    top = colorsys.hsv_to_rgb(hue, 0.6, 0.95)
    bottom = colorsys.hsv_to_rgb((hue + 0.4) % 1.0, 0.8, 0.3)
    return (
        (round(top[0] * 255), round(top[1] * 255), round(top[2] * 255)),
        (round(bottom[0] * 255), round(bottom[1] * 255), round(bottom[2] * 255)),
    )


def render(width: int, height: int, colour: int, fmt: str) -> bytes:
    """A real ``width`` x ``height`` image (``jpeg`` or ``png``): a vertical gradient of palette entry ``colour``."""
    top, bottom = _colours(colour)
    strip = Image.new("RGB", (1, 256))
    strip.putdata([tuple(top[k] + (bottom[k] - top[k]) * i // 255 for k in range(3)) for i in range(256)])
    image = strip.resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def mark(data: bytes, fmt: str, text: str) -> bytes:
    """``data`` (from render()) with ``text`` written into its metadata."""
    payload = text.encode("latin-1", "replace")[:200]
    if fmt == "png":  # a tEXt chunk right after IHDR (bytes 8..33 of any PNG)
        chunk_data = b"Comment\0" + payload
        chunk = struct.pack(">I", len(chunk_data)) + b"tEXt" + chunk_data
        chunk += struct.pack(">I", zlib.crc32(b"tEXt" + chunk_data))
        return data[:33] + chunk + data[33:]
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + data[2:]  # a COM segment


class ImageCache:
    """LRU of rendered images keyed by (width, height, palette entry, format), bounded in bytes."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.renders = 0
        self._items: OrderedDict[tuple[int, int, int, str], bytes] = OrderedDict()

    def get(self, width: int, height: int, colour: int, fmt: str) -> bytes:
        key = (width, height, colour, fmt)
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
            return found
        found = render(width, height, colour, fmt)
        self.renders += 1
        self._items[key] = found
        self.size += len(found)
        while self.size > self.max_bytes and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped)
        return found

    def clear(self) -> None:
        self._items.clear()
        self.size = 0
