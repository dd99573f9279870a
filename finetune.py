"""
One fine-tuning run, read top to bottom: the flags, the one place they become a method's config, the model,
one training step, evaluation on merged weights, the epoch loop, and the files a run leaves. train.py runs it
from the command line; bench.py times the same step and runs the same loop on transformers + peft; eval.py
re-scores a saved run. Methods plug in through lora.py's interface (wrap / param_groups / extra_loss /
after_step / merge / save / load / label): nothing here asks which method runs. Errors are exceptions; the
scripts print them.
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

import adaq_lora
import baselines
import data
import dynamic_lora
import quant
import tlora_plus
import lora
from lora import LoRA
from model import from_pretrained, read_config, resolve
from tokenizer import load_tokenizer

METHODS = {"full": baselines.FullFineTuning, "head": baselines.HeadOnly, "bitfit": baselines.BitFit,
           "adapter": baselines.Houlsby, "lora": LoRA, "tlora": tlora_plus.TLoRA,
           "tlora_plus": tlora_plus.TLoRAPlus, "dynamic_lora": dynamic_lora.DynamicLoRA,
           "adalora": adaq_lora.AdaLoRA, "adaq_lora": adaq_lora.AdaQLoRA}


# -----------------------------------------------------------------------------
# flags, and the one place they become a method's config

def parser(methods=METHODS):
    p = argparse.ArgumentParser(description="nanoPEFT: fine-tune on GLUE (or alpaca/gsm8k) with one PEFT "
                                "method")
    # what to train
    p.add_argument("--method", default="lora", help=f"one of {', '.join(methods)}")
    p.add_argument("--task", default="mrpc", help=f"GLUE task: {', '.join(data.TASKS)}; or a causal-LM task "
                   f"(GPT-2 only, scored on generated text): {', '.join(data.GEN_TASKS)}")
    p.add_argument("--model", default="roberta-base", help="hub id or local folder (config.json + weights)")
    p.add_argument("--data_dir", default=None,
                   help="GLUE TSV folder (e.g. ../shared/data/glue), gsm8k's folder (train.jsonl, "
                   "test.jsonl) or alpaca's JSON/JSONL file; default: the hub")
    p.add_argument("--out_dir", default=None, help="where metrics.json and the trained tensors go")
    # the method's config: a flag left out keeps the default of the method's dataclass (lora.LoRAConfig, ...)
    p.add_argument("--rank", type=int, default=None, help="adapter rank r (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha: scale alpha/r (default 16)")
    p.add_argument("--dropout", type=float, default=None, help="dropout on the adapter input (default 0.1)")
    p.add_argument("--rslora", action="store_true", default=None,
                   help="scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--targets", default=None, help="all-linear (default) or a comma list of "
                   "query,key,value,c_attn,out,fc,proj")
    p.add_argument("--tlora_train", default=None, choices=tlora_plus.CONFIGS,
                   help="TLoRA+ trainable factors (ABC)")
    p.add_argument("--ratio", type=float, default=None, help="TLoRA+ lambda: lr_B = lr*lambda^1.5, "
                   "lr_C = lr*lambda^0.5 (default 4)")
    p.add_argument("--b_init", default=None, choices=["zero", "lecun"],
                   help="TLoRA B init: 0 or N(0, 1/r)")
    p.add_argument("--tlora_init", default=None, choices=["spec", "official"],
                   help="TLoRA factors: SPEC's LeCun init (default) or the official code's kaiming init + "
                   "Dropout(0.5) on the adapter output")
    p.add_argument("--adapter_size", type=int, default=None, help="Houlsby adapter bottleneck m (default 64)")
    p.add_argument("--beta", type=float, default=None,
                   help="Dynamic LoRA: r_l = r(1 + beta v_l) (default 0.125)")
    p.add_argument("--r_max", type=int, default=None, help="Dynamic LoRA: the largest rank (default 4r)")
    p.add_argument("--n_cal", type=int, default=None, help="Dynamic LoRA: calibration batches (default 32)")
    p.add_argument("--importance_every", type=int, default=None,
                   help="Dynamic LoRA: measure importance every N steps (default 10)")
    p.add_argument("--importance_beta", type=float, default=None, help="Dynamic LoRA: importance EMA (0.9)")
    p.add_argument("--omega_every", type=int, default=None, help="Dynamic LoRA: update omega and m every N "
                   "steps (default 100) ...")
    p.add_argument("--omega_start", type=int, default=None,
                   help="... from this step (default: the warmup steps)")
    p.add_argument("--lambda1", type=float, default=None, help="Dynamic LoRA: L2 weight on A (default 1e-4)")
    p.add_argument("--lambda2", type=float, default=None, help="Dynamic LoRA: L2 weight on B (default 1e-4)")
    p.add_argument("--init_r", type=int, default=None, help="AdaLoRA: every matrix's starting rank (12)")
    p.add_argument("--target_r", type=int, default=None, help="AdaLoRA: the average final rank (8)")
    p.add_argument("--tinit", type=int, default=None, help="AdaLoRA: steps before masking starts (200)")
    p.add_argument("--tfinal", type=int, default=None, help="AdaLoRA: last steps, mask frozen (1000)")
    p.add_argument("--delta_t", type=int, default=None, help="AdaLoRA: mask every N steps (10)")
    p.add_argument("--beta1", type=float, default=None, help="AdaLoRA: sensitivity EMA (0.85)")
    p.add_argument("--beta2", type=float, default=None, help="AdaLoRA: uncertainty EMA (0.85)")
    p.add_argument("--orth_reg_weight", type=float, default=None,
                   help="AdaLoRA: orthogonal regulariser weight (0.5)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (LoRA: of the A matrices; default: the method's)")
    p.add_argument("--lr_ratio", type=float, default=None, help="LoRA: lr of B = lr x lr_ratio (default 1: "
                   "plain LoRA; seed 000 / LoRA+ tunes it, e.g. --lr 1e-4 --lr_ratio 16, SPEC 2.1)")
    p.add_argument("--head_lr", type=float, default=None,
                   help="task-head learning rate (default: the method's)")
    p.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay (default 0.1)")
    # the run
    p.add_argument("--quant", default=None, choices=["none", "nf4"],
                   help="store the frozen base in NF4 (lora: QLoRA); default: the method's (adaq_lora: nf4)")
    p.add_argument("--select", default="last", choices=["last", "holdout"],
                   help="which epoch to keep and report: the last (default), or the best on a seeded 10%% of "
                   "train held out from training (SPEC 1.4); never the reported dev split")
    p.add_argument("--epochs", type=int, default=3, help="0: evaluate the model as loaded (zero-shot)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches of --batch_size per optimizer "
                   "step: K of B train as one batch of K·B")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--eval_samples", type=int, default=0,
                   help="causal-LM tasks: generate for the first N evaluation prompts (0: all)")
    p.add_argument("--max_new_tokens", type=int, default=256,
                   help="causal-LM tasks: greedy tokens per answer")
    p.add_argument("--max_len", type=int, default=None,
                   help="max tokens per example (default: the task's, SPEC 1.4)")
    p.add_argument("--max_train_samples", type=int, default=0, help="use only the first N training examples")
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log_every", type=int, default=20, help="read the loss back every N steps")
    p.add_argument("--save_every", type=int, default=0, help="write a checkpoint every N steps and at each "
                   "epoch end, for --resume (0: none; the run removes it when it completes)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out_dir")
    p.add_argument("--latency_passes", type=int, default=0,
                   help="after training, time N batch-1 dev passes, merged and not (SPEC 1.5: 200); "
                   "0 skips it")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA: with CUDA graphs)")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute each block's activations in backward: less memory, ~1/3 more compute")
    p.add_argument("--pad_multiple", type=int, default=None, help="pad batches to a multiple of this "
                   "(default: 32 with --compile, so it compiles a handful of shapes; else 1)")
    return p


AT_LEAST_1 = ("batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "log_every", "pad_multiple",
              "rank", "adapter_size", "max_len", "n_cal", "importance_every", "omega_every", "r_max",
              "init_r", "delta_t")
AT_LEAST_0 = ("epochs", "eval_samples", "lr", "head_lr", "weight_decay", "max_train_samples", "max_steps",
              "save_every", "latency_passes", "warmup_ratio", "lambda1", "lambda2", "beta", "omega_start",
              "target_r", "tinit", "tfinal", "orth_reg_weight")


def parse_args(argv=None, methods=METHODS):
    """The flags, checked before anything loads: a bad value is one line naming the flag."""
    args = parser(methods).parse_args(argv)
    if args.method not in methods:
        raise ValueError(f"unknown method {args.method!r}; choose one of {', '.join(methods)}")
    for names, low in ((AT_LEAST_1, 1), (AT_LEAST_0, 0)):
        for name in names:
            v = getattr(args, name, None)
            if v is not None and not v >= low:  # `not >=` also catches nan
                raise ValueError(f"--{name} must be ≥ {low}, not {v}")
    for name, v, ok, want in (("warmup_ratio", args.warmup_ratio, args.warmup_ratio <= 1, "≤ 1"),
                              ("grad_clip", args.grad_clip, args.grad_clip > 0, "> 0"),
                              ("dropout", args.dropout, args.dropout is None or 0 <= args.dropout < 1,
                               "in [0, 1)"),
                              ("ratio", args.ratio, args.ratio is None or args.ratio > 0, "> 0")):
        if not ok:
            raise ValueError(f"--{name} must be {want}, not {v}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU here; pass --device cpu")
    if args.pad_multiple is None:
        args.pad_multiple = 32 if args.compile else 1
    if args.targets not in (None, "all-linear"):
        args.targets = args.targets.split(",")
    return args


# config field -> flag, where the paper's name is not the flag's
FLAG_OF = {"r": "rank", "train": "tlora_train", "init": "tlora_init"}
METHOD_FLAGS = ("rank", "alpha", "dropout", "rslora", "targets", "tlora_train", "tlora_init", "ratio",
                "b_init", "adapter_size", "beta", "r_max", "n_cal", "importance_every", "importance_beta",
                "omega_every", "omega_start", "lambda1", "lambda2", "init_r", "target_r", "tinit", "tfinal",
                "delta_t", "beta1", "beta2", "orth_reg_weight", "lr", "lr_ratio", "head_lr",
                "weight_decay")  # the flags above the run's


def method_from_args(args, methods=METHODS):
    """The method's dataclass config from the flags of the same names; a flag left at None keeps the
    default, and a method flag the method does not have is refused rather than ignored."""
    cls = methods[args.method]
    flags = {FLAG_OF.get(f.name, f.name): f.name for f in dataclasses.fields(cls.Config)}
    stray = [f for f in METHOD_FLAGS if getattr(args, f, None) is not None and f not in flags]
    if stray:
        raise ValueError(f"--{stray[0]} does not apply to --method {args.method}; drop it or pick a method "
                         f"that has it")
    given = {field: getattr(args, flag, None) for flag, field in flags.items()}
    return cls(cls.Config(**{k: v for k, v in given.items() if v is not None}))


# -----------------------------------------------------------------------------
# the model, the data, the optimizer

def build(args, method):
    """-> (model wrapped by the method, tokenizer, task), on args.device. A method that calibrates on data
    before its adapters exist (Dynamic LoRA) reads the run's first-epoch batches; the others never load
    them."""
    task = data.get_task(args.task)
    folder = resolve(args.model)
    cfg = read_config(folder, task.num_labels)  # before the weights: a max_len the model cannot hold
    if task.num_labels == 0 and cfg.family != "gpt2":
        raise ValueError(f"--task {task.name} trains a causal LM, and {args.model} is a {cfg.family} "
                         f"encoder, which cannot generate; pass a GPT-2 checkpoint (--model gpt2)")
    positions = cfg.n_positions - (cfg.pad_id + 1 if cfg.family == "roberta" else 0)  # RoBERTa's offset
    if (args.max_len or task.max_len) > positions:
        raise ValueError(f"--max_len {args.max_len or task.max_len} exceeds the {positions} positions of "
                         f"{args.model}; pass --max_len {positions} or less")
    for flag in ("rank", "init_r"):  # every block linear has the hidden size d as its in or out side
        if (getattr(args, flag, None) or 0) > cfg.d:
            raise ValueError(f"--{flag} {getattr(args, flag)} exceeds the hidden size {cfg.d} of "
                             f"{args.model}, the smaller side of its layers; pass --{flag} {cfg.d} or less")
    torch.manual_seed(args.seed)
    model = from_pretrained(folder, num_labels=task.num_labels)
    model.name_or_path = args.model
    tok = load_tokenizer(folder, model.cfg.family)
    if args.quant is None:
        args.quant = method.quant
    if args.quant != method.quant == "nf4":
        raise ValueError(f"--method {args.method} is defined on an NF4 base; drop --quant {args.quant} "
                         f"(its float-base twin is --method adalora)")
    if args.quant == "nf4":  # before wrap: an adapter layer then wraps a Linear4bit as it would an nn.Linear
        quant.quantize_model(model)
        frozen = [n + ".weight" for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)]
        if any(method.trains(n) for n in frozen):
            raise ValueError(f"--quant nf4 stores the base weights in 4 bits, which cannot train, but "
                             f"--method {args.method} trains them; use an adapter method (lora = QLoRA), "
                             f"head or bitfit")
    model.grad_checkpointing = args.grad_checkpointing
    model = method.wrap(model.to(args.device), first_epoch(args, task, tok))
    return model, tok, task


def first_epoch(args, task, tok):
    """The training batches of epoch 1 in the run's own seeded order; a generator, so nothing is read
    until used."""
    train = load_examples(task, "train", args, tok)
    regression = task.num_labels == 1
    yield from data.train_batches(train, args.batch_size, tok.pad_id, regression, random.Random(args.seed),
                                  args.pad_multiple)


def load_examples(task, split, args, tok):
    """split: "dev", "train", or "holdout": with --select holdout, a seeded 10% of train that never trains."""
    rows = data.load_split(task, "dev" if split == "dev" else "train", args.data_dir)
    if split != "dev" and args.max_train_samples:
        rows = rows[:args.max_train_samples]
    if split != "dev" and args.select == "holdout":
        train, held = data.holdout_split(rows)
        rows = held if split == "holdout" else train
    if task.num_labels:
        return data.encode(tok, rows, args.max_len or task.max_len)
    if split != "train" and args.eval_samples:
        rows = rows[:args.eval_samples]
    examples, cut = data.encode_lm(tok, rows, args.max_len or task.max_len, train=split == "train")
    if cut:
        print(f"{cut} of {len(rows)} {split} responses were cut to fit --max_len "
              f"{args.max_len or task.max_len}")
    return examples


def lr_lambda(warmup, total):
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total` (SPEC §1.4)."""
    return lambda t: t / max(1, warmup) if t < warmup else max(0.0, (total - t) / max(1, total - warmup))


