"""The default models at fal.ai: each one's endpoint and input schema, and the portable parameters mapped
onto fal's inputs exactly.

fal's inputs differ from Replicate's (fal's model pages, and the fake fal's `fake_fal.models`, which
follows them): the size is `image_size`, one of six named sizes or `{width, height}`; the count is
`num_images` (1 to 4); `output_format` is `jpeg` or `png`. The portable parameters map so:

* `width`/`height` → `image_size: {width, height}`, both or neither (fal makes the size asked for);
* `num_outputs` → `num_images`;
* `seed` → `seed`, chosen here when absent (the input then names one request, as on Replicate);
* `output_format` → `output_format` (`jpg` is fal's `jpeg`; `webp` it does not make: a 422 says so);
  the service default (`MEDIAGEN_DEFAULT_OUTPUT_FORMAT`) when the client chose none and fal makes it.

Any other parameter is the model's own input at fal, checked against the schema below (a job pinned
to fal only: see mediagen.catalog.routes).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Final

from mediagen.catalog.schema import ModelSchema, integral, problem
from mediagen.core.errors import InvalidParameters

ENDPOINTS: Final[Mapping[str, str]] = {
    "black-forest-labs/flux-schnell": "fal-ai/flux/schnell",
    "black-forest-labs/flux-dev": "fal-ai/flux/dev",
    "black-forest-labs/flux-1.1-pro": "fal-ai/flux-pro/v1.1",
    "stability-ai/stable-diffusion-3.5-large": "fal-ai/stable-diffusion-v35-large",
}
"""The portable model name → fal's endpoint id."""

IMAGE_SIZES: Final[Mapping[str, tuple[int, int]]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
MAX_SIDE: Final = 14142
FORMATS: Final[Mapping[str, str]] = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}
SEED_MAX: Final = 2**31 - 1


def _common(steps: tuple[int, int, int] | None, guidance: tuple[float, float, float] | None) -> dict[str, Any]:
    side = {"type": "integer", "minimum": 1, "maximum": MAX_SIDE}
    properties: dict[str, Any] = {
        "prompt": {"type": "string", "x-order": 0},
        "image_size": {
            "anyOf": [
                {"enum": list(IMAGE_SIZES)},
                {
                    "type": "object",
                    "properties": {"width": side, "height": side},
                    "required": ["width", "height"],
                    "additionalProperties": False,
                },
            ],
            "default": "landscape_4_3",
            "x-order": 1,
        },
        "num_images": {"type": "integer", "minimum": 1, "maximum": 4, "default": 1, "x-order": 2},
        "seed": {"type": "integer", "minimum": 0, "x-order": 3},
        "output_format": {"enum": ["jpeg", "png"], "default": "jpeg", "x-order": 4},
        "enable_safety_checker": {"type": "boolean", "default": True, "x-order": 5},
        "sync_mode": {"type": "boolean", "default": False, "x-order": 6},
    }
    if steps is not None:
        properties["num_inference_steps"] = _ranged("integer", steps, 7)
    if guidance is not None:
        properties["guidance_scale"] = _ranged("number", guidance, 8)
    return properties


def _ranged(kind: str, limits: tuple[float, float, float], order: int) -> dict[str, Any]:
    """A number input's schema from its (default, minimum, maximum)."""
    default, minimum, maximum = limits
    return {"type": kind, "default": default, "minimum": minimum, "maximum": maximum, "x-order": order}


_ACCELERATION: Final = {"enum": ["none", "regular", "high"], "default": "none", "x-order": 9}


def _inputs(endpoint: str) -> dict[str, Any]:
    if endpoint == "fal-ai/flux/schnell":
        return {**_common((4, 1, 12), None), "acceleration": _ACCELERATION}
    if endpoint == "fal-ai/flux/dev":
        return {**_common((28, 1, 50), (3.5, 1, 20)), "acceleration": _ACCELERATION}
    if endpoint == "fal-ai/flux-pro/v1.1":
        return {
            **_common(None, None),
            "safety_tolerance": {"enum": ["1", "2", "3", "4", "5", "6"], "default": "2", "x-order": 9},
            "enhance_prompt": {"type": "boolean", "default": False, "x-order": 10},
        }
    return {**_common((28, 1, 50), (3.5, 0, 20)), "negative_prompt": {"type": "string", "default": "", "x-order": 9}}


def schema(model: str) -> ModelSchema | None:
    """The fal schema of a portable model name, or None when fal does not serve it here."""
    endpoint = ENDPOINTS.get(model)
    if endpoint is None:
        return None
    document = {
        "components": {
            "schemas": {
                "Input": {"type": "object", "properties": _inputs(endpoint), "required": ["prompt"]},
                "Output": {"type": "array", "items": {"type": "string", "format": "uri"}},
            }
        }
    }
    return ModelSchema.from_openapi(endpoint, None, document, source="fal")


def build_input(
    schema: ModelSchema, prompt: str, parameters: Mapping[str, Any], *, default_output_format: str = ""
) -> dict[str, Any]:
    """The exact fal input for this prompt and parameters (portable ones mapped, the rest fal's own);
    InvalidParameters naming each bad field."""
    params = {key: integral(value) for key, value in parameters.items() if value is not None}
    problems: list[dict[str, str]] = []
    if "prompt" in params:
        problems.append(problem("prompt", "give the prompt at the top level", "forbidden"))
        params.pop("prompt")
    width, height = params.pop("width", None), params.pop("height", None)
    if width is not None or height is not None:
        if width is None or height is None:
            missing = "height" if height is None else "width"
            problems.append(problem(missing, "give both width and height, or neither", "required"))
        elif "image_size" in params:
            problems.append(problem("image_size", "give width and height, or image_size, not both", "size"))
        else:
            params["image_size"] = {"width": width, "height": height}
    if "num_outputs" in params:
        if "num_images" in params:
            problems.append(problem("num_images", "give num_outputs or num_images, not both", "num_outputs"))
        params["num_images"] = params.pop("num_outputs")
    chosen = params.get("output_format")
    if isinstance(chosen, str) and chosen in FORMATS:
        params["output_format"] = FORMATS[chosen]
    elif chosen is not None:
        problems.append(problem("output_format", f"fal makes {', '.join(sorted(set(FORMATS)))} only", "enum"))
        params.pop("output_format")
    elif default_output_format in FORMATS:
        params["output_format"] = FORMATS[default_output_format]
    if not problems:
        problems = schema.check(prompt, params)
    if problems:
        raise InvalidParameters(schema.model, problems)
    if params.get("seed") is None:
        params["seed"] = random.randint(0, SEED_MAX)
    return {"prompt": prompt, **params}
