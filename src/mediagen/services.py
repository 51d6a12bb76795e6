"""Building the shared resources (database, Redis, provider, storage) from settings, once per process."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis

from mediagen.broker import Dispatcher
from mediagen.core.db import Database
from mediagen.providers.circuit import Circuit
from mediagen.providers.downloads import Downloader
from mediagen.providers.ratelimit import RateLimiter
from mediagen.providers.replicate import ReplicateProvider
from mediagen.providers.replicate_signatures import WebhookVerifier
from mediagen.settings import Settings
from mediagen.storage import Storage
from mediagen.storage.local import LocalStorage
from mediagen.storage.s3 import S3Storage

REPLICATE_DELIVERY = "replicate.delivery"


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
    hosts = [REPLICATE_DELIVERY, *settings.download_allowed_hosts]
    if settings.replicate_base_url:
        base_host = urlsplit(settings.replicate_base_url).hostname
        if base_host:
            hosts.append(base_host)
    token = settings.replicate_api_token.get_secret_value() if settings.replicate_api_token else None
    return Downloader(
        allowed_hosts=hosts,
        max_bytes=settings.max_output_bytes,
        auth_token=token,
        max_connections=settings.replicate_max_connections,
    )
