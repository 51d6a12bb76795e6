"""The supervisor of `make run`'s children: starts each, restarts it with backoff, forwards its output as JSON lines.

What the stack is made of (its servers, ports and environment) is `mediagen.devtools.launcher`'s; this module
only keeps the processes it is given standing, and stops them (those that serve the others last).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from mediagen.logging import log_event
from mediagen.settings import Settings


class GiveUp(Exception):
    """The launcher cannot keep the stack standing: it stops what it started and exits non-zero."""


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived while the launcher was still starting the stack."""


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _terminate_with(parent: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: SIGTERM from the kernel when the launcher dies."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before the line above ran
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass
class Child:
    """One supervised process, in a process group of its own (Dramatiq forks: its worker processes
    are in the group too, and are killed with it when the main process dies)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    serves_the_others: bool = False
    """Stopped after the others (the fake Replicate: a worker stopping still polls it to hand jobs back)."""
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    exits_in_a_row: int = 0
    last_exit_code: int | None = None
    restart_at: float | None = None
    pending: bytearray = field(default_factory=bytearray)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_terminate_with(os.getpid()),  # safe: the launcher starts no threads
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.started_at = time.monotonic()
        self.restart_at = None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal what is left of the child's process group (Dramatiq's worker processes, say)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)


def _exit_fields(code: int) -> dict[str, Any]:
    fields: dict[str, Any] = {"exit_code": code}
    if code < 0:
        fields["signal"] = signal.Signals(-code).name
    return fields


class Supervisor:
    """Runs the children, restarts them with backoff, forwards their output as JSON lines."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.selector = selectors.DefaultSelector()
        self.stop_signal: str | None = None
        self.signals_seen = 0
        self._output_broken = False

    # --- signals ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        # Installed whatever was inherited: a `make run &` from a script starts with SIGINT ignored.
        # SIGHUP too: a closed terminal stops the stack like Ctrl-C, embedded servers included.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals_seen += 1
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name

    def check_stop(self) -> None:
        if self.stop_signal is not None:
            raise StopRequested

    # --- children --------------------------------------------------------------------------------
    def add(self, child: Child) -> None:
        self.children.append(child)
        self._start(child)

    def _start(self, child: Child) -> None:
        child.start()
        assert child.proc is not None and child.proc.stdout is not None
        self.selector.register(child.proc.stdout, selectors.EVENT_READ, child)
        log_event("dev.child_started", child=child.name, pid=child.proc.pid)

    def run(self, ready: Callable[[], bool]) -> None:
        """Supervise until a stop is asked for (returns) or a child keeps exiting (raises GiveUp)."""
        announced = False
        while self.stop_signal is None:
            self.pump(0.2)
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is None and child.proc is not None and child.proc.poll() is not None:
                    self._exited(child, now)
                elif child.restart_at is not None and now >= child.restart_at:
                    self._restart(child)
            if not announced and ready():
                announced = True
                log_event("dev.ready", api=f"http://{self.settings.host}:{self.settings.port}")

    def _exited(self, child: Child, now: float) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        # What is left of its group (the worker processes of a Dramatiq whose main process was killed)
        # gets until the restart to hand its jobs back, then is killed.
        child.kill_group(signal.SIGTERM)
        if now - child.started_at >= self.settings.dev_stable_seconds:
            child.exits_in_a_row = 0
        child.exits_in_a_row += 1
        child.last_exit_code = code
        if child.exits_in_a_row > self.settings.dev_restart_limit:
            raise GiveUp(
                f"{child.name} exited with code {code}, {child.exits_in_a_row} exit(s) in a row: "
                f"more than MEDIAGEN_DEV_RESTART_LIMIT ({self.settings.dev_restart_limit}) restarts"
            )
        delay = min(self.settings.dev_restart_cap_seconds, 2.0 ** (child.exits_in_a_row - 1))
        child.restart_at = now + delay
        log_event("dev.child_exited", logging.WARNING, child=child.name, restart_in_seconds=delay, **_exit_fields(code))

    def _restart(self, child: Child) -> None:
        self._release(child)
        self._start(child)
        assert child.proc is not None
        log_event(
            "dev.child_restarted",
            logging.WARNING,
            child=child.name,
            pid=child.proc.pid,
            restarts=child.exits_in_a_row,
            **_exit_fields(child.last_exit_code or 0),
        )

    def _release(self, child: Child) -> None:
        """After the child's main process ended: kill what is left of its group, take its last lines."""
        child.kill_group()
        assert child.proc is not None and child.proc.stdout is not None
        child.proc.wait()
        self._drain(child, eof_within=1.0)
        with contextlib.suppress(KeyError):
            self.selector.unregister(child.proc.stdout)
        child.proc.stdout.close()
        child.proc = None

    def stop(self) -> None:
        """Stop the children: first those that use the others, then those that serve them."""
        self._stop([child for child in self.children if not child.serves_the_others])
        self._stop([child for child in self.children if child.serves_the_others])

    def _stop(self, children: list[Child]) -> None:
        """SIGTERM to each child's main process (each stops its own: a second signal would make
        Dramatiq and uvicorn skip their graceful shutdown), SIGKILL to what is left after the grace."""
        running = [child for child in children if child.running]
        for child in running:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        signals_before = self.signals_seen
        deadline = time.monotonic() + self.settings.dev_stop_seconds
        while any(child.running for child in running):
            if time.monotonic() > deadline or self.signals_seen > signals_before:
                break
            self.pump(0.1)
        for child in children:
            if child.running:
                log_event("dev.child_killed", logging.WARNING, child=child.name)
            if child.proc is not None:
                self._release(child)
            child.restart_at = None

    # --- output ----------------------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        """Wait up to `timeout` for output of the children, and forward what came."""
        for key, _ in self.selector.select(timeout):
            self._drain(key.data)

    def _drain(self, child: Child, eof_within: float | None = None) -> None:
        """Read what the child wrote; with `eof_within`, until its pipe closes (or that many seconds)."""
        assert child.proc is not None and child.proc.stdout is not None
        fd = child.proc.stdout.fileno()
        deadline = time.monotonic() + (eof_within or 0.0)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                if eof_within is None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)  # a process of the group that was just killed may still hold the pipe
                continue
            if not chunk:  # every process of the group has closed it: nothing more will come
                with contextlib.suppress(KeyError):
                    self.selector.unregister(child.proc.stdout)
                eof_within = 0.0
                break
            child.pending += chunk
            self._forward(child, complete_only=True)
        if eof_within is not None:
            self._forward(child, complete_only=False)

    def _forward(self, child: Child, complete_only: bool) -> None:
        *lines, rest = bytes(child.pending).split(b"\n")
        if not complete_only and rest:
            lines.append(rest)
            rest = b""
        child.pending[:] = rest
        for line in lines:
            if line.strip():
                self._write_line(child, line)

    def _write_line(self, child: Child, line: bytes) -> None:
        try:
            is_json = isinstance(orjson.loads(line), dict)
        except orjson.JSONDecodeError:
            is_json = False
        if not is_json:
            log_event("dev.child_output", child=child.name, line=line.decode(errors="replace").rstrip("\r"))
            return
        if self._output_broken:
            return
        try:
            os.write(2, line + b"\n")  # a line is written whole: the pipe keeps lines of up to 4 KiB apart
        except BrokenPipeError:  # `make run | tee` after tee died of the same Ctrl-C: carry on stopping
            self._output_broken = True
