"""Asynchronous rollouts with a staleness bound, as in AReaL ("AReaL: A Large-Scale Asynchronous
Reinforcement Learning System for Language Reasoning", Fu et al., 2025).

A rollout worker process generates batches continuously with the newest policy weights it has
received, while the trainer updates. Versions: the trainer's version k is the number of optimizer
updates done; the trainer consumes rollout batch b to make update b (version b -> b+1). A batch
generated with policy version v is used at trainer version k = b, and AReaL allows that only if
k - v <= eta (max_staleness). Like AReaL's rollout capacity rule, we enforce it on the generating
side: the worker may start batch b only once it holds a policy of version v >= b - eta, so it runs
at most eta batches ahead of the trainer. eta = 0 is synchronous: batch b is generated with exactly
version b, after the trainer published it.

    with AsyncRollouts(build_model, rollout_fn, lora_state(model), max_staleness=2,
                       total_batches=steps) as rollouts:
        for step in range(steps):
            b, v, batch = rollouts.next_batch()          # b == step, step - v <= 2
            ...loss on batch (decoupled PPO corrects for v != step), optimizer.step()...
            rollouts.publish(lora_state(model), step + 1)  # publish after EVERY update

`build_model` and `rollout_fn` cross into a spawned process, so they must be picklable: top-level
functions of an importable module (or functools.partial of one), not lambdas or closures. The worker
calls `build_model()` once, loads `initial_state`, then `model.load_state_dict(state, strict=False)`
for each newer published state (publish only the trainable tensors, e.g. LoRA, to keep it cheap).

Resume: a trainer restarted at version s passes start_batch=s, start_version=s and the state of
version s; the worker re-generates batches from s. With eta = 0 and a rollout_fn seeded only by
(batch_index, weights) the resumed run is bit-identical to an uninterrupted one. With eta > 0 the
version a batch is generated with depends on timing (any of b - eta .. b), so even uninterrupted
runs differ; a resumed run keeps the bound, nothing more.
"""

from __future__ import annotations

import pickle
import queue
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from slimforge import SlimforgeError

_POLL_S = 0.05  # how often blocked waits look at the stop flag / the other process being alive
_JOIN_S = 5.0  # grace given to the worker on shutdown before terminate()


def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def _worker(build_model, rollout_fn, state, version, start_batch, total_batches, max_staleness,
            threads, weights_q, results_q, stop) -> None:
    """The rollout process: wait for the bound, take the newest weights, generate, hand over."""
    # Ctrl-C goes to the whole process group; let the trainer handle it and stop us cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    waits, wait_s = 0, 0.0
    try:
        model = build_model()
        _load(model, state)
        pending = None  # newest state received but not yet loaded
        for b in range(start_batch, total_batches):
            t0, waited = time.perf_counter(), False
            while True:
                try:  # drain to the newest published state without blocking...
                    while True:
                        version, pending = weights_q.get_nowait()
                except queue.Empty:
                    pass
                if version >= b - max_staleness:
                    break
                waited = True  # ...or block until the trainer catches up (the staleness bound)
                if stop.is_set() or not _parent_alive():
                    return
                try:
                    version, pending = weights_q.get(timeout=_POLL_S)
                except queue.Empty:
                    pass
            if waited:
                waits, wait_s = waits + 1, wait_s + time.perf_counter() - t0
            if pending is not None:
                _load(model, pending)
                pending = None
            result = rollout_fn(model, b, version)
            results_q.put(("ok", b, version, result, waits, wait_s))
    except BaseException:  # noqa: BLE001 - everything goes back to the trainer as text
        results_q.put(("error", traceback.format_exc()))
    finally:
        # Stay alive until told to stop: tensors in results are shared memory whose file
        # descriptors the trainer fetches from this process when it unpickles them.
        while not stop.wait(_POLL_S) and _parent_alive():
            pass
        results_q.cancel_join_thread()  # results nobody will read must not block our exit


