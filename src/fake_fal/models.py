"""The fal endpoints the fake knows: their inputs, defaults and validation, as fal's model pages describe them.

``fal-ai/flux/schnell``, ``fal-ai/flux/dev``, ``fal-ai/flux-pro/v1.1`` and
``fal-ai/stable-diffusion-v35-large``; any other endpoint gets a generic stand-in with the inputs the
four share. A bad input is refused the way fal's apps (pydantic v2) refuse it: a list of
``{"loc": ["body", field, ...], "msg", "type", "input"?, "ctx"?}``, answered 422 by the runner (see
`fake_fal.server`). Keys no model knows are ignored, as pydantic ignores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

JSON = dict[str, Any]

IMAGE_SIZES: Final[Mapping[str, tuple[int, int]]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
MAX_SIDE: Final = 14142
OUTPUT_FORMATS: Final = ("jpeg", "png")


@dataclass(frozen=True)
class Field:
    """One input of an endpoint: ``kind`` is str, int, float, bool, enum or image_size."""

    name: str
    kind: str
    default: Any = None
    required: bool = False
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Endpoint:
    id: str
    fields: tuple[Field, ...]
    title: str

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    def defaults(self) -> JSON:
        return {f.name: f.default for f in self.fields if not f.required and f.default is not None}


def _common(steps: tuple[int, int, int] | None, guidance: tuple[float, float, float] | None) -> tuple[Field, ...]:
    found = [
        Field("prompt", "str", required=True),
        Field("image_size", "image_size", "landscape_4_3"),
        Field("seed", "int"),
        Field("num_images", "int", 1, ge=1, le=4),
        Field("enable_safety_checker", "bool", True),
        Field("output_format", "enum", "jpeg", choices=OUTPUT_FORMATS),
        Field("sync_mode", "bool", False),
    ]
    if steps is not None:
        found.append(Field("num_inference_steps", "int", steps[0], ge=steps[1], le=steps[2]))
    if guidance is not None:
        found.append(Field("guidance_scale", "float", guidance[0], ge=guidance[1], le=guidance[2]))
    return tuple(found)


_ACCELERATION: Final = Field("acceleration", "enum", "none", choices=("none", "regular", "high"))

ENDPOINTS: Final[Mapping[str, Endpoint]] = {
    e.id: e
    for e in (
        Endpoint("fal-ai/flux/schnell", (*_common((4, 1, 12), None), _ACCELERATION), "FLUX.1 [schnell]"),
        Endpoint("fal-ai/flux/dev", (*_common((28, 1, 50), (3.5, 1, 20)), _ACCELERATION), "FLUX.1 [dev]"),
        Endpoint(
            "fal-ai/flux-pro/v1.1",
            (
                *_common(None, None),
                Field("safety_tolerance", "enum", "2", choices=("1", "2", "3", "4", "5", "6")),
                Field("enhance_prompt", "bool", False),
            ),
            "FLUX1.1 [pro]",
        ),
        Endpoint(
            "fal-ai/stable-diffusion-v35-large",
            (*_common((28, 1, 50), (3.5, 0, 20)), Field("negative_prompt", "str", "")),
            "Stable Diffusion 3.5 Large",
        ),
    )
}


def endpoint_for(endpoint_id: str) -> Endpoint:
    """The endpoint's spec; an unknown one gets the generic stand-in under its own id."""
    known = ENDPOINTS.get(endpoint_id)
    return known if known is not None else Endpoint(endpoint_id, _common(None, None), "Generic stand-in")


@dataclass(frozen=True)
class Plan:
    """What the model makes of valid inputs."""

    width: int
    height: int
    count: int
    format: str
    seed: int | None
    safety_checker: bool
    sync_mode: bool


def _error(loc: list[Any], msg: str, type_: str, value: Any = None, ctx: JSON | None = None) -> JSON:
    item: JSON = {"loc": ["body", *loc], "msg": msg, "type": type_}
    if value is not None:
        item["input"] = value
    if ctx:
        item["ctx"] = ctx
    return item


def _number_errors(field: Field, value: Any, loc: list[Any]) -> list[JSON]:
    if field.ge is not None and value < field.ge:
        limit = int(field.ge) if field.kind == "int" else field.ge
        return [
            _error(loc, f"Input should be greater than or equal to {limit}", "greater_than_equal", value, {"ge": limit})
        ]
    if field.le is not None and value > field.le:
        limit = int(field.le) if field.kind == "int" else field.le
        return [_error(loc, f"Input should be less than or equal to {limit}", "less_than_equal", value, {"le": limit})]
    return []


