"""
Re-score a saved run, and time it. Tables and plots of runs are report.py's.

    python eval.py --out_dir out/lora-mrpc          # rebuild the model, load the saved adapter,
                                                    # score dev again
    python eval.py --out_dir out/* --latency 200    # also time batch-1 inference, merged and not, into each
                                                    # metrics.json (run it with nothing else on the machine)

The rebuilt run takes every argument from its metrics.json; a flag added to train.py since counts at its
default. A run trained on a GPU is re-scored on the CPU when there is none. Latency is batch 1 on dev
examples: 20 warm-up passes, then the mean over N passes, with the adapters beside the base (as trained) and
merged into it (what serving costs), as the Dynamic LoRA paper (arXiv 2501.14859) reports inference time in
its Table 2.
"""
import argparse
import json
import os
import sys
import time

import torch

import checkpoint
import data
import peft_format
import train


@torch.no_grad()
def latency_ms(model, method, examples, args, pad_id, passes, merged):
    """Mean ms of one batch-1 forward over `passes` dev examples, after 20 warm-up passes; with merged, the
    adapters are folded into the base weights for the timing and taken out after it."""
    model.eval()
    if merged:
        method.merge(model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    one = [data.collate([examples[i % len(examples)]], pad_id) for i in range(20 + passes)]
    times = []
    for i, b in enumerate(one):
        sync()
        t0 = time.perf_counter()
        with train.autocast(args.device):
            model(b["input_ids"].to(args.device), b["attention_mask"].to(args.device),
                  b["token_type_ids"].to(args.device))
        sync()
        if i >= 20:
            times.append(time.perf_counter() - t0)
    if merged:
        method.unmerge(model)
    return 1e3 * sum(times) / len(times)


def reevaluate(out_dir, latency_passes=0):
    """Rebuild a saved run's model from its metrics.json, load its adapter (or trained tensors) and score the
    dev split again. Returns (the new metrics, the saved metrics.json); with latency_passes, the new metrics
    hold latency_ms and latency_merged_ms too."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; --out_dir must be a folder written by train.py")
    try:
        with open(path) as f:
            saved = json.load(f)
        saved_args, _ = dict(saved["args"]), saved["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a metrics.json written by train.py ({type(e).__name__}: {e}); "
                         f"re-run the training") from None
    args = train.parse_args(["--method", str(saved_args.get("method", "lora")), "--device", "cpu"])
    # None was an older train.py's "the method's default"; flags since removed (latency_passes) are dropped
    vars(args).update({k: v for k, v in saved_args.items() if k in vars(args) and v is not None})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"{out_dir} was trained on {args.device}; re-scoring it on the CPU")
        args.device = "cpu"
    method = train.method_from_args(args)
    model, tok, task = train.build(args, method)
    peft_format.load(method, model, out_dir)
    dev = data.load_examples(task, "dev", args, tok)
    metrics = train.evaluate(model, dev, task, args, tok)
    metrics.pop("predictions", None)
    if latency_passes:
        metrics["latency_ms"] = latency_ms(model, method, dev, args, tok.pad_id, latency_passes, False)
        metrics["latency_merged_ms"] = latency_ms(model, method, dev, args, tok.pad_id, latency_passes, True)
    return metrics, saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", nargs="+", required=True, help="folders written by train.py")
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="also time N batch-1 passes, merged and not, and store them in each metrics.json "
                        "(200 as the Dynamic LoRA comparison; run it with nothing else on the machine)")
    a = p.parse_args(argv)
    if a.latency < 0:
        p.error(f"--latency must be ≥ 0, not {a.latency}")
    for out_dir in a.out_dir:
        try:
            metrics, saved = reevaluate(out_dir, latency_passes=a.latency)
        except (ValueError, OSError, FloatingPointError) as e:
            sys.exit(f"error: {e}")
        print(json.dumps({"out_dir": out_dir, "recomputed": metrics, "saved": saved["metrics"]}, indent=2))
        if a.latency:  # the run's own numbers stay; only the latency fields are replaced, atomically
            saved.update(latency_ms=metrics["latency_ms"], latency_merged_ms=metrics["latency_merged_ms"],
                         latency_note=f"re-measured by eval.py --latency {a.latency}")
            checkpoint.write_json(os.path.join(out_dir, "metrics.json"), saved)


if __name__ == "__main__":
    main()
