"""
Fine-tune a pretrained transformer with one PEFT method and report the task's metrics, read top to bottom:
flags, setup, model and method, optimizer, the step, evaluation, the result (metrics.json), the loop. The
examples and batches come from data.py.

    python train.py --method tlora_plus --task mrpc                          # roberta-base from the hub
    python train.py --method lora --task mrpc --model DIR --data_dir GLUE     # offline: local folders
    python train.py --method adalora --help                                  # the run's and adalora's flags
    torchrun --standalone --nproc_per_node 2 train.py ...                    # data parallel

A method's flags are its config's fields (lora.LoRAConfig, ...). --grad_accum K weights each micro-batch by
its share of the step's examples (a causal LM: response tokens), so a step equals one batch of K·B.
--save_every and Ctrl-C write checkpoint.py's checkpoint; --resume ends where a run never stopped ends. Under
torchrun each rank trains on its shard of a global batch of B·world, and rank 0 logs, evaluates and writes.
--select holdout keeps the epoch best on a seeded 10% of train held out from it; the reported dev split never
chooses anything. metrics.json, written last: task, method, label, model, metrics (dev, at selected_epoch),
select, history (per epoch: train loss/accuracy, dev, holdout), loss_log ([step, mean loss since the last row,
lr]), trainable_params, total_params, trainable_pct, steps, train_seconds (training steps only),
compile_seconds, s_per_step (steps that did not compile), peak_memory_mb (training; CPU: peak RSS), args,
method_config, method_report; a causal LM adds sample_scores (each prompt's ROUGE-1/2/L and BLEU-4). Beside
it: the adapter (peft_format.py) and, for a causal LM, predictions.jsonl.
"""
import argparse
import contextlib
import dataclasses
import datetime
import inspect
import itertools
import math
import os
import random
import re
import sys
import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

import baselines
import checkpoint
import data
import metrics
import peft_format
import quant
from adaq_lora import AdaLoRA, AdaQLoRA
from dynamic_lora import DynamicLoRA
from lora import LoRA
from model import (CAUSAL, autocast, compile_model, from_pretrained, graphs_compiled, peak_memory_mb,
                   read_config, resolve)
from tlora_plus import TLoRA, TLoRAPlus
from tokenizer import load_tokenizer

METHODS = {"full": baselines.FullFineTuning, "head": baselines.HeadOnly, "bitfit": baselines.BitFit,
           "adapter": baselines.Houlsby, "lora": LoRA, "tlora": TLoRA, "tlora_plus": TLoRAPlus,
           "dynamic_lora": DynamicLoRA, "adalora": AdaLoRA, "adaq_lora": AdaQLoRA}

# -----------------------------------------------------------------------------
# flags: the run's, then the method's config fields

def run_flags(p):
    p.add_argument("--method", default="lora", help="one of " + ", ".join(METHODS))
    p.add_argument("--task", default="mrpc", help=f"GLUE: {', '.join(data.TASKS)}; or a causal-LM task "
                   f"(GPT-2, scored on generated text): {', '.join(data.GEN_TASKS)}")
    p.add_argument("--model", default="roberta-base", help="hub id or local folder (config.json + weights)")
    p.add_argument("--data_dir", default=None, help="GLUE TSV folder, gsm8k's folder (train.jsonl, "
                   "test.jsonl) or alpaca's JSON file; default: the hub")
    p.add_argument("--out_dir", default=None, help="where metrics.json and the trained tensors go")
    p.add_argument("--quant", default=None, choices=["none", "nf4"], help="store the frozen base in NF4 "
                   "(lora: QLoRA); default: the method's (adaq_lora: nf4)")
    p.add_argument("--select", default="last", choices=["last", "holdout"],
                   help="the epoch to report: the last, or the best on a held-out 10%% of train")
    p.add_argument("--epochs", type=int, default=3, help="0: evaluate the model as loaded")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches of --batch_size per step")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--eval_samples", type=int, default=0, help="causal LM: N prompts only (0: all)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="causal LM: greedy tokens per answer")
    p.add_argument("--no_chat_template", action="store_true", help="causal LM: plain \"prompt\\n\" prompts "
                   "even when the tokenizer has a chat template (instruct checkpoints do)")
    p.add_argument("--max_len", type=int, default=None, help="tokens per example (default: the task's)")
    p.add_argument("--max_train_samples", type=int, default=0, help="train on N examples only (0: all)")
    p.add_argument("--subset_seed", type=int, default=None, help="draw those N at random with this seed "
                   "(kept in file order; the same for every --seed); default: the first N")
    p.add_argument("--lr_schedule", default="linear", choices=["linear", "constant"],
                   help="linear: warmup (--warmup_ratio), then linear decay to 0; constant: lr throughout")
    p.add_argument("--warmup_ratio", type=float, default=0.06, help="linear: the warmup's share of the steps")
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log_every", type=int, default=20, help="read the loss back every N steps")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out_dir")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA: with CUDA graphs)")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--pad_multiple", type=int, default=None, help="pad batches to a multiple of this "
                   "(default: 32 with --compile, else 1)")


