"""The checks of what a create asks for: its body's keys, the model's input, the model reference and
the ``Prefer`` and ``Cancel-After`` headers, as Replicate checks them (shared/replicate-api.md §1.2, §1.3)."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from fake_replicate.directives import parse_directives
from fake_replicate.models import MODELS, plan, spec_for, validate
from fake_replicate.prediction import Params

JSON = dict[str, Any]
FieldError = tuple[str, str, str]

BODY_KEYS: Final = frozenset({"version", "input", "webhook", "webhook_completed", "webhook_events_filter", "stream"})
MAX_WAIT: Final = 60.0
DURATION_UNITS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6, "ns": 1e-9}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|\u00b5s|ns)")
_BARE_SECONDS: Final = re.compile(r"\d+(?:\.\d+)?")


def unknown_body_keys(body: JSON, *, with_version: bool) -> list[FieldError]:
    """The request schemas have ``additionalProperties: false`` (unlike a model's input)."""
    allowed = BODY_KEYS if with_version else BODY_KEYS - {"version"}
    extra = sorted(key for key in body if key not in allowed)
    return [("additional_property_not_allowed", "", f"Additional property {key} is not allowed") for key in extra]


def validate_input(raw: object, model: str = "") -> tuple[Params | None, list[FieldError]]:
    """Validate a create body's ``input`` as ``model`` would; returns (params, []) or (None, errors)."""
    spec = spec_for(model)
    errors = validate(spec, raw)
    if errors or not isinstance(raw, dict):
        return None, errors
    prompt = str(raw["prompt"])
    seed = raw.get("seed")
    run = plan(spec, raw)
    flagged = parse_directives(prompt).nsfw
    return Params(
        prompt, run.width, run.height, run.count, seed if isinstance(seed, int) else None, spec, run.format, flagged
    ), []


def parse_prefer_wait(header: str | None) -> float | None:
    """Seconds to hold a create for ``Prefer: wait[=N]``, or None without it."""
    if not header:
        return None
    for token in header.split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value) if value.strip() else MAX_WAIT
        except ValueError:
            seconds = MAX_WAIT
        return min(max(seconds, 0.0), MAX_WAIT)
    return None


def parse_cancel_after(header: str | None) -> float | None:
    """Seconds after create when ``Cancel-After`` ends the prediction, or None without the header.

    The value is a duration as Replicate's example writes it (``1m``): Go's duration syntax, a sequence of
    decimal numbers each with a unit (``90s``, ``1m30s``, ``1.5h``, ``500ms``); a bare number is taken as
    seconds. Anything else raises ValueError (the create answers 400).
    """
    if header is None:
        return None
    text = header.strip()
    if _BARE_SECONDS.fullmatch(text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"Cancel-After must be a duration such as 30s, 5m or 1h30m, got {header!r}")
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def model_version_id(model: str) -> str:
    """The model's version id: the real one for the models the fake knows, else a fixed fake hash."""
    spec = MODELS.get(model)
    return spec.version if spec is not None else hashlib.sha256(f"mediagen-fake:{model}".encode()).hexdigest()


def is_missing(model: str) -> bool:
    """A model whose owner is ``missing`` does not exist (404), so tests can ask for one."""
    return model.split("/", 1)[0] == "missing"
