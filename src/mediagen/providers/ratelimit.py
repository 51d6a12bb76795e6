"""A provider account's rate limits, shared by every worker process on every machine: two GCRA budgets in
Redis per provider (`provider`: Replicate's at `<ns>:replicate-budget:*`, fal's at `<ns>:fal-budget:*`).

Replicate allows an account 600 prediction creates a minute and 3,000 other requests a minute, with
short bursts above that (shared/replicate-api.md §1.6). Each budget here is one Redis key holding a
"theoretical arrival time" (GCRA, mediagen.gcra: the same maths as the API's per-key limits). A caller
*reserves* the next free slot in one script call (Redis's own clock, so hosts need not agree on the
time) and sleeps until it: no thundering herd when a window opens. Other requests are served in the
order they asked; creates that must wait are served by key in turn (mediagen.providers.fairshare: one
key's backlog does not hold every slot ahead of another key's job). The script is ours because the
libraries that do async Redis (`limits`, `pyrate-limiter`) answer "allowed or not now", which leaves
the waiting to a retry loop, and neither can hold a budget shut for a 429's `retry_after`.

    limiter = RateLimiter(redis, namespace="mediagen", creates_per_minute=600, requests_per_minute=3000)
    waited = await limiter.acquire("create")     # seconds slept for the token
    limiter.pause("create", 5.0)                 # a 429 came back anyway: nobody creates for 5 s

A pause moves the budget's next free slot past its end for every process; slots reserved before it are
kept (they were handed out already), so a burst of 429s can follow a pause only from waiters who were
already asleep, and each of those extends the pause, never shortens it. A budget of 0 a minute is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any, Literal

from redis.asyncio import Redis

from mediagen import gcra, metrics
from mediagen.core.errors import ProviderOutage
from mediagen.logging import log_event
from mediagen.providers import circuit, fairshare
from mediagen.providers.circuit import Circuit

Budget = Literal["create", "other"]

# KEYS[1]: the budget's theoretical arrival time (mediagen.gcra); KEYS[2]: set while it is paused;
# KEYS[3]: the account's circuit (mediagen.providers.circuit); KEYS[4..6]: the fair queue's (mediagen.
# providers.fairshare). ARGV: interval ms (0: no budget, the circuit alone), burst, pause ms, probe ms
# (-1: no circuit), the caller's id (for the probe), the waiter's id ('': first come, first served),
# its owner, lane (0 interactive, 1 batch), weight, grace ms, and 'leave' to take the waiter out.
# Reserve (pause 0): {ms to wait, circuit state, failures, ms the circuit stays open, the waiter's rank
# (-1: not queued)}; an open circuit reserves no slot, nor does a fair waiter told to wait (it asks
# again then). Pause (> 0): no slot before now + pause, and KEYS[2] lives that long (slots reserved
# before it see it).
_RESERVE = gcra.script(
    circuit.FUNCTIONS
    + fairshare.FUNCTIONS
    + """
if ARGV[11] == 'leave' then
  fair_forget(KEYS[4], KEYS[5], KEYS[6], ARGV[6])
  return {'0', 'closed', 0, '0', '-1'}
end
local now = gcra_clock()
local interval, burst, pause = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local probe_ms = tonumber(ARGV[4])
local state, open_ms, failures = 'closed', 0, 0
if pause == 0 and probe_ms >= 0 then
  state, open_ms, failures = circuit_admit(KEYS[3], now, probe_ms, ARGV[5])
  if state == 'open' or interval == 0 then return {'0', state, failures, tostring(open_ms), '-1'} end
end
local tat = gcra_tat(KEYS[1], now)
local wait, rank = 0, -1
if pause > 0 then
  tat = gcra_hold(tat, now, interval, burst, pause)
  if redis.call('PTTL', KEYS[2]) < pause then redis.call('SET', KEYS[2], '1', 'PX', math.ceil(pause)) end
elseif ARGV[6] == '' then
  wait = gcra_wait(tat, now, interval, burst)
  tat = tat + interval
else
  wait, rank = fair_turn(KEYS[4], KEYS[5], KEYS[6], now, tat, interval, burst, ARGV[6], ARGV[7],
                         tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]))
  if wait > 0 then return {tostring(wait), state, failures, '0', tostring(rank)} end
  tat = tat + interval
