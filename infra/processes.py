"""What the local servers (Kafka, Qdrant) share: free ports, pid files, stopping, and tying a child
server to the process that started it."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def running_pid(pid_file: Path) -> int | None:
    """The pid written in ``pid_file`` while that process lives; None otherwise."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def stop_process(
    pid_file: Path, child: subprocess.Popen[bytes] | None, timeout_s: float, sig: int = signal.SIGTERM
) -> bool:
    """Stop the process of ``pid_file`` with ``sig`` (SIGKILL after the timeout); True if one was running.

    ``child``: the Popen that started it in this process, if any, so that it is reaped, not left a zombie.
    """
    pid = running_pid(pid_file)
    if pid is None:
        return False
    os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.pid == pid:
            if child.poll() is not None:
                break
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        if child is not None and child.pid == pid:
            child.wait()
    pid_file.unlink(missing_ok=True)
    return True


def terminated_with(parent: int) -> Callable[[], None] | None:
    """What a child runs before exec so that it gets SIGTERM when ``parent`` dies (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork: a forked child must not dlopen

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class LocalServer:
    """A server this machine runs as a child process, found again through a pid file in its data folder."""

    def __init__(self, data_dir: Path, pid_name: str) -> None:
        self._pid_file = data_dir / pid_name
        self._process: subprocess.Popen[bytes] | None = None

    def running_pid(self) -> int | None:
        return running_pid(self._pid_file)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the server gracefully (SIGTERM, then SIGKILL after the timeout). True if one was running."""
        stopped = stop_process(self._pid_file, self._process, timeout_s)
        self._process = None
        return stopped

    def kill(self) -> bool:
        """SIGKILL, as a crash or a lost host would: nothing is flushed, nothing handed over."""
        stopped = stop_process(self._pid_file, self._process, 10.0, signal.SIGKILL)
        self._process = None
        return stopped
