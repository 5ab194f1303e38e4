"""The reloader: polls a backend for new model versions on its own thread.

Loading and verifying a version (disk, hashes, a warm-up batch) happens here,
so robots never wait for it; the decision loop takes what was loaded
(`take`) and swaps it in between batches (`Backend.swap`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from agent.backends.base import Backend

log = logging.getLogger(__name__)


class Reloader:
    """Polls `backend.load_version()` every `every_s` on its own thread; `take()` hands the
    newest loaded version to the decision loop."""

    def __init__(self, backend: Backend, every_s: float) -> None:
        self.backend = backend
        self.every_s = every_s
        self.failures = 0
        self.last_error: str | None = None
        self._ready: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reloader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def take(self) -> Any:
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                loaded = self.backend.load_version()
            except Exception as exc:  # a bad version is refused; the served one stays
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("new model version refused: %s", self.last_error)
                continue
            if loaded is not None:
                with self._lock:
                    self._ready = loaded
