"""The run-folder lock: live holders refuse (naming them), dead or stale ones are taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mistral_ft.lock import LOCK_NAME, FolderLock, FolderLocked


def _write(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (folder / LOCK_NAME).write_text(json.dumps({"started": now, "heartbeat": now, "what": "training", **holder}))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_lock_is_written_refreshed_and_removed(tmp_path):
    lock = FolderLock(tmp_path, what="training", heartbeat_s=0.05)
    with lock:
        first = json.loads((tmp_path / LOCK_NAME).read_text())
        assert first["pid"] == os.getpid() and first["host"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first["heartbeat"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_holder_on_this_host_refuses_naming_it(tmp_path, live_pid):
    import socket

    _write(tmp_path, host=socket.gethostname(), pid=live_pid)
    with pytest.raises(FolderLocked, match=f"pid {live_pid} on host {socket.gethostname()}"):
        FolderLock(tmp_path, what="training").acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == live_pid  # untouched


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
    import socket

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now free (reuse within the test is vanishingly unlikely)
    _write(tmp_path, host=socket.gethostname(), pid=proc.pid)
    with FolderLock(tmp_path, what="training"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "is gone" in caplog.text


def test_another_hosts_lock_needs_a_stale_heartbeat_or_break(tmp_path):
    _write(tmp_path, host="node-that-is-not-this-one", pid=1)
    with pytest.raises(FolderLocked, match="lock.break=true"):
        FolderLock(tmp_path, what="training").acquire()
    with FolderLock(tmp_path, what="training", force=True):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    _write(tmp_path, host="node-that-is-not-this-one", pid=1, heartbeat=time.time() - 301)
    with FolderLock(tmp_path, what="training"):
        pass
    assert not (tmp_path / LOCK_NAME).exists()
