"""How jobs, models and usage look over HTTP: the declared response models (mediagen.api.schemas),
built from the domain's rows and views.

One place, so every answer that shows a job (a status, a detail, a page, an event) shows it the same
way, and a route only picks what to show. What a client may see of a job's status (its error only
once it ended, its progress only while it runs) is decided in mediagen.core.jobs.status, by the rules
the webhook bodies sent to clients follow too (mediagen.core.deliveries).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from mediagen.api.schemas import (
    AttemptView,
    GenerateAccepted,
    JobPage,
    JobStatusResponse,
    JobSummary,
    JobView,
    ModelList,
    ModelOutput,
    ModelSize,
    ModelView,
    OutputView,
    RouteView,
    UsageReport,
    WaitedJob,
    WebhookDeliveryView,
)
from mediagen.catalog.routes import Router
from mediagen.core import jobs
from mediagen.core.pricing import Price, price_for
from mediagen.core.usage import Usage, job_cost
from mediagen.settings import Settings


def media_url(settings: Settings, key: str) -> str:
    return f"{settings.public_base_url}/media/{key}"


def status_url(job_id: uuid.UUID) -> str:
    return f"/status/{job_id}"


def job_status(settings: Settings, view: jobs.JobStatusView) -> JobStatusResponse:
    return JobStatusResponse(**_status_fields(settings, view))


def waited_job(settings: Settings, view: jobs.JobStatusView) -> WaitedJob:
    return WaitedJob(**_status_fields(settings, view), status_url=status_url(view.id))


def _status_fields(settings: Settings, view: jobs.JobStatusView) -> dict[str, Any]:
    return {
        "job_id": view.id,
        "status": view.status,
        "attempts": view.attempts,
        "error": jobs.shown_error(view.status, view.error_message),
        "result_urls": [media_url(settings, key) for key in view.output_keys],
        "progress": jobs.shown_progress(view.status, view.progress),
        "waiting_for": jobs.shown_waiting_for(view.status, view.waiting_for),
        "queue_position": jobs.shown_queue_position(view.status, view.queue_position),
    }


def accepted(job_id: uuid.UUID, status: str) -> GenerateAccepted:
    return GenerateAccepted(job_id=job_id, status=status, status_url=status_url(job_id))


def job_view(settings: Settings, detail: jobs.JobDetail) -> JobView:
    job = detail.job
    return JobView(
        job_id=job.id,
        status=job.status,
        prompt=job.prompt,
        parameters=job.parameters,
        input=job.input,
        provider=job.provider,
        model=job.model,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error_class=job.error_class,
        error=job.error_message,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        next_attempt_at=job.next_attempt_at,
        deadline_at=job.deadline_at,
        progress=jobs.shown_progress(job.status, job.progress),
        cost_usd=_usd(job_cost(detail.attempts)),
        attempt_history=[
            AttemptView(
                number=a.number,
                started_at=a.started_at,
                finished_at=a.finished_at,
                outcome=a.outcome,
                error_class=a.error_class,
                error_message=a.error_message,
                http_status=a.http_status,
                prediction_id=a.prediction_id,
                resumed=a.resumed,
                gone_prediction_id=a.gone_prediction_id,
                retry_delay_seconds=a.retry_delay_seconds,
                predict_time=a.predict_time,
                image_count=a.image_count,
                cost_usd=_usd(a.cost_usd),
                provider=a.provider,
                failover_from=a.failover_from,
            )
            for a in detail.attempts
        ],
        outputs=[
            OutputView(
                index=o.index,
                url=media_url(settings, o.storage_key),
                content_type=o.content_type,
                size_bytes=o.size_bytes,
                sha256=o.sha256,
                width=o.width,
                height=o.height,
            )
            for o in detail.outputs
        ],
        webhook_deliveries=[WebhookDeliveryView.model_validate(d) for d in detail.webhook_deliveries],
    )


def _usd(amount: Decimal | None) -> str | None:
    return None if amount is None else str(amount)


def job_page(
    settings: Settings, rows: Sequence[Any], outputs: Mapping[uuid.UUID, list[str]], next_cursor: str | None
) -> JobPage:
    return JobPage(
        items=[
            JobSummary(
                job_id=r.id,
                status=r.status,
                prompt=r.prompt,
                model=r.model,
                attempts=r.attempts,
                progress=jobs.shown_progress(r.status, r.progress),
                result_urls=[media_url(settings, key) for key in outputs.get(r.id, ())],
                error=r.error_message,
                created_at=r.created_at,
                finished_at=r.finished_at,
            )
            for r in rows
        ],
        next_cursor=next_cursor,
    )


def model_list(settings: Settings, router: Router, prices: Mapping[str, Price | None]) -> ModelList:
    """The allowed models whose input schema is known (one not read from Replicate yet is left out:
    a submit would get a 503 too), each with its routes."""
    listed = []
    for name in settings.allowed_models:
        schema = router.catalog.get(name)
        if schema is None:
            continue
        routes = []
        for provider in router.providers(name):
            at = router.schema(provider, name)
            assert at is not None
            formats = at.properties.get("output_format", {}).get("enum", [])
            wanted = "jpeg" if provider == "fal" and settings.default_output_format == "jpg" else None
            default_format = wanted or settings.default_output_format
            route_price = price_for(at.model, prices)
            routes.append(
                RouteView(
                    provider=provider,
                    model=at.model,
                    input_schema=at.input_schema,
                    defaults=at.defaults(),
                    service_defaults={"output_format": default_format} if default_format in formats else {},
                    price=route_price.as_json() if route_price else None,
                )
            )
        price = price_for(name, prices)
        service_defaults = {}
        if settings.default_output_format in schema.properties.get("output_format", {}).get("enum", []):
            service_defaults["output_format"] = settings.default_output_format
        listed.append(
            ModelView(
                model=name,
                default=name == settings.default_model,
                version=schema.version,
                schema_source=schema.source,
                input_schema=schema.input_schema,
                defaults=schema.defaults(),
                service_defaults=service_defaults,
                sizes=[ModelSize.model_validate(size.as_json()) for size in schema.sizes],
                output=ModelOutput(kind=schema.output_kind, multiple=schema.output_multiple),
                price=price.as_json() if price else None,
                routes=routes,
            )
        )
    return ModelList(models=listed)


def usage_report(report: Usage) -> UsageReport:
    return UsageReport.model_validate(report.as_json())
