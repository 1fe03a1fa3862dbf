"""Rate limits per API key: requests and tokens per minute, over a sliding 60 s window, and the
key's lifetime token budget.

A request is admitted on an estimate (prompt tokens plus max_tokens, say) and charged its real
count when it finishes, as OpenAI does. Requests admitted together are not charged against each
other's estimates, so a burst of concurrent requests can overshoot tokens_per_minute (or the
budget) by what they use; the requests after them then wait longer. That keeps the limiter free
of reservations to hand back, at the price of a bound that is per window, not per request.

Not locked: no method awaits or blocks, so on the server's event loop thread (the only caller)
one call always finishes before the next begins.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmasos.serve.keys import ApiKey

WINDOW_S = 60.0


@dataclass
class Decision:
    """Whether a request may run; if not, why (`message`) and when to try again.

    retry_after is whole seconds, at least 1, until the window has room; None when waiting will
    not help (budget spent, or a request larger than the per-minute limit)."""

    allowed: bool
    retry_after: int | None = None
    message: str = ""


@dataclass
class Window:
    """One key's admitted requests and finished requests' tokens, oldest first, within WINDOW_S."""

    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def slide(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


def decide(window: Window, key: ApiKey, estimated_tokens: int, now: float) -> Decision:
    """Check the budget, then requests per minute, then tokens per minute, against a window already
    slid to `now`; the caller records an admitted request (the in-process window, or the shared one of
    serve/shared_limits.py)."""
    budget, used = key.token_budget, key.tokens_used
    if budget is not None and (used >= budget or used + estimated_tokens > budget):
        return Decision(
            False,
            None,
            f"key '{key.name}' has used {used} of its budget of {budget} tokens and this request may "
            f"need up to {estimated_tokens}; ask for a larger budget or a new key",
        )
    rpm = key.requests_per_minute
    if rpm is not None and len(window.requests) >= rpm:
        # Room comes when all but rpm - 1 of the requests in the window have left it.
        retry = _seconds(window.requests[len(window.requests) - rpm] + WINDOW_S - now)
        return Decision(
            False, retry, f"key '{key.name}' is limited to {rpm} requests per minute; retry in {retry} s"
        )
    tpm = key.tokens_per_minute
    if tpm is not None:
        if estimated_tokens > tpm:
            return Decision(
                False,
                None,
                f"this request may need up to {estimated_tokens} tokens, more than the {tpm} tokens per "
                f"minute of key '{key.name}'; lower max_tokens or shorten the prompt",
            )
        excess = window.token_sum + estimated_tokens - tpm
        if excess > 0:
            # Room comes when the oldest tokens, enough of them to cover the excess, have left.
            for finished, tokens in window.tokens:  # noqa: B007 (used after the loop)
                excess -= tokens
                if excess <= 0:
                    break
            retry = _seconds(finished + WINDOW_S - now)
            return Decision(
                False,
                retry,
                f"key '{key.name}' is limited to {tpm} tokens per minute; retry in {retry} s",
            )
    return Decision(True)


class RateLimiter:
    """Admits or refuses each key's requests; `clock` (seconds, monotonic) is replaceable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._windows: defaultdict[str, Window] = defaultdict(Window)

    def admit(self, key: ApiKey, estimated_tokens: int = 0) -> Decision:
        """`decide`; an admitted request counts towards requests per minute at once."""
        now = self.clock()
        window = self._windows[key.name]
        window.slide(now)
        decision = decide(window, key, estimated_tokens, now)
        if decision.allowed and key.requests_per_minute is not None:
            window.requests.append(now)
        return decision

    def record(self, key: ApiKey, tokens: int) -> None:
        """Charge a finished request's real token count to the tokens-per-minute window.

        The budget is counted by `KeyStore.record_usage`, which persists it: call both."""
        if key.tokens_per_minute is not None:
            window = self._windows[key.name]
            window.tokens.append((self.clock(), tokens))
            window.token_sum += tokens


def _seconds(delay: float) -> int:
    return max(1, math.ceil(delay))
