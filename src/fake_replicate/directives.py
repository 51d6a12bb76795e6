"""Per-prompt `[[...]]` directives: deterministic faults for tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, TypeVar

# --------------------------------------------------------------------------- directives


@dataclass(frozen=True)
class CreateFault:
    """``[[create:STATUS*N:retry_after=S]]``; ``count`` None means always."""

    status: int
    count: int | None
    retry_after: float | None = None


@dataclass(frozen=True)
class GetFault:
    """``[[get:STATUS*N]]``; ``count`` None means always."""

    status: int
    count: int | None


@dataclass(frozen=True)
class AmbiguousCreate:
    """``[[create_ambiguous:ANSWER*N]]``: the prediction is made, then the create answers ``answer``
    (a 5xx status, or ``drop``: the connection closed with no answer); ``count`` None means always."""

    answer: str
    count: int | None


@dataclass(frozen=True)
class Outage:
    """``[[outage=S]]`` / ``[[outage=S:after=D]]``: every Replicate endpoint answers 503 for ``seconds``,
    from the first create with this prompt (which is refused, nothing made) or, with ``after``, from
    ``after`` seconds past that create (which makes its prediction and answers as usual)."""

    seconds: float
    after: float | None = None


@dataclass(frozen=True)
class Directives:
    """Everything the ``[[...]]`` markers of one prompt ask for."""

    create_faults: tuple[CreateFault, ...] = ()
    ambiguous_creates: tuple[AmbiguousCreate, ...] = ()
    outage: Outage | None = None
    get_faults: tuple[GetFault, ...] = ()
    flagged: bool = False
    fail: bool = False
    fail_count: int | None = None
    invalid: bool = False
    latency: float | None = None
    starting: float | None = None
    """``[[starting=S]]``: S seconds in ``starting`` (a queue, a cold boot) before the run's own latency."""
    hang_create: float = 0.0
    hang_count: int | None = None
    output: str | None = None
    nsfw: int = 0
    """``[[nsfw:N]]``: N of the images are flagged (flux drops them from the output; all flagged: failed)."""

    @property
    def counts_creates(self) -> bool:
        return bool(self.create_faults)


F = TypeVar("F", CreateFault, AmbiguousCreate)
NO_DIRECTIVES: Final = Directives()
_MARKER_RE: Final = re.compile(r"\[\[([^\[\]]*)\]\]")
_NUM: Final = r"(\d+(?:\.\d+)?)"
_CREATE_RE: Final = re.compile(rf"create:(\d{{3}})(?:\*(\d+))?(?::retry_after={_NUM})?")
_AMBIGUOUS_RE: Final = re.compile(r"create_ambiguous:(5\d\d|drop)(?:\*(\d+))?")
_OUTAGE_RE: Final = re.compile(rf"outage={_NUM}(?::after={_NUM})?")
_GET_RE: Final = re.compile(r"get:(\d{3})(?:\*(\d+))?")
_FAIL_RE: Final = re.compile(r"fail(?:\*(\d+))?")
_LATENCY_RE: Final = re.compile(rf"latency={_NUM}")
_STARTING_RE: Final = re.compile(rf"starting={_NUM}")
_HANG_RE: Final = re.compile(rf"hang_create={_NUM}(?:\*(\d+))?")
_OUTPUT_RE: Final = re.compile(r"output:(404|notimage|data|url)")
_NSFW_RE: Final = re.compile(r"nsfw:(\d+)")


def _count(text: str | None) -> int | None:
    return None if text is None else int(text)


def _apply_marker(marker: str, fields_: dict[str, Any]) -> None:
    """Update ``fields_`` (Directives keyword arguments) from one marker's text."""
    if marker == "flagged":
        fields_["flagged"] = True
    elif marker == "invalid":
        fields_["invalid"] = True
    elif m := _CREATE_RE.fullmatch(marker):
        after = float(m[3]) if m[3] is not None else None
        fields_["create_faults"] += (CreateFault(int(m[1]), _count(m[2]), after),)
    elif m := _AMBIGUOUS_RE.fullmatch(marker):
        fields_["ambiguous_creates"] += (AmbiguousCreate(m[1], _count(m[2])),)
    elif m := _OUTAGE_RE.fullmatch(marker):
        fields_["outage"] = Outage(float(m[1]), float(m[2]) if m[2] is not None else None)
    elif m := _GET_RE.fullmatch(marker):
        fields_["get_faults"] += (GetFault(int(m[1]), _count(m[2])),)
    elif m := _FAIL_RE.fullmatch(marker):
        fields_["fail"], fields_["fail_count"] = True, _count(m[1])
    elif m := _LATENCY_RE.fullmatch(marker):
        fields_["latency"] = float(m[1])
    elif m := _STARTING_RE.fullmatch(marker):
        fields_["starting"] = float(m[1])
    elif m := _HANG_RE.fullmatch(marker):
        fields_["hang_create"], fields_["hang_count"] = float(m[1]), _count(m[2])
    elif m := _OUTPUT_RE.fullmatch(marker):
        fields_["output"] = m[1]
    elif m := _NSFW_RE.fullmatch(marker):
        fields_["nsfw"] = int(m[1])
    # Unknown markers are ignored: they are just part of the prompt.


def parse_directives(prompt: str) -> Directives:
    """Parse the ``[[...]]`` directives of a prompt (see the module docstring)."""
    if "[[" not in prompt:
        return NO_DIRECTIVES
    kwargs: dict[str, Any] = {"create_faults": (), "ambiguous_creates": (), "get_faults": ()}
    for match in _MARKER_RE.finditer(prompt):
        _apply_marker(match[1].strip().replace(" ", ""), kwargs)
    return Directives(**kwargs)


def first_n_applies(count: int | None, index: int) -> bool:
    """Whether a "first N times" directive applies to the ``index``-th (0-based) event."""
    return count is None or index < count


def create_fault_for(faults: tuple[F, ...], attempt: int) -> F | None:
    """The create fault (if any) for the ``attempt``-th (0-based) create (or prediction) of a prompt."""
    for fault in faults:
        if fault.count is None:
            return fault
        if attempt < fault.count:
            return fault
        attempt -= fault.count
    return None
