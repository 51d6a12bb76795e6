"""Building the shared resources (database, Redis, providers, storage) from settings, once per process.

Each configured provider (`providers()`: Replicate, fal) is its own adapter with its own budgets and
circuit in Redis (mediagen.providers.ratelimit and .circuit, keyed by the provider's name).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis

from mediagen.broker import Dispatcher
from mediagen.core.db import Database
from mediagen.providers.base import Provider
from mediagen.providers.circuit import Circuit
from mediagen.providers.downloads import Downloader
from mediagen.providers.fal import FalProvider
from mediagen.providers.fal_webhooks import FAL_JWKS_URL, FalWebhookVerifier
from mediagen.providers.ratelimit import RateLimiter
from mediagen.providers.replicate import ReplicateProvider
from mediagen.providers.replicate_signatures import WebhookVerifier
from mediagen.settings import Settings
from mediagen.storage import Storage
from mediagen.storage.local import LocalStorage
from mediagen.storage.s3 import S3Storage

REPLICATE_DELIVERY = "replicate.delivery"
FAL_MEDIA = "fal.media"
"""fal's output host (`v3.fal.media`, ... : its subdomains too)."""


def require(value: str | None, name: str) -> str:
    if not value:
        raise SystemExit(f"{name} is not set (make run sets it for the embedded servers)")
    return value


def database(settings: Settings, *, pool_timeout: float | None = None) -> Database:
    return Database(
        require(settings.database_url, "DATABASE_URL"), pool_size=settings.db_pool_size, pool_timeout=pool_timeout
    )


def redis_client(settings: Settings, *, max_connections: int = 64) -> Redis:
    pool = BlockingConnectionPool.from_url(
        require(settings.redis_url, "REDIS_URL"),
        max_connections=max_connections,
        timeout=2,
        socket_connect_timeout=2,
        socket_timeout=5,
    )
    return Redis(connection_pool=pool)


def dispatcher(settings: Settings, redis: Redis) -> Dispatcher:
    return Dispatcher(redis, namespace=settings.redis_namespace, queue_name=settings.queue_name)


def storage(settings: Settings) -> Storage:
    if settings.storage_backend == "local":
        return LocalStorage(settings.media_dir)
    endpoint, access_key, secret_key = settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key
    if not (endpoint and access_key and secret_key):
        raise SystemExit(
            "MEDIAGEN_STORAGE_BACKEND=s3 needs MEDIAGEN_S3_ENDPOINT, MEDIAGEN_S3_ACCESS_KEY and MEDIAGEN_S3_SECRET_KEY"
        )
    return S3Storage(
        endpoint=endpoint,
        access_key=access_key,
        secret_key=secret_key.get_secret_value(),
        bucket=settings.s3_bucket,
        region=settings.s3_region,
        secure=settings.s3_secure,
        public_url=settings.s3_public_url,
    )


def circuit(settings: Settings, redis: Redis) -> Circuit | None:
    if settings.replicate_circuit_failures <= 0:
        return None
    return Circuit(
        redis,
        namespace=settings.redis_namespace,
        failures=settings.replicate_circuit_failures,
        open_seconds=settings.replicate_circuit_open_seconds,
        # A probe that never reports (its worker died) is given up after the longest a call may take.
        probe_seconds=settings.replicate_timeout_seconds + 5.0,
    )


def rate_limiter(settings: Settings, redis: Redis) -> RateLimiter:
    """The account's budgets and its circuit, shared by every worker through Redis."""
    return RateLimiter(
        redis,
        namespace=settings.redis_namespace,
        creates_per_minute=settings.replicate_creates_per_minute,
        requests_per_minute=settings.replicate_requests_per_minute,
        create_burst=settings.replicate_create_burst,
        request_burst=settings.replicate_request_burst,
        circuit=circuit(settings, redis),
    )


def fal_circuit(settings: Settings, redis: Redis) -> Circuit | None:
    if settings.fal_circuit_failures <= 0:
        return None
    return Circuit(
        redis,
        namespace=settings.redis_namespace,
        failures=settings.fal_circuit_failures,
        open_seconds=settings.fal_circuit_open_seconds,
        probe_seconds=settings.fal_timeout_seconds + 5.0,
        provider="fal",
    )


