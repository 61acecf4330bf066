"""RL rollouts: KV-cache sampling (against generate, its own log-probs, known distributions) and LATR
tree rollouts on a toy model whose next-token table is known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slimforge import SlimforgeError
from slimforge.batching import left_pad, prompt_ids
from slimforge.rl.latr import latr_sample, latr_share, normalized_edit_distance
from slimforge.rl.rollout import Rollouts, sample, sequence_logprobs
from tests.helpers import tiny_model

PAD, BOS, EOS = 0, 1, 2
NEVER = -30.0  # a logit whose token is never drawn in practice


class TableLM(nn.Module):
    """Next-token logits looked up by the last token: a model whose distributions we know. It
    ignores the cache (a table keyed by one token needs none), so `sample` runs on it too."""

    def __init__(self, rows: dict[int, dict[int, float]], vocab: int = 8):
        super().__init__()
        self.table = nn.Parameter(torch.full((vocab, vocab), NEVER), requires_grad=False)
        for prev, probs in rows.items():
            for tok, p in probs.items():
                self.table.data[prev, tok] = math.log(p)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Decoding is hundreds of tiny ops: a second OpenMP thread only adds waiting (100x on a busy box)."""
    old, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


PROMPTS = ["1+2=", "12+345=", "7*8=", "100-99="]


def _rollout_invariants(r: Rollouts, prompts: list[list[int]], g: int, version: int) -> None:
    assert len(r) == len(prompts) * g
    assert r.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(g)]
    assert r.logprobs.dtype == torch.float32 and r.versions.dtype == torch.int64
    assert not (r.completion_mask & (r.attention_mask == 0)).any()
    assert torch.equal(r.versions, torch.where(r.completion_mask, version, -1))
    assert (r.logprobs[~r.completion_mask] == 0).all() and (r.logprobs[r.completion_mask] <= 0).all()
    for row in range(len(r)):
        real_prompt = (r.attention_mask[row] == 1) & ~r.completion_mask[row]
        assert r.input_ids[row][real_prompt].tolist() == prompts[r.prompt_index[row]]


def test_greedy_matches_generate_and_layout(tokenizer):
    model = tiny_model("llama", tokenizer, tie=False)  # tied, a random model only repeats its last token
    ids = prompt_ids(tokenizer, PROMPTS)
    # batch_size 4 with G=2: two prompts per chunk, so chunks are padded differently and re-joined
    r = sample(model, ids, num_generations=2, max_new_tokens=6, temperature=0.0, eos_id=tokenizer.eos_token_id,
               pad_id=tokenizer.pad_token_id, version=7, batch_size=4, tokenizer=tokenizer)
    _rollout_invariants(r, ids, 2, 7)
    x, mask = left_pad(ids, tokenizer.pad_token_id)
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in out[:, x.shape[1]:].tolist()]
    assert len({tuple(e) for e in expected}) == len(expected)  # the prompts really lead apart
    assert r.completion_ids() == [e for e in expected for _ in range(2)]
    assert r.completions == [tokenizer.decode([t for t in e if t != eos], skip_special_tokens=True)
                             for e in expected for _ in range(2)]


def _eos_hook(model, tokenizer, bias: float):
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer.eos_token_id] = bias
    return model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)


def test_forced_eos_gives_one_token_completions(tokenizer):
    model = tiny_model("llama", tokenizer)
    _eos_hook(model, tokenizer, 100.0)
    ids = prompt_ids(tokenizer, PROMPTS)
    r = sample(model, ids, num_generations=3, max_new_tokens=5, eos_id=tokenizer.eos_token_id,
               pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0), tokenizer=tokenizer)
    assert r.input_ids.shape[1] == max(len(p) for p in ids) + 1  # stopped after one step
    assert r.completion_ids() == [[tokenizer.eos_token_id]] * len(r)
    assert r.completions == [""] * len(r)


def test_rows_stop_at_eos_and_nothing_follows(tokenizer):
    model = tiny_model("llama", tokenizer)
    _eos_hook(model, tokenizer, 5.0)  # EOS about a third of the time
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    r = sample(model, prompt_ids(tokenizer, PROMPTS), num_generations=4, max_new_tokens=8, eos_id=eos, pad_id=pad,
               generator=torch.Generator().manual_seed(1))
    lengths = r.completion_mask.sum(1)
    assert lengths.min() < lengths.max()  # some rows stopped early while others went on
    for row in range(len(r)):
        cols = r.completion_mask[row].nonzero().flatten()
        last = int(cols[-1])
        assert cols.tolist() == list(range(int(cols[0]), last + 1))  # contiguous completion
        toks = r.input_ids[row, cols].tolist()
        assert eos not in toks[:-1] and (toks[-1] == eos or len(toks) == 8)
        after = slice(last + 1, None)
        assert (r.input_ids[row, after] == pad).all() and (r.attention_mask[row, after] == 0).all()
        assert (r.logprobs[row, after] == 0).all() and (r.versions[row, after] == -1).all()


