"""The fake fal's HTTP app: fal's queue routes, the output files, the JWKS and the `/_fake` control routes.

``create_app(FakeFalConfig(...), data_dir=...)`` returns a Starlette app whose state is
``app.state.fake`` (a `FakeFal`). The routes, the faults and the directives are described in the
package's README.md; the timing of one request in `fake_fal.queue`, the inputs in `fake_fal.models`,
the webhooks in `fake_fal.webhooks`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fake_fal.config import FakeFalConfig
from fake_fal.control import control_routes
from fake_fal.directives import Directives, first_n_applies, nth_fault, parse_directives
from fake_fal.images import BLACK, ImageCache, mark, palette_index
from fake_fal.models import endpoint_for, plan, validate
from fake_fal.queue import JSON, QueuedRequest, Runners
from fake_fal.responses import (
    RUNNER_ERRORS,
    DroppedConnection,
    detail_response,
    fault_response,
    ingress_response,
    json_response,
    not_found,
    unauthorized,
)
from fake_fal.store import RequestStore
from fake_fal.webhooks import Signer, WebhookSender

__all__ = ["FakeFal", "create_app"]

CONTENT_TYPES: Final = {"jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS: Final = {"jpeg": "jpg", "png": "png"}
PROVIDER_MODERATED: Final = ("fal-ai/flux-pro/v1.1",)
"""Endpoints that refuse a flagged image (422 content_policy_violation) instead of blacking it out."""


class FakeFal:
    """The server's state and request handlers (one instance per app)."""

    def __init__(self, config: FakeFalConfig, data_dir: Path | None = None) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.images = ImageCache()
        self.requests: dict[str, QueuedRequest] = {}
        self.by_app: dict[str, list[QueuedRequest]] = {}
        self.by_prompt: Counter[str] = Counter()
        self.submit_attempts: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.outage_until = 0.0
        self.outage_status = 503
        self.outage_prompts: set[str] = set()
        """Prompts whose ``[[outage=...]]`` has started its outage (once each)."""
        self.runners = Runners()
        self.longest_queue = 0.0
        """The longest time in queue of any request so far: older ones cannot be queued any more."""
        self.signer = Signer()
        self.webhooks = WebhookSender(self.signer, lambda: self.config)
        self.store = RequestStore(data_dir)
        self.unsent_webhooks: list[tuple[QueuedRequest, str, str]] = []
        for record in self.store.load():
            self.restore(record)

    # ------------------------------------------------------------------ the store

    @staticmethod
    def record(req: QueuedRequest) -> JSON:
        """What the store keeps of a request: what its status and files are derived from."""
        return {
            "id": req.id,
            "endpoint": req.endpoint,
            "input": req.input,
            "created": req.created_wall,
            "queue_seconds": req.queue_seconds,
            "latency": req.latency,
            "outcome": list(req.outcome),
            "seed": req.seed,
            "nsfw": req.nsfw,
        }

    def restore(self, record: JSON) -> None:
        """A request read back from the store (an unreadable one is skipped)."""
        try:
            spec = endpoint_for(str(record["endpoint"]))
            raw = record["input"]
            code, body = record["outcome"]
            req = QueuedRequest(
                id=str(record["id"]),
                endpoint=spec.id,
                input=raw,
                plan=plan(spec, raw) if not validate(spec, raw) else None,
                directives=parse_directives(str(raw.get("prompt", ""))),
                queue_seconds=float(record["queue_seconds"]),
                latency=float(record["latency"]),
                outcome=(int(code), dict(body)),
                created_wall=float(record["created"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return
        req.seed, req.nsfw = int(record.get("seed", 0)), list(record.get("nsfw", []))
        if record.get("canceled_after") is not None:
            req.canceled_after = float(record["canceled_after"])
        self.enqueue(req)
        if isinstance(record.get("webhook"), str):
            self.unsent_webhooks.append((req, record["webhook"], str(record.get("base", ""))))

    def resume_webhooks(self) -> None:
        """After a restart, send the webhooks of the requests that were still running."""
        now = time.monotonic()
        for req, url, base in self.unsent_webhooks:
            if req.status(now) != "COMPLETED":
                self.follow_webhook(req, url, base)
        self.unsent_webhooks.clear()

    # ------------------------------------------------------------------ helpers

    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        for name in ("requests", "by_app", "by_prompt", "submit_attempts", "counts", "faults"):
            getattr(self, name).clear()
        self.outage_until = 0.0
        self.outage_prompts.clear()
        self.runners.clear()
        self.images.clear()
        self.store.clear()

    def base_url(self, request: Request) -> str:
        if self.config.base_url:
            return self.config.base_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def refused(self, request: Request) -> Response | None:
        """401 without a key (or with the wrong one), the outage's answer during an outage, else None."""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() not in ("key", "bearer") or not key.strip():
            return unauthorized("Missing or malformed Authorization header: send 'Key <FAL_KEY>'.")
        if self.config.api_key is not None and key.strip() != self.config.api_key:
            return unauthorized("Invalid key.")
        if time.monotonic() < self.outage_until:
            self.faults[f"outage_{self.outage_status}"] += 1
            return fault_response(self.outage_status, self.config.retry_after)
        return None

    def chance(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    def enqueue(self, req: QueuedRequest) -> None:
        self.longest_queue = max(self.longest_queue, req.queue_seconds)
        self.requests[req.id] = req
        self.by_app.setdefault(req.app, []).append(req)
        self.by_prompt[req.prompt] += 1

    def lookup(self, request: Request) -> QueuedRequest | None:
        req = self.requests.get(str(request.path_params["request_id"]))
        app = f"{request.path_params['owner']}/{request.path_params['alias']}"
        return req if req is not None and req.app == app else None

    def queue_position(self, req: QueuedRequest, now: float) -> int:
        """How many requests of the same app, submitted earlier, are still IN_QUEUE.

        Only requests younger than the longest queue time seen can still be queued: the scan stops there."""
        ahead = 0
        horizon = now - self.longest_queue
        for other in reversed(self.by_app.get(req.app, [])):
            if other.created_mono < horizon:
                break
            if other.created_mono < req.created_mono and other.status(now) == "IN_QUEUE":
                ahead += 1
        return ahead

    # ------------------------------------------------------------------ outcomes and results

    def fate(self, spec_id: str, raw: object, directives: Directives, index: int) -> tuple[int, JSON, list[bool]]:
        """(status code, error body, NSFW flags) of a new request: 200 and {} when it will succeed."""
        spec = endpoint_for(spec_id)
        errors = validate(spec, raw)
        if errors:
            return 422, {"detail": errors}, []
        assert isinstance(raw, dict)
        if directives.invalid:
            item = {
                "loc": ["body", "prompt"],
                "msg": "Prompt rejected by the [[invalid]] directive",
                "type": "value_error",
            }
            return 422, {"detail": [{**item, "input": raw.get("prompt")}]}, []
        if (directives.fail and first_n_applies(directives.fail_count, index)) or self.chance(self.config.p_fail):
            detail, error_type = RUNNER_ERRORS[500]
            return 500, {"detail": detail, "error_type": error_type}, []
        count = plan(spec, raw).count
        flags = [i < directives.nsfw or self.chance(self.config.p_nsfw) for i in range(count)]
        if any(flags) and spec.id in PROVIDER_MODERATED and plan(spec, raw).safety_checker:
            violation = {
                "loc": ["body", "prompt"],
                "msg": "The content was flagged by a content checker.",
                "type": "content_policy_violation",
                "url": "https://docs.fal.ai/errors#content_policy_violation",
                "input": raw.get("prompt"),
            }
            return 422, {"detail": [violation]}, flags
        return 200, {}, flags

    def result_body(self, req: QueuedRequest, base: str) -> tuple[int, JSON]:
        """(status code, body) of a COMPLETED request's result."""
        code, body = req.result()
        if code != 200 or req.plan is None:
            return code, body
        p = req.plan
        images = []
        for i in range(p.count):
            if p.sync_mode:
                url = f"data:{CONTENT_TYPES[p.format]};base64," + base64.b64encode(self.file_bytes(req, i)).decode()
            else:
                url = f"{base}/files/{req.id}/{i}.{EXTENSIONS[p.format]}"
            images.append({"url": url, "width": p.width, "height": p.height, "content_type": CONTENT_TYPES[p.format]})
        inference = round(max(req.latency - req.queue_seconds, 0.0), 6)
        return 200, {
            "images": images,
            "timings": {"inference": inference},
            "seed": req.seed,
            "has_nsfw_concepts": [bool(req.nsfw[i]) if i < len(req.nsfw) else False for i in range(p.count)],
            "prompt": req.prompt,
        }

    def file_bytes(self, req: QueuedRequest, index: int) -> bytes:
        assert req.plan is not None
        p = req.plan
        flagged = index < len(req.nsfw) and req.nsfw[index] and p.safety_checker
        colour = BLACK if flagged else palette_index(req.prompt, req.seed, index)
        image = self.images.get(p.width, p.height, colour, p.format)
        return mark(image, p.format, f"mediagen fake fal {req.id} {index} seed={req.seed}")

    def follow_webhook(self, req: QueuedRequest, url: str, base: str) -> None:
        self.webhooks.follow(url, req.id, req.prompt, req.wait, lambda: self.result_body(req, base))

    # ------------------------------------------------------------------ submit

    async def submit(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        self.counts["submits"] += 1
        endpoint_id = f"{request.path_params['owner']}/{request.path_params['alias']}"
        if request.path_params.get("path"):
            endpoint_id += "/" + str(request.path_params["path"]).strip("/")
        if endpoint_id.startswith("missing/"):
            return detail_response(404, f"Application '{endpoint_id}' not found")
        try:
            raw = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return detail_response(422, [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}])
        if self.config.submit_latency > 0:
            await asyncio.sleep(self.config.submit_latency)
        if self.chance(self.config.p_submit_429):
            self.faults["submit_429"] += 1
            return fault_response(429, self.config.retry_after)
        if self.chance(self.config.p_submit_500):
            self.faults["submit_500"] += 1
            return fault_response(500, self.config.retry_after)
        prompt = raw.get("prompt") if isinstance(raw, dict) else None
        directives = parse_directives(prompt if isinstance(prompt, str) else "")
        attempt = self.submit_attempts[prompt] if isinstance(prompt, str) else 0
        if isinstance(prompt, str) and directives.submit_faults:
            self.submit_attempts[prompt] += 1
        fault = nth_fault(directives.submit_faults, attempt)
        if fault is not None and not fault.enqueued:
            self.faults[f"submit_{fault.status}"] += 1
            after = fault.retry_after if fault.retry_after is not None else self.config.retry_after
            return fault_response(fault.status, after)
        if directives.outage is not None and isinstance(prompt, str) and prompt not in self.outage_prompts:
            self.outage_prompts.add(prompt)
            if directives.outage_after is None:
                self.start_outage(directives.outage)
                self.faults["outage_503"] += 1
                return fault_response(503, self.config.retry_after)
            asyncio.get_running_loop().call_later(directives.outage_after, self.start_outage, directives.outage)
        req = self.new_request(request, endpoint_id, raw, directives)
        if fault is not None:  # the ambiguous submit: enqueued, and yet no answer the client can read
            self.faults[f"submit_{fault.status or 'drop'}_enqueued"] += 1
            return DroppedConnection() if fault.status == 0 else fault_response(fault.status, self.config.retry_after)
        if self.chance(self.config.p_submit_502_enqueued):
            self.faults["submit_502_enqueued"] += 1
            return ingress_response(502)
        if self.chance(self.config.p_submit_drop):
            self.faults["submit_drop_enqueued"] += 1
            return DroppedConnection()
        index = self.by_prompt[req.prompt] - 1
        hang = directives.hang_submit if first_n_applies(directives.hang_submit_count, index) else 0.0
        if hang or self.config.hang_submit:
            await asyncio.sleep(hang or self.config.hang_submit)
        body = {
            "status": "IN_QUEUE",
            "request_id": req.id,
            "gateway_request_id": req.id,
            **req.urls(self.base_url(request)),
        }
        body["queue_position"] = self.queue_position(req, time.monotonic())
        return json_response(body, 200, {"x-fal-request-id": req.id})

    def new_request(self, request: Request, endpoint_id: str, raw: Any, directives: Directives) -> QueuedRequest:
        prompt = raw.get("prompt") if isinstance(raw, dict) else None
        index = self.by_prompt[prompt] if isinstance(prompt, str) else 0
        code, body, flags = self.fate(endpoint_id, raw, directives, index)
        spec = endpoint_for(endpoint_id)
        latency = directives.latency if directives.latency is not None else self.latency()
        queue_seconds = directives.queue
        if queue_seconds is None:
            queue_seconds = (
                self.config.queue_seconds if self.config.queue_seconds is not None else min(0.1 * latency, 0.5)
            )
        queue_seconds, latency, started = self.runners.schedule(
            endpoint_id, queue_seconds, latency, self.config.concurrency, _start_timeout(request)
        )
        if not started:
            code, body = 504, {"detail": "Request timed out before it started", "error_type": "request_timeout"}
        req = QueuedRequest(
            id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            endpoint=endpoint_id,
            input=raw if isinstance(raw, dict) else {"input": raw},
            plan=plan(spec, raw) if code == 200 or flags else None,
            directives=directives,
            queue_seconds=queue_seconds,
            latency=latency,
            outcome=(code, body),
        )
        if req.plan is not None and req.plan.seed is None:
            req.seed = self.rng.randrange(2**32)
        req.nsfw = flags
        self.enqueue(req)
        record = self.record(req)
        webhook = request.query_params.get("fal_webhook")
        if webhook:
            base = self.base_url(request)
            self.follow_webhook(req, webhook, base)
            record.update(webhook=webhook, base=base)
        self.store.submitted(record)
        return req

    def latency(self) -> float:
        latency, jitter = self.config.latency, self.config.latency_jitter
        if jitter > 0 and latency > 0:
            latency *= 1.0 + self.rng.uniform(-jitter, jitter)
        return max(latency, 0.0)

    # ------------------------------------------------------------------ status, result, cancel

    def read_fault(self, req: QueuedRequest, which: str) -> Response | None:
        status = req.next_read_fault("status" if which == "status" else "result")
        if status is None and self.chance(self.config.p_status_503):
            status = 503
        if status is None and self.chance(self.config.p_status_429):
            status = 429
        if status is None:
            return None
        self.faults[f"{which}_{status}"] += 1
        ingress = status in (502, 504)
        return fault_response(status, self.config.retry_after, None if ingress else req.id)

    async def status(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        self.counts["status_reads"] += 1
        req = self.lookup(request)
        if req is None:
            return not_found()
        fault = self.read_fault(req, "status")
        if fault is not None:
            return fault
        d = req.directives
        if d.hang_status and first_n_applies(d.hang_status_count, req.status_reads - 1):
            await asyncio.sleep(d.hang_status)
        now = time.monotonic()
        with_logs = request.query_params.get("logs", "0").lower() in ("1", "true")
        position = self.queue_position(req, now) if req.status(now) == "IN_QUEUE" else 0
        body = req.status_json(self.base_url(request), now, with_logs=with_logs, queue_position=position)
        return json_response(body, 200 if body["status"] == "COMPLETED" else 202, {"x-fal-request-id": req.id})

    async def result(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        self.counts["result_reads"] += 1
        req = self.lookup(request)
        if req is None:
            return not_found()
        fault = self.read_fault(req, "result")
        if fault is not None:
            return fault
        if req.status(time.monotonic()) != "COMPLETED":
            return detail_response(400, "Request is still in progress", request_id=req.id)
        code, body = self.result_body(req, self.base_url(request))
        headers = {"x-fal-request-id": req.id}
        if isinstance(body.get("error_type"), str):
            headers["x-fal-error-type"] = body["error_type"]
        return json_response(body, code, headers)

    async def cancel(self, request: Request) -> Response:
        refused = self.refused(request)
        if refused is not None:
            return refused
        self.counts["cancels"] += 1
        req = self.lookup(request)
        if req is None:
            return json_response({"status": "NOT_FOUND"}, 404)
        if not req.cancel(time.monotonic()):
            return json_response({"status": "ALREADY_COMPLETED"}, 400, {"x-fal-request-id": req.id})
        self.store.update(req.id, canceled_after=req.canceled_after)
        return json_response({"status": "CANCELLATION_REQUESTED"}, 202, {"x-fal-request-id": req.id})

    # ------------------------------------------------------------------ files, keys

    async def file(self, request: Request) -> Response:
        self.counts["files"] += 1
        req = self.requests.get(str(request.path_params["request_id"]))
        index = int(request.path_params["index"])
        if req is None or req.plan is None or req.directives.output_404:
            return not_found()
        if req.status(time.monotonic()) != "COMPLETED" or req.result()[0] != 200 or not 0 <= index < req.plan.count:
            return not_found()
        if request.path_params["ext"] != EXTENSIONS[req.plan.format]:
            return not_found()
        return Response(self.file_bytes(req, index), media_type=CONTENT_TYPES[req.plan.format])

    async def jwks(self, request: Request) -> Response:
        self.counts["jwks"] += 1
        return json_response(self.signer.jwks(), headers={"cache-control": "public, max-age=86400"})

    # ------------------------------------------------------------------ control

    def start_outage(self, seconds: float, status: int = 503) -> None:
        self.outage_until = time.monotonic() + seconds
        self.outage_status = status

    def outage_json(self) -> JSON:
        remaining = max(0.0, self.outage_until - time.monotonic())
        return {"active": remaining > 0, "remaining": round(remaining, 3), "status": self.outage_status}

    # ------------------------------------------------------------------ routing

    def routes(self) -> list[Route]:
        rid = "/{owner}/{alias}/requests/{request_id}"
        return [
            *control_routes(self),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
            Route("/files/{request_id}/{index:int}.{ext}", self.file, methods=["GET"]),
            Route(rid + "/status", self.status, methods=["GET"]),
            Route(rid + "/cancel", self.cancel, methods=["PUT"]),
            Route(rid, self.result, methods=["GET"]),
            Route("/{owner}/{alias}", self.submit, methods=["POST"]),
            Route("/{owner}/{alias}/{path:path}", self.submit, methods=["POST"]),
        ]


def _start_timeout(request: Request) -> float | None:
    """fal-client's `start_timeout`: seconds the request may wait before it starts."""
    try:
        return float(request.headers["x-fal-request-timeout"])
    except (KeyError, ValueError):
        return None


def create_app(config: FakeFalConfig | None = None, *, data_dir: Path | None = None) -> Starlette:
    """Build the fake fal app; its state is ``app.state.fake`` (a FakeFal).

    ``data_dir``: keep requests there across restarts (see :mod:`fake_fal.store`).
    """
    fake = FakeFal(config or FakeFalConfig(), data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        fake.resume_webhooks()
        try:
            yield
        finally:
            await fake.webhooks.aclose()
            fake.store.close()

    app = Starlette(routes=fake.routes(), lifespan=lifespan)
    app.state.fake = fake
    return app
