"""
Every table and plot of runs, and RESULTS.md, regenerated from the runs themselves: every table and plot comes
out of the metrics.json files under results/ (and the json files bench.py wrote there); the papers' numbers
beside ours come from one table per paper below; the text between the tables is results/notes/*.md, written
by hand about those runs.

    python report.py --out RESULTS.md                      # the report, and its PNGs in results/
    python report.py --grid_best results/seed000/mrpc      # prints "α* λ* η*", chosen on the held-out slice
    python report.py --eta_best results/seed002/rank       # prints the rank table's η, chosen the same way
    python report.py --table out/*/metrics.json            # one markdown table, mean ± std over seeds
    python report.py --table out/*/metrics.json --last     # the same at the last epoch
    python report.py --table runs/dyn/*/metrics.json --paper dynamic_lora   # the paper's Tables 1-2 beside
    python report.py --plot_dynamic runs/dyn/dynamic_lora-*/metrics.json --png dyn.png   # r_l map, m_l curves
    python report.py --plot_ranks runs/ada/mrpc-adalora-*/metrics.json --png ranks.png  # kept ranks
    bash experiments.sh MINILM_DIR                          # the per-matrix-rate runs, then this report
    bash experiments_tlora.sh MINILM_DIR                    # TLoRA+'s rank, CoLA and RTE tables, then this

matplotlib is optional: without it the tables render and the report lists the plots it skipped.
"""
import argparse
import functools
import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np

import checkpoint
import data
import metrics
import train

NEEDED = ("task", "method", "metrics", "last", "history", "args", "trainable_params", "trainable_pct")
RUN_MARKERS = tuple(f for f in checkpoint.RUN_FILES if f != "metrics.json")  # a run folder's other files


# -----------------------------------------------------------------------------
# one table of runs, mean ± std over seeds

# the only arguments runs may differ in and still be averaged as seeds: the seed, and where and how often a
# run logs and saves (the flags a resumed run may change); latency_passes, a flag of older runs, only timed
# inference after training
SEED_ARGS = ("seed", "latency_passes") + tuple(checkpoint.RESUME_MAY_CHANGE)


@functools.lru_cache(maxsize=None)
def defaults(method):
    """train.py's defaults for --method method (the run's flags and the method's config fields)."""
    try:
        return vars(train.parse_args(["--method", method, "--device", "cpu"]))
    except ValueError:  # a method train.py does not know (bench.py's peft_lora): the run's flags alone
        return vars(train.parse_args(["--device", "cpu"]))


def config(run):
    """A run's arguments except SEED_ARGS: runs with different configs are never averaged. A flag added to
    train.py after a run was made counts at its default, which is what that run did."""
    args = run.get("args", {})
    base = defaults(args.get("method") or run.get("method", "lora"))
    args = {**{k: v for k, v in base.items() if k not in args}, **args}
    return {k: v for k, v in args.items() if k not in SEED_ARGS}


def selected(run):
    """Which epoch the run reports: --select's choice; runs from before --select kept the best dev epoch."""
    return run.get("select") or ("last" if len(run.get("history", [])) <= 1 else "best on dev")


def table(runs, columns=None, last=False):
    """Markdown table of metrics.json dicts, mean ± std over seeds. One row per (task, label, model, every
    argument but SEED_ARGS); a line under the table names the arguments that differ between rows.
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
              "Rows share every argument except --method, --seed and where they log and save."]
    return "\n".join(lines)


def mean_std(values, scale=1.0, digits=1):
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


# -----------------------------------------------------------------------------
# the papers' numbers, beside ours

# the per-matrix-rate paper (LoRA with its own learning rate for A and for B, the form of LoRA+, Hayou et al.
# 2024, arXiv 2402.12354), Table 2, QQP: row -> (ACC, F1, MCC)
PER_MATRIX_TABLE2 = {
    "Ours": (0.910, 0.913, 0.80),
    "Remove adaptive learning rate": (0.900, 0.888, 0.76),
    "Remove low-rank matrix updates": (0.903, 0.905, 0.78),
    "LoRA": (0.882, 0.887, 0.73),
}
# the ADAQ-LoRA paper (Feng et al. 2024), Tables 1 and 2: training memory in MB on Alpaca_zh and School_math
# (ChatGLM2-6B, GPU); it reports no AdaLoRA row
ADAQ_MB = {"lora": (40132, 59551), "qlora": (9231, 12626), "adaq_lora": (8446, 9072)}

# paper -> {our method: (the paper's row name, {column: the paper's value})}. Dynamic LoRA (arXiv 2501.14859),
# Tables 1 (GLUE: ACC, AUC, F1, Recall in %) and 2 (training hours, inference ms, trainable %)
PAPER = {
    "dynamic_lora": {
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


def paper_tables(runs, paper_name):
    """A paper's Table 1 (ACC, AUC, F1, Recall in %) and Table 2 (training time, inference ms at batch 1,
    trainable %), ours (mean ± std over seeds) beside the paper's, one row per method in the paper's
    order."""
    paper = PAPER[paper_name]
    by_method = defaultdict(list)
    for r in runs:
        by_method[r["method"]].append(r)
    for method, rs in by_method.items():
        if len({json.dumps(config(r), sort_keys=True) for r in rs}) > 1:
            raise ValueError(f"the --method {method} runs differ in more than --seed; give one configuration "
                             f"per method (report.py --table shows which arguments differ)")
    unknown = sorted(set(by_method) - set(paper))
    if unknown:
        raise ValueError(f"--paper {paper_name} has no row for --method {unknown[0]}; its rows: "
                         f"{', '.join(paper)}")
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
    return "\n".join(["Table 1 (%), ours beside the paper's", "", *t1, "", "Table 2", "", *t2])


# -----------------------------------------------------------------------------
# bench.py's tables, from its json files (printed by bench.py too)

MRPC_STEPS_30_EPOCHS = 30 * 230  # 3668 examples at batch 16: a 30-epoch MRPC schedule, in steps
BF16_PEAK_TFLOPS = 989.0  # H100/H200 dense bf16 (datasheet); CUDA rows report the fraction of it


def memory_table(rows, threads):
    """bench.py memory's table: peak training memory, ours beside the reference, the ADAQ-LoRA paper's MB."""
    ref = {r["row"]: r for r in rows if r["stack"] == "reference"}
    c = rows[0]
    lines = [f"Peak RSS of {c['steps']} training steps (VmHWM reset after the build), {c['model']} "
             f"random init, batch {c['batch']} x {c['seq']} tokens, one fresh process per row, {threads} "
             f"thread(s). LoRA/QLoRA: r 64, α 16 on every block linear; AdaLoRA/ADAQ: init_r 12, "
             f"target_r 8. Reference: transformers + peft (+ bitsandbytes NF4 + double quant for the "
             f"4-bit rows).", "",
             "| row | ours MB | reference MB | ours / ref | adapter params ours / ref | bits/param (4-bit) | "
             "paper MB (Alpaca_zh, School_math; ChatGLM2-6B, GPU) |", "|---" * 7 + "|"]
    for r in rows:
        if r["stack"] != "ours":
            continue
        f = ref[r["row"]]
        paper = ADAQ_MB.get(r["row"])
        lines.append(f"| {r['row']} | {r['train_peak_mb']:.0f} | {f['train_peak_mb']:.0f} | "
                     f"{r['train_peak_mb'] / f['train_peak_mb']:.2f} | {r['adapter_params']:,} / "
                     f"{f['adapter_params']:,} | "
                     f"{'%.3f' % r['bits_per_param'] if r['bits_per_param'] != 32 else '–'} | "
                     f"{'%d, %d' % paper if paper else '–'} |")
    return "\n".join(lines)


def speed_table(rows, device):
    """bench.py speed's table for one model: step time, tokens/s, ratios, latency, memory, adapter size."""
    base = next(r for r in rows if r["impl"] == "base")
    peft = next(r for r in rows if r["impl"] == "peft")
    peft_of = {r["method"]: r for r in rows if r["impl"] == "peft"}  # QLoRA beside peft's QLoRA, if timed
    lora = next(r for r in rows if (r["impl"], r["method"], r["compile"]) == ("ours", "lora", False))
    name, mrpc = os.path.basename(rows[0]["model"].rstrip("/")), not rows[0].get("causal")
    out = [f"**{name}** (lengths: {base['real_tokens']} real tokens in {base['batch']} x {base['T']})", "",
           "| impl | method | ms/step | tokens/s | × peft (its method, else LoRA) | × our LoRA | "
           "× frozen base | eval ms (merged) | peak MB | adapter KB | trainable |" +
           (" 30 MRPC epochs s |" if mrpc else "") + (" % bf16 peak |" if device == "cuda" else ""),
           "|---" * (11 + mrpc + (device == "cuda")) + "|"]
    for r in rows:
        label = r["method"] + (" (compiled)" if r["compile"] else "")
        merged = f" ({r['eval_merged_ms']:.1f})" if r["eval_merged_ms"] is not None else ""
        kb = f"{r['adapter_bytes'] / 1024:.0f}" if r["adapter_bytes"] else "–"
        out.append(f"| {r['impl']} | {label} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                   f"{r['step_ms'] / peft_of.get(r['method'], peft)['step_ms']:.2f} | "
                   f"{r['step_ms'] / lora['step_ms']:.2f} | "
                   f"{r['step_ms'] / base['step_ms']:.2f} | "
                   f"{r['eval_ms']:.1f}{merged} | {r['peak_mb']:.0f} | {kb} | {r['trainable']:,} |" +
                   (f" {MRPC_STEPS_30_EPOCHS * r['step_ms'] / 1e3:.0f} |" if mrpc else "") +
                   (f" {100 * r['tflops'] / BF16_PEAK_TFLOPS:.1f} |" if device == "cuda" else ""))
    return out + [""]


