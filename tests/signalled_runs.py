"""Run a command and signal it at a chosen point of its progress lines: the stop-and-resume tests' driver."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable


def signal_when(command: list[str], env: dict[str, str], started: Callable[[str], bool],
                send: Callable[[subprocess.Popen], None], timeout: float = 300,
                preexec_fn: Callable[[], object] | None = None) -> subprocess.CompletedProcess:
    """Run `command`; at the first stderr line for which `started(line)` holds, call `send(proc)` once; wait for
    the end and return what it printed (stdout is read in a thread, so neither pipe fills up)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    err = []
    for line in proc.stderr:
        err.append(line)
        if started(line):
            send(proc)
            break
    err.append(proc.stderr.read())
    proc.wait(timeout=timeout)
    reader.join(timeout=10)
    return subprocess.CompletedProcess(command, proc.returncode, "".join(out), "".join(err))
