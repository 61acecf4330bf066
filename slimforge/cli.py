"""The `slimforge` command.

    slimforge run [STAGE ...] [--nproc N]       # the Prefect pipeline (dvc repro per stage)
    slimforge schedule [STAGE ...] --cron "0 3 * * *"   # the same on a schedule (needs a Prefect server)
    slimforge eval MODEL_DIR [--data data/tasks] [--out metrics.json]
    slimforge check-data FILE.jsonl [--eval]    # validate your JSONL against the suite schema
    slimforge registry show|promote|rollback NAME [VERSION]   # the MLflow model registry's champion
    slimforge serve                             # model serving: not implemented yet
    slimforge --version

`slimforge COMMAND --help` lists a command's options (e.g. `slimforge eval --help`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from slimforge import SlimforgeError
from slimforge.cli_util import exit_on_error, setup_logging


def version() -> str:
    """The installed package version, plus the commit of the checkout it runs from, if any."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        text = f"slimforge {package_version('slimforge')}"
    except PackageNotFoundError:
        text = "slimforge (not installed)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{text} (commit {commit})" if commit else text


def stage_names(root: Path = Path(".")) -> str:
    """The stages of dvc.yaml in `root`, for --help; a hint where there is none."""
    try:
        import yaml

        return ", ".join(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    except (OSError, KeyError, TypeError, ValueError, ImportError):
        return "(run from the repo root to list them: they are the stages of dvc.yaml)"


def _flow(args: list[str]) -> None:
    # The flow lives in `flows/` (which depends on slimforge, not the other way round), so it is
    # started as a module rather than imported.
    sys.exit(subprocess.call([sys.executable, "-m", "flows.pipeline", *args]))


def _eval(args: argparse.Namespace) -> None:
    from slimforge.evaluate import evaluate_suite
    from slimforge.evaluate.harness import TEST_FILES
    from slimforge.io import write_json
    from slimforge.modeling import load_model

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, args.dtype, args.trust_remote_code, device)
    if device == "cpu":  # a quantized folder's layers dequantised once: no kernels here, full-precision speed
        from slimforge.quantized import dequantize_for_cpu

        dequantize_for_cpu(model)
    metrics = evaluate_suite(model, tokenizer, args.data, model_dir=args.model, test_files=TEST_FILES)
    if args.speed:
        from slimforge.evaluate.speed import decode_tokens_per_s

        metrics["decode_tokens_per_s"], metrics["decode_mode"] = decode_tokens_per_s(model)
    if args.out:
        write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _check_data(args: argparse.Namespace) -> None:
    from slimforge.tasks.records import load_records

    records = load_records(args.file, need_answer=args.eval)
    families = sorted({r["family"] for r in records})
    print(f"{args.file}: {len(records)} records OK (families: {', '.join(families)})")


def _registry(args) -> None:
    from slimforge import registry

    if args.action == "show":
        print(json.dumps(registry.describe(args.name), indent=1))
    elif args.action == "promote":
        if not args.version:
            raise SlimforgeError("registry promote needs a VERSION: slimforge registry promote NAME VERSION")
        registry.promote(args.name, args.version)
        print(f"{args.name}: champion is version {args.version}")
    else:
        print(f"{args.name}: champion is version {registry.rollback(args.name)} again")


def parser() -> argparse.ArgumentParser:
    stages = stage_names()
    ap = argparse.ArgumentParser(prog="slimforge", description=__doc__, epilog=f"pipeline stages: {stages}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=version())
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="bring the pipeline up to date through Prefect (dvc repro per stage)")
    run.add_argument("stages", nargs="*", metavar="STAGE", help=f"stages to run (default: all): {stages}")
    run.add_argument("--nproc", type=int, help="processes (GPUs) per training stage, through torchrun "
                     "(default: $SLIMFORGE_NPROC, else 1)")
    schedule = sub.add_parser("schedule", help="run the pipeline on a cron schedule (needs `prefect server start`)")
    schedule.add_argument("stages", nargs="*", metavar="STAGE", help=f"stages to run (default: all): {stages}")
    schedule.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: 0 3 * * *, nightly at 03:00)")
    schedule.add_argument("--name", default="nightly", help="deployment name in Prefect (default: nightly)")
    schedule.add_argument("--nproc", type=int, help="processes (GPUs) per training stage (default: 1)")
    ev = sub.add_parser("eval", help="evaluate a model folder with the shared harness")
    ev.add_argument("model", help="a Hugging Face model folder, e.g. data/base")
    ev.add_argument("--data", default="data/tasks", help="suite folder (default: data/tasks)")
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: the dtype the weights were saved in")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow the folder's own modeling code")
    ev.add_argument("--speed", action="store_true", help="also measure decode tokens/s (batch 1; CUDA graphs on a GPU)")
    check = sub.add_parser("check-data", help="validate a JSONL file against the suite schema")
    check.add_argument("file", help="the JSONL file")
    check.add_argument("--eval", action="store_true", help="require `answer` (evaluation files)")
    reg = sub.add_parser("registry", help="the MLflow model registry: show versions, promote, roll back")
    reg.add_argument("action", choices=["show", "promote", "rollback"],
                     help="show: versions and aliases; promote: champion := VERSION; rollback: the previous champion")
    reg.add_argument("name", help="registered model name (params/package.yaml: name)")
    reg.add_argument("version", nargs="?", help="the version to promote")
    sub.add_parser("serve", help="serve a model for inference (not implemented yet: serve data/package with vLLM or "
                   "transformers)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args, unknown = ap.parse_known_args(argv)  # `serve` refuses whatever options it is given
    if unknown and args.command != "serve":
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    exit_on_error(setup_logging)  # stderr, SLIMFORGE_LOG_LEVEL (default INFO); JSON results stay on stdout
    nproc = ["--nproc", str(args.nproc)] if getattr(args, "nproc", None) else []
    if args.command == "run":
        _flow([*nproc, *args.stages])
    elif args.command == "schedule":
        _flow(["--serve", "--cron", args.cron, "--name", args.name, *nproc, *args.stages])
    elif args.command == "serve":
        print("error: model serving is not implemented yet: the package stage's data/package/full loads in stock "
              "transformers or vLLM; the pipeline scheduler is `slimforge schedule`", file=sys.stderr)
        sys.exit(2)
    elif args.command == "eval":
        exit_on_error(lambda: _eval(args))
    elif args.command == "registry":
        exit_on_error(lambda: _registry(args))
    else:
        exit_on_error(lambda: _check_data(args))


if __name__ == "__main__":
    main()
