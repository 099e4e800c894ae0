"""Video jobs that survive a restart: their records in SQLite, their files on disk.

The only writer of the video directory. A record holds the job's OpenAI `VideoResource`, the
worker job that makes it (so a queued job can be sent again after a restart, and a remix can
start from it) and its owner: the hash of the API key that created it ("" with auth off), so a
key sees, downloads and deletes only its own videos. Files live in `<dir>/<id>/`; both go when
the video expires or is deleted.
"""

from __future__ import annotations

import fcntl
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from ..clips import VIDEO_MEDIA_TYPES
from ..video_protocol import VideoJob, VideoJobError, VideoResource

FILE_NAMES = {"video": "video.mp4", "thumbnail": "thumbnail.webp", "spritesheet": "spritesheet.jpg"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    expires_at INTEGER,
    resource TEXT NOT NULL,
    job TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS videos_by_owner ON videos (owner, created_at);
"""


class VideoDirectoryInUse(RuntimeError):
    pass


class VideoStore:
    """Records and files of video jobs; every method is safe to call from any thread.

    One server owns a video directory at a time (an exclusive lock on `<dir>/.lock`, freed when
    the process ends): at start a server fails the jobs left rendering, which must be its own
    predecessor's, not a live neighbour's."""

    def __init__(self, db_path: Path, files_dir: Path) -> None:
        files_dir.mkdir(parents=True, exist_ok=True)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(files_dir / ".lock", "a+")  # noqa: SIM115 (held for the process's life)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise VideoDirectoryInUse(
                f"the video directory {files_dir} is in use by another HyperGen server; give each server its own HYPERGEN_VIDEO_DIR"
            ) from None
        self.files_dir = files_dir
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Progress is saved from the event loop at every percent: with WAL, NORMAL syncs at
        # checkpoints rather than at every commit, and still survives a crash of the server.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Let another server take the directory (what the process's exit does)."""
        self._db.close()
        self._lock_file.close()

    def add(self, resource: VideoResource, job: VideoJob, owner: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO videos (id, owner, created_at, status, expires_at, resource, job) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (resource.id, owner, time.time(), resource.status, resource.expires_at, resource.model_dump_json(), job.model_dump_json()),
            )

    def update(self, resource: VideoResource) -> bool:
        """Save a record's new state; False if it was deleted meanwhile."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE videos SET status = ?, expires_at = ?, resource = ? WHERE id = ?",
                (resource.status, resource.expires_at, resource.model_dump_json(), resource.id),
            )
        return cursor.rowcount == 1

    def get(self, video_id: str, owner: str | None) -> VideoResource | None:
        """The record, if it exists and belongs to `owner` (None: anyone's, for the server itself)."""
        row = self._row("SELECT resource FROM videos WHERE id = ?" + ("" if owner is None else " AND owner = ?"), video_id, owner)
        return VideoResource.model_validate_json(row[0]) if row else None

    def job(self, video_id: str) -> VideoJob | None:
        row = self._row("SELECT job FROM videos WHERE id = ?", video_id, None)
        return VideoJob.model_validate_json(row[0]) if row else None

    def _row(self, query: str, video_id: str, owner: str | None) -> tuple[str] | None:
        with self._lock:
            return self._db.execute(query, (video_id,) if owner is None else (video_id, owner)).fetchone()

    def page(self, owner: str, limit: int, order: str, after: str | None) -> tuple[list[VideoResource], bool]:
        """One page of the owner's videos by creation time, and whether more follow."""
        direction, compare = ("DESC", "<") if order == "desc" else ("ASC", ">")
        query, arguments = "SELECT resource FROM videos WHERE owner = ?", [owner]
        if after is not None:
            query += f" AND created_at {compare} (SELECT created_at FROM videos WHERE id = ? AND owner = ?)"
            arguments += [after, owner]
        with self._lock:
            rows = self._db.execute(f"{query} ORDER BY created_at {direction} LIMIT ?", (*arguments, limit + 1)).fetchall()
        return [VideoResource.model_validate_json(row[0]) for row in rows[:limit]], len(rows) > limit

    def count_unfinished(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM videos WHERE status IN ('queued', 'in_progress')").fetchone()[0]

    def delete(self, video_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM videos WHERE id = ?", (video_id,))
        shutil.rmtree(self.files_dir / video_id, ignore_errors=True)

    # --- files -------------------------------------------------------------------------------

    def write_files(self, video_id: str, files: dict[str, bytes]) -> None:
        """Write a video's files (variant → bytes), each atomically."""
        directory = self.files_dir / video_id
        directory.mkdir(parents=True, exist_ok=True)
        for variant, data in files.items():
            target = directory / FILE_NAMES[variant]
            partial = target.with_suffix(target.suffix + ".partial")
            partial.write_bytes(data)
            partial.replace(target)

    def file(self, video_id: str, variant: str) -> tuple[Path, str] | None:
        path = self.files_dir / video_id / FILE_NAMES[variant]
        return (path, VIDEO_MEDIA_TYPES[variant]) if path.is_file() else None

    # --- start-up and expiry -----------------------------------------------------------------

    def recover(self, interrupted: VideoJobError) -> list[str]:
        """At start: jobs that were rendering when the server stopped are failed with
        `interrupted`; the ids of those still queued come back, oldest first, to run again."""
        with self._lock:
            rows = self._db.execute("SELECT resource FROM videos WHERE status = 'in_progress'").fetchall()
        for (text,) in rows:
            resource = VideoResource.model_validate_json(text)
            self.update(resource.model_copy(update={"status": "failed", "error": interrupted}))
        with self._lock:
            queued = self._db.execute("SELECT id FROM videos WHERE status = 'queued' ORDER BY created_at").fetchall()
        return [row[0] for row in queued]

    def expire(self, now: float | None = None) -> int:
        """Delete videos (records and files) whose `expires_at` has passed; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [row[0] for row in self._db.execute("SELECT id FROM videos WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))]
        for video_id in expired:
            self.delete(video_id)
        return len(expired)
