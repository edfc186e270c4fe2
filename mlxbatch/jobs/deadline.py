"""`--deadline HH:MM`: the moment a run must stop by, and the check the run polls.

A deadline is a local wall-clock time; it means its next occurrence (started at 22:00,
`--deadline 07:00` is tomorrow morning). A real run polls `Deadline.passed` between decode steps
and stops like after SIGINT: finished rows are committed and exported, and the next run resumes.
This module does not stop anything itself, and knows nothing of rows or models.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

_HHMM = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])$")


def parse_hhmm(text: str) -> tuple[int, int]:
    """(hour, minute) of 'HH:MM'; ValueError for anything else."""
    match = _HHMM.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a time of day as HH:MM (00:00 to 23:59)")
    return int(match.group(1)), int(match.group(2))


def next_occurrence(text: str, now: float | None = None) -> float:
    """The Unix time of the next local `HH:MM` after `now`."""
    hour, minute = parse_hhmm(text)
    current = datetime.fromtimestamp(time.time() if now is None else now)
    target = current.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target <= current:
        target += timedelta(days=1)
    return target.timestamp()


class Deadline:
    """A moment to stop by; `passed()` is cheap enough to call at every decode step."""

    def __init__(self, at: float, text: str = ""):
        self.at, self.text = at, text

    @classmethod
    def from_hhmm(cls, text: str, now: float | None = None) -> Deadline:
        return cls(next_occurrence(text, now), text)

    def passed(self) -> bool:
        return time.time() >= self.at

    def remaining(self) -> float:
        return self.at - time.time()


def duration(seconds: float) -> str:
    """'1h 05m', '4m 10s', '12.3s'."""
    if seconds < 60:
        return f"{max(0.0, seconds):.1f}s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
