"""Auth state from a directory (`--auth-dir`): the ConfigMap's files, re-read within a second of any change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepseek_server.auth.documents import DOCUMENTS, AuthState, decode_document, parse_auth_state

log = logging.getLogger(__name__)


def read_auth_directory(directory: Path) -> dict[str, Any]:
    """Decoded documents found in `directory` (`<name>.json` preferred over `<name>.json.gz`)."""
    docs: dict[str, Any] = {}
    for name in DOCUMENTS:
        plain, packed = directory / f"{name}.json", directory / f"{name}.json.gz"
        if plain.is_file():
            docs[name] = decode_document(name, plain.read_bytes(), gzipped=False)
        elif packed.is_file():
            docs[name] = decode_document(name, packed.read_bytes(), gzipped=True)
    return docs


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    found = []
    # a mounted ConfigMap swaps a `..data` symlink: resolve so the swap shows as a change
    for path in sorted(directory.glob("*.json*")):
        try:
            stat = path.resolve().stat()
        except OSError:
            continue
        found.append((path.name, stat.st_mtime_ns, stat.st_size))
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

    def load_once(self) -> bool:
        """Re-read if anything changed; returns True when a new state was applied."""
        seen = _fingerprint(self.directory)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            state = parse_auth_state(read_auth_directory(self.directory))
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
