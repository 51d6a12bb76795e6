"""Prices per model: Replicate's list prices by default, overridable, and None when unknown."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from mediagen.core.pricing import Price, cost, parse_prices, price_for
from mediagen.settings import Settings


def test_default_models_are_priced_per_image_as_replicate_lists_them() -> None:
    table = parse_prices({})
    assert price_for("black-forest-labs/flux-schnell", table) == Price(Decimal("0.003"), "image")
    assert price_for("black-forest-labs/flux-1.1-pro", table) == Price(Decimal("0.04"), "image")
    assert cost("black-forest-labs/flux-dev", 3, 1.2, table) == Decimal("0.075")


def test_an_unknown_model_costs_none_not_zero() -> None:
    table = parse_prices({})
    assert price_for("someone/else", table) is None
    assert cost("someone/else", 2, 1.0, table) is None
    assert cost("black-forest-labs/flux-dev", None, 1.0, table) is None


def test_settings_override_add_and_forget_prices() -> None:
    settings = Settings(
        model_prices={
            "black-forest-labs/flux-schnell": {"per_image": "0.01"},
            "acme/video": {"per_second": 0.5},
            "stability-ai/stable-diffusion-3.5-large": None,
        }
    )
    table = settings.price_table
    assert cost("black-forest-labs/flux-schnell", 2, None, table) == Decimal("0.02")
    assert cost("acme/video", None, 3.0, table) == Decimal("1.5")
    assert cost("acme/video", 1, None, table) is None
    assert price_for("stability-ai/stable-diffusion-3.5-large", table) is None


def test_settings_read_prices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIAGEN_MODEL_PRICES", '{"acme/x": {"per_image": "0.2"}}')
    assert Settings().price_table["acme/x"] == Price(Decimal("0.2"), "image")


@pytest.mark.parametrize(
    "bad",
    [{"acme/x": {"per_frame": 1}}, {"acme/x": {"per_image": "lots"}}, {"acme/x": {"per_image": -1}}, {"acme/x": 3}],
)
def test_a_malformed_price_table_is_refused_at_startup(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(model_prices=bad)
