"""A model is a portable name with routes: the portable parameters map exactly onto each provider's inputs,
a provider's own inputs need a pin, and the order of preference is the settings' (mediagen.catalog.routes)."""

from __future__ import annotations

import pytest

from mediagen.catalog.catalog import Catalog
from mediagen.catalog.routes import Router
from mediagen.core.errors import InvalidParameters
from mediagen.settings import DEFAULT_MODELS, Settings

SCHNELL = "black-forest-labs/flux-schnell"


def router(order: list[str], per_model: dict[str, list[str]] | None = None) -> Router:
    return Router(Catalog(DEFAULT_MODELS), order, per_model, default_output_format="png")


def test_every_default_model_is_served_by_both_providers_in_the_order_given() -> None:
    both = router(["replicate", "fal"])
    assert all(both.providers(model) == ["replicate", "fal"] for model in DEFAULT_MODELS)
    assert router(["fal", "replicate"]).providers(SCHNELL) == ["fal", "replicate"]
    assert router(["replicate", "fal"], {SCHNELL: ["fal"]}).providers(SCHNELL) == ["fal"]


def test_the_portable_parameters_map_exactly_onto_each_provider() -> None:
    params = {"width": 512, "height": 512, "num_outputs": 2, "seed": 9, "output_format": "jpg"}

    replicate, fal = router(["replicate", "fal"]).routes(SCHNELL, "a fox", params)

    assert replicate.provider == "replicate" and replicate.model == SCHNELL
    assert replicate.input == {
        "prompt": "a fox",
        "aspect_ratio": "1:1",
        "megapixels": "0.25",
        "num_outputs": 2,
        "seed": 9,
        "output_format": "jpg",
    }
    assert fal.provider == "fal" and fal.model == "fal-ai/flux/schnell"
    assert fal.input == {
        "prompt": "a fox",
        "image_size": {"width": 512, "height": 512},
        "num_images": 2,
        "seed": 9,
        "output_format": "jpeg",
    }


def test_every_route_gets_the_same_seed_and_the_service_format() -> None:
    replicate, fal = router(["replicate", "fal"]).routes(SCHNELL, "a fox", {})

    assert replicate.input["seed"] == fal.input["seed"]
    assert replicate.input["output_format"] == fal.input["output_format"] == "png"


def test_a_size_one_provider_cannot_make_leaves_the_job_to_the_other() -> None:
    [fal] = router(["replicate", "fal"]).routes(SCHNELL, "a fox", {"width": 1000, "height": 600})

    assert fal.provider == "fal" and fal.input["image_size"] == {"width": 1000, "height": 600}


def test_parameters_no_provider_can_take_say_why_for_each() -> None:
    with pytest.raises(InvalidParameters) as refused:
        router(["replicate", "fal"]).routes(SCHNELL, "a fox", {"num_outputs": 9})

    messages = [problem["message"] for problem in refused.value.fields]
    assert any(m.startswith("replicate: ") for m in messages) and any(m.startswith("fal: ") for m in messages)


def test_a_providers_own_input_needs_a_pin_when_the_job_may_move() -> None:
    both = router(["replicate", "fal"])

    with pytest.raises(InvalidParameters) as refused:
        both.routes(SCHNELL, "a fox", {"aspect_ratio": "16:9"})
    [problem] = refused.value.fields
    assert problem["field"] == "parameters.aspect_ratio" and "pin it with parameters.provider" in problem["message"]

    [pinned] = both.routes(SCHNELL, "a fox", {"aspect_ratio": "16:9", "provider": "replicate"})
    assert (pinned.provider, pinned.input["aspect_ratio"]) == ("replicate", "16:9")
    [at_fal] = both.routes(SCHNELL, "a fox", {"acceleration": "high", "provider": "fal"})
    assert (at_fal.provider, at_fal.input["acceleration"]) == ("fal", "high")


def test_with_one_provider_the_job_is_as_good_as_pinned() -> None:
    [route] = router(["replicate"]).routes(SCHNELL, "a fox", {"aspect_ratio": "16:9"})

    assert route.input["aspect_ratio"] == "16:9"


def test_a_pin_to_a_provider_this_server_has_not_is_refused() -> None:
    with pytest.raises(InvalidParameters) as refused:
        router(["replicate"]).routes(SCHNELL, "a fox", {"provider": "fal"})

    assert refused.value.fields[0]["field"] == "parameters.provider"


def test_fal_refuses_what_it_does_not_make() -> None:
    with pytest.raises(InvalidParameters) as refused:
        router(["fal"]).routes(SCHNELL, "a fox", {"output_format": "webp"})

    assert refused.value.fields[0]["field"] == "parameters.output_format"


def test_the_default_order_is_the_configured_providers_replicate_first() -> None:
    assert Settings(_env_file=None).provider_order == ["replicate"]
    both = Settings(_env_file=None, replicate_base_url="http://127.0.0.1:9", fal_base_url="http://127.0.0.1:8")
    assert both.provider_order == ["replicate", "fal"]
    assert Settings(_env_file=None, fal_key="k").provider_order == ["fal"]
    assert Settings(_env_file=None, providers="fal,replicate").provider_order == ["fal", "replicate"]
