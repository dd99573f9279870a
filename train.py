"""
Fine-tune a pretrained transformer on a GLUE task with one PEFT method and report the task's metrics.

    python train.py --method lora --task mrpc                                   # roberta-base from the hub
    python train.py --method lora --task mrpc --model DIR --data_dir ../shared/data/glue   # offline

Methods plug in through the interface in lora.py (wrap / param_groups / extra_loss / after_step / save / load);
this loop never asks which method it runs.
"""
import argparse
import copy
import json
import math
import os
import random
import resource
import sys
import time

import torch
from torch.nn import functional as F
from tqdm import tqdm

import data
import lora
import quant
import tlora_plus
from eval import glue_metrics, main_metric
from model import from_pretrained, resolve
from tokenizer import load_tokenizer

METHODS = {"full": lora.Method, "head": lora.HeadOnly, "bitfit": lora.BitFit, "lora": lora.LoRA,
           "tlora": tlora_plus.TLoRA, "tlora_plus": tlora_plus.TLoRAPlus}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="nanoPEFT: fine-tune on GLUE with one PEFT method")
    # what to train
    p.add_argument("--method", default="lora", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--task", default="mrpc", help=f"GLUE task: {', '.join(data.TASKS)}")
    p.add_argument("--model", default="roberta-base", help="hub id or local folder (config.json + weights)")
    p.add_argument("--data_dir", default=None, help="GLUE TSV folder (e.g. ../shared/data/glue); default: the hub")
    p.add_argument("--out_dir", default=None, help="where metrics.json and the trained tensors go")
    # adapter (LoRA family)
    p.add_argument("--rank", type=int, default=8, help="adapter rank r")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha: scale alpha/r")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on the adapter input")
    p.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--targets", default="all-linear", help="all-linear or comma list of query,key,value,c_attn,out,fc,proj")
    p.add_argument("--quant", default="none", choices=["none", "nf4"], help="store the frozen base in NF4 (QLoRA)")
    # TLoRA / TLoRA+ (seed 002, tlora_plus.py)
    p.add_argument("--tlora_train", default="ABC", choices=["B", "AB", "CB", "ABC"], help="TLoRA+ trainable matrices")
    p.add_argument("--ratio", type=float, default=4.0, help="TLoRA+ lambda: lr_B = lr*lambda^1.5, lr_C = lr*lambda^0.5")
    p.add_argument("--b_init", default="zero", choices=["zero", "lecun"], help="TLoRA B init: 0 or N(0, 1/r)")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="learning rate of A matrices (default: the method's)")
    p.add_argument("--lr_ratio", type=float, default=16.0, help="LoRA: lr of B = lr x lr_ratio (1 = tied, SPEC 2.1)")
    p.add_argument("--head_lr", type=float, default=None, help="task-head learning rate (default: the method's)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--max_len", type=int, default=None, help="max tokens per example (default: the task's, SPEC 1.4)")
    p.add_argument("--max_train_samples", type=int, default=0, help="use only the first N training examples")
    p.add_argument("--warmup_ratio", type=float, default=0.06)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    # system
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log_every", type=int, default=20, help="read the loss back every N steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA: with CUDA graphs)")
    p.add_argument("--pad_multiple", type=int, default=None, help="pad batches to a multiple of this "
                   "(default: 32 with --compile, so it compiles a handful of shapes; else 1)")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        raise SystemExit(f"error: unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU here; pass --device cpu")
    if args.pad_multiple is None:
        args.pad_multiple = 32 if args.compile else 1
    if args.targets != "all-linear":
        args.targets = args.targets.split(",")
    return args


def load_examples(task, split, args, tok):
    rows = data.load_split(task, split, args.data_dir)
    if split == "train" and args.max_train_samples:
        rows = rows[:args.max_train_samples]
    return data.encode(tok, rows, args.max_len or task.max_len)


def build(args):
    """-> (model wrapped by its method, method, tokenizer, task), on args.device."""
    task = data.get_task(args.task)
    folder = resolve(args.model)
    torch.manual_seed(args.seed)
    model = from_pretrained(folder, num_labels=task.num_labels)
    tok = load_tokenizer(folder, model.cfg.family)
    method = METHODS[args.method](args)
    if args.quant == "nf4":  # before wrap: an adapter layer then wraps a Linear4bit as it would an nn.Linear
        quant.quantize_model(model)
        frozen = [n + ".weight" for n, m in model.named_modules() if isinstance(m, quant.Linear4bit)]
        if any(method.trains(n) for n in frozen):
            raise SystemExit(f"error: --quant nf4 stores the base weights in 4 bits, which cannot train, but --method "
                             f"{args.method} trains them; use an adapter method (lora = QLoRA), head or bitfit")
    model = method.wrap(model).to(args.device)
    return model, method, tok, task


def task_loss(logits, labels):
    if logits.size(-1) == 1:  # STS-B regression
        return F.mse_loss(logits.view(-1).float(), labels)
    return F.cross_entropy(logits.float(), labels)


