"""The API process's shared resources (`ApiState`, built once in the app's lifespan) and `Api`, the
dependency that hands them to a route: `state: Api` reads as "this route uses the API's resources",
and mypy follows every one of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from mediagen.api.auth import KeyRing
from mediagen.api.limits import Limits
from mediagen.api.submissions import Submissions
from mediagen.broker import Dispatcher
from mediagen.catalog.catalog import Catalog
from mediagen.catalog.routes import Router
from mediagen.core.db import Database
from mediagen.core.pricing import Price
from mediagen.notify import Notifier
from mediagen.providers.fal_webhooks import FalWebhookVerifier
from mediagen.providers.replicate_signatures import WebhookVerifier
from mediagen.settings import Settings
from mediagen.storage import Storage


@dataclass
class ApiState:
    settings: Settings
    db: Database
    redis: Redis
    dispatcher: Dispatcher
    storage: Storage
    keyring: KeyRing
    submissions: Submissions
    notifier: Notifier
    catalog: Catalog
    router: Router
    prices: dict[str, Price | None]
    webhook_verifier: WebhookVerifier
    fal_webhook_verifier: FalWebhookVerifier
    limits: Limits | None = None


async def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


Api = Annotated[ApiState, Depends(api_state)]
