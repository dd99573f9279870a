"""
RESULTS.md, regenerated from the runs themselves (issue 18). Every table and plot comes out of the
metrics.json files under results/ (and the json files bench.py wrote there); the papers' numbers beside ours
come from one table per seed in the code; the text between the tables is results/notes/*.md, written by hand
about those runs.

    python report.py --out RESULTS.md                      # the report, and its PNGs in results/
    python report.py --seed000_best results/seed000/mrpc   # prints "α* λ* η*", chosen on the held-out slice
    bash experiments.sh MINILM_DIR                          # seed 000's runs, then this report

matplotlib is optional: without it the tables render and the report lists the plots it skipped.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

import bench
import data
import eval as ev
import finetune

NEEDED = ("task", "method", "metrics", "last", "history", "args", "trainable_params", "trainable_pct")
RUN_MARKERS = tuple(f for f in finetune.RUN_FILES if f != "metrics.json")  # a run folder's other files


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


# -----------------------------------------------------------------------------
# plots (matplotlib optional)

class Plots:
    """Writes PNGs into folder and returns the markdown that shows them; without matplotlib it records what
    it skipped, and the report says so."""

    def __init__(self, folder, out_dir):
        self.folder, self.out_dir, self.skipped = folder, out_dir, []
        self.plt = ev.pyplot()

    def add(self, name, title, draw):
        """draw(plt) -> a figure. Returns the markdown image line, or "" when skipped."""
        if self.plt is None:
            self.skipped.append(name)
            return ""
        png = os.path.join(self.folder, name)
        fig = draw(self.plt)
        ev.save_png(fig, png)
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
            groups[(section, r.get("label", r["method"]), json.dumps(ev.config(r), sort_keys=True))].append(r)
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
# seed 000: the α × λ grid and the 2 × 2 ablation (SPEC §2.1)

ALPHAS = (5e-5, 1e-4, 2e-4, 4e-4)  # the lr of every A
LAMBDAS = (1, 2, 4, 8, 16)  # B's lr = λ·α
SEED000_TABLE2 = {  # seed 000, Table 2 (QQP; SPEC §2.1): row -> (ACC, F1, MCC)
    "Ours": (0.910, 0.913, 0.80),
    "Remove adaptive learning rate": (0.900, 0.888, 0.76),
    "Remove low-rank matrix updates": (0.903, 0.905, 0.78),
    "LoRA": (0.882, 0.887, 0.73),
}


def holdout_score(run):
    """The grid's selection rule, fixed before the runs: the task's main metric on the held-out slice of
    train at the epoch the run kept, ties broken by the lower held-out loss. Dev is never read."""
    h = run["history"][run.get("selected_epoch", len(run["history"])) - 1].get("holdout")
    if h is None:
        raise ValueError(f"{run['path']} has no held-out scores: seed 000's grid runs need --select holdout")
    return h[data.main_metric(run["task"])], -h["loss"]


def grid_runs(runs):
    """(α, λ) -> the seed-0 all-linear run at that cell."""
    grid = {}
    for r in runs:
        if arg(r, "seed") == 0 and targets(r) == "all-linear" and r["method"] == "lora":
            cell = (arg(r, "lr"), arg(r, "lr_ratio") or 1.0)
            if cell[0] in ALPHAS and cell[1] in LAMBDAS:
                grid[cell] = r
    return grid


def seed000_best(runs):
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
    """SPEC §2.1's 2 × 2 design: the runs of each row, found by their flags (seeds 0, 1, 2)."""
    rows = {"Ours": (a, l, "all-linear"), "Remove adaptive learning rate": (e, 1.0, "all-linear"),
            "Remove low-rank matrix updates": (a, l, "query,value"), "LoRA": (e, 1.0, "query,value")}
    found = {}
    for row, (a_lr, ratio, tgt) in rows.items():
        found[row] = sorted((r for r in runs if arg(r, "lr") == a_lr and (arg(r, "lr_ratio") or 1.0) == ratio
                             and targets(r) == tgt), key=lambda r: arg(r, "seed"))
    return rows, found


