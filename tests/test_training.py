"""Training loop: schedule, batching, and exact resume after an interruption."""

import pytest
import torch

from slimforge.batching import collate, encode_records, epoch_batches
from slimforge.checkpoint import load_checkpoint
from slimforge.tasks.records import load_records
from slimforge.config import Schedule
from slimforge.training import make_optimizer, make_scheduler, train_causal_lm
from tests.helpers import tiny_model


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    optimizer = make_optimizer(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_epoch_batches_deterministic_grouped_and_complete():
    lengths = [5] * 50 + [20] * 30 + [40] * 21
    a = epoch_batches(lengths, 8, seed=0, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=0, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=0, epoch=1)
    assert all(len(b) == 8 for b in a)
    assert all(len({(lengths[i] - 1) // 16 for i in b}) == 1 for b in a)  # one length class per batch
    assert len({i for b in a for i in b}) == 8 * len(a)  # no example twice in an epoch
    assert len(a) == 50 // 8 + 30 // 8 + 21 // 8  # only each class's partial batch is dropped
    kinds = ["task"] * 60 + ["judge"] * 41
    b = epoch_batches(lengths, 8, seed=0, epoch=0, groups=kinds)
    assert all(len({kinds[i] for i in batch}) == 1 for batch in b)  # groups override length bands
    assert any(len({lengths[i] for i in batch}) > 1 for batch in b)


def test_collate_masks_prompt_and_padding(tokenizer):
    ex = encode_records([{"prompt": "1+1=", "response": "2"}, {"prompt": "10+10=", "response": "20"}], tokenizer)
    batch = collate(ex, tokenizer.pad_token_id)
    ids, n_prompt = ex[0]
    assert batch["labels"][0, :n_prompt].eq(-100).all()
    assert batch["labels"][0, n_prompt:len(ids)].tolist() == ids[n_prompt:]
    assert batch["labels"][0, len(ids):].eq(-100).all() and batch["attention_mask"][0, len(ids):].eq(0).all()


class Interrupt(Exception):
    pass


def _train(model, examples, ckpt, tokenizer, on_log=None):
    schedule = Schedule(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.01,
                        grad_clip=1.0, checkpoint_every=4)
    return train_causal_lm(model, examples, schedule, pad_id=tokenizer.pad_token_id, seed=0, checkpoint_dir=ckpt,
                           fingerprint="fp", on_log=on_log, log_every=1, progress=False)


def test_resume_after_interruption_is_exact(tokenizer, suite_dir, tmp_path):
    examples = encode_records(load_records(suite_dir / "train.jsonl")[:100], tokenizer)
    straight = tiny_model("llama", tokenizer, seed=1)
    ref = _train(straight, examples, tmp_path / "a", tokenizer)

    def crash(step, _):
        if step == 7:
            raise Interrupt

    first = tiny_model("llama", tokenizer, seed=1)
    with pytest.raises(Interrupt):
        _train(first, examples, tmp_path / "b", tokenizer, on_log=crash)
    assert load_checkpoint(tmp_path / "b", "fp")["step"] == 4
    assert load_checkpoint(tmp_path / "b", "other run") is None  # a stale checkpoint is ignored
    resumed_model = tiny_model("llama", tokenizer, seed=99)  # different init: the checkpoint must win
    resumed = _train(resumed_model, examples, tmp_path / "b", tokenizer)
    assert resumed["resumed_from"] == 4
    assert resumed["losses"] == pytest.approx(ref["losses"], abs=1e-6)
    for p, q in zip(straight.parameters(), resumed_model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_small_length_skewed_set_trains_instead_of_failing(tokenizer, tmp_path):
    """40 rows in length bands none of which fills a batch of 32: batches then mix the bands."""
    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(30)]
    rows += [{"prompt": "1+" * 20 + "1=", "response": "21"} for _ in range(10)]
    examples = encode_records(rows, tokenizer)
    schedule = Schedule(steps=3, batch_size=32, lr=1e-3, warmup_steps=1, checkpoint_every=0)
    out = train_causal_lm(tiny_model("llama", tokenizer), examples, schedule, pad_id=tokenizer.pad_token_id, seed=0,
                          checkpoint_dir=tmp_path, fingerprint="small", progress=False)
    assert len(out["losses"]) == 3 and all(loss > 0 for loss in out["losses"])
    assert out["tokens"] >= 3 * 32 * 4  # three full batches of 32 sequences, each at least 4 tokens
