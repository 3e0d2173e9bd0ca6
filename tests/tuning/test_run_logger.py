"""RunLogger (the background MLflow writer): a flush waits for every write queued before it,
however long they take while they make progress, and a server that is gone for good costs one
retry window, not one per queued write."""

from __future__ import annotations

import time

import pytest

from tests.conftest import free_port
from tuning.tracking import RunLogger


def test_flush_waits_for_slow_writes_past_its_timeout(mlflow_uri: str) -> None:
    logger = RunLogger(mlflow_uri)
    try:
        def slow_create(c: object, i: int) -> None:
            time.sleep(1.5)
            c.create_experiment(f"slow-{i}")  # type: ignore[attr-defined]

        for i in range(3):
            logger.submit(lambda c, i=i: slow_create(c, i))
        start = time.monotonic()
        logger.flush(timeout=0.5)  # a stall limit: the writes keep making progress
        waited = time.monotonic() - start
        names = {e.name for e in logger.client.search_experiments()}
        assert {"slow-0", "slow-1", "slow-2"} <= names, names
        assert waited >= 4.0, waited
    finally:
        logger.close()


def test_a_gone_server_costs_one_retry_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = RunLogger(f"http://127.0.0.1:{free_port()}", retry_window_s=6.0, backoff_s=0.5)
    for i in range(6):
        logger.submit(lambda c, i=i: c.create_experiment(f"lost-{i}"))
    start = time.monotonic()
    logger.close(timeout=60)
    elapsed = time.monotonic() - start
    assert len(logger.errors) == 6, logger.errors
    # the first write retries for the window (0.5 + 1 + 2 s of sleeps, then the next would pass
    # it); the other five get one try each (without that, each would cost the same 3.5 s)
    assert elapsed < 10.0, elapsed
    assert not logger._thread.is_alive()
