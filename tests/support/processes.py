"""Real server processes on loopback for tests: start, wait until ready, always stop."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_test_process() -> None:
    """Linux: the child gets SIGTERM when the test process dies, even if it is killed."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        list(argv), stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, preexec_fn=_die_with_test_process,
    )


def start_server_process(args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``guardkit-server start ARGS`` as a child of the test process."""
    return spawn([sys.executable, "-m", "guardkit_server.cli", "start", *args], log, env)


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Until ``url`` answers 200; fails with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@contextlib.contextmanager
def running_guard_server(args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A guardkit-server on a free loopback port: yields (base URL, process)."""
    port = free_port()
    process = start_server_process([*args, "--port", str(port)], log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/ready", process, log)
        yield url, process
    finally:
        stop(process)