def optimizer(method, model, total, warmup, device):
    """AdamW over the method's groups (SPEC §1.4) and the warmup-then-linear-decay schedule over `total`
    steps."""
    opt = torch.optim.AdamW(method.param_groups(model), betas=(0.9, 0.999), eps=1e-8,
                            fused=device.startswith("cuda"))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total))


def compile_model(model, device):
    """torch.compile, one graph per padded shape. On CUDA, "reduce-overhead" also replays each step as a
    CUDA graph. On CPU, dropout keeps ATen's vectorised RNG: inductor's own made each MiniLM step ~10%
    slower than eager here. A method's extra_loss and after_step hooks stay outside the compiled forward
    and run as usual. A 4-bit base (--quant nf4) also gets its dequantize compiled into fused loops."""
    quant.compile_dequantize()
    if device.startswith("cuda"):
        return torch.compile(model, mode="reduce-overhead")
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    return torch.compile(model)


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights, SPEC §1.4); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


# -----------------------------------------------------------------------------
# one step, evaluation

def task_loss(logits, labels):
    if logits.dim() == 3:  # a causal LM: token t predicts token t+1; -100 (prompt, padding) is no loss
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=-100)
    if logits.size(-1) == 1:  # STS-B regression
        return F.mse_loss(logits.view(-1).float(), labels)
    return F.cross_entropy(logits.float(), labels)


