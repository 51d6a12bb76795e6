"""Per-prompt `[[...]]` directives: deterministic faults for tests (the manual, README.md, lists them).

Counters are kept per exact prompt (submits) or per request (status and result reads); ``*N`` means
"the first N times", without it a directive always applies. Unknown markers are part of the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, TypeVar


@dataclass(frozen=True)
class SubmitFault:
    """``[[submit:STATUS*N]]``, ``[[submit:STATUS*N:enqueued]]``, ``[[submit:drop*N]]``.

    ``status`` 0 means the connection is dropped; ``enqueued`` that the request is queued all the same.
    """

    status: int
    count: int | None
    enqueued: bool = False
    retry_after: float | None = None


@dataclass(frozen=True)
class ReadFault:
    """``[[status:STATUS*N]]`` / ``[[result:STATUS*N]]``."""

    status: int
    count: int | None


@dataclass(frozen=True)
class Directives:
    """Everything the ``[[...]]`` markers of one prompt ask for."""

    submit_faults: tuple[SubmitFault, ...] = ()
    status_faults: tuple[ReadFault, ...] = ()
    result_faults: tuple[ReadFault, ...] = ()
    fail: bool = False
    fail_count: int | None = None
    invalid: bool = False
    nsfw: int = 0
    latency: float | None = None
    queue: float | None = None
    hang_submit: float = 0.0
    hang_submit_count: int | None = None
    hang_status: float = 0.0
    hang_status_count: int | None = None
    output_404: bool = False
    outage: float | None = None
    """``[[outage=S]]``: the first submit with this prompt starts an outage of S seconds ..."""
    outage_after: float | None = None
    """... refused at once, or with ``[[outage=S:after=D]]`` enqueued as usual, the outage D seconds later."""


NO_DIRECTIVES: Final = Directives()
Fault = TypeVar("Fault", SubmitFault, ReadFault)
_MARKER_RE: Final = re.compile(r"\[\[([^\[\]]*)\]\]")
_NUM: Final = r"(\d+(?:\.\d+)?)"
_SUBMIT_RE: Final = re.compile(rf"submit:(\d{{3}}|drop)(?:\*(\d+))?(:enqueued)?(?::retry_after={_NUM})?")
_READ_RE: Final = re.compile(r"(status|result):(\d{3})(?:\*(\d+))?")
_FAIL_RE: Final = re.compile(r"fail(?:\*(\d+))?")
_SECONDS_RE: Final = re.compile(rf"(latency|queue)={_NUM}")
_HANG_RE: Final = re.compile(rf"hang_(submit|status)={_NUM}(?:\*(\d+))?")
_NSFW_RE: Final = re.compile(r"nsfw:(\d+)")
_OUTAGE_RE: Final = re.compile(rf"outage={_NUM}(?::after={_NUM})?")


def _count(text: str | None) -> int | None:
    return None if text is None else int(text)


def _apply(marker: str, found: dict[str, Any]) -> None:
    """Update ``found`` (Directives keyword arguments) from one marker's text."""
    if marker == "invalid":
        found["invalid"] = True
    elif marker == "output:404":
        found["output_404"] = True
    elif m := _SUBMIT_RE.fullmatch(marker):
        dropped = m[1] == "drop"
        after = float(m[4]) if m[4] is not None else None
        fault = SubmitFault(0 if dropped else int(m[1]), _count(m[2]), dropped or bool(m[3]), after)
        found["submit_faults"] += (fault,)
    elif m := _READ_RE.fullmatch(marker):
        found[f"{m[1]}_faults"] += (ReadFault(int(m[2]), _count(m[3])),)
    elif m := _FAIL_RE.fullmatch(marker):
        found["fail"], found["fail_count"] = True, _count(m[1])
    elif m := _SECONDS_RE.fullmatch(marker):
        found[m[1]] = float(m[2])
    elif m := _HANG_RE.fullmatch(marker):
        found[f"hang_{m[1]}"], found[f"hang_{m[1]}_count"] = float(m[2]), _count(m[3])
    elif m := _NSFW_RE.fullmatch(marker):
        found["nsfw"] = int(m[1])
    elif m := _OUTAGE_RE.fullmatch(marker):
        found["outage"] = float(m[1])
        found["outage_after"] = float(m[2]) if m[2] is not None else None


def parse_directives(prompt: str) -> Directives:
    """The ``[[...]]`` directives of a prompt."""
    if "[[" not in prompt:
        return NO_DIRECTIVES
    found: dict[str, Any] = {"submit_faults": (), "status_faults": (), "result_faults": ()}
    for match in _MARKER_RE.finditer(prompt):
        _apply(match[1].strip().replace(" ", ""), found)
    return Directives(**found)


def first_n_applies(count: int | None, index: int) -> bool:
    """Whether a "first N times" directive applies to the ``index``-th (0-based) event."""
    return count is None or index < count


def nth_fault(faults: tuple[Fault, ...], index: int) -> Fault | None:
    """The fault (if any) for the ``index``-th (0-based) event: the directives are consumed in order."""
    for fault in faults:
        if fault.count is None:
            return fault
        if index < fault.count:
            return fault
        index -= fault.count
    return None
