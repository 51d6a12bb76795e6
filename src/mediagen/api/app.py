"""The FastAPI application factory: resources built in the lifespan, on the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from mediagen import __version__, services
from mediagen.api import web
from mediagen.api.auth import KeyRing
from mediagen.api.http import BodySizeLimit, install_error_handlers
from mediagen.api.limits import Limits, Policies, Policy, RateLimitHeaders
from mediagen.api.routes import ROUTERS, fal_webhooks, replicate_webhooks
from mediagen.api.state import ApiState
from mediagen.api.submissions import Submissions
from mediagen.catalog.catalog import Catalog
from mediagen.catalog.routes import Router
from mediagen.logging import configure_logging, log_event
from mediagen.metrics import RequestMetrics
from mediagen.notify import Notifier
from mediagen.providers.replicate import ReplicateProvider
from mediagen.providers.replicate_signatures import WebhookVerifier
from mediagen.settings import Settings, get_settings


def _document_allowed_models(app: FastAPI, settings: Settings) -> None:
    """The allowed models are settings: put them into the OpenAPI document as an enum."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            model = schema["components"]["schemas"]["GenerationParameters"]["properties"]["model"]
            model["anyOf"][0]["enum"] = list(settings.allowed_models)
        return app.openapi_schema or schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _start_refresh(catalog: Catalog, provider: ReplicateProvider, settings: Settings) -> asyncio.Task[None]:
    """Adopt the cached schemas; read the ones we have none for (not even a snapshot) before serving,
    for a few seconds at most; then keep them fresh in the background."""
    period = settings.model_schema_refresh_seconds
    await catalog.load_cached()
    if any(catalog.get(model) is None for model in catalog.models):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(catalog.refresh(provider.model_schema, period=period, fetch_seconds=3.0), 5.0)
    return asyncio.create_task(catalog.run_refresh(provider.model_schema, period=period))


async def _prefetch_secret(verifier: WebhookVerifier) -> None:
    try:
        await verifier.secret()
    except Exception as error:
        log_event("webhook.secret_unavailable", logging.WARNING, error=repr(error))


def create_app(settings: Settings | None = None, *, configure_logs: bool = True) -> FastAPI:
    settings = settings or get_settings()
    if configure_logs:
        # Here rather than at startup: uvicorn has set up its own plain-text loggers by now, and every
        # line it writes from here on (errors, "Invalid HTTP request received.") is to be JSON too.
        configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = services.redis_client(settings)
        db = services.database(settings)
        dispatcher = services.dispatcher(settings, redis)
        catalog = Catalog(settings.allowed_models, redis=redis, namespace=settings.redis_namespace)
        provider = services.provider(settings)
        # Replicate's schemas are read from Replicate only when it is a provider here (fal alone: snapshots).
        refresher = (
            await _start_refresh(catalog, provider, settings) if "replicate" in settings.provider_order else None
        )
        state = ApiState(
            settings=settings,
            db=db,
            redis=redis,
            dispatcher=dispatcher,
            submissions=Submissions(db, dispatcher),
            storage=services.storage(settings),
            keyring=KeyRing([key.get_secret_value() for key in settings.api_keys], db),
            notifier=Notifier(redis, namespace=settings.redis_namespace),
            catalog=catalog,
            router=Router(
                catalog,
                settings.provider_order,
                settings.model_providers,
                default_output_format=settings.default_output_format,
            ),
            prices=settings.price_table,
            webhook_verifier=services.webhook_verifier(settings),
            fal_webhook_verifier=services.fal_webhook_verifier(settings),
        )
        if settings.replicate_webhook_url is not None:
            # Fetched now, so the first webhook is answered within its budget too.
            app.state.secret_prefetch = asyncio.create_task(_prefetch_secret(state.webhook_verifier))
        policies = Policies(
            Policy(settings.rate_limit_per_minute, settings.max_unfinished_jobs, settings.daily_spend_cap_usd),
            limit_anonymous=settings.limit_anonymous,
            caller_of=state.keyring.caller,
        )
        state.limits = Limits(
            redis,
            db,
            namespace=settings.redis_namespace,
            policy_of=policies,
            job_lifetime_seconds=settings.job_deadline_seconds,
        )
        with contextlib.suppress(Exception):  # unknown until PostgreSQL answers: the first request asks again
            await state.keyring.refresh()
        state.keyring.start()
        app.state.api = state
        # Everything built so far lives as long as the process: keep it out of the collector's
        # sight, and collect the young generation less often (fewer pauses in the request path).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        log_event(
            "api.started",
            replicate="fake" if settings.uses_fake_replicate else "replicate",
            storage=settings.storage_backend,
            auth="api keys"
            if state.keyring.enabled
            else "none: no API key (MEDIAGEN_API_KEYS, mediagen keys create), every caller sees every job",
        )
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)
            await state.keyring.aclose()
            await provider.aclose()
            await state.notifier.aclose()
            await state.webhook_verifier.aclose()
            await state.db.dispose()
            await redis.aclose()

    app = FastAPI(
        title="mediagen",
        version=__version__,
        description="Text prompts in, stored images out, through Replicate: asynchronously, without losing work.",
        lifespan=lifespan,
        # Served by mediagen.api.web from local files (the defaults load Swagger UI and ReDoc from a CDN).
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    _document_allowed_models(app, settings)
    for router in ROUTERS:
        app.include_router(router)
    web.install(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After", "RateLimit", "RateLimit-Policy", "Preference-Applied"],
        )
    # Always: a key made with `mediagen keys create` turns limits on without a restart.
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        per_path={
            fal_webhooks.PATH: fal_webhooks.MAX_BODY_BYTES,
            replicate_webhooks.PATH: replicate_webhooks.MAX_BODY_BYTES,
        },
    )
    app.add_middleware(RequestMetrics)
    return app
