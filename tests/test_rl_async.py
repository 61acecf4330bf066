"""AReaL-style asynchronous rollouts: the staleness bound, synchrony at eta=0, running ahead,
newest weights, worker errors, shutdown and resume. Each worker is a spawned process that imports
torch (~2-3 s on a busy 2-core machine), so one run covers both a slow and a fast trainer."""

from __future__ import annotations

import functools
import time

import pytest
import torch

from slimforge import SlimforgeError
from slimforge.rl.asynchronous import AsyncRollouts
from tests.rl_async_helpers import build_linear, record_rollout, weight_state

SLOW, FAST = 6, 6  # steps of each phase


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
def test_staleness_bound_slow_then_fast_trainer(eta):
    """Steps 0-5: the trainer sleeps, rollouts are instant (the worker is held back by the bound).
    Steps 6-11: the trainer is instant, rollouts sleep (the trainer waits on the queue).
    A fake update k -> k+1 publishes weight = k+1, so the weight a batch saw tells its version."""
    fn = functools.partial(record_rollout, delay=0.05, slow_from=SLOW)
    seen = []
    with AsyncRollouts(build_linear, fn, weight_state(0), max_staleness=eta, total_batches=SLOW + FAST) as rollouts:
        for k in range(SLOW + FAST):
            b, v, res = rollouts.next_batch(timeout=30)
            seen.append((k, b, v, res))
            if k < SLOW:
                time.sleep(0.08)
            if k == SLOW - 1:
                after_slow = rollouts.stats
            rollouts.publish(weight_state(k + 1), k + 1)
        stats = rollouts.stats
    assert not rollouts.process.is_alive()

    assert [b for _, b, _, _ in seen] == list(range(SLOW + FAST))  # batch order
    staleness = [k - v for k, _, v, _ in seen]
    assert all(0 <= s <= eta for s in staleness), staleness  # the bound, in both phases
    for _, b, v, res in seen:  # generated with the newest weights the worker had: version v's
        assert res["version"] == v and res["weight"] == float(v)
        assert torch.equal(res["tokens"], torch.arange(4) + b)
    assert stats["staleness"] == dict(sorted((s, staleness.count(s)) for s in set(staleness)))
    if eta == 0:  # synchronous: every batch from exactly the current policy
        assert staleness == [0] * (SLOW + FAST)
    else:  # a slow trainer lets the worker run ahead: batches generated with an older policy
        assert max(staleness[:SLOW]) > 0
    assert after_slow["worker_waits"] >= 1 and after_slow["worker_wait_s"] > 0.05  # held by the bound
    # the fast trainer waits for (at least) the rollouts not generated ahead: 0.05 s each
    assert stats["trainer_wait_s"] - after_slow["trainer_wait_s"] > 0.5 * (FAST - eta) * 0.05


def test_worker_error_surfaces_and_process_ends():
    fn = functools.partial(record_rollout, fail_at=2)
    with (pytest.raises(SlimforgeError, match="boom at batch 2") as err,
          AsyncRollouts(build_linear, fn, weight_state(0), max_staleness=1, total_batches=5) as rollouts):
        for k in range(5):
            rollouts.next_batch(timeout=30)
            rollouts.publish(weight_state(k + 1), k + 1)
    assert "ValueError" in str(err.value)  # the worker's traceback text
    assert not rollouts.process.is_alive()


def test_resume_starts_at_start_batch_and_version():
    with AsyncRollouts(build_linear, record_rollout, weight_state(3), max_staleness=0, total_batches=5,
                       start_batch=3, start_version=3) as rollouts:
        b, v, res = rollouts.next_batch(timeout=30)
        rollouts.publish(weight_state(4), 4)
        assert (b, v, res["weight"]) == (3, 3, 3.0)
        b, v, res = rollouts.next_batch(timeout=30)
        assert (b, v, res["weight"]) == (4, 4, 4.0)
        with pytest.raises(SlimforgeError, match="already handed out"):
            rollouts.next_batch(timeout=30)
    assert not rollouts.process.is_alive()


def test_bad_arguments_fail_before_starting():
    with pytest.raises(SlimforgeError, match="max_staleness"):
        AsyncRollouts(build_linear, record_rollout, weight_state(0), max_staleness=-1, total_batches=3)
    with pytest.raises(SlimforgeError, match="start_version"):
        AsyncRollouts(build_linear, record_rollout, weight_state(0), max_staleness=0, total_batches=9,
                      start_batch=3, start_version=1)
    with (pytest.raises(SlimforgeError, match="picklable"),
          AsyncRollouts(lambda: torch.nn.Linear(1, 1, bias=False), record_rollout, weight_state(0),
                        max_staleness=0, total_batches=1)):
        pass