def autocast(args):
    """bf16 autocast on CUDA (fp32 master weights, SPEC §1.4); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda"))


@torch.no_grad()
def evaluate(model, examples, task, args, pad_id):
    """Dev metrics, on merged weights: an adapted layer then costs what the frozen layer costs."""
    model.eval()
    lora.merge(model, float_only=True)
    logits = [None] * len(examples)
    for idx, b in data.eval_batches(examples, args.eval_batch_size, pad_id, task.num_labels == 1, args.pad_multiple):
        with autocast(args):
            out = model(b["input_ids"].to(args.device), b["attention_mask"].to(args.device),
                        b["token_type_ids"].to(args.device)).float().cpu()
        for i, row in zip(idx, out):
            logits[i] = row
    lora.unmerge(model)
    return glue_metrics(task.name, torch.stack(logits).numpy(), [e["label"] for e in examples])


def compile_model(model, device):
    """torch.compile, one graph per padded shape. On CUDA, "reduce-overhead" also replays each step as a CUDA graph.
    On CPU, dropout keeps ATen's vectorised RNG: inductor's own made each MiniLM step ~10% slower than eager here.
    A method's extra_loss and after_step hooks stay outside the compiled forward and run as usual."""
    if device.startswith("cuda"):
        return torch.compile(model, mode="reduce-overhead")
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    return torch.compile(model)


def lr_lambda(warmup, total):
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total` (SPEC §1.4)."""
    return lambda t: t / max(1, warmup) if t < warmup else max(0.0, (total - t) / max(1, total - warmup))


def peak_memory_mb(args):
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the whole process's peak


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(args):
    random.seed(args.seed)
    model, method, tok, task = build(args)
    train = load_examples(task, "train", args, tok)
    dev = load_examples(task, "dev", args, tok)
    groups = method.param_groups(model)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=args.device.startswith("cuda"))
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = args.epochs * steps_per_epoch if not args.max_steps else min(args.max_steps, args.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(args.warmup_ratio * total), total))
    trainable = [p for g in groups for p in g["params"]]
    # SPEC §1.5: all parameters (a 4-bit weight counts out·in) plus adapter buffers (TLoRA's frozen factors)
    n_all = quant.count_params(model) + sum(b.numel() for n, b in model.named_buffers() if ".lora_" in n)
    n_train = sum(p.numel() for p in trainable)
    print(f"{args.method} on {task.name}: {n_train:,} trainable of {n_all:,} ({100 * n_train / n_all:.3f}%), "
          f"{len(train)} train / {len(dev)} dev examples, {total} steps on {args.device}")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    forward = compile_model(model, args.device) if args.compile else model

    rng, step, train_seconds, history, log, best = random.Random(args.seed), 0, 0.0, [], [], None
    for epoch in range(args.epochs):
        model.train()
        t0, losses = time.time(), []
        batches = data.train_batches(train, args.batch_size, tok.pad_id, task.num_labels == 1, rng, args.pad_multiple)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stdout,
                   disable=not sys.stdout.isatty())
        for b in bar:
            b = {k: v.to(args.device) for k, v in b.items()}
            with autocast(args):
                logits = forward(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            loss = task_loss(logits, b["labels"])
            extra = method.extra_loss(model)
            if extra is not None:
                loss = loss + extra
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            opt.step()
            sched.step()
            step += 1
            method.after_step(model, step)  # before zero_grad: a method may read this step's gradients
            opt.zero_grad(set_to_none=True)
            if step % args.log_every == 0 or step == total:  # the only host sync of the step
                losses.append(loss.item())
                log.append((step, losses[-1]))
                if not math.isfinite(losses[-1]):
                    raise SystemExit(f"error: loss is {losses[-1]} at step {step}; lower --lr (now {method.lr:g})")
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                if bar.disable:  # no terminal (a log file): one line per log step instead of the bar
                    print(f"step {step}/{total}: loss {losses[-1]:.4f}, lr {sched.get_last_lr()[0]:.2e}, "
                          f"{(time.time() - t0) / (step - epoch * steps_per_epoch):.3f} s/step", flush=True)
            if step >= total:
                break
        train_seconds += time.time() - t0
        metrics = evaluate(forward, dev, task, args, tok.pad_id)
        history.append({"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(1, len(losses)), **metrics})
        print(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.4f}, dev " +
              ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        key = main_metric(task.name)
        if best is None or metrics[key] > best[0][key]:
            best = (metrics, epoch + 1, copy.deepcopy({n: p.detach() for n, p in model.named_parameters()
                                                        if p.requires_grad}))
        if step >= total:
            break

    metrics, best_epoch, state = best
    with torch.no_grad():  # keep the best epoch's weights
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    label = method.label() + ("+nf4" if args.quant == "nf4" else "")  # eval.py's table rows: QLoRA apart from LoRA
    result = {"task": task.name, "method": args.method, "label": label, "model": args.model, "metrics": metrics,
              "best_epoch": best_epoch, "last": history[-1], "history": history, "loss_log": log,
              "trainable_params": n_train,
              "total_params": n_all, "trainable_pct": 100 * n_train / n_all, "steps": step,
              "train_seconds": train_seconds, "s_per_step": train_seconds / max(1, step),
              "peak_memory_mb": peak_memory_mb(args), "args": {k: v for k, v in vars(args).items()}}
    print(f"best epoch {best_epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        method.save(model, args.out_dir)
        write_json(os.path.join(args.out_dir, "metrics.json"), result)
        print(f"wrote {args.out_dir}/metrics.json")
    return result


if __name__ == "__main__":
    main(parse_args())
