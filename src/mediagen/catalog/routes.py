"""A model is a portable name with routes: the providers that serve it, in order of preference, each with its
own schema, and a job's parameters turned into the exact input at each.

* **The order**: `MEDIAGEN_PROVIDERS` (default: those configured, Replicate first), a model's own order in
  `MEDIAGEN_MODEL_PROVIDERS`, kept to the providers that serve the model (Replicate: a schema in the
  catalog; fal: an endpoint in mediagen.catalog.fal).
* **A pin**: `parameters.provider` keeps the job at one provider: it never fails over, and it may send that
  provider's own inputs (`aspect_ratio` at Replicate, `acceleration` at fal).
* **Portable parameters only, otherwise**: `width`/`height`, `num_outputs`, `seed` and `output_format` map
  onto each provider's inputs. A job that may run at more than one provider and sends a provider's own
  input is refused (422: pin it); with one route only, the job is as good as pinned and may send them.
* **Exactly, or not at all**: a route that cannot make exactly what was asked (a size Replicate's flux does
  not make, a format fal does not) is left out of the job's routes; when none can, the 422 says why for
  each provider.

The seed chosen for the first route is sent to every route, so a job fails over to the same picture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mediagen.catalog import fal
from mediagen.catalog.catalog import Catalog
from mediagen.catalog.schema import ModelSchema, problem
from mediagen.core.errors import InvalidParameters, ModelSchemaUnknown
from mediagen.core.routing import FAL, PROVIDERS, REPLICATE, Route

PORTABLE = frozenset({"width", "height", "num_outputs", "seed", "output_format"})


class Router:
    def __init__(
        self,
        catalog: Catalog,
        order: Sequence[str],
        per_model: Mapping[str, Sequence[str]] | None = None,
        *,
        default_output_format: str = "",
    ) -> None:
        self.catalog = catalog
        self.order = list(order)
        self.per_model = {model: list(names) for model, names in (per_model or {}).items()}
        self.default_output_format = default_output_format
        self._fal: dict[str, ModelSchema | None] = {}

    def schema(self, provider: str, model: str) -> ModelSchema | None:
        """The model's schema at `provider`, or None when it does not serve it (or not yet: Replicate's
        schema not read)."""
        if provider == REPLICATE:
            return self.catalog.get(model)
        if provider == FAL:
            if model not in self._fal:
                self._fal[model] = fal.schema(model)
            return self._fal[model]
        return None

    def providers(self, model: str) -> list[str]:
        """The providers that may run `model`, in order of preference."""
        names = [name for name in self.per_model.get(model, self.order) if name in self.order]
        return [name for name in names if self.schema(name, model) is not None]

    def build(self, provider: str, model: str, prompt: str, params: Mapping[str, Any]) -> Route:
        """The route at `provider`: the model's name there and the exact input; InvalidParameters if none."""
        schema = self.schema(provider, model)
        assert schema is not None
        if provider == FAL:
            data = fal.build_input(schema, prompt, params, default_output_format=self.default_output_format)
            return Route(FAL, schema.model, data)
        data = schema.build_input(prompt, params, default_output_format=self.default_output_format)
        return Route(provider, model, data)

    def routes(self, model: str, prompt: str, parameters: Mapping[str, Any]) -> list[Route]:
        """The job's routes, in order; InvalidParameters (422) or ModelSchemaUnknown (503) when none."""
        params = {key: value for key, value in parameters.items() if key != "provider" and value is not None}
        pin = parameters.get("provider")
        if pin is not None:
            return [self._pinned(str(pin), model, prompt, params)]
        names = self.providers(model)
        if not names:
            raise ModelSchemaUnknown(f"no provider serves {model} yet (its schema has not been read); try again")
        own = sorted(set(params) - PORTABLE)
        if own and len(names) > 1:
            raise InvalidParameters(model, [self._own(name, model, names) for name in own])
        routes: list[Route] = []
        problems: list[dict[str, str]] = []
        for name in names:
            if routes and "seed" not in params and "seed" in routes[0].input:
                params = {**params, "seed": routes[0].input["seed"]}
            try:
                routes.append(self.build(name, model, prompt, params))
            except InvalidParameters as refused:
                prefix = f"{name}: " if len(names) > 1 else ""
                problems += [{**p, "message": prefix + p["message"]} for p in refused.fields]
        if not routes:
            raise InvalidParameters(model, problems)
        return routes

    def _pinned(self, pin: str, model: str, prompt: str, params: dict[str, Any]) -> Route:
        if pin not in self.order:
            known = ", ".join(self.order)
            message = f"not a provider of this server: {known}" if pin in PROVIDERS else f"one of {known}"
            raise InvalidParameters(model, [problem("provider", message, "enum")])
        if self.schema(pin, model) is None:
            serving = ", ".join(self.providers(model)) or "none yet"
            message = f"{pin} does not serve {model} here; its providers: {serving}"
            raise InvalidParameters(model, [problem("provider", message, "provider")])
        return self.build(pin, model, prompt, params)

    def _own(self, name: str, model: str, providers: Sequence[str]) -> dict[str, str]:
        takers = [p for p in providers if name in (s.properties if (s := self.schema(p, model)) else {})]
        whose = f"{' and '.join(takers)}'s own input" if takers else "not a portable parameter"
        portable = ", ".join(sorted(PORTABLE))
        message = (
            f"{whose}: this job may run at {', '.join(providers)}; pin it with parameters.provider to send it, "
            f"or use the portable {portable}"
        )
        return problem(name, message, "provider")
