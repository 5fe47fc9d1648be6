"""Graceful shutdown: the first SIGTERM (or Ctrl-C) drains, a second one exits at once.

Draining: /ready answers 503 at once (so a load balancer stops sending), new generation requests
get 503, requests in flight keep running for up to ``drain_timeout_s``; whatever is still running
then ends with an error event, and uvicorn shuts down.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

log = logging.getLogger("loraplex")
_POLL_S = 0.05
_FLUSH_S = 1.0  # time for the error events of failed requests to reach their clients


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_state, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app_state, self.drain_timeout_s = app_state, drain_timeout_s
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain is not None:  # the second signal: stop now
            self.force_exit = True
            return super().handle_exit(sig, frame)
        log.warning("signal %s: draining (up to %.0f s), not ready from now on", sig, self.drain_timeout_s)
        self.app_state.draining = True
        self._drain = threading.Thread(target=self._drain_then_exit, name="drain", daemon=True)
        self._drain.start()

    def _drain_then_exit(self) -> None:
        engine = self.app_state.engine
        deadline = time.monotonic() + self.drain_timeout_s
        while engine.num_unfinished and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if engine.num_unfinished:
            log.warning("drain timeout: ending %d requests with an error", engine.num_unfinished)
            engine.fail_all("the server is shutting down", code="draining")
            time.sleep(_FLUSH_S)
        self.should_exit = True