def weight(batch):
    """What a batch's loss averages over: its examples, or a causal LM's response tokens."""
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else len(labels)


def train_step(model, forward, method, batches, opt, sched, step, grad_clip, device):
    """The step-th optimizer step over one batch or a list of micro-batches (--grad_accum): forward (`forward`
    is the model or its compiled self) and backward of each, its task loss weighted by its share of the
    examples, so K micro-batches of B equal one batch of K·B; the method's extra loss once; clip, AdamW, the
    schedule, then the method's after_step (before zero_grad, so it can read this step's gradients). Returns
    the task loss (without the extra loss) and the logits, detached and on the device: reading them is the
    caller's host sync."""
    batches = [batches] if isinstance(batches, dict) else batches
    n = sum(weight(b) for b in batches)
    task, all_logits = 0.0, []
    for i, batch in enumerate(batches):
        b = {k: v.to(device) for k, v in batch.items()}
        inner = i < len(batches) - 1 and hasattr(forward, "no_sync")  # DDP: all-reduce on the last one only
        with forward.no_sync() if inner else contextlib.nullcontext():
            with autocast(device):
                logits = forward(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            loss = task_loss(logits, b["labels"]) * (weight(batch) / n)
            task = task + loss.detach()
            if i == len(batches) - 1:
                extra = method.extra_loss(model)
                if extra is not None:
                    loss = loss + extra
            loss.backward()
        all_logits.append(logits.detach())
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    sched.step()
    method.after_step(model, step)
    opt.zero_grad(set_to_none=True)
    return task, torch.cat(all_logits) if all_logits[0].dim() == 2 else None  # a causal LM's: not kept


@torch.no_grad()
def evaluate(model, forward, method, examples, task, args, tok):
    """Dev metrics, on merged weights: an adapted layer then costs what the frozen layer costs. A causal-LM
    task generates instead (its metrics then hold the predictions too, under "predictions")."""
    if task.num_labels == 0:
        return generate_and_score(model, method, examples, task, args, tok)
    model.eval()
    method.merge(model, float_only=True)
    logits = [None] * len(examples)
    for idx, b in data.eval_batches(examples, args.eval_batch_size, tok.pad_id, task.num_labels == 1,
                                    args.pad_multiple):
        with autocast(args.device):
            out = forward(b["input_ids"].to(args.device), b["attention_mask"].to(args.device),
                          b["token_type_ids"].to(args.device)).float().cpu()
        for i, row in zip(idx, out):
            logits[i] = row
    method.unmerge(model)
    logits = torch.stack(logits)
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the evaluation logits are NaN or inf: training diverged; lower --lr "
                                 f"(now {method.cfg.lr:g})")
    return data.glue_metrics(task.name, logits.numpy(), [e["label"] for e in examples])


