"""prune stage: Týr-the-Pruner global sparsity search with structured, GQA-aware pruning.

    python -m stages.prune --params params/prune.yaml --model data/base --data data/tasks \
        --out data/pruned --metrics metrics/prune.json --plots plots/prune

1. Local criterion scores (obs | loraprune | wanda | magnitude) prune every sublayer (each
   layer's attention and MLP) at several levels around a centre: the supernet, built with
   expectation error accumulation (supernet.py).
2. An evolutionary search picks one level per sublayer under the fixed parameter budget,
   minimising KL(dense || pruned) on calibration tokens (search.py); coarse-to-fine rounds
   re-centre on the best distribution with half the step.
3. The best distribution is cut out physically and saved as a folder that loads with stock
   transformers (trust_remote_code) plus plan.json; a uniform-sparsity prune with the same
   criterion is measured beside it. A killed run resumes from data/.checkpoints/prune.
"""
