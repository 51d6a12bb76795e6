"""The job's domain verbs, each called as the worker, the sweep, the API or the CLI calls it, against a
real PostgreSQL database of this module's own (no worker or sweep of the session runs on it); then the
worker's sweep (mediagen.worker.recovery) over them, with a provider that only cancels, as scripted.

Each test reads as one state change of mediagen.core.jobs: given a job in some state, when one verb
runs, then the row (and its attempt) is as the state machine says, and the verb's answer says so too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from conftest import RUN_ID, create_database, drop_database
from mediagen.core import jobs
from mediagen.core.db import Database
from mediagen.core.errors import PermanentProviderError, TransientProviderError
from mediagen.devtools.launcher import migrate
from mediagen.providers.base import Prediction
from mediagen.worker import recovery


@pytest.fixture(scope="module")
async def own_db(postgres_admin_url: str) -> AsyncIterator[Database]:
    name = f"mediagen_test_{RUN_ID}_domain_{uuid.uuid4().hex[:6]}"
    url = create_database(postgres_admin_url, name)
    await asyncio.to_thread(migrate, url)
    db = Database(url, pool_size=2)
    yield db
    await db.dispose()
    drop_database(postgres_admin_url, name)


@pytest.fixture
async def domain_db(own_db: Database) -> Database:
    """The module's database, with no job in it: a sweep sees this test's jobs only."""
    async with own_db.transaction() as conn:
        await conn.execute(text("TRUNCATE jobs CASCADE"))
    return own_db


async def new_job(db: Database, *, deadline_seconds: float = 900, owner: str = "", max_attempts: int = 3) -> uuid.UUID:
    job = jobs.NewJob(
        id=uuid.uuid4(),
        prompt="a lighthouse",
        parameters={"width": 512},
        model="fake/model",
        max_attempts=max_attempts,
        deadline_seconds=deadline_seconds,
        owner=owner,
    )
    async with db.transaction() as conn:
        assert await jobs.create_jobs(conn, [job]) == {job.id}
    return job.id


async def job_row(db: Database, job_id: uuid.UUID) -> Any:
    async with db.connect() as conn:
        return (await conn.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id})).one()


async def attempt_rows(db: Database, job_id: uuid.UUID) -> list[Any]:
    async with db.connect() as conn:
        query = text("SELECT * FROM attempts WHERE job_id = :id ORDER BY number")
        return list((await conn.execute(query, {"id": job_id})).all())


async def age(db: Database, job_id: uuid.UUID, **columns: float) -> None:
    """Move some of the job's timestamps `seconds` into the past (a test cannot wait for a lease)."""
    sets = ", ".join(f"{column} = now() - make_interval(secs => :{column})" for column in columns)
    async with db.transaction() as conn:
        await conn.execute(text(f"UPDATE jobs SET {sets} WHERE id = :id"), {"id": job_id, **columns})


async def running(db: Database, *, prediction: str | None = None, **new: Any) -> jobs.Claim:
    job_id = await new_job(db, **new)
    claim = await jobs.claim(db, job_id, lease_seconds=30)
    assert claim is not None
    if prediction is not None:
        assert await jobs.record_prediction(db, claim, prediction, "starting")
    return claim


# --- the deadline sweep ---------------------------------------------------------------------------


async def test_a_waiting_job_past_its_deadline_is_failed_by_the_sweep(domain_db: Database) -> None:
    overdue = await new_job(domain_db, deadline_seconds=0.001)
    in_time = await new_job(domain_db)
    await asyncio.sleep(0.01)

    ended = await jobs.fail_overdue(domain_db, batch=500)

    assert jobs.Overdue(overdue, None) in ended
    assert in_time not in [o.job_id for o in ended]
    row = await job_row(domain_db, overdue)
    assert (row.status, row.error_class) == ("failed", "JobDeadlineExceeded")
    assert row.finished_at is not None
    assert (await job_row(domain_db, in_time)).status == "queued"
    assert overdue not in [o.job_id for o in await jobs.fail_overdue(domain_db, batch=500)], "not failed twice"


