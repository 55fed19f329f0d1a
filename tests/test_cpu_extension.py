"""The C++ extension's build lock: a build killed midway must not hang every later one."""

from __future__ import annotations

import subprocess
import sys
import threading

from tokenpool.engine.cpu_extension import _build_lock


def test_a_baton_left_by_a_killed_build_is_removed(tmp_path):
    (tmp_path / "lock").write_bytes(b"")  # what torch's FileBaton leaves when its process dies
    with _build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_live_build_keeps_its_baton_until_it_ends(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from tokenpool.engine.cpu_extension import _build_lock\n"
         "with _build_lock(Path(sys.argv[1])):\n"
         "    (Path(sys.argv[1]) / 'lock').write_bytes(b'')\n"
         "    print('held', flush=True); sys.stdin.readline()\n"
         "    (Path(sys.argv[1]) / 'lock').unlink()\n",
         str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        entered = threading.Event()

        def build() -> None:
            with _build_lock(tmp_path):
                entered.set()

        waiter = threading.Thread(target=build)
        waiter.start()
        assert not entered.wait(0.5), "entered while another process held the build lock"
        assert (tmp_path / "lock").exists()
        holder.stdin.write("\n")
        holder.stdin.flush()
        waiter.join(30)
        assert entered.is_set()
    finally:
        holder.kill()
        holder.wait()
