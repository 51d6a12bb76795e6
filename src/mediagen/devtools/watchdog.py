"""The launcher's watchdog: when `make run` is gone, however it went (SIGKILL included), so are its
embedded PostgreSQL and Redis.

The launcher starts it first, before any server, in a session of its own (a Ctrl-C, a closed terminal
or a kill of the launcher's process group does not reach it), handing it two things:

- the read end of a pipe only the launcher writes to, a line naming each server (`postgres`, `redis`)
  before the launcher starts or adopts it: when the launcher's process ends, the kernel closes its
  end and the watchdog reads EOF, whatever signal ended it;
- the launcher's lock on the data folder (the same open file): a next `make run` on that folder waits
  until the watchdog has stopped the servers, and never adopts one that is being stopped.

Then it stops those of the named servers still running on the data folder (none, after a launcher
that stopped them itself) and exits: `dev.watchdog.stopped` names what it stopped. A server the
launcher did not start (DATABASE_URL set, say) is not named, and left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mediagen.devtools.embedded import EmbeddedPostgres, EmbeddedRedis
from mediagen.logging import configure_logging, log_event


def start_watchdog(data_dir: Path, lock_fd: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start the watchdog of this launcher; returns it and the pipe's write end (closed at exit)."""
    read_end, write_end = os.pipe()  # not inherited: no other child keeps the launcher "alive"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mediagen.devtools.watchdog", str(data_dir), str(read_end), str(lock_fd)],
        stdin=subprocess.DEVNULL,
        pass_fds=(read_end, lock_fd),
        start_new_session=True,
    )
    os.close(read_end)
    return proc, write_end


STOPS = {"postgres": EmbeddedPostgres.stop_running, "redis": EmbeddedRedis.stop_running}


def stop_embedded_servers(data_dir: Path, names: set[str]) -> dict[str, int]:
    """Stop these embedded servers of this data folder, those that run; their pids."""
    stopped = {}
    for name, stop in STOPS.items():
        if name in names and (data_dir / name).is_dir():
            pid = stop(data_dir / name)
            if pid is not None:
                stopped[name] = pid
    return stopped


def watch(data_dir: Path, pipe: int) -> None:
    told = b""
    while True:
        try:
            chunk = os.read(pipe, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        told += chunk
    started = time.monotonic()
    stopped = stop_embedded_servers(data_dir, set(told.decode().split()))
    if stopped:
        log_event(
            "dev.watchdog.stopped",
            data_dir=str(data_dir),
            seconds=round(time.monotonic() - started, 3),
            **{f"{name}_pid": pid for name, pid in stopped.items()},
        )


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # the launcher's terminal and output are not ours to die of
    data_dir, pipe, _lock = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])  # the lock: held open
    configure_logging(os.environ.get("MEDIAGEN_LOG_LEVEL", "INFO"))
    with contextlib.suppress(OSError):  # stderr gone with the launcher's terminal: the servers are stopped anyway
        watch(data_dir, pipe)


if __name__ == "__main__":
    main()