async def test_a_retrying_job_past_its_deadline_is_failed_with_the_prediction_it_left_running(
    domain_db: Database,
) -> None:
    """Given a job retrying after its polls failed, its prediction still running for the next attempt to
    resume, when its deadline passes, then the sweep fails it and hands back that prediction to cancel."""
    claim = await running(domain_db, prediction="p-left-running")
    assert await jobs.fail_attempt(domain_db, claim, jobs.Failure("Replicate503", "busy"), retry_delay=60)
    await age(domain_db, claim.job_id, deadline_at=1)

    assert jobs.Overdue(claim.job_id, "p-left-running") in await jobs.fail_overdue(domain_db, batch=500)
    assert (await job_row(domain_db, claim.job_id)).status == "failed"


async def test_a_prediction_that_ended_is_not_handed_back_to_cancel(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-ended")
    failure = jobs.Failure("PredictionFailed", "oom", prediction_status="failed")
    assert await jobs.fail_attempt(domain_db, claim, failure, retry_delay=60)
    await age(domain_db, claim.job_id, deadline_at=1)

    assert jobs.Overdue(claim.job_id, None) in await jobs.fail_overdue(domain_db, batch=500)


# --- the stale sweep: lost messages, expired leases --------------------------------------------


async def test_a_queued_job_is_taken_for_resending_once_per_stale_interval(domain_db: Database) -> None:
    job_id = await new_job(domain_db)
    await age(domain_db, job_id, dispatched_at=10)

    taken = await jobs.take_stale(domain_db, stale_seconds=5, batch=500)

    assert jobs.Stale(job_id, "queued") in taken
    again = await jobs.take_stale(domain_db, stale_seconds=5, batch=500)
    assert job_id not in [s.job_id for s in again], "stamped as dispatched: left alone for the interval"


async def test_a_running_job_is_taken_for_resending_only_once_its_lease_expired(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-lease")
    await age(domain_db, claim.job_id, dispatched_at=10)
    assert claim.job_id not in [s.job_id for s in await jobs.take_stale(domain_db, stale_seconds=5, batch=500)]

    await age(domain_db, claim.job_id, lease_until=1, dispatched_at=10)

    assert jobs.Stale(claim.job_id, "running") in await jobs.take_stale(domain_db, stale_seconds=5, batch=500)


async def test_a_job_whose_lease_expired_is_claimed_again_and_resumes_its_prediction(domain_db: Database) -> None:
    first = await running(domain_db, prediction="p-resume")
    assert await jobs.claim(domain_db, first.job_id, lease_seconds=30) is None, "a held lease is not taken"
    await age(domain_db, first.job_id, lease_until=1)

    second = await jobs.claim(domain_db, first.job_id, lease_seconds=30)

    assert second is not None
    assert (second.attempt, second.resume_prediction_id, second.abandoned_attempt) == (2, "p-resume", 1)
    dead, live = await attempt_rows(domain_db, first.job_id)
    assert (dead.outcome, dead.error_class) == ("abandoned", "WorkerLost")
    assert (live.prediction_id, live.resumed, live.finished_at) == ("p-resume", True, None)
    assert not await jobs.record_prediction(domain_db, first, "p-late", "starting"), "the old token writes nothing"


# --- running jobs whose worker is gone and that must end ----------------------------------------


async def canceled_while_its_worker_was_dead(db: Database, prediction: str | None = "p-dead") -> jobs.Claim:
    """Given a running job whose worker died (its lease expired) and whose client then canceled it."""
    claim = await running(db, prediction=prediction)
    async with db.transaction() as conn:
        assert await jobs.request_cancel(conn, claim.job_id) == "running"
    await age(db, claim.job_id, lease_until=1, dispatched_at=10)
    return claim


async def test_a_canceled_job_whose_worker_died_is_taken_to_end_not_sent_again(domain_db: Database) -> None:
    claim = await canceled_while_its_worker_was_dead(domain_db)

    assert claim.job_id not in [s.job_id for s in await jobs.take_stale(domain_db, stale_seconds=5, batch=500)]
    (taken,) = await jobs.take_unheld(domain_db, lease_seconds=30, batch=50)

    assert (taken.job_id, taken.canceled, taken.attempt, taken.prediction_id) == (claim.job_id, True, 1, "p-dead")
    assert await jobs.take_unheld(domain_db, lease_seconds=30, batch=50) == [], "held by its taker meanwhile"
    assert await jobs.claim(domain_db, claim.job_id, lease_seconds=30) is None


async def test_a_taken_canceled_job_ends_canceled_and_its_attempt_abandoned(domain_db: Database) -> None:
    claim = await canceled_while_its_worker_was_dead(domain_db)
    (taken,) = await jobs.take_unheld(domain_db, lease_seconds=30, batch=50)

    assert await jobs.end_unheld(domain_db, taken, prediction_status="canceled")

    row = await job_row(domain_db, claim.job_id)
    assert (row.status, row.error_class, row.lease_until) == ("canceled", "JobCanceled", None)
    assert row.finished_at is not None
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert (attempt.outcome, attempt.error_class, attempt.prediction_status) == ("abandoned", "WorkerLost", "canceled")
    assert not await jobs.end_unheld(domain_db, taken, prediction_status=None), "a job ends once"


async def test_a_running_job_past_its_deadline_whose_worker_died_ends_failed(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-late")
    await age(domain_db, claim.job_id, lease_until=1, deadline_at=1, dispatched_at=10)

    assert claim.job_id not in [s.job_id for s in await jobs.take_stale(domain_db, stale_seconds=5, batch=500)]
    (taken,) = await jobs.take_unheld(domain_db, lease_seconds=30, batch=50)
    assert (taken.canceled, taken.prediction_id) == (False, "p-late")
    assert await jobs.end_unheld(domain_db, taken, prediction_status=None)

    row = await job_row(domain_db, claim.job_id)
    assert (row.status, row.error_class) == ("failed", "JobDeadlineExceeded")
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert (attempt.outcome, attempt.prediction_status) == ("abandoned", "starting")


async def test_a_held_job_is_left_to_its_worker_even_canceled_or_late(domain_db: Database) -> None:
    """Its worker, alive, sees the cancel (through its lease) and the deadline itself."""
    late = await running(domain_db)
    await age(domain_db, late.job_id, deadline_at=1)
    canceled = await running(domain_db)
    async with domain_db.transaction() as conn:
        await jobs.request_cancel(conn, canceled.job_id)

    assert await jobs.take_unheld(domain_db, lease_seconds=30, batch=50) == []


async def test_a_take_that_outlived_its_lease_cannot_end_the_job_taken_again(domain_db: Database) -> None:
    """Given a sweep that took a job and then stalled past its lease, and a second sweep that took the job
    again: the first one's end changes nothing, the second one's ends it."""
    await canceled_while_its_worker_was_dead(domain_db)
    (first,) = await jobs.take_unheld(domain_db, lease_seconds=30, batch=50)
    await age(domain_db, first.job_id, lease_until=1)
    (second,) = await jobs.take_unheld(domain_db, lease_seconds=30, batch=50)

    assert not await jobs.end_unheld(domain_db, first, prediction_status=None)
    assert await jobs.end_unheld(domain_db, second, prediction_status=None)


async def test_a_job_canceled_before_any_prediction_has_none_to_cancel(domain_db: Database) -> None:
    claim = await canceled_while_its_worker_was_dead(domain_db, prediction=None)

    (taken,) = await jobs.take_unheld(domain_db, lease_seconds=30, batch=50)

    assert (taken.job_id, taken.prediction_id) == (claim.job_id, None)


async def retrying_with_its_prediction(db: Database, prediction: str, status: str | None = None) -> jobs.Claim:
    """Given a job retrying after an attempt whose prediction `prediction` ended with `status` (None: it
    may still run, e.g. its polls failed, and the next attempt is to resume it)."""
    claim = await running(db, prediction=prediction)
    failure = jobs.Failure("Replicate503", "busy", prediction_status=status)
    assert await jobs.fail_attempt(db, claim, failure, retry_delay=60)
    return claim


async def test_a_retrying_job_whose_prediction_may_still_run_is_canceled_by_a_worker_not_at_once(
    domain_db: Database,
) -> None:
    claim = await retrying_with_its_prediction(domain_db, "p-still-running")

    async with domain_db.transaction() as conn:
        assert await jobs.request_cancel(conn, claim.job_id) == "retrying"

    row = await job_row(domain_db, claim.job_id)
    assert (row.status, row.cancel_requested) == ("retrying", True)
    await age(domain_db, claim.job_id, next_attempt_at=10, dispatched_at=10, deadline_at=1)
    assert await jobs.claim(domain_db, claim.job_id, lease_seconds=30) is None
    assert claim.job_id not in [s.job_id for s in await jobs.take_stale(domain_db, stale_seconds=5, batch=500)]
    assert claim.job_id not in [o.job_id for o in await jobs.fail_overdue(domain_db, batch=500)], "canceled wins"
    (taken,) = await jobs.take_unheld(domain_db, lease_seconds=30, batch=50)
    assert (taken.status, taken.canceled, taken.prediction_id) == ("retrying", True, "p-still-running")

    assert await jobs.end_unheld(domain_db, taken, prediction_status="canceled")

    row = await job_row(domain_db, claim.job_id)
    assert (row.status, row.error_class) == ("canceled", "JobCanceled")
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert (attempt.outcome, attempt.error_class, attempt.prediction_status) == ("failed", "Replicate503", "canceled")


async def test_a_retrying_job_whose_prediction_ended_is_canceled_at_once(domain_db: Database) -> None:
    claim = await retrying_with_its_prediction(domain_db, "p-over", status="failed")

    async with domain_db.transaction() as conn:
        assert await jobs.request_cancel(conn, claim.job_id) == "canceled"

    assert (await job_row(domain_db, claim.job_id)).status == "canceled"
    assert await jobs.take_unheld(domain_db, lease_seconds=30, batch=50) == []


# --- leases -----------------------------------------------------------------------------------


async def test_a_lease_is_renewed_only_with_the_token_that_holds_it(domain_db: Database) -> None:
    claim = await running(domain_db)
    before = (await job_row(domain_db, claim.job_id)).lease_until

    renewed = await jobs.renew_leases(domain_db, [(claim.job_id, claim.token)], lease_seconds=120)
    stranger = await jobs.renew_leases(domain_db, [(claim.job_id, uuid.uuid4())], lease_seconds=600)

    assert renewed == {claim.job_id: False}
    assert stranger == {}
    after = (await job_row(domain_db, claim.job_id)).lease_until
    assert timedelta(seconds=80) < after - before < timedelta(seconds=100)


async def test_a_cancel_request_reaches_the_worker_through_its_lease(domain_db: Database) -> None:
    claim = await running(domain_db)
    other = await running(domain_db)
    async with domain_db.transaction() as conn:
        assert await jobs.request_cancel(conn, claim.job_id) == "running"

    assert await jobs.cancel_requested(domain_db, [claim.job_id, other.job_id]) == [claim.job_id]
    renewed = await jobs.renew_leases(
        domain_db, [(claim.job_id, claim.token), (other.job_id, other.token)], lease_seconds=30
    )
    assert renewed == {claim.job_id: True, other.job_id: False}


# --- an attempt's other ends: handed back, canceled ---------------------------------------------


async def test_a_released_job_is_due_at_once_and_its_attempt_abandoned(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-release")

    assert await jobs.release(domain_db, claim, "the worker was stopped")

    row = await job_row(domain_db, claim.job_id)
    assert (row.status, row.lease_until) == ("retrying", None)
    assert await jobs.due_in(domain_db, claim.job_id) is None, "due now, not later"
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert (attempt.outcome, attempt.error_class, attempt.error_message) == (
        "abandoned",
        "WorkerShutdown",
        "the worker was stopped",
    )
    assert not await jobs.release(domain_db, claim, "twice"), "a job no longer held is not released"
    resumed = await jobs.claim(domain_db, claim.job_id, lease_seconds=30)
    assert resumed is not None and resumed.resume_prediction_id == "p-release"


async def test_a_canceled_running_job_ends_canceled_with_its_attempt(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-cancel")

    assert await jobs.finish_canceled(domain_db, claim, "canceled")

    row = await job_row(domain_db, claim.job_id)
    assert (row.status, row.error_class, row.lease_until) == ("canceled", "JobCanceled", None)
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert (attempt.outcome, attempt.prediction_status) == ("canceled", "canceled")
    assert not await jobs.finish_canceled(domain_db, claim, None)


async def test_a_cancel_without_a_prediction_status_keeps_the_recorded_one(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-keep")

    assert await jobs.finish_canceled(domain_db, claim, None)

    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert (attempt.outcome, attempt.prediction_status) == ("canceled", "starting")


# --- progress, due time, owners of a prediction -------------------------------------------------


async def test_progress_is_stored_only_while_the_job_is_held(domain_db: Database) -> None:
    claim = await running(domain_db)

    await jobs.record_progress(domain_db, claim, 0.5)
    assert (await job_row(domain_db, claim.job_id)).progress == 0.5

    assert await jobs.release(domain_db, claim, "stopping")
    await jobs.record_progress(domain_db, claim, 0.75)
    assert (await job_row(domain_db, claim.job_id)).progress == 0.5


async def test_a_retrying_job_says_how_long_until_it_is_due(domain_db: Database) -> None:
    claim = await running(domain_db)
    assert await jobs.due_in(domain_db, claim.job_id) is None, "a running job is not waiting"

    assert await jobs.fail_attempt(domain_db, claim, jobs.Failure("Boom", "boom"), retry_delay=30)

    due = await jobs.due_in(domain_db, claim.job_id)
    assert due is not None and 25 < due <= 30
    assert await jobs.claim(domain_db, claim.job_id, lease_seconds=30) is None, "not before it is due"


async def test_the_owners_of_a_prediction_are_the_attempts_that_recorded_it(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-owned")

    assert await jobs.prediction_owners(domain_db, "p-owned") == [(claim.job_id, claim.attempt_id)]
    assert await jobs.prediction_owners(domain_db, "p-nobody") == []


# --- reading: the CLI's list and the limiter's statuses ------------------------------------------


async def test_the_list_of_jobs_filters_by_status_and_age(domain_db: Database) -> None:
    old = await new_job(domain_db, owner="lister")
    fresh = await new_job(domain_db, owner="lister")
    async with domain_db.transaction() as conn:
        await conn.execute(text("UPDATE jobs SET created_at = now() - interval '2 hours' WHERE id = :id"), {"id": old})
        assert await jobs.request_cancel(conn, fresh) == "canceled"

    async with domain_db.connect() as conn:
        recent = await jobs.list_jobs(
            conn, status=None, limit=10, before=None, owner="lister", since=timedelta(hours=1)
        )
        canceled = await jobs.list_jobs(conn, status="canceled", limit=10, before=None, owner="lister")
        everything = await jobs.list_jobs(conn, status=None, limit=10, before=None, owner="lister")

    assert [r.id for r in recent] == [fresh]
    assert [r.id for r in canceled] == [fresh]
    assert [r.id for r in everything] == [fresh, old]


async def test_the_statuses_of_some_jobs_leave_out_unknown_ones(domain_db: Database) -> None:
    queued = await new_job(domain_db)
    unknown = uuid.uuid4()

    async with domain_db.connect() as conn:
        assert await jobs.statuses(conn, [queued, unknown]) == {queued: "queued"}
        assert await jobs.statuses(conn, []) == {}


# --- the worker's sweep: the provider's part (mediagen.worker.recovery) --------------------------


class CancelingProvider:
    """A provider that only cancels, as scripted: each answer in turn (None: done), the last repeated."""

    def __init__(self, *answers: Exception | float | None) -> None:
        self.answers = list(answers) or [None]
        self.canceled: list[str] = []
        self.tried: list[str] = []

    async def cancel(self, prediction_id: str) -> None:
        self.tried.append(prediction_id)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, float):
            await asyncio.sleep(answer)  # a provider that does not answer in time
        self.canceled.append(prediction_id)

    async def get(self, prediction_id: str, *, deadline: Any = None) -> Prediction:
        """A canceled prediction as it ended: what it ran for, once it was canceled here."""
        status = "canceled" if prediction_id in self.canceled else "processing"
        return Prediction(prediction_id, status, metrics={"predict_time": 1.5} if status == "canceled" else None)


class PendingDispatcher:
    def __init__(self) -> None:
        self.sent: list[uuid.UUID] = []

    async def pending(self, job_ids: list[uuid.UUID]) -> list[bool]:
        return [True for _ in job_ids]

    async def send(self, job_ids: list[uuid.UUID], *, delay: float | None = None) -> None:
        self.sent.extend(job_ids)


async def sweep_ends(db: Database, provider: CancelingProvider, lease_seconds: float = 30) -> int:
    return await recovery.end_unheld(db, provider, lease_seconds=lease_seconds, batch=50)  # type: ignore[arg-type]


async def test_the_sweep_cancels_the_prediction_of_a_canceled_job_whose_worker_died_then_ends_it(
    domain_db: Database,
) -> None:
    claim = await canceled_while_its_worker_was_dead(domain_db, prediction="p-swept")
    provider = CancelingProvider()

    assert await sweep_ends(domain_db, provider) == 1

    assert provider.canceled == ["p-swept"]
    assert (await job_row(domain_db, claim.job_id)).status == "canceled"
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert attempt.prediction_status == "canceled"
    assert attempt.predict_time == 1.5, "the seconds it ran count toward the spend cap"


async def test_a_cancel_the_provider_could_not_take_is_tried_again_after_a_lease(domain_db: Database) -> None:
    claim = await canceled_while_its_worker_was_dead(domain_db, prediction="p-outage")
    provider = CancelingProvider(TransientProviderError("Service Unavailable", http_status=503), None)

    assert await sweep_ends(domain_db, provider) == 0
    row = await job_row(domain_db, claim.job_id)
    assert row.status == "running", "a job whose prediction may still run does not end yet"
    assert await sweep_ends(domain_db, provider) == 0, "held by the first sweep for a lease"

    await age(domain_db, claim.job_id, lease_until=1)
    assert await sweep_ends(domain_db, provider) == 1

    assert provider.tried == ["p-outage", "p-outage"] and provider.canceled == ["p-outage"]
    assert (await job_row(domain_db, claim.job_id)).status == "canceled"


async def test_a_provider_that_does_not_answer_holds_no_sweep_and_ends_no_job(domain_db: Database) -> None:
    claim = await canceled_while_its_worker_was_dead(domain_db, prediction="p-hang")
    provider = CancelingProvider(60.0)

    ended = await asyncio.wait_for(sweep_ends(domain_db, provider, lease_seconds=0.4), 5)

    assert ended == 0 and provider.canceled == []
    assert (await job_row(domain_db, claim.job_id)).status == "running"


async def test_a_prediction_the_provider_refuses_to_cancel_does_not_keep_the_job_running(
    domain_db: Database,
) -> None:
    """A 404 (a prediction the provider no longer knows) leaves nothing to cancel: the job ends."""
    claim = await canceled_while_its_worker_was_dead(domain_db, prediction="p-unknown")
    provider = CancelingProvider(PermanentProviderError("not found", http_status=404))

    assert await sweep_ends(domain_db, provider) == 1

    assert (await job_row(domain_db, claim.job_id)).status == "canceled"
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert attempt.prediction_status == "starting", "not recorded as canceled: the cancel did not happen"


async def test_a_canceled_job_without_a_prediction_ends_without_a_call_to_the_provider(
    domain_db: Database,
) -> None:
    claim = await canceled_while_its_worker_was_dead(domain_db, prediction=None)
    provider = CancelingProvider()

    assert await sweep_ends(domain_db, provider) == 1

    assert provider.tried == []
    assert (await job_row(domain_db, claim.job_id)).status == "canceled"


async def test_the_sweep_cancels_the_prediction_of_a_canceled_retrying_job_then_ends_it(
    domain_db: Database,
) -> None:
    claim = await retrying_with_its_prediction(domain_db, "p-retry-canceled")
    async with domain_db.transaction() as conn:
        await jobs.request_cancel(conn, claim.job_id)
    provider = CancelingProvider()

    assert await sweep_ends(domain_db, provider) == 1

    assert provider.canceled == ["p-retry-canceled"]
    assert (await job_row(domain_db, claim.job_id)).status == "canceled"


async def test_the_deadline_sweep_cancels_what_a_retrying_job_left_running_and_ends_late_running_ones(
    domain_db: Database,
) -> None:
    """One pass of the worker's sweep: a retrying job and a running one whose worker died, both past
    their deadline, end failed, and each one's prediction is canceled at the provider."""
    retrying = await running(domain_db, prediction="p-retrying")
    assert await jobs.fail_attempt(domain_db, retrying, jobs.Failure("Replicate503", "busy"), retry_delay=60)
    await age(domain_db, retrying.job_id, deadline_at=1)
    orphan = await running(domain_db, prediction="p-orphan")
    await age(domain_db, orphan.job_id, deadline_at=1, lease_until=1, dispatched_at=10)
    provider = CancelingProvider()
    dispatcher = PendingDispatcher()
    sweeper = recovery.Sweeper(
        domain_db,
        dispatcher,  # type: ignore[arg-type]
        provider,  # type: ignore[arg-type]
        interval=1,
        stale_seconds=5,
        lease_seconds=30,
    )

    counts = await sweeper.sweep_once()

    assert (counts["expired"], counts["ended"], counts["orphaned"]) == (1, 1, 0)
    assert sorted(provider.canceled) == ["p-orphan", "p-retrying"]
    assert dispatcher.sent == [], "a job that ended is not sent again"
    for claim in (retrying, orphan):
        row = await job_row(domain_db, claim.job_id)
        assert (row.status, row.error_class) == ("failed", "JobDeadlineExceeded")


# --- an operator's retry -------------------------------------------------------------------------


async def test_a_retry_names_the_prediction_left_running_and_records_it_canceled(domain_db: Database) -> None:
    claim = await running(domain_db, prediction="p-left")
    async with domain_db.connect() as conn:
        assert await jobs.left_running(conn, claim.job_id) is None, "a running job's prediction is its worker's"
    assert await jobs.fail_attempt(domain_db, claim, jobs.Failure("Replicate401", "unauthorized"), retry_delay=None)

    async with domain_db.transaction() as conn:
        assert await jobs.left_running(conn, claim.job_id) == ("p-left", "replicate")
        attempts = await jobs.retry_finished(
            conn, claim.job_id, budget=2, deadline_seconds=60, canceled_prediction="p-left"
        )

    assert attempts == 1
    (attempt,) = await attempt_rows(domain_db, claim.job_id)
    assert attempt.prediction_status == "canceled"
    async with domain_db.connect() as conn:
        assert await jobs.left_running(conn, claim.job_id) is None
    again = await jobs.claim(domain_db, claim.job_id, lease_seconds=30)
    assert again is not None and again.resume_prediction_id is None, "a retry starts a fresh prediction"
