"""report stage: one table across the pipeline's models, as markdown, metrics and a plot.

    python -m stages.report --params params/report.yaml --reports reports --base data/base \
        --pruned data/pruned --quantized data/quantized --package data/package \
        --out reports/report.md --metrics metrics/report.json --plots plots/report

Rows: the base, the pruned model, the quantized model (the quantize stage's shipped variant), the
base with the lora adapter, and the shipped full model (package). Columns: parameters, bytes on
disk, bits per weight, decode tokens/s (measured here: batch 1, eager, on this machine's CPU or GPU),
test accuracy per family with 95% intervals, perplexity. Accuracy and size come from the stages'
reports (nothing is re-scored); speed is measured, so it varies run to run and stays out of the
headline metrics. plots/report/size_accuracy.png: base-family accuracy against megabytes.
"""
