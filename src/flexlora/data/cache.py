"""The on-disk cache of source indexes and decompressed copies, keyed by the source files' identity.

The cache lives in ``cache_dir`` when a source is given one, else ``$FLEXLORA_CACHE``, else
``$XDG_CACHE_HOME/flexlora``, else ``~/.cache/flexlora``. An entry's key hashes the source files' resolved
paths, sizes and modification times (and ``INDEX_VERSION``), so editing or replacing a source file makes
a new entry instead of reading a stale one. Files are written to a temporary name and renamed into place,
so a reader never sees half an entry, and two processes building the same entry do not conflict.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["INDEX_VERSION", "cache_root", "SourceCache", "is_gzip", "open_gzip", "gzip_errors", "plain_copy"]

INDEX_VERSION = 1  # bump when an index's layout changes: old entries are then ignored
MAX_PLAIN_BYTES = 16 * 2**30  # a decompressed copy larger than this is refused (a gzip bomb)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache_dir``, else ``$FLEXLORA_CACHE``, ``$XDG_CACHE_HOME/flexlora`` or
    ``~/.cache/flexlora``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FLEXLORA_CACHE"):
        return Path(os.environ["FLEXLORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "flexlora"
    return Path.home() / ".cache" / "flexlora"


class SourceCache:
    """The cache entry of one source: files named ``<kind>-<key><suffix>`` in the cache directory.

    Args:
        kind: what the entry holds (e.g. ``"ni-jsonl"``); entries of different kinds never collide.
        files: the source files whose identity (path, size, mtime) keys the entry.
        cache_dir: overrides the cache directory (see ``cache_root``).
    """

    def __init__(self, kind: str, files: Sequence[Path], cache_dir: str | os.PathLike[str] | None = None):
        digest = hashlib.sha256(f"{kind}\0{INDEX_VERSION}\n".encode())
        for f in files:
            st = f.stat()
            digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        self.root = cache_root(cache_dir)
        self.stem = f"{kind}-{digest.hexdigest()[:24]}"

    def path(self, suffix: str) -> Path:
        return self.root / f"{self.stem}{suffix}"

    def read_json(self) -> Any | None:
        """The entry's cached JSON index, or None when absent or unreadable (it is then rebuilt)."""
        try:
            with open(self.path(".index.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError, RecursionError):
            return None

    def write_json(self, value: Any) -> None:
        with self.writer(".index.json") as f:
            f.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())

    @contextmanager
    def writer(self, suffix: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at ``path(suffix)`` only once the block completes."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the flexlora cache {self.root}: {e}; set $FLEXLORA_CACHE") from e
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{self.stem}", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, self.path(suffix))
        except BaseException:
            os.unlink(tmp)
            raise


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_gzip(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb")


@contextmanager
def gzip_errors(path: Path) -> Iterator[None]:
    """Turn a truncated or corrupt gzip stream (bad CRC, bad data, early end) into one ``ValueError``."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e or type(e).__name__})") from None


def plain_copy(path: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A seekable, uncompressed version of ``path``: the file itself, or for gzip a decompressed copy in
    the cache (made on first use; about 1.5 s per 100 MB of output)."""
    if not is_gzip(path):
        return path
    cache = SourceCache("plain", [path], cache_dir)
    target = cache.path(".jsonl")
    if not target.exists():
        with gzip_errors(path), open_gzip(path) as src, cache.writer(".jsonl") as dst:
            written = 0
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > MAX_PLAIN_BYTES:
                    raise ValueError(f"{path}: decompresses to more than {MAX_PLAIN_BYTES} bytes")
                dst.write(chunk)
    return target
