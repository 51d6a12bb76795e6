"""The fake's fault settings (`FakeConfig`): global, probabilistic, changeable while it runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

JSON = dict[str, Any]


# --------------------------------------------------------------------------- config


@dataclass
class FakeConfig:
    """Fault settings of the fake server. The defaults inject no faults."""

    latency: float = 1.0
    latency_jitter: float = 0.0
    create_latency: float = 0.0
    p_create_500: float = 0.0
    p_create_429: float = 0.0
    p_create_ambiguous: float = 0.0
    create_ambiguous_answers: str = "502,504,drop"
    retry_after: int = 1
    p_get_503: float = 0.0
    p_get_429: float = 0.0
    p_flagged: float = 0.0
    p_model_error: float = 0.0
    seed: int | None = None
    output_mode: str = "url"
    api_token: str | None = None
    base_url: str | None = None
    create_rate_per_minute: int = 0
    create_burst: int = 10
    request_rate_per_minute: int = 0
    request_burst: int = 50
    webhook_delay: float = 0.0
    p_webhook_drop: float = 0.0
    p_webhook_duplicate: float = 0.0
    webhook_retries: int = 4
    webhook_retry_seconds: float = 0.5
    list_page_size: int = 100

    def __post_init__(self) -> None:
        _validate_config(self)


_PROBABILITIES: Final = (
    "p_create_500",
    "p_create_429",
    "p_create_ambiguous",
    "p_get_503",
    "p_get_429",
    "p_flagged",
    "p_model_error",
    "p_webhook_drop",
    "p_webhook_duplicate",
)
_NON_NEGATIVE: Final = (
    "latency",
    "latency_jitter",
    "create_latency",
    "retry_after",
    "create_rate_per_minute",
    "request_rate_per_minute",
    "webhook_delay",
    "webhook_retries",
    "webhook_retry_seconds",
)
_FIELD_KINDS: Final[Mapping[str, str]] = {
    "latency": "float",
    "latency_jitter": "float",
    "create_latency": "float",
    "p_create_500": "float",
    "p_create_429": "float",
    "p_create_ambiguous": "float",
    "create_ambiguous_answers": "str",
    "retry_after": "int",
    "p_get_503": "float",
    "p_get_429": "float",
    "p_flagged": "float",
    "p_model_error": "float",
    "seed": "int?",
    "output_mode": "str",
    "api_token": "str?",
    "base_url": "str?",
    "create_rate_per_minute": "int",
    "create_burst": "int",
    "request_rate_per_minute": "int",
    "request_burst": "int",
    "webhook_delay": "float",
    "p_webhook_drop": "float",
    "p_webhook_duplicate": "float",
    "webhook_retries": "int",
    "webhook_retry_seconds": "float",
    "list_page_size": "int",
}


def _validate_config(config: FakeConfig) -> None:
    for name in _PROBABILITIES:
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value!r}")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0")
    if config.list_page_size < 1:
        raise ValueError("list_page_size must be >= 1")
    if config.output_mode not in ("url", "data"):
        raise ValueError("output_mode must be 'url' or 'data'")
    ambiguous_answers(config.create_ambiguous_answers)


def ambiguous_answers(text: str) -> tuple[str, ...]:
    """The answers an ambiguous create may get, from ``create_ambiguous_answers`` (``"502,504,drop"``):
    ``drop`` (the connection closed, no answer) or a 5xx status; raises ValueError on anything else."""
    answers = tuple(token.strip() for token in text.split(",") if token.strip())
    for answer in answers:
        if answer != "drop" and not (answer.isdigit() and 500 <= int(answer) <= 599):
            raise ValueError(f"create_ambiguous_answers: {answer!r} is neither 'drop' nor a 5xx status")
    if not answers:
        raise ValueError("create_ambiguous_answers must name at least one answer")
    return answers


def _coerce(name: str, value: object) -> object:
    """Check one JSON value against a FakeConfig field's type."""
    kind = _FIELD_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown config key {name!r}")
    if value is None and kind.endswith("?"):
        return None
    base = kind.rstrip("?")
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected {base}, got a boolean")
    if base == "float" and isinstance(value, (int, float)):
        return float(value)
    if base == "int" and isinstance(value, int):
        return value
    if base == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if base == "str" and isinstance(value, str):
        return value
    raise ValueError(f"{name}: expected {kind}, got {type(value).__name__}")


def config_with(config: FakeConfig, patch: Mapping[str, object]) -> FakeConfig:
    """Return a copy of ``config`` with ``patch`` merged in (raises ValueError)."""
    changes = {name: _coerce(name, value) for name, value in patch.items()}
    return replace(config, **changes)  # type: ignore[arg-type]


def parse_config_value(name: str, text: str) -> object:
    """Parse a command-line or environment string for FakeConfig field ``name``."""
    kind = _FIELD_KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown config key {name!r}")
    if kind.endswith("?") and text.strip().lower() in ("", "none", "null"):
        return None
    base = kind.rstrip("?")
    if base == "float":
        return float(text)
    if base == "int":
        return int(text)
    return text
