"""base stage: load the model named in params/model.yaml, or train the embedded tiny Llama.

    python -m stages.base --model-params params/model.yaml --params params/base.yaml \
        --data data/tasks --out data/base --metrics metrics/base.json --plots plots/base

A killed run resumes from its last checkpoint (data/.checkpoints/base) on the next call.
"""
