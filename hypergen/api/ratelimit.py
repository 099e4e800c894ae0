"""Rate limits per API key (per client IP with auth off): requests and images per window.

`HYPERGEN_RATE_LIMIT` syntax: comma-separated rules `COUNT/UNIT` (requests) or
`COUNT images/UNIT` (images, charged by `n`), UNIT one of second, minute, hour, day — e.g.
`60/minute`, `5/second,200 images/hour`. Windows slide: a request is allowed when fewer than
COUNT were admitted in the last UNIT, and `Retry-After` says when the oldest one leaves it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Literal

from ..config import RateRule
from ..errors import OpenAIError

# Keys remembered at most; the least recently seen are forgotten first.
MAX_TRACKED_KEYS = 100_000


def format_reset(seconds: float) -> str:
    """OpenAI's `x-ratelimit-reset-*` style: `1s`, `6m0s`, `1h2m3s`."""
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class RateLimiter:
    """Sliding-window counters per (key, rule); in memory, per API process."""

    def __init__(self, rules: list[RateRule], clock: Callable[[], float] = time.monotonic) -> None:
        self.rules = rules
        self.clock = clock
        self._events: OrderedDict[tuple[str, int], deque[tuple[float, int]]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    def acquire(self, key: str, unit: Literal["requests", "images"], amount: int = 1) -> dict[str, str]:
        """Charge `amount` to every `unit` rule of `key`, or raise a 429 without charging any.

        Returns OpenAI-style `x-ratelimit-*` headers describing what is left.
        """
        now = self.clock()
        applicable = [(index, rule) for index, rule in enumerate(self.rules) if rule.unit == unit]
        headers: dict[str, str] = {}
        for index, rule in applicable:
            events = self._window(key, index, rule, now)
            used = sum(count for _, count in events)
            if used + amount > rule.limit:
                retry_after = self._retry_after(events, rule, now, amount)
                raise OpenAIError(
                    429,
                    f"Rate limit reached for {unit} ({rule.label}): {used} used. Retry in {format_reset(retry_after)}.",
                    type=unit,
                    code="rate_limit_exceeded",
                    headers={
                        "Retry-After": str(max(1, math.ceil(retry_after))),
                        f"x-ratelimit-limit-{unit}": str(rule.limit),
                        f"x-ratelimit-remaining-{unit}": str(max(0, rule.limit - used)),
                        f"x-ratelimit-reset-{unit}": format_reset(retry_after),
                    },
                )
        for index, rule in applicable:
            events = self._window(key, index, rule, now)
            events.append((now, amount))
            used = sum(count for _, count in events)
            reset = events[0][0] + rule.window_s - now
            # The tightest rule wins the headers, as OpenAI reports the one you will hit first.
            if f"x-ratelimit-remaining-{unit}" not in headers or rule.limit - used < int(headers[f"x-ratelimit-remaining-{unit}"]):
                headers.update(
                    {
                        f"x-ratelimit-limit-{unit}": str(rule.limit),
                        f"x-ratelimit-remaining-{unit}": str(rule.limit - used),
                        f"x-ratelimit-reset-{unit}": format_reset(reset),
                    }
                )
        return headers

    def _window(self, key: str, index: int, rule: RateRule, now: float) -> deque[tuple[float, int]]:
        slot = (key, index)
        events = self._events.get(slot)
        if events is None:
            events = self._events[slot] = deque()
            while len(self._events) > MAX_TRACKED_KEYS * max(1, len(self.rules)):
                self._events.popitem(last=False)
        self._events.move_to_end(slot)
        while events and events[0][0] <= now - rule.window_s:
            events.popleft()
        return events

    @staticmethod
    def _retry_after(events: deque[tuple[float, int]], rule: RateRule, now: float, amount: int) -> float:
        """Seconds until enough of the window has expired for `amount` more."""
        if amount > rule.limit:
            return rule.window_s
        used = sum(count for _, count in events)
        freed = 0
        for timestamp, count in events:
            freed += count
            if used - freed + amount <= rule.limit:
                return timestamp + rule.window_s - now
        return rule.window_s