@torch.no_grad()
def generate_and_score(model, method, examples, task, args, tok):
    """Greedy answers to the evaluation prompts (KV cache, batches of --eval_batch_size, merged weights),
    decoded up to EOS and scored against the references with eval.py's ROUGE-1/2/L, BLEU-4 and, for gsm8k,
    the exact match of the final number."""
    from eval import generation_metrics, per_sample_scores  # eval.py imports this file
    model.eval()
    method.merge(model, float_only=True)
    texts = [None] * len(examples)
    for idx, b in data.prompt_batches(examples, args.eval_batch_size, tok.pad_id):
        with autocast(args.device):
            out = model.generate(b["input_ids"].to(args.device), b["attention_mask"].to(args.device),
                                 args.max_new_tokens, tok.eos).tolist()
        for i, tokens in zip(idx, out):
            texts[i] = tok.decode(tokens[:tokens.index(tok.eos)] if tok.eos in tokens else tokens)
    method.unmerge(model)
    refs = [e["reference"] for e in examples]
    metrics = generation_metrics(texts, refs, gsm8k=task.name == "gsm8k")
    metrics["predictions"] = [{"prompt": e["prompt"], "reference": e["reference"], "prediction": p,
                               **per_sample_scores(p, e["reference"])} for e, p in zip(examples, texts)]
    return metrics


