"""Images behind `url` responses: written to disk, served until they expire, then deleted.

Expiry is the file's modification time plus the TTL, so every API process sharing the
directory agrees on it. The directory is bounded: expired files go on every write, and when
the total still exceeds the byte cap the oldest files go too.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ..codec import MEDIA_TYPES

# Scanning the directory on every write would cost O(files) per image.
PURGE_INTERVAL_S = 1.0
_FILE_NAME = re.compile(r"^img_[A-Za-z0-9_-]{16,64}\.(png|jpeg|webp)$")


@dataclass(frozen=True)
class StoredImage:
    path: Path
    media_type: str
    expires_at: float


class ImageStore:
    """A bounded, expiring directory of images addressed by unguessable ids."""

    def __init__(self, directory: Path, ttl_seconds: float, max_bytes: int) -> None:
        self.directory = directory
        self.ttl_seconds = ttl_seconds
        self.max_bytes = max_bytes
        self._last_purge = 0.0
        self._bytes = 0  # in use as of the last purge, plus what this process wrote since
        directory.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, output_format: str) -> str:
        """Store one encoded image; returns its file id (e.g. `img_...png`)."""
        if output_format not in MEDIA_TYPES:
            raise ValueError(f"unsupported output_format '{output_format}'")
        # Purge at most once a second, but at once if this write would pass the cap.
        if time.monotonic() - self._last_purge > PURGE_INTERVAL_S or self._bytes + len(data) > self.max_bytes:
            self._bytes = self.purge(reserve=len(data))
        file_id = f"img_{secrets.token_urlsafe(18)}.{output_format}"
        staging = self.directory / f".{file_id}.tmp"
        staging.write_bytes(data)
        os.replace(staging, self.directory / file_id)
        self._bytes += len(data)
        return file_id

    def get(self, file_id: str) -> StoredImage | None:
        """The image, or None if the id is malformed, unknown or expired (expired files are deleted)."""
        if not _FILE_NAME.match(file_id):
            return None
        path = self.directory / file_id
        try:
            expires_at = path.stat().st_mtime + self.ttl_seconds
        except FileNotFoundError:
            return None
        if expires_at <= time.time():
            path.unlink(missing_ok=True)
            return None
        return StoredImage(path, MEDIA_TYPES[file_id.rsplit(".", 1)[1]], expires_at)

    def purge(self, reserve: int = 0) -> int:
        """Delete expired files, then the oldest until under the byte cap with room for
        `reserve` more; returns bytes in use."""
        self._last_purge = time.monotonic()
        now = time.time()
        entries: list[tuple[float, int, Path]] = []
        for path in self.directory.iterdir():
            if not _FILE_NAME.match(path.name):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if stat.st_mtime + self.ttl_seconds <= now:
                path.unlink(missing_ok=True)
            else:
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total + reserve <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
        return total