def test_behaviour_logprobs_match_sequence_logprobs(tokenizer):
    model = tiny_model("llama", tokenizer, tie=False)
    ids = prompt_ids(tokenizer, PROMPTS)
    r = sample(model, ids, num_generations=3, max_new_tokens=6, temperature=0.7, eos_id=tokenizer.eos_token_id,
               pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0), batch_size=6)
    with torch.no_grad():
        lp = sequence_logprobs(model, r, temperature=0.7)
    assert lp.shape == r.input_ids.shape and (lp[:, 0] == 0).all()
    assert (lp[~r.completion_mask] == 0).all()
    torch.testing.assert_close(lp, r.logprobs, atol=1e-5, rtol=0)
    other = sequence_logprobs(model, r, temperature=1.0).detach()  # the temperature is really applied
    assert (other - r.logprobs).abs().max() > 1e-3
    model.requires_grad_(True)
    lp = sequence_logprobs(model, r, temperature=0.7)
    assert lp.requires_grad
    lp.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_seed_reproducible(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids = prompt_ids(tokenizer, PROMPTS[:2])

    def run(seed):
        return sample(model, ids, num_generations=4, max_new_tokens=6, eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.input_ids.shape != c.input_ids.shape or not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("temperature,top_k,expected", [
    (1.0, 0, {3: 0.5, 4: 0.3, 5: 0.2}),
    (2.0, 0, {3: 0.5 ** 0.5, 4: 0.3 ** 0.5, 5: 0.2 ** 0.5}),  # normalised below
    (1.0, 2, {3: 0.625, 4: 0.375, 5: 0.0}),
])
def test_first_token_frequencies(temperature, top_k, expected):
    model = TableLM({BOS: {3: 0.5, 4: 0.3, 5: 0.2}})
    expected = {t: p / sum(expected.values()) for t, p in expected.items()}
    r = sample(model, [[BOS]], num_generations=4000, max_new_tokens=1, temperature=temperature, top_k=top_k,
               eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    first = r.input_ids[:, 1]
    for tok, p in expected.items():
        assert abs((first == tok).float().mean().item() - p) < 0.03
        if p > 0:  # behaviour log-prob is that of the (tempered, truncated) distribution sampled from
            assert r.logprobs[first == tok, 1].sub(math.log(p)).abs().max() < 1e-5


def test_select_and_concat():
    model = TableLM({BOS: {3: 0.5, EOS: 0.5}, 3: {4: 1.0}, 4: {EOS: 1.0}})
    r = sample(model, [[BOS], [BOS, 3]], num_generations=2, max_new_tokens=3, eos_id=EOS, pad_id=PAD,
               generator=torch.Generator().manual_seed(0))
    kept = r.select(torch.tensor([True, False, False, True]))
    assert len(kept) == 2 and kept.prompt_index.tolist() == [0, 1]
    assert torch.equal(kept.input_ids, r.input_ids[[0, 3]])
    short = sample(model, [[BOS, 3, 4]], num_generations=1, max_new_tokens=1, eos_id=EOS, pad_id=PAD)
    both = Rollouts.concat([short, r], PAD)
    assert both.input_ids.shape == (5, max(short.input_ids.shape[1], r.input_ids.shape[1]))
    assert torch.equal(both.completion_mask[1:, :r.input_ids.shape[1]], r.completion_mask)
    assert (both.versions[both.attention_mask == 0] == -1).all()


def _latr(model, prompts, g, **kw):
    kw = {"max_new_tokens": 4, "lookahead": 2, "generator": torch.Generator().manual_seed(0), **kw}
    return latr_sample(model, prompts, num_generations=g, temperature=1.0, eos_id=EOS, pad_id=PAD, **kw)


def test_latr_prunes_a_branch_that_rejoins_its_parent():
    # after BOS, tokens 3 and 4 tie (a split at step 0); both then lead to 5 5 5: nothing differs
    model = TableLM({BOS: {3: 0.5, 4: 0.5}, 3: {5: 1.0}, 4: {5: 1.0}, 5: {5: 1.0}})
    r, stats = _latr(model, [[BOS]], 4)
    assert stats["created"] == 1 and stats["pruned"] == 1 and stats["kept_per_prompt"] == 0
    assert stats["topped_up"] == 3 and stats["branch_positions"] == [1, 0, 0, 0]
    assert len(r) == 4 and r.prompt_index.tolist() == [0] * 4


def test_latr_keeps_a_branch_that_diverges():
    model = TableLM({BOS: {3: 0.5, 4: 0.5}, 3: {5: 1.0}, 4: {6: 1.0}, 5: {5: 1.0}, 6: {6: 1.0}})
    r, stats = _latr(model, [[BOS], [BOS]], 3)
    assert stats["created"] == 2 and stats["pruned"] == 0 and stats["kept_per_prompt"] == 1
    assert stats["topped_up"] == 2 and stats["branch_positions"] == [2, 0, 0, 0]
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for i in (0, 3):  # the tree's two branches come first in each group and took both tied tokens
        assert sorted(r.completion_ids()[i:i + 2]) == [[3, 5, 5, 5], [4, 6, 6, 6]]
    assert torch.allclose(r.logprobs[:, 1], torch.tensor(math.log(0.5)))  # forced token: log 0.5 too
    torch.testing.assert_close(sequence_logprobs(model, r), r.logprobs, atol=1e-5, rtol=0)


def test_latr_no_split_when_top2_not_close_or_second_unlikely():
    for first in ({3: 0.7, 4: 0.3}, {3: 0.15, 4: 0.15, 5: 0.14, 6: 0.14, 7: 0.14, EOS: 0.28}):
        model = TableLM({BOS: first, **{t: {EOS: 1.0} for t in range(3, 8)}})
        r, stats = _latr(model, [[BOS]], 4)
        assert stats["created"] == 0 and stats["topped_up"] == 3 and len(r) == 4


def test_latr_caps_branches_at_group_size():
    # every step is a coin flip between 3 and 4: every settled branch wants to split every step
    coin = {3: 0.5, 4: 0.5}
    model = TableLM({BOS: coin, 3: coin, 4: coin})
    r, stats = _latr(model, [[BOS], [BOS, 3]], 4, max_new_tokens=8, lookahead=1, prune_threshold=0.5)
    assert len(r) == 8 and r.prompt_index.tolist() == [0] * 4 + [1] * 4
    assert stats["created"] - stats["pruned"] + stats["topped_up"] == 2 * 3
    assert stats["created"] >= 3 and sum(stats["branch_positions"]) == stats["created"]
    assert torch.allclose(r.logprobs[r.completion_mask], torch.tensor(math.log(0.5)))


def test_latr_on_tiny_llama_logprobs_match(tokenizer):
    model = tiny_model("llama", tokenizer)
    ids = prompt_ids(tokenizer, PROMPTS[:2])
    r, stats = latr_sample(model, ids, num_generations=4, max_new_tokens=5, temperature=0.8,
                           eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                           generator=torch.Generator().manual_seed(0), version=2, branch_margin=1.0,
                           branch_min_prob=0.0, lookahead=2, prune_threshold=0.3, tokenizer=tokenizer)
    _rollout_invariants(r, ids, 4, 2)
    assert stats["created"] >= 3 and len(r.completions) == 8
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, r, temperature=0.8), r.logprobs, atol=1e-5, rtol=0)
    with pytest.raises(SlimforgeError, match="temperature"):  # LATR branches on sampling probabilities
        latr_sample(model, ids, num_generations=2, max_new_tokens=2, temperature=0.0, eos_id=2, pad_id=0)


def test_normalized_edit_distance_hand_cases():
    assert normalized_edit_distance([], []) == 0.0
    assert normalized_edit_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert normalized_edit_distance([1, 2, 3], [1, 3]) == pytest.approx(1 / 3)  # one deletion
    assert normalized_edit_distance([1, 2], [3, 4]) == 1.0
    assert normalized_edit_distance([], [5, 6]) == 1.0
    kitten, sitting = [ord(c) for c in "kitten"], [ord(c) for c in "sitting"]
    assert normalized_edit_distance(kitten, sitting) == pytest.approx(3 / 7)


def test_latr_share_schedule():
    assert latr_share(0, 11, 1.0, 0.2) == 1.0
    assert latr_share(10, 11, 1.0, 0.2) == pytest.approx(0.2)
    assert latr_share(5, 11, 1.0, 0.2) == pytest.approx(0.6)
    assert latr_share(50, 11, 1.0, 0.2) == pytest.approx(0.2)
    assert latr_share(0, 1, 0.5, 0.0) == 0.0
    with pytest.raises(SlimforgeError):
        latr_share(0, 10, 1.5, 0.0)
