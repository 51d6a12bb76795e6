"""Replicate's own routes in the fake: create, get, cancel and list predictions, models and versions,
the webhook secret, and the output files (shared/replicate-api.md §1.1, §2.8).

Each handler checks auth, asks `fake_replicate.faults` whether to fail, then acts on the state
(`fake_replicate.state`) and answers in Replicate's shapes (`fake_replicate.responses`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fake_replicate.directives import first_n_applies, parse_directives
from fake_replicate.inputs import (
    is_missing,
    model_version_id,
    parse_cancel_after,
    parse_prefer_wait,
    unknown_body_keys,
    validate_input,
)
from fake_replicate.models import openapi_schema, spec_for
from fake_replicate.outage import unavailable
from fake_replicate.pages import page_of
from fake_replicate.prediction import Prediction
from fake_replicate.responses import (
    drop_connection,
    error_response,
    fault_response,
    file_bytes,
    invalid_input,
    invalid_version,
    json_response,
    media_type,
    not_found,
)
from fake_replicate.state import FakeReplicate

JSON = dict[str, Any]


def page_url(base: str, cursor: str | None) -> str | None:
    return f"{base}/v1/predictions?{urlencode({'cursor': cursor})}" if cursor is not None else None


class ReplicateRoutes:
    """The handlers of Replicate's API over one `FakeReplicate`."""

    def __init__(self, fake: FakeReplicate) -> None:
        self.fake = fake

    def routes(self) -> list[Route]:
        pid = "/v1/predictions/{prediction_id}"
        return [
            Route("/v1/models/{owner}/{name}/predictions", self.create_for_model, methods=["POST"]),
            Route("/v1/deployments/{owner}/{name}/predictions", self.create_for_model, methods=["POST"]),
            Route("/v1/predictions", self.create_for_version, methods=["POST"]),
            Route("/v1/predictions", self.list_predictions, methods=["GET"]),
            Route(pid, self.get_prediction, methods=["GET"]),
            Route(pid + "/cancel", self.cancel_prediction, methods=["POST"]),
            Route("/v1/models/{owner}/{name}", self.get_model, methods=["GET"]),
            Route("/v1/models/{owner}/{name}/versions/{version_id}", self.get_version, methods=["GET"]),
            Route("/v1/webhooks/default/secret", self.webhook_secret, methods=["GET"]),
            Route("/files/{prediction_id}/out-{index:int}.{ext}", self.get_file, methods=["GET"]),
            Route("/files/{prediction_id}/{index:int}.png", self.get_file, methods=["GET"]),
        ]

    def check_auth(self, request: Request) -> Response | None:
        header = request.headers.get("authorization")
        if not header:
            return error_response(401, "You did not pass an authentication token")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        ok = scheme.lower() in ("bearer", "token") and bool(token)
        if ok and self.fake.config.api_token is not None:
            ok = token == self.fake.config.api_token
        return None if ok else error_response(401, "You did not pass a valid authentication token")

    # ------------------------------------------------------------------ create

    async def create_for_model(self, request: Request) -> Response:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        return await self.create(request, model)

    async def create_for_version(self, request: Request) -> Response:
        return await self.create(request, None)

    async def create(self, request: Request, model: str | None) -> Response:
        """Shared create path; ``model`` is None on the version route."""
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        fake = self.fake
        fake.requests["creates"] += 1
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error_response(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return error_response(400, "The request body must be a JSON object.")
        extra = unknown_body_keys(body, with_version=model is None)
        if extra:
            return invalid_input(extra)
        try:
            deadline = parse_cancel_after(request.headers.get("cancel-after"))
        except ValueError as exc:
            return error_response(400, str(exc))
        if fake.config.create_latency > 0:
            await asyncio.sleep(fake.config.create_latency)
        resolved = self.resolve_model(model, body)
        if isinstance(resolved, Response):
            return resolved
        return await self.create_resolved(request, body, *resolved, deadline)

    def resolve_model(self, model: str | None, body: JSON) -> tuple[str, str] | Response:
        """(model, version) for a create, or an error response."""
        versions = self.fake.versions
        if model is not None:
            if is_missing(model):
                return error_response(404, f"Model {model} not found.")
            version = model_version_id(model)
            versions.setdefault(version, model)
            return model, version
        ref = body.get("version")
        if not isinstance(ref, str) or not ref.strip():
            return invalid_version()
        if ":" in ref:
            named, _, version_id = ref.partition(":")
            if is_missing(named):
                return error_response(404, f"Model {named} not found.")
            return named, version_id
        return versions.get(ref, "fake/model"), ref

    async def create_resolved(
        self, request: Request, body: JSON, model: str, version: str, deadline: float | None
    ) -> Response:
        fake = self.fake
        fault = fake.faults.global_create_fault()
        if fault is not None:
            return fault
        raw_input = body.get("input")
        params, errors = validate_input(raw_input, model)
        if params is None or not isinstance(raw_input, dict):
            return invalid_input(errors)
        directives = parse_directives(params.prompt)
        if directives.invalid:
            return invalid_input([("invalid", "input.prompt", "Prompt rejected by [[invalid]] directive")])
        fault = fake.faults.directive_create_fault(params.prompt, directives)
        if fault is not None:
            return fault
        outage = fake.faults.directive_outage(params.prompt, directives)
        if outage is not None and outage.after is None:
            fake.faults.counts["outage_503"] += 1
            return unavailable()
        index = fake.by_prompt.get(params.prompt, 0)
        pred = fake.new_prediction(model, version, raw_input, params, directives, index, deadline)
        if isinstance(body.get("webhook"), str):
            base = fake.base_url(request)
            fake.follow_webhook(pred, body["webhook"], body.get("webhook_events_filter"), base)
            fake.store.update(pred.id, webhook=body["webhook"], events=body.get("webhook_events_filter"), base=base)
        if directives.hang_create > 0 and first_n_applies(directives.hang_count, index):
            await asyncio.sleep(directives.hang_create)
        answer = fake.faults.ambiguous_answer(directives, index)
        if answer == "drop":
            await drop_connection(request.scope)
            return Response(status_code=204)  # never sent: the connection is gone
        if answer is not None:
            return fault_response(int(answer), fake.config.retry_after)
        return await self.create_reply(request, pred)

    async def create_reply(self, request: Request, pred: Prediction) -> Response:
        base = self.fake.base_url(request)
        headers = {"Location": f"{base}/v1/predictions/{pred.id}"}
        wait = parse_prefer_wait(request.headers.get("prefer"))
        if wait is not None:
            await pred.wait(wait)
            headers["Preference-Applied"] = "wait"
        body = self.fake.prediction_json(pred, base, hide_running=wait is not None)
        return json_response(body, 201, headers)

    # ------------------------------------------------------------------ read / cancel

    async def get_prediction(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        self.fake.requests["gets"] += 1
        pred = self.fake.lookup(request)
        if pred is None:
            return not_found()
        fault = self.fake.faults.get_fault(pred)
        if fault is not None:
            return fault
        return json_response(self.fake.prediction_json(pred, self.fake.base_url(request)))

    async def cancel_prediction(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        self.fake.requests["cancels"] += 1
        pred = self.fake.lookup(request)
        if pred is None:
            return not_found()
        if pred.cancel(time.monotonic()) and pred.canceled_after is not None:
            self.fake.store.update(pred.id, canceled_after=pred.canceled_after)
        return json_response(self.fake.prediction_json(pred, self.fake.base_url(request)))

    async def list_predictions(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        fake = self.fake
        fake.requests["lists"] += 1
        fault = fake.faults.get_fault(None)
        if fault is not None:
            return fault
        page = page_of(len(fake.order), fake.config.list_page_size, request.query_params.get("cursor"))
        if page is None:
            return error_response(400, "Invalid cursor.")
        base = fake.base_url(request)
        newest_first = reversed(fake.order[page.start : page.end])
        results = [fake.prediction_json(fake.predictions[i], base) for i in newest_first]
        links = {"next": page_url(base, page.next), "previous": page_url(base, page.previous)}
        return json_response({**links, "results": results})

    # ------------------------------------------------------------------ models, versions, webhooks

    def version_json(self, version_id: str, model: str = "") -> JSON:
        """The version object, with the model's own Cog schema (fake_replicate.models)."""
        return {
            "id": version_id,
            "created_at": "2024-08-01T00:00:00.000000Z",
            "cog_version": "0.9.0",
            "openapi_schema": openapi_schema(spec_for(model)),
        }

    async def get_version(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        if is_missing(model):
            return not_found()
        version_id = str(request.path_params["version_id"])
        self.fake.versions.setdefault(version_id, model)
        return json_response(self.version_json(version_id, model))

    async def get_model(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        owner, name = str(request.path_params["owner"]), str(request.path_params["name"])
        model = f"{owner}/{name}"
        if is_missing(model):
            return not_found()
        version = model_version_id(model)
        self.fake.versions.setdefault(version, model)
        return json_response(
            {
                "url": f"https://replicate.com/{model}",
                "owner": owner,
                "name": name,
                "description": "A fake text-to-image model served by mediagen's fake Replicate.",
                "visibility": "public",
                "github_url": None,
                "paper_url": None,
                "license_url": None,
                "run_count": self.fake.requests["creates"],
                "cover_image_url": None,
                "default_example": None,
                "latest_version": self.version_json(version, model),
            }
        )

    async def webhook_secret(self, request: Request) -> Response:
        denied = self.check_auth(request)
        if denied is not None:
            return denied
        self.fake.requests["webhook_secrets"] += 1
        return json_response({"key": self.fake.webhooks.secret})

    # ------------------------------------------------------------------ files

    async def get_file(self, request: Request) -> Response:
        self.fake.requests["files"] += 1
        pred = self.fake.lookup(request)
        index = int(request.path_params["index"])
        if pred is None or pred.status(time.monotonic()) != "succeeded":
            return not_found()
        if not 0 <= index < pred.params.kept or pred.directives.output == "404":
            return not_found()
        if pred.directives.output == "notimage":
            return Response(b"<html>", media_type="text/html")
        fmt = pred.params.format
        if request.path_params.get("ext", fmt) != fmt:
            return not_found()
        return Response(file_bytes(pred, index, self.fake.images), media_type=media_type(fmt))
