"""The fake's state (``app.state.fake``): its predictions in creation order, the live config, the counters,
and the store that keeps the predictions across restarts. One process, asyncio only: no locks.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

from starlette.requests import Request

from fake_replicate.config import FakeConfig
from fake_replicate.directives import Directives, parse_directives
from fake_replicate.faults import Faults
from fake_replicate.images import PngCache
from fake_replicate.inputs import validate_input
from fake_replicate.prediction import TERMINAL, Params, Prediction
from fake_replicate.responses import prediction_object
from fake_replicate.store import PredictionStore
from fake_replicate.webhooks import WebhookSender

JSON = dict[str, Any]

WEBHOOK_SECRET: Final = (
    "whsec_" + base64.b64encode(hashlib.sha256(b"mediagen-fake-replicate-webhook").digest()).decode()
)


class FakeReplicate:
    """The server's state (one instance per app); the routes (fake_replicate.routes, .control) act on it."""

    def __init__(self, config: FakeConfig, data_dir: Path | None = None) -> None:
        self.config = config
        self.faults = Faults(lambda: self.config)
        self.images = PngCache()
        self.predictions: dict[str, Prediction] = {}
        self.order: list[str] = []
        self.by_prompt: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.versions: dict[str, str] = {}
        self.webhooks = WebhookSender(WEBHOOK_SECRET, lambda: self.config)
        self.store = PredictionStore(data_dir)
        self.unsent_webhooks: list[tuple[Prediction, str, Any, str]] = []
        """Webhooks of restored predictions, followed again once the server runs (`resume_webhooks`)."""
        for record in self.store.load():
            self.restore(record)

    def reset(self) -> None:
        """Drop predictions (also on disk) and counters; the config is kept, the RNG reseeded."""
        self.faults.reset()
        self.predictions.clear()
        self.order.clear()
        self.by_prompt.clear()
        self.requests.clear()
        self.images.clear()
        self.store.clear()

    def set_config(self, config: FakeConfig) -> None:
        if config.seed != self.config.seed:
            self.faults.reseed(config.seed)
        self.config = config

    def base_url(self, request: Request) -> str:
        if self.config.base_url:
            return self.config.base_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def lookup(self, request: Request) -> Prediction | None:
        return self.predictions.get(str(request.path_params["prediction_id"]))

    def prediction_json(self, pred: Prediction, base: str, *, hide_running: bool = False) -> JSON:
        return prediction_object(pred, base, self.images, time.monotonic(), hide_running=hide_running)

    # ------------------------------------------------------------------ creating

    def new_prediction(
        self,
        model: str,
        version: str,
        raw_input: JSON,
        params: Params,
        directives: Directives,
        index: int,
        deadline: float | None = None,
    ) -> Prediction:
        """Make the ``index``-th prediction of its prompt, its fate decided now, and store it; ``deadline``
        is the create's ``Cancel-After`` in seconds."""
        outcome, error = self.faults.outcome(directives, index, params)
        mode = directives.output if directives.output in ("data", "url") else self.config.output_mode
        pred = Prediction(
            id=self.faults.new_id(),
            model=model,
            version=version,
            input=raw_input,
            params=params,
            directives=directives,
            output_mode=mode,
            latency=self.faults.latency_for(directives),
            outcome=outcome,
            error=error,
            deadline=deadline,
        )
        if directives.starting is not None:  # queued or booting that long, then its usual run
            pred.start_delay, pred.latency = directives.starting, directives.starting + pred.latency
        self.predictions[pred.id] = pred
        self.order.append(pred.id)
        self.by_prompt[params.prompt] = index + 1
        self.store.created(self.record(pred))
        return pred

    def follow_webhook(self, pred: Prediction, url: str, events: Any, base: str) -> None:
        self.webhooks.follow(pred, url, events, lambda: self.prediction_json(pred, base))

    # ------------------------------------------------------------------ the store

    @staticmethod
    def record(pred: Prediction) -> JSON:
        """What the store keeps of a prediction: what its status and files are derived from."""
        return {
            "id": pred.id,
            "model": pred.model,
            "version": pred.version,
            "input": pred.input,
            "output_mode": pred.output_mode,
            "created": pred.created_wall,
            "latency": pred.latency,
            "outcome": pred.outcome,
            "error": pred.error,
            "start_delay": pred.start_delay,
            "cancel_after": pred.deadline,
        }

    def resume_webhooks(self) -> None:
        """After a restart, go on sending the webhooks of the predictions that were still running."""
        now = time.monotonic()
        for pred, url, events, base in self.unsent_webhooks:
            if pred.status(now) not in TERMINAL or pred.elapsed(now) < pred.latency + 60:
                self.follow_webhook(pred, url, events, base)
        self.unsent_webhooks.clear()

    def restore(self, record: JSON) -> None:
        """A prediction read back from the store (an unreadable one is skipped)."""
        params, _ = validate_input(record.get("input"), str(record.get("model", "")))
        if params is None or record.get("outcome") not in TERMINAL:
            return
        pred = Prediction(
            id=str(record["id"]),
            model=str(record["model"]),
            version=str(record["version"]),
            input=record["input"],
            params=params,
            directives=parse_directives(params.prompt),
            output_mode=str(record.get("output_mode", "url")),
            latency=float(record["latency"]),
            outcome=record["outcome"],
            error=record.get("error"),
            created_wall=float(record["created"]),
            start_delay=float(record["start_delay"]) if record.get("start_delay") is not None else None,
            deadline=float(record["cancel_after"]) if record.get("cancel_after") is not None else None,
        )
        if record.get("canceled_after") is not None:
            pred.canceled_after = float(record["canceled_after"])
        self.predictions[pred.id] = pred
        self.order.append(pred.id)
        self.by_prompt[params.prompt] = self.by_prompt.get(params.prompt, 0) + 1
        self.versions.setdefault(pred.version, pred.model)
        if isinstance(record.get("webhook"), str):
            self.unsent_webhooks.append((pred, record["webhook"], record.get("events"), str(record.get("base", ""))))

    # ------------------------------------------------------------------ counts

    def status_counts(self) -> dict[str, int]:
        now = time.monotonic()
        return dict(Counter(pred.status(now) for pred in self.predictions.values()))

    def images_made(self) -> int:
        """Images of succeeded predictions: what Replicate would bill for."""
        now = time.monotonic()
        done = (p for p in self.predictions.values() if p.status(now) == "succeeded" and p.params.format != "mp4")
        return sum(p.params.kept for p in done)