def verdict(found, better, worse):
    """A paper claim "better > worse" on dev accuracy, paired by seed, beside the paper's gap."""
    paper_gap = 100 * (SEED000_TABLE2[better][0] - SEED000_TABLE2[worse][0])
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


def seed000_section(folder, task, plots):
    runs = runs_under(folder)
    if not runs:
        return [f"No runs in `{folder}`: `bash experiments.sh MINILM_DIR` makes them.", ""]
    grid = grid_runs(runs)
    metric = data.main_metric(task)
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
    out.append(plots.add(f"seed000_{task}_grid.png", f"seed 000 grid, {task}", lambda plt: heat_map(
        plt, hold, [str(l) for l in LAMBDAS], [f"α {lr(a)}" for a in ALPHAS],
        f"{task}: held-out {metric}, seed 0 (B at λ·α)", "λ")))
    if len(grid) < hold.size:
        return out + ["", "The grid is incomplete: no choice and no ablation yet.", ""]
    a, l, e = seed000_best(runs)
    sa, sl = holdout_score(grid[(a, l)]), holdout_score(grid[(e, 1.0)])
    out += ["", f"Chosen on the held-out slice: **α\\* = {lr(a)}, λ\\* = {l:g}** (held-out {metric} "
            f"{sa[0]:.4f}); the best tied rate (λ = 1) **η\\* = {lr(e)}** ({sl[0]:.4f}).", ""]
    rows, found = ablation_rows(runs, a, l, e)
    out += ["The 2 × 2 ablation (SPEC §2.1) on GLUE dev at the last (only) epoch, mean ± std over seeds; the "
            "paper's Table 2 (QQP) beside:", "",
            "| row | targets | A lr | B lr | seeds | ACC | F1 | MCC | paper ACC | F1 | MCC | trainable % |",
            "|---" * 12 + "|"]
    for row, (a_lr, ratio, tgt) in rows.items():
        rs = found[row]
        p = SEED000_TABLE2[row]
        cells = " | ".join(ev.mean_std([r["last"][c] for r in rs], digits=3) if rs else "–"
                           for c in ("accuracy", "f1", "mcc"))
        pct = f"{rs[0]['trainable_pct']:.3f}" if rs else "–"
        out.append(f"| {row} | {tgt} | {lr(a_lr)} | {lr(a_lr * ratio)} | {len(rs)} | {cells} | {p[0]} | "
                   f"{p[1]} | {p[2]} | {pct} |")
    out += ["", "Verdicts (dev accuracy, paired by seed; *reproduced*: the paper's direction on every seed; "
            "*not shown*: on average only; *not reproduced*: not even on average):", "",
            f"- Tuned per-matrix rates beat tied ones on the grid: the best cell has λ\\* = {l:g}" +
            (f", held-out {metric} {sa[0]:.4f} against {sl[0]:.4f} at the best λ = 1 cell: **reproduced** "
             f"(on the selection split, one seed)." if l > 1 and sa[0] > sl[0] else
             f": **not reproduced** (the held-out {metric} of the best λ > 1 cell does not beat λ = 1)."),
            f"- Ours > Remove adaptive learning rate (tied η\\*): "
            f"{verdict(found, 'Ours', 'Remove adaptive learning rate')}.",
            f"- Ours > Remove low-rank matrix updates (q, v only, SPEC's substitute): "
            f"{verdict(found, 'Ours', 'Remove low-rank matrix updates')}.",
            f"- Ours > LoRA (q, v only, tied η\\*): {verdict(found, 'Ours', 'LoRA')}.",
            "- The absolute QQP numbers (0.910 ACC) and Table 1 (a closed GPT-4 fine-tune, full fine-tuning "
            "of BERT/RoBERTa-base for 25 epochs): **not testable here** (no QQP data in ../shared, a 2-core "
            "CPU, MiniLM for 1 epoch).", ""]
    curves = {row: rs for row, rs in found.items() if rs and "loss_log" in rs[0]}
    if curves:
        out.append(plots.add(f"seed000_{task}_loss.png", f"seed 000 ablation train loss, {task}",
                             lambda plt: loss_curves(plt, curves, f"{task}: seed 000 ablation, train loss")))
    return out + [""]


