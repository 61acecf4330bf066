"""data stage: write the embedded task suite (or your JSONL in its place) under data/.

    python -m stages.data --params params/data.yaml --out data/tasks --labels data/labels \
        --metrics metrics/data.json
"""