end
gcra_store(KEYS[1], tat, now)
return {tostring(wait), state, failures, '0', tostring(rank)}
"""
)

_NAP = 5.0
"""The longest a fair waiter sleeps before asking again: places ahead of it freed by waiters that left
or died are used within this."""


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str,
        creates_per_minute: int,
        requests_per_minute: int,
        create_burst: int = 10,
        request_burst: int = 50,
        circuit: Circuit | None = None,
        provider: str = "replicate",
    ) -> None:
        self.redis = redis
        self.provider = provider
        """Whose account these budgets are (their Redis keys; every provider has its own)."""
        self.circuit = circuit
        """The account's circuit breaker, read in the same call as each reservation."""
        self.namespace = namespace
        self._rates: dict[Budget, tuple[int, int]] = {
            "create": (creates_per_minute, max(1, create_burst)),
            "other": (requests_per_minute, max(1, request_burst)),
        }
        self._script = redis.register_script(_RESERVE)
        self._paused_until: dict[Budget, float] = {"create": 0.0, "other": 0.0}
        self._tasks: set[asyncio.Task[None]] = set()

    def key(self, budget: Budget) -> str:
        return f"{self.namespace}:{self.provider}-budget:{budget}"

    def _keys(self, budget: Budget) -> list[str]:
        circuit_key = self.circuit.key if self.circuit is not None else f"{self.namespace}:{self.provider}-circuit"
        fair = f"{self.key(budget)}:fair"
        return [
            self.key(budget),
            f"{self.key(budget)}:paused",
            circuit_key,
            f"{fair}:queue",
            f"{fair}:seen",
            f"{fair}:tags",
        ]

    async def _run(
        self,
        budget: Budget,
        interval: float,
        burst: int,
        *,
        pause: float = 0.0,
        caller: str = "",
        fair: list[str | float] | None = None,
    ) -> tuple[float, int]:
        """One call of the script: the seconds to wait (pause 0) and the fair waiter's rank (-1: none).
        Without `fair` the wait is for the slot it reserved; with it (mediagen.providers.fairshare: the
        waiter's id, owner, lane, weight, grace ms), a wait of 0 is a slot granted, and a longer one is
        when to ask again. Reads the circuit too, unless pausing, and raises ProviderOutage when it is
        open (no slot reserved then)."""
        probe_ms = self.circuit.probe_ms if self.circuit is not None else -1
        queued = fair or ["", "", 0, 1, 0]
        raw = await self._script(
            keys=self._keys(budget), args=[interval * 1000, burst, pause * 1000, probe_ms, caller, *queued, ""]
        )
        wait, state, failures, open_ms, rank = raw
        if self.circuit is not None and not pause:
            await self.circuit.admit(_text(state), int(failures), float(open_ms))
        return float(wait) / 1000, int(rank)

    async def _wait_turn(
        self, budget: Budget, interval: float, burst: int, caller: str, share: fairshare.Share
    ) -> None:
        """Wait in the fair queue until a slot is granted (taken in the same call that grants it)."""
        waiter = uuid.uuid4().hex
        fair: list[str | float] = [waiter, share.owner, fairshare.LANES.index(share.lane), share.weight]
        fair.append(max(2.0, 2 * interval) * 1000)  # the grace before a silent waiter is taken for dead
        told = -1
        try:
            while True:
                wait, rank = await self._run(budget, interval, burst, caller=caller, fair=fair)
                if wait <= 0:
                    return
                if share.placed is not None and rank != told:
                    told = rank
                    await share.placed(rank)
                await asyncio.sleep(min(wait, _NAP))
        except BaseException:
            # Canceled (the job's cancel or deadline), or Redis failed: give the place up at once, not
            # when it would expire, so that those behind move up now.
            self._background(self._leave(budget, waiter))
            raise

    async def _leave(self, budget: Budget, waiter: str) -> None:
        with contextlib.suppress(Exception):
            await self._script(keys=self._keys(budget), args=[0, 1, 0, -1, "", waiter, "", 0, 1, 0, "leave"])

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def enabled(self, budget: Budget) -> bool:
        return self._rates[budget][0] > 0

    async def acquire(self, budget: Budget) -> float:
        """Wait for a token of `budget`; the seconds waited. Redis unreachable: no wait (logged).
        Raises ProviderOutage while the account's circuit is open."""
        if self._rates[budget][0] <= 0 and not self._circuit_suspect():
            return 0.0
        started = time.monotonic()
        await self.reserve(budget)
        return time.monotonic() - started

    def late(self, budget: Budget, slot: float) -> bool:
        """Is it now well past `slot` (half the budget's burst of slots)? A request sent this late would
        go out together with the next ones, a burst Replicate may refuse: reserve another slot."""
        per_minute, burst = self._rates[budget]
        return per_minute > 0 and time.monotonic() - slot > 60.0 / per_minute * max(1, burst // 2)

    async def reserve(self, budget: Budget) -> float:
        """Wait for a token of `budget`; its slot (`time.monotonic()`). A caller that wakes `late()`
        (a busy event loop) gives its slot up and reserves another. Raises ProviderOutage while the
        account's circuit is open: no slot is taken then."""
        per_minute, burst = self._rates[budget]
        started = time.monotonic()
        caller = self.circuit.caller() if self.circuit is not None else ""
        if per_minute <= 0:
            if self._circuit_suspect():
                # No budget to read the circuit with, and this process saw it falter: read it alone.
                try:
                    await self._run(budget, 0, 1, caller=caller)
                except ProviderOutage:
                    raise
                except Exception as error:
                    self._unavailable(budget, error)
            return started
        interval = 60.0 / per_minute
        # Creates carry the job's key (mediagen.providers.fairshare): served in turn when they must wait.
        share = fairshare.current.get() if budget == "create" else None
        slot = started
        while True:
            asked_at = time.monotonic()
            try:
                if share is None:
                    wait, _ = await self._run(budget, interval, burst, caller=caller)
                else:
                    await self._wait_turn(budget, interval, burst, caller, share)
                    asked_at, wait = time.monotonic(), 0.0
                # The slot is `wait` after Redis answered, which was no later than now. A pause this
                # process learned of after the slot was reserved elsewhere still holds.
                slot = max(asked_at + wait, self._paused_until[budget])
                if slot > time.monotonic():
                    await asyncio.sleep(slot - time.monotonic())
                    # Paused while we slept (a 429 in any process): this slot is no good, take a later one.
                    paused_for = int(await self.redis.pttl(self._keys(budget)[1]))
                    if paused_for > 0:
                        self._paused_until[budget] = max(
                            self._paused_until[budget], time.monotonic() + paused_for / 1000
                        )
                        continue
            except ProviderOutage:
                raise
            except Exception as error:
                # Better a 429 (which pauses us) than a worker stuck because Redis blinked.
                self._unavailable(budget, error)
                break
            if not self.late(budget, slot):
                break
            metrics.replicate_tokens_late.labels(self._label(budget)).inc()
        metrics.replicate_tokens.labels(self._label(budget)).inc()
        metrics.replicate_token_wait.labels(self._label(budget)).observe(time.monotonic() - started)
        return slot

    def pause(self, budget: Budget, seconds: float) -> None:
        """Nobody spends `budget` for `seconds` (a 429 said so); never blocks, never raises."""
        metrics.replicate_throttled.labels(self._label(budget)).inc()
        seconds = max(seconds, 0.05)
        self._paused_until[budget] = max(self._paused_until[budget], time.monotonic() + seconds)
        log_event("replicate.throttled", logging.WARNING, provider=self.provider, budget=budget, retry_after=seconds)
        per_minute, burst = self._rates[budget]
        if per_minute <= 0:
            return
        self._background(self._pause(budget, seconds, per_minute, burst))

    async def _pause(self, budget: Budget, seconds: float, per_minute: int, burst: int) -> None:
        with contextlib.suppress(Exception):
            await self._run(budget, 60.0 / per_minute, burst, pause=seconds)

    def _unavailable(self, budget: Budget, error: Exception) -> None:
        """Redis could not be asked for a token of `budget`: the call goes on without one, and says so."""
        log_event(
            "replicate.budget.unavailable", logging.WARNING, provider=self.provider, budget=budget, error=repr(error)
        )

    def _label(self, budget: Budget) -> str:
        """The budget metrics' label: Replicate's budgets keep their names, another provider's are prefixed."""
        return budget if self.provider == "replicate" else f"{self.provider}-{budget}"

    def _circuit_suspect(self) -> bool:
        return self.circuit is not None and self.circuit.suspect


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