@torch.no_grad()
def latency_ms(model, method, examples, args, pad_id, passes, merged):
    """Inference latency at batch 1 on dev examples (SPEC §1.5): 20 warm-up passes, then the mean ms of
    `passes` passes, adapters merged into the base weights or not."""
    model.eval()
    if merged:
        method.merge(model, float_only=True)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    one = [data.collate([examples[i % len(examples)]], pad_id) for i in range(20 + passes)]
    times = []
    for i, b in enumerate(one):
        sync()
        t0 = time.perf_counter()
        with autocast(args.device):
            model(b["input_ids"].to(args.device), b["attention_mask"].to(args.device),
                  b["token_type_ids"].to(args.device))
        sync()
        if i >= 20:
            times.append(time.perf_counter() - t0)
    method.unmerge(model)
    return 1e3 * sum(times) / len(times)


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the whole process's peak


# -----------------------------------------------------------------------------
# the run

def run(args, methods=METHODS):
    """Train args.method on args.task and save the selected epoch (--select: the last, or the best on the
    held-out slice of train) to args.out_dir. Returns metrics.json's dict. With --save_every, a checkpoint of
    the whole training state is written every N steps and at each epoch end; --resume continues from it and
    ends with the same tensors and metrics as a run never stopped. Under torchrun, every rank trains on its
    shard of each batch and rank 0 alone logs, evaluates and writes; the others return None."""
    rank, world = distributed(args)
    if rank == 0:
        check_out_dir(args)
    else:  # only rank 0 logs
        sys.stdout = open(os.devnull, "w")
    random.seed(args.seed)
    method = method_from_args(args, methods)
    model, tok, task = build(args, method)
    train = load_examples(task, "train", args, tok)
    holdout = load_examples(task, "holdout", args, tok) if args.select == "holdout" else None
    dev = load_examples(task, "dev", args, tok)
    steps_per_epoch = math.ceil(math.ceil(len(train) / (args.batch_size * world)) / args.grad_accum)
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(args.max_steps, total)
    warmup = int(args.warmup_ratio * total)
    if task.num_labels == 0:  # generation must fit the model's positions: say so before training
        longest = max(len(e["input_ids"]) for e in dev)
        if longest + args.max_new_tokens > model.cfg.n_positions:
            raise ValueError(f"the longest evaluation prompt ({longest} tokens) and --max_new_tokens "
                             f"{args.max_new_tokens} exceed the {model.cfg.n_positions} positions of "
                             f"{args.model}; pass --max_new_tokens {model.cfg.n_positions - longest} or less")
    if not method.param_groups(model):
        raise ValueError(f"--method {args.method} trains nothing on --task {task.name} (a causal LM has no "
                         f"task head); pick an adapter method (--method full --epochs 0 evaluates the model "
                         f"as loaded)")
    opt, sched = optimizer(method, model, total, warmup, args.device)
    method.schedule(total, warmup)
    # SPEC §1.5: all parameters (a 4-bit weight counts out·in) plus adapter buffers (TLoRA's frozen factors)
    n_all = quant.count_params(model) + sum(b.numel() for n, b in model.named_buffers() if ".lora_" in n)
    n_train = sum(p.numel() for g in opt.param_groups for p in g["params"])
    print(f"{args.method} on {task.name}: {n_train:,} trainable of {n_all:,} ({100 * n_train / n_all:.3f}%), "
          f"{len(train)} train / {len(holdout or [])} held out / {len(dev)} dev examples, {total} steps on "
          f"{args.device}")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    forward = compile_model(model, args.device) if args.compile else model
    if world > 1:  # all-reduces the gradients of the trainable tensors only (frozen ones have none)
        forward = torch.nn.parallel.DistributedDataParallel(forward, broadcast_buffers=False)

    rng = random.Random(args.seed)  # the data order of every epoch
    # everything the loop carries from step to step: a checkpoint saves it, --resume restores it
    loop = {"epoch": 0, "batch": 0, "epoch_rng": rng.getstate(), "step": 0, "train_seconds": 0.0,
            "sums": [0.0, 0.0, 0.0], "n_steps": 0, "since": 0,
            "history": [],  # one row per epoch
            # (step, mean task loss over the steps since the previous row, lr) at every log step
            "log": [],
            "kept": None,   # (epoch, trained tensors) of the epoch --select keeps; None: the current weights
            "predictions": {}}  # epoch -> a causal-LM task's generated answers
    window = torch.zeros(3, device=args.device)  # Σ task loss, Σ correct, Σ examples since the last read
    if args.resume:
        loop, window = load_checkpoint(args, model, method, opt, sched)
        print(f"resumed at step {loop['step']} (epoch {loop['epoch'] + 1}, batch {loop['batch']})")
    stop = interrupt_flag()
    try:
        train_loop(args, loop, window, rng, model, forward, method, opt, sched, train, dev, holdout, task,
                   tok, steps_per_epoch, total, stop)
    finally:
        stop["restore"]()
    if args.epochs == 0:  # zero-shot: the model as loaded (with its adapters at their identity init)
        loop["history"] = [{"epoch": 0, "step": 0, **evaluate(model, forward, method, dev, task, args, tok)}]
        loop["predictions"][0] = loop["history"][0].pop("predictions", None)
    if rank:  # rank 0 writes; the others are done
        torch.distributed.barrier()
        return None

    history = loop["history"]
    selected = history[-1]["epoch"]
    if loop["kept"] is not None:  # --select holdout: back to the chosen epoch's weights
        selected, trained = loop["kept"]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in trained:
                    p.copy_(trained[n])
    metrics = {k: v for k, v in history[selected - 1].items() if k not in ("epoch", "step", "holdout") and
               not k.startswith("train_")}
    # eval.py's table rows: QLoRA apart from LoRA
    label = method.label() + ("+nf4" if args.quant == "nf4" != method.quant else "") + \
        (" zero-shot" if args.epochs == 0 else "")
    step, train_seconds = loop["step"], loop["train_seconds"]
    result = {"task": task.name, "method": args.method, "label": label, "model": args.model,
              "metrics": metrics, "select": args.select, "selected_epoch": selected, "last": history[-1],
              "history": history, "loss_log": loop["log"], "trainable_params": n_train, "total_params": n_all,
              "trainable_pct": 100 * n_train / n_all,
              "steps": step, "train_seconds": train_seconds, "s_per_step": train_seconds / max(1, step),
              "peak_memory_mb": peak_memory_mb(args.device), "args": vars(args),
              **({"latency_ms": latency_ms(model, method, dev, args, tok.pad_id, args.latency_passes, False),
                  "latency_merged_ms":
                      latency_ms(model, method, dev, args, tok.pad_id, args.latency_passes, True)}
                 if args.latency_passes else {}),
              "method_config": dataclasses.asdict(method.cfg), "method_report": method.report(model)}
    print(f"reported: dev at epoch {selected} "
          f"({'the last' if args.select == 'last' else 'best on holdout'}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if "ranks" in result["method_report"]:  # a method whose ranks differ per matrix (dynamic_lora, adalora)
        ranks = result["method_report"]["ranks"]
        print(f"ranks per adapted matrix (sum {sum(ranks.values())}): " +
              " ".join(f"{n}={r}" for n, r in ranks.items()))
    if args.out_dir:
        method.save(model, args.out_dir)
        if loop["predictions"].get(selected):  # one JSON line per evaluation prompt: what was generated
            write_text(os.path.join(args.out_dir, "predictions.jsonl"), "".join(
                json.dumps(p, ensure_ascii=False) + "\n" for p in loop["predictions"][selected]))
        # last: its presence means the run is whole
        write_json(os.path.join(args.out_dir, "metrics.json"), result)
        if os.path.exists(os.path.join(args.out_dir, CHECKPOINT)):  # training state, not a result
            os.remove(os.path.join(args.out_dir, CHECKPOINT))
        print(f"wrote {args.out_dir}/metrics.json")
    if world > 1:
        torch.distributed.barrier()
    return result


def train_loop(args, loop, window, rng, model, forward, method, opt, sched, train, dev, holdout, task, tok,
               steps_per_epoch, total, stop):
    """The epochs: steps, a log row every --log_every steps, a checkpoint every --save_every steps and at each
    epoch end, evaluation after each epoch. All it carries between steps lives in `loop` (and `window`, the
    device sums), so a checkpoint of them continues it exactly."""
    classify = task.num_labels > 1
    while loop["epoch"] < args.epochs and loop["step"] < total:
        epoch = loop["epoch"]
        model.train()
        t0, started = time.time(), loop["batch"]
        rng.setstate(loop["epoch_rng"])
        rank, world = rank_world()
        batches = data.train_batches(train, args.batch_size * world, tok.pad_id, not classify, rng,
                                     args.pad_multiple)
        batches = (shard(b, rank, world) for b in batches)  # this rank's rows of each global batch
        micro = itertools.islice(batches, loop["batch"] * args.grad_accum, None)  # resume: skip the done ones
        batches = iter(lambda: list(itertools.islice(micro, args.grad_accum)), [])  # K micro-batches a step
        bar = tqdm(batches, total=steps_per_epoch, initial=loop["batch"],
                   desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stdout, disable=not sys.stdout.isatty())
        for b in bar:
            loop["step"] = step = loop["step"] + 1
            loss, logits = train_step(model, forward, method, b, opt, sched, step, args.grad_clip,
                                      args.device)
            window[0] += loss
            if classify:
                labels = torch.cat([m["labels"] for m in b])
                window[1] += (logits.argmax(-1) == labels.to(args.device)).sum()
            window[2] += sum(len(m["labels"]) for m in b)
            loop["batch"] += 1
            loop["n_steps"] += 1
            loop["since"] += 1
            if step % args.log_every == 0 or step >= total or loop["batch"] == steps_per_epoch:
                # the only host sync: every step's loss is in it
                log_step(loop, window, sched, method, bar, (time.time() - t0) / (loop["batch"] - started))
            if step >= total:
                break
            if stop["now"] and not args.out_dir:
                raise InterruptedError(f"interrupted at step {step}; nothing saved (no --out_dir)")
            if (args.save_every and step % args.save_every == 0) or stop["now"]:
                loop["train_seconds"] += time.time() - t0
                save_checkpoint(args, loop, window, model, method, opt, sched)
                t0, started = time.time(), loop["batch"]
                if stop["now"]:
                    raise InterruptedError(f"interrupted at step {step}; resume with the same command and "
                                           f"--resume")
        loop["train_seconds"] += time.time() - t0
        if rank:  # rank 0 evaluates and keeps the epoch; the others go on with the next epoch
            loop.update(epoch=epoch + 1, batch=0, epoch_rng=rng.getstate(), sums=[0.0, 0.0, 0.0], n_steps=0)
            continue
        row = {"epoch": epoch + 1, "step": loop["step"], "train_loss": loop["sums"][0] / loop["n_steps"],
               **({"train_accuracy": loop["sums"][1] / loop["sums"][2]} if classify else {}),
               "train_examples": int(loop["sums"][2])}  # over all ranks
        row.update(evaluate(model, forward, method, dev, task, args, tok))
        loop["predictions"][epoch + 1] = row.pop("predictions", None)  # a causal-LM task's answers
        if holdout:
            row["holdout"] = evaluate(model, forward, method, holdout, task, args, tok)
            row["holdout"].pop("predictions", None)
        loop["history"].append(row)
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                   if k not in ("epoch", "step", "holdout")) +
              (f", holdout {data.main_metric(task.name)} {row['holdout'][data.main_metric(task.name)]:.4f}"
               if holdout else ""))
        if holdout:
            key, kept = data.main_metric(task.name), loop["kept"]
            if kept is None or row["holdout"][key] > loop["history"][kept[0] - 1]["holdout"][key]:
                loop["kept"] = (epoch + 1, {n: p.detach().clone() for n, p in model.named_parameters()
                                            if p.requires_grad})
        loop.update(epoch=epoch + 1, batch=0, epoch_rng=rng.getstate(), sums=[0.0, 0.0, 0.0], n_steps=0)
        if args.save_every and loop["epoch"] < args.epochs and loop["step"] < total:
            save_checkpoint(args, loop, window, model, method, opt, sched)


