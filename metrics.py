"""
The metrics every run reports, written from scratch, each as the reference it follows:

- GLUE (glue_metrics): accuracy, Matthews correlation (MCC), and for the binary tasks F1, recall and ROC-AUC
  of the positive class, as scikit-learn computes them (MCC: Gorodkin's multi-class R_K; AUC: Mann-Whitney U);
  STS-B's Pearson and Spearman (ties at their average rank) correlations as scipy; the cross-entropy of the
  softmax. main_metric names the one a task is selected on (CoLA: MCC, STS-B:
  Pearson).
- Generation (generation_metrics), scored 0..1: per-sample ROUGE-1, ROUGE-2 and ROUGE-L F and BLEU-4,
  averaged over samples, and "avg", their mean. The ADAQ-LoRA paper (Feng et al. 2024, "Large Language Model
  Fine-tuning Method Based on Adaptive Quantization", Tables 1-2) names these columns but not how it computes
  them; we take the routine of ChatGLM-6B's fine-tuning script (the paper tunes ChatGLM2-6B): ROUGE as the
  rouge_chinese package scores it (paper_rouge: unique n-grams), BLEU-4 as nltk's sentence_bleu with method3
  smoothing, except that words() splits CJK text per character where that script segments it with jieba.
  rouge-score's ROUGE F (n-gram counts) is kept beside it as "rouge_score-1/2/l". Also corpus BLEU as
  sacrebleu computes it ("13a", or "zh" for Chinese), and GSM8K's exact match of the final number.
test_all.py checks the generation metrics against rouge-chinese, rouge-score, nltk and sacrebleu, and the GLUE
ones by hand and against scikit-learn and scipy (test-only there).
"""
import math
import re
from collections import Counter

import numpy as np


# -----------------------------------------------------------------------------
# GLUE: classification and regression metrics

# the positive class of each binary task, in HF `glue` label order (RTE/QNLI: entailment = 0)
POSITIVE = {"mrpc": 1, "qqp": 1, "sst2": 1, "cola": 1, "qnli": 0, "rte": 0}
MAIN_METRIC = {"cola": "mcc", "stsb": "pearson", "alpaca": "avg"}  # the rest (gsm8k too): accuracy


def main_metric(task):
    return MAIN_METRIC.get(task, "accuracy")


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def mcc(labels, pred):
    """Matthews correlation, multi-class (Gorodkin's R_K, as scikit-learn): 0 when the denominator is 0."""
    classes = np.union1d(labels, pred)
    t = (labels[:, None] == classes).sum(0)  # (K,) true counts
    p = (pred[:, None] == classes).sum(0)    # (K,) predicted counts
    n, c = len(labels), (labels == pred).sum()
    den = math.sqrt(float(n * n - p @ p) * float(n * n - t @ t))
    return float(c * n - p @ t) / den if den else 0.0


