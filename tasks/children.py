"""Child processes of the scale benchmarks: run one, wait for it (or interrupt it), read its peak RSS."""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Log = Callable[[str], None]

# -- child processes --------------------------------------------------------------------------------
INTERRUPTED = 130  # mplus's exit code after Ctrl-C
POLL_S = 0.02


# -- child processes --------------------------------------------------------------------------------
INTERRUPTED = 130  # mplus's exit code after Ctrl-C
POLL_S = 0.02


class ChildFailed(RuntimeError):
    """A child process did not end as it should; the message says how it ended."""


@dataclass
class Child:
    """A finished child process: its exit code, wall seconds and output, and for `mplus` its peak RSS (bytes)."""

    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    peak_rss: int = 0

    def check(self, what: str) -> Child:
        if self.returncode != 0:
            last = (self.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ChildFailed(f"{what} exited with {self.returncode}: {last}")
        return self


def run_child(args: list[str], env: dict[str, str] | None = None, interrupt: Callable[[], bool] | None = None) -> Child:
    """Run `args` in a fresh process to its end; with `interrupt`, send it SIGINT once interrupt() is true."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        with subprocess.Popen(args, stdout=out, stderr=err, env=env) as process:
            try:
                wait(process, interrupt)
            except BaseException:
                process.kill()
                raise
        wall_s = time.perf_counter() - start
        out.seek(0), err.seek(0)
        return Child(process.returncode, wall_s, out.read().decode(), err.read().decode())


def wait(process: subprocess.Popen, interrupt: Callable[[], bool] | None) -> None:
    """Wait for `process`; with `interrupt`, polled every POLL_S while it runs, SIGINT it once that is true."""
    while interrupt is not None and process.poll() is None:
        if interrupt():
            process.send_signal(signal.SIGINT)
            interrupt = None
        else:
            time.sleep(POLL_S)
    process.wait()


def mplus(args: list[str], env: dict[str, str], interrupt: Callable[[], bool] | None = None) -> Child:
    """`mplus ARGS` in a fresh process (as `python -m mplus_cli` runs it), with its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak-rss"
        child = run_child(child_of_this_module("mplus", str(peak), *args), env, interrupt)
        child.peak_rss = int(peak.read_text()) if peak.exists() else 0
        return child


def measured_mplus(peak_file: str, args: list[str]) -> None:
    """Run `mplus ARGS` in this process and write its peak RSS to `peak_file` when it exits (however it exits)."""
    atexit.register(lambda: Path(peak_file).write_text(str(peak_rss())))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as at a terminal, even if started ignoring it
    sys.argv = ["mplus", *args]
    runpy.run_module("mplus_cli", run_name="__main__")


def peak_rss() -> int:
    """This process's peak RSS in bytes: its VmHWM. (Not ru_maxrss: on Linux a child's starts at its parent's
    peak RSS, carried across fork and exec, so it would report the benchmark's own memory.)"""
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


def child_env(threads: int | None) -> dict[str, str]:
    """This process's environment, with OMP_NUM_THREADS (torch's thread count) set to `threads` if given."""
    return os.environ | ({} if threads is None else {"OMP_NUM_THREADS": str(threads)})


def child_of_this_module(*args: str) -> list[str]:
    return [sys.executable, "-m", "tasks.scale", *args]