def distributed(args):
    """(rank, world size): torchrun sets RANK and WORLD_SIZE, as nanoGPT reads them; nccl on CUDA (one GPU per
    process), gloo on CPU. Plain `python train.py` is (0, 1) and starts no process group."""
    if "RANK" not in os.environ:
        return 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.save_every or args.resume:
        raise ValueError("--save_every and --resume are single-process for now; drop them under torchrun")
    if args.device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun started {world} processes on this node but torch sees "
                             f"{torch.cuda.device_count()} GPUs; pass --nproc_per_node "
                             f"{torch.cuda.device_count()} or fewer")
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return rank, world


def rank_world():
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard(batch, rank, world):
    """This rank's rows of a global batch: rows rank·B … (rank+1)·B of B·world, so W processes of batch B see
    what one process of batch W·B sees. A short last batch is split as evenly as it goes; a rank left with
    no row gets the last one again (a repeat weighs one row twice in that one step)."""
    n = len(batch["labels"])
    bounds = [round(i * n / world) for i in range(world + 1)]
    rows = slice(bounds[rank], bounds[rank + 1]) if bounds[rank + 1] > bounds[rank] else slice(n - 1, n)
    return {k: v[rows] for k, v in batch.items()}


def log_step(loop, window, sched, method, bar, s_per_step):
    """Read the device sums back (one host sync), log the mean loss since the last row, stop on NaN/inf."""
    if torch.distributed.is_initialized():  # every rank's steps: the mean loss, the summed counts
        torch.distributed.all_reduce(window)
        window[0] /= torch.distributed.get_world_size()
    w_loss, w_correct, w_seen = window.tolist()
    window.zero_()
    loop["sums"] = [loop["sums"][0] + w_loss, loop["sums"][1] + w_correct, loop["sums"][2] + w_seen]
    lr = sched.get_last_lr()[0]  # the first group's learning rate for the next step
    loop["log"].append((loop["step"], w_loss / loop["since"], lr))
    loop["since"] = 0
    if not math.isfinite(w_loss):
        raise FloatingPointError(f"loss is {w_loss} by step {loop['step']}; lower --lr "
                                 f"(now {method.cfg.lr:g}); the last checkpoint, if any, is kept")
    bar.set_postfix(loss=f"{loop['log'][-1][1]:.4f}", lr=f"{lr:.2e}")
    if bar.disable:  # no terminal (a log file): one line per log step instead of the bar
        print(f"step {loop['step']}: loss {loop['log'][-1][1]:.4f}, lr {lr:.2e}, {s_per_step:.3f} s/step",
              flush=True)