def ranks(x):
    """Ranks 1..n, ties given their average rank (scipy's rankdata "average")."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, r) / np.bincount(inverse))[inverse]


def auc(positive, score):
    """ROC-AUC as the Mann-Whitney U of the positives' score ranks (ties count half)."""
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks(score)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def glue_metrics(task, logits, labels):
    """logits (N, C) or (N, 1) for STS-B, labels (N,) -> {metric: value}."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if task == "stsb":
        pred = logits.reshape(-1)
        return {"pearson": float(np.corrcoef(pred, labels)[0, 1]),
                "spearman": float(np.corrcoef(ranks(pred), ranks(labels))[0, 1]),
                "mse": float(np.mean((pred - labels) ** 2))}
    prob = softmax(logits)
    pred = prob.argmax(1)
    out = {"accuracy": float(np.mean(pred == labels)), "mcc": mcc(labels, pred),
           "loss": float(-np.mean(np.log(np.clip(prob[np.arange(len(labels)), labels], 1e-12, None))))}
    if task in POSITIVE:  # binary tasks: F1, recall and ROC-AUC of the positive class
        pos = POSITIVE[task]
        tp = float(np.sum((pred == pos) & (labels == pos)))
        fp = float(np.sum((pred == pos) & (labels != pos)))
        fn = float(np.sum((pred != pos) & (labels == pos)))
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        out["recall"] = tp / (tp + fn) if tp + fn else 0.0
        out["auc"] = auc(labels == pos, prob[:, pos]) if len(set(labels.tolist())) == 2 else math.nan
    return out


# -----------------------------------------------------------------------------
# generation: per-sample ROUGE-1/2/L F (rouge_chinese's, and rouge-score's) and BLEU-4 as ChatGLM's eval
# scripts score them, corpus BLEU as sacrebleu does, GSM8K's final-number exact match; all 0..1

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


# rouge_chinese's sentence ends (its Rouge.cut_sent): a line break after each match's first group
SENTENCE_ENDS = [r"([。！？\?])([^”’])", r"(\.{6})([^”’])", r"(…{2})([^”’])", r"([。！？\?][”’])([^，。！？\?])"]


def cut_sentences(text):
    """rouge_chinese's sentences of a text: a break after 。！？ or ?, after "......" and after "……", unless a
    closing quote ” or ’ follows (then after the quote, unless more of 。！？? follow); empty lines dropped."""
    for pattern in SENTENCE_ENDS:
        text = re.sub(pattern, r"\1\n\2", text)
    return [s for s in text.rstrip().split("\n") if s]


def paper_rouge(pred, ref):
    """ROUGE-1, ROUGE-2 and ROUGE-L of two token lists as the ADAQ-LoRA paper scores them: the rouge_chinese
    package 1.0.3, Rouge().get_scores(" ".join(pred), " ".join(ref)) as ChatGLM's fine-tuning script calls
    it, a port of pltrdy/rouge's algorithm. -> {"rouge-1": {"p", "r", "f"}, "rouge-2": ..., "rouge-l": ...}
    - Tokens: the text is cut into sentences (cut_sentences), whose space-separated words are concatenated:
      n-grams and the LCS run across sentence ends, which only split a token such as "why?so" in two.
    - ROUGE-N over the SETS of n-grams: P = |G(pred) & G(ref)| / |G(pred)|, R = |G(pred) & G(ref)| / |G(ref)|.
    - ROUGE-L: P = LCS / len(pred), R = LCS / len(ref), the LCS of the whole token sequences (pltrdy/rouge,
      and rouge_chinese's docstring, say the union LCS over reference sentences; 1.0.3's code does not).
    - F = 2PR / (P + R + 1e-8), so identical texts get 0.999999995; P (R) = 0 when pred (ref) has no n-gram.
    - An empty (or blank) prediction or reference scores 0 (rouge_chinese raises ValueError on it).
    Where it differs from rouge-score's (rouge_n, rouge_l): sets of n-grams, where rouge-score clips counts
    (a repeated n-gram counts once), F's 1e-8, and the sentence cut inside a token; ROUGE-L is otherwise the
    same."""
    p, r = ([w for s in cut_sentences(" ".join(t)) for w in s.split()] for t in (pred, ref))

    def prf(match, n_pred, n_ref):
        precision, recall = match / n_pred if n_pred else 0.0, match / n_ref if n_ref else 0.0
        return {"p": precision, "r": recall, "f": 2.0 * ((precision * recall) / (precision + recall + 1e-8))}

    if not p or not r:
        return {k: {"p": 0.0, "r": 0.0, "f": 0.0} for k in ("rouge-1", "rouge-2", "rouge-l")}
    out = {}
    for n in (1, 2):
        gp, gr = set(ngrams(p, n)), set(ngrams(r, n))
        out[f"rouge-{n}"] = prf(len(gp & gr), len(gp), len(gr))
    out["rouge-l"] = prf(lcs_length(p, r), len(p), len(r))
    return out


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
    """The per-sample scores of one prediction against its reference, on words() tokens: the paper's
    ROUGE-1/2/L F (paper_rouge) and BLEU-4, and rouge-score's ROUGE F as "rouge_score-1/2/l"."""
    p, r = words(pred), words(ref)
    paper = paper_rouge(p, r)
    return {**{k: paper[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}, "bleu-4": sentence_bleu(p, r),
            "rouge_score-1": rouge_n(p, r, 1), "rouge_score-2": rouge_n(p, r, 2),
            "rouge_score-l": rouge_l(p, r)}


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


def generation_metrics(preds, refs, gsm8k=False):
    """per_sample_scores averaged over samples: the paper's ROUGE-1, ROUGE-2, ROUGE-L F and BLEU-4, "avg" =
    the mean of these four (the paper's Avg), rouge-score's "rouge_score-1/2/l"; sacrebleu's corpus BLEU
    ("zh" tokenization when a reference holds CJK text, else "13a"), with gsm8k=True "accuracy"."""
    tokenize = "zh" if any(CJK.search(r) for r in refs) else "13a"
    assert len(preds) == len(refs) > 0, (len(preds), len(refs))
    scores = [per_sample_scores(p, r) for p, r in zip(preds, refs)]
    mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    four = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
    out = {k: mean[k] for k in four}
    out["avg"] = float(np.mean([mean[k] for k in four]))
    out.update({k: mean[k] for k in ("rouge_score-1", "rouge_score-2", "rouge_score-l")})
    out["corpus_bleu"] = corpus_bleu(preds, refs, tokenize)
    if gsm8k:
        out["accuracy"] = gsm8k_accuracy(preds, refs)
    return out
