"""
Benchmarks against the references nanoPEFT is checked against (transformers + peft). Reference libraries are
imported here and in test_all.py only, never by the product.

    python bench.py peft_glue --task mrpc --model DIR --data_dir ../shared/data/glue --seed 0
                              --out_dir out/peft0 [--quant nf4]
        the same training run as `train.py --method lora`, but on transformers + peft: same data, batches,
        seeds, optimizer groups (A at lr, B at lr x lr_ratio, head at head_lr), schedule and evaluation
        (train.py's loop); --quant nf4 puts the base in bitsandbytes' NF4 + double quant (peft's QLoRA),
        evaluated like ours with the adapters beside the 4-bit base (peft's merge would requantize it)
    python bench.py speed [--minilm DIR] [--data_dir GLUE] [--llm DIR --rank 64] [--device cuda] [--compile]
        ms/step, tokens/s, eval latency (merged and not), peak memory, adapter bytes and trainable parameters
        of every method, ours and transformers+peft LoRA, against the frozen base (forward + backward to the
        inputs)
    python bench.py memory [--model gpt2-medium] [--out FILE.json]
        the ADAQ-LoRA paper's memory claim: peak training RSS of LoRA (r 64), QLoRA, AdaLoRA and ADAQ-LoRA
        (init_r 12, target_r 8) on random-init GPT-2-medium, batch 1 x 512, ours and transformers + peft +
        bitsandbytes; --model llama-1b,llama-6b: ours on Llama shapes, measured at 1 and 2 layers and
        extended linearly to the full depth
    python bench.py scale [--model gpt2-medium] [--minilm DIR --data_dir GLUE] [--out FILE.json]
        peak training memory and step time with and without --grad_checkpointing (LoRA r 64, batch 1 x 512);
        train.py's throughput on MiniLM MRPC, 1 process vs torchrun with 2, at the same global batch
    python bench.py generate [--n_layer 12 --n_embd 768] [--batch 4 --prompt 32 --new 64] [--out FILE.json]
        greedy decoding tokens/s on a random GPT-2 (gpt2-small's shapes by default), or on a checkpoint folder
        (--model DIR): ours with the KV cache, ours without it, and transformers' generate(do_sample=False),
        the same prompts; the tokens must agree
    python bench.py quant [--minilm DIR] [--out FILE.json]
        stored bytes, bits/param and peak training RSS of fp32 LoRA vs QLoRA vs QLoRA + double quant (one
        fresh process each) on random-init GPT-2-small/medium and RoBERTa-base, and on MiniLM's real weights
        if given; then NF4 quantize/dequantize time against bitsandbytes on CPU
"""
import argparse
import copy
import ctypes
import dataclasses
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

import checkpoint
import data
import lora
import model as M
import peft_format
import quant
import report
import train
from model import hf_name


class HFClassifier(nn.Module):
    """A transformers+peft model behind our model's call signature: (ids, mask, types) -> logits."""

    def __init__(self, peft_model, family, cfg):
        super().__init__()
        self.peft_model, self.family, self.cfg = peft_model, family, cfg

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kw = {"token_type_ids": token_type_ids} if self.family == "bert" else {}
        return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


