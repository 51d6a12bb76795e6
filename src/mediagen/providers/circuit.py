"""A provider account's circuit breaker (Replicate's, fal's), shared by every worker in Redis: an outage is a pause.

Consecutive failed calls to Replicate (a 5xx, a dropped or refused connection, a timeout), counted
across jobs and processes, open the circuit for `open_seconds`: meanwhile no worker calls Replicate,
and a call that would have raises `ProviderOutage` (no request sent), which the retry policy treats as
a wait, not a failed attempt (mediagen.core.retry). Then one caller at a time is let through as the
probe: it first makes a cheap read of its own (`probe_with`: for Replicate, the first page of the
list), so that no job's create is the call that finds out. Answered: the circuit closes for everyone
and the caller goes on. Not: it opens again and the caller waits like the others. Any answer below 500
is a success and resets the count.

    circuit = Circuit(redis, namespace="mediagen", failures=10, open_seconds=10, probe_seconds=35)
    limiter = RateLimiter(redis, ..., circuit=circuit)   # the budget's reservation reads the circuit
    await circuit.failed()                               # after a 5xx, a connection error, a timeout
    await circuit.succeeded()                            # after any other answer (free when all is well)

Each provider's account has its own circuit (`provider`: "replicate", "fal"). State: one Redis hash per
account, `<ns>:<provider>-circuit` (`failures`, `opened_at`, `open_until`,
`probe_until`, `probe_by`; ms on Redis's clock, so hosts need not agree on the time). Reading it costs
no round trip of its own: `FUNCTIONS` run inside the budget's reservation script
(mediagen.providers.ratelimit), which answers the circuit's state with the slot, and refuses the slot
while it is open. Writes happen off the happy path only: one call per failure, and one for the first
success after this process saw a failure or an open circuit. A count of failures no new failure
joins within `memory_seconds` is forgotten.

Why ours and not a library: `pybreaker` keeps its state in Redis but is synchronous, `aiobreaker`
keeps it in memory, and `purgatory`'s async Redis storage reads and writes it in round trips of its own
around every call; none can be read inside the budget's own script, which the happy path's cost asks for.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

import httpx
from redis.asyncio import Redis

from mediagen import metrics
from mediagen.core.errors import ProviderOutage
from mediagen.logging import log_event

State = Literal["closed", "open", "probe"]

# For the reservation script. circuit_admit(key, now, probe_ms, caller) -> state, ms until it may be
# asked again (when open), failures counted. Open: no call. Its time up and no probe in flight (or
# the probe is this caller's own): this caller is the probe, for `probe_ms` at most.
FUNCTIONS = """
local function circuit_admit(key, now, probe_ms, caller)
  local c = redis.call('HMGET', key, 'failures', 'open_until', 'probe_until', 'probe_by')
  local failures = tonumber(c[1] or '0')
  local open_until = tonumber(c[2] or '0')
  if open_until == 0 then return 'closed', 0, failures end
  if now < open_until then return 'open', open_until - now, failures end
  local probe_until = tonumber(c[3] or '0')
  if probe_until > now and c[4] ~= caller then return 'open', math.min(probe_until - now, 1000), failures end
  redis.call('HSET', key, 'probe_until', now + probe_ms, 'probe_by', caller)
  return 'probe', 0, failures
end
"""

# KEYS[1]: the circuit. ARGV: 'failure' or 'success', failures that open it, open ms, memory ms.
# Returns {transition ('opened', 'reopened', 'closed' or ''), failures, ms it stays open, ms it was open}.
_OUTCOME = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local opened_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
if ARGV[1] == 'success' then
  redis.call('DEL', KEYS[1])
  if opened_at > 0 then return {'closed', 0, '0', tostring(now - opened_at)} end
  return {'', 0, '0', '0'}
end
local threshold, open_ms, memory_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local transition = ''
if (open_until == 0 and failures >= threshold) or (open_until > 0 and now >= open_until) then
  -- enough failures in a row; or the probe (or a call let through before it opened) failed
  if open_until == 0 then transition = 'opened'; opened_at = now else transition = 'reopened' end
  open_until = now + open_ms
  redis.call('HSET', KEYS[1], 'open_until', open_until, 'opened_at', opened_at)
  redis.call('HDEL', KEYS[1], 'probe_until', 'probe_by')
end
redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(0, open_until - now) + memory_ms))
return {transition, failures, tostring(math.max(0, open_until - now)), tostring(now - opened_at)}
"""


