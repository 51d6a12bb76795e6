"""`python -m mediagen.worker`: a Dramatiq worker for mediagen's queue, sized from settings."""

from __future__ import annotations

import os
import sys

from mediagen.logging import configure_logging
from mediagen.settings import get_settings


def argv(extra: list[str] | None = None) -> list[str]:
    settings = get_settings()
    return [
        "dramatiq",
        "mediagen.worker.actors",
        "--processes",
        str(settings.worker_processes),
        "--threads",
        str(settings.worker_threads),
        "--queues",
        settings.queue_name,
        "--worker-shutdown-timeout",
        "30000",
        # Our JSON handler, set up below and inherited by the forked worker processes, instead of
        # Dramatiq's plain-text basicConfig.
        "--skip-logging",
        *(extra or []),
    ]


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level)
    # Prefetch: enough to keep every thread busy, not so many that a dead worker strands hundreds.
    os.environ.setdefault("dramatiq_queue_prefetch", str(settings.worker_threads))
    os.environ.setdefault("dramatiq_delay_queue_prefetch", str(max(1000, settings.worker_threads * 4)))
    from dramatiq.cli import main as dramatiq_main

    sys.argv = argv(sys.argv[1:])
    sys.exit(dramatiq_main())  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
