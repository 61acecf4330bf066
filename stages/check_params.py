"""Check edited params files against their stages' schemas, for drivers that must not import the
stages (the sweep flow checks every grid point this way before running any). Reads a JSON list of
{"label": str, "files": {"params/<file>.yaml": data}} on stdin; exits 0 when every file of every item
validates, else prints the first error as one line (prefixed by its item's label) and exits 2.

    echo '[{"label": "bits=5", "files": {"params/quantize.yaml": {"bits": 5}}}]' | python -m stages.check_params
"""

from __future__ import annotations

import json
import sys

from slimforge import SlimforgeError
from slimforge.config import parse_params
from stages.base.params import BaseParams, ModelParams
from stages.data.params import DataParams
from stages.filter.params import FilterParams
from stages.lora.params import LoraParams
from stages.package.params import PackageParams
from stages.prune.params import PruneParams
from stages.quantize.params import QuantizeParams
from stages.report.params import ReportParams
from stages.rl.params import RlParams

SCHEMAS = {"params/data.yaml": DataParams, "params/base.yaml": BaseParams, "params/model.yaml": ModelParams,
           "params/prune.yaml": PruneParams, "params/quantize.yaml": QuantizeParams,
           "params/filter.yaml": FilterParams, "params/lora.yaml": LoraParams, "params/rl.yaml": RlParams,
           "params/package.yaml": PackageParams, "params/report.yaml": ReportParams}


def first_error(items: list[dict]) -> str | None:
    for item in items:
        for file, data in item["files"].items():
            if file not in SCHEMAS:
                return f"{item['label']}: {file} is not a stage's params file (allowed: {', '.join(SCHEMAS)})"
            try:
                parse_params(data, SCHEMAS[file], file)
            except SlimforgeError as err:
                return f"{item['label']}: {err}"
    return None


if __name__ == "__main__":
    error = first_error(json.load(sys.stdin))
    if error:
        print(error)
        sys.exit(2)
