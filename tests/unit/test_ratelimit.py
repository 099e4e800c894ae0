import pytest

from hypergen.api.ratelimit import RateLimiter, format_reset
from hypergen.config import parse_rate_limit
from hypergen.errors import OpenAIError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rules_parse_requests_and_image_budgets():
    rules = parse_rate_limit("60/minute, 5/second,200 images/hour")
    assert [(r.limit, r.window_s, r.unit) for r in rules] == [(60, 60, "requests"), (5, 1, "requests"), (200, 3600, "images")]
    assert parse_rate_limit(None) == [] and parse_rate_limit("") == []


@pytest.mark.parametrize("text", ["60", "60/week", "x/minute", "0/second", "10 tokens/minute"])
def test_bad_rules_are_refused(text):
    with pytest.raises(ValueError, match="is not like"):
        parse_rate_limit(text)


def test_requests_over_the_limit_get_429_with_openai_headers_and_the_window_slides():
    clock = Clock()
    limiter = RateLimiter(parse_rate_limit("3/minute"), clock)
    headers = [limiter.acquire("alice", "requests") for _ in range(3)]
    assert [h["x-ratelimit-remaining-requests"] for h in headers] == ["2", "1", "0"]
    clock.now += 20
    with pytest.raises(OpenAIError) as caught:
        limiter.acquire("alice", "requests")
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert error.headers["Retry-After"] == "40" and error.headers["x-ratelimit-reset-requests"] == "40s"
    assert limiter.acquire("bob", "requests")["x-ratelimit-remaining-requests"] == "2"  # other keys unaffected
    clock.now += 40
    assert limiter.acquire("alice", "requests")["x-ratelimit-remaining-requests"] == "2"  # all three expired


def test_image_budgets_are_charged_by_n_and_a_refusal_charges_nothing():
    clock = Clock()
    limiter = RateLimiter(parse_rate_limit("100/minute,5 images/hour"), clock)
    limiter.acquire("k", "images", 3)
    with pytest.raises(OpenAIError) as caught:
        limiter.acquire("k", "images", 3)
    assert caught.value.type == "images" and caught.value.headers["x-ratelimit-remaining-images"] == "2"
    assert limiter.acquire("k", "images", 2)["x-ratelimit-remaining-images"] == "0"
    assert limiter.acquire("k", "requests")["x-ratelimit-remaining-requests"] == "99"


def test_the_tightest_rule_reports_headers():
    limiter = RateLimiter(parse_rate_limit("100/minute,2/second"), Clock())
    headers = limiter.acquire("k", "requests")
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "1"


@pytest.mark.parametrize("seconds, text", [(0.2, "1s"), (59, "59s"), (360, "6m0s"), (3723, "1h2m3s")])
def test_reset_durations_read_like_openai(seconds, text):
    assert format_reset(seconds) == text
