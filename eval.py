"""
Re-score a saved run, and merge several runs into one table. The GLUE metrics themselves are data.py's.

    python eval.py --out_dir out/lora-mrpc             # reload the saved tensors, score the dev split again
    python eval.py --out_dir out/* --latency 200       # also re-time batch-1 inference into each metrics.json
    python eval.py --table out/*/metrics.json          # one markdown table, mean ± std over seeds
    python eval.py --table out/*/metrics.json --last   # the same at the last epoch (seed 002's tables)
    python eval.py --table runs/seed001/*/metrics.json --paper 001   # seed 001's Tables 1 and 2, paper beside
    python eval.py --plot_dynamic runs/seed001/dynamic_lora-*/metrics.json --png dyn.png
                                                       # r_l map, m_l curves
    python eval.py --plot_ranks runs/s003/mrpc-adalora-*/metrics.json --png ranks.png   # kept ranks
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

import finetune


SEED_ARGS = ("seed", "out_dir")  # the only arguments runs may differ in and still be averaged as seeds


def config(run):
    """A run's arguments except --seed and --out_dir: runs with different configs are never averaged."""
    return {k: v for k, v in run.get("args", {}).items() if k not in SEED_ARGS}


def selected(run):
    """Which epoch the run reports: --select's choice; runs from before --select kept the best dev epoch."""
    return run.get("select") or ("last" if len(run.get("history", [])) <= 1 else "best on dev")


def table(runs, columns=None, last=False):
    """Markdown table of metrics.json dicts, mean ± std over seeds. One row per (task, label, model, every
    argument but --seed and --out_dir); a line under the table names the arguments that differ between rows.
    The label is train.py's method.label(): each TLoRA+ configuration and λ, and QLoRA, get their own rows.
    last=True reads the last epoch (with its train loss and accuracy) instead of the one --select kept."""
    if last:
        runs = [{**r, "metrics": {k: v for k, v in r["last"].items()
                                  if k not in ("epoch", "step", "holdout")}}
                for r in runs]
    groups = defaultdict(list)
    for r in runs:
        key = json.dumps(config(r), sort_keys=True)
        groups[(r["task"], r.get("label", r["method"]), os.path.basename(str(r["model"]).rstrip("/")),
                key)].append(r)
    configs = [json.loads(k[3]) for k in groups]
    differ = sorted({a for c in configs for a in c if a != "method" and  # the method has its column
                     len({json.dumps(d.get(a)) for d in configs}) > 1})
    columns = columns or sorted({k for r in runs for k in r["metrics"]})
    epochs = "the last epoch" if last else \
        "the epoch each run kept (" + ", ".join(sorted({selected(r) for r in runs})) + ")"
    lines = [f"Dev metrics at {epochs}; mean ± std over seeds.", "",
             "| task | method | model | " + ("config | " if differ else "") + "seeds | " +
             " | ".join(columns) + " | trainable % |", "|---" * (len(columns) + 5 + bool(differ)) + "|"]
    for (task, method, model, key), rs in sorted(groups.items()):
        cells = []
        for c in columns:
            vals = [r["metrics"][c] for r in rs if c in r["metrics"]]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if len(vals) > 1 else
                         f"{vals[0]:.4f}" if vals else "–")
        cfg = json.loads(key)
        differs = (" ".join(f"{a}={cfg[a]}" for a in differ if cfg.get(a) is not None) + " | "
                   if differ else "")
        lines.append(f"| {task} | {method} | {model} | {differs}{len(rs)} | " + " | ".join(cells) +
                     f" | {rs[0]['trainable_pct']:.3f} |")
    lines += ["", f"Rows differ in: {', '.join(differ)}." if differ else
              "Rows share every argument except --method, --seed and --out_dir."]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# a seed's own tables, with the paper's numbers beside ours

