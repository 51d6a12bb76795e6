"""A job's routes: each provider that may run it, the model's name there and the exact input it is sent.

Decided at submit (mediagen.catalog.routes builds them from the model's schema at each provider and the
order of preference) and kept on the job (`jobs.routes`), so an attempt that fails over to the next
route sends exactly what was checked at submit, whatever the settings say by then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLICATE = "replicate"
FAL = "fal"
PROVIDERS = (REPLICATE, FAL)
"""Every provider mediagen has an adapter for, in the default order of preference."""


@dataclass(frozen=True)
class Route:
    provider: str
    model: str
    """The model's name at the provider (Replicate's `owner/name`, fal's endpoint id)."""
    input: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "input": self.input}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Route:
        return cls(str(data["provider"]), str(data["model"]), dict(data["input"]))
