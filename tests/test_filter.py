"""Meta Ranking: the vote on hand-made outcomes, position debiasing, reference draws, threshold
calibration, the judge prompts through the tokenizer, resumable scores, the stage end to end on a
tiny model, proof that filtering never reads the sidecar labels, and bad input."""

import json
import random
import sys

import pytest
import torch

import stages.filter.stage as filter_stage
from slimforge import SlimforgeError
from slimforge.tasks.judge import pairwise_prompt, verdict_ids
from stages.filter.stage import meta_scores, run
from stages.filter.params import FilterParams
from slimforge.evaluate.judging import debiased_win
from stages.filter.ranking import (calibrate_threshold, detection, draw_references, mean_win, ranking_auc,
                                   vote)
from slimforge.io import write_jsonl
from tests.conftest import small_suite
from tests.helpers import save_tiny, tiny_model

SMALL = {"references": 3, "downstream": {"steps": 3, "batch_size": 8}, "finetune": {"steps": 2, "batch_size": 8},
         "batch_size": 64}


def _params(suite_dir, **overrides) -> FilterParams:
    return FilterParams.model_validate({**SMALL, "targets": str(suite_dir / "noisy.jsonl"),
                                        "pool": str(suite_dir / "references.jsonl"), **overrides})


def test_vote_counts_only_the_informative_outcomes():
    ref_correct = torch.tensor([[True, True, False, False]])
    # beats both correct refs confidently, beats one wrong ref, loses to the other wrong one
    p = torch.tensor([[1.0, 0.75, 0.9, 0.0]])
    assert vote(p, ref_correct).item() == pytest.approx((1.0 + 0.5 + 0.0 - 1.0) / 4)
    # losing to correct refs and beating wrong refs is what any target does: no evidence
    assert vote(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), ref_correct).item() == 0.0
    # coin flips weigh nothing
    assert vote(torch.full((1, 4), 0.5), ref_correct).item() == 0.0


def _simulated_p_win(judge: str, target_correct: torch.Tensor, ref_correct: torch.Tensor, seed: int = 0):
    """(T, N) win probabilities of a judge of known skill. ideal: 1 / 0.5 / 0 for a better / equally
    correct / worse target; tie_noisy: ideal plus noise (sd 0.2, clipped); random: uniform; inverted:
    1 - ideal."""
    ideal = 0.5 + 0.5 * (target_correct.float()[:, None] - ref_correct.float())
    gen = torch.Generator().manual_seed(seed)
    if judge == "ideal":
        return ideal
    if judge == "tie_noisy":
        return (ideal + 0.2 * torch.randn(ideal.shape, generator=gen)).clamp(0, 1)
    if judge == "random":
        return torch.rand(ideal.shape, generator=gen)
    return 1 - ideal


@pytest.mark.parametrize("judge, want_mean_win, want_vote", [
    ("ideal", (1.0, 1.0), (0.5, 0.5)),         # the vote sees nothing from a perfect judge (every score 0)
    ("tie_noisy", (0.99, 1.0), (0.9, 0.995)),  # noisy ties give the vote its sign back; the mean stays ahead
    ("random", (0.4, 0.6), (0.4, 0.6)),
    ("inverted", (0.0, 0.0), (0.0, 0.0)),      # AUC 0: the pool-AUC skill check then keeps every row
])
def test_all_outcome_score_and_vote_on_simulated_judges(judge, want_mean_win, want_vote):
    gen = torch.Generator().manual_seed(1)
    target_correct = torch.rand(400, generator=gen) < 0.5
    ref_correct = torch.tensor([[True, True, True, False, False]]).repeat(400, 1)
    p = _simulated_p_win(judge, target_correct, ref_correct)
    wrong = (~target_correct).tolist()
    auc_mean = ranking_auc(mean_win(p, ref_correct).tolist(), wrong)
    auc_vote = ranking_auc(vote(p, ref_correct).tolist(), wrong)
    assert want_mean_win[0] <= auc_mean <= want_mean_win[1], auc_mean
    assert want_vote[0] <= auc_vote <= want_vote[1], auc_vote
    if judge == "ideal":  # 0.75 for a correct target, 0.25 for a wrong one, whatever the reference mix
        assert set(mean_win(p, ref_correct).tolist()) == {0.25, 0.75}
        only_wrong_refs = mean_win(p[:, 3:], ref_correct[:, 3:])  # one kind drawn: that kind's mean
        assert torch.equal(only_wrong_refs, torch.where(target_correct, 1.0, 0.5))