def fal_rate_limiter(settings: Settings, redis: Redis) -> RateLimiter:
    """fal's budgets and circuit, shared by every worker through Redis, apart from Replicate's."""
    return RateLimiter(
        redis,
        namespace=settings.redis_namespace,
        creates_per_minute=settings.fal_submits_per_minute,
        requests_per_minute=settings.fal_requests_per_minute,
        create_burst=settings.fal_submit_burst,
        request_burst=settings.fal_request_burst,
        circuit=fal_circuit(settings, redis),
        provider="fal",
    )


def fal_provider(settings: Settings, redis: Redis | None = None) -> FalProvider:
    """The fal adapter (the real fal with `FAL_KEY`, else the stand-in at `MEDIAGEN_FAL_BASE_URL`); with
    `redis`, its calls spend fal's budgets shared through it."""
    key = settings.fal_key.get_secret_value() if settings.fal_key else None
    return FalProvider(
        # The fake accepts any key.
        key=key or "fake-fal-key",
        base_url=settings.fal_base_url,
        timeout_seconds=settings.fal_timeout_seconds,
        max_connections=settings.fal_max_connections,
        limiter=fal_rate_limiter(settings, redis) if redis is not None else None,
        default_throttle_seconds=settings.retry_base_seconds,
    )


def providers(settings: Settings, redis: Redis | None = None) -> dict[str, Provider]:
    """One adapter per provider of the order of preference (`settings.provider_order`: by default those
    configured, Replicate whenever fal is not, as before fal the service always had it), by name."""
    builders: dict[str, Callable[[Settings, Redis | None], Provider]] = {
        "replicate": provider,
        "fal": fal_provider,
    }
    return {name: builders[name](settings, redis) for name in settings.provider_order}


def fal_webhook_verifier(settings: Settings) -> FalWebhookVerifier:
    jwks_url = settings.fal_jwks_url
    if not jwks_url:
        # A stand-in (the fake fal) signs with its own key and serves it where fal serves fal's.
        base = settings.fal_base_url
        jwks_url = f"{base.rstrip('/')}/.well-known/jwks.json" if base else FAL_JWKS_URL
    return FalWebhookVerifier(
        jwks_url=jwks_url,
        tolerance_seconds=settings.fal_webhook_tolerance_seconds,
        user_id=settings.fal_webhook_user_id,
    )


def provider(settings: Settings, redis: Redis | None = None) -> ReplicateProvider:
    """The Replicate adapter; with `redis`, its calls spend the account's budgets shared through it."""
    token = settings.replicate_api_token.get_secret_value() if settings.replicate_api_token else None
    return ReplicateProvider(
        # The fake accepts any token, and the client sends none without one.
        api_token=token or "fake-replicate-token",
        base_url=settings.replicate_base_url,
        timeout_seconds=settings.replicate_timeout_seconds,
        max_connections=settings.replicate_max_connections,
        limiter=rate_limiter(settings, redis) if redis is not None else None,
        default_throttle_seconds=settings.retry_base_seconds,
        webhook_events=tuple(settings.replicate_webhook_events),
    )


def webhook_verifier(settings: Settings) -> WebhookVerifier:
    token = settings.replicate_api_token.get_secret_value() if settings.replicate_api_token else None
    secret = settings.replicate_webhook_secret
    return WebhookVerifier(
        api_token=token or "fake-replicate-token",
        base_url=settings.replicate_base_url,
        tolerance_seconds=settings.replicate_webhook_tolerance_seconds,
        secret=secret.get_secret_value() if secret else None,
    )


def downloader(settings: Settings) -> Downloader:
    """Outputs from Replicate's and fal's delivery hosts, and from the stand-ins configured; Replicate's
    token only over HTTPS to Replicate's delivery hosts, or to the configured fake Replicate."""
    hosts = [REPLICATE_DELIVERY, FAL_MEDIA, *settings.download_allowed_hosts]
    for base_url in (settings.replicate_base_url, settings.fal_base_url):
        base_host = urlsplit(base_url).hostname if base_url else None
        if base_host:
            hosts.append(base_host)
    token = settings.replicate_api_token.get_secret_value() if settings.replicate_api_token else None
    return Downloader(
        allowed_hosts=hosts,
        max_bytes=settings.max_output_bytes,
        auth_token=token,
        token_hosts=[REPLICATE_DELIVERY],
        token_origins=[settings.replicate_base_url] if settings.replicate_base_url else [],
        max_connections=settings.replicate_max_connections,
    )
