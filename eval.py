"""
Re-score a saved run, and merge several runs into one table. The GLUE metrics themselves are data.py's.

    python eval.py --out_dir out/lora-mrpc            # reload the saved adapter/head and score the dev split again
    python eval.py --table out/*/metrics.json         # one markdown table, mean ± std over seeds
    python eval.py --table out/*/metrics.json --last  # the same at the last epoch (seed 002's tables)
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

import finetune


def table(runs, columns=None, last=False):
    """Markdown table of metrics.json dicts, one row per (task, label, model), mean ± std over seeds.
    The label is train.py's method.label(): each TLoRA+ configuration and λ, and QLoRA, get their own rows.
    last=True reads the last epoch (with its mean train loss) instead of the best one."""
    if last:
        runs = [{**r, "metrics": {k: v for k, v in r["last"].items() if k not in ("epoch", "step")}} for r in runs]
    groups = defaultdict(list)
    for r in runs:
        groups[(r["task"], r.get("label", r["method"]), os.path.basename(str(r["model"]).rstrip("/")))].append(r)
    columns = columns or sorted({k for r in runs for k in r["metrics"]})
    lines = ["| task | method | model | seeds | " + " | ".join(columns) + " | trainable % |",
             "|---" * (len(columns) + 5) + "|"]
    for (task, method, model), rs in sorted(groups.items()):
        cells = []
        for c in columns:
            vals = [r["metrics"][c] for r in rs if c in r["metrics"]]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if len(vals) > 1 else
                         f"{vals[0]:.4f}" if vals else "–")
        lines.append(f"| {task} | {method} | {model} | {len(rs)} | " + " | ".join(cells) +
                     f" | {rs[0]['trainable_pct']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="a folder written by train.py: re-evaluate its saved tensors")
    p.add_argument("--table", nargs="+", metavar="METRICS_JSON", help="metrics.json files to merge into a table")
    p.add_argument("--columns", help="comma-separated metrics to show (default: all)")
    p.add_argument("--last", action="store_true", help="table the last epoch instead of the best one")
    a = p.parse_args()
    if a.out_dir:
        try:
            metrics, saved = finetune.reevaluate(a.out_dir)
        except (ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        print(json.dumps({"recomputed": metrics, "saved": saved["metrics"]}, indent=2))
    elif a.table:
        runs = []
        for path in a.table:
            try:
                with open(path) as f:
                    runs.append(json.load(f))
            except (OSError, json.JSONDecodeError) as e:
                sys.exit(f"error: cannot read {path}: {e}")
        print(table(runs, a.columns.split(",") if a.columns else None, a.last))
    else:
        p.print_help()