def method_flags(p, cls, taken):
    """A flag per field of the method's config: its name, type and default, and as its help the comment that
    follows the field in the source of the config or its bases. A field the run already has a flag for
    (TLoRA+'s seed) takes the run's value."""
    comments = {}
    for c in reversed(cls.Config.__mro__[:-1]):
        comments |= dict(re.findall(r"^\s+(\w+): \w+ = [^#\n]*#\s*(.*)$", inspect.getsource(c), re.M))
    for f in dataclasses.fields(cls.Config):
        if f.name not in taken:
            kind = {"action": "store_true"} if f.type is bool else {"type": f.type}
            p.add_argument("--" + f.name, default=f.default, help=f"{comments.get(f.name, '')} ({f.default})",
                           **kind)


def parse_args(argv=None, methods=METHODS):
    """The flags, checked before anything loads: a bad value is one ValueError naming the flag."""
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="lora")
    name = pre.parse_known_args(argv)[0].method
    if name not in methods:
        raise ValueError(f"unknown --method {name!r}; choose one of {', '.join(methods)}")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --help: this docstring (metrics.json, resume, ...)
    run_flags(p)
    method_flags(p, methods[name], {a.dest for a in p._actions})
    args, rest = p.parse_known_args(argv)
    if rest:
        other = [m for m, cls in methods.items() if rest[0].split("=")[0][2:] in
                 {f.name for f in dataclasses.fields(cls.Config)}]
        raise ValueError(f"{rest[0]} does not apply to --method {name}" + (f" (it is {other[0]}'s); drop it"
                         if other else "; see python train.py --method NAME --help"))
    lows = dict.fromkeys(["batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "log_every",
                          "pad_multiple", "max_len"], 1) | dict.fromkeys(["epochs", "eval_samples",
                          "max_train_samples", "max_steps", "save_every"], 0)
    for flag, low in lows.items():
        if getattr(args, flag) is not None and not getattr(args, flag) >= low:
            raise ValueError(f"--{flag} must be ≥ {low}, not {getattr(args, flag)}")
    if not 0 <= args.warmup_ratio <= 1:
        raise ValueError(f"--warmup_ratio must be in [0, 1], not {args.warmup_ratio}")
    if not args.grad_clip > 0:
        raise ValueError(f"--grad_clip must be > 0, not {args.grad_clip}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU here; pass --device cpu")
    if args.pad_multiple is None:
        args.pad_multiple = 32 if args.compile else 1
    return args


def method_from_args(args, methods=METHODS):
    """The method, built from its dataclass config; __post_init__ checks the values."""
    cls = methods[args.method]
    return cls(cls.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls.Config)}))


# -----------------------------------------------------------------------------
# setup: processes and devices (model.py runs the model: autocast, compile_model, peak_memory_mb)

def distributed(args):
    """(rank, world): torchrun sets RANK and WORLD_SIZE; nccl on CUDA, gloo on CPU. Plain python is (0, 1)."""
    if "RANK" not in os.environ:
        return 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.save_every or args.resume:
        raise ValueError("--save_every and --resume are single-process for now; drop them under torchrun")
    if args.device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun started {world} processes on a node with {torch.cuda.device_count()} "
                             f"GPUs; pass --nproc_per_node {torch.cuda.device_count()} or fewer")
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():  # rank 0 evaluates alone while the others wait in an
        # all-reduce: generating answers can outlast nccl's default 10 minutes
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(hours=3))
    return rank, world


# -----------------------------------------------------------------------------
# model and method