def bnb_quantize(hf):
    """Swap every block linear of a transformers model (encoder.layer.*, transformer.h.*, model.layers.*) for
    bitsandbytes' NF4 + double-quant Linear4bit, as QLoRA's loader does: the same bytes quant.quantize_model
    stores."""
    import bitsandbytes as bnb
    for name, m in list(hf.named_modules()):
        block = any(k in name for k in (".layer.", ".h.", ".layers."))
        if block and type(m).__name__ in ("Linear", "Conv1D"):
            W = m.weight.data.t() if type(m).__name__ == "Conv1D" else m.weight.data  # (out, in)
            q = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=m.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(W.contiguous(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            if m.bias is not None:
                q.bias = nn.Parameter(m.bias.data.clone(), requires_grad=False)
            # on a CPU with AVX512-BF16, bnb's eval forward repacks the weight and computes in bf16 (and
            # breaks on in_features < 64): the reference stays on its exact fp32 dequantize, as ours does
            q.support_avx512bf16_for_cpu = False
            parent, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(parent), attr, q.to(W.device))  # .to() quantizes
    hf.is_loaded_in_4bit = True  # peft then wraps bnb's Linear4bit with its 4-bit LoRA / AdaLoRA layers
    return hf


HEAD = ("head",)  # our model's task head: it trains whole beside the adapters
# HF's head
MODULES_TO_SAVE = {"gpt2": ["score"], "roberta": ["classifier"], "bert": ["classifier", "pooler"]}


class PeftLoRA(lora.LoRA):
    """LoRA through peft on transformers' model, started from exactly our initial adapter and head values.
    Its files are peft's own (save_pretrained), so it needs nothing of peft_format.py."""
    name = "peft_lora"
    hf_model = None  # a transformers model to wrap; None: load the checkpoint our model was loaded from

    def wrap(self, model, head=HEAD, batches=None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        ours = super().wrap(model, head)  # ours, only to draw the initial values and the target list
        c, family, causal = self.cfg, model.cfg.family, model.cfg.num_labels == 0
        hf = self.hf_model or (AutoModelForCausalLM.from_pretrained(M.resolve(model.name_or_path),
                                                                    dtype=torch.float32) if causal else
                               AutoModelForSequenceClassification.from_pretrained(
            M.resolve(model.name_or_path), num_labels=model.cfg.num_labels, dtype=torch.float32))
        if family == "gpt2":
            hf.config.pad_token_id = model.cfg.pad_id
        four_bit = any(isinstance(m, quant.Linear4bit) for m in model.modules())  # --quant nf4: QLoRA
        if four_bit:
            bnb_quantize(hf)
        PeftLoRA.last_hf = hf
        peft_model = get_peft_model(hf, LoraConfig(
            task_type="CAUSAL_LM" if causal else "SEQ_CLS", r=c.rank, lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=sorted(hf_name(family, n) for n in lora.adapter_layers(ours)),
            modules_to_save=None if causal else MODULES_TO_SAVE[family],
            fan_in_fan_out=family == "gpt2" and not four_bit,
            use_rslora=c.rslora))
        theirs = dict(peft_model.named_parameters())
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if not p.requires_grad:
                    continue
                mod, _, leaf = n.rpartition(".")
                if leaf.startswith("lora_"):
                    key = f"base_model.model.{hf_name(family, mod)}.{leaf}.default.weight"
                else:  # the head, as peft's trainable copy (modules_to_save)
                    top, _, rest = hf_name(family, n).partition(".")
                    key = f"base_model.model.{top}.modules_to_save.default.{rest}"
                    if key not in theirs:  # BERT's pooler: bert.pooler.dense.weight
                        head_name, _, leaf2 = hf_name(family, n).rpartition(".")
                        mod2, _, last = head_name.rpartition(".")
                        key = f"base_model.model.{mod2}.modules_to_save.default.{last}.{leaf2}"
                theirs[key].copy_(p)
        return HFClassifier(peft_model, family, model.cfg)

    @staticmethod
    def peft_layers(model):
        """peft's LoRA layers, except those over a 4-bit base: peft merges into one by dequantizing, adding ΔW
        and quantizing again, which rounds most of a small ΔW away, and unmerge then leaves a drifted base."""
        from peft.tuners.lora import LoraLayer
        return [m for m in model.modules() if isinstance(m, LoraLayer)
                and type(m.get_base_layer()).__name__ != "Linear4bit"]

    def merge(self, model):
        for layer in self.peft_layers(model):
            layer.merge()

    def unmerge(self, model):
        for layer in self.peft_layers(model):
            layer.unmerge()

    def param_groups(self, model):
        c, named = self.cfg, [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = [p for n, p in named if ".lora_" not in n]
        groups = [{"params": [p for n, p in named if ".lora_A." in n], "lr": c.lr,
                   "weight_decay": c.weight_decay, "name": "A"},
                  {"params": [p for n, p in named if ".lora_B." in n], "lr": c.lr * c.lr_ratio,
                   "weight_decay": c.weight_decay, "name": "B"}]
        return [g for g in groups + lora.groups_for("head", head, self.head_lr(), c.weight_decay)
                if g["params"]]

    @staticmethod
    def save(model, folder):
        """peft's own adapter files (adapter_model.safetensors, adapter_config.json)."""
        model.peft_model.save_pretrained(folder)


def save_adapter(method, model, folder, save=None):
    """A method's files: peft's own for PeftLoRA, peft_format's for ours."""
    if isinstance(method, PeftLoRA):
        PeftLoRA.save(model, folder)
    else:
        (save or peft_format.save)(method, model, folder)


def peft_glue(argv):
    """train.py's run on transformers + peft. train.py writes a run's files with peft_format.save, which
    becomes save_adapter for the length of the run, so PeftLoRA's are peft's own."""
    methods = {**train.METHODS, "peft_lora": PeftLoRA}
    save = peft_format.save
    peft_format.save = lambda method, model, folder: save_adapter(method, model, folder, save)
    try:
        return train.run(train.parse_args(argv + ["--method", "peft_lora"], methods), methods)
    finally:
        peft_format.save = save


# -----------------------------------------------------------------------------
# fresh processes: one configuration per interpreter, so ru_maxrss is that configuration's own peak

def fresh(fn, config, threads=None):
    """Run fn(config) in a new `python bench.py _fresh` process and return what it returns (through JSON).
    threads sets OMP_NUM_THREADS there (torch's and bnb's CPU threads): on a busy CPU, threads that wait for
    each other make every op many times slower."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "_fresh", fn.__name__, json.dumps(config)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{fn.__name__}({json.dumps(config)}) failed in its own process: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -----------------------------------------------------------------------------
# quant: the stored size and the training memory of fp32 LoRA vs QLoRA vs QLoRA + double quant

RANDOM_MODELS = {  # random init: memory does not depend on the weight values, so nothing is downloaded
    "gpt2-small": dict(family="gpt2", vocab_size=50257, n_positions=1024, n_types=0, d=768, n_layer=12,
                       n_head=12, d_ff=3072, act="gelu_new", eps=1e-5, pad_id=50256),
    "gpt2-medium": dict(family="gpt2", vocab_size=50257, n_positions=1024, n_types=0, d=1024, n_layer=24,
                        n_head=16, d_ff=4096, act="gelu_new", eps=1e-5, pad_id=50256),
    "roberta-base": dict(family="roberta", vocab_size=50265, n_positions=514, n_types=1, d=768, n_layer=12,
                         n_head=12, d_ff=3072, act="gelu", eps=1e-5, pad_id=1),
    "roberta-large": dict(family="roberta", vocab_size=50265, n_positions=514, n_types=1, d=1024, n_layer=24,
                          n_head=16, d_ff=4096, act="gelu", eps=1e-5, pad_id=1),
    # causal LMs (num_labels 0): SmolLM2-135M's shapes, Llama 3.2 1B's, and ChatGLM2-6B's (the ADAQ-LoRA
    # paper's model)
    "llama-135m": dict(family="llama", vocab_size=49152, n_positions=8192, n_types=0, d=576, n_layer=30,
                       n_head=9, n_kv_head=3, d_ff=1536, act="silu", eps=1e-5, dropout=0.0, pad_id=2,
                       num_labels=0, rope_theta=100000.0, tie=True),
    "llama-1b": dict(family="llama", vocab_size=128256, n_positions=4096, n_types=0, d=2048, n_layer=16,
                     n_head=32, n_kv_head=8, d_ff=8192, act="silu", eps=1e-5, dropout=0.0, pad_id=0,
                     num_labels=0, rope_theta=500000.0, tie=True),
    "llama-6b": dict(family="llama", vocab_size=65024, n_positions=4096, n_types=0, d=4096, n_layer=28,
                     n_head=32, n_kv_head=2, d_ff=13696, act="silu", eps=1e-5, dropout=0.0, pad_id=0,
                     num_labels=0, tie=False),
}
MRPC_STEPS_30_EPOCHS = report.MRPC_STEPS_30_EPOCHS  # the schedule's length in timed steps
MRPC_WARMUP = int(0.06 * MRPC_STEPS_30_EPOCHS)  # warmup_ratio 0.06, train.py's default
# base precision -> double_quant (None: not quantized)
PRECISIONS = {"fp32": None, "nf4": False, "nf4_dq": True}


def random_model(cfg, double_quant):
    """A random-init Transformer. Quantized, one random layer per shape is drawn in fp32 and quantized, and
    each block linear gets its own copy of those codes (memory and time do not depend on the values). The fp32
    backbone never exists whole, as with a QLoRA loader that streams a checkpoint."""
    if double_quant is None:
        return M.Transformer(cfg)
    with torch.device("meta"):
        model = M.Transformer(cfg)
    drawn = {}  # (layer type, in, out) -> Linear4bit
    for name, m in list(model.named_modules()):
        if name.startswith("h.") and type(m) in (nn.Linear, M.Conv1D):
            key = (type(m), m.in_features, m.out_features)
            if key not in drawn:
                fp32 = type(m)(m.in_features, m.out_features)  # on the CPU
                M.Transformer._init_weights(fp32)
                drawn[key] = quant.Linear4bit.from_linear(fp32, double_quant)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, copy.deepcopy(drawn[key]))
    for m in model.modules():  # the rest: embeddings, LayerNorms, the head
        if any(p.is_meta for p in m.parameters(recurse=False)):
            m.to_empty(device="cpu", recurse=False)
            m.reset_parameters()
            M.Transformer._init_weights(m)
    return model


def lora_steps(c):
    """c: model (a RANDOM_MODELS name or a checkpoint folder), precision, batch, seq, steps. Runs train.py's
    step (train.train_step: forward, loss, backward, clip, AdamW, schedule, after_step) with LoRA r=8 on
    all linears, on random tokens."""
    rss_imports = peak_rss_mb()
    torch.manual_seed(0)
    double_quant = PRECISIONS[c["precision"]]
    if c["model"] in RANDOM_MODELS:
        model = random_model(M.Config(**RANDOM_MODELS[c["model"]]), double_quant)
    else:  # a real checkpoint is read whole in fp32 first, so its peak includes that
        model = M.from_pretrained(c["model"])
        if double_quant is not None:
            quant.quantize_model(model, double_quant=double_quant)
    # glibc keeps freed heap pages; trimming them after the build and after each step makes the peak the
    # step's own, not leftovers
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim(0)
    rss_build = peak_rss_mb()  # the high-water mark so far: the build's peak
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    n_params = quant.count_params(model)
    bits = quant.bits_per_param(model) if double_quant is not None else 32.0
    method = lora.LoRA(lora.LoRAConfig(rank=8, alpha=16, dropout=0.1))
    model = method.wrap(model, HEAD).train()
    opt, sched = train.optimizer(method, model, MRPC_STEPS_30_EPOCHS, MRPC_WARMUP, "cpu")
    B, T, V = c["batch"], c["seq"], model.cfg.vocab_size
    batch = {"input_ids": torch.randint(V, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "token_type_ids": torch.zeros(B, T, dtype=torch.long), "labels": torch.randint(2, (B,))}
    t0 = time.time()
    for step in range(1, c["steps"] + 1):
        train.train_step(model, model, method, [batch], opt, sched, step, 1.0, "cpu")
        trim(0)
    return {**c, "params": n_params, "stored_bytes": stored, "bits_per_param": bits,
            "s_per_step": (time.time() - t0) / c["steps"], "rss_after_imports_mb": rss_imports,
            "build_peak_rss_mb": rss_build, "peak_rss_mb": peak_rss_mb(),
            "peak_minus_imports_mb": peak_rss_mb() - rss_imports}


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quant_speed(c):
    """Median ms (of c["repeats"]) to quantize and dequantize one weight of each of c["shapes"] in NF4 (block
    64, double quant): ours vs bitsandbytes."""
    import bitsandbytes.functional as bnbF
    rows, repeats = [], c["repeats"]
    for shape in c["shapes"]:
        W = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        state = quant.quantize_nf4(W)
        packed, ref = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        # as in the tests: keep bnb's CPU path out of torch.compile
        with torch._dynamo.config.patch(disable=True):
            rows.append({"shape": list(shape),
                         "ours_quantize_ms": 1e3 * median_seconds(lambda: quant.quantize_nf4(W), repeats),
                         "bnb_quantize_ms": 1e3 * median_seconds(lambda: bnbF.quantize_4bit(
                             W, blocksize=64, compress_statistics=True, quant_type="nf4"), repeats),
                         "ours_dequantize_ms": 1e3 * median_seconds(lambda: quant.dequantize_nf4(state),
                                                                    repeats),
                         "bnb_dequantize_ms": 1e3 * median_seconds(lambda: bnbF.dequantize_4bit(packed, ref),
                                                                   repeats)})
    return rows


def quant_bench(argv):
    p = argparse.ArgumentParser(prog="python bench.py quant", description="NF4 memory and speed")
    p.add_argument("--minilm", default=None,
                   help="a MiniLM checkpoint folder (real weights); skipped if not given")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.add_argument("--batch", type=int, default=8, help="batch size (16, with --steps 3: ~8 min on one core)")
    p.add_argument("--seq", type=int, default=128, help="tokens per example")
    p.add_argument("--steps", type=int, default=2, help="training steps per configuration")
    p.add_argument("--models", default="gpt2-small,gpt2-medium,roberta-base", help="comma list of " +
                   ", ".join(RANDOM_MODELS))
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (1 suits a shared CPU)")
    a = p.parse_args(argv)
    unknown = set(a.models.split(",")) - set(RANDOM_MODELS)
    if unknown:
        raise ValueError(f"unknown model {sorted(unknown)[0]!r}; --models takes {', '.join(RANDOM_MODELS)}")
    shapes = {m: (a.batch, a.seq, a.steps) for m in a.models.split(",")}
    if "gpt2-medium" in shapes:  # ~3.5x gpt2-small's compute per token: half the batch and one step
        shapes["gpt2-medium"] = (max(1, a.batch // 2), a.seq, 1)
    if a.minilm:
        shapes = {a.minilm: (a.batch, a.seq, a.steps), **shapes}
    runs = []
    for model, (batch, seq, steps) in shapes.items():
        for precision in PRECISIONS:
            runs.append(fresh(lora_steps, {"model": model, "precision": precision, "batch": batch, "seq": seq,
                                           "steps": steps}, a.threads))
            r = runs[-1]
            print(f"{os.path.basename(model.rstrip('/'))} {precision}: peak {r['peak_rss_mb']:.0f} MB, "
                  f"{r['s_per_step']:.1f} s/step", file=sys.stderr, flush=True)
    speed = fresh(quant_speed, {"shapes": [[768, 768], [3072, 768]], "repeats": 5}, a.threads)
    lines = [f"LoRA r=8 on every block linear, random tokens, train.py's step; one fresh process per row, "
             f"peak RSS = its ru_maxrss; {a.threads} CPU thread(s) each", "",
             "| model | base | params | stored MB | bits/param (4-bit layers) | batch x seq, steps | "
             "RSS after imports MB | build peak MB | peak RSS MB | peak - imports MB | s/step |",
             "|---" * 11 + "|"]
    for r in runs:
        lines.append(f"| {os.path.basename(r['model'].rstrip('/'))} | {r['precision']} | "
                     f"{r['params'] / 1e6:.1f}M | {r['stored_bytes'] / 2**20:.1f} | "
                     f"{r['bits_per_param']:.3f} | {r['batch']} x {r['seq']}, {r['steps']} | "
                     f"{r['rss_after_imports_mb']:.0f} | {r['build_peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_minus_imports_mb']:.0f} | {r['s_per_step']:.2f} |")
    lines += ["", "| weight (out x in) | quantize ms: ours / bnb | dequantize ms: ours / bnb |",
              "|---|---|---|"]
    for s in speed:
        lines.append(f"| {s['shape'][0]} x {s['shape'][1]} | {s['ours_quantize_ms']:.2f} / "
                     f"{s['bnb_quantize_ms']:.2f} | {s['ours_dequantize_ms']:.2f} / "
                     f"{s['bnb_dequantize_ms']:.2f} |")
    print("\n".join(lines))
    if a.out:
        # temp file, then os.replace
        checkpoint.write_json(a.out, {"runs": runs, "speed": speed, "threads": a.threads})
        print(f"wrote {a.out}")
    return runs, speed


# -----------------------------------------------------------------------------
# memory: the ADAQ-LoRA paper's claim (it trains in less memory than QLoRA and LoRA), ours beside transformers
# + peft + bitsandbytes, on random-init GPT-2-medium

MEMORY_ROWS = {"lora": False, "qlora": True, "adalora": False, "adaq_lora": True}  # row -> 4-bit base


def reset_peak_rss():
    """Linux: make VmHWM (the peak RSS) start again from the current RSS, so the peak is the training's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def vm_hwm_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def reference_model(cfg, four_bit, row):
    """transformers' GPT2ForSequenceClassification, its block Conv1Ds swapped for bitsandbytes
    NF4 + double-quant Linear4bit when four_bit, wrapped by peft's LoRA (r 64, α 16) or AdaLoRA
    (init_r 12, target_r 8)."""
    import transformers as T
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    hf = T.GPT2ForSequenceClassification(T.GPT2Config(
        n_embd=cfg.d, n_layer=cfg.n_layer, n_head=cfg.n_head, n_positions=cfg.n_positions,
        vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_id, num_labels=2))
    if four_bit:
        bnb_quantize(hf)
    kw = dict(task_type="SEQ_CLS", target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.1,
              fan_in_fan_out=not four_bit)
    return get_peft_model(hf, LoraConfig(r=64, lora_alpha=16, **kw) if "ada" not in row else
                          AdaLoraConfig(init_r=12, target_r=8, lora_alpha=32, total_step=100, **kw))


def memory_row(c):
    """One row in its own process: c = {stack: ours | reference, row, model, batch, seq, steps}. Peak RSS of
    the training steps (VmHWM reset after the build), adapter parameters, bits per 4-bit weight."""
    torch.manual_seed(0)
    cfg = M.Config(**{**RANDOM_MODELS[c["model"]], **({"n_layer": c["n_layer"]} if c.get("n_layer") else {})})
    four_bit, B, T = MEMORY_ROWS[c["row"]], c["batch"], c["seq"]
    ids = torch.randint(cfg.vocab_size - 1, (B, T))
    labels = ids if cfg.num_labels == 0 else torch.randint(2, (B,))  # a causal LM predicts its next tokens
    mask = torch.ones(B, T, dtype=torch.long)
    if c["stack"] == "ours":
        import adaq_lora
        model = random_model(cfg, True if four_bit else None)
        method = lora.LoRA(lora.LoRAConfig(rank=64, alpha=16, dropout=0.1)) if "ada" not in c["row"] else \
            adaq_lora.AdaLoRA(adaq_lora.AdaLoRAConfig(init_r=12, target_r=8, tinit=10, tfinal=10))
        dev = c.get("device", "cpu")
        model = method.wrap(model, HEAD).to(dev).train()
        model.grad_checkpointing = c.get("grad_checkpointing", False)
        bits = quant.bits_per_param(model) if four_bit else 32.0
        opt, sched = train.optimizer(method, model, 100, 0, dev)
        method.schedule(100, 0)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                 "labels": labels}
        step = lambda t: train.train_step(model, model, method, [batch], opt, sched, t, 1.0, dev)
        named = model.named_parameters()
    else:
        model = reference_model(cfg, four_bit, c["row"]).train()
        bits = None
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)

        def step(t):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if "ada" in c["row"]:
                model.base_model.update_and_allocate(t)
            opt.zero_grad(set_to_none=True)
        named = model.named_parameters()
    adapter = sum(p.numel() for n, p in named if p.requires_grad and "lora_" in n)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    built = vm_hwm_mb()
    reset_peak_rss()
    start = vm_hwm_mb()
    cuda = c.get("device", "cpu").startswith("cuda")
    if cuda:  # the GPU's own peak, from the step's start
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for t in range(1, c["steps"] + 1):
        step(t)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else vm_hwm_mb()
    return {**c, "adapter_params": adapter, "bits_per_param": bits, "build_peak_mb": built,
            "rss_before_training_mb": start, "train_peak_mb": peak,
            "s_per_step": (time.time() - t0) / c["steps"]}


def random_model_flags(p):
    """The flags memory and scale share: which random-init model, and the batch shape."""
    p.add_argument("--model", default="gpt2-medium", help=", ".join(RANDOM_MODELS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)


def memory_bench(argv):
    p = argparse.ArgumentParser(prog="python bench.py memory",
                                description="the ADAQ-LoRA paper's memory claim")
    random_model_flags(p)
    p.add_argument("--steps", type=int, default=2, help="training steps (the 2nd has AdamW's state)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full_depth", action="store_true", help="Llama shapes: also measure each row at the "
                   "shape's own depth, to check the extension from n_layer 1 and 2 (needs the memory)")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    p.add_argument("--table", default=None, metavar="FILE.json", help="only print the table of a saved run")
    a = p.parse_args(argv)
    if a.table:
        with open(a.table) as f:
            saved = json.load(f)
        print(report.memory_table(saved["rows"], saved["threads"]))
        return saved["rows"]
    unknown = [m for m in a.model.split(",") if m not in RANDOM_MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; --model takes {', '.join(RANDOM_MODELS)}")
    if all(RANDOM_MODELS[m]["family"] == "llama" for m in a.model.split(",")):  # ours, at two depths
        return llama_memory(a)
    rows = []
    for stack in ("ours", "reference"):
        for row in MEMORY_ROWS:
            rows.append(fresh(memory_row, {"stack": stack, "row": row, "model": a.model, "batch": a.batch,
                                           "seq": a.seq, "steps": a.steps}, a.threads))
            r = rows[-1]
            print(f"{stack} {row}: training peak {r['train_peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    print(report.memory_table(rows, a.threads))
    if a.out:
        checkpoint.write_json(a.out, {"rows": rows, "threads": a.threads})
        print(f"wrote {a.out}")
    return rows


def llama_memory(a):
    """Llama shapes too large to train whole in fp32 here (6B: 25 GB of weights), --model a comma list: each
    row is measured at two depths, n_layer 1 and 2, and its peak extended linearly to the shape's depth.
    Every block is the same, so each adds the same memory (weights, adapters, AdamW state, activations)."""
    shapes = []
    for model in a.model.split(","):
        rows = []
        for row in MEMORY_ROWS:
            for n_layer in (1, 2) + ((RANDOM_MODELS[model]["n_layer"],) if a.full_depth else ()):
                c = {"stack": "ours", "row": row, "model": model, "batch": a.batch, "seq": a.seq,
                     "steps": a.steps, "n_layer": n_layer}
                rows.append(fresh(memory_row, c, a.threads))
                print(f"{model} {row} n_layer {n_layer}: training peak {rows[-1]['train_peak_mb']:.0f} MB",
                      file=sys.stderr, flush=True)
        shapes.append({"model": model, "n_layer": RANDOM_MODELS[model]["n_layer"], "rows": rows})
    print("\n".join(report.llama_memory_table(shapes)))
    if a.out:
        checkpoint.write_json(a.out, {"shapes": shapes, "threads": a.threads})
        print(f"wrote {a.out}")
    return shapes


# -----------------------------------------------------------------------------
# scale: --grad_checkpointing's memory and time, and torchrun's throughput

def scale_bench(argv):
    p = argparse.ArgumentParser(prog="python bench.py scale",
                                description="checkpointing and data parallelism")
    random_model_flags(p)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cuda: the checkpointing rows report max_memory_allocated")
    p.add_argument("--minilm", default=None, help="MiniLM folder: also time train.py on MRPC, 1 process vs 2")
    p.add_argument("--data_dir", default=None, help="GLUE folder, with --minilm")
    p.add_argument("--train_steps", type=int, default=20, help="train.py steps per throughput run")
    p.add_argument("--global_batch", type=int, default=16)
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    if a.model not in RANDOM_MODELS:
        raise ValueError(f"unknown model {a.model!r}; --model takes {', '.join(RANDOM_MODELS)}")
    c = {"stack": "ours", "row": "lora", "model": a.model, "batch": a.batch, "seq": a.seq, "steps": a.steps,
         "device": a.device}
    rows = [fresh(memory_row, {**c, "grad_checkpointing": g}, 1) for g in (False, True)]
    runs = []
    if a.minilm and a.data_dir:  # train.py itself at one global batch: 1 process vs torchrun with 2
        for nproc in (1, 2):
            with tempfile.TemporaryDirectory() as out:
                cmd = ["train.py", "--method", "lora", "--task", "mrpc", "--model", a.minilm, "--data_dir",
                       a.data_dir, "--epochs", "1", "--max_steps", str(a.train_steps), "--log_every",
                       str(a.train_steps), "--batch_size", str(a.global_batch // nproc), "--out_dir", out]
                torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                launch = [sys.executable] + (torchrun if nproc > 1 else [])
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
                r = subprocess.run(launch + cmd, capture_output=True, text=True, env=env,
                                   cwd=os.path.dirname(os.path.abspath(__file__)))
                if r.returncode != 0:
                    raise RuntimeError(f"train.py with {nproc} process(es) failed: "
                                       f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
                with open(os.path.join(out, "metrics.json")) as f:
                    m = json.load(f)
            runs.append({"processes": nproc, "steps": m["steps"], "train_seconds": m["train_seconds"],
                         "examples_per_s": m["steps"] * a.global_batch / m["train_seconds"]})
    print("\n".join(report.scale_table(rows, runs, a.global_batch, os.cpu_count())))
    if a.out:
        checkpoint.write_json(a.out, {"checkpointing": rows, "throughput": runs,
                                      "global_batch": a.global_batch, "cpus": os.cpu_count()})
        print(f"wrote {a.out}")
    return rows, runs


# -----------------------------------------------------------------------------
# speed: one training step of every method, ours and peft's, on the same model, batch and lengths
# (issues 6, 8)

# qlora: lora over an NF4 base; dynamic_lora times the steps without importance sampling, dynamic_lora_sampled
# the steps with it
OURS = ("lora", "dynamic_lora", "dynamic_lora_sampled", "tlora_plus", "tlora", "adapter", "bitfit", "head",
        "full", "qlora")


def generate_bench(argv):
    """Decoding speed: the same random GPT-2 and left-padded prompts (lengths prompt/2 … prompt) through our
    cached and uncached generate and transformers' (which keeps a DynamicCache); eos never ends a row, so
    every row decodes --new tokens. Prints tokens/s and the ratios; the three must give the same tokens."""
    import transformers as T
    import model as M
    p = argparse.ArgumentParser(prog="bench.py generate")
    for k, v in (("n_layer", 12), ("n_embd", 768), ("n_head", 12), ("batch", 4), ("prompt", 32), ("new", 64),
                 ("repeats", 3), ("threads", 0)):
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="a causal-LM folder (SmolLM2) instead of the random GPT-2")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model:
        hf = T.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    else:
        hf = T.GPT2LMHeadModel(T.GPT2Config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head))
    hf = hf.eval().to(a.device)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    if a.model:
        ours = M.from_pretrained(a.model, num_labels=0).eval().to(a.device)
    else:
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = M.from_pretrained(d, num_labels=0).eval().to(a.device)
    lengths = [a.prompt // 2 + (a.prompt - a.prompt // 2) * i // max(1, a.batch - 1) for i in range(a.batch)]
    ids = torch.zeros(a.batch, a.prompt, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):  # left padding
        ids[i, a.prompt - n:] = torch.randint(1, hf.config.vocab_size, (n,))
        mask[i, a.prompt - n:] = 1
    ids, mask = ids.to(a.device), mask.to(a.device)
    runs = {"ours (KV cache)": lambda: ours.generate(ids, mask, a.new, eos_id=-1),
            "ours (no cache)": lambda: ours.generate(ids, mask, a.new, eos_id=-1, use_cache=False),
            "transformers": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=a.new,
                                                do_sample=False)[:, a.prompt:]}
    tokens, times = {}, {name: [] for name in runs}
    with torch.no_grad():
        for name, fn in runs.items():
            tokens[name] = fn().tolist()  # warm-up, and the tokens to compare
        for _ in range(a.repeats):  # interleaved, so a busy spell of the machine hits all three alike
            for name, fn in runs.items():
                times[name].append(median_seconds(fn, 1))
    rows = {name: {"seconds": statistics.median(t), "tokens_per_s": a.batch * a.new / statistics.median(t),
                   "runs": t} for name, t in times.items()}
    same = len({json.dumps(t) for t in tokens.values()}) == 1
    result = {"config": {**vars(a), "threads": torch.get_num_threads()}, "lengths": lengths,
              "same_tokens": same, "rows": rows}
    print("\n".join(report.generate_table(result)))
    if not same:
        raise RuntimeError("the decoders gave different tokens: a bug in generate")
    if a.out:
        checkpoint.write_json(a.out, result)


def hf_config(cfg):
    """transformers' config for one of our configs: the same shapes, so the same work per step."""
    import transformers as T
    if cfg.family == "gpt2":
        return T.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.d,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff, pad_token_id=cfg.pad_id)
    Cfg = T.RobertaConfig if cfg.family == "roberta" else T.BertConfig
    return Cfg(vocab_size=cfg.vocab_size, hidden_size=cfg.d, num_hidden_layers=cfg.n_layer,
               num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
               max_position_embeddings=cfg.n_positions, type_vocab_size=cfg.n_types, pad_token_id=cfg.pad_id)


def build_for_speed(c):
    """-> (model, method or None) for one row; model(ids, mask, types) -> logits, as train.py calls it."""
    folder = None if c["model"] in RANDOM_MODELS else c["model"]
    num_labels = 0 if folder and M.read_config(folder).family in M.CAUSAL else 2  # a causal LM: its LM head
    ours = M.from_pretrained(folder, num_labels) if folder else random_model(
        M.Config(**RANDOM_MODELS[c["model"]]), None)
    if c["impl"] == "base":  # the frozen model alone, with a gradient only to its input embeddings: the bound
        for p in ours.parameters():
            p.requires_grad = False
        ours.wte.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        return ours, None
    name = {"qlora": "lora", "dynamic_lora_sampled": "dynamic_lora"}.get(c["method"], c["method"])
    cls = PeftLoRA if c["impl"] == "peft" else train.METHODS[name]
    # the fields that LoRA's, TLoRA+'s and Dynamic LoRA's configs take; Dynamic LoRA samples importance on
    # every step (_sampled) or on none, so each row times one kind of step
    adapter = {"rank": c["rank"], "alpha": 2 * c["rank"], "dropout": 0.0, "n_cal": 1,
               "importance_every": 1 if c["method"] == "dynamic_lora_sampled" else 10**9}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    method = cls(cls.Config(**{k: v for k, v in adapter.items() if k in fields}))
    ids = torch.randint(5, ours.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "token_type_ids": torch.zeros_like(ids)}]
    if c["impl"] == "peft" and not num_labels:  # PeftLoRA loads transformers' causal LM from the folder
        ours.name_or_path = folder
    elif c["impl"] == "peft":
        from transformers import AutoModelForSequenceClassification as Auto
        method.hf_model = Auto.from_pretrained(folder, num_labels=2, dtype=torch.float32) if folder else \
            Auto.from_config(hf_config(ours.cfg))
    if c["method"] == "qlora":
        quant.quantize_model(ours)
    return method.wrap(ours, HEAD, calibration), method


def speed_config(c):
    """One row. c: model, impl (ours | peft | base), method, rank, lengths, warmup, steps, device, compile."""
    torch.manual_seed(0)
    rss0, dev = peak_rss_mb(), c["device"]
    model, method = build_for_speed(c)
    model = model.to(dev)
    B, T = len(c["lengths"]), max(c["lengths"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.cfg.vocab_size, (B, T), generator=g)
    # right padding, real lengths
    mask = (torch.arange(T)[None, :] < torch.tensor(c["lengths"])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100) if model.cfg.num_labels == 0 else torch.randint(2, (B,))
    ids, mask, types, labels = (t.to(dev) for t in (ids, mask, torch.zeros_like(ids), labels))
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = train.compile_model(model, dev) if c["compile"] else model
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if method:  # train.py's whole step: train.train_step, with its schedule and the method's after_step
        opt, sched = train.optimizer(method, model, MRPC_STEPS_30_EPOCHS, MRPC_WARMUP, dev)
        method.schedule(MRPC_STEPS_30_EPOCHS, MRPC_WARMUP)
        steps = itertools.count(1)
        step = lambda: train.train_step(model, fwd, method, [batch], opt, sched, next(steps), 1.0, dev)
    else:  # the frozen base: forward and the backward to the input embeddings, nothing to update
        def step():
            with train.autocast(dev):
                train.task_loss(fwd(ids, mask, types), labels).backward()

    def infer():
        with torch.no_grad(), train.autocast(dev):
            fwd(ids, mask, types)

    def median_ms(fn, n):
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    median_ms(step, c["warmup"])
    step_ms = median_ms(step, c["steps"])
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else peak_rss_mb() - rss0
    model.eval()
    median_ms(infer, 1)
    eval_ms, eval_merged_ms = median_ms(infer, c["steps"]), None
    # merged: what inference should cost
    if method and c["method"] not in ("qlora", "bitfit", "head", "full", "adapter"):
        method.merge(model)  # PeftLoRA merges peft's layers
        median_ms(infer, 1)
        eval_merged_ms = median_ms(infer, c["steps"])
        method.unmerge(model)
    adapter_bytes = None
    if method:
        with tempfile.TemporaryDirectory() as d:
            save_adapter(method, model, d)
            adapter_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    n_backbone = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "head" not in n) \
        + sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, quant.Linear4bit))
    return {**{k: v for k, v in c.items() if k != "lengths"}, "batch": B, "T": T,
            "real_tokens": sum(c["lengths"]), "step_ms": step_ms, "causal": model.cfg.num_labels == 0,
            "tokens_per_s": 1e3 * sum(c["lengths"]) / step_ms, "eval_ms": eval_ms,
            "eval_merged_ms": eval_merged_ms, "peak_mb": peak, "adapter_bytes": adapter_bytes,
            "trainable": sum(p.numel() for p in params),
            "tflops": 4 * n_backbone * B * T / (step_ms * 1e-3) / 1e12}  # forward + input-gradient backward


def mrpc_lengths(batch, data_dir, folder, family, seed=0):
    """Token counts of `batch` MRPC training pairs drawn at random, through the checkpoint's tokenizer
    (GPT-2's BPE files serve RoBERTa too: its pair adds <s> </s></s> </s>)."""
    import random
    from tokenizer import load_tokenizer
    rows = data.load_split(data.get_task("mrpc"), "train", data_dir)
    tok, extra = load_tokenizer(folder, "gpt2" if family == "roberta" else family), 4 * (family == "roberta")
    return [min(128, len(tok.encode(*texts, max_len=128)[0]) + extra)
            for texts, _ in random.Random(seed).sample(rows, batch)]


def speed_rows(model, compile_too, methods=OURS, llm=False):
    if llm:  # a causal LM: LoRA and QLoRA, each beside peft's (QLoRA: on bitsandbytes' NF4 + double quant)
        return [("base", "frozen base (bound)", False), ("peft", "lora", False), ("ours", "lora", False),
                ("peft", "qlora", False), ("ours", "qlora", False)]
    rows = [("base", "frozen base (bound)", False), ("peft", "lora", False)]
    rows += [("ours", m, False) for m in OURS if m in methods or m == "lora"]
    if compile_too:  # qlora compiled: its dequantize fused (quant.compile_dequantize)
        rows += [("ours", m, True) for m in ("lora", "tlora_plus", "qlora") if m in methods or m == "lora"]
    return rows


def median_round(rounds):
    """The round with the median step time, whole (its memory and eval times too), and every round's."""
    row = sorted(rounds, key=lambda r: r["step_ms"])[(len(rounds) - 1) // 2]
    return {**row, "step_ms_rounds": [r["step_ms"] for r in rounds]}


def speed_bench(argv):
    p = argparse.ArgumentParser(prog="python bench.py speed",
                                description="step time, tokens/s, latency, memory")
    p.add_argument("--minilm", default=None,
                   help="MiniLM checkpoint folder (real weights); skipped if not given")
    p.add_argument("--llm", default=None, help="a causal-LM folder (e.g. SmolLM2): LoRA and QLoRA against "
                   "peft's, batch --llm_batch x --llm_seq tokens; skipped if not given")
    p.add_argument("--llm_batch", type=int, default=4)
    p.add_argument("--llm_seq", type=int, default=256)
    p.add_argument("--models", default=None, help="comma list of " + ", ".join(RANDOM_MODELS) +
                   " (default: roberta-base,gpt2-small; on cuda also roberta-large,gpt2-medium;"
                   " \"\" for none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128, help="tokens per example when no real lengths are given")
    p.add_argument("--data_dir", default=None, help="GLUE folder: batches take real MRPC lengths")
    p.add_argument("--vocab", default=None,
                   help="GPT-2 BPE folder (vocab.json, merges.txt) for gpt2/roberta lengths")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (the median is reported)")
    p.add_argument("--rounds", type=int, default=1, help="time every row this many times, the rows in turn; "
                   "each row reports its median round")
    p.add_argument("--compile", action="store_true",
                   help="also time lora, tlora_plus and qlora under torch.compile")
    p.add_argument("--methods", default=",".join(OURS), help="our rows to time (default: all; lora always)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    p.add_argument("--out", default="bench_speed.json")
    a = p.parse_args(argv)
    names = [n for n in a.models.split(",") if n] if a.models is not None else (
        ["roberta-base", "gpt2-small"] + (["roberta-large", "gpt2-medium"] if a.device == "cuda" else []))
    unknown = [n for n in names if n not in RANDOM_MODELS or RANDOM_MODELS[n]["family"] == "llama"]
    if unknown:
        raise ValueError(f"--models takes {', '.join(m for m in RANDOM_MODELS if 'llama' not in m)}, not "
                         f"{unknown[0]!r} (a causal LM times through --llm DIR)")
    models = ([a.minilm] if a.minilm else []) + ([a.llm] if a.llm else []) + names
    results, lines = [], []
    for model in models:
        family = ("bert" if model == a.minilm else "llama" if model == a.llm else
                  RANDOM_MODELS[model]["family"])
        folder = a.minilm if model == a.minilm else a.vocab
        lengths = ([a.llm_seq] * a.llm_batch if model == a.llm else
                   mrpc_lengths(a.batch, a.data_dir, folder, family) if a.data_dir and folder
                   else [a.seq] * a.batch)
        configs = [{"model": model, "impl": impl, "method": method, "rank": a.rank, "lengths": lengths,
                    "warmup": a.warmup + (3 if compiled else 0), "steps": a.steps, "device": a.device,
                    "compile": compiled}
                   for impl, method, compiled in speed_rows(model, a.compile, a.methods.split(","),
                                                            model == a.llm)]
        rounds = [[] for _ in configs]
        for _ in range(a.rounds):  # the rows in turn, so a busy spell of the machine hits them alike
            for c, done in zip(configs, rounds):
                done.append(fresh(speed_config, c, a.threads))
                name = f"{os.path.basename(model)} {c['impl']} {c['method']}" + " compiled" * c["compile"]
                print(f"{name}: {done[-1]['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
        rows = [median_round(done) for done in rounds]
        results += rows
        lines += report.speed_table(rows, a.device)
    shape = f"batch {a.batch}" if names or a.minilm else f"batch {a.llm_batch} x {a.llm_seq} tokens"
    turns = f" and round, the median of {a.rounds} rounds that took the rows in turn" if a.rounds > 1 else ""
    header = (f"{a.device}, {shape}, rank {a.rank}, median of {a.steps} steps after {a.warmup} warm-up, one "
              f"fresh process per row{turns} ({torch.get_num_threads() if a.threads is None else a.threads} "
              f"threads)")
    print("\n".join([header, ""] + lines))
    checkpoint.write_json(a.out, {"header": header, "rows": results})
    print(f"wrote {a.out}")
    return results


def main(argv=None):
    """The command line: one mode and its flags; bad input is one line, "error: ...", and a non-zero exit."""
    modes = {"peft_glue": (peft_glue, "train.py's run on transformers + peft (takes train.py's flags)"),
             "speed": (speed_bench, "step time, tokens/s, latency and memory of every method vs peft LoRA"),
             "quant": (quant_bench,
                       "NF4 stored size, bits/param and training memory; NF4 speed vs bitsandbytes"),
             "memory": (memory_bench, "ADAQ-LoRA's claim: training memory of LoRA, QLoRA, AdaLoRA, "
                                      "ADAQ-LoRA, ours vs transformers + peft + bitsandbytes"),
             "scale": (scale_bench, "--grad_checkpointing's memory and time; torchrun's throughput"),
             "generate": (generate_bench, "greedy decoding tokens/s: ours, cached and not, vs transformers")}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(modes) + "}")
    for name, (_, help) in modes.items():
        sub.add_parser(name, help=help, add_help=False)  # each mode parses (and documents) its own flags
    a, rest = p.parse_known_args(argv)
    try:
        modes[a.mode][0](rest)
    except ImportError as e:  # transformers, peft, bitsandbytes: references, not dependencies
        sys.exit(f"error: bench.py {a.mode} needs {e.name}, a test-only reference: "
                 f"pip install -r requirements-dev.txt")
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    # a child of fresh(): run one function on one JSON config, print its result
    if sys.argv[1:2] == ["_fresh"]:
        print(json.dumps(globals()[sys.argv[2]](json.loads(sys.argv[3]))))
        sys.exit()
    main()
