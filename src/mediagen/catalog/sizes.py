"""The pixel sizes a model can make, and the portable `width`/`height` mapped onto them exactly.

Models without size inputs take an aspect ratio (and, for flux, a megapixel count) instead. A client's
`width`/`height` become those inputs only when a size the model makes matches exactly: anything else is
refused with the list of sizes it can make, never silently turned into another size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# cog-flux's ASPECT_RATIOS at 1 megapixel; megapixels "0.25" halves both sides
# (shared/replicate-models.md §2.1, from the model's predict.py).
FLUX_1MP: Final[Mapping[str, tuple[int, int]]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
FLUX_MEGAPIXELS: Final[Mapping[str, int]] = {"1": 1, "0.25": 2}  # the divisor of each side

# Models that round a custom size (flux-1.1-pro: to a multiple of 32, §2.3): only exact multiples are
# sent, so the size asked for is the size made.
SIZE_STEP: Final[Mapping[str, int]] = {"black-forest-labs/flux-1.1-pro": 32}


@dataclass(frozen=True)
class Size:
    width: int
    height: int
    input: Mapping[str, str]
    """The model inputs that make this size, e.g. `{"aspect_ratio": "1:1", "megapixels": "0.25"}`."""

    def as_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, **self.input}

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def enum_of(properties: Mapping[str, Any], name: str) -> list[Any]:
    prop = properties.get(name)
    return list(prop.get("enum", [])) if isinstance(prop, Mapping) else []


def flux_sizes(properties: Mapping[str, Any]) -> list[Size]:
    """The sizes of a cog-flux model (aspect_ratio x megapixels), or [] when the model is not one."""
    ratios, megapixels = enum_of(properties, "aspect_ratio"), enum_of(properties, "megapixels")
    if not ratios or not megapixels or not set(megapixels) <= set(FLUX_MEGAPIXELS):
        return []
    sizes = []
    for mp in megapixels:
        for ratio in ratios:
            if ratio in FLUX_1MP:
                width, height = FLUX_1MP[ratio]
                divisor = FLUX_MEGAPIXELS[mp]
                sizes.append(Size(width // divisor, height // divisor, {"aspect_ratio": ratio, "megapixels": mp}))
    return sizes