def _load(model: nn.Module, state: dict[str, Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # strict=False would silently ignore a misspelt name
        raise SlimforgeError(f"published weights name tensors the rollout model lacks: "
                             f"{result.unexpected_keys[:5]}; publish model.state_dict() names")


class AsyncRollouts:
    """Context manager around one rollout worker process (torch.multiprocessing, spawn). The worker
    loops: wait until the staleness bound allows batch b -> load the newest published weights ->
    rollout_fn(model, b, version) -> put (b, version, result) on a queue. `result` may be any
    picklable object; its CPU tensors travel through shared memory. Keep results on CPU (CUDA
    tensors would only stay valid while the worker lives)."""

    def __init__(self, build_model: Callable[[], nn.Module], rollout_fn: Callable[[nn.Module, int, int], Any],
                 initial_state: dict[str, Tensor], max_staleness: int, total_batches: int,
                 start_batch: int = 0, start_version: int = 0, threads: int = 1):
        if max_staleness < 0:
            raise SlimforgeError(f"max_staleness must be >= 0 (0 is synchronous), got {max_staleness}")
        if not 0 <= start_batch <= total_batches:
            raise SlimforgeError(f"start_batch must be in [0, total_batches={total_batches}], got {start_batch}")
        if start_batch - max_staleness > start_version:
            raise SlimforgeError(f"start_batch - max_staleness ({start_batch} - {max_staleness}) must be <= "
                                 f"start_version ({start_version}): batch {start_batch} could never start")
        self.max_staleness, self.total_batches, self.threads = max_staleness, total_batches, threads
        self._args = (build_model, rollout_fn, _cpu_copy(initial_state), start_version, start_batch)
        self._next = start_batch
        self._version = start_version
        self._failed: str | None = None
        self._worker_waits, self._worker_wait_s, self._trainer_wait_s = 0, 0.0, 0.0
        self._staleness: Counter[int] = Counter()
        self.process: mp.Process | None = None

    def __enter__(self) -> AsyncRollouts:
        ctx = mp.get_context("spawn")  # fork would copy the trainer's threads and CUDA state
        self._weights_q, self._results_q, self._stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        build_model, rollout_fn, state, version, start = self._args
        self.process = ctx.Process(
            target=_worker, daemon=True, name="slimforge-rollouts",
            args=(build_model, rollout_fn, state, version, start, self.total_batches, self.max_staleness,
                  self.threads, self._weights_q, self._results_q, self._stop))
        try:
            self.process.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:  # pickled before the child exists
            self.process = None
            raise SlimforgeError(f"build_model and rollout_fn must be picklable top-level callables "
                                 f"(spawn): {e}") from e
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker: ask, wait _JOIN_S, then terminate (a rollout_fn cannot be interrupted)."""
        if self.process is None:
            return
        self._stop.set()
        self._weights_q.cancel_join_thread()  # unread states must not block the trainer's exit
        self.process.join(_JOIN_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(_JOIN_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def publish(self, state: dict[str, Tensor], version: int) -> None:
        """Hand the worker the weights of `version` (call after every update: the worker learns the
        trainer's version only from here). Tensors are copied to CPU first: queueing moves a tensor's
        storage into shared memory in place, and the trainer keeps updating its own tensors."""
        if version <= self._version:
            raise SlimforgeError(f"published versions must increase: got {version} after {self._version}")
        self._version = version
        self._weights_q.put((version, _cpu_copy(state)))

    def next_batch(self, timeout: float | None = None) -> tuple[int, int, Any]:
        """The next (batch_index, version, result), in batch order. Raises SlimforgeError with the
        worker's traceback if it failed, TimeoutError if nothing came within `timeout` seconds."""
        if self.process is None:
            raise SlimforgeError("AsyncRollouts.next_batch outside its `with` block")
        if self._failed is not None:
            raise SlimforgeError(f"rollout worker failed earlier:\n{self._failed}")
        if self._next >= self.total_batches:
            raise SlimforgeError(f"all {self.total_batches} rollout batches were already handed out")
        t0 = time.perf_counter()
        while True:
            try:
                msg = self._results_q.get(timeout=_POLL_S)
                break
            except queue.Empty:
                pass
            if not self.process.is_alive():
                raise SlimforgeError(f"rollout worker died (exit code {self.process.exitcode}) "
                                     f"before batch {self._next}")
            if timeout is not None and time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"no rollout batch {self._next} within {timeout} s")
        self._trainer_wait_s += time.perf_counter() - t0
        if msg[0] == "error":
            self._failed = msg[1]
            raise SlimforgeError(f"rollout worker failed at batch {self._next}:\n{msg[1]}")
        _, b, version, result, self._worker_waits, self._worker_wait_s = msg
        assert b == self._next, f"rollout batches out of order: {b} after {self._next - 1}"
        self._next += 1
        self._staleness[self._version - version] += 1
        return b, version, result

    @property
    def stats(self) -> dict:
        """worker_waits / worker_wait_s: batches the worker held back for the bound and the seconds
        it waited (as of the last batch handed out); trainer_wait_s: seconds next_batch waited;
        staleness: {trainer version at hand-out - generating version: number of batches}."""
        return {"batches": sum(self._staleness.values()), "worker_waits": self._worker_waits,
                "worker_wait_s": self._worker_wait_s, "trainer_wait_s": self._trainer_wait_s,
                "staleness": dict(sorted(self._staleness.items()))}


def _cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in state.items()}
