"""Optional py-spy sampling of the API or the worker during a benchmark run (`run.py --profile`).

`Sampler(pid, path)` runs `py-spy record --format raw` (collapsed stacks) on a process and its
subprocesses until stopped; `top_frames(path)` turns the stacks into the functions that use the most
samples, by self time and inclusive time. py-spy is not a dependency: without it `--profile` says so
and the benchmark runs unprofiled.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Sampler:
    def __init__(self, pid: int, path: Path, rate: int = 250) -> None:
        self.path = path
        exe = py_spy()
        self.proc: subprocess.Popen[bytes] | None = None
        if exe is None:
            return
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--nonblocking",
                "--gil",
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _short(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def top_frames(path: Path, limit: int = 15) -> dict[str, list[tuple[str, float]]]:
    """The frames with the most samples: {"self": [(frame, share)], "inclusive": [...]}, shares of all samples.

    Idle samples (the event loop waiting in select/epoll, threads parked on a lock) are dropped first,
    so shares are of time spent running Python or C code.
    """
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"self": [], "inclusive": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = frames[-1]
        if any(idle in leaf for idle in ("select (", "poll (", "wait (threading", "_wait_for_tstate_lock", "sleep (")):
            continue
        count = int(count_text)
        total += count
        self_counts[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
    with contextlib.suppress(ZeroDivisionError):
        return {
            "self": [(f, c / total) for f, c in self_counts.most_common(limit)],
            "inclusive": [(f, c / total) for f, c in inclusive.most_common(limit)],
            "samples": [("busy samples", float(total))],
        }
    return {"self": [], "inclusive": []}