def scale_table(rows, runs, global_batch, cpus):
    """bench.py scale's tables, from its rows."""
    r0 = rows[0]
    peak = "RSS" if r0.get("device", "cpu") == "cpu" else "allocated"
    lines = [f"LoRA r 64 on {r0['model']} (random init), batch {r0['batch']} x {r0['seq']}, {r0['steps']} "
             f"steps, one fresh process and one thread per row", "",
             f"| --grad_checkpointing | training peak {peak} MB | s/step |", "|---|---|---|"]
    lines += [f"| {r['grad_checkpointing']} | {r['train_peak_mb']:.0f} | {r['s_per_step']:.2f} |"
              for r in rows]
    if runs:
        lines += ["", f"train.py on MiniLM MRPC, global batch {global_batch}, {runs[0]['steps']} steps, "
                  f"{cpus} CPU threads shared by the processes", "",
                  "| processes | examples/s | × 1 process |", "|---|---|---|"]
        lines += [f"| {r['processes']} | {r['examples_per_s']:.1f} | "
                  f"{r['examples_per_s'] / runs[0]['examples_per_s']:.2f} |" for r in runs]
    return lines


def generate_table(result):
    """bench.py generate's table, from its json."""
    a, rows = result["config"], result["rows"]
    ref = rows["transformers"]["tokens_per_s"]
    model = (os.path.basename(a["model"].rstrip("/")) if a.get("model") else
             f"random GPT-2 {a['n_layer']}x{a['n_embd']}")
    return [f"greedy decoding, {model}, batch {a['batch']}, prompts "
            f"{min(result['lengths'])}-{a['prompt']} tokens (left-padded), {a['new']} new tokens, "
            f"{a['device']}, {a['threads']} thread(s), the median of {a.get('repeats', 1)} runs that took "
            f"the decoders in turn; the same tokens from all three: {result['same_tokens']}",
            "",
            "| decoding | s | tokens/s | tokens/s ÷ transformers' |", "|---|---|---|---|"] + [
        f"| {name} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / ref:.2f}× |"
        for name, r in rows.items()]


# -----------------------------------------------------------------------------
# plots (matplotlib optional)

def pyplot():
    """matplotlib.pyplot, or None (with a note) when matplotlib is not installed: plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib)")
        return None


def save_png(fig, png):
    """A temp file renamed into place, so a failed write leaves no half image."""
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    print(f"wrote {png}")
    return True


def plot_dynamic(runs, png):
    plt = pyplot()
    return plt is not None and save_png(dynamic_figure(plt, runs), png)


def plot_ranks(runs, png):
    plt = pyplot()
    return plt is not None and save_png(ranks_figure(plt, runs), png)


def dynamic_figure(plt, runs):
    """The calibrated r_l of every adapted module (layer x matrix) and the m_l trajectories of one run."""
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
    return fig


def ranks_figure(plt, runs):
    """The kept (AdaLoRA, ADAQ-LoRA) or calibrated (Dynamic LoRA) rank of every adapted matrix, layer x
    matrix, averaged over the runs given (their seeds)."""
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
    return fig


class Plots:
    """Writes PNGs into folder and returns the markdown that shows them; without matplotlib it records what
    it skipped, and the report says so."""

    def __init__(self, folder, out_dir):
        self.folder, self.out_dir, self.skipped = folder, out_dir, []
        self.plt = pyplot()

    def add(self, name, title, draw):
        """draw(plt) -> a figure. Returns the markdown image line, or "" when skipped."""
        if self.plt is None:
            self.skipped.append(name)
            return ""
        png = os.path.join(self.folder, name)
        fig = draw(self.plt)
        save_png(fig, png)
        self.plt.close(fig)
        return f"![{title}]({os.path.relpath(png, self.out_dir)})"


def heat_map(plt, grid, xlabels, ylabels, title, xname="", fmt="{:.3f}"):
    fig, ax = plt.subplots(figsize=(1.2 * len(xlabels) + 2, 0.6 * len(ylabels) + 1.6))
    im = ax.imshow(grid, cmap="viridis")
    ax.set_xticks(range(len(xlabels)), xlabels)
    ax.set_xlabel(xname)
    ax.set_yticks(range(len(ylabels)), ylabels)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def loss_curves(plt, groups, title):
    """groups: {row: [runs]}: the mean over seeds of each logged train-loss window, per row."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, rs in groups.items():
        steps = [s for s, _, _ in rs[0]["loss_log"]]
        losses = np.mean([[l for _, l, _ in r["loss_log"][:len(steps)]] for r in rs], axis=0)
        ax.plot(steps, losses, label=f"{row} ({len(rs)} seed{'s' * (len(rs) > 1)})", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (window mean)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return fig


def metric_vs_params(plt, runs, task, metric, res):
    """Each (section, label, config) group of a task with 2 or more seeds: dev metric (mean ± std) against
    trainable parameters, coloured by the section (the results/ folder) it comes from."""
    groups = defaultdict(list)
    for r in runs:
        if r["task"] == task and r["args"].get("epochs") != 0:
            section = os.path.relpath(r["path"], res).split(os.sep)[0]
            groups[(section, r.get("label", r["method"]), json.dumps(config(r), sort_keys=True))].append(r)
    groups = {k: rs for k, rs in groups.items() if len(rs) > 1}
    sections = sorted({k[0] for k in groups})
    fig, ax = plt.subplots(figsize=(8, 5))
    for (section, label, _), rs in sorted(groups.items()):
        y = [r["last"][metric] for r in rs]
        c = plt.cm.tab10(sections.index(section))
        ax.errorbar(rs[0]["trainable_params"], np.mean(y), yerr=np.std(y), fmt="o", ms=4, capsize=2, color=c)
        ax.annotate(label, (rs[0]["trainable_params"], np.mean(y)), fontsize=6, xytext=(3, 2),
                    textcoords="offset points", color=c)
    for i, s in enumerate(sections):
        ax.plot([], [], "o", color=plt.cm.tab10(i), label=s)
    ax.legend(fontsize=7, title="results/", title_fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"dev {metric}, last epoch (mean ± std over seeds)")
    ax.set_title(f"{task}: every configuration with 2 or more seeds under results/ ({len(groups)})",
                 fontsize=9)
    return fig


# -----------------------------------------------------------------------------
# reading the runs

def read_run(path):
    """One metrics.json, or a ValueError naming the file and the fix."""
    try:
        with open(path) as f:
            run = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run that run or delete its folder") from None
    missing = [k for k in NEEDED if k not in run] if isinstance(run, dict) else ["(not an object)"]
    if missing:
        raise ValueError(f"{path} is not a train.py metrics.json: it lacks {', '.join(missing)}; re-run that "
                         f"run or delete its folder")
    run["path"] = path
    return run


def runs_under(folder):
    """Every run below folder. A run folder without its metrics.json (killed, or still running) is refused:
    a report must not silently leave a run out."""
    runs = []
    for d, _, files in sorted(os.walk(folder)):
        if "metrics.json" in files:
            runs.append(read_run(os.path.join(d, "metrics.json")))
        elif any(f in files for f in RUN_MARKERS):
            raise ValueError(f"{d} has no metrics.json (an unfinished or failed run): finish it (train.py "
                             f"--resume, or bash experiments.sh) or delete the folder")
    return runs


def read_bench(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); run its bench.py command again") from None


def arg(run, name):
    return run["args"].get(name)


def targets(run):
    """The adapted matrices as --targets spells them: "all-linear" or "query,value"."""
    t = run.get("method_config", {}).get("targets") or arg(run, "targets") or "all-linear"
    return t if isinstance(t, str) else ",".join(t)


def lr(x):
    """A learning rate as the commands write it: 5e-5, 1e-4, 3.2e-3."""
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}" if x else "0"


