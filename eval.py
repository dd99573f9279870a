"""
GLUE metrics (SPEC §1.5) through scikit-learn, re-evaluation of a saved run, and a table of several runs.

    python eval.py --out_dir out/lora-mrpc            # reload the saved adapter/head and score the dev split again
    python eval.py --table out/*/metrics.json         # one markdown table, mean ± std over seeds
    python eval.py --table out/*/metrics.json --last  # the same at the last epoch (seed 002's tables)
"""
import argparse
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, recall_score, roc_auc_score

POSITIVE = {"mrpc": 1, "qqp": 1, "sst2": 1, "cola": 1, "qnli": 0, "rte": 0}  # SPEC §1.4: RTE/QNLI entailment = 0
MAIN_METRIC = {"cola": "mcc", "stsb": "pearson"}  # the rest: accuracy


def main_metric(task):
    return MAIN_METRIC.get(task, "accuracy")


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def glue_metrics(task, logits, labels):
    """logits (N, C) or (N, 1) for STS-B, labels (N,) -> {metric: value}."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if task == "stsb":
        pred = logits.reshape(-1)
        return {"pearson": float(pearsonr(pred, labels)[0]), "spearman": float(spearmanr(pred, labels)[0]),
                "mse": float(np.mean((pred - labels) ** 2))}
    prob = softmax(logits)
    pred = prob.argmax(1)
    out = {"accuracy": float(accuracy_score(labels, pred)), "mcc": float(matthews_corrcoef(labels, pred)),
           "loss": float(-np.mean(np.log(np.clip(prob[np.arange(len(labels)), labels], 1e-12, None))))}
    if task in POSITIVE:  # binary tasks: F1, recall and ROC-AUC of the positive class
        pos = POSITIVE[task]
        out["f1"] = float(f1_score(labels, pred, pos_label=pos, zero_division=0))
        out["recall"] = float(recall_score(labels, pred, pos_label=pos, zero_division=0))
        out["auc"] = float(roc_auc_score(labels == pos, prob[:, pos])) if len(set(labels.tolist())) == 2 else math.nan
    return out


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


def reevaluate(out_dir):
    """Rebuild the run's model from its metrics.json, load its saved tensors and score the dev split."""
    import train
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; --out_dir must be a folder written by train.py")
    with open(path) as f:
        saved = json.load(f)
    args = train.parse_args([])
    vars(args).update(saved["args"])
    model, method, tok, task = train.build(args)
    method.load(model, out_dir)
    dev = train.load_examples(task, "dev", args, tok)
    return train.evaluate(model, dev, task, args, tok.pad_id), saved


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="a folder written by train.py: re-evaluate its saved tensors")
    p.add_argument("--table", nargs="+", metavar="METRICS_JSON", help="metrics.json files to merge into a table")
    p.add_argument("--columns", help="comma-separated metrics to show (default: all)")
    p.add_argument("--last", action="store_true", help="table the last epoch instead of the best one")
    a = p.parse_args()
    if a.out_dir:
        metrics, saved = reevaluate(a.out_dir)
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
