"""filter stage: Meta Ranking data filtering with a weak judge (ranking.py documents the method).

    python -m stages.filter --params params/filter.yaml --model data/base --data data/tasks \
        --labels data/labels --out data/filtered --metrics metrics/filter.json

1. The judge (`judge`: a PEFT adapter folder merged into the base -- the pipeline's default is the
   lora stage's adapter --, a model folder, or the base itself) compares every target
   (query, response) with N labelled references from the pool, both orders, reading ' A'/' B'
   from next-token log-probs (fused kernel, batched). A weighted vote gives a reliability score;
   rows at or above the threshold (calibrated on the pool) are kept -- unless the score separates
   the pool's own right and wrong rows with AUC below `min_pool_auc`: then the judge has no skill
   here and every row is kept (a no-skill judge removes rows at random, which only costs data). Scores are appended to a
   cache as they come, so a killed run resumes where it stopped.
2. `rounds` > 1: fine-tune the judge briefly on what was kept, judge again.
3. Baselines with the same judge: keep everything; direct single-response judging (P(' yes'));
   perplexity filtering; thresholds calibrated on the same pool. `keep_by: auto` writes the kept
   rows of the method whose score best separates the labelled pool (pool AUC).
4. Only after the filtered data is written are the sidecar labels read, to score every method
   (precision/recall/F1 of catching wrong rows); the filtering code never receives them.
5. Downstream: the same LoRA recipe on the kept rows and on all rows, exact match on a test file;
   with labels, also on the truly correct rows only (`oracle`: what a perfect filter would reach),
   and the share of the all -> oracle gap the kept rows close (`gap_closed`).
"""
