"""The `slimforge` command.

    slimforge run [STAGE ...]              # the Prefect pipeline (dvc repro per stage)
    slimforge serve --cron "0 3 * * *"     # the same on a schedule (needs `prefect server start`)
    slimforge eval MODEL_DIR [--data data/tasks] [--out metrics.json]
    slimforge check-data FILE.jsonl [--eval]   # validate your JSONL against the suite schema
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from slimforge.cli_util import exit_on_error


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
    metrics = evaluate_suite(model, tokenizer, args.data, model_dir=args.model, test_files=TEST_FILES)
    if args.out:
        write_json(args.out, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))


def _check_data(args: argparse.Namespace) -> None:
    from slimforge.tasks.records import load_records

    records = load_records(args.file, need_answer=args.eval)
    families = sorted({r["family"] for r in records})
    print(f"{args.file}: {len(records)} records OK (families: {', '.join(families)})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="slimforge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline through Prefect")
    run.add_argument("stages", nargs="*")
    serve = sub.add_parser("serve", help="serve the pipeline on a cron schedule")
    serve.add_argument("stages", nargs="*")
    serve.add_argument("--cron", default="0 3 * * *")
    serve.add_argument("--name", default="nightly")
    ev = sub.add_parser("eval", help="evaluate a model folder with the shared harness")
    ev.add_argument("model")
    ev.add_argument("--data", default="data/tasks", help="suite folder (default: data/tasks)")
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: the dtype the weights were saved in")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--trust-remote-code", action="store_true")
    check = sub.add_parser("check-data", help="validate a JSONL file against the suite schema")
    check.add_argument("file")
    check.add_argument("--eval", action="store_true", help="require `answer` (evaluation files)")
    args = ap.parse_args(argv)
    if args.command == "run":
        _flow(args.stages)
    elif args.command == "serve":
        _flow(["--serve", "--cron", args.cron, "--name", args.name, *args.stages])
    elif args.command == "eval":
        exit_on_error(lambda: _eval(args))
    else:
        exit_on_error(lambda: _check_data(args))


if __name__ == "__main__":
    main()
