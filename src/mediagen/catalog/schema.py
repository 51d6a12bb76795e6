"""One model's input schema, compiled once: what `GET /models` shows and what a submit is checked against.

Built from the version's Cog `openapi_schema` (shared/replicate-models.md §1.3): the `Input` component
with its enums dereferenced (`allOf: [{$ref}]` → the enum inline), properties in `x-order`, validated
by `jsonschema` with `additionalProperties: false` added, because Replicate silently ignores a key
the model does not declare and we would rather refuse the typo than pay for another image.

`build_input` turns a job's `parameters` into the exact `input` sent to Replicate:

* the portable `width`/`height` become the model's own size inputs when a size matches exactly
  (mediagen.catalog.sizes), else a 422 lists the sizes the model can make;
* `num_outputs: 1` is accepted by a model that makes one output anyway; more is refused;
* a seed is chosen when the model takes one and none was given (the input then names one prediction);
* `output_format` is the service default (`MEDIAGEN_DEFAULT_OUTPUT_FORMAT`, png) when the client chose
  none and the model offers it, sent explicitly so that every stand-in renders the same.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jsonschema import ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from mediagen.catalog.sizes import SIZE_STEP, Size, enum_of, flux_sizes
from mediagen.core.errors import InvalidParameters

FieldProblem = dict[str, str]
VIDEO_FORMATS = frozenset({"mp4", "webm", "mov", "gif"})
PORTABLE = ("width", "height", "num_outputs")


def _dereference(node: Any, components: Mapping[str, Any]) -> Any:
    """A copy of `node` with every local `$ref` (directly or as Cog's one-item `allOf`) inlined."""
    if isinstance(node, list):
        return [_dereference(item, components) for item in node]
    if not isinstance(node, Mapping):
        return node
    out = {key: _dereference(value, components) for key, value in node.items() if key not in ("$ref", "allOf")}
    refs = [node] if "$ref" in node else []
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        refs += [item for item in all_of if isinstance(item, Mapping) and "$ref" in item]
        others = [item for item in all_of if not (isinstance(item, Mapping) and "$ref" in item)]
        if others:
            out["allOf"] = _dereference(others, components)
    for ref in refs:
        target = str(ref["$ref"]).rsplit("/", 1)[-1]
        resolved = _dereference(components.get(target, {}), components)
        for key, value in resolved.items():
            if key not in ("title", "description") or key not in out:
                out.setdefault(key, value)
    return out


def integral(value: Any) -> Any:
    """JSON has one number type: 512.0 is the integer 512 (JSON Schema agrees), sent as 512."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _listing(values: Iterable[Any], limit: int = 24) -> str:
    items = [str(value) for value in values]
    return ", ".join(items[:limit]) + (", …" if len(items) > limit else "")


@dataclass
class ModelSchema:
    model: str
    version: str | None
    input_schema: dict[str, Any]
    """The Input schema, dereferenced, properties in x-order (what GET /models shows)."""
    output_multiple: bool
    output_kind: str
    source: str = "snapshot"
    fetched_at: float | None = None
    sizes: list[Size] = field(default_factory=list)
    _validator: Validator | None = None
    _prompt_validator: Validator | None = None
    _valid: set[tuple[Any, ...]] = field(default_factory=set)

    @classmethod
    def from_openapi(
        cls,
        model: str,
        version: str | None,
        openapi_schema: Mapping[str, Any],
        *,
        source: str = "snapshot",
        fetched_at: float | None = None,
    ) -> ModelSchema:
        """Raises ValueError when the document has no usable Input schema."""
        components = openapi_schema.get("components", {}).get("schemas", {})
        raw_input = components.get("Input")
        if not isinstance(raw_input, Mapping) or not isinstance(raw_input.get("properties"), Mapping):
            raise ValueError(f"{model}: the schema has no components.schemas.Input.properties")
        schema = _dereference(raw_input, components)
        properties = schema["properties"]
        ordered = sorted(properties.items(), key=lambda item: (item[1].get("x-order", 1_000), item[0]))
        schema["properties"] = dict(ordered)
        output = _dereference(components.get("Output", {}), components)
        multiple = output.get("type") == "array"
        formats = set(enum_of(properties, "output_format"))
        video = bool(formats & VIDEO_FORMATS and not formats & {"png", "jpg", "webp"}) or "video" in model
        # The parameters are checked without the prompt (the API checks it, and the schema's own
        # constraints on it, if any, separately): see check.
        strict = copy.deepcopy(schema)
        strict["additionalProperties"] = False
        strict.pop("title", None)
        prompt = strict["properties"].pop("prompt", {})
        strict["required"] = [name for name in strict.get("required", []) if name != "prompt"]
        validator_class = validator_for(strict)
        validator_class.check_schema(strict)
        constrained = set(prompt) - {"type", "title", "description", "x-order", "default"}
        return cls(
            model=model,
            version=version,
            input_schema=schema,
            output_multiple=multiple,
            output_kind="video" if video else "image",
            source=source,
            fetched_at=fetched_at,
            sizes=flux_sizes(properties),
            _validator=validator_class(strict),
            _prompt_validator=validator_class(prompt) if constrained else None,
        )

    @property
    def properties(self) -> Mapping[str, Any]:
        props: Mapping[str, Any] = self.input_schema["properties"]
        return props

    def defaults(self) -> dict[str, Any]:
        return {name: prop["default"] for name, prop in self.properties.items() if "default" in prop}

    # ------------------------------------------------------------------ building the input

    def build_input(
        self, prompt: str, parameters: Mapping[str, Any], *, default_output_format: str = ""
    ) -> dict[str, Any]:
        """The exact Replicate `input` for this prompt and parameters; InvalidParameters naming each bad field."""
        # null is "not given" (the model's default applies), as the old portable parameters had it.
        params = {key: integral(value) for key, value in parameters.items() if value is not None}
        problems: list[FieldProblem] = []
        if "prompt" in params:
            problems.append(
                {"field": "parameters.prompt", "message": "give the prompt at the top level", "type": "forbidden"}
            )
            params.pop("prompt")
        self._map_size(params, problems)
        self._map_num_outputs(params, problems)
        if not problems:
            problems = self.check(prompt, params)
        if problems:
            raise InvalidParameters(self.model, problems)
        data: dict[str, Any] = {"prompt": prompt, **params}
        seed = self.properties.get("seed")
        if seed is not None and data.get("seed") is None:
            # A seed of our own makes the input unique, so an unknown create can be found again safely.
            data["seed"] = random.randint(int(seed.get("minimum", 0)), int(seed.get("maximum", 2**32 - 1)))
        formats = enum_of(self.properties, "output_format")
        if "output_format" not in data and default_output_format in formats:
            data["output_format"] = default_output_format
        return data

    def check(self, prompt: str, params: dict[str, Any]) -> list[FieldProblem]:
        """The schema's verdict. Valid parameter sets are remembered (the submit path is hot, and most
        clients send the same few); the prompt is checked apart, and only when the schema constrains it."""
        assert self._validator is not None
        problems: list[FieldProblem] = []
        if self._prompt_validator is not None:
            problems += [p for e in self._prompt_validator.iter_errors(prompt) for p in self._explain(e, "prompt")]
        try:
            # The type is part of the key: True == 1 in Python, but not for the schema.
            key: tuple[Any, ...] | None = tuple(sorted((k, type(v).__name__, v) for k, v in params.items()))
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in self._valid:
            return problems
        found = [p for error in self._validator.iter_errors(params) for p in self._explain(error)]
        if not found and key is not None and len(self._valid) < 4096:
            self._valid.add(key)
        return problems + found

    def _map_size(self, params: dict[str, Any], problems: list[FieldProblem]) -> None:
        has_size_inputs = "width" in self.properties and "height" in self.properties
        if "width" not in params and "height" not in params:
            return
        if has_size_inputs:
            self._custom_size(params, problems)
            return
        width, height = params.pop("width", None), params.pop("height", None)
        for name, value in (("width", width), ("height", height)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                problems.append(problem(name, "must be of type integer", "type"))
                return
        if width is None or height is None:
            missing = "height" if height is None else "width"
            problems.append(problem(missing, "give both width and height, or neither", "required"))
            return
        if not self.sizes:
            ratios = enum_of(self.properties, "aspect_ratio")
            hint = f"; choose parameters.aspect_ratio: one of {_listing(ratios)}" if ratios else ""
            problems.append(
                problem("width", f"{self.model} takes no width/height and its pixel sizes are not known{hint}", "size")
            )
            return
        match = next((s for s in self.sizes if (s.width, s.height) == (width, height)), None)
        if match is None:
            problems.append(
                problem(
                    "width",
                    f"{self.model} cannot make {width}x{height}; it makes {_listing(self.sizes, 40)}",
                    "size",
                )
            )
            return
        for name, value in match.input.items():
            if name in params and params[name] != value:
                problems.append(
                    problem(name, f"{value!r} is what {width}x{height} needs; leave it out or match it", "size")
                )
        params.update(match.input)

    def _custom_size(self, params: dict[str, Any], problems: list[FieldProblem]) -> None:
        ratios = enum_of(self.properties, "aspect_ratio")
        if "custom" in ratios:
            # flux-1.1-pro reads width/height only with aspect_ratio "custom": without it they'd be ignored.
            ratio = params.setdefault("aspect_ratio", "custom")
            if ratio != "custom":
                problems.append(problem("aspect_ratio", "must be custom when width and height are given", "size"))
        step = SIZE_STEP.get(self.model)
        for name in ("width", "height"):
            value = params.get(name)
            if step and isinstance(value, int) and not isinstance(value, bool) and value % step:
                problems.append(
                    problem(name, f"must be a multiple of {step} ({self.model} would round {value})", "size")
                )

    def _map_num_outputs(self, params: dict[str, Any], problems: list[FieldProblem]) -> None:
        if "num_outputs" in self.properties or "num_outputs" not in params:
            return
        count = params.pop("num_outputs")
        if count != 1 or isinstance(count, bool):
            problems.append(problem("num_outputs", f"{self.model} makes one output per prediction", "num_outputs"))

    # ------------------------------------------------------------------ messages

    def _explain(self, error: ValidationError, name: str = "") -> list[FieldProblem]:
        name = name or (str(error.path[0]) if error.path else "")
        kind = str(error.validator)
        value: Any = error.validator_value
        instance: Any = error.instance
        if kind == "additionalProperties":
            extra = sorted(set(instance) - set(self.properties))
            takes = _listing(n for n in self.properties if n != "prompt")
            return [problem(key, f"not an input of {self.model}; it takes {takes}", "unknown") for key in extra]
        if kind == "required":
            return [problem(str(missing), "is required", "required") for missing in value if missing not in instance]
        messages = {
            "enum": lambda: f"must be one of {_listing(value)}",
            "minimum": lambda: f"must be at least {value}",
            "maximum": lambda: f"must be at most {value}",
            "exclusiveMinimum": lambda: f"must be greater than {value}",
            "exclusiveMaximum": lambda: f"must be less than {value}",
            "type": lambda: f"must be of type {value}",
            "minLength": lambda: f"must be at least {value} characters long",
            "maxLength": lambda: f"must be at most {value} characters long",
        }
        message = messages[kind]() if kind in messages else error.message
        return [problem(name, message, kind)]


def problem(name: str, message: str, kind: str) -> FieldProblem:
    where = "prompt" if name == "prompt" else f"parameters.{name}" if name else "parameters"
    return {"field": where, "message": message, "type": kind}
