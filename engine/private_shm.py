"""Where tokenpool keeps node-local shared memory: /dev/shm/tokenpool-<uid>/ (mode 0700).

/dev/shm is world-writable, so a folder someone else created or can write into is
refused rather than used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path


def shm_root() -> Path:
    """/dev/shm/tokenpool-<uid>, or the same under the temp folder where /dev/shm is absent."""
    shm = Path("/dev/shm")
    return (shm if shm.is_dir() else Path(tempfile.gettempdir())) / f"tokenpool-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if needed; refuse one that another user owns or can write into."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"folder {path} must be a directory owned by uid {os.getuid()} "
                              f"and writable by no one else (mode {stat.filemode(st.st_mode)})")
    return path


def reserve(fd: int, size: int) -> None:
    """Back the first size bytes of fd with memory now, so a full /dev/shm fails here (OSError
    ENOSPC) rather than as SIGBUS on a later write. A file system without fallocate is let be."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
