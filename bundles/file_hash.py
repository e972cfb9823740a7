"""sha256 of a file, and a per-process cache of hashes already verified.

Opening a bundle rehashes every file; a replica opens the same bundle many times
(load, reload, eval gate), so verified hashes are cached by inode identity. A rewrite
changes mtime or ctime, so a stale entry can never vouch for changed bytes. Used by
the store's verification (open) and publishing (an existing blob is reused only if
its bytes still hash right).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

CHUNK = 1 << 20  # read size when hashing or copying: large enough that syscalls don't dominate

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> sha256 hex. Shared by every
# Store in the process.
_VERIFIED: dict[tuple[int, int, int, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()
_SETTLED_NS = 2_000_000_000


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cached_hash(path: Path) -> str:
    """`hash_file`, answered from the cache when this inode was hashed unchanged before."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _VERIFIED_LOCK:
        hit = _VERIFIED.get(key)
    if hit is None:
        hit = hash_file(path)
        # Timestamps are coarse (a few ms): a file changed within the same tick as its
        # last stat would keep its key. Like git's "racy" rule, only cache settled files.
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS:
            with _VERIFIED_LOCK:
                _VERIFIED[key] = hit
    return hit
