"""The weekly maintenance window (the original: "down on Sunday between 00:15 and 00:16 GMT")."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DAYS = ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"]
_PATTERN = re.compile(
    r"^\s*(MON|TUE|WED|THU|FRI|SAT|SUN)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$",
    re.IGNORECASE,
)
_WEEK_S = 7 * 86_400


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """A window in seconds from Monday 00:00 GMT; it may run past midnight."""

    start_s: int
    length_s: int

    @classmethod
    def parse(cls, text: str) -> MaintenanceWindow:
        match = _PATTERN.match(text)
        if not match:
            raise ValueError(f"maintenance window must look like 'SUN 00:15-00:16', not {text!r}")
        day, h1, m1, h2, m2 = match.groups()
        start_h, start_m, end_h, end_m = int(h1), int(m1), int(h2), int(m2)
        if start_h > 23 or end_h > 23 or start_m > 59 or end_m > 59:
            raise ValueError(f"maintenance window has an impossible time: {text!r}")
        start = _DAYS.index(day.upper()) * 86_400 + start_h * 3600 + start_m * 60
        length = (end_h * 3600 + end_m * 60) - (start_h * 3600 + start_m * 60)
        if length <= 0:
            length += 86_400
        return cls(start, length)

    def remaining_s(self, unix_s: float) -> float:
        """Seconds until the window ends if ``unix_s`` is inside it, else 0."""
        # 1970-01-01 was a Thursday: shift so that 0 is a Monday 00:00.
        week_s = (unix_s + 3 * 86_400) % _WEEK_S
        into = (week_s - self.start_s) % _WEEK_S
        return self.length_s - into if into < self.length_s else 0.0