def _check(field: Field, value: Any, loc: list[Any]) -> list[JSON]:
    kind = field.kind
    if kind == "str" and not isinstance(value, str):
        return [_error(loc, "Input should be a valid string", "string_type", value)]
    if kind == "bool" and not isinstance(value, bool):
        return [_error(loc, "Input should be a valid boolean", "bool_type", value)]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return [_error(loc, "Input should be a valid integer", "int_type", value)]
        return _number_errors(field, value, loc)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [_error(loc, "Input should be a valid number", "float_type", value)]
        return _number_errors(field, value, loc)
    if kind == "enum" and value not in field.choices:
        expected = " or ".join(f"'{c}'" for c in field.choices)
        if len(field.choices) > 2:
            expected = ", ".join(f"'{c}'" for c in field.choices[:-1]) + f" or '{field.choices[-1]}'"
        return [_error(loc, f"Input should be {expected}", "literal_error", value, {"expected": expected})]
    if kind == "image_size":
        return _image_size_errors(value, loc)
    return []


_SIDE: Final = Field("side", "int", ge=1, le=MAX_SIDE)


def _image_size_errors(value: Any, loc: list[Any]) -> list[JSON]:
    if isinstance(value, str):
        return _check(Field("image_size", "enum", choices=tuple(IMAGE_SIZES)), value, loc)
    if not isinstance(value, dict):
        return [_error(loc, "Input should be a valid dictionary or instance of ImageSize", "model_type", value)]
    errors: list[JSON] = []
    for side in ("width", "height"):
        if side in value:
            errors += _check(_SIDE, value[side], [*loc, side])
    return errors


def validate(endpoint: Endpoint, raw: object) -> list[JSON]:
    """The 422 ``detail`` items for ``raw`` (empty when it is valid)."""
    if not isinstance(raw, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type", "input": raw}]
    errors: list[JSON] = []
    for field in endpoint.fields:
        if field.name not in raw:
            if field.required:
                errors.append(_error([field.name], "Field required", "missing", raw))
            continue
        value = raw[field.name]
        if value is None and not field.required and field.kind in ("int", "str"):
            continue  # Optional[int] seed, Optional[str]
        errors += _check(field, value, [field.name])
    return errors


def plan(endpoint: Endpoint, raw: JSON) -> Plan:
    """The run a valid input asks for."""
    inputs = {**endpoint.defaults(), **{k: v for k, v in raw.items() if v is not None}}
    size = inputs.get("image_size", "landscape_4_3")
    if isinstance(size, str):
        width, height = IMAGE_SIZES[size]
    else:  # a custom size: a side not given is fal's default, 512
        width, height = int(size.get("width", 512)), int(size.get("height", 512))
    seed = inputs.get("seed")
    return Plan(
        width=width,
        height=height,
        count=int(inputs.get("num_images", 1)),
        format=str(inputs.get("output_format", "jpeg")),
        seed=seed if isinstance(seed, int) else None,
        safety_checker=bool(inputs.get("enable_safety_checker", True)),
        sync_mode=bool(inputs.get("sync_mode", False)),
    )


def schema(endpoint: Endpoint) -> JSON:
    """The endpoint's input as a JSON schema (``GET /_fake/models``), for readers and adapters."""
    properties: JSON = {}
    for f in endpoint.fields:
        prop: JSON = {}
        if f.kind in ("int", "float", "bool"):
            prop = {"type": {"int": "integer", "float": "number", "bool": "boolean"}[f.kind]}
        elif f.kind == "enum":
            prop = {"enum": list(f.choices)}
        elif f.kind == "image_size":
            prop = {
                "anyOf": [{"enum": list(IMAGE_SIZES)}, {"type": "object", "properties": {"width": {}, "height": {}}}]
            }
        elif f.kind == "str":
            prop = {"type": "string"}
        if f.ge is not None:
            prop["minimum"] = f.ge
        if f.le is not None:
            prop["maximum"] = f.le
        if f.default is not None:
            prop["default"] = f.default
        properties[f.name] = prop
    required = [f.name for f in endpoint.fields if f.required]
    return {"title": endpoint.title, "type": "object", "properties": properties, "required": required}
