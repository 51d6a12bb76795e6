"""The job's domain: every write to the `jobs` and `attempts` tables, shared by the API and the worker.

Every state change is one conditional UPDATE, so a duplicate or late message changes nothing and two
workers can never both hold a job:

    queued ──claim──▶ running ──ok──▶ succeeded
       ▲                 │  └──permanent error, attempts exhausted, deadline──▶ failed
       └──due── retrying ◀┘ transient error
    queued | retrying | running ──cancel──▶ canceled

`running` carries a lease (`lease_until`, renewed in bulk by each worker) and a `claim_token`; a worker's
writes count only while its token is the job's.

This package is the only writer of the `jobs` and `attempts` tables: the API, the worker's runner,
leases and sweep, and the CLI call its verbs. Where to look:

* `submit`: create (with idempotency), cancel, an operator's retry: the API's and CLI's writes;
* `queries`: reading jobs for people (detail, a page, outputs, statuses);
* `status`: the status clients poll;
* `claim`: taking a job for an attempt;
* `attempts`: an attempt in progress and how it ends;
* `leases`: renewing the leases of running jobs, watching for cancels;
* `sweeps`: jobs past their deadline, jobs to send again, unheld jobs that must end;
* `retention`: deleting old finished jobs, their media and all, in small batches.

Two calling conventions, one rule: a verb that is a unit of work by itself (the worker's side: claim,
attempts, leases, sweeps) takes the `Database` and runs its own transaction; a verb the caller composes
into its own unit of work (the API's and CLI's side: submit, queries) takes the caller's
`AsyncConnection` and never commits (see mediagen.core.db). Each module's docstring says its SQL style
and why. Callers use the names re-exported here: `jobs.claim(...)`.
"""

from mediagen.core.jobs.attempts import (
    NO_SPEND,
    Failure,
    Spend,
    StoredOutput,
    explain_abandoned,
    fail_attempt,
    fail_over,
    finish_canceled,
    forget_gone_prediction,
    prediction_owners,
    record_prediction,
    record_progress,
    record_queue_position,
    record_waiting,
    release,
    succeed,
)
from mediagen.core.jobs.claim import Claim, claim, due_in
from mediagen.core.jobs.leases import cancel_requested, renew_leases
from mediagen.core.jobs.queries import (
    JobDetail,
    get_detail,
    left_running,
    list_jobs,
    output_keys,
    statuses,
    unfinished_in_lane,
)
from mediagen.core.jobs.retention import Pruned, prune, prune_batch
from mediagen.core.jobs.status import (
    STATUS_SQL,
    JobStatusView,
    get_status,
    shown_error,
    shown_progress,
    shown_queue_position,
    shown_waiting_for,
)
from mediagen.core.jobs.submit import NewJob, create_jobs, find_by_idempotency_key, request_cancel, retry_finished
from mediagen.core.jobs.sweeps import Overdue, Stale, Unheld, end_unheld, fail_overdue, take_stale, take_unheld

__all__ = [
    "NO_SPEND",
    "STATUS_SQL",
    "Claim",
    "Failure",
    "JobDetail",
    "JobStatusView",
    "NewJob",
    "Overdue",
    "Pruned",
    "Spend",
    "Stale",
    "StoredOutput",
    "Unheld",
    "cancel_requested",
    "claim",
    "create_jobs",
    "due_in",
    "end_unheld",
    "explain_abandoned",
    "fail_attempt",
    "fail_over",
    "fail_overdue",
    "find_by_idempotency_key",
    "finish_canceled",
    "forget_gone_prediction",
    "get_detail",
    "get_status",
    "left_running",
    "list_jobs",
    "output_keys",
    "prediction_owners",
    "prune",
    "prune_batch",
    "record_prediction",
    "record_progress",
    "record_queue_position",
    "record_waiting",
    "release",
    "renew_leases",
    "request_cancel",
    "retry_finished",
    "shown_error",
    "shown_progress",
    "shown_queue_position",
    "shown_waiting_for",
    "statuses",
    "succeed",
    "take_stale",
    "take_unheld",
    "unfinished_in_lane",
]