def build(args, method):
    """-> (model wrapped by the method, tokenizer, task), on args.device. Dynamic LoRA calibrates on the first
    epoch's batches; the other methods never read them."""
    task = data.get_task(args.task)
    folder = resolve(args.model)
    cfg = read_config(folder, task.num_labels)  # before the weights: refuse what cannot fit
    if task.num_labels == 0 and cfg.family not in CAUSAL:
        raise ValueError(f"--task {task.name} trains a causal LM, and {args.model} is a {cfg.family} "
                         f"encoder, which cannot generate; pass a GPT-2 or Llama-family checkpoint")
    positions = cfg.n_positions - (cfg.pad_id + 1 if cfg.family == "roberta" else 0)  # RoBERTa's offset
    if (args.max_len or task.max_len) > positions:
        raise ValueError(f"--max_len {args.max_len or task.max_len} exceeds the {positions} positions of "
                         f"{args.model}; pass --max_len {positions} or less")
    torch.manual_seed(args.seed)
    model = from_pretrained(folder, num_labels=task.num_labels)
    model.name_or_path = args.model
    tok = load_tokenizer(folder, model.cfg.family)
    args.quant = args.quant or method.quant
    if args.quant != method.quant == "nf4":
        raise ValueError(f"--method {args.method} is defined on an NF4 base; drop --quant {args.quant} (its "
                         f"float-base twin is --method adalora)")
    if args.quant == "nf4":  # before wrap: an adapter then wraps a Linear4bit as it would an nn.Linear
        quant.quantize_model(model)
        four_bit = [n + ".weight" for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)]
        if any(method.trains(n) for n in four_bit):
            raise ValueError(f"--quant nf4 stores the base weights in 4 bits, which cannot train, but "
                             f"--method {args.method} trains them; use an adapter method (lora = QLoRA), "
                             f"head or bitfit")
    model.grad_checkpointing = args.grad_checkpointing
    model = method.wrap(model.to(args.device), head=("head",), batches=data.calibration(task, args, tok))
    return model, tok, task


def optimizer(method, model, total, warmup, device, schedule="linear"):
    """AdamW over the method's groups; linear warmup over `warmup` steps, then linear decay to 0, or a
    constant rate (schedule "constant": no warmup)."""
    opt = torch.optim.AdamW(method.param_groups(model), betas=(0.9, 0.999), eps=1e-8,
                            fused=device.startswith("cuda"))
    lr = lambda t: t / max(1, warmup) if t < warmup else max(0.0, (total - t) / max(1, total - warmup))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr if schedule == "linear" else lambda t: 1.0)


# -----------------------------------------------------------------------------
# the step

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
    """The step-th optimizer step over a list of micro-batches: each one's task loss weighted by its share of
    the step's examples (or response tokens), the method's extra loss once, clip, AdamW, the schedule, then
    the method's after_step (before zero_grad, so it can read the gradients). `forward` is the model,
    compiled or under DDP. Returns (task loss, correct predictions, examples) on the device, for the loop's
    window: reading them is the caller's host sync. A causal LM or a regression counts no correct ones."""
    n = sum(weight(b) for b in batches)
    loss_sum, correct = 0.0, torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        b, last = data.to_device(batch, device), i == len(batches) - 1
        with contextlib.nullcontext() if last or not hasattr(forward, "no_sync") else forward.no_sync():
            with autocast(device):  # DDP all-reduces on the last micro-batch only
                logits = forward(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            loss = task_loss(logits, b["labels"]) * (weight(batch) / n)
            loss_sum = loss_sum + loss.detach()
            if logits.dim() == 2 and logits.size(-1) > 1:
                correct = correct + (logits.argmax(-1) == b["labels"]).sum()
            extra = method.extra_loss(model) if last else None
            (loss if extra is None else loss + extra).backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    sched.step()
    method.after_step(model, step)
    opt.zero_grad(set_to_none=True)
    seen = torch.tensor(float(sum(len(b["labels"]) for b in batches)), device=device)
    return torch.stack([loss_sum, correct, seen])


# -----------------------------------------------------------------------------
# evaluation, on the unmerged weights (as peft does): W0 is never rounded, and a 4-bit base is never copied

@torch.no_grad()
def evaluate(model, examples, task, args, tok, forward=None):
    """Dev (or holdout) metrics; a causal-LM task generates greedy answers and scores them instead, and its
    metrics then hold the answers under "predictions"."""
    model.eval()
    if task.num_labels == 0:
        return generate_and_score(model, examples, task, args, tok)
    logits = [None] * len(examples)
    for idx, b in data.eval_batches(examples, args.eval_batch_size, tok.pad_id, task.num_labels == 1,
                                    args.pad_multiple):
        b = data.to_device(b, args.device)
        with autocast(args.device):
            out = (model if forward is None else forward)(b["input_ids"], b["attention_mask"],
                                                          b["token_type_ids"]).float().cpu()
        for i, row in zip(idx, out):
            logits[i] = row
    logits = torch.stack(logits)
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"the evaluation logits are NaN or inf: training diverged; lower --lr (now "
                                 f"{args.lr:g})")
    return metrics.glue_metrics(task.name, logits.numpy(), [e["label"] for e in examples])


