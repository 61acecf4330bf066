"""quantize stage: error-correcting low-bit quantization (LQ-LoRA decomposition, exact bit
allocation, INT2.1 low-rank error correction) on the shared low-bit kernels.

    python -m stages.quantize --params params/quantize.yaml --model data/pruned --base data/base \
        --data data/tasks --out data/quantized --metrics metrics/quantize.json --plots plots/quantize

1. Fisher (optional): squared gradients of every target weight on calibration text, factorised
   into row x column weights (LQ-LoRA), so errors count where the loss is sensitive.
2. Format per matrix: uniform `bits`/`group`, or with `budget` an exact integer linear program over
   `choices` that minimises the summed (Fisher-weighted) reconstruction error under the average
   bits-per-weight budget (scales, zeros and low-rank factors counted).
3. Decomposition: W ~ Q + L1 L2 (LQ-LoRA: alternate quantization and rank-r SVD), or plain RTN.
4. LREC (INT2.1): the factors train as LoRA on the frozen packed weights against the
   full-precision teacher: KL(teacher || student) over the vocabulary + response cross-entropy.
   Checkpointed; a killed run resumes.
5. The quantized folder (packed weights, scales/zeros, factors, bit map; see slimforge/quantized.py)
   and a comparison of full precision, RTN, the untrained decomposition and LREC at this format.
"""
