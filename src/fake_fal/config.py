"""The fake fal's fault settings (`FakeFalConfig`): global, probabilistic, changeable while it runs."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Final


@dataclass(frozen=True)
class FakeFalConfig:
    """Fault settings of the fake fal. The defaults inject no faults."""

    latency: float = 1.0
    """Seconds from submit to COMPLETED."""
    latency_jitter: float = 0.0
    """The latency varies by +- this fraction."""
    queue_seconds: float | None = None
    """Seconds a request stays IN_QUEUE (default: min(0.1 * latency, 0.5))."""
    concurrency: int = 0
    """Requests of one app IN_PROGRESS at once (fal's runners); the others wait IN_QUEUE. 0: no limit."""
    submit_latency: float = 0.0
    """Seconds slept before each submit is handled."""
    p_submit_500: float = 0.0
    p_submit_429: float = 0.0
    retry_after: int = 1
    """`Retry-After` seconds sent with 429s."""
    p_submit_502_enqueued: float = 0.0
    """The ambiguous submit: the request IS enqueued, the answer is an ingress 502."""
    p_submit_drop: float = 0.0
    """The ambiguous submit: the request IS enqueued, the connection is closed without an answer."""
    p_status_503: float = 0.0
    p_status_429: float = 0.0
    p_fail: float = 0.0
    """The request completes with a runner error (500)."""
    p_nsfw: float = 0.0
    """Each image is flagged in `has_nsfw_concepts` (flux-pro refuses with content_policy_violation)."""
    hang_submit: float = 0.0
    """Seconds every submit answer is held back (the request is enqueued at once)."""
    seed: int | None = None
    """Seeds the RNG of the probabilities, ids and jitter."""
    api_key: str | None = None
    """The only key accepted (`Authorization: Key ...`); default: any key."""
    base_url: str | None = None
    """scheme://host:port used in returned URLs (default: the request's)."""
    user_id: str = "fake-fal-user"
    """Sent as `X-Fal-Webhook-User-Id` and signed with each webhook."""
    webhook_delay: float = 0.0
    p_webhook_drop: float = 0.0
    p_webhook_duplicate: float = 0.0
    webhook_retries: int = 4
    webhook_retry_seconds: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} must be within [0, 1], got {value!r}")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name != "seed" and value < 0:
                raise ValueError(f"{f.name} must be >= 0")


_HINTS: Final = typing.get_type_hints(FakeFalConfig)


def _kind(name: str) -> tuple[type, bool]:
    """(base type, optional) of a FakeFalConfig field; ValueError for an unknown one."""
    hint = _HINTS.get(name)
    if hint is None:
        raise ValueError(f"unknown config key {name!r}")
    if isinstance(hint, types.UnionType):
        base = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        return base, True
    return hint, False


def _coerce(name: str, value: object) -> object:
    """Check one JSON value against a FakeFalConfig field's type."""
    base, optional = _kind(name)
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected {base.__name__}, got a boolean")
    if base is float and isinstance(value, (int, float)):
        return float(value)
    if base is int and isinstance(value, int):
        return value
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is str and isinstance(value, str):
        return value
    raise ValueError(f"{name}: expected {base.__name__}, got {type(value).__name__}")


def config_with(config: FakeFalConfig, patch: Mapping[str, object]) -> FakeFalConfig:
    """A copy of ``config`` with ``patch`` merged in (ValueError on an unknown key or a bad value)."""
    changes = {name: _coerce(name, value) for name, value in patch.items()}
    return replace(config, **changes)  # type: ignore[arg-type]


def parse_config_value(name: str, text: str) -> object:
    """Parse a command-line or environment string for FakeFalConfig field ``name``."""
    base, optional = _kind(name)
    if optional and text.strip().lower() in ("", "none", "null"):
        return None
    if base is float:
        return float(text)
    if base is int:
        return int(text)
    return text


def config_names() -> list[str]:
    return [f.name for f in fields(FakeFalConfig)]


def config_help(name: str) -> str:
    """The field's docstring-like comment is not introspectable; the CLI keeps short help here."""
    return _HELP.get(name, name.replace("_", " "))


_HELP: Final[Mapping[str, str]] = {
    "latency": "seconds from submit to COMPLETED (default 1.0)",
    "latency_jitter": "latency varies by +- this fraction (default 0)",
    "queue_seconds": "seconds IN_QUEUE (default min(0.1 * latency, 0.5))",
    "concurrency": "requests of one app in progress at once, the rest wait in the queue (default 0: no limit)",
    "submit_latency": "seconds slept before handling each submit",
    "p_submit_500": "probability that a submit answers 500 (nothing enqueued)",
    "p_submit_429": "probability that a submit answers 429 with Retry-After (nothing enqueued)",
    "retry_after": "Retry-After seconds sent with 429s (default 1)",
    "p_submit_502_enqueued": "probability that a submit enqueues, then answers an ingress 502",
    "p_submit_drop": "probability that a submit enqueues, then drops the connection",
    "p_status_503": "probability that a status/result GET answers 503",
    "p_status_429": "probability that a status/result GET answers 429",
    "p_fail": "probability that a request completes with a runner error (500)",
    "p_nsfw": "probability that each image is flagged NSFW",
    "hang_submit": "seconds every submit answer is held (the request is enqueued at once)",
    "seed": "seed of the fault RNG",
    "api_key": "the only key accepted (default: any key)",
    "base_url": "scheme://host:port used in returned URLs (default: the request's)",
    "user_id": "the user id webhooks are signed for (default fake-fal-user)",
    "webhook_delay": "seconds every webhook delivery is late",
    "p_webhook_drop": "probability that a webhook is never sent",
    "p_webhook_duplicate": "probability that a webhook is sent twice",
    "webhook_retries": "retries of a webhook answered non-2xx (default 4)",
    "webhook_retry_seconds": "first pause between webhook retries, doubling (default 0.5)",
}
