"""The filter stage's run(): the method is described in stages/filter/__init__.py, the command line in
__main__.py (which checks the params before importing this module, so a typo fails in about a second)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from slimforge import SlimforgeError
from slimforge.adapters import load_adapter
from slimforge.batching import encode_records
from slimforge.cli_util import progress
from slimforge.evaluate.judging import direct_probs, mean_logprob, pairwise_win_probs
from slimforge.io import read_jsonl, write_jsonl, write_provenance
from slimforge.modeling import load_model
from slimforge.stage import open_stage
from slimforge.tasks.records import load_records
from slimforge.training import train_causal_lm
from stages.filter.downstream import downstream_accuracy
from stages.filter.params import FilterParams
from stages.filter.ranking import calibrate_threshold, detection, draw_references, ranking_auc, reliability

log = logging.getLogger(__name__)

LABELS_FILE = "noisy_labels.jsonl"
CHUNK = 1024  # targets judged (and cached) at a time


def load_pool(path: Path) -> list[dict]:
    pool = read_jsonl(path, required=("prompt", "response", "correct"), types={"correct": bool})
    if not pool:
        raise SlimforgeError(f"{path}: the reference pool is empty")
    return pool


def meta_scores(judge, tokenizer, targets: list[dict], pool: list[dict], n: int, balanced: bool, seed: int,
                batch_size: int, exclude: list[int] | None = None, cache: Path | None = None,
                score: str = "mean_win") -> torch.Tensor:
    """Meta Ranking score per target (`score`: mean_win or vote, stages/filter/ranking.py). With
    `cache`, finished chunks are appended to it and reused (only those of the same score)."""
    try:
        draws = draw_references(len(targets), [p["correct"] for p in pool], n, balanced, seed, exclude)
    except ValueError as err:
        raise SlimforgeError(str(err)) from None
    done = {}
    if cache is not None and cache.exists():
        done = {r["i"]: r["score"] for r in read_jsonl(cache) if r.get("kind", "vote") == score}
    scores = torch.empty(len(targets))
    bar = progress(desc=f"meta ranking ({n} references each)", total=len(targets), unit="row", log=log)
    for start in range(0, len(targets), CHUNK):
        idx = list(range(start, min(start + CHUNK, len(targets))))
        if all(i in done for i in idx):
            scores[idx] = torch.tensor([done[i] for i in idx])
            bar.update(len(idx))
            continue
        refs = [[pool[j] for j in draws[i]] for i in idx]
        p_win = pairwise_win_probs(judge, tokenizer, [targets[i] for i in idx], refs, batch_size)
        ref_correct = torch.tensor([[pool[j]["correct"] for j in draws[i]] for i in idx])
        scores[idx] = reliability(p_win, ref_correct, score)
        if cache is not None:
            with open(cache, "a") as f:
                f.writelines(json.dumps({"i": i, "kind": score, "score": float(scores[i])}) + "\n" for i in idx)
        bar.update(len(idx))
    bar.close()
    return scores


def pool_threshold(pool_scores: list[float], correct: list[bool], min_pool_auc: float) -> tuple[float | None, float]:
    """(threshold, the score's AUC on the pool). The threshold is None -- keep every row -- when the
    score does not separate the pool's right and wrong rows at least `min_pool_auc`: a judge with no
    skill on this data would otherwise throw rows away at random (or worse, inverted)."""
    auc = ranking_auc(pool_scores, [not c for c in correct])
    if not auc >= min_pool_auc:
        return None, auc
    return calibrate_threshold(pool_scores, correct), auc


def _keep(scores: torch.Tensor, threshold: float | None) -> list[bool]:
    return [True] * len(scores) if threshold is None else (scores >= threshold).tolist()


def filter_rows(judge, tokenizer, targets: list[dict], pool: list[dict], params: FilterParams, cache_dir: Path,
                round_: int) -> dict:
    """One Meta Ranking pass: pool-calibrated threshold, target scores, keep mask. No labels here."""
    correct = [p["correct"] for p in pool]
    pool_auc = None
    if params.threshold is None:
        pool_scores = meta_scores(judge, tokenizer, pool, pool, params.references, params.balanced, params.seed + 1,
                                  params.batch_size, exclude=list(range(len(pool))), score=params.score)
        threshold, pool_auc = pool_threshold(pool_scores.tolist(), correct, params.min_pool_auc)
    else:
        threshold = params.threshold
    started = time.perf_counter()
    scores = meta_scores(judge, tokenizer, targets, pool, params.references, params.balanced, params.seed,
                         params.batch_size, cache=cache_dir / f"scores-round{round_}.jsonl", score=params.score)
    seconds = time.perf_counter() - started
    return {"scores": scores, "threshold": threshold, "pool_auc": pool_auc, "kept": _keep(scores, threshold),
            "pairs_per_s": len(targets) * params.references / max(seconds, 1e-9)}


def baseline(score_fn, judge, tokenizer, targets, pool, batch_size, min_pool_auc: float) -> dict:
    """A single-response score with its threshold calibrated on the pool (same skill check)."""
    threshold, pool_auc = pool_threshold(score_fn(judge, tokenizer, pool, batch_size).tolist(),
                                         [p["correct"] for p in pool], min_pool_auc)
    scores = score_fn(judge, tokenizer, targets, batch_size)
    return {"scores": scores, "threshold": threshold, "pool_auc": pool_auc, "kept": _keep(scores, threshold)}


def read_wrong(labels_dir: str | Path, ids: list[str]) -> list[bool]:
    """Whether each row is wrong, from the sidecar labels: evaluation only, never the filter."""
    truth = {r["id"]: r["correct"] for r in read_jsonl(Path(labels_dir) / LABELS_FILE)}
    return [not truth[i] for i in ids]


def score_methods(methods: dict[str, dict], wrong: list[bool]) -> dict[str, dict]:
    """Per method: precision/recall/F1 of catching the wrong rows, kept fraction, and ranking AUC
    where the method has scores."""
    return {name: {**detection([not k for k in m["kept"]], wrong), "kept_fraction": sum(m["kept"]) / len(wrong),
                   **({"auc": ranking_auc(m["scores"].tolist(), wrong)} if "scores" in m else {})}
            for name, m in methods.items()}


def finetune_judge(judge, tokenizer, rows: list[dict], params: FilterParams, ckpt: Path, fingerprint: str) -> None:
    train_causal_lm(judge, encode_records(rows, tokenizer), params.finetune, pad_id=tokenizer.pad_token_id,
                    seed=params.seed, checkpoint_dir=ckpt, fingerprint=fingerprint, desc="judge fine-tune")


def meta_ranking(judge, tokenizer, targets: list[dict], pool: list[dict], params: FilterParams, stage) -> dict:
    """Meta Ranking over `params.rounds` rounds (the judge fine-tuned on the kept rows in between)."""
    judge.eval()
    history, meta = [], None
    for r in range(params.rounds):
        if meta is not None:  # after the first round: fine-tune on what the last one kept
            finetune_judge(judge, tokenizer, [t for t, k in zip(targets, meta["kept"]) if k], params,
                           stage.checkpoints / "ft", stage.fingerprint)
            judge.eval()
        meta = filter_rows(judge, tokenizer, targets, pool, params, stage.checkpoints, r)
        history.append({"round": r + 1, "threshold": meta["threshold"], "pool_auc": meta["pool_auc"],
                        "kept_fraction": sum(meta["kept"]) / len(targets)})
        if meta["threshold"] is None:
            log.warning("round %d: the judge separates the pool's right and wrong rows with AUC %.3f < "
                        "min_pool_auc %s: keeping every row", r + 1, meta["pool_auc"], params.min_pool_auc)
    return {**meta, "history": history}


def load_judge(judge: str | Path | None, base: Path, device: str):
    """(model, tokenizer) of the judge: `base` itself (None), a model folder, or a PEFT adapter
    folder for `base`, merged in (a judge only reads, so the merged weights serve it fastest)."""
    if judge is None:
        return load_model(base, device=device)
    if (Path(judge) / "adapter_config.json").is_file():
        model, tokenizer = load_model(base, device=device)
        return load_adapter(model, judge).merge_and_unload(), tokenizer
    return load_model(judge, device=device)


def choose_method(methods: dict, keep_by: str) -> str:
    """The method whose kept rows become filtered.jsonl. auto: the best pool AUC among those that
    passed the skill check (Meta Ranking on a tie; when none passed they all keep every row)."""
    if keep_by != "auto":
        return keep_by
    skilled = [n for n in ("meta_ranking", "direct", "perplexity") if methods.get(n, {}).get("threshold") is not None]
    return max(skilled, key=lambda n: methods[n]["pool_auc"]) if skilled else "meta_ranking"


def baselines(judge_path: str | None, base: Path, targets: list[dict], pool: list[dict], params: FilterParams,
              device: str) -> dict:
    """Keep-all, direct judging and perplexity with the untouched judge (as Meta Ranking's round 1 had)."""
    judge, tokenizer = load_judge(judge_path, base, device)
    return {"direct": baseline(direct_probs, judge, tokenizer, targets, pool, params.batch_size, params.min_pool_auc),
            "perplexity": baseline(mean_logprob, judge, tokenizer, targets, pool, params.batch_size,
                                   params.min_pool_auc),
            "keep_all": {"kept": [True] * len(targets), "threshold": None}}


def write_outputs(folder: Path, targets: list[dict], ids: list[str], methods: dict, chosen: str,
                  params: FilterParams) -> None:
    """filtered.jsonl (the chosen method's kept rows) and scores.jsonl (every method's score per row)."""
    kept = methods[chosen]["kept"]
    write_jsonl(folder / "filtered.jsonl", [t for t, k in zip(targets, kept) if k])
    write_jsonl(folder / "scores.jsonl", [
        {"id": i, "kept": k, **{f"{name}_score": float(m["scores"][j]) for name, m in methods.items() if "scores" in m}}
        for j, (i, k) in enumerate(zip(ids, kept))])
    write_provenance(folder, "filter", params.model_dump(), parent=None)


# What `dvc metrics show` compares; per-method detection, timings and pool AUCs go to the report.
HEADLINE = ["downstream_accuracy.*", "downstream_ci95.*", "downstream_n", "gap_closed", "detection.*.f1",
            "detection.*.auc", "kept_fraction"]


def run(params: FilterParams, model: str | Path, data: str | Path, out: str | Path, metrics: str | Path,
        labels: str | Path | None = None, report: str | Path | None = None) -> dict:
    """`model`: the judge unless params.judge names one, and the model the downstream LoRAs train."""
    data, base = Path(data), Path(model)
    judge_inputs = [Path(params.judge)] if params.judge else []
    if not params.judge or (Path(params.judge) / "adapter_config.json").is_file():
        judge_inputs.append(base)
    targets_path, pool_path = Path(params.targets), Path(params.pool)
    targets, pool = load_records(targets_path), load_pool(pool_path)
    if params.references > len(pool) - 1:
        raise SlimforgeError(f"references: {params.references} is more than the pool's {len(pool) - 1} usable "
                             f"examples ({pool_path})")
    # Cached scores are valid only for this judge's weights and these rows: the fingerprint hashes
    # the contents, so a judge retrained at the same path starts afresh.
    with open_stage("filter", params.model_dump(), out=out, inputs=[*judge_inputs, targets_path, pool_path],
                    metrics=metrics, report=report) as stage:
        judge, tokenizer = load_judge(params.judge, base, stage.device)  # a folder without a tokenizer fails here
        started = time.perf_counter()
        methods = {"meta_ranking": meta_ranking(judge, tokenizer, targets, pool, params, stage)}
        seconds = time.perf_counter() - started
        if params.baselines:
            methods.update(baselines(params.judge, base, targets, pool, params, stage.device))
        chosen = choose_method(methods, params.keep_by)
        ids = [t.get("id", str(i)) for i, t in enumerate(targets)]
        with stage.output() as tmp:
            write_outputs(tmp, targets, ids, methods, chosen, params)
        kept = methods[chosen]["kept"]
        measured = {"filter_method": chosen, "kept_fraction": sum(kept) / len(targets),
                    "threshold": methods[chosen]["threshold"],
                    "pool_auc": {name: m["pool_auc"] for name, m in methods.items() if m.get("pool_auc") is not None},
                    "pairs_per_s": methods["meta_ranking"]["pairs_per_s"], "seconds": seconds,
                    "rounds": methods["meta_ranking"]["history"], "targets": len(targets),
                    "references": params.references}
        log.info("filtered.jsonl keeps %s's verdict (%d of %d rows)", chosen, sum(kept), len(targets))
        wrong = None  # the labels are read only now, after the filtered data exists, to score each method
        if labels is not None and (Path(labels) / LABELS_FILE).exists():
            wrong = read_wrong(labels, ids)
            measured["detection"] = score_methods(methods, wrong)
            measured["wrong_fraction"] = sum(wrong) / len(wrong)
        if params.downstream.steps > 0:
            tests = load_records(data / params.downstream.test_file, need_answer=True)
            acc, ci = downstream_accuracy(base, targets, {**methods, "filtered": methods[chosen]}, wrong, tests,
                                          params.downstream, params.seed, stage)
            measured.update(downstream_accuracy=acc, downstream_ci95=ci, downstream_n=len(tests))
            if "oracle" in acc and acc["oracle"] > acc["keep_all"]:  # share of keep-all -> oracle gap closed
                measured["gap_closed"] = (acc["filtered"] - acc["keep_all"]) / (acc["oracle"] - acc["keep_all"])
        return stage.finish(measured, headline=HEADLINE)


def suite_files(params: FilterParams) -> list[str]:
    """The data stage's files this stage reads besides `targets` and `pool`."""
    return [params.downstream.test_file] if params.downstream.steps > 0 else []
