"""A service started by a launcher (TOKENPOOL_EXIT_WITH_PARENT=<launcher pid>) goes when the launcher
goes, however it ends, even when the launcher died while the service was still starting: the pid
it watches is the launcher's, not the parent it finds once it is up (by then init's)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tokenpool.cli.service_process import EXIT_WITH_PARENT, PARENT_POLL_S, stop_process

WAIT_S = 60  # for an agent to start (imports) and notice, on a slow machine


def agent_argv(tmp: Path) -> list[str]:
    return [sys.executable, "-m", "tokenpool.kvtransfer", "--name", "k", "--listen", "127.0.0.1:0",
            "--pool-mib", "16", "--ready-file", str(tmp / "agent.ready.json")]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"  # a zombie is gone


def test_an_agent_whose_launcher_died_while_it_started_exits_by_itself(tmp_path):
    launcher = (f"import os, subprocess, sys\n"
                f"p = subprocess.Popen({agent_argv(tmp_path)!r}, env={{**os.environ, {EXIT_WITH_PARENT!r}: "
                f"str(os.getpid())}}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                f"print(p.pid, flush=True)\n"
                f"os._exit(0)  # at once: the agent is still importing")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60,
                         check=True)
    pid = int(out.stdout)
    deadline = time.monotonic() + WAIT_S
    while not gone(pid):
        assert time.monotonic() < deadline, f"the orphaned agent {pid} is still running"
        time.sleep(0.2)


def test_an_agent_whose_launcher_lives_stays_up(tmp_path):
    process = subprocess.Popen(agent_argv(tmp_path), env={**os.environ, EXIT_WITH_PARENT: str(os.getpid())},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (tmp_path / "agent.ready.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.1)
        time.sleep(3 * PARENT_POLL_S)
        assert process.poll() is None, "the agent left though its launcher is alive"
    finally:
        assert stop_process(process, 30) == 0