def test_both_orders_cancel_position_bias():
    always_a = torch.ones(5)  # a judge that answers "A" whatever it is shown
    assert torch.allclose(debiased_win(always_a, always_a), torch.full((5,), 0.5))
    assert debiased_win(torch.tensor([0.9]), torch.tensor([0.2])).item() == pytest.approx(0.85)


def test_reference_draws_are_balanced_exclusive_and_checked():
    correct = [True] * 6 + [False] * 4
    draws = draw_references(10, correct, 5, True, seed=0, exclude=list(range(10)))
    for t, d in enumerate(draws):
        assert len(set(d)) == 5 and t not in d and sum(correct[i] for i in d) == 3
    assert draws == draw_references(10, correct, 5, True, seed=0, exclude=list(range(10)))
    with pytest.raises(ValueError, match="correct and wrong"):
        draw_references(3, [True] * 5, 2, True, 0)
    with pytest.raises(ValueError, match="more than the pool"):
        draw_references(3, correct, 11, True, 0)


def test_threshold_calibration_and_detection():
    scores = [0.9, 0.8, 0.7, -0.2, -0.5, 0.1]
    correct = [True, True, True, False, False, True]
    t = calibrate_threshold(scores, correct)
    assert -0.2 < t <= 0.1
    m = detection([s < t for s in scores], [not c for c in correct])
    assert m == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_ranking_auc_matches_counting_every_pair():
    rng = random.Random(3)
    scores = [round(rng.random(), 1) for _ in range(120)]  # rounded: many ties
    wrong = [rng.random() < 0.3 for _ in range(120)]
    right_s = [s for s, w in zip(scores, wrong) if not w]
    wrong_s = [s for s, w in zip(scores, wrong) if w]
    brute = sum((a > b) + 0.5 * (a == b) for a in right_s for b in wrong_s) / (len(right_s) * len(wrong_s))
    assert ranking_auc(scores, wrong) == pytest.approx(brute)
    assert ranking_auc([0.9, 0.8, 0.1], [False, False, True]) == 1.0
    assert ranking_auc([0.1, 0.8, 0.9], [False, True, True]) == 0.0


def test_a_judge_without_skill_on_the_pool_keeps_every_row():
    from stages.filter.stage import pool_threshold
    correct = [i % 2 == 0 for i in range(40)]
    inverted = [0.0 if c else 1.0 for c in correct]  # scores wrong rows higher: worse than no skill
    assert pool_threshold(inverted, correct, 0.6) == (None, 0.0)
    skilled = [1.0 if c else 0.0 for c in correct]
    threshold, auc = pool_threshold(skilled, correct, 0.6)
    assert auc == 1.0 and 0.0 < threshold <= 1.0
    assert pool_threshold(inverted, correct, 0.0)[0] is not None  # 0 turns the check off