# -----------------------------------------------------------------------------
# the other seeds' sections: their runs and bench files, tabled by eval.py's and bench.py's own functions

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
    return [ev.table(runs, columns.split(","), last), ""]


def seed001(res, plots):
    runs = runs_under(os.path.join(res, "seed001"))
    if not runs:
        return []
    dyn = [r for r in runs if r["method"] == "dynamic_lora"]
    by = defaultdict(list)
    for r in runs:
        by[ev.PAPER["001"][r["method"]][0]].append(r)
    out = ["## Dynamic LoRA (seed 001) on MRPC with MiniLM", "", *note(res, "seed001"),
           ev.paper_tables(runs, "001"), ""]
    if dyn:
        out.append(plots.add("seed001_dynamic_lora.png", "Dynamic LoRA: calibrated ranks and m_l",
                             lambda plt: ev.dynamic_figure(plt, dyn)))
    out.append(plots.add("seed001_loss.png", "seed 001 rows: train loss",
                         lambda plt: loss_curves(plt, by, "MRPC, seed 001's six rows: train loss")))
    return out + ["", *note(res, "seed001_verdicts")]


def seed002(res, plots):
    out = ["## TLoRA and TLoRA+ (seed 002)", "", *note(res, "seed002")]
    runs = runs_under(os.path.join(res, "tlora_init"))
    if runs:
        out += ["### TLoRA's initialisation: SPEC's reading against the official code (`--tlora_init`)", "",
                *note(res, "tlora_init"),
                *run_table(runs, "accuracy,f1,mcc,auc,loss,train_loss,train_accuracy"),
                *note(res, "tlora_init_verdict")]
    sweep = runs_under(os.path.join(res, "seed002", "lambda"))
    if sweep:
        by = defaultdict(list)
        for r in sorted(sweep, key=lambda r: arg(r, "ratio")):
            by[arg(r, "ratio")].append(r)
        epochs = max(len(r["history"]) for r in sweep)
        out += ["### The λ sweep", "", *note(res, "seed002_lambda"),
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
        out += ["", plots.add("seed002_lambda.png", "TLoRA+ λ sweep: train loss", lambda plt: loss_curves(
            plt, curves, "MRPC, TLoRA+ (ABC) λ sweep: train loss")), "", *note(res, "seed002_lambda_verdict")]
    return out


def seed003(res, plots):
    s3 = os.path.join(res, "seed003")
    out = ["## ADAQ-LoRA and AdaLoRA (seed 003)", ""]
    if os.path.exists(os.path.join(s3, "memory.json")):
        m = read_bench(os.path.join(s3, "memory.json"))
        out += ["### Memory: seed 003's claim, ours beside transformers + peft + bitsandbytes", "",
                *note(res, "seed003_memory"), bench.memory_table(m["rows"], m["threads"]), "",
                *note(res, "seed003_memory_verdict")]
    if os.path.exists(os.path.join(s3, "qlora_speed.json")):
        q = read_bench(os.path.join(s3, "qlora_speed.json"))
        out += ["### QLoRA step time with the fused dequantize (`--compile`)", "",
                *note(res, "seed003_speed"),
                q["header"], "", *bench.speed_table(q["rows"], q["rows"][0].get("device", "cpu")),
                *note(res, "seed003_speed_verdict")]
    cols = "accuracy,f1,mcc,auc,loss,train_loss,train_accuracy"
    for task in ("mrpc", "rte"):
        runs = runs_under(os.path.join(s3, task))
        rows = [r for r in runs if os.path.basename(os.path.dirname(r["path"])).startswith(task + "-")]
        if not rows:
            continue
        out += [f"### {task.upper()}: ADAQ-LoRA and AdaLoRA against LoRA and QLoRA (MiniLM)", "",
                *note(res, f"seed003_{task}"), *run_table(rows, cols), *note(res, f"seed003_{task}_verdict")]
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
                out.append(plots.add(f"seed003_{m}_ranks.png", f"{m} kept ranks",
                                     lambda plt, rs=rs: ev.ranks_figure(plt, rs)))
        out.append("")
        peft = [r for r in runs if "peft" in r.get("label", r["method"])]
        if peft:  # the reference QLoRA (bench.py peft_glue) beside ours
            ours = [r for r in rows if r["method"] == "lora"]
            out += ["### QLoRA's gap to LoRA: peft + bitsandbytes QLoRA on the same protocol", "",
                    *note(res, "seed003_peft_qlora"),
                    *run_table(ours + peft, "accuracy,f1,mcc,auc,loss,train_loss"),
                    *note(res, "seed003_peft_qlora_verdict")]
    gen = runs_under(os.path.join(s3, "gsm8k"))
    if gen:
        out += ["### Instruction tuning on GSM8K: the pipeline on a random GPT-2", "",
                *note(res, "seed003_gsm8k"),
                *run_table(gen, "rouge-1,rouge-2,rouge-l,bleu-4,avg,corpus_bleu,accuracy", last=False),
                *note(res, "seed003_gsm8k_verdict")]
    if os.path.exists(os.path.join(s3, "generate.json")):
        out += ["### Greedy decoding speed: `python bench.py generate`", "", *note(res, "seed003_generate"),
                *bench.generate_table(read_bench(os.path.join(s3, "generate.json"))), "",
                *note(res, "seed003_generate_verdict")]
    return out


def scale(res):
    path = os.path.join(res, "scale.json")
    if not os.path.exists(path):
        return []
    s = read_bench(path)
    return ["## Past one process: checkpointing and torchrun", "", *note(res, "scale"),
            *bench.scale_table(s["checkpointing"], s["throughput"], s.get("global_batch", 16),
                               s.get("cpus", 2)), "",
            *note(res, "scale_verdict")]


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
             "## Seed 000: per-matrix learning rates (the α × λ grid and the 2 × 2 ablation)", "",
             *note(res, "seed000")]
    for task in ("mrpc", "sst2", "qqp"):
        if os.path.isdir(os.path.join(res, "seed000", task)):
            lines += seed000_section(os.path.join(res, "seed000", task), task, plots)
    lines += [*note(res, "seed000_verdict"), *seed001(res, plots), *seed002(res, plots), *seed003(res, plots),
              *scale(res), *overview(res, plots), *note(res, "not_regenerated")]
    if plots.skipped:
        lines += [f"Plots skipped (matplotlib is not installed): {', '.join(plots.skipped)}.", ""]
    text = "\n".join(line for line in lines if line is not None)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip() + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="the folder of run folders and bench json files")
    p.add_argument("--out", default="RESULTS.md", help="written atomically (a temp file, then a rename)")
    p.add_argument("--seed000_best", metavar="FOLDER", help="print the grid's α* λ* η* and exit")
    a = p.parse_args()
    try:
        if a.seed000_best:
            if not os.path.isdir(a.seed000_best):
                raise ValueError(f"{a.seed000_best} is not a folder of runs (e.g. results/seed000/mrpc)")
            print(" ".join(f"{x:g}" for x in seed000_best(runs_under(a.seed000_best))))  # α* λ* η*
        else:
            if not os.path.isdir(a.results):
                raise ValueError(f"{a.results} is not a folder of runs; give --results DIR")
            finetune.write_text(a.out, report(a.results, a.out))
            print(f"wrote {a.out}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyError as e:
        sys.exit(f"error: a run or bench file under {a.results} lacks the key {e}; re-run it or remove it")