# -----------------------------------------------------------------------------
# the run's folder, checkpoints and resume

CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("metrics.json", CHECKPOINT, "adapter_model.safetensors", "adapter_config.json",
             "trainable.safetensors", "predictions.jsonl")
# the flags a resumed run may change: where it logs and how often it saves, not what it trains
RESUME_MAY_CHANGE = ("out_dir", "resume", "overwrite", "save_every", "log_every", "latency_passes")


def check_out_dir(args):
    """Before anything loads: the folder is creatable and writable, and holds no other run unless --resume
    continues it or --overwrite replaces it (its files go first, so none of them can pass for this run's)."""
    if not args.out_dir:
        if args.resume or args.save_every:
            raise ValueError("--resume and --save_every need --out_dir (where the checkpoint lives)")
        return
    d = args.out_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"--out_dir {d} is a file; pass a folder")
    os.makedirs(d, exist_ok=True)
    if not os.access(d, os.W_OK):
        raise ValueError(f"--out_dir {d} is not writable; pass a folder you can write to")
    used = [f for f in RUN_FILES if os.path.exists(os.path.join(d, f))]
    if args.resume:
        if os.path.exists(os.path.join(d, "metrics.json")):
            raise ValueError(f"the run in {d} is complete (metrics.json); nothing to resume")
        if CHECKPOINT not in used:
            raise ValueError(f"{d} has no {CHECKPOINT} to resume from; drop --resume to start the run")
    elif used and not args.overwrite:
        raise ValueError(f"--out_dir {d} holds another run ({used[0]}); pass --overwrite to replace it, "
                         f"--resume to continue it, or another folder")
    else:
        for f in used:
            os.remove(os.path.join(d, f))


