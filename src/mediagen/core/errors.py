"""The whole error tree of mediagen, in one place.

    MediagenError
    ├── ProviderError                 the image provider (Replicate) said no, or could not be reached
    │   ├── TransientProviderError    worth another attempt: timeouts, connection errors, 429, 5xx
    │   │   ├── UnknownCreateOutcome  a create may have made a prediction: 5xx, 408, timeout, dropped
    │   │   └── ProviderOutage        the provider is down for every worker (its circuit is open): no request sent
    │   └── PermanentProviderError    retrying cannot help: 401, 402, 404, 422, a refused prediction
    ├── OutputError                   the prediction's images could not be fetched
    │   ├── OutputDownloadFailed      transient (a timeout, a 5xx): retry, resuming the same prediction
    │   └── OutputRejected            permanent: not an image, too large, a host we do not trust
    ├── StorageError                  the image store
    │   ├── StorageUnavailable        transient
    │   └── StorageMisconfigured      permanent
    ├── JobDeadlineExceeded           the job ran past its deadline (permanent)
    ├── JobCanceled                   the job was canceled while it ran
    ├── LeaseLost                     another worker took the job over (this worker must stop quietly)
    │   └── LeaseExpired              ... because this worker could not renew its lease (PostgreSQL was unreachable)
    └── WorkerStopping                this worker is shutting down: hand the job back

Domain errors the API maps to HTTP answers:

    JobNotFound (404) · JobConflict (409) · DependencyUnavailable (503)
    InvalidParameters (422: each bad field of a job's parameters, against the model's own schema)
    ModelSchemaUnknown (503: an allowed model whose schema has not been read from Replicate yet)

Every error carries `error_class` (a stable name for logs, the database and metrics) and, where there
was one, `http_status` and `retry_after` (the provider's hint, in seconds).
"""

from __future__ import annotations


class MediagenError(Exception):
    transient: bool = False
    create_rejected: bool = False
    """Set on a create whose answer proves refusal (400, 401, 402, 403, 404, 422, 429, 503): it made no
    prediction, so nothing is left to look for."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
        error_class: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after
        self.error_class = error_class or type(self).__name__


class ProviderError(MediagenError):
    pass


class TransientProviderError(ProviderError):
    transient = True


class UnknownCreateOutcome(TransientProviderError):
    """The create request went out, and what came back (a 5xx, a 408, nothing: a timeout or a dropped
    connection) does not prove refusal: a prediction may exist, and the next attempt looks for it."""


class ProviderOutage(TransientProviderError):
    """The provider failed call after call, for every worker, and its circuit is open: no request was
    sent. Not a failure of the job: wait `retry_after` and call again (mediagen.core.retry)."""


class PermanentProviderError(ProviderError):
    pass


class OutputError(MediagenError):
    pass


class OutputDownloadFailed(OutputError):
    transient = True


class OutputRejected(OutputError):
    pass


class StorageError(MediagenError):
    pass


class StorageUnavailable(StorageError):
    transient = True


class StorageMisconfigured(StorageError):
    pass


class JobDeadlineExceeded(MediagenError):
    pass


class JobCanceled(MediagenError):
    pass


class LeaseLost(MediagenError):
    pass


class LeaseExpired(LeaseLost):
    """The lease ran out while PostgreSQL was unreachable, and another worker took the job over: the
    worker did not stop, and says so on the attempt the new holder closed."""


class JobNotFound(MediagenError):
    pass


class JobConflict(MediagenError):
    pass


class DependencyUnavailable(MediagenError):
    transient = True


class WorkerStopping(MediagenError):
    pass


class InvalidParameters(MediagenError):
    """Parameters the model's own schema refuses; `fields` names each: `{field, message, type}`."""

    def __init__(self, model: str, fields: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in fields) or f"invalid input for {model}")
        self.model = model
        self.fields = fields


class ModelSchemaUnknown(MediagenError):
    transient = True