def generate_and_score(model, examples, task, args, tok):
    """Greedy answers (KV cache, batches of --eval_batch_size) up to EOS, scored against the references with
    ROUGE-1/2/L, BLEU-4 and, for gsm8k, the exact match of the final number."""
    texts = [None] * len(examples)
    for idx, b in data.prompt_batches(examples, args.eval_batch_size, tok.pad_id):
        b = data.to_device(b, args.device)
        with autocast(args.device):
            out = model.generate(b["input_ids"], b["attention_mask"], args.max_new_tokens, tok.eos).tolist()
        for i, tokens in zip(idx, out):
            texts[i] = tok.decode(tokens[:tokens.index(tok.eos)] if tok.eos in tokens else tokens)
    refs = [e["reference"] for e in examples]
    scores = metrics.generation_metrics(texts, refs, gsm8k=task.name == "gsm8k")
    scores["predictions"] = [{"prompt": e["prompt"], "reference": e["reference"], "prediction": p,
                              **metrics.per_sample_scores(p, e["reference"])}
                             for e, p in zip(examples, texts)]
    return scores


# -----------------------------------------------------------------------------
# the result: the selected epoch's weights, metrics.json and the run's files

def finish(args, progress, model, method, task, n_train, n_all, world):
    """Back to the selected epoch's weights; metrics.json's dict; the files (metrics.json last)."""
    history, selected = progress["history"], progress["history"][-1]["epoch"]
    if progress["kept"] is not None:  # --select holdout: back to the chosen epoch's weights
        selected, kept = progress["kept"]
        checkpoint.restore(model, kept)
    scores = {k: v for k, v in history[selected - 1].items()
              if k not in ("epoch", "step", "holdout") and not k.startswith("train_")}
    label = (method.label() + ("+nf4" if args.quant == "nf4" != method.quant else "")
             + (" zero-shot" if args.epochs == 0 else ""))  # QLoRA's row apart from LoRA's
    (seconds, compiling, timed), predictions = progress["seconds"], progress["predictions"].get(selected)
    result = {"task": task.name, "method": args.method, "label": label, "model": args.model,
              "metrics": scores, "select": args.select, "selected_epoch": selected, "last": history[-1],
              "history": history,
              "loss_log": progress["log"], "trainable_params": n_train, "total_params": n_all,
              "trainable_pct": 100 * n_train / n_all, "steps": progress["step"], "train_seconds": seconds,
              "compile_seconds": compiling, "s_per_step": (seconds - compiling) / max(1, timed),
              "peak_memory_mb": progress["peak_mb"] or peak_memory_mb(args.device), "args": vars(args),
              "method_config": dataclasses.asdict(method.cfg), "method_report": method.report(model)}
    if predictions:  # a causal LM: each prompt's four scores, for report.py's paired bootstrap
        result["sample_scores"] = {k: [p[k] for p in predictions]
                                   for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    which = "the last" if args.select == "last" else "best on holdout"
    print(f"reported: dev at epoch {selected} ({which}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    if "ranks" in result["method_report"]:  # per-matrix ranks (dynamic_lora, adalora, adaq_lora)
        ranks = result["method_report"]["ranks"]
        print(f"ranks per adapted matrix (sum {sum(ranks.values())}): "
              + " ".join(f"{n}={r}" for n, r in ranks.items()))
    if args.out_dir:
        peft_format.save(method, model, args.out_dir)
        checkpoint.write_run(args.out_dir, result, predictions)
        print(f"wrote {args.out_dir}/metrics.json")
    if world > 1:
        torch.distributed.barrier()
    return result


# -----------------------------------------------------------------------------
# the loop

def log_row(progress, sched, bar):
    """Read the window's device sums back (the loop's one host sync), log the mean loss since the last row,
    and stop on NaN/inf. Under torchrun: every rank's mean loss and summed counts."""
    window = progress["window"]
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(window)
        window[0] /= torch.distributed.get_world_size()
    w_loss, w_correct, w_seen = window.tolist()
    window.zero_()
    progress["sums"] = [a + b for a, b in zip(progress["sums"], (w_loss, w_correct, w_seen))]
    steps = progress["step"] - (progress["log"][-1][0] if progress["log"] else 0)
    lr = sched.get_last_lr()[0]  # the first group's, for the next step
    progress["log"].append((progress["step"], w_loss / steps, lr))
    if not math.isfinite(w_loss):
        raise FloatingPointError(f"loss is {w_loss} by step {progress['step']}; lower --lr; the last "
                                 f"checkpoint, if any, is kept")
    bar.set_postfix(loss=f"{w_loss / steps:.4f}", lr=f"{lr:.2e}")
    if bar.disable:  # no terminal (a log file): one line per log row instead of the bar
        seconds = progress["seconds"]
        print(f"step {progress['step']}: loss {w_loss / steps:.4f}, lr {lr:.2e}, "
              f"{seconds[0] / progress['step']:.3f} s/step", flush=True)


def run(args, methods=METHODS):
    """Train args.method on args.task and save the selected epoch to args.out_dir. Returns metrics.json's dict
    (None on ranks other than 0)."""
    rank, world = distributed(args)
    if rank == 0:
        checkpoint.check_out_dir(args)
    else:
        sys.stdout = open(os.devnull, "w")
    random.seed(args.seed)
    method = method_from_args(args, methods)
    model, tok, task = build(args, method)
    train = data.load_examples(task, "train", args, tok)
    holdout = data.load_examples(task, "holdout", args, tok) if args.select == "holdout" else None
    dev = data.load_examples(task, "dev", args, tok)
    if args.epochs and not train:
        raise ValueError(f"no training example is left to train on (--max_train_samples "
                         f"{args.max_train_samples}, --select {args.select}); pass more examples")
    steps_per_epoch = math.ceil(math.ceil(len(train) / (args.batch_size * world)) / args.grad_accum)
    total = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    warmup = int(args.warmup_ratio * total) if args.lr_schedule == "linear" else 0
    if task.num_labels == 0:  # generation must fit the model's positions: say so before training
        room = model.cfg.n_positions - max(len(e["input_ids"]) for e in dev)
        if args.max_new_tokens > room:
            raise ValueError(f"the longest evaluation prompt and --max_new_tokens {args.max_new_tokens} "
                             f"exceed the {model.cfg.n_positions} positions of {args.model}; pass "
                             f"--max_new_tokens {room}")
    if not method.param_groups(model):
        raise ValueError(f"--method {args.method} trains nothing on --task {task.name} (a causal LM has no "
                         f"task head); pick an adapter method (--method full --epochs 0 evaluates the model "
                         f"as loaded)")
    opt, sched = optimizer(method, model, total, warmup, args.device, args.lr_schedule)
    method.schedule(total, warmup)
    # all parameters (a 4-bit weight counts out·in) plus the adapters' buffers (TLoRA's frozen factors)
    n_all = quant.count_params(model) + sum(b.numel() for n, b in model.named_buffers() if ".lora_" in n)
    n_train = sum(p.numel() for g in opt.param_groups for p in g["params"])
    print(f"{args.method} on {task.name}: {n_train:,} trainable of {n_all:,} ({100 * n_train / n_all:.3f}%), "
          f"{len(train)} train / {len(holdout or [])} held out / {len(dev)} dev examples, {total} steps on "
          f"{args.device}")
    forward = compile_model(model, args.device, args.grad_accum) if args.compile else model
    if world > 1:  # all-reduces the gradients of the trainable tensors only
        forward = torch.nn.parallel.DistributedDataParallel(forward, broadcast_buffers=False)

    # all the loop carries from step to step; a checkpoint saves it and --resume restores it
    progress = {"step": 0, "epoch": 0, "batch": 0,  # steps done; epochs done; steps done in this epoch
                "window": torch.zeros(3, device=args.device),  # Σ loss, Σ correct, Σ examples since a row
                "sums": [0.0, 0.0, 0.0],  # the same, summed over this epoch's rows
                "seconds": [0.0, 0.0, 0],  # in training steps; in steps that compiled; steps not compiling
                "peak_mb": 0.0, "history": [], "log": [], "predictions": {},
                "kept": None}  # (epoch, trained tensors) that --select holdout keeps
    if args.resume:
        progress = checkpoint.load(args, model, method, opt, sched)
        print(f"resumed at step {progress['step']} (epoch {progress['epoch'] + 1}, step {progress['batch']})")
    stop, classify, key = checkpoint.interrupt_flag(), task.num_labels > 1, metrics.main_metric(task.name)
    try:
        while progress["epoch"] < args.epochs and progress["step"] < total:
            epoch = progress["epoch"]
            model.train()
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(args.device)
            micro = (data.shard(b, rank, world) for b in data.epoch_batches(train, epoch, args, tok, world))
            micro = itertools.islice(micro, progress["batch"] * args.grad_accum, None)  # resume: skip done
            steps = iter(lambda: list(itertools.islice(micro, args.grad_accum)), [])  # K micro-batches a step
            bar = tqdm(steps, total=steps_per_epoch, initial=progress["batch"], desc=f"epoch {epoch + 1}",
                       file=sys.stdout, disable=not sys.stdout.isatty())
            for batches in bar:
                t0, graphs = time.time(), graphs_compiled() if args.compile else 0
                progress["step"] += 1
                progress["batch"] += 1
                progress["window"] += train_step(model, forward, method, batches, opt, sched,
                                                 progress["step"], args.grad_clip, args.device)
                last = progress["batch"] == steps_per_epoch or progress["step"] >= total
                if progress["step"] % args.log_every == 0 or last:
                    log_row(progress, sched, bar)
                seconds, compiled = progress["seconds"], args.compile and graphs_compiled() != graphs
                seconds[0] += time.time() - t0  # host time, and the device's up to the last row's sync
                seconds[1] += (time.time() - t0) * compiled
                seconds[2] += not compiled
                if progress["step"] >= total:
                    break
                due = args.save_every and progress["step"] % args.save_every == 0  # (it needs --out_dir)
                if due or stop["now"] and args.out_dir:
                    checkpoint.save(args, progress, model, method, opt, sched)
                if stop["now"]:
                    raise InterruptedError(f"interrupted at step {progress['step']}; " + (
                        "resume with the same command and --resume" if args.out_dir else "nothing saved"))
            progress["peak_mb"] = max(progress["peak_mb"], peak_memory_mb(args.device))  # before evaluating
            sums = progress["sums"]  # the epoch's training numbers, from the rows read back
            row = {"epoch": epoch + 1, "step": progress["step"], "train_loss": sums[0] / progress["batch"],
                   **({"train_accuracy": sums[1] / sums[2]} if classify else {}),
                   "train_examples": int(sums[2])}
            progress.update(epoch=epoch + 1, batch=0, sums=[0.0, 0.0, 0.0])
            if rank:  # rank 0 evaluates and keeps the epoch; the others go on
                continue
            row.update(evaluate(model, dev, task, args, tok, forward))
            progress["predictions"][epoch + 1] = row.pop("predictions", None)
            if holdout:
                row["holdout"] = evaluate(model, holdout, task, args, tok, forward)
                row["holdout"].pop("predictions", None)
            progress["history"].append(row)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "step", "holdout"))
            held = f", holdout {key} {row['holdout'][key]:.4f}" if holdout else ""
            print(f"epoch {epoch + 1}: {shown}{held}")
            kept = progress["kept"] and progress["history"][progress["kept"][0] - 1]["holdout"][key]
            if holdout and (kept is None or row["holdout"][key] > kept):
                # every tensor training changes: adapters, head, and buffers such as Dynamic LoRA's m_l
                progress["kept"] = (epoch + 1, {n: t.detach().clone()
                                                for n, t in checkpoint.trained_state(model).items()})
            if args.save_every and progress["epoch"] < args.epochs and progress["step"] < total:
                checkpoint.save(args, progress, model, method, opt, sched)
    finally:
        stop["restore"]()
    if rank:
        torch.distributed.barrier()
        return None
    if args.epochs == 0:  # zero-shot: the model as loaded, its adapters at their identity init
        progress["history"] = [{"epoch": 0, "step": 0, **evaluate(model, dev, task, args, tok, forward)}]
        progress["predictions"][0] = progress["history"][0].pop("predictions", None)
    return finish(args, progress, model, method, task, n_train, n_all, world)


def main(argv=None):
    """Bad flags, files or data, and a diverged loss: one line, "error: ...", and a non-zero exit."""
    try:
        return run(parse_args(argv))
    except (ValueError, OSError, FloatingPointError) as e:
        # under torchrun every rank meets the same error: rank 0 says it once
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves a checkpoint, given --out_dir)
        sys.exit("error: interrupted again: stopped at once, without saving")


if __name__ == "__main__":
    main()