def save_checkpoint(args, loop, window, model, method, opt, sched):
    """Everything to continue bit for bit: the trained tensors (and adapter buffers), AdamW, the
    schedule, every RNG, the loop's position and sums, the method's own state and the args; a temp
    file, then renamed."""
    state = {"args": vars(args), "loop": loop, "window": window.cpu(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "method": method.state_dict(),
             "tensors": {n: t.detach() for n, t in trained_state(model).items()},
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                     "numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    lora.write_atomic(args.out_dir, {CHECKPOINT: lambda path: torch.save(state, path)})


def trained_state(model):
    """The tensors training changes: the trainable parameters and the adapters' buffers (Dynamic LoRA's m)."""
    return {**{n: p for n, p in model.named_parameters() if p.requires_grad},
            **{n: b for n, b in model.named_buffers() if ".lora_" in n}}


def load_checkpoint(args, model, method, opt, sched):
    path = os.path.join(args.out_dir, CHECKPOINT)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); start again with "
                         f"--overwrite") from None
    saved, now = state["args"], vars(args)
    for k in sorted(set(saved) | set(now)):
        if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k):
            raise ValueError(f"{path} is a checkpoint of a run with --{k} {saved.get(k)}, not {now.get(k)}: "
                             f"resume with the flags it was started with, or --overwrite to start over")
    tensors = trained_state(model)
    with torch.no_grad():
        for n, t in state["tensors"].items():
            tensors[n].copy_(t)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    method.load_state_dict(state["method"])
    rng = state["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    loop = state["loop"]
    loop["epoch_rng"] = (tuple(loop["epoch_rng"][0:1]) + (tuple(loop["epoch_rng"][1]),)
                         + tuple(loop["epoch_rng"][2:]))
    if loop["kept"] is not None:
        loop["kept"] = (loop["kept"][0], {n: t.to(args.device) for n, t in loop["kept"][1].items()})
    return loop, state["window"].to(args.device)


def interrupt_flag():
    """Ctrl-C during training sets a flag; the loop finishes its step, saves a checkpoint and stops."""
    import signal
    import threading
    stop = {"now": False, "restore": lambda: None}
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if stop["now"]:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            stop["now"] = True
        signal.signal(signal.SIGINT, handler)
        stop["restore"] = lambda: signal.signal(signal.SIGINT, previous)
    return stop


def write_text(path, text):
    """A temp file renamed into place: a full disk or a Ctrl-C leaves the old file or none, never half."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    lora.write_atomic(os.path.dirname(path) or ".", {os.path.basename(path): write})


def write_json(path, obj):
    """The same, for a JSON file."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    lora.write_atomic(os.path.dirname(path) or ".", {os.path.basename(path): write})


def reevaluate(out_dir, methods=METHODS, latency_passes=0):
    """Rebuild a saved run's model from its metrics.json, load its trained tensors and score the dev split
    again; with latency_passes, also time batch-1 inference (merged and not) and return it in the metrics."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; --out_dir must be a folder written by train.py")
    try:
        with open(path) as f:
            saved = json.load(f)
        saved_args = saved["args"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a metrics.json written by train.py ({type(e).__name__}: {e}); "
                         f"re-run the training") from None
    args = parse_args([], methods)
    vars(args).update(saved_args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{out_dir} was trained on {args.device}; re-scoring it on the CPU")
        args.device = "cpu"
    method = method_from_args(args, methods)
    model, tok, task = build(args, method)
    method.load(model, out_dir)
    dev = load_examples(task, "dev", args, tok)
    metrics = evaluate(model, model, method, dev, task, args, tok)
    metrics.pop("predictions", None)
    if latency_passes:
        metrics["latency_ms"] = latency_ms(model, method, dev, args, tok.pad_id, latency_passes, False)
        metrics["latency_merged_ms"] = latency_ms(model, method, dev, args, tok.pad_id, latency_passes, True)
    return metrics, saved
