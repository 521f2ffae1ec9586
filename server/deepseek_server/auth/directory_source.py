"""Auth state from a directory (`--auth-dir`): the auth ConfigMaps' files, re-read within a second of any change.

The directory holds the index files (`config.json`, `jwks.json`, `shards.json` once the entries are sharded) and
the entry files: inline `revoked.json`/`limits.json`, or `revoked.<i>.json`/`limits.<i>.json` for each shard `i`
(each file plain or `.json.gz`). Every file name is unique across the index and its shards, so one projected volume
of all the auth ConfigMaps mounts them side by side. A poll re-parses only the files whose time or size changed:
a revocation rewrites one shard, and only that shard is read again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepseek_server.auth.documents import (
    DOCUMENTS,
    ENTRY_DOCUMENTS,
    AuthEntries,
    AuthState,
    assemble_auth_state,
    decode_document,
    entry_file,
    parse_entries,
    shard_count,
)

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[str, int, int, int], ...]


def _document_path(directory: Path, stem: str) -> Path | None:
    """`<stem>.json`, else `<stem>.json.gz`, else None."""
    for path in (directory / f"{stem}.json", directory / f"{stem}.json.gz"):
        if path.is_file():
            return path
    return None


def _stamp(paths: list[Path]) -> _Stamp:
    # a mounted ConfigMap swaps a `..data` symlink: resolve so the swap shows as a change
    stamps = []
    for path in paths:
        stat = path.resolve().stat()
        stamps.append((path.name, stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stamps)


def _read(path: Path, stem: str) -> Any:
    return decode_document(stem, path.read_bytes(), gzipped=path.name.endswith(".gz"))


def read_auth_directory(directory: Path) -> dict[str, Any]:
    """Decoded index (and inline entry) documents found in `directory` (`<name>.json` over `<name>.json.gz`)."""
    docs: dict[str, Any] = {}
    for name in DOCUMENTS:
        path = _document_path(directory, name)
        if path is not None:
            docs[name] = _read(path, name)
    return docs


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Name, mtime and size of every `*.json*` entry (symlinks followed, as kubelet's volumes use them). Plain `os`
    calls: this runs four times a second beside the requests, and pathlib's glob and resolve cost nine times more."""
    found = []
    for name in sorted(name for name in os.listdir(directory) if ".json" in name):
        try:
            stat = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        found.append((name, stat.st_mtime_ns, stat.st_size))
    return tuple(found)


class DirectoryAuthSource:
    """Polls the directory's file times and sizes every `interval_s`; a bad change keeps the last good state."""

    def __init__(self, directory: Path, on_state: Callable[[AuthState], None], interval_s: float = 0.25) -> None:
        self.directory = directory
        self.on_state = on_state
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        # Parsed entries by place (None: inline, i: shard i), with the stamp of the files they were parsed from.
        self._entries: dict[int | None, tuple[_Stamp, AuthEntries]] = {}

    def _entries_of(self, shard: int | None) -> AuthEntries:
        paths: dict[str, Path] = {}
        for name in ENTRY_DOCUMENTS:
            path = _document_path(self.directory, entry_file(name, shard))
            if path is not None:
                paths[name] = path
            elif shard is not None:
                raise ValueError(f"shard {shard} lacks {entry_file(name, shard)}.json (not written or not synced yet)")
        stamp = _stamp(list(paths.values()))  # before reading: a file changed meanwhile is read again next poll
        cached = self._entries.get(shard)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        entries = parse_entries({name: _read(path, entry_file(name, shard)) for name, path in paths.items()}, shard)
        self._entries[shard] = (stamp, entries)
        return entries

    def read_state(self) -> AuthState:
        """The state the directory holds now, re-parsing only changed entry files; ValueError/OSError if unusable."""
        docs = {}
        for name in ("config", "jwks", "shards"):
            path = _document_path(self.directory, name)
            if path is not None:
                docs[name] = _read(path, name)
        count = shard_count(docs)
        inline = self._entries_of(None) if count == 0 else AuthEntries()
        shards = [self._entries_of(index) for index in range(count)]
        for stale in set(self._entries) - {None, *range(count)}:
            del self._entries[stale]
        return assemble_auth_state(docs, inline, shards)

    def load_once(self) -> bool:
        """Re-read if anything changed; returns True when a new state was applied."""
        seen = _fingerprint(self.directory)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            state = self.read_state()
        except (OSError, ValueError) as exc:
            log.error("auth directory %s: %s; keeping the previous auth state", self.directory, exc)
            return False
        self.on_state(state)
        log.info("auth state loaded from %s (generation %d, %d keys, %d revoked)", self.directory,
                 state.generation, len(state.keys), len(state.revoked))
        return True

    def start(self) -> None:
        self.load_once()
        self._thread = threading.Thread(target=self._run, name="auth-directory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.load_once()
            except Exception:  # the poller must outlive any surprise
                log.exception("auth directory poll failed")

