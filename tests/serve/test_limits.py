"""Rate limits over a sliding minute, with a clock the test moves by hand."""

from llmasos.serve.keys import ApiKey
from llmasos.serve.limits import RateLimiter


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(**limits):
    clock = Clock()
    return RateLimiter(clock=clock), clock, ApiKey(name="alice", hash="sha256:x", **limits)


def test_no_limits_admits_everything():
    limiter, _, key = make()
    for _ in range(1000):
        assert limiter.admit(key, 10_000).allowed
        limiter.record(key, 10_000)


def test_requests_per_minute_slides():
    limiter, clock, key = make(requests_per_minute=3)
    for t in (0, 10, 20):
        clock.now = 1000 + t
        assert limiter.admit(key).allowed
    clock.now = 1030
    refused = limiter.admit(key)
    assert not refused.allowed and refused.retry_after == 30  # the request at t=0 leaves at t=60
    assert "3 requests per minute" in refused.message and "alice" in refused.message
    clock.now = 1059.5
    assert limiter.admit(key).retry_after == 1  # never 0: rounded up
    clock.now = 1060
    assert limiter.admit(key).allowed  # t=0 left the window; the window now holds 10, 20, 60
    clock.now = 1065
    assert limiter.admit(key).retry_after == 5  # t=10 leaves at t=70


def test_refused_requests_do_not_count():
    limiter, clock, key = make(requests_per_minute=1)
    assert limiter.admit(key).allowed
    for _ in range(10):
        clock.now += 1
        assert not limiter.admit(key).allowed
    clock.now = 1060
    assert limiter.admit(key).allowed


def test_tokens_per_minute():
    limiter, clock, key = make(tokens_per_minute=1000)
    assert limiter.admit(key, 300).allowed
    limiter.record(key, 400)  # the real count, at t=0
    clock.now = 1020
    assert limiter.admit(key, 300).allowed
    limiter.record(key, 500)  # t=20; 900 in the window
    clock.now = 1030
    assert limiter.admit(key, 100).allowed
    refused = limiter.admit(key, 200)
    assert not refused.allowed and "1000 tokens per minute" in refused.message
    assert refused.retry_after == 30  # the 400 at t=0 must leave
    refused = limiter.admit(key, 700)
    assert refused.retry_after == 50  # both 400 (t=0) and 500 (t=20) must leave
    clock.now = 1060
    assert limiter.admit(key, 500).allowed and not limiter.admit(key, 600).allowed
    clock.now = 1080
    assert limiter.admit(key, 1000).allowed


def test_request_larger_than_tokens_per_minute_is_refused_for_good():
    limiter, _, key = make(tokens_per_minute=1000)
    refused = limiter.admit(key, 1001)
    assert not refused.allowed and refused.retry_after is None
    assert "lower max_tokens" in refused.message


def test_token_budget():
    limiter, _, key = make(token_budget=1000, tokens_used=900)
    assert limiter.admit(key, 100).allowed
    refused = limiter.admit(key, 101)
    assert not refused.allowed and refused.retry_after is None
    assert "900 of its budget of 1000" in refused.message
    key.tokens_used = 1000  # as KeyStore.record_usage does
    assert not limiter.admit(key).allowed


def test_budget_is_checked_first_then_rpm_then_tpm():
    limiter, _, key = make(requests_per_minute=1, tokens_per_minute=100, token_budget=10, tokens_used=10)
    assert "budget" in limiter.admit(key).message
    key.token_budget = None
    assert limiter.admit(key, 50).allowed
    limiter.record(key, 100)
    assert "requests per minute" in limiter.admit(key).message
    key.requests_per_minute = None
    assert "tokens per minute" in limiter.admit(key, 1).message


def test_keys_are_limited_separately():
    limiter, _, alice = make(requests_per_minute=1)
    bob = ApiKey(name="bob", hash="sha256:y", requests_per_minute=1)
    assert limiter.admit(alice).allowed and limiter.admit(bob).allowed
    assert not limiter.admit(alice).allowed and not limiter.admit(bob).allowed
