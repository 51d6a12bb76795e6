"""The worker: the Dramatiq actor, one attempt's runner, polling, leases, storing outputs and the recovery sweep.

`python -m mediagen.worker` runs it. May import `mediagen.core`, `mediagen.providers`, `mediagen.storage`
and the shared top-level modules; never `mediagen.api`.
"""