def test_auto_keeps_the_method_that_best_separates_the_pool():
    from stages.filter.stage import choose_method
    methods = {"meta_ranking": {"threshold": 0.5, "pool_auc": 0.66}, "direct": {"threshold": None, "pool_auc": 0.3},
               "perplexity": {"threshold": -1.0, "pool_auc": 0.99}, "keep_all": {"threshold": None}}
    assert choose_method(methods, "auto") == "perplexity"
    assert choose_method(methods, "meta_ranking") == "meta_ranking"
    no_skill = {k: {**v, "threshold": None} for k, v in methods.items()}
    assert choose_method(no_skill, "auto") == "meta_ranking"  # every method keeps every row then
    assert choose_method({"meta_ranking": methods["meta_ranking"]}, "auto") == "meta_ranking"  # no baselines
    with pytest.raises(ValueError, match="keep_by: perplexity needs baselines"):
        FilterParams.model_validate({"keep_by": "perplexity", "baselines": False})


def test_an_adapter_folder_judges_with_the_adapter_merged(tmp_path, tokenizer):
    from slimforge.adapters import add_lora
    from stages.filter.stage import load_judge
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    model, _ = filter_stage.load_model(base)
    peft = add_lora(model, 4, 8.0, ["q_proj", "v_proj"])
    torch.manual_seed(0)
    for name, w in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.5)  # a trained adapter, not PEFT's zero init
    peft.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([tokenizer("12+34=46")["input_ids"]])
    with torch.no_grad():
        want = peft.eval()(ids).logits
        judge, _ = load_judge(tmp_path / "adapter", base, "cpu")
        got = judge(ids).logits
        plain = load_judge(None, base, "cpu")[0](ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(plain, want, atol=1e-2)
    assert not hasattr(judge, "peft_config")  # merged: a plain model


def test_judge_prompt_round_trips_through_the_tokenizer(tokenizer):
    prompt = pairwise_prompt(("12+34=", "46"), ("7*8=", "54"))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    a, b = verdict_ids(tokenizer, "pairwise")
    assert tokenizer.decode([a]) == " A" and tokenizer.decode([b]) == " B"


def _pool():
    return [{"prompt": f"{i}+{i}=", "response": str(2 * i if i % 3 else 2 * i + 1), "correct": bool(i % 3)}
            for i in range(1, 13)]


def test_scores_are_cached_and_reused(tmp_path, tokenizer, monkeypatch):
    judge, pool = tiny_model("llama", tokenizer), _pool()
    targets = [{"prompt": "5+6=", "response": "11"}, {"prompt": "7+1=", "response": "9"}]
    first = meta_scores(judge, tokenizer, targets, pool, 3, True, 0, 8, cache=tmp_path / "s.jsonl")

    def boom(*a, **k):
        raise AssertionError("judged again")

    monkeypatch.setattr(filter_stage, "pairwise_win_probs", boom)
    again = meta_scores(judge, tokenizer, targets, pool, 3, True, 0, 8, cache=tmp_path / "s.jsonl")
    assert torch.equal(first, again)


def test_stage_end_to_end_and_labels_only_read_after_filtering(tmp_path, suite_dir, tokenizer, monkeypatch):
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    params = _params(suite_dir, **{"rounds": 2, "downstream": {**SMALL["downstream"], "every_method": True}})
    labels = tmp_path / "labels"
    write_jsonl(labels / "noisy_labels.jsonl", small_suite()[1])
    # Every file this process opens or renames, whoever does it (an audit hook sees builtins.open,
    # Path.open, os.open and the atomic writes' renames alike): the labels must not be touched
    # before the filtered rows are in place.
    events, recording = [], [True]
    sys.addaudithook(lambda event, args: events.append((event, [str(a) for a in args[:2]]))
                     if recording[0] and event in ("open", "os.rename", "os.replace") else None)
    try:
        m = run(params, base, suite_dir, tmp_path / "out", tmp_path / "m.json", labels=labels)
    finally:
        recording[0] = False
    label_reads = [i for i, (e, args) in enumerate(events) if e == "open" and args[0].endswith("noisy_labels.jsonl")]
    written = [i for i, (e, args) in enumerate(events) if e != "open" and args[1].endswith("filtered.jsonl")]
    assert label_reads and written and min(label_reads) > max(written)  # only after the outputs were written
    assert set(m["detection"]) == {"meta_ranking", "direct", "perplexity", "keep_all"}
    assert m["detection"]["keep_all"]["recall"] == 0.0 and len(m["rounds"]) == 2
    assert set(m["downstream_accuracy"]) == {"filtered", "meta_ranking", "direct", "perplexity", "keep_all", "oracle"}
    chosen = m["filter_method"]  # auto: the best pool AUC among the methods that passed the skill check
    assert m["downstream_accuracy"]["filtered"] == m["downstream_accuracy"][chosen]
    assert m["kept_fraction"] == m["detection"][chosen]["kept_fraction"]
    assert all(0.0 <= m["detection"][k]["auc"] <= 1.0 for k in ("meta_ranking", "direct", "perplexity"))
    rows = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    kept = (tmp_path / "out" / "filtered.jsonl").read_text().splitlines()
    assert len(rows) == m["targets"] and sum(r["kept"] for r in rows) == len(kept)
    assert not (tmp_path / ".checkpoints" / "out").exists()


def test_filtering_works_without_the_labels(tmp_path, suite_dir, tokenizer):
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    params = _params(suite_dir, **{"baselines": False, "downstream": {"steps": 0}})
    m = run(params, base, suite_dir, tmp_path / "out", tmp_path / "m.json", labels=None)
    assert "detection" not in m and 0 <= m["kept_fraction"] <= 1


def test_bad_input(tmp_path, suite_dir, tokenizer):
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    only_good = tmp_path / "good.jsonl"
    only_good.write_text("".join(json.dumps(r | {"correct": True}) + "\n" for r in _pool()))
    params = _params(suite_dir, **{"pool": str(only_good)})
    with pytest.raises(SlimforgeError, match="correct and wrong"):
        run(params, base, suite_dir, tmp_path / "out", tmp_path / "m.json")
    with pytest.raises(SlimforgeError, match="more than the pool"):
        run(_params(suite_dir, **{"references": 10_000}), base, suite_dir, tmp_path / "out",
            tmp_path / "m.json")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1+1=", "response": "2", "correct": true}\n{oops\n')
    with pytest.raises(SlimforgeError, match=r"broken.jsonl:2"):
        run(_params(suite_dir, **{"pool": str(broken)}), base, suite_dir, tmp_path / "out",
            tmp_path / "m.json")
    no_tok = tmp_path / "no_tok"
    tiny_model("llama", tokenizer).save_pretrained(no_tok)
    with pytest.raises(SlimforgeError, match="tokenizer"):
        run(_params(suite_dir), no_tok, suite_dir, tmp_path / "out", tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_cached_scores_are_dropped_when_the_judge_is_retrained_at_the_same_path(tmp_path, suite_dir, tokenizer,
                                                                                 monkeypatch):
    """The resume fingerprint hashes the judge's contents: a killed run's cached scores are reused by
    the same judge and thrown away when another model now sits at the same path."""
    base = save_tiny("llama", tokenizer, tmp_path / "base", seed=0)
    params = _params(suite_dir, **{"baselines": False, "downstream": {"steps": 0}})
    args = (params, base, suite_dir, tmp_path / "out", tmp_path / "m.json")
    real, calls = filter_stage.pairwise_win_probs, []

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(filter_stage, "pairwise_win_probs", counting)
    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(filter_stage, "write_outputs", killed)
    with pytest.raises(KeyboardInterrupt):  # killed after judging, before writing
        run(*args)
    judged = len(calls)
    assert judged > 0 and not (tmp_path / "out").exists()
    with pytest.raises(KeyboardInterrupt):  # same judge: the cached target scores are reused
        run(*args)
    pool_only = len(calls) - judged  # the pool is rescored for calibration; the targets are not
    assert 0 < pool_only < judged
    save_tiny("llama", tokenizer, base, seed=7)  # a different model at the same path
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    assert len(calls) == judged  # everything judged afresh
