"""A warning that a flooding peer cannot turn into a flood of log lines: at most one line per interval,
saying how many were held back since the last one."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedWarning:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last = float("-inf")
        self._held_back = 0
        self._lock = threading.Lock()  # the engine logs from its socket thread, tests from others

    def warn(self, message: str, *args: object) -> bool:
        """Logs `message % args` unless one was logged less than interval_s ago; True when it logged."""
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._held_back += 1
                return False
            held_back, self._held_back, self._last = self._held_back, 0, now
        suffix = f" ({held_back} more like it since the last report)" if held_back else ""
        self.logger.warning(message + suffix, *args)
        return True