class Circuit:
    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str,
        failures: int,
        open_seconds: float,
        probe_seconds: float,
        memory_seconds: float = 600.0,
        provider: str = "replicate",
    ) -> None:
        self.provider = provider
        """Whose account this circuit guards (its Redis key, its metrics' and logs' `provider`)."""
        self.key = f"{namespace}:{provider}-circuit"
        self.failures = failures
        self.open_seconds = open_seconds
        self.probe_ms = probe_seconds * 1000
        self.memory_ms = memory_seconds * 1000
        self._outcome = redis.register_script(_OUTCOME)
        self._id = uuid.uuid4().hex[:12]
        self._calls = itertools.count()
        self._shown_open = False
        self._probe: Callable[[], Awaitable[bool]] | None = None
        self.suspect = False
        """This process saw a failure or an open circuit since its last success: a success must be told,
        and with no budget to read the circuit with, each call reads it first."""

    def caller(self) -> str:
        """An id for one reservation (the probe is the caller's until its call ends): cheap, unique."""
        return f"{self._id}-{next(self._calls)}"

    def probe_with(self, answers: Callable[[], Awaitable[bool]]) -> None:
        """The probe: one cheap call of its own (the provider's), made by the caller the circuit lets
        through once it was open long enough. Without one, that caller's own call is the probe."""
        self._probe = answers

    async def admit(self, state: str, failures: int, open_ms: float) -> None:
        """What the budget's reservation read of the circuit. Raises ProviderOutage while it is open;
        for the caller chosen as the probe, probes first, and raises unless the provider answered."""
        if state == "closed" and failures == 0 and not self._shown_open:
            return  # the happy path: nothing changed
        if state != "closed" or failures > 0:
            self.suspect = True
        self._show_open(state == "open")
        if state == "open":
            raise self._outage(open_ms / 1000)
        if state == "probe" and self._probe is not None:
            if await self._probe():
                await self.succeeded()
            else:
                await self.failed()
                raise self._outage(self.open_seconds)

    def _outage(self, seconds: float) -> ProviderOutage:
        return ProviderOutage(
            f"{self.provider} is unavailable to every worker (its circuit is open); no request was sent",
            retry_after=max(seconds, 0.05),
        )

    async def failed(self) -> None:
        """A call failed as an outage fails: count it; the failure that crosses the line opens the circuit."""
        self.suspect = True
        try:
            raw = await self._outcome(
                keys=[self.key], args=["failure", self.failures, self.open_seconds * 1000, self.memory_ms]
            )
        except Exception as error:
            log_event("replicate.circuit.unavailable", logging.WARNING, provider=self.provider, error=repr(error))
            return
        transition, failures, open_ms = _text(raw[0]), int(raw[1]), float(raw[2])
        if transition == "opened":
            metrics.replicate_circuit_transitions.labels(self.provider, "opened").inc()
            self._show_open(True)
            log_event(
                "provider.circuit.opened",
                logging.WARNING,
                provider=self.provider,
                failures=failures,
                open_seconds=round(open_ms / 1000, 3),
            )
        elif transition == "reopened":
            self._show_open(True)
            log_event("provider.circuit.probe_failed", logging.WARNING, provider=self.provider, failures=failures)

    async def succeeded(self) -> None:
        """A call was answered: after failures this process saw, reset the count and close the circuit."""
        if not self.suspect:
            return  # the happy path: nothing to tell
        self.suspect = False
        try:
            raw = await self._outcome(keys=[self.key], args=["success", self.failures, 0, 0])
        except Exception as error:
            self.suspect = True
            log_event("replicate.circuit.unavailable", logging.WARNING, provider=self.provider, error=repr(error))
            return
        self._show_open(False)
        if _text(raw[0]) == "closed":
            metrics.replicate_circuit_transitions.labels(self.provider, "closed").inc()
            log_event(
                "provider.circuit.closed", provider=self.provider, open_for_seconds=round(float(raw[3]) / 1000, 3)
            )

    def _show_open(self, is_open: bool) -> None:
        self._shown_open = is_open
        metrics.replicate_circuit_open.labels(self.provider).set(1 if is_open else 0)


async def send_told(circuit: Circuit | None, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """`send()`, its outcome told to `circuit`: a 5xx or a lost connection fails, any other answer succeeds.
    Our own connection pool being full says nothing of the provider's health, and is not told."""
    try:
        response = await send()
    except httpx.PoolTimeout:
        raise
    except httpx.TransportError:
        if circuit is not None:
            await circuit.failed()
        raise
    if circuit is not None:
        await (circuit.failed() if response.status_code >= 500 else circuit.succeeded())
    return response


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