PAPER = {  # (seed, table) -> {our method: (the paper's row name, {column: the paper's value})}; SPEC §2.2
    "001": {
        "full": ("Full Fine-tuning",
                 dict(accuracy=85.3, auc=88.2, f1=84.1, recall=83.7, hours=12.5, ms=15.2, pct=100)),
        "head": ("Feature Extraction",
                 dict(accuracy=81.5, auc=84.0, f1=80.2, recall=79.8, hours=6.8, ms=12.7, pct=0)),
        "adapter": ("Adapter",
                    dict(accuracy=86.1, auc=89.1, f1=85.3, recall=84.9, hours=8.2, ms=13.5, pct=3)),
        "bitfit": ("BitFit",
                   dict(accuracy=85.8, auc=88.5, f1=84.7, recall=84.3, hours=7.9, ms=13.2, pct=1.5)),
        "lora": ("LoRA", dict(accuracy=87.4, auc=90.2, f1=86.5, recall=86.0, hours=7.1, ms=12.9, pct=0.8)),
        "dynamic_lora": ("Ours (Dynamic LoRA)", dict(accuracy=88.1, auc=91.0, f1=87.3, recall=86.8, hours=7.4,
                                                     ms=13.0, pct=0.9)),
    },
}


def mean_std(values, scale=1.0, digits=1):
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def paper_tables(runs, seed):
    """Seed 001's Table 1 (ACC, AUC, F1, Recall in %) and Table 2 (training time, inference ms at batch 1,
    trainable %), ours (mean ± std over seeds) beside the paper's, one row per method in the paper's
    order."""
    paper = PAPER[seed]
    by_method = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    for method, rs in by_method.items():
        if len({json.dumps(config(r), sort_keys=True) for r in rs}) > 1:
            raise ValueError(f"the --method {method} runs differ in more than --seed; give one configuration "
                             f"per method (eval.py --table shows which arguments differ)")
    unknown = sorted(set(by_method) - set(paper))
    if unknown:
        raise ValueError(f"--paper {seed} has no row for --method {unknown[0]}; its rows: {', '.join(paper)}")
    t1 = ["| row | seeds | ACC ours | paper | AUC ours | paper | F1 ours | paper | Recall ours | paper |",
          "|---" * 10 + "|"]
    t2 = ["| row | train s ours | paper h | infer ms merged | unmerged | paper ms "
          "| trainable % ours | paper |",
          "|---" * 8 + "|"]
    for method, (row, p) in paper.items():
        rs = by_method.get(method)
        if not rs:
            continue
        cells = [f"{mean_std([r['metrics'][c] for r in rs], 100)} | {p[c]}"
                 for c in ("accuracy", "auc", "f1", "recall")]
        t1.append(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
        merged = [r.get("latency_merged_ms") for r in rs]
        unmerged = [r.get("latency_ms") for r in rs]
        ms = mean_std(merged, digits=2) if None not in merged else "–"
        ms_un = mean_std(unmerged, digits=2) if None not in unmerged else "–"
        t2.append(f"| {row} | {mean_std([r['train_seconds'] for r in rs], digits=0)} | {p['hours']} | {ms} | "
                  f"{ms_un} | {p['ms']} | {rs[0]['trainable_pct']:.3f} | {p['pct']} |")
    return "\n".join(["Table 1 (%)", "", *t1, "", "Table 2", "", *t2])


def save_png(fig, png):
    """A temp file renamed into place, so a failed write leaves no half image."""
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    print(f"wrote {png}")
    return True


def plot_dynamic(runs, png):
    """The calibrated r_l of every adapted module (layer x matrix) and the m_l trajectories of one run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib)")
        return False
    report = runs[0]["method_report"]
    names = list(report["ranks"])
    layers = sorted({int(n.split(".")[1]) for n in names})
    kinds = list(dict.fromkeys(n.split(".", 2)[2] for n in names))
    grid = np.array([[report["ranks"].get(f"h.{i}.{k}", np.nan) for k in kinds] for i in layers])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = a.imshow(grid, cmap="viridis")
    a.set_xticks(range(len(kinds)), kinds, rotation=30)
    a.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    for (i, j), v in np.ndenumerate(grid):
        a.text(j, i, f"{v:.0f}", ha="center", va="center", color="w")
    a.set_title(f"calibrated rank r_l ({runs[0]['args'].get('model', '')})"
                .replace("/root/.cache/nanopeft/", ""))
    fig.colorbar(im, ax=a)
    for r in runs:
        rows = [{"step": 0, "m": dict.fromkeys(names, 1.0)}]  # m = 1 at init, then one row per ω update
        rows += r["method_report"]["m_trajectory"]
        for n in names:
            b.plot([row["step"] for row in rows], [row["m"][n] for row in rows], lw=0.8, alpha=0.6,
                   color=plt.cm.tab10(kinds.index(n.split(".", 2)[2])), marker=".")
    for k, kind in enumerate(kinds):
        b.plot([], [], color=plt.cm.tab10(k), label=kind)
    b.legend(fontsize=8, ncol=2)
    b.axhline(1.0, color="k", lw=0.5)
    b.set_xlabel("step")
    b.set_ylabel("m_l = L_n·ω_l")
    b.set_title(f"m_l per module, {len(runs)} seed(s), coloured by matrix")
    return save_png(fig, png)


def plot_ranks(runs, png):
    """The kept (AdaLoRA, ADAQ-LoRA) or calibrated (Dynamic LoRA) rank of every adapted matrix, layer x
    matrix, averaged over the runs given (their seeds)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib)")
        return False
    names = list(runs[0]["method_report"]["ranks"])
    layers = sorted({int(n.split(".")[1]) for n in names})
    kinds = list(dict.fromkeys(n.split(".", 2)[2] for n in names))
    grid = np.array([[np.mean([r["method_report"]["ranks"].get(f"h.{i}.{k}", np.nan) for r in runs])
                      for k in kinds] for i in layers])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    im = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w")
    ax.set_title(f"{runs[0]['label']} on {runs[0]['task']}: rank per matrix, mean of {len(runs)} run(s)")
    fig.colorbar(im, ax=ax)
    return save_png(fig, png)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", nargs="+",
                   help="folders written by train.py: re-evaluate their saved tensors")
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="with --out_dir: also time N batch-1 passes, merged and not, and store them in each "
                        "metrics.json (SPEC 1.5: 200; run it with nothing else on the machine)")
    p.add_argument("--table", nargs="+", metavar="METRICS_JSON",
                   help="metrics.json files to merge into a table")
    p.add_argument("--columns", help="comma-separated metrics to show (default: all)")
    p.add_argument("--last", action="store_true",
                   help="table the last epoch instead of the one each run kept (--select)")
    p.add_argument("--paper", choices=sorted(PAPER),
                   help="the seed's own tables, with the paper's numbers beside")
    p.add_argument("--plot_dynamic", nargs="+", metavar="METRICS_JSON",
                   help="Dynamic LoRA runs: plot r_l and m_l")
    p.add_argument("--plot_ranks", nargs="+", metavar="METRICS_JSON",
                   help="runs with per-matrix ranks (adalora, adaq_lora, dynamic_lora): a layer x matrix "
                        "heat map")
    p.add_argument("--png", default="dynamic_lora.png",
                   help="where --plot_dynamic / --plot_ranks write (matplotlib optional)")
    a = p.parse_args()
    if a.out_dir:
        for out_dir in a.out_dir:
            try:
                metrics, saved = finetune.reevaluate(out_dir, latency_passes=a.latency)
            except (ValueError, OSError, FloatingPointError) as e:
                sys.exit(f"error: {e}")
            print(json.dumps({"out_dir": out_dir, "recomputed": metrics, "saved": saved["metrics"]},
                             indent=2))
            if a.latency:  # the run's own numbers stay; only the latency fields are replaced, atomically
                saved.update(latency_ms=metrics["latency_ms"], latency_merged_ms=metrics["latency_merged_ms"],
                             latency_note=f"re-measured by eval.py --latency {a.latency}")
                finetune.write_json(os.path.join(out_dir, "metrics.json"), saved)
    elif a.table or a.plot_dynamic or a.plot_ranks:
        runs = []
        for path in a.table or a.plot_dynamic or a.plot_ranks:
            try:
                with open(path) as f:
                    runs.append(json.load(f))
            except (OSError, json.JSONDecodeError) as e:
                sys.exit(f"error: cannot read {path}: {e}")
        try:
            if a.plot_dynamic:
                plot_dynamic(runs, a.png)
            elif a.plot_ranks:
                plot_ranks(runs, a.png)
            elif a.paper:
                print(paper_tables(runs, a.paper))
            else:
                print(table(runs, a.columns.split(",") if a.columns else None, a.last))
        except (KeyError, ValueError) as e:
            sys.exit(f"error: {e if isinstance(e, ValueError) else f'a metrics.json lacks the key {e}'}")
    else:
        p.print_help()
