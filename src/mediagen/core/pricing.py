"""What a model costs: a price per output image, per second of prediction time or per megapixel made, per
model and provider (a model's name at its provider: Replicate's `owner/name`, fal's endpoint id).

The defaults are Replicate's list prices for the four default models (shared/replicate-models.md §4,
transcribed from replicate.com/pricing on 2026-10-07; SD3.5-large from third parties only). The
official models bill per output image, not per GPU-second. fal bills these four per megapixel of output,
each image's megapixels rounded up (fal's list prices as we knew them, not checked against fal's pages:
check them, and override here, before trusting a bill). `MEDIAGEN_MODEL_PRICES` (JSON) overrides
or adds models: `{"owner/name": {"per_image": "0.003"}}`, `{"owner/name": {"per_second": "0.000725"}}`,
`{"fal-ai/flux/dev": {"per_megapixel": "0.025"}}`,
or `{"owner/name": null}` for "unknown". A model without a price costs `None`, never 0: we do not
pretend to know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

Unit = Literal["image", "second", "megapixel"]


@dataclass(frozen=True)
class Price:
    usd: Decimal
    unit: Unit

    def as_json(self) -> dict[str, Any]:
        return {"usd": str(self.usd), "per": self.unit}


DEFAULT_PRICES: Mapping[str, Price | None] = {
    "black-forest-labs/flux-schnell": Price(Decimal("0.003"), "image"),
    "black-forest-labs/flux-dev": Price(Decimal("0.025"), "image"),
    "black-forest-labs/flux-1.1-pro": Price(Decimal("0.04"), "image"),
    "stability-ai/stable-diffusion-3.5-large": Price(Decimal("0.065"), "image"),
    "fal-ai/flux/schnell": Price(Decimal("0.003"), "megapixel"),
    "fal-ai/flux/dev": Price(Decimal("0.025"), "megapixel"),
    "fal-ai/flux-pro/v1.1": Price(Decimal("0.04"), "megapixel"),
    "fal-ai/stable-diffusion-v35-large": Price(Decimal("0.065"), "megapixel"),
}


def parse_prices(overrides: Mapping[str, Any]) -> dict[str, Price | None]:
    """The default table with `overrides` (the decoded `MEDIAGEN_MODEL_PRICES`) applied; ValueError if malformed."""
    table: dict[str, Price | None] = dict(DEFAULT_PRICES)
    for model, spec in overrides.items():
        if spec is None:
            table[model] = None
            continue
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ValueError(
                f"{model}: expected {{'per_image': USD}}, {{'per_second': USD}}, {{'per_megapixel': USD}} or null"
            )
        ((key, amount),) = spec.items()
        units: dict[str, Unit] = {"per_image": "image", "per_second": "second", "per_megapixel": "megapixel"}
        if key not in units or isinstance(amount, bool):
            raise ValueError(f"{model}: expected per_image, per_second or per_megapixel, got {key!r}")
        try:
            usd = Decimal(str(amount))
        except InvalidOperation:
            raise ValueError(f"{model}: {amount!r} is not a number") from None
        if not usd.is_finite() or usd < 0:
            raise ValueError(f"{model}: a price must be a finite number >= 0")
        table[model] = Price(usd, units[key])
    return table


def price_for(model: str, table: Mapping[str, Price | None]) -> Price | None:
    """The model's price in `table` (settings' `price_table`), or None when unknown."""
    return table.get(model)


def cost(
    model: str,
    image_count: int | None,
    predict_time: float | None,
    table: Mapping[str, Price | None],
    megapixels: int | None = None,
) -> Decimal | None:
    """What one prediction of `model` cost in USD, or None when the price or the needed metric is unknown
    (`megapixels`: the images' megapixels, each rounded up, as the provider reports them)."""
    price = price_for(model, table)
    if price is None:
        return None
    if price.unit == "megapixel":
        return None if megapixels is None else price.usd * megapixels
    if price.unit == "image":
        return None if image_count is None else price.usd * image_count
    return None if predict_time is None else (price.usd * Decimal(str(predict_time))).quantize(Decimal("0.000001"))
