"""The rl benchmark script end to end on a tiny CPU model: every measurement runs and lands in the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from slimforge import SlimforgeError
from stages.rl.bench_rollout import main

TINY = ["--shape", "tiny", "--device", "cpu", "--batch", "8", "--group", "4", "--prompt-len", "6",
        "--new-tokens", "5", "--repeats", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Decoding is hundreds of tiny ops: a second OpenMP thread only adds waiting on a busy box."""
    old, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_tiny_cpu_run_writes_every_number(tmp_path):
    path = tmp_path / "bench.json"
    out = main([*TINY, "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(out))
    for key in ("command", "commit", "gpu", "torch", "triton", "transformers", "date"):
        assert key in saved, key
    assert saved["command"].startswith("python -m stages.rl.bench_rollout --shape tiny")
    assert saved["gpu"] == "cpu"
    (r,) = saved["results"]
    assert (r["shape"], r["batch"], r["group"], r["prompts"], r["new_tokens"]) == ("tiny", 8, 4, 2, 5)
    for key in ("rollout_tokens_per_s", "generate_tokens_per_s", "rollout_lora_tokens_per_s", "train_tokens_per_s"):
        assert r[key] > 0, key
    # tokens/s are batch * new_tokens over the measured seconds: every row made exactly new_tokens
    assert r["rollout_tokens_per_s"] == pytest.approx(8 * 5 / r["rollout_s"])
    assert r["train_tokens_per_s"] == pytest.approx(8 * 5 / r["train_s"])
    # trained on prompt + completion tokens, all real (no padding: equal prompts, no early EOS)
    assert r["train_all_tokens_per_s"] == pytest.approx(8 * (6 + 5) / r["train_s"])
    assert r["rollout_vs_generate"] == pytest.approx(r["rollout_tokens_per_s"] / r["generate_tokens_per_s"])
    assert 0 < r["prefill_s"] < r["rollout_s"] and r["decode_s"] > 0
    assert r["decode_step_s"] > 0 and r["decode_step_b1_s"] > 0 and 0 < r["fixed_cost_share"] <= 1
    # rank 16 on all 7 projections of 2 layers (hidden 64, 4/2 heads of 16, MLP 128): 16 * sum(in + out)
    per_layer = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)
    assert r["trainable_params_m"] * 1e6 == pytest.approx(2 * 16 * per_layer)
    assert r["graph_decode_tokens_per_s"] is None and r["train_peak_gib"] is None  # CUDA-only numbers


def test_batch_must_split_into_groups():
    with pytest.raises(SlimforgeError, match="multiple of --group"):
        main([*TINY[:4], "--batch", "10", "--group", "4"])
