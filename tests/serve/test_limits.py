"""Rate limits over a sliding minute, with a clock the test moves by hand."""

from llmasos.serve.keys import ApiKey
from llmasos.serve.limits import RateLimiter
from llmasos.serve.shared_limits import SharedRateLimiter


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


# -- the windows shared by the replicas of one server (a SQLite file) -----------------------------------
def shared(tmp_path, clock, count=2):
    return [SharedRateLimiter(tmp_path / "limits.sqlite", clock=clock) for _ in range(count)]


def test_replicas_share_one_requests_window_and_a_restarted_one_keeps_it(tmp_path):
    clock = Clock()
    first, second = shared(tmp_path, clock)
    key = ApiKey(name="alice", hash="sha256:x", requests_per_minute=3)
    assert [first.admit(key).allowed, second.admit(key).allowed, first.admit(key).allowed] == [True] * 3
    refused = second.admit(key)
    assert not refused.allowed and refused.retry_after == 60 and "3 requests per minute" in refused.message
    second.close()
    restarted = SharedRateLimiter(tmp_path / "limits.sqlite", clock=clock)
    clock.now += 30
    assert restarted.admit(key).retry_after == 30  # the window survived the replica
    clock.now += 30
    assert restarted.admit(key).allowed and first.admit(key).allowed and first.admit(key).allowed
    assert not restarted.admit(key).allowed


def test_replicas_share_one_tokens_window(tmp_path):
    clock = Clock()
    first, second = shared(tmp_path, clock)
    key = ApiKey(name="bob", hash="sha256:y", tokens_per_minute=1000)
    assert first.admit(key, 300).allowed
    first.record(key, 600)
    clock.now += 10
    assert second.admit(key, 400).allowed
    second.record(key, 350)  # 950 in the window, charged by two replicas
    refused = first.admit(key, 100)
    assert not refused.allowed and refused.retry_after == 50 and "1000 tokens per minute" in refused.message
    other = ApiKey(name="carol", hash="sha256:z", tokens_per_minute=1000)
    assert second.admit(other, 1000).allowed  # keys apart, in the shared file too
    clock.now += 50
    assert second.admit(key, 600).allowed


def test_a_shared_limiter_made_in_one_thread_serves_another(tmp_path):
    """A server's event loop may run in another thread than the one that made its gateway."""
    from concurrent.futures import ThreadPoolExecutor

    (limiter,) = shared(tmp_path, Clock(), count=1)
    key = ApiKey(name="erin", hash="sha256:e", requests_per_minute=1)
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(limiter.admit, key).result().allowed
    assert not limiter.admit(key).allowed


def test_concurrent_replicas_never_admit_more_than_the_limit(tmp_path):
    """Replica processes racing for the last places: the IMMEDIATE transaction admits exactly R."""
    import multiprocessing

    path = tmp_path / "limits.sqlite"
    SharedRateLimiter(path).close()  # the schema, before the racers open it
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        admitted = pool.starmap(_admit_many, [(str(path), 25)] * 4)
    assert sum(admitted) == 40


def _admit_many(path: str, tries: int) -> int:
    limiter = SharedRateLimiter(path)
    key = ApiKey(name="dave", hash="sha256:d", requests_per_minute=40)
    return sum(limiter.admit(key).allowed for _ in range(tries))
