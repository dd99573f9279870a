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
import math
import os
import re
import sys
from collections import Counter, defaultdict

import numpy as np

import finetune


# -----------------------------------------------------------------------------
# generation metrics (SPEC §2.4), from scratch: per-sample ROUGE-1/2/L F and BLEU-4 as ChatGLM's eval scripts
# score them (the paper's numbers), corpus BLEU as sacrebleu does, GSM8K's final-number exact match; 0..1

# Han ideographs, CJK punctuation (，。「」) and full-width forms: each such character is a token in words()
CJK = re.compile("([\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])")


def words(text):
    """Tokens of the English stand-in: whitespace-separated words, and each CJK character its own token, so
    Chinese without spaces is scored per character ("我爱 NLP!" -> 我, 爱, NLP!). Case and punctuation are
    kept: "Paris." and "paris" differ (rouge-score's default tokenizer lowercases, strips punctuation and
    drops Chinese altogether)."""
    return CJK.sub(r" \1 ", text).split()


def ngrams(tokens, n):
    """Counts of the n-grams (tuples of n consecutive tokens) of a token list."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def f_score(match, n_pred, n_ref):
    """F = 2PR / (P + R), P = match / n_pred, R = match / n_ref; 0 if match = 0 (rouge-score's fmeasure)."""
    p, r = match / max(n_pred, 1), match / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_n(pred, ref, n):
    """ROUGE-N F of two token lists: match = sum over n-grams g of min(#g in pred, #g in ref)."""
    p, r = ngrams(pred, n), ngrams(ref, n)
    return f_score(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (dynamic programme, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = row[:]
        for j, y in enumerate(b):
            row[j + 1] = prev[j] + 1 if x == y else max(prev[j + 1], row[j])
    return row[-1]


def rouge_l(pred, ref):
    """ROUGE-L F (rouge-score's rougeL, not rougeLsum): F of P = LCS / len(pred), R = LCS / len(ref)."""
    return f_score(lcs_length(pred, ref), len(pred), len(ref))


def bleu_counts(pred, ref):
    """Clipped matches and totals of pred's n-grams, n = 1..4: match_n = sum_g min(#g in pred, #g in ref),
    total_n = len(pred) - n + 1 (0 when pred is shorter than n)."""
    match = [sum((ngrams(pred, n) & ngrams(ref, n)).values()) for n in range(1, 5)]
    return match, [max(len(pred) - n + 1, 0) for n in range(1, 5)]


def bleu4(match, total, c, r):
    """BLEU-4 = BP * exp(mean_n log p_n), p_n = match_n / total_n, except that the k-th order with no match
    gets p_n = 1 / (2^k total_n) (NIST geometric smoothing: nltk's method3, sacrebleu's "exp"). Brevity
    penalty BP = exp(1 - r / c) if the prediction length c < the reference length r, else 1. 0 when no
    unigram matches, or when total_4 = 0 (as sacrebleu; nltk's caller passes max(total_n, 1))."""
    if match[0] == 0 or min(total) == 0:
        return 0.0
    k, logs = 0, []
    for m, t in zip(match, total):
        k += m == 0
        logs.append(math.log(m / t if m else 1 / (2 ** k * t)))
    return (math.exp(1 - r / c) if c < r else 1.0) * math.exp(math.fsum(logs) / 4)


def sentence_bleu(pred, ref):
    """nltk's sentence_bleu([ref], pred, smoothing_function=SmoothingFunction().method3) on token lists.
    As in nltk, an order n longer than the prediction counts 0 matches out of 1 (smoothed to 1 / 2^k, not
    0), and an empty prediction, or one with no unigram in ref, scores 0."""
    match, total = bleu_counts(pred, ref)
    return bleu4(match, [max(t, 1) for t in total], len(pred), len(ref))


def per_sample_scores(pred, ref):
    """The four per-sample scores of one prediction against its reference, on words() tokens."""
    p, r = words(pred), words(ref)
    return {"rouge-1": rouge_n(p, r, 1), "rouge-2": rouge_n(p, r, 2), "rouge-l": rouge_l(p, r),
            "bleu-4": sentence_bleu(p, r)}


def split_punct(line):
    """The regexes sacrebleu's 13a and zh tokenizers share, then a whitespace split: punctuation and symbols
    become tokens, "." and "," stay inside numbers (3.5, 1,000), "-" is split off after a digit."""
    line = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", line)
    line = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", line)
    line = re.sub(r"([\.,])([^0-9])", r" \1 \2", line)
    return re.sub(r"([0-9])(-)", r"\1 \2 ", line).split()


def tokenize_13a(line):
    """sacrebleu's "13a" tokenizer (mteval-v13a.pl): drop <skipped>, join lines, unescape, split_punct."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for a, b in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(a, b)
    return split_punct(f" {line} ")


# sacrebleu's "zh" character ranges. Two of its entries are typos ("\u20000" is "\u2000" + "0"): compared as
# strings they amount to U+2001..U+2A6D (punctuation such as “ ” — …, arrows, symbols) and U+2F81..U+2FA1.
ZH = re.compile("([\u3400-\u4db5\u4e00-\u9fa5\u9fa6-\u9fbb\uf900-\ufa2d\ufa30-\ufa6a\ufa70-\ufad9"
                "\u2001-\u2a6d\u2f81-\u2fa1\uff00-\uffef\u2e80-\u2eff\u3000-\u303f\u31c0-\u31ef"
                "\u2f00-\u2fdf\u2ff0-\u2fff\u3100-\u312f\u31a0-\u31bf\ufe10-\ufe1f\ufe30-\ufe4f"
                "\u2600-\u26ff\u2700-\u27bf\u3200-\u32ff\u3300-\u33ff])")


def tokenize_zh(line):
    """sacrebleu's "zh" tokenizer: each ZH character is a token, the rest goes through split_punct (with no
    unescaping, and no padding unlike 13a, so a number keeps a final or leading ".": "is 72." -> is, 72.)."""
    return split_punct(ZH.sub(r" \1 ", line.strip()))


def corpus_bleu(preds, refs, tokenize="13a"):
    """sacrebleu.corpus_bleu(preds, [refs], tokenize=tokenize).score / 100: bleu4() of the counts and lengths
    summed over the corpus (one brevity penalty for the corpus); 0 if no prediction has 4 tokens."""
    tok = {"13a": tokenize_13a, "zh": tokenize_zh}[tokenize]
    match, total, c, r = [0] * 4, [0] * 4, 0, 0
    for pred, ref in zip(preds, refs):
        p, q = tok(pred), tok(ref)
        m, t = bleu_counts(p, q)
        match, total = [a + b for a, b in zip(match, m)], [a + b for a, b in zip(total, t)]
        c, r = c + len(p), r + len(q)
    return bleu4(match, total, c, r)


NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")  # 12, -3.5, 1,000; not "1." nor ".5"


def gsm8k_answer(text):
    """The final number of a GSM8K answer without "$" or thousands commas ("$1,000." -> "1000"), or None:
    the first number after the first "####" if there is one (every reference has one; a model that goes on
    to a next question writes more), else the last number in the text (a model may omit "####")."""
    text = text.replace("$", "")
    found = NUMBER.findall(text.split("####", 1)[1])[:1] if "####" in text else NUMBER.findall(text)[-1:]
    return found[0].replace(",", "") if found else None


def gsm8k_accuracy(preds, refs):
    """Fraction of predictions whose final number equals the reference's numerically ("72.0" == "72")."""
    answers = [(gsm8k_answer(p), gsm8k_answer(r)) for p, r in zip(preds, refs)]
    return float(np.mean([a is not None and float(a) == float(b) for a, b in answers]))


def generation_metrics(preds, refs, gsm8k=False, tokenize="13a"):
    """Per-sample ROUGE-1, ROUGE-2, ROUGE-L F and BLEU-4 averaged over samples, "avg" = the mean of these four
    (the paper's Avg), sacrebleu's corpus BLEU ("13a", or "zh" for Chinese), with gsm8k=True "accuracy"."""
    assert len(preds) == len(refs) > 0, (len(preds), len(refs))
    scores = [per_sample_scores(p, r) for p, r in zip(preds, refs)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    out["avg"] = float(np.mean(list(out.values())))
    out["corpus_bleu"] = corpus_bleu(preds, refs, tokenize)
    if gsm8k:
        out["accuracy"] = gsm8k_accuracy(preds, refs)
    return out


# -----------------------------------------------------------------------------
# tables and plots of runs

# the only arguments runs may differ in and still be averaged as seeds: the seed, and where and how often a
# run logs and saves (the flags a resumed run may change)
SEED_ARGS = ("seed",) + finetune.RESUME_MAY_CHANGE


def config(run):
    """A run's arguments except SEED_ARGS: runs with different configs are never averaged. A flag added to
    train.py after a run was made counts at its default, which is what that run did."""
    defaults = vars(finetune.parser().parse_args([]))
    args = {**{k: v for k, v in defaults.items() if k not in run.get("args", {})}, **run.get("args", {})}
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
