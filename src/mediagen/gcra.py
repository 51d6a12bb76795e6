"""GCRA (the generic cell rate algorithm) in Redis Lua: the one copy of the maths both limiters run.

A budget lets `burst` calls through at once, then one every `interval` ms. It is one Redis key holding
the budget's "theoretical arrival time" (TAT, ms): the slot the next call takes, never earlier than
now. A call may go once `wait` is 0, that is when the TAT is at most `interval * (burst - 1)` ahead;
taking a slot moves the TAT one interval on.

Each limiter's script is `script(body)`: these functions, then its own body, so that the budget is read,
decided and written in the same call as whatever that limiter keeps beside it:

* mediagen.api.limits *admits or refuses* a request of one API key (and counts the key's unfinished
  jobs in the same call; a refusal takes no slot);
* mediagen.providers.ratelimit *reserves* the next slot of Replicate's budget, shared by every worker,
  and sleeps until it (and holds the budget shut for a 429's `retry_after`).

The functions a body may call (times in ms):

    gcra_clock()                            Redis's own clock, so that hosts need not agree on the time
    gcra_tat(key, now)                      the budget's TAT, never before `now`
    gcra_wait(tat, now, interval, burst)    how long until the slot at `tat` may be used (0: now)
    gcra_left(tat, now, interval, burst)    the slots still free at once when the next is at `tat`
    gcra_hold(tat, now, interval, burst, ms)  the TAT that frees no slot for `ms`
    gcra_store(key, tat, now)               write the TAT back, kept only as long as it matters
"""

from __future__ import annotations

FUNCTIONS = """
local function gcra_clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local function gcra_tat(key, now)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then return now end
  return tat
end
local function gcra_wait(tat, now, interval, burst)
  return math.max(0, tat - interval * (burst - 1) - now)
end
local function gcra_left(tat, now, interval, burst)
  return math.floor((now + interval * burst - tat) / interval)
end
local function gcra_hold(tat, now, interval, burst, ms)
  return math.max(tat, now + ms + interval * (burst - 1))
end
local function gcra_store(key, tat, now)
  redis.call('SET', key, tat, 'PX', math.ceil(tat - now) + 1000)
end
"""


def script(body: str) -> str:
    """A limiter's Lua script: the GCRA functions, then `body`, which calls them."""
    return FUNCTIONS + body
