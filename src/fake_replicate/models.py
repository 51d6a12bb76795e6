"""The models the fake serves, each as Replicate describes and runs it (shared/replicate-models.md §2).

Each `ModelSpec` carries the model's Input fields in Cog's shape (enums as `$ref` components, `x-order`,
defaults), its Output kind (a list of URIs or one URI), the pixel size it renders for its size inputs,
and whether it writes tqdm progress and drops NSFW-flagged images. A model the fake does not know gets
`GENERIC`: the old all-purpose inputs (width/height/num_outputs/seed/negative_prompt) and PNG lists, so
stand-in model names keep working.

Validation follows Replicate (§3): unknown input keys are ignored; a missing prompt, a wrong type, a
value out of range or not in the enum is a 422 `Input validation failed` with gojsonschema-style
`invalid_fields` (`required`, `invalid_type`, `number_gte`, `number_lte`, `enum`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final, Literal

JSON = dict[str, Any]
FieldError = tuple[str, str, str]

ASPECT_RATIOS: Final = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
FORMATS: Final = ("webp", "jpg", "png")

# cog-flux's ASPECT_RATIOS at 1 megapixel; "0.25" megapixels halves both sides (§2.1).
FLUX_SIZES: Final[dict[str, tuple[int, int]]] = {
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


@dataclass(frozen=True)
class Input:
    name: str
    type: Literal["string", "integer", "number", "boolean"]
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[Any, ...] | None = None
    format: str | None = None
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    inputs: tuple[Input, ...]
    output: Literal["list", "string"] = "list"
    sizing: Literal["flux", "custom", "ratio", "generic", "video"] = "flux"
    progress: bool = False
    nsfw_drop: bool = False
    default_format: str = "webp"

    def prop(self, name: str) -> Input | None:
        return next((item for item in self.inputs if item.name == name), None)


PROMPT = Input("prompt", "string", description="Prompt for generated image")
SEED = Input("seed", "integer", description="Random seed. Set for reproducible generation")
OUTPUT_FORMAT = Input("output_format", "string", "webp", enum=FORMATS, description="Format of the output images")
OUTPUT_QUALITY = Input("output_quality", "integer", 80, 0, 100, description="Quality when saving the output images")
MEGAPIXELS = Input("megapixels", "string", "1", enum=("1", "0.25"), description="Approximate number of megapixels")
NUM_OUTPUTS = Input("num_outputs", "integer", 1, 1, 4, description="Number of outputs to generate")
FLUX_RATIO = Input(
    "aspect_ratio", "string", "1:1", enum=ASPECT_RATIOS, description="Aspect ratio for the generated image"
)
NO_SAFETY = Input("disable_safety_checker", "boolean", False, description="Disable safety checker")
GO_FAST = Input("go_fast", "boolean", True, description="Run faster predictions with fp8 quantization")
# What flux-schnell and flux-dev both end with, in x-order.
FLUX_TAIL: Final = (SEED, OUTPUT_FORMAT, OUTPUT_QUALITY, NO_SAFETY, GO_FAST, MEGAPIXELS)

FLUX_SCHNELL = ModelSpec(
    "black-forest-labs/flux-schnell",
    "c846a69991daf4c0e5d016514849d14ee5b2e6846ce6b9d6f21369e564cfe51e",
    (
        PROMPT,
        FLUX_RATIO,
        NUM_OUTPUTS,
        Input("num_inference_steps", "integer", 4, 1, 4, description="Number of denoising steps"),
        *FLUX_TAIL,
    ),
    progress=True,
    nsfw_drop=True,
)
FLUX_DEV = ModelSpec(
    "black-forest-labs/flux-dev",
    "6e4a938f85952bdabcc15aa329178c4d681c52bf25a0342403287dc26944661d",
    (
        PROMPT,
        FLUX_RATIO,
        Input("image", "string", format="uri", description="Input image for image to image mode"),
        Input("prompt_strength", "number", 0.8, 0, 1, description="Prompt strength when using img2img"),
        NUM_OUTPUTS,
        Input("num_inference_steps", "integer", 28, 1, 50, description="Number of denoising steps"),
        Input("guidance", "number", 3, 0, 10, description="Guidance for generated image"),
        *FLUX_TAIL,
    ),
    progress=True,
    nsfw_drop=True,
)
FLUX_11_PRO = ModelSpec(
    "black-forest-labs/flux-1.1-pro",
    "96ccd0e758a1796926584ded2246369cdf8eb3d7c34475cf9c442be5e097d926",
    (
        PROMPT,
        Input("image_prompt", "string", format="uri", description="Image to use with Flux Redux"),
        Input(
            "aspect_ratio",
            "string",
            "1:1",
            enum=("custom", "1:1", "16:9", "3:2", "2:3", "4:5", "5:4", "9:16", "3:4", "4:3"),
            description="Aspect ratio for the generated image",
        ),
        Input("width", "integer", None, 256, 1440, description="Width; only used when aspect_ratio=custom"),
        Input("height", "integer", None, 256, 1440, description="Height; only used when aspect_ratio=custom"),
        Input("safety_tolerance", "integer", 2, 1, 6, description="Safety tolerance, 1 is most strict"),
        SEED,
        Input("prompt_upsampling", "boolean", False, description="Automatically modify the prompt"),
        OUTPUT_FORMAT,
        OUTPUT_QUALITY,
    ),
    output="string",
    sizing="custom",
)
SD35_LARGE = ModelSpec(
    "stability-ai/stable-diffusion-3.5-large",
    "feb36d70a9f2791ed9df99f795ea5684da18f52b5f6b488dfdef635ca19d6bd3",
    (
        PROMPT,
        Input("negative_prompt", "string", description="What you do not want to see in the image"),
        Input(
            "aspect_ratio",
            "string",
            "1:1",
            enum=("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21"),
            description="The aspect ratio of your output image",
        ),
        Input("cfg", "number", 5, 1, 10, description="How strictly the diffusion process adheres to the prompt"),
        Input("image", "string", format="uri", description="Input image for image to image mode"),
        Input("prompt_strength", "number", 0.85, 0, 1, description="Prompt strength when using image to image"),
        SEED,
        OUTPUT_FORMAT,
    ),
    output="string",
    sizing="ratio",
)
TINY_VIDEO = ModelSpec(
    "fake/tiny-video",
    hashlib.sha256(b"mediagen-fake:fake/tiny-video").hexdigest(),
    (PROMPT, SEED),
    output="string",
    sizing="video",
    default_format="mp4",
)
GENERIC = ModelSpec(
    "fake/generic",
    "",
    (
        PROMPT,
        Input("width", "integer", 1024, 1, 4096),
        Input("height", "integer", 1024, 1, 4096),
        NUM_OUTPUTS,
        SEED,
        Input("negative_prompt", "string"),
    ),
    sizing="generic",
    progress=True,
    default_format="png",
)

MODELS: Final[dict[str, ModelSpec]] = {
    spec.name: spec for spec in (FLUX_SCHNELL, FLUX_DEV, FLUX_11_PRO, SD35_LARGE, TINY_VIDEO)
}


def spec_for(model: str) -> ModelSpec:
    return MODELS.get(model, GENERIC)


# --------------------------------------------------------------------------- schemas


def _property(item: Input, order: int) -> JSON:
    prop: JSON = {"x-order": order, "title": item.name.replace("_", " ").title()}
    if item.description:
        prop["description"] = item.description
    if item.enum is not None:
        prop["allOf"] = [{"$ref": f"#/components/schemas/{item.name}"}]
    else:
        prop["type"] = item.type
        if item.format:
            prop["format"] = item.format
        if item.minimum is not None:
            prop["minimum"] = item.minimum
        if item.maximum is not None:
            prop["maximum"] = item.maximum
    if item.default is not None:
        prop["default"] = item.default
    return prop


def openapi_schema(spec: ModelSpec) -> JSON:
    """The version's `openapi_schema` in Cog's shape (§1.3)."""
    uri: JSON = {"type": "string", "format": "uri"}
    output = {"type": "array", "items": uri, "title": "Output"} if spec.output == "list" else {**uri, "title": "Output"}
    schemas: JSON = {
        "Input": {
            "type": "object",
            "title": "Input",
            "required": ["prompt"],
            "properties": {item.name: _property(item, order) for order, item in enumerate(spec.inputs)},
        },
        "Output": output,
    }
    for item in spec.inputs:
        if item.enum is not None:
            schemas[item.name] = {
                "title": item.name,
                "description": "An enumeration.",
                "enum": list(item.enum),
                "type": item.type,
            }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": schemas},
    }


# --------------------------------------------------------------------------- validation

_TYPE_NAMES: Final[dict[str, type | tuple[type, ...]]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def _check(item: Input, value: Any) -> FieldError | None:
    where = f"input.{item.name}"
    expected = _TYPE_NAMES[item.type]
    wrong = not isinstance(value, expected) or (item.type in ("integer", "number") and isinstance(value, bool))
    if item.type == "integer" and isinstance(value, float) and value.is_integer():
        wrong = False
    if wrong:
        given = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}
        name = "null" if value is None else given.get(type(value), type(value).__name__)
        return "invalid_type", where, f"Invalid type. Expected: {item.type}, given: {name}"
    if item.enum is not None and value not in item.enum:
        options = ", ".join(f'"{option}"' for option in item.enum)
        return "enum", where, f"{item.name} must be one of the following: {options}"
    if item.minimum is not None and value < item.minimum:
        return "number_gte", where, f"Must be greater than or equal to {_number(item.minimum)}"
    if item.maximum is not None and value > item.maximum:
        return "number_lte", where, f"Must be less than or equal to {_number(item.maximum)}"
    return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def validate(spec: ModelSpec, raw: object) -> list[FieldError]:
    """Replicate's verdict on a create's `input`: [] when it would run (unknown keys ignored)."""
    if not isinstance(raw, dict):
        return [("invalid_type", "input", "Invalid type. Expected: object")]
    errors: list[FieldError] = []
    if raw.get("prompt") is None:
        errors.append(("required", "input", "prompt is required"))
    for item in spec.inputs:
        value = raw.get(item.name)
        if value is None:
            continue
        problem = _check(item, value)
        if problem is not None:
            errors.append(problem)
    return errors


# --------------------------------------------------------------------------- what a run produces


@dataclass(frozen=True)
class Run:
    """What a valid input makes: the size, format and number of outputs (before NSFW drops)."""

    width: int
    height: int
    format: str
    count: int


def _value(spec: ModelSpec, raw: JSON, name: str) -> Any:
    value = raw.get(name)
    if value is None:
        item = spec.prop(name)
        return item.default if item is not None else None
    return value


def _round32(side: int) -> int:
    return max(256, min(1440, round(side / 32) * 32))


def plan(spec: ModelSpec, raw: JSON) -> Run:
    """The size and format the real model would render for this (validated) input."""
    count = int(_value(spec, raw, "num_outputs") or 1) if spec.prop("num_outputs") else 1
    fmt = str(_value(spec, raw, "output_format") or spec.default_format)
    if spec.sizing == "generic":
        return Run(int(_value(spec, raw, "width")), int(_value(spec, raw, "height")), fmt, count)
    if spec.sizing == "video":
        return Run(64, 64, "mp4", 1)
    ratio = str(_value(spec, raw, "aspect_ratio"))
    if spec.sizing == "custom" and ratio == "custom":
        width, height = int(_value(spec, raw, "width") or 1024), int(_value(spec, raw, "height") or 1024)
        return Run(_round32(width), _round32(height), fmt, count)
    width, height = FLUX_SIZES[ratio]
    if spec.sizing == "flux" and str(_value(spec, raw, "megapixels")) == "0.25":
        width, height = width // 2, height // 2
    return Run(width, height, fmt, count)