def note(res, name):
    """A hand-written paragraph about the runs (results/notes/NAME.md)."""
    path = os.path.join(res, "notes", name + ".md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [f.read().strip(), ""]


def run_table(runs, columns, last=True):
    if not runs:
        return ["(no runs)", ""]
    return [table(runs, columns.split(","), last), ""]


# -----------------------------------------------------------------------------
# per-matrix learning rates: the α × λ grid and the 2 × 2 ablation (results/seed000)

ALPHAS = (5e-5, 1e-4, 2e-4, 4e-4)  # the lr of every A
LAMBDAS = (1, 2, 4, 8, 16)  # B's lr = λ·α


def holdout_score(run):
    """The grid's selection rule, fixed before the runs: the task's main metric on the held-out slice of
    train at the epoch the run kept, ties broken by the lower held-out loss. Dev is never read."""
    h = run["history"][run.get("selected_epoch", len(run["history"])) - 1].get("holdout")
    if h is None:
        raise ValueError(f"{run['path']} has no held-out scores: the grid's runs need --select holdout")
    return h[metrics.main_metric(run["task"])], -h["loss"]


def grid_runs(runs):
    """(α, λ) -> the seed-0 all-linear run at that cell."""
    grid = {}
    for r in runs:
        if arg(r, "seed") == 0 and targets(r) == "all-linear" and r["method"] == "lora":
            cell = (arg(r, "lr"), arg(r, "lr_ratio") or 1.0)
            if cell[0] in ALPHAS and cell[1] in LAMBDAS:
                grid[cell] = r
    return grid


def grid_best(runs):
    """(α*, λ*) over the whole grid and the tied η* over its λ = 1 column, each by holdout_score."""
    grid = grid_runs(runs)
    tied = {c: r for c, r in grid.items() if c[1] == 1}
    if len(grid) < len(ALPHAS) * len(LAMBDAS):
        raise ValueError(f"the grid has {len(grid)} of {len(ALPHAS) * len(LAMBDAS)} seed-0 cells (--method "
                         f"lora, all linear, --lr in {ALPHAS}, --lr_ratio in {LAMBDAS}); finish it (bash "
                         f"experiments.sh) before choosing")
    a, l = max(grid, key=lambda c: holdout_score(grid[c]))
    e, _ = max(tied, key=lambda c: holdout_score(tied[c]))
    return a, l, e


def ablation_rows(runs, a, l, e):
    """The 2 × 2 ablation of the paper's Table 2: the runs of each row, found by their flags (seeds 0, 1, 2).
    Its "low-rank matrix updates" is undefined; our substitute adapts q and v only, as LoRA's paper did."""
    rows = {"Ours": (a, l, "all-linear"), "Remove adaptive learning rate": (e, 1.0, "all-linear"),
            "Remove low-rank matrix updates": (a, l, "query,value"), "LoRA": (e, 1.0, "query,value")}
    found = {}
    for row, (a_lr, ratio, tgt) in rows.items():
        found[row] = sorted((r for r in runs if arg(r, "lr") == a_lr and (arg(r, "lr_ratio") or 1.0) == ratio
                             and targets(r) == tgt), key=lambda r: arg(r, "seed"))
    return rows, found


def verdict(found, better, worse):
    """A paper claim "better > worse" on dev accuracy, paired by seed, beside the paper's gap."""
    paper_gap = 100 * (PER_MATRIX_TABLE2[better][0] - PER_MATRIX_TABLE2[worse][0])
    a = {arg(r, "seed"): r["last"]["accuracy"] for r in found[better]}
    b = {arg(r, "seed"): r["last"]["accuracy"] for r in found[worse]}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return f"**not testable yet**: {len(seeds)} paired seed(s)"
    d = [100 * (a[s] - b[s]) for s in seeds]
    word = ("reproduced" if min(d) > 0 else  # the paper's direction on every seed
            "not shown (the mean goes the paper's way, not every seed)" if np.mean(d) > 0 else
            "not reproduced")
    return (f"**{word}**: {np.mean(d):+.2f} points (paper {paper_gap:+.1f}); per seed " +
            ", ".join(f"{x:+.2f}" for x in d))


def grid_verdict(hold, metric):
    """Per-matrix rates against the tied rate, within each α row of the grid (held-out scores, one seed):
    the row's best λ > 1 cell against its λ = 1 cell, and every λ > 1 cell against it. *reproduced*: every
    row's best beats λ = 1, and so do more than half of all λ > 1 cells; *not reproduced*: half the rows or
    fewer."""
    gaps = [100 * (max(row[1:]) - row[0]) for row in hold]
    rows = sum(g > 0 for g in gaps)
    cells, n = int((hold[:, 1:] > hold[:, :1]).sum()), hold[:, 1:].size
    word = ("reproduced" if rows == len(gaps) and cells > n / 2 else
            "not reproduced" if rows <= len(gaps) / 2 else "not shown")
    return (f"- Per-matrix rates beat the tied rate within an α row (held-out {metric}, seed 0): the row's "
            f"best λ > 1 cell beats its λ = 1 cell in {rows} of {len(gaps)} rows (by " +
            ", ".join(f"{g:+.2f}" for g in gaps) + f" points, α {lr(ALPHAS[0])} to {lr(ALPHAS[-1])}), and "
            f"{cells} of {n} λ > 1 cells beat their row's λ = 1 cell: **{word}** (*reproduced*: every row "
            f"and more than half the cells; *not reproduced*: half the rows or fewer; one seed, on the "
            f"selection split, so a gap of one held-out example is noise).")


def lr_grid_section(folder, task, plots):
    runs = runs_under(folder)
    if not runs:
        return [f"No runs in `{folder}`: `bash experiments.sh MINILM_DIR` makes them.", ""]
    grid = grid_runs(runs)
    metric = metrics.main_metric(task)
    out = [f"### {data.get_task(task).folder}", ""]
    hold = np.full((len(ALPHAS), len(LAMBDAS)), np.nan)
    loss = hold.copy()
    for (a_lr, ratio), r in grid.items():
        hold[ALPHAS.index(a_lr), LAMBDAS.index(ratio)], loss[ALPHAS.index(a_lr), LAMBDAS.index(ratio)] = \
            holdout_score(r)
    sub = arg(next(iter(grid.values()), runs[0]), "max_train_samples")
    out += [f"The α × λ grid, seed 0 ({len(grid)} of {hold.size} cells): held-out {metric} / loss (10% of "
            f"the {f'first {sub} ' if sub else ''}train rows, never trained on); B learns at λ·α.", "",
            "| α \\ λ | " + " | ".join(str(l) for l in LAMBDAS) + " |", "|---" * (len(LAMBDAS) + 1) + "|"]
    for i, a in enumerate(ALPHAS):
        out.append(f"| {lr(a)} | " + " | ".join("–" if np.isnan(v) else f"{v:.4f} / {-n:.3f}"
                                                for v, n in zip(hold[i], loss[i])) + " |")
    out.append("")
    out.append(plots.add(f"lr_grid_{task}.png", f"per-matrix learning rates: the grid, {task}",
                         lambda plt: heat_map(plt, hold, [str(l) for l in LAMBDAS],
                                              [f"α {lr(a)}" for a in ALPHAS],
                                              f"{task}: held-out {metric}, seed 0 (B at λ·α)", "λ")))
    if len(grid) < hold.size:
        return out + ["", "The grid is incomplete: no choice and no ablation yet.", ""]
    a, l, e = grid_best(runs)
    sa, sl = holdout_score(grid[(a, l)]), holdout_score(grid[(e, 1.0)])
    out += ["", f"Chosen on the held-out slice: **α\\* = {lr(a)}, λ\\* = {l:g}** (held-out {metric} "
            f"{sa[0]:.4f}); the best tied rate (λ = 1) **η\\* = {lr(e)}** ({sl[0]:.4f}).", ""]
    rows, found = ablation_rows(runs, a, l, e)
    out += ["The paper's 2 × 2 ablation on GLUE dev at the last (only) epoch, mean ± std over seeds; the "
            "paper's Table 2 (QQP) beside:", "",
            "| row | targets | A lr | B lr | seeds | ACC | F1 | MCC | paper ACC | F1 | MCC | trainable % |",
            "|---" * 12 + "|"]
    for row, (a_lr, ratio, tgt) in rows.items():
        rs = found[row]
        p = PER_MATRIX_TABLE2[row]
        cells = " | ".join(mean_std([r["last"][c] for r in rs], digits=3) if rs else "–"
                           for c in ("accuracy", "f1", "mcc"))
        pct = f"{rs[0]['trainable_pct']:.3f}" if rs else "–"
        out.append(f"| {row} | {tgt} | {lr(a_lr)} | {lr(a_lr * ratio)} | {len(rs)} | {cells} | {p[0]} | "
                   f"{p[1]} | {p[2]} | {pct} |")
    out += ["", "Verdicts (the ablation's on dev accuracy, paired by seed; *reproduced*: the paper's "
            "direction on every seed; *not shown*: on average only; *not reproduced*: not even on "
            "average):", "",
            grid_verdict(hold, metric),
            f"- Ours > Remove adaptive learning rate (tied η\\*): "
            f"{verdict(found, 'Ours', 'Remove adaptive learning rate')}.",
            f"- Ours > Remove low-rank matrix updates (q, v only, our substitute for the undefined row): "
            f"{verdict(found, 'Ours', 'Remove low-rank matrix updates')}.",
            f"- Ours > LoRA (q, v only, tied η\\*): {verdict(found, 'Ours', 'LoRA')}.",
            "- The absolute QQP numbers (0.910 ACC) and Table 1 (a closed GPT-4 fine-tune, full fine-tuning "
            "of BERT/RoBERTa-base for 25 epochs): **not testable here** (no QQP data on this machine, a "
            "2-core CPU, MiniLM for 1 epoch).", ""]
    curves = {row: rs for row, rs in found.items() if rs and "loss_log" in rs[0]}
    if curves:
        out.append(plots.add(f"lr_ablation_{task}_loss.png", f"per-matrix learning rates: ablation train "
                             f"loss, {task}", lambda plt: loss_curves(plt, curves, f"{task}: the 2 × 2 "
                                                                      f"ablation, train loss")))
    return out + [""]


# -----------------------------------------------------------------------------
# the other sections: their runs and bench files, tabled by the functions above

def kind(name):
    """The matrix of an adapted module: h.3.attn.value -> attn.value."""
    return name.split(".", 2)[2]


def m_table(runs):
    """Dynamic LoRA's importance multipliers m_l at each ω update, per matrix: the mean over the blocks that
    matrix is adapted in, and the largest block's, each as its range over the runs (seeds)."""
    steps = [row["step"] for row in runs[0]["method_report"]["m_trajectory"]]
    kinds = list(dict.fromkeys(kind(n) for n in runs[0]["method_report"]["ranks"]))

    def span(values):  # min–max at two decimals, or one number where they agree
        lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
        return lo if lo == hi else f"{lo}–{hi}"
    blocks = len(runs[0]["method_report"]["ranks"]) // len(kinds)
    lines = [f"Dynamic LoRA's m_l = L_n·ω_l per matrix at each ω update (1 at the start): the mean over the "
             f"{blocks} blocks, and the largest block's, each as its range over the {len(runs)} runs "
             f"(seeds).", "",
             "| matrix | " + " | ".join(f"step {s} mean | step {s} largest" for s in steps) + " |",
             "|---" * (1 + 2 * len(steps)) + "|"]
    for k in kinds:
        cells = []
        for i in range(len(steps)):
            per_run = [[v for n, v in r["method_report"]["m_trajectory"][i]["m"].items() if kind(n) == k]
                       for r in runs]
            cells += [span([np.mean(v) for v in per_run]), span([max(v) for v in per_run])]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def dynamic_lora_section(res, plots):
    runs = runs_under(os.path.join(res, "seed001"))
    if not runs:
        return []
    dyn = [r for r in runs if r["method"] == "dynamic_lora"]
    by = defaultdict(list)
    for r in runs:
        by[PAPER["dynamic_lora"][r["method"]][0]].append(r)
    out = ["## Dynamic LoRA (arXiv 2501.14859) on MRPC with MiniLM", "", *note(res, "dynamic_lora"),
           paper_tables(runs, "dynamic_lora"), ""]
    if dyn:
        out += [plots.add("dynamic_lora.png", "Dynamic LoRA: calibrated ranks and m_l",
                          lambda plt: dynamic_figure(plt, dyn)), "", *m_table(dyn)]
    out.append(plots.add("dynamic_lora_loss.png", "Dynamic LoRA and its comparison rows: train loss",
                         lambda plt: loss_curves(plt, by, "MRPC, Dynamic LoRA's six rows: train loss")))
    return out + ["", *note(res, "dynamic_lora_verdict")]


def tlora_section(res, plots):
    out = ["## TLoRA (arXiv 2504.18735) and TLoRA+ (arXiv 2604.13368)", "", *note(res, "tlora")]
    runs = runs_under(os.path.join(res, "tlora_init"))
    if runs:
        out += ["### TLoRA's initialisation: our reading of the paper against the official code "
                "(`--tlora_init`)", "", *note(res, "tlora_init"),
                *run_table(runs, "accuracy,f1,mcc,auc,loss,train_loss,train_accuracy"),
                *note(res, "tlora_init_verdict")]
    sweep = runs_under(os.path.join(res, "seed002", "lambda"))
    if sweep:
        by = defaultdict(list)
        for r in sorted(sweep, key=lambda r: arg(r, "ratio")):
            by[arg(r, "ratio")].append(r)
        epochs = max(len(r["history"]) for r in sweep)
        out += ["### TLoRA+'s λ sweep", "", *note(res, "tlora_plus_lambda"),
                "Dev accuracy / MCC at each epoch (mean over seeds), and the last epoch's dev and train "
                "loss:", "",
                "| λ | η_B / η | η_C / η | seeds | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) +
                " | dev loss | train loss |", "|---" * (6 + epochs) + "|"]
        for lam, rs in by.items():
            cells = [f"{np.mean([r['history'][e]['accuracy'] for r in rs]):.4f} / "
                     f"{np.mean([r['history'][e]['mcc'] for r in rs]):.4f}"
                     for e in range(len(rs[0]["history"]))]
            out.append(f"| {lam:g} | {lam ** 1.5:.2f} | {lam ** 0.5:.2f} | {len(rs)} | " + " | ".join(cells) +
                       f" | {np.mean([r['last']['loss'] for r in rs]):.4f} | "
                       f"{np.mean([r['last']['train_loss'] for r in rs]):.4f} |")
        curves = {f"λ = {lam:g}": rs for lam, rs in by.items()}
        out += ["", plots.add("tlora_plus_lambda.png", "TLoRA+ λ sweep: train loss", lambda plt: loss_curves(
            plt, curves, "MRPC, TLoRA+ (ABC) λ sweep: train loss")), "",
            *note(res, "tlora_plus_lambda_verdict")]
    return out


# -----------------------------------------------------------------------------
# TLoRA+'s comparison: LoRA, Ours and TLoRA across ranks, and LoRA against peft (results/seed002/rank)

# the TLoRA+ paper's Tables 3-6, RoBERTa-base, MRPC: row -> {r: (Val Acc, Val MCC, Tr Acc, Tr Loss, Val Loss)}
TLORA_PAPER = {
    "LoRA": {8: (0.8701, 0.6926, 0.9769, 0.0763, 0.4543), 16: (0.8725, 0.6994, 0.9619, 0.1027, 0.3828),
             32: (0.8529, 0.6511, 0.9607, 0.1179, 0.4002), 64: (0.8897, 0.7411, 0.9472, 0.1454, 0.3320)},
    "Ours": {8: (0.8507, 0.6324, 0.8615, 0.3214, 0.3439), 16: (0.8676, 0.6966, 0.8710, 0.2942, 0.3134),
             32: (0.8824, 0.7249, 0.8919, 0.2534, 0.3388), 64: (0.8848, 0.7283, 0.9226, 0.1859, 0.3652)},
    "TLoRA": {8: (0.6838, 0.0, 0.6548, 0.6701, 0.6694), 16: (0.6838, 0.0, 0.6739, 0.6427, 0.6258),
              32: (0.6838, 0.0, 0.6746, 0.6153, 0.5932), 64: (0.6838, 0.0, 0.6832, 0.5429, 0.5013)},
}
RANK_ROWS = {"lora": "LoRA", "tlora_plus": "Ours", "tlora": "TLoRA"}
MUCH_LESS = 5.0  # points: "TLoRA ≪ LoRA" holds when LoRA leads by more than this on every seed
CLOSE = 1.0  # points: "LoRA ≈ Ours" holds when the mean gap is within this
RTE_MAJORITY = 146 / 277  # RTE's dev split: 146 of its 277 examples are "entailment"


def eta_best(runs):
    """η for every row of the rank table: among the η at which every row has a sel_* run (r 8, seed 0, the
    held-out slice), the one with the best mean holdout_score over the rows. Dev is never read."""
    sel = [r for r in runs if os.path.basename(os.path.dirname(r["path"])).startswith("sel_")]
    if not sel:
        raise ValueError("no sel_* runs (--select holdout) to choose η from; run experiments_tlora.sh")
    rows, by_eta = {r["method"] for r in sel}, defaultdict(list)
    for r in sel:
        by_eta[arg(r, "lr")].append(r)
    whole = {e: rs for e, rs in by_eta.items() if {r["method"] for r in rs} == rows}
    return max(whole, key=lambda e: tuple(np.mean([holdout_score(r)[i] for r in whole[e]]) for i in (0, 1)))


def rank_cells(runs, task):
    """(paper row, r) -> the task's runs of that cell, in seed order; peft's LoRA is the row "peft"."""
    cells = defaultdict(list)
    for r in sorted(runs, key=lambda r: arg(r, "seed")):
        if r["task"] == task and not os.path.basename(os.path.dirname(r["path"])).startswith("sel_"):
            row = "peft" if "peft" in r.get("label", "") else RANK_ROWS.get(r["method"])
            if row:
                cells[(row, arg(r, "rank"))].append(r)
    return cells


def paired(cells, a, b, r, key):
    """100 × (a − b) of the last epoch's key, per seed both cells have."""
    x = {arg(run, "seed"): run["last"][key] for run in cells.get((a, r), [])}
    y = {arg(run, "seed"): run["last"][key] for run in cells.get((b, r), [])}
    return [100 * (x[s] - y[s]) for s in sorted(set(x) & set(y))]


def rank_verdicts(cells, key, ranks):
    """The paper's three claims at each rank, each a rule that can fail; d lists the per-seed gaps."""
    out, per = [], lambda d, f="+.2f": "per seed " + ", ".join(f"{x:{f}}" for x in d)
    for r in ranks:
        d = paired(cells, "LoRA", "TLoRA", r, key)
        if d:
            word = ("reproduced" if min(d) > MUCH_LESS else
                    "not reproduced" if max(d) <= MUCH_LESS else "not shown")
            out.append(f"- r {r}, TLoRA ≪ LoRA ({key}, LoRA − TLoRA > {MUCH_LESS:g} points on every seed; "
                       f"*not reproduced*: on none): **{word}**; {per(d)}.")
        d = paired(cells, "LoRA", "Ours", r, key)
        if d:
            word = "reproduced" if abs(np.mean(d)) <= CLOSE else "not reproduced"
            out.append(f"- r {r}, LoRA ≈ Ours ({key}, |mean LoRA − Ours| ≤ {CLOSE:g} point): **{word}**: "
                       f"{np.mean(d):+.2f}; {per(d)}.")
        d = [x / 100 for x in paired(cells, "LoRA", "Ours", r, "loss")]
        if d:
            word = ("reproduced" if min(d) > 0 else
                    "not shown (the mean goes the paper's way, not every seed)" if np.mean(d) > 0 else
                    "not reproduced")
            out.append(f"- r {r}, Ours' dev loss below LoRA's (less overfitting): **{word}**: LoRA − Ours "
                       f"{np.mean(d):+.4f}; {per(d, '+.4f')}.")
    return out


def rank_table(cells, ranks, keys, paper_cols=None):
    """Rows LoRA, Ours, TLoRA; a column per rank: ours (mean over n seeds), and the paper's RoBERTa-base cell
    (MRPC) after it when paper_cols names its columns."""
    heads = [f"r {r}: ours" + (f" | r {r}: paper" if paper_cols else "") for r in ranks]
    lines = ["| row | " + " | ".join(heads) + " |", "|---" * (1 + (1 + bool(paper_cols)) * len(ranks)) + "|"]
    for row in ("LoRA", "peft", "Ours", "TLoRA"):
        if row == "peft" and not any(row == c[0] for c in cells):
            continue
        cells_ = []
        for r in ranks:
            rs = cells.get((row, r), [])
            ours = " / ".join(f"{np.mean([x['last'][k] for x in rs]):.4f}" for k in keys) + f" ({len(rs)})" \
                if rs else "–"
            paper = TLORA_PAPER.get(row, {}).get(r)
            cells_ += [ours] + ([" / ".join(f"{paper[i]:.4f}" for i in paper_cols) if paper else "–"]
                                if paper_cols else [])
        name = "LoRA (transformers + peft)" if row == "peft" else row
        lines.append(f"| {name} | " + " | ".join(cells_) + " |")
    return lines


def chance_verdict(cells, r=8):
    """RTE: whether each row left chance, i.e. beat the majority class by more than two binomial standard
    errors of a dev accuracy (2·sqrt(p(1 − p)/277) = 0.060) on every seed, or stayed at chance on every
    seed, or neither."""
    bar = RTE_MAJORITY + 2 * np.sqrt(RTE_MAJORITY * (1 - RTE_MAJORITY) / 277)
    out = []
    for row in ("LoRA", "Ours", "TLoRA"):
        acc = [x["last"]["accuracy"] for x in cells.get((row, r), [])]
        if acc:
            word = ("left chance" if min(acc) > bar else "stayed at chance" if max(acc) <= bar else
                    "left chance on some seeds only")
            out.append(f"- RTE, {row} (r {r}): **{word}** (the majority class is {RTE_MAJORITY:.4f}, the bar "
                       f"{bar:.4f}); per seed " + ", ".join(f"{a:.4f}" for a in acc) + ".")
    return out


def peft_verdict(cells):
    """Our LoRA against peft's at r 8, paired by seed: they agree when the mean gap is within the seed noise
    (the larger of the two rows' std over seeds)."""
    d = paired(cells, "LoRA", "peft", 8, "accuracy")
    if len(d) < 2:
        return []
    noise = 100 * max(np.std([r["last"]["accuracy"] for r in cells[(row, 8)]]) for row in ("LoRA", "peft"))
    word = "agree" if abs(np.mean(d)) <= noise else "differ"
    return [f"- Our LoRA against transformers + peft (r 8, dev accuracy, {len(d)} seeds): ours − peft "
            f"{np.mean(d):+.2f} ± {np.std(d):.2f} points (per seed " + ", ".join(f"{x:+.2f}" for x in d) +
            f"); seed noise {noise:.2f}: **{word}** (*agree*: the mean gap within the seed noise).", ""]


def tlora_rank_section(res):
    folder = os.path.join(res, "seed002", "rank")
    runs = runs_under(folder) if os.path.isdir(folder) else []
    if not runs:
        return []
    out = ["### TLoRA+'s comparison: LoRA, Ours and TLoRA across ranks (MiniLM)", "",
           *note(res, "tlora_rank")]
    sel = [r for r in runs if os.path.basename(os.path.dirname(r["path"])).startswith("sel_")]
    if sel:
        eta = eta_best(runs)
        aside = lambda r: "other_eta" in r["path"].split(os.sep)  # runs experiments_tlora.sh set aside
        stale = [r for r in runs if r not in sel and (arg(r, "lr") != eta or aside(r))]
        runs = [r for r in runs if r not in stale]  # a cell trained at another η is no cell
        rows = [m for m in RANK_ROWS if any(r["method"] == m for r in sel)]
        out += [f"η, chosen once for every row (r 8, seed 0, `--select holdout`; the best mean held-out "
                f"accuracy over the rows): **{lr(eta)}**. The held-out accuracy / loss, the only numbers the "
                f"choice read:", "", "| η | " + " | ".join(RANK_ROWS[m] for m in rows) + " | mean accuracy |",
                "|---|" + "---|" * (len(rows) + 1)]
        for e in sorted({arg(r, "lr") for r in sel}):
            held = {r["method"]: r["history"][r.get("selected_epoch", len(r["history"])) - 1]["holdout"]
                    for r in sel if arg(r, "lr") == e}
            cells = [f"{held[m]['accuracy']:.4f} / {held[m]['loss']:.4f}" if m in held else "–" for m in rows]
            mean = f"{np.mean([h['accuracy'] for h in held.values()]):.4f}" if len(held) == len(rows) else "–"
            out.append(f"| {lr(e)} | " + " | ".join(cells) + f" | {mean} |")
        out += [""] + ([f"{len(stale)} runs trained at another η are left out of the tables "
                         f"(kept under other_eta/; experiments_tlora.sh trains each cell at the chosen "
                         f"η).", ""]
                       if stale else [])
    tasks = (("mrpc", "MRPC", "accuracy"), ("cola", "CoLA", "mcc"), ("rte", "RTE", "accuracy"))
    for task, name, key in tasks:
        cells, mrpc = rank_cells(runs, task), task == "mrpc"
        ranks = sorted({r for (row, r) in cells if row != "peft"})
        if not ranks:
            continue
        out += [f"#### {name}: dev accuracy / MCC at the last epoch (seeds in brackets)" +
                (", the paper's RoBERTa-base beside" if mrpc else ""), "",
                *rank_table(cells, ranks, ("accuracy", "mcc"), (0, 1) if mrpc else None), "",
                "Train accuracy / train loss / dev loss, the same cells:", "",
                *rank_table(cells, ranks, ("train_accuracy", "train_loss", "loss"),
                            (2, 3, 4) if mrpc else None),
                "", *rank_verdicts(cells, key, ranks), ""]
        if mrpc:
            out += peft_verdict(cells)
        if task == "rte":
            out += [*chance_verdict(cells), ""]
    return out + [*note(res, "tlora_rank_verdict")]


def adaq_section(res, plots):
    folder = os.path.join(res, "seed003")
    out = ["## ADAQ-LoRA (Feng et al. 2024) and AdaLoRA (arXiv 2303.10512)", ""]
    if os.path.exists(os.path.join(folder, "memory.json")):
        m = read_bench(os.path.join(folder, "memory.json"))
        out += ["### Memory: the ADAQ-LoRA paper's claim, ours beside transformers + peft + bitsandbytes", "",
                *note(res, "adaq_memory"), memory_table(m["rows"], m["threads"]), "",
                *note(res, "adaq_memory_verdict")]
    if os.path.exists(os.path.join(folder, "qlora_speed.json")):
        q = read_bench(os.path.join(folder, "qlora_speed.json"))
        out += ["### QLoRA step time with the fused dequantize (`--compile`)", "",
                *note(res, "qlora_speed"),
                q["header"], "", *speed_table(q["rows"], q["rows"][0].get("device", "cpu")),
                *note(res, "qlora_speed_verdict")]
    cols = "accuracy,f1,mcc,auc,loss,train_loss,train_accuracy"
    for task in ("mrpc", "rte"):
        runs = runs_under(os.path.join(folder, task))
        rows = [r for r in runs if os.path.basename(os.path.dirname(r["path"])).startswith(task + "-")]
        if not rows:
            continue
        out += [f"### {task.upper()}: ADAQ-LoRA and AdaLoRA against LoRA and QLoRA (MiniLM)", "",
                *note(res, f"adaq_{task}"), *run_table(rows, cols), *note(res, f"adaq_{task}_verdict")]
        sel = [r for r in runs if os.path.basename(os.path.dirname(r["path"])).startswith("sel_")]
        if sel:  # a learning-rate choice made on the held-out slice: the numbers it was made on
            out += [f"The {sel[0]['label']} learning-rate choice (seed 0, `--select holdout`): held-out "
                    f"scores, the only numbers the choice read.", "",
                    "| lr | held-out accuracy | held-out loss |",
                    "|---|---|---|"]
            for r in sorted(sel, key=lambda r: arg(r, "lr")):
                h = r["history"][-1]["holdout"]
                out.append(f"| {lr(arg(r, 'lr'))} | {h['accuracy']:.4f} | {h['loss']:.4f} |")
            out.append("")
        for m in ("adalora", "adaq_lora"):
            rs = [r for r in rows if r["method"] == m]
            if rs and task == "mrpc":
                out.append(plots.add(f"{m}_ranks.png", f"{m} kept ranks",
                                     lambda plt, rs=rs: ranks_figure(plt, rs)))
        out.append("")
        peft = [r for r in runs if "peft" in r.get("label", r["method"])]
        if peft:  # the reference QLoRA (bench.py peft_glue) beside ours
            ours = [r for r in rows if r["method"] == "lora"]
            out += ["### QLoRA's gap to LoRA: peft + bitsandbytes QLoRA on the same protocol", "",
                    *note(res, "peft_qlora"),
                    *run_table(ours + peft, "accuracy,f1,mcc,auc,loss,train_loss"),
                    *note(res, "peft_qlora_verdict")]
    gen = runs_under(os.path.join(folder, "gsm8k"))
    if gen:
        out += ["### Instruction tuning on GSM8K: the pipeline on a random GPT-2", "",
                *note(res, "gsm8k"),
                *run_table(gen, "rouge-1,rouge-2,rouge-l,bleu-4,avg,corpus_bleu,accuracy", last=False),
                *note(res, "gsm8k_verdict")]
    if os.path.exists(os.path.join(folder, "generate.json")):
        out += ["### Greedy decoding speed: `python bench.py generate`", "", *note(res, "generate"),
                *generate_table(read_bench(os.path.join(folder, "generate.json"))), "",
                *note(res, "generate_verdict")]
    return out


# -----------------------------------------------------------------------------
# ADAQ-LoRA's four rows on a pretrained LLM: SmolLM2-135M-Instruct, GSM8K (results/seed003/smollm2_gsm8k)

# the ADAQ-LoRA paper's School_math rows (ChatGLM2-6B): ROUGE-1, ROUGE-2, ROUGE-L, BLEU-4, Avg, memory MB
ADAQ_SCHOOL_MATH = {"zero-shot": ("GLM2", 0.5204, 0.2849, 0.3408, 0.3213, 0.3668, 48885),
                    "lora": ("GLM2+LoRA", 0.5542, 0.3113, 0.3595, 0.3403, 0.3913, 59551),
                    "qlora": ("GLM2+QLoRA", 0.5490, 0.3245, 0.3716, 0.3508, 0.3989, 12626),
                    "adaq_lora": ("GLM2+ADAQ-LoRA", 0.5553, 0.3294, 0.3789, 0.3592, 0.4057, 9072)}
SCORES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")  # Avg is their mean
MEMORY_ROWS_ORDER = ("lora", "qlora", "adalora", "adaq_lora")  # bench.py memory's rows
EQUIVALENT = 0.01  # "ADAQ-LoRA ≈ QLoRA": the Avg gap's 95% interval within ±0.01 (paper: +0.002, +0.007;
# its gains from fine-tuning over zero-shot on School_math: LoRA +0.0245, QLoRA +0.0321)


def llm_row(run):
    """The paper's row a run stands for."""
    if arg(run, "epochs") == 0:
        return "zero-shot"
    return ("qlora" if arg(run, "quant") == "nf4" else "lora") if run["method"] == "lora" else run["method"]


def command(run):
    """The train.py command a run used, rebuilt from its metrics.json: each flag that is not its default, and
    --device always (its default is the machine's)."""
    a, default = run["args"], vars(train.parse_args(["--method", run["args"]["method"]]))
    default["quant"] = train.METHODS[a["method"]].quant  # the method's own base precision: train.py fills it
    default["device"] = None
    flags = [f"--{k}" if v is True else f"--{k} {v!r}" if isinstance(v, float) else f"--{k} {v}"
             for k, v in a.items() if k not in ("method", "resume", "overwrite") and v != default.get(k)
             and v is not None and v is not False]
    return f"python train.py --method {a['method']} " + " ".join(flags)


def paired_bootstrap(a, b, n=10000, seed=0):
    """mean(a − b) over paired prompts and its 95% percentile interval, the prompts resampled n times."""
    d = np.asarray(a) - np.asarray(b)
    means = d[np.random.default_rng(seed).integers(0, len(d), (n, len(d)))].mean(1)
    return d.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def sample_avg(runs):
    """Each prompt's Avg (the mean of its four scores), averaged over the runs' seeds."""
    return np.mean([np.mean([r["sample_scores"][k] for k in SCORES], 0) for r in runs], 0)


def llm_table(rows):
    """rows: {paper row: [runs]}, ours beside the paper's School_math numbers."""
    lines = ["| row | seeds | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 | Avg | corpus BLEU | GSM8K accuracy | "
             "peak MB | trainable % | s/step | paper's row (School_math): ROUGE-1 / 2 / L, BLEU, Avg, MB |",
             "|---" * 13 + "|"]
    for row, rs in rows.items():
        m = lambda k: mean_std([r["metrics"][k] for r in rs], digits=4)
        zero = row == "zero-shot"
        p = ADAQ_SCHOOL_MATH[row]
        lines.append(f"| {rs[0]['label'] if not zero else 'zero-shot'} | {len(rs)} | " +
                     " | ".join(m(k) for k in (*SCORES, "avg", "corpus_bleu", "accuracy")) + " | " +
                     mean_std([r["peak_memory_mb"] for r in rs], digits=0) + (" (eval)" if zero else "") +
                     f" | {0 if zero else rs[0]['trainable_pct']:.2f} | " +
                     ("–" if zero else mean_std([r["s_per_step"] for r in rs], digits=2)) +
                     f" | {p[0]}: {p[1]:.4f} / {p[2]:.4f} / {p[3]:.4f}, {p[4]:.4f}, {p[5]:.4f}, {p[6]} |")
    return lines


def memory_order(*mb):
    """The paper's memory ordering (LoRA > QLoRA > ADAQ-LoRA): each row over 2% below the one before."""
    return "reproduced" if all(a > 1.02 * b for a, b in zip(mb, mb[1:])) else "not reproduced"


def llm_verdicts(rows):
    """The paper's claims, each with a rule that can fail. Quality: a paired bootstrap over the prompts of
    the per-prompt Avg (evaluation noise only; with one seed, training-seed noise is not in it)."""
    have = lambda *names: all(n in rows and all("sample_scores" in r for r in rows[n]) for n in names)
    out = []
    for row in ("lora", "qlora", "adaq_lora"):
        if have(row, "zero-shot"):
            d, lo, hi = paired_bootstrap(sample_avg(rows[row]), sample_avg(rows["zero-shot"]))
            word = "reproduced" if lo > 0 else "not reproduced" if hi < 0 else "not shown"
            out.append(f"- {rows[row][0]['label']} beats zero-shot (the paper: every tuned row does): Avg "
                       f"{d:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]: **{word}** (*reproduced*: the "
                       f"interval is above 0).")
    if have("adaq_lora", "qlora"):
        d, lo, hi = paired_bootstrap(sample_avg(rows["adaq_lora"]), sample_avg(rows["qlora"]))
        word = ("reproduced" if -EQUIVALENT < lo and hi < EQUIVALENT else
                "not reproduced" if lo > EQUIVALENT or hi < -EQUIVALENT else "not shown")
        out.append(f"- ADAQ-LoRA ≈ QLoRA in quality (the paper: Avg +0.0021 and +0.0068): ADAQ − QLoRA Avg "
                   f"{d:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]: **{word}** (*reproduced*: the interval "
                   f"inside ±{EQUIVALENT}; *not reproduced*: wholly outside it).")
    if all(n in rows for n in ("lora", "qlora", "adaq_lora")):
        mb = {n: np.mean([r["peak_memory_mb"] for r in rows[n]]) for n in ("lora", "qlora", "adaq_lora")}
        word = memory_order(mb["lora"], mb["qlora"], mb["adaq_lora"])
        out.append(f"- Training memory LoRA > QLoRA > ADAQ-LoRA (the paper: 59551 > 12626 > 9072 MB on "
                   f"School_math), on this CPU's process peak RSS (load and training): {mb['lora']:.0f}, "
                   f"{mb['qlora']:.0f}, {mb['adaq_lora']:.0f} MB: **{word}** (*reproduced*: each row over 2% "
                   f"below the one before).")
    return out + [""]


def llama_memory_table(saved):
    """bench.py memory on Llama shapes: each row's peak at n_layer 1 and 2, and extended to the full depth
    (peak(L) = peak(1) + (L − 1)·(peak(2) − peak(1))), with the ratio to LoRA's, and the peak measured at
    full depth where bench.py had the memory for it; then the paper's memory ordering at each full depth,
    measured where it was."""
    lines = ["| shape | row | peak MB at n_layer 1 / 2 (measured) | MB per block | peak MB at full depth "
             "(extended) | × LoRA | adapter params (full depth) | peak MB at full depth (measured) |",
             "|---" * 8 + "|"]
    verdicts = []
    for m in saved:
        at = {(r["row"], r["n_layer"]): r for r in m["rows"]}
        full, measured = {}, {}
        for row in MEMORY_ROWS_ORDER:
            one, two = at[(row, 1)], at[(row, 2)]
            whole = at.get((row, m["n_layer"]))  # bench.py memory --full_depth, where it fits
            measured[row] = whole and whole["train_peak_mb"]
            per = two["train_peak_mb"] - one["train_peak_mb"]
            full[row] = one["train_peak_mb"] + (m["n_layer"] - 1) * per
            params = one["adapter_params"] + (m["n_layer"] - 1) * (two["adapter_params"]
                                                                   - one["adapter_params"])
            lines.append(f"| {m['model']} ({m['n_layer']} layers) | {row} | {one['train_peak_mb']:.0f} / "
                         f"{two['train_peak_mb']:.0f} | {per:.0f} | {full[row]:.0f} | "
                         f"{full[row] / full['lora']:.2f} | {params:,} | "
                         f"{f'{measured[row]:.0f}' if measured[row] else '–'} |")
        kind = "measured" if all(measured.values()) else "extended"  # a measurement, where there is one
        mb = [measured[r] if kind == "measured" else full[r] for r in ("lora", "qlora", "adaq_lora")]
        verdicts.append(f"- {m['model']}: LoRA > QLoRA > ADAQ-LoRA at full depth ({kind}): "
                        f"{mb[0]:.0f}, {mb[1]:.0f}, {mb[2]:.0f} MB: **{memory_order(*mb)}** (*reproduced*: "
                        f"each row over 2% below the one before).")
    return lines + [""] + verdicts


def llm_section(res):
    folder = os.path.join(res, "seed003", "smollm2_gsm8k")
    runs = runs_under(folder) if os.path.isdir(folder) else []
    if not runs:
        return []
    rows = {n: [r for r in runs if llm_row(r) == n] for n in ADAQ_SCHOOL_MATH}
    rows = {n: sorted(rs, key=lambda r: arg(r, "seed")) for n, rs in rows.items() if rs}
    evals = {tuple(arg(r, k) for k in ("data_dir", "eval_samples", "subset_seed", "max_new_tokens"))
             for r in runs}
    if len(evals) > 1:  # the paired bootstrap pairs prompts: every row must score the same ones
        raise ValueError(f"the runs under {folder} differ in their evaluation prompts (--data_dir, "
                         f"--eval_samples, --subset_seed, --max_new_tokens); keep one protocol there")
    out = ["### ADAQ-LoRA's four rows on a pretrained LLM: SmolLM2-135M-Instruct, GSM8K", "",
           *note(res, "smollm2_gsm8k"), *llm_table(rows), "", *llm_verdicts(rows),
           "The runs' commands, rebuilt from their metrics.json:", "", "```bash",
           *[command(r) for rs in rows.values() for r in rs], "```", ""]
    out += note(res, "smollm2_gsm8k_verdict")
    path = lambda name: os.path.join(res, "seed003", name)
    shapes = [s for f in sorted(glob.glob(path("llama_memory*.json"))) for s in read_bench(f)["shapes"]]
    if shapes:  # one bench.py memory file per shape, or one for both
        out += ["#### The same rows' training memory at 135M, 1B and 6B Llama shapes (random weights)", "",
                *note(res, "llama_memory"), *llama_memory_table(shapes), "",
                *note(res, "llama_memory_verdict")]
    if os.path.exists(path("smollm2_speed.json")):
        q = read_bench(path("smollm2_speed.json"))
        ratio = {r["method"]: r["step_ms"] / next(p["step_ms"] for p in q["rows"]
                                                   if (p["impl"], p["method"]) == ("peft", r["method"]))
                 for r in q["rows"] if r["impl"] == "ours"}
        out += ["#### SmolLM2's step time against transformers + peft (`python bench.py speed --llm`)", "",
                q["header"], "", *speed_table(q["rows"], q["rows"][0].get("device", "cpu")),
                "Target ≤ 1.00× peft's step: " + ", ".join(
                    f"{m} {x:.2f}× (**{'met' if x <= 1.0 else 'not met'}**)" for m, x in ratio.items()) + ".",
                "", *note(res, "smollm2_speed")]
    if os.path.exists(path("smollm2_generate.json")):
        g = read_bench(path("smollm2_generate.json"))
        x = g["rows"]["ours (KV cache)"]["tokens_per_s"] / g["rows"]["transformers"]["tokens_per_s"]
        out += ["#### SmolLM2's decoding speed against transformers' `generate` (`python bench.py generate`)",
                "",
                *generate_table(g), "", f"Target ≥ 1.00× transformers' tokens/s: {x:.2f}× "
                f"(**{'met' if x >= 1.0 else 'not met'}**).", "", *note(res, "smollm2_generate")]
    return out


def scale(res):
    path = os.path.join(res, "scale.json")
    if not os.path.exists(path):
        return []
    s = read_bench(path)
    return ["## Past one process: checkpointing and torchrun", "", *note(res, "scale"),
            *scale_table(s["checkpointing"], s["throughput"], s.get("global_batch", 16), s.get("cpus", 2)),
            "", *note(res, "scale_verdict")]


def overview(res, plots):
    runs = [r for r in runs_under(res) if r["task"] == "mrpc"]
    if not runs:
        return []
    return ["## Every MRPC configuration: dev accuracy against trainable parameters", "",
            *note(res, "overview"),
            plots.add("mrpc_accuracy_vs_params.png", "MRPC dev accuracy vs trainable parameters",
                      lambda plt: metric_vs_params(plt, runs, "mrpc", "accuracy", res)), ""]


def report(res, out_path):
    """The whole RESULTS.md as one string; PNGs go into res."""
    plots = Plots(res, os.path.dirname(os.path.abspath(out_path)))
    lines = ["# Results", "", *note(res, "intro"),
             "## Per-matrix learning rates: the α × λ grid and the 2 × 2 ablation", "", *note(res, "lr_grid")]
    for task in ("mrpc", "sst2", "qqp"):
        if os.path.isdir(os.path.join(res, "seed000", task)):
            lines += lr_grid_section(os.path.join(res, "seed000", task), task, plots)
    lines += [*note(res, "lr_grid_verdict"), *dynamic_lora_section(res, plots), *tlora_section(res, plots),
              *tlora_rank_section(res),
              *adaq_section(res, plots), *llm_section(res), *scale(res), *overview(res, plots),
              *note(res, "not_regenerated")]
    if plots.skipped:
        lines += [f"Plots skipped (matplotlib is not installed): {', '.join(plots.skipped)}.", ""]
    text = "\n".join(line for line in lines if line is not None)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip() + "\n"


def read_runs(paths):
    """metrics.json files named on the command line, for --table and the plots."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
    return runs


def main(argv=None):
    """The command line; bad input is one line, "error: ...", and a non-zero exit."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="the folder of run folders and bench json files")
    p.add_argument("--out", default="RESULTS.md", help="written atomically (a temp file, then a rename)")
    p.add_argument("--grid_best", metavar="FOLDER", help="print the per-matrix-rate grid's α* λ* η* and exit")
    p.add_argument("--eta_best", metavar="FOLDER", help="print the rank table's η, chosen on the held-out "
                   "slice by its sel_* runs, and exit")
    p.add_argument("--table", nargs="+", metavar="METRICS_JSON",
                   help="metrics.json files to merge into a table")
    p.add_argument("--columns", help="with --table: comma-separated metrics to show (default: all)")
    p.add_argument("--last", action="store_true",
                   help="with --table: the last epoch instead of the one each run kept (--select)")
    p.add_argument("--paper", choices=sorted(PAPER),
                   help="with --table: the paper's tables, its numbers beside")
    p.add_argument("--plot_dynamic", nargs="+", metavar="METRICS_JSON",
                   help="Dynamic LoRA runs: plot r_l and m_l")
    p.add_argument("--plot_ranks", nargs="+", metavar="METRICS_JSON",
                   help="runs with per-matrix ranks (adalora, adaq_lora, dynamic_lora): a layer x matrix "
                        "heat map")
    p.add_argument("--png", default="dynamic_lora.png", help="where --plot_dynamic / --plot_ranks write")
    a = p.parse_args(argv)
    try:
        if a.grid_best:
            if not os.path.isdir(a.grid_best):
                raise ValueError(f"{a.grid_best} is not a folder of runs (e.g. results/seed000/mrpc)")
            print(" ".join(f"{x:g}" for x in grid_best(runs_under(a.grid_best))))  # α* λ* η*
        elif a.eta_best:
            print(f"{eta_best(runs_under(a.eta_best)):g}")
        elif a.table or a.plot_dynamic or a.plot_ranks:
            runs = read_runs(a.table or a.plot_dynamic or a.plot_ranks)
            if a.plot_dynamic:
                plot_dynamic(runs, a.png)
            elif a.plot_ranks:
                plot_ranks(runs, a.png)
            elif a.paper:
                print(paper_tables(runs, a.paper))
            else:
                print(table(runs, a.columns.split(",") if a.columns else None, a.last))
        else:
            if not os.path.isdir(a.results):
                raise ValueError(f"{a.results} is not a folder of runs; give --results DIR")
            checkpoint.write_text(a.out, report(a.results, a.out))
            print(f"wrote {a.out}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyError as e:
        sys.exit(f"error: a metrics.json lacks the key {e}" if a.table or a.plot_dynamic or a.plot_ranks else
                 f"error: a run or bench file under {a.results} lacks the key {e}; re-run it or remove it")


if __name__ == "__main__":
    main()
