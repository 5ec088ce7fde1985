"""The soak, short form (the long form: `python -m benchmarks.soak`, figures in docs/reliability.md)."""
import pytest

from benchmarks.soak import run_soak


def check(report: dict, planned: int) -> None:
    assert report["requests_done"] == planned, "the soak did not finish within its time limit"
    # A string, not a tuple: pytest prints a message string whole (a tuple's repr is cut).
    assert report["num_errors"] == 0, "\n".join(report["errors"]) + "\n--- server log:\n" + report["server_log_tail"]
    assert report["num_wrong"] == 0, report["wrong"]
    outcomes = report["outcomes"]
    # hostile requests (every kind in a short soak): refused with a 4xx, or harmless, never accepted
    assert outcomes.get("bad:refused", 0) > 0 and "bad:accepted" not in outcomes, outcomes
    assert outcomes.get("stream:cancelled", 0) + outcomes.get("adk:cancelled", 0) > 0
    # The server saw the cancellations: its abort count, not only the clients' word.
    assert 0 < report["server_aborts"] <= report["client_cancels"], (report["server_aborts"], report["client_cancels"])
    assert report["running_at_end"] == 0 and report["waiting_at_end"] == 0
    assert report["kv_usage_at_end"] == 0.0  # zero KV blocks leaked
    assert report["rss_growth"] < 0.10


def test_soak_short():
    check(run_soak(num_requests=240, concurrency=64, seed=1, time_limit=240, progress=False), 240)


@pytest.mark.slow
def test_soak_long():
    check(run_soak(num_requests=1200, concurrency=64, seed=2, time_limit=900, progress=False), 1200)
