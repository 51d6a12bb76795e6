"""The job's domain: every write to the `jobs` and `attempts` tables, shared by the API and the worker.

Every state change is one conditional UPDATE, so a duplicate or late message changes nothing and two
workers can never both hold a job:

    queued ──claim──▶ running ──ok──▶ succeeded
       ▲                 │  └──permanent error, attempts exhausted, deadline──▶ failed
       └──due── retrying ◀┘ transient error
    queued | retrying | running ──cancel──▶ canceled

`running` carries a lease (`lease_until`, renewed in bulk by each worker, see mediagen.worker.leases) and a
`claim_token`; a worker's writes count only while its token is the job's. Functions take a connection
inside a transaction and never commit (see mediagen.core.db).

Where to look: `submit` (create, idempotency, cancel, an operator's retry), `queries` (reading jobs),
`status` (the status clients poll), `claim` (taking a job for an attempt), `attempts` (an attempt in
progress and how it ends). Callers use the names re-exported here: `jobs.claim(...)`.
"""

from mediagen.core.jobs.attempts import (
    NO_SPEND,
    Failure,
    Spend,
    StoredOutput,
    explain_abandoned,
    fail_attempt,
    finish_canceled,
    forget_gone_prediction,
    record_prediction,
    release,
    succeed,
)
from mediagen.core.jobs.claim import Claim, claim
from mediagen.core.jobs.queries import JobDetail, due_in, get_detail, list_jobs, output_keys, prediction_owners
from mediagen.core.jobs.status import STATUS_SQL, JobStatusView, get_status, shown_progress, status_object
from mediagen.core.jobs.submit import NewJob, create_jobs, find_by_idempotency_key, request_cancel, retry_finished

__all__ = [
    "NO_SPEND",
    "STATUS_SQL",
    "Claim",
    "Failure",
    "JobDetail",
    "JobStatusView",
    "NewJob",
    "Spend",
    "StoredOutput",
    "claim",
    "create_jobs",
    "due_in",
    "explain_abandoned",
    "fail_attempt",
    "find_by_idempotency_key",
    "finish_canceled",
    "forget_gone_prediction",
    "get_detail",
    "get_status",
    "list_jobs",
    "output_keys",
    "prediction_owners",
    "record_prediction",
    "release",
    "request_cancel",
    "retry_finished",
    "shown_progress",
    "status_object",
    "succeed",
]
