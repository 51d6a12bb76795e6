"""Hostile input: the OpenAPI schema fuzzed with schemathesis. No 5xx, and every answer matches it.

Every documented operation is fuzzed with valid data and with invalid data (which must be refused
with a documented 4xx); the routes that take a job id or an output key are fuzzed also on a real,
finished job, so their 2xx answers (the full job, the event stream, the bytes) are checked too.

(schemathesis' pytest plugin does not run under pytest 9 yet, so the operations are driven through
its Python API, each with a bounded number of Hypothesis examples.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import submit, unique, wait_for_job
from mediagen.api.routes import ROUTERS

pytestmark = pytest.mark.usefixtures("worker")

EXAMPLES = 25


def fuzzer(operation: Any, mode: GenerationMode, fixed: dict[str, str]) -> Callable[[], None]:
    @given(case=operation.as_strategy(mode, path_parameters=fixed or None))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: schemathesis.Case) -> None:
        excluded = []
        if operation.path == "/jobs" and case.query and "cursor" in case.query:
            # A cursor is opaque: only those this API handed out are valid, and others get a 422.
            excluded.append(positive_data_acceptance)
        if operation.path == "/generate" and isinstance(case.body, dict) and case.body.get("webhook_url"):
            # Whether a webhook is accepted depends on the server (a signing secret must be set) and on
            # where the URL points (inner addresses are refused): a 422 the schema cannot express.
            excluded.append(positive_data_acceptance)
        parameters = (
            case.body.get("parameters") if operation.path == "/generate" and isinstance(case.body, dict) else None
        )
        if isinstance(parameters, dict) and set(parameters) - {"model"}:
            # The model's inputs are checked against that model's own schema (GET /models), which
            # differs per model and is read from Replicate: no one static document can say it.
            excluded.append(positive_data_acceptance)
        case.call_and_validate(excluded_checks=excluded, timeout=30)

    return fuzz  # type: ignore[no-any-return]


def documented_routes() -> set[tuple[str, str]]:
    """Every API route the code defines (the web page and /docs are not the API)."""
    found = set()
    for router in ROUTERS:
        for route in router.routes:
            assert isinstance(route, APIRoute)
            assert route.include_in_schema, f"{route.path} is hidden from the OpenAPI document"
            found.update((method, route.path_format) for method in route.methods - {"HEAD"})
    return found


async def finished_job(api_url: str) -> tuple[str, str]:
    """A succeeded job's id and the key of its first output."""
    async with httpx.AsyncClient(base_url=api_url, timeout=10) as api:
        job_id = await submit(api, unique("a fuzzed lighthouse"))
        status = await wait_for_job(api, job_id)
    assert status["status"] == "succeeded", status
    return job_id, status["result_urls"][0].split("/media/", 1)[1]


def test_no_input_gets_a_server_error_or_an_undocumented_answer(api_url: str) -> None:
    job_id, key = asyncio.run(finished_job(api_url))
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]

    assert {(op.method.upper(), op.path) for op in operations} == documented_routes()
    for operation in operations:
        params = {p.name for p in operation.path_parameters}
        real = {"job_id": job_id} if "job_id" in params else {"key": key} if "key" in params else {}
        for fixed in ({}, real) if real else ({},):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzzer(operation, mode, fixed)()
                except Unsatisfiable:
                    # Nothing it takes can be sent wrong (no input, or only unconstrained text).
                    assert mode == GenerationMode.NEGATIVE, operation.label
                except BaseException as failure:
                    failure.add_note(f"{operation.label}, {mode.value} data, path parameters {fixed or 'generated'}")
                    raise
