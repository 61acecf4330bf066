"""package stage: the pipeline's deployables, checked in a fresh process, registered in MLflow.

    python -m stages.package --params params/package.yaml --base data/base --lora data/lora --rl data/rl \
        --compact data/pruned --quantized data/quantized --data data/tasks --reports reports --out data/package \
        --metrics metrics/package.json --report reports/package.json

1. full/: the base with the lora stage's recovered adapter and the rl stage's adapter merged in, a
   plain Hugging Face folder (sharded safetensors, config, generation config, tokenizer) that stock
   transformers loads with no slimforge and no remote code.
2. adapters/lora, adapters/rl: the two PEFT folders (lora applies to the base; rl to the base with
   lora merged), checked against the LoRA limits of vLLM's loader (standard projection names,
   rank, no extra trained modules, no DoRA, safetensors).
3. compact/: the pruned model (non-uniform widths), loadable with trust_remote_code through its
   shipped modeling file.
   quantized/ + adapters/correction: the quantize stage's model exported to compressed-tensors
   "pack-quantized" (stock architecture, what transformers and vLLM read) with its low-rank error
   correction as a PEFT LoRA adapter (slimforge/ct_export.py: exact codes, widths, limits).
4. README.md in each folder: a model card (base, every stage's params and test metrics, size,
   bits per weight, intended use, limitations, the command that reproduces it).
5. Before anything is written, every deployable is loaded in a fresh process with stock libraries
   (stages/package/check.py) and scored on the test split; each must match the pipeline's own
   measurement within its interval, else the stage fails and writes nothing.
6. The full model is logged as an MLflow transformers model, registered under `name`, tagged with
   the git commit, the dvc.lock hash and the data hash, given the alias `challenger`, and made
   `champion` only when its validation accuracy beats the current champion's interval
   (slimforge.registry; `slimforge registry` promotes or rolls back by hand).
"""
