"""The fake's fault decisions: which request fails, how, and what each prediction's fate is.

Two sources, as the README tells: the live ``FakeConfig`` (global probabilities, drawn from one seeded
RNG) and the prompt's ``[[...]]`` directives (deterministic, counted per exact prompt). Every fault
injected is counted in ``counts``, shown by ``GET /_fake/stats`` under ``faults``. An outage (every
Replicate endpoint 503 for a while) is a window of time kept here; ``fake_replicate.outage`` answers it.
"""

from __future__ import annotations

import base64
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

from starlette.responses import Response

from fake_replicate.config import FakeConfig, ambiguous_answers
from fake_replicate.directives import Directives, Outage, create_fault_for, first_n_applies
from fake_replicate.prediction import Params, Prediction, Status
from fake_replicate.responses import fault_response, throttled_response

FLAGGED_ERROR: Final = "The input or output was flagged as sensitive. (E005)"
NSFW_ERROR: Final = "All generated images contained NSFW content. Try running it again with a different prompt."
CRASH_ERROR: Final = "Prediction failed: the model timed out while starting (E6716)"
OOM_ERROR: Final = "CUDA out of memory. Tried to allocate 2.00 GiB; GPU 0 has a total capacity of 23.69 GiB (E001)"


class Faults:
    """Fault decisions over the live config (``config()``), with their RNG and their counters."""

    def __init__(self, config: Callable[[], FakeConfig]) -> None:
        self.config = config
        self.rng = random.Random(config().seed)
        self.counts: Counter[str] = Counter()
        self.create_attempts: dict[str, int] = {}
        """Creates seen per prompt, for ``[[create:...]]`` (counted only for prompts that carry one)."""
        self.outage_from = 0.0
        self.outage_until = 0.0
        """The outage window, in ``time.monotonic()`` seconds (empty when none)."""
        self.outage_prompts: set[str] = set()
        """Prompts whose ``[[outage=...]]`` has started its outage already (once per prompt)."""

    def reset(self) -> None:
        """Reseed the RNG and forget the counters and any outage (``POST /_fake/reset``)."""
        self.rng = random.Random(self.config().seed)
        self.counts.clear()
        self.create_attempts.clear()
        self.outage_from = self.outage_until = 0.0
        self.outage_prompts.clear()

    def reseed(self, seed: int | None) -> None:
        self.rng = random.Random(seed)

    def chance(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    def new_id(self) -> str:
        """A prediction id in Replicate's shape (26 base32 characters), from the seeded RNG."""
        raw = self.rng.getrandbits(128).to_bytes(16, "big")
        return base64.b32encode(raw).decode().lower()[:26]

    # ------------------------------------------------------------------ requests

    def global_create_fault(self) -> Response | None:
        """A create refused before anything is made (``p_create_429``, ``p_create_500``)."""
        config = self.config()
        if self.chance(config.p_create_429):
            self.counts["create_429"] += 1
            return throttled_response(config.retry_after)
        if self.chance(config.p_create_500):
            self.counts["create_500"] += 1
            return fault_response(500, config.retry_after)
        return None

    def directive_create_fault(self, prompt: str, directives: Directives) -> Response | None:
        """A create refused by ``[[create:STATUS*N]]`` before anything is made."""
        if not directives.counts_creates:
            return None
        attempt = self.create_attempts.get(prompt, 0)
        self.create_attempts[prompt] = attempt + 1
        fault = create_fault_for(directives.create_faults, attempt)
        if fault is None:
            return None
        self.counts[f"create_{fault.status}"] += 1
        after = fault.retry_after if fault.retry_after is not None else self.config().retry_after
        return fault_response(fault.status, after)

    def ambiguous_answer(self, directives: Directives, index: int) -> str | None:
        """How the create of the ``index``-th prediction of its prompt is answered after the prediction is
        made, when the answer leaves the client in doubt: a 5xx status (``"504"``) or ``"drop"``; else None."""
        fault = create_fault_for(directives.ambiguous_creates, index)
        if fault is not None:
            answer = fault.answer
        elif self.chance(self.config().p_create_ambiguous):
            answer = self.rng.choice(ambiguous_answers(self.config().create_ambiguous_answers))
        else:
            return None
        self.counts[f"create_ambiguous_{answer}"] += 1
        return answer

    def get_fault(self, pred: Prediction | None) -> Response | None:
        """An injected error for a GET or the list (directive first, then probabilistic)."""
        config = self.config()
        status = pred.next_get_fault() if pred is not None else None
        if status is None and self.chance(config.p_get_503):
            status = 503
        if status is None and self.chance(config.p_get_429):
            status = 429
        if status is None:
            return None
        self.counts[f"get_{status}"] += 1
        return fault_response(status, config.retry_after)

    # ------------------------------------------------------------------ a prediction's fate

    def outcome(self, directives: Directives, index: int, params: Params) -> tuple[Status, str | None]:
        """How the ``index``-th prediction of its prompt ends, and its error."""
        config = self.config()
        if directives.flagged:
            return "failed", FLAGGED_ERROR
        if params.flagged and not params.spec.nsfw_drop:
            return "failed", FLAGGED_ERROR  # the API proxies refuse a flagged image outright
        if params.flagged and params.kept == 0:
            return "failed", NSFW_ERROR
        if directives.fail and first_n_applies(directives.fail_count, index):
            return "failed", CRASH_ERROR
        if self.chance(config.p_flagged):
            return "failed", FLAGGED_ERROR
        if self.chance(config.p_model_error):
            return "failed", OOM_ERROR
        return "succeeded", None

    def latency_for(self, directives: Directives) -> float:
        """Seconds from create to the end: the prompt's ``[[latency=S]]``, else the config's, jittered."""
        if directives.latency is not None:
            return directives.latency
        config = self.config()
        latency, jitter = config.latency, config.latency_jitter
        if jitter > 0 and latency > 0:
            latency *= 1.0 + self.rng.uniform(-jitter, jitter)
        return max(latency, 0.0)

    # ------------------------------------------------------------------ outages

    def start_outage(self, seconds: float, *, after: float = 0.0) -> None:
        """Every Replicate endpoint answers 503 from ``after`` seconds from now, for ``seconds`` (0 ends one)."""
        start = time.monotonic() + after
        self.outage_from, self.outage_until = start, start + max(seconds, 0.0)

    def outage_left(self, now: float) -> float:
        """Seconds left of the outage under way at ``now``, or 0 when there is none."""
        return self.outage_until - now if self.outage_from <= now < self.outage_until else 0.0

    def directive_outage(self, prompt: str, directives: Directives) -> Outage | None:
        """The ``[[outage=...]]`` of this prompt, the first time a create carries it."""
        if directives.outage is None or prompt in self.outage_prompts:
            return None
        self.outage_prompts.add(prompt)
        self.start_outage(directives.outage.seconds, after=directives.outage.after or 0.0)
        return directives.outage
