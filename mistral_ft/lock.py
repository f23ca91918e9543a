"""A folder lock with a heartbeat: one training per run folder, one export per output folder.

Why: two trainings into one `hydra.run.dir` both exited 0 and left a mixed folder (config.yaml from one,
last.ckpt from the other). Rank 0 takes `<folder>/run.lock` before it writes anything:

    {"host": ..., "pid": ..., "started": <unix time>, "heartbeat": <unix time>}

created with O_EXCL, refreshed every 30 s by a daemon thread, removed at exit. A lock left behind by a
SIGKILL (nothing removes it) is taken over when its holder is certainly gone:

- same host, pid no longer alive: taken over, with a log line;
- another host (a SLURM requeue lands on another node; we cannot see its processes): taken over only when
  the heartbeat is older than 5 minutes, or with `lock.break=true`.

Otherwise `FolderLocked` (a user error: exit 2) names the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from mistral_ft.errors import UserError
from mistral_ft.fs import atomic_write_bytes

log = logging.getLogger("mistral_ft.lock")

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class FolderLocked(UserError):
    """Another live process holds the folder's lock (the message names host, pid and times)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any], now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    age = now - float(holder.get("heartbeat", 0))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {started}, heartbeat {age:.0f} s ago)"


class FolderLock:
    """`with FolderLock(folder, what="training"):` holds `folder/run.lock` for the block."""

    def __init__(self, folder: Path, *, what: str, force: bool = False,
                 heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.folder, self.what, self.force = Path(folder), what, force
        self.path = self.folder / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._record: dict[str, Any] = {}

    def _payload(self) -> bytes:
        self._record["heartbeat"] = time.time()
        return json.dumps(self._record).encode()

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
                        "what": self.what}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._take_over(now)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
                f.flush()
                os.fsync(f.fileno())
        self._thread = threading.Thread(target=self._beat, name="mistral_ft-lock-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self, now: float) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as err:  # an unreadable lock (torn by a crash mid-write): nobody holds it
            log.warning("%s: unreadable lock file (%s); taking it over", self.path, err)
            atomic_write_bytes(self.path, self._payload())
            return
        same_host = holder.get("host") == self._record["host"]
        pid = int(holder.get("pid", -1))
        if same_host and pid != os.getpid() and not _alive(pid):
            reason = f"its holder (pid {pid}, this host) is gone"
        elif not same_host and now - float(holder.get("heartbeat", 0)) > self.stale_s:
            reason = f"its heartbeat is older than {self.stale_s:.0f} s"
        elif not same_host and self.force:
            reason = "lock.break=true"
        else:
            hint = "" if same_host else (f"; if that process is gone (e.g. a requeued job on another node), wait until "
                                         f"the heartbeat is {self.stale_s:.0f} s old or pass lock.break=true")
            raise FolderLocked(f"{self.folder} is in use by another {holder.get('what', 'process')}: "
                               f"{_describe(holder, now)} holds {self.path}{hint}. Choose another folder, or wait "
                               "until that run ends.")
        log.warning("%s: taking over the lock of %s: %s", self.path, _describe(holder, now), reason)
        atomic_write_bytes(self.path, self._payload())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._mine():
                    atomic_write_bytes(self.path, self._payload())
            except OSError as err:  # a full disk must not kill training; the next beat tries again
                log.warning("%s: heartbeat not written: %s", self.path, err)

    def _mine(self) -> bool:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")).get("pid") == os.getpid()
        except (OSError, ValueError, AttributeError):
            return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._mine():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
