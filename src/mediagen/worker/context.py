"""What a worker process builds once, on its event loop, and every job it runs shares."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from mediagen.broker import Dispatcher
from mediagen.core import pricing
from mediagen.core.db import Database
from mediagen.core.errors import PermanentProviderError
from mediagen.core.pricing import Price
from mediagen.core.retry import RetryPolicy
from mediagen.notify import Notifier
from mediagen.providers.base import Provider
from mediagen.providers.downloads import Downloader
from mediagen.storage import Storage
from mediagen.worker.leases import LeaseKeeper
from mediagen.worker.polling import PollSchedule


@dataclass
class WorkerContext:
    """What a worker process builds once, on its event loop, and every job shares."""

    db: Database
    provider: Provider
    storage: Storage
    downloader: Downloader
    dispatcher: Dispatcher
    leases: LeaseKeeper
    policy: RetryPolicy
    lease_seconds: float
    polls: PollSchedule
    notifier: Notifier
    prices: Mapping[str, Price | None] = field(default_factory=lambda: dict(pricing.DEFAULT_PRICES))
    """The price table (settings), for each attempt's cost."""
    webhook_url: str | None = None
    """Replicate POSTs our predictions here (the API relays them as events), when webhooks are on."""
    webhook_poll_seconds: float = 30.0
    """With webhooks on: how long to wait for one before looking at the prediction anyway."""
    stopping: bool = False
    """Set when the worker begins to shut down: it takes no new job from then on."""
    cancels: set[asyncio.Task[None]] = field(default_factory=set)
    """Cancels of predictions the provider could not take yet (an outage), tried again in the background
    (mediagen.worker.endings)."""
    providers: Mapping[str, Provider] = field(default_factory=dict)
    """Every configured provider's adapter, by name (`provider` is the first); empty: `provider` only."""
    webhook_urls: Mapping[str, str | None] | None = None
    """Each provider's webhook route, when its webhooks are on; None: `webhook_url` for every provider."""
    webhook_polls: Mapping[str, float] = field(default_factory=dict)
    """Each provider's safety-net look with webhooks on; a provider not named: `webhook_poll_seconds`."""

    def provider_for(self, name: str) -> Provider:
        """The adapter of the provider that runs an attempt (`Claim.provider`)."""
        if not self.providers:
            return self.provider
        try:
            return self.providers[name]
        except KeyError:
            raise PermanentProviderError(
                f"{name} is not configured on this worker (MEDIAGEN_PROVIDERS, FAL_KEY, ...)",
                error_class="ProviderNotConfigured",
            ) from None

    def webhook_poll_for(self, name: str) -> float:
        """With the provider `name`'s webhooks on: how long to wait for one before looking anyway."""
        return self.webhook_polls.get(name, self.webhook_poll_seconds)

    def webhook_for(self, name: str) -> str | None:
        """Where the provider `name` POSTs our predictions, when its webhooks are on."""
        if self.webhook_urls is None:
            return self.webhook_url
        return self.webhook_urls.get(name)
