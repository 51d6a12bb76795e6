"""A fair share of the account's create budget: when it is the bottleneck, keys take turns.

Without it, creates are served first come, first served (every reservation takes the next free slot), so
one key's backlog of 100 jobs holds the 100 next slots and a second key's single job waits behind all of
them. With it, a create that finds no slot free now (or others already waiting) joins a queue in Redis,
ordered by *start-time fair queuing*: the waiter of key k in lane l gets the tag

    tag = max(V[l], last_tag[l][k]) + 1 / weight[k]

where V[l] is the tag of the lane's last waiter served. A key with one waiter gets a tag just after the
one being served, whatever the other keys' backlogs; a key with 100 waiters has tags one apart; so keys
with jobs waiting are served in turn (round-robin at equal weights). The `interactive` lane goes before
the `batch` lane. Each waiter asks again when its turn should have come (the queue's rank, in slots of
the budget, tells when), and is granted a slot once fewer waiters are ahead of it than slots are free.

All of it is read and written in the budget's own script (mediagen.providers.ratelimit), atomically, by
Redis's clock: every worker process on every host sees one queue. Nothing of it runs while nobody
waits and a slot is free: the reservation is then the plain GCRA one, in the same single call.

Starvation-free: a waiter's tag is fixed when it joins, V only grows (to the tag of each waiter served),
and a key's tags grow by 1/weight each, so only finitely many tags (per key, (tag - V) x weight) can
ever be placed before a waiting one. Batch waits only while interactive creates wait, which a key can
have few of (`MEDIAGEN_MAX_INTERACTIVE_JOBS`).

A worker that dies while waiting stops asking: its place expires (its next expected visit, plus a
grace) and those behind it move up; meanwhile it holds one slot of the burst, not the queue. A worker
that dies holding a granted slot loses that one slot, as before fairness. A waiter that gives up (its
job canceled, its deadline) leaves the queue at once.

The job's key and lane reach the limiter through `current` (a context variable the worker sets around
its create), so the `Provider` protocol stays as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

Lane = Literal["interactive", "batch"]
LANES: tuple[Lane, ...] = ("interactive", "batch")


@dataclass(frozen=True)
class Share:
    """Whose create this is: the job's key (owner id), its lane and its key's weight."""

    owner: str
    lane: Lane = "batch"
    weight: float = 1.0
    placed: Callable[[int], Awaitable[None]] | None = None
    """Told how many creates go before this one, each time that changes while it waits."""


current: ContextVar[Share | None] = ContextVar("mediagen_fair_share", default=None)
"""The share of the create being made in this task (None: served as the anonymous key)."""


# Keys (each a Redis key): queue, a sorted set of waiters by lane * _LANE + tag; seen, a sorted set of
# waiters by the time after which a waiter that did not ask again is taken for dead; tags, a hash of
# each lane's V ('v<lane>') and of each key's last tag in a lane ('t<lane>:<owner>').
# fair_turn returns {ms to wait, the waiter's rank}: a wait of 0 means a slot is granted (the caller
# takes it); rank -1 means nobody waits and a slot was free (the plain budget).
FUNCTIONS = """
local FAIR_LANE = 1e12
local function fair_forget(queue, seen, tags, waiter)
  redis.call('ZREM', queue, waiter)
  redis.call('ZREM', seen, waiter)
  if redis.call('ZCARD', queue) == 0 then redis.call('DEL', tags, seen) end
end
local function fair_turn(queue, seen, tags, now, tat, interval, burst, waiter, owner, lane, weight, grace)
  local gone = redis.call('ZRANGEBYSCORE', seen, '-inf', now, 'LIMIT', 0, 100)
  for _, dead in ipairs(gone) do fair_forget(queue, seen, tags, dead) end
  local rank = redis.call('ZRANK', queue, waiter)
  if not rank then
    if redis.call('ZCARD', queue) == 0 and gcra_wait(tat, now, interval, burst) == 0 then return 0, -1 end
    local t = 't' .. lane .. ':' .. owner
    local start = math.max(tonumber(redis.call('HGET', tags, 'v' .. lane) or '0'),
                           tonumber(redis.call('HGET', tags, t) or '0'))
    local tag = start + 1 / weight
    redis.call('HSET', tags, t, tag)
    redis.call('ZADD', queue, lane * FAIR_LANE + tag, waiter)
    rank = redis.call('ZRANK', queue, waiter)
  end
  local wait = gcra_wait(tat + rank * interval, now, interval, burst)
  local keep = math.ceil(wait + grace)
  if wait > 0 then
    redis.call('ZADD', seen, now + keep, waiter)
    for _, key in ipairs({queue, seen, tags}) do
      if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
    end
    return wait, rank
  end
  local tag = tonumber(redis.call('ZSCORE', queue, waiter)) - lane * FAIR_LANE
  local v = 'v' .. lane
  if tag > tonumber(redis.call('HGET', tags, v) or '0') then redis.call('HSET', tags, v, tag) end
  fair_forget(queue, seen, tags, waiter)
  return 0, rank
end
"""
