"""Failover: when the provider of an attempt cannot take the job, the job moves to its next route.

A job moves only when it holds no prediction anywhere (the attempt is about to create one: nothing to
resume, no create of unknown outcome to look for), is not pinned to its provider (`parameters.provider`),
and has a route after this one. The provider cannot take it when its circuit is open (`ProviderOutage`:
down for every worker, nothing sent) or it refused the create for capacity (429, 503: nothing made). The
attempt then ends failed, saying where the job went, and the job's next attempt, at the next provider,
says where it came from (`failover_from`); see mediagen.worker.endings.fail_over. A job never goes back to
a provider it left, so it moves at most once per route. A prediction that may live (one to resume or to
look for) is waited for, never left behind: a job never holds predictions at two providers at once.
"""

from __future__ import annotations

from mediagen.core import jobs
from mediagen.core.errors import ProviderOutage, TransientProviderError
from mediagen.core.routing import Route

CAPACITY_STATUS = frozenset({429, 503})
"""A create refused with these made nothing and says the provider is full: worth another provider."""


class FailingOver(Exception):
    """The attempt's provider cannot take the job now: it moves to `to` (mediagen.worker.endings.fail_over)."""

    def __init__(self, to: Route, cause: TransientProviderError) -> None:
        super().__init__(f"failing over to {to.provider}: {cause.message}")
        self.to = to
        self.cause = cause


def failover_route(claim: jobs.Claim, error: TransientProviderError) -> Route | None:
    """Where the job goes instead when its provider cannot take it: its next route, when the provider's
    circuit is open or it refused the create for capacity (429, 503: nothing made), and the job is not
    pinned to it."""
    capacity = error.create_rejected and error.http_status in CAPACITY_STATUS
    if not (isinstance(error, ProviderOutage) or capacity):
        return None
    return claim.next_route()
