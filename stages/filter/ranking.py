"""Meta Ranking, the pure part: reference draws, position debiasing, the weighted vote, threshold
calibration and detection metrics. (Meta Ranking has no released code; every choice is ours and
documented here.)

A target (query, response) is compared with N labelled references. For each pair the judge says
which of the two is correct, in both orders; the debiased probability that the target wins
(slimforge.evaluate.judging.debiased_win) is

    p = ( P(A | target shown as A) + P(B | target shown as B) ) / 2

Two scores (params `score`):

mean_win (default), every outcome counts: the target's mean win probability against its correct
references and, separately, against its wrong ones, averaged (so the draw's mix of correct and wrong
references does not shift the score). A correct target ties correct references and beats wrong
ones; a wrong target loses to correct ones and ties wrong ones: under an ideal judge the two score
0.75 and 0.25, whatever N.

vote (the paper's weighted vote), with confidence c = |2p - 1|, so a coin-flip verdict weighs nothing:
    target beats a correct reference  -> reliable,   + c
    target loses to a wrong reference -> unreliable, - c
The other two outcomes (losing to a correct reference, beating a wrong one) are what a correct
*and* a wrong target would both do against a weak judge, so they carry no vote. The score is the
mean evidence over the N references, in [-1, 1]. Under an ideal judge it is 0 for every target (a
correct target ties correct references, c = 0, and beats wrong ones, which the vote ignores). Any
noise in the tie verdicts gives it its sign back: on simulated judges (tests/test_filter.py; ties
plus Gaussian noise of sd 0.05-0.5) the vote's pool AUC is 0.99-0.90, the mean's 1.0-0.94.

Either way a target is kept when its score reaches the
threshold, calibrated on the labelled pool itself (each pool item scored against N others, the
threshold maximising Youden's J).
"""

from __future__ import annotations

import random

import torch


def draw_references(n_targets: int, correct: list[bool], n: int, balanced: bool, seed: int,
                    exclude: list[int] | None = None) -> list[list[int]]:
    """N reference indices into the pool per target. `balanced`: ceil(N/2) correct and floor(N/2)
    wrong ones, so every target meets both kinds of evidence. `exclude[t]`: a pool index target t
    must not be compared with (itself, when the pool is scored for calibration)."""
    good = [i for i, c in enumerate(correct) if c]
    bad = [i for i, c in enumerate(correct) if not c]
    if not good or not bad:
        raise ValueError(f"the reference pool needs correct and wrong examples (has {len(good)} correct, "
                         f"{len(bad)} wrong)")
    room = len(correct) - (1 if exclude is not None else 0)
    if n > room:
        raise ValueError(f"references: {n} is more than the pool's {room} usable examples")
    rng = random.Random(f"{seed}:references")
    out = []
    for t in range(n_targets):
        skip = exclude[t] if exclude is not None else None
        if balanced:
            g = [i for i in good if i != skip]
            b = [i for i in bad if i != skip]
            n_good = min(len(g), max(n - len(b), (n + 1) // 2))  # one kind short: more of the other
            out.append(rng.sample(g, n_good) + rng.sample(b, n - n_good))
        else:
            out.append(rng.sample([i for i in range(len(correct)) if i != skip], n))
    return out


def vote(p_win: torch.Tensor, ref_correct: torch.Tensor) -> torch.Tensor:
    """Reliability score per target from (T, N) win probabilities and reference labels."""
    conf_win = (2 * p_win - 1).clamp(min=0)
    conf_loss = (1 - 2 * p_win).clamp(min=0)
    evidence = torch.where(ref_correct, conf_win, -conf_loss)
    return evidence.mean(-1)


def mean_win(p_win: torch.Tensor, ref_correct: torch.Tensor) -> torch.Tensor:
    """All-outcome score per target: mean p_win against correct references and against wrong ones,
    averaged; a target whose draw has only one kind gets that kind's mean. In [0, 1]."""
    def class_mean(mask):
        n = mask.sum(-1)
        return (p_win * mask).sum(-1) / n.clamp(min=1), n > 0
    vs_good, has_good = class_mean(ref_correct.float())
    vs_bad, has_bad = class_mean((~ref_correct).float())
    both = (vs_good + vs_bad) / 2
    return torch.where(has_good & has_bad, both, torch.where(has_good, vs_good, vs_bad))


def reliability(p_win: torch.Tensor, ref_correct: torch.Tensor, score: str) -> torch.Tensor:
    """The score named by params `score` ("mean_win" or "vote")."""
    return vote(p_win, ref_correct) if score == "vote" else mean_win(p_win, ref_correct)


def detection(flagged: list[bool], wrong: list[bool]) -> dict[str, float]:
    """Precision, recall and F1 of catching wrong responses (flagged = removed by the filter)."""
    tp = sum(f and w for f, w in zip(flagged, wrong))
    fp = sum(f and not w for f, w in zip(flagged, wrong))
    fn = sum(w and not f for f, w in zip(flagged, wrong))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def calibrate_threshold(scores: list[float], correct: list[bool]) -> float:
    """The keep-threshold (keep when score >= t) that maximises Youden's J = recall of the wrong
    items - share of correct items removed, on a labelled set; ties go to the lower threshold
    (keep more). J does not depend on the share of wrong items, so a threshold found on a 50/50
    pool transfers to a target set with another error rate; F1 does not (on a pool that is half
    wrong, "remove everything" already scores F1 0.67 and wins whenever the judge is weak)."""
    values = sorted(set(scores))
    candidates = [values[0] - 1e-9] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-9]
    n_wrong, n_right = sum(not c for c in correct), sum(correct)
    best_t, best_j = candidates[0], -2.0
    for t in candidates:
        caught = sum(s < t and not c for s, c in zip(scores, correct)) / max(n_wrong, 1)
        lost = sum(s < t and c for s, c in zip(scores, correct)) / max(n_right, 1)
        if caught - lost > best_j + 1e-12:
            best_t, best_j = t, caught - lost
    return best_t


def ranking_auc(scores: list[float], wrong: list[bool]) -> float:
    """Probability that a right row scores above a wrong one (ties count half): how well a score
    separates them whatever the threshold. 0.5 is no skill; below 0.5 the signal is inverted."""
    right = sorted(s for s, w in zip(scores, wrong) if not w)
    bad = sorted(s for s, w in zip(scores, wrong) if w)
    if not right or not bad:
        return float("nan")
    wins, lo, hi = 0.0, 0, 0
    for s in right:  # two pointers over the sorted wrong scores: below s, and at or below s
        while lo < len(bad) and bad[lo] < s:
            lo += 1
        while hi < len(bad) and bad[hi] <= s:
            hi += 1
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(right) * len(bad))
