"""Stop-string matching over streamed text, holding back any tail that may be the start of a stop string."""

from __future__ import annotations


class StopStringMatcher:
    """Feed text deltas in order; emits only text that can no longer become part of a stop string.

    The result does not depend on how the text is split into deltas: the stop that wins is the one whose
    last character comes first in the text (ties: the one that starts first, i.e. the longest).
    """

    def __init__(self, stop: list[str], *, include_stop_str_in_output: bool = False) -> None:
        self._stops = [s for s in dict.fromkeys(stop) if s]  # an empty stop string cannot be matched
        self._include_stop = include_stop_str_in_output
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        # Every proper prefix of every stop string: a held tail must be one of these.
        self._prefixes = {s[:length] for s in self._stops for length in range(1, len(s))}
        self._held = ""
        self.stop_str: str | None = None  # the matched stop string, once matched

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit now, the stop string if one just matched); after a match, stop generating."""
        if self.stop_str is not None:
            return "", None
        if not self._stops:
            return text, None
        buf = self._held + text
        match = self._first_match(buf)
        if match is not None:
            start, stop_str = match
            self.stop_str = stop_str
            self._held = ""
            end = start + len(stop_str) if self._include_stop else start
            return buf[:end], stop_str
        num_held = self._partial_match_len(buf)
        self._held = buf[len(buf) - num_held :]
        return buf[: len(buf) - num_held], None

    def flush(self) -> str:
        """The held-back text, when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # The held text never contains a whole stop string, so any match ends in the new text; picking
        # the earliest end makes the outcome the same as matching on the whole text at once.
        best: tuple[int, int, str] | None = None
        for stop_str in self._stops:
            start = buf.find(stop_str)
            if start < 0:
                continue
            key = (start + len(stop_str), start, stop_str)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for length in range(min(len(buf), self._max_hold), 0, -1):
            if buf[len(buf) - length :] in self._prefixes:
                return length
        return 0
