"""One writer per folder (cord.py's --output, data_gen.py's --out); beside plumbing.py, so data_gen.py needs no torch.

<folder>/.lock names its holder (program, pid, host, start time) and is held with flock(2): the kernel drops
the lock when its process ends in any way (Ctrl-C, SIGKILL, a crash), so a lock left by a dead run never
blocks the next one, which takes it over with a message naming whose lock it found.
"""
import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # resolved folder -> [fd, depth]: this process's locks (an flock belongs to one open file)


def _holder(fd: int) -> dict:
    """What a lock file says about its holder; {} when it is empty or unreadable (being written, or left by a crash)."""
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    """`cord.py (pid 123 on host, since 2026-01-01 03:00 UTC)`."""
    return (f"{holder.get('program', 'another process')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


class FolderLock:
    """`with FolderLock(folder, "cord.py", "--output"):` this process is the folder's only writer inside the block.

    A second process on the same folder is refused in one line naming the holder. Re-entrant within one process.
    Under torchrun only rank 0 (RANK=0) takes it: the other ranks never write into the folder. An empty folder
    name (an unset shell variable: `--output ""`) is refused instead of meaning the current folder.
    """

    def __init__(self, folder, program: str = "cord.py", flag: str = "--output"):
        if not str(folder).strip():
            raise SystemExit(f"{flag} is empty (an unset shell variable?); give a folder")
        self.folder, self.program, self.flag, self.key = Path(folder), program, flag, None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, kind, err, tb):
        self.release()
        return False

    def acquire(self) -> "FolderLock":
        if int(os.environ.get("RANK", 0)) != 0 or self.key:
            return self
        key = str(self.folder.resolve())
        if key in _held:
            _held[key][1] += 1
            self.key = key
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._lock(self.folder / LOCK_NAME)
        except OSError as e:
            raise SystemExit(f"{self.flag} {self.folder}: cannot write there ({e.strerror}); "
                             "choose another folder") from None
        if fd is not None:
            old = _holder(fd)
            if old and old.get("pid") != os.getpid():
                print(f"{self.folder}: taking over the lock left by {describe(old)}: that process has ended",
                      file=sys.stderr)
            me = {"program": self.program, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        _held[key], self.key = [fd, 1], key
        return self

    def _lock(self, path: Path):
        """The open, flocked lock file's descriptor; None where the file system has no locks (then: a warning)."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise SystemExit(f"{self.folder} is in use by {describe(holder)}; wait until it ends, or choose "
                                 f"another {self.flag}") from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                print(f"warning: {self.folder}: this file system has no locks; make sure no other run writes there",
                      file=sys.stderr)
                return None
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed the file while we opened it: lock the new one

    def release(self) -> None:
        if not self.key or self.key not in _held:
            return
        entry = _held[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.key]
            if entry[0] is not None:
                try:
                    os.unlink(self.folder / LOCK_NAME)  # while still locked: a waiter then retries on a fresh file
                except OSError:
                    pass
                os.close(entry[0])  # unlocks
        self.key = None

    def hold_until_exit(self) -> "FolderLock":
        """Take the lock for the rest of this process (a command-line program's run)."""
        self.acquire()
        atexit.register(self.release)
        return self
