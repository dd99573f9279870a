"""
One prepared check of the CUDA path: <= 8 minutes on one H100, and <= 60 s on a CPU, where the CUDA-only parts
are skipped with one line each (so CI runs it). Each part is a child `python train.py ...` or `python bench.py
speed ...` run with TORCH_LOGS=recompiles,graph_breaks,cudagraphs, whose log gives the counts of graph breaks,
recompiles and skipped CUDA graphs. It writes one JSON file (atomically) and prints a summary:

  probes      --compile runs that crash or fall back on CUDA: --grad_accum 2 (a CUDA-graph replay overwrites
              the previous micro-batch's outputs), dynamic_lora (its sampling hooks), and --quant nf4 under
              TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 (a CPU tensor in the graph then fails the run instead of
              quietly dropping CUDA graphs; that run is also the compiled QLoRA memory row)
  parity      eager against compiled LoRA and TLoRA+ on MRPC: equal loss logs within bf16 noise (RTOL, ATOL).
              The compiled LoRA run is the grad_accum probe, 8 x 2: the same 16 examples a step as eager's 16
  speed       ms/step of our LoRA, eager and compiled, against transformers + peft on the same batch and
              lengths, with the ratios (bench.py speed)
  memory      training max_memory_allocated of LoRA r 64 and QLoRA, eager and compiled, on a random
              gpt2-medium at batch 1 x 512 (CUDA only)
  projection  30 MRPC epochs (3668 examples at batch 16: 230 steps each) from the measured steps, compile
              excluded

On a lent GPU, from the project root (../shared/device_pack.sh packs MiniLM, GLUE and bitsandbytes into
.device/; carry [".device"]):
    export PYTHONPATH=$PWD/.device/site:$PYTHONPATH
    python gpu_check.py --minilm .device/minilm --data_dir .device/glue --out results/gpu_check.json
Without --minilm it uses a random BERT (MiniLM's shape on CUDA, a tiny one on CPU), without --data_dir a
synthetic MRPC. Runs not started within --budget_s read "skipped (time budget)".
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

import checkpoint
import model as M
from tokenizer import bytes_to_unicode

HERE = os.path.dirname(os.path.abspath(__file__))
MRPC_STEPS_30_EPOCHS = 30 * 230
# bf16 keeps 8 significant bits (2^-9 ≈ 0.2% a rounding); eager and compiled round in different places and
# 30 AdamW steps let that drift. Parity: every logged loss within |a - b| <= ATOL + RTOL |a|
RTOL, ATOL = 2e-2, 1e-2
WORDS = ["good", "bad", "cat", "dog", "runs", "sleeps", "the", "a", "big", "small"]
NO_CUDA, NO_TIME = "skipped (no CUDA)", "skipped (time budget)"


# -----------------------------------------------------------------------------
# inputs: checkpoints with dropout 0 (eager and compiled then do the same math), MRPC real or synthetic

def write_mrpc(folder, n, sentence):
    """MRPC's TSV layout: n train rows, n // 2 dev rows of sentence(rng) pairs."""
    rng = random.Random(0)
    os.makedirs(os.path.join(folder, "MRPC"))
    for split, m in (("train", n), ("dev", n // 2)):
        rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        rows += [f"{i % 2}\t{i}\t{i + 1}\t{sentence(rng)}\t{sentence(rng)}" for i in range(m)]
        with open(os.path.join(folder, "MRPC", f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
    return folder


def trimmed_mrpc(data_dir, folder, dev_rows=64):
    """The real MRPC, dev cut to its first rows: the check does not score the few-step runs."""
    os.makedirs(os.path.join(folder, "MRPC"))
    shutil.copy(os.path.join(data_dir, "MRPC", "train.tsv"), os.path.join(folder, "MRPC"))
    with open(os.path.join(data_dir, "MRPC", "dev.tsv"), encoding="utf-8") as f:
        dev = f.readlines()[:dev_rows + 1]
    with open(os.path.join(folder, "MRPC", "dev.tsv"), "w", encoding="utf-8") as f:
        f.writelines(dev)
    return folder


def save_random(folder, hf, files):
    """A random-init checkpoint folder: config.json, model.safetensors in HF's names, the tokenizer files."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = M.Transformer(M.config_from_hf(hf, num_labels=2))
    os.makedirs(folder)
    save_file({M.hf_name(hf["model_type"], n): t.contiguous() for n, t in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name, text in {**files, "config.json": json.dumps(hf, indent=2)}.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    return folder


def random_bert(folder, d, n_layer, n_head):
    """WordPiece over the synthetic words and single characters, so that real MRPC tokenizes too."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *("##" + c for c in chars),
             *".,;:!?'\"()-$%&/"]
    hf = {"model_type": "bert", "vocab_size": len(vocab), "hidden_size": d, "num_hidden_layers": n_layer,
          "num_attention_heads": n_head, "intermediate_size": 4 * d, "max_position_embeddings": 512,
          "type_vocab_size": 2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
          "pad_token_id": 0}
    return save_random(folder, hf, {"vocab.txt": "\n".join(vocab) + "\n"})


def random_gpt2_medium(folder):
    """gpt2-medium's shapes; a byte-level vocab padded to GPT-2's 50257 ids (one token per byte)."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({f"<unused{i}>": i for i in range(256, 50256)}, **{"<|endoftext|>": 50256})
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 1024, "n_layer": 24,
          "n_head": 16, "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.1,
          "eos_token_id": 50256}
    return save_random(folder, hf, {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n"})


def without_dropout(src, folder):
    """src's files linked into folder, its config.json rewritten with dropout 0."""
    os.makedirs(folder)
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(folder, name))
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**hf, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, f, indent=2)
    return folder


# -----------------------------------------------------------------------------
# the child runs

def plan(a, cuda, compiled, tmp, bert, glue):
    """name -> (argv, extra environment, the JSON file it writes), in the order they run: the probes and
    parity first, should the time budget run out."""
    B, steps = (16, "30") if cuda else (8, "3")
    common = ("--device", a.device, "--max_steps", steps, "--batch_size", str(B))
    lora = (bert, glue, "--method", "lora", "--dropout", "0", *common)
    runs = {}
    if compiled:  # 8 x 2 takes the same 16 examples a step as batch 16 (train batches are slices in order)
        runs["lora"] = lora
        runs["lora_compiled_8x2"] = (*lora, "--compile", "--batch_size", str(B // 2), "--grad_accum", "2")
        runs["dynamic_lora_compiled"] = (bert, glue, "--method", "dynamic_lora", *common, "--compile",
                                         "--n_cal", "2", "--importance_every", "2")
    if cuda:  # gpt2-medium, batch 1 x 512, LoRA r 64 (QLoRA's adapter), 3 steps: AdamW's state is in the peak
        gpt2 = random_gpt2_medium(os.path.join(tmp, "gpt2-medium"))
        long = write_mrpc(os.path.join(tmp, "long"), 4, lambda rng: "".join(rng.choices("abcdefgh ", k=600)))
        mem = (gpt2, long, "--method", "lora", "--rank", "64", "--alpha", "16", "--batch_size", "1",
               "--max_len", "512", "--max_steps", "3", "--eval_batch_size", "2", "--device", a.device)
        runs["memory_qlora_compiled"] = (*mem, "--quant", "nf4", "--compile")  # the nf4 probe too
    runs["tlora_plus"] = (bert, glue, "--method", "tlora_plus", *common)
    if compiled:
        runs["tlora_plus_compiled"] = (*runs["tlora_plus"], "--compile")
    if cuda:
        runs.update(memory_lora=mem, memory_qlora=(*mem, "--quant", "nf4"),
                    memory_lora_compiled=(*mem, "--compile"))
    jobs = {}
    for name, (model, data_dir, *flags) in runs.items():
        out = os.path.join(tmp, "runs", name)
        env = {"TORCHINDUCTOR_CUDAGRAPH_OR_ERROR": "1"} if name == "memory_qlora_compiled" else {}
        jobs[name] = (["train.py", "--task", "mrpc", "--model", model, "--data_dir", data_dir, "--epochs",
                       "1", "--log_every", "1", "--out_dir", out, "--overwrite", *flags], env,
                      os.path.join(out, "metrics.json"))
    speed = os.path.join(tmp, "speed.json")
    jobs["speed"] = (["bench.py", "speed", "--minilm", bert, "--data_dir", glue, "--device", a.device,
                      "--models", "", "--methods", "lora", "--batch", str(B), "--out", speed,
                      *(("--steps", "10", "--warmup", "3", "--compile") if compiled else
                        ("--steps", "2", "--warmup", "1"))],
                     {}, speed)
    order = ["lora", "lora_compiled_8x2", "dynamic_lora_compiled", "memory_qlora_compiled", "tlora_plus",
             "tlora_plus_compiled", "speed", "memory_lora", "memory_qlora", "memory_lora_compiled"]
    return {name: jobs[name] for name in order if name in jobs}


def run_all(jobs, parallel, deadline):
    """Start each job (all at once if parallel), wait, and read its log and JSON file. A job not started
    before the deadline is skipped; one still running at the deadline is killed with its children."""
    started, results = [], {}
    for name, (argv, env, out_file) in jobs.items():
        if time.time() > deadline - 20:
            results[name] = {"status": NO_TIME}
            continue
        log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, text=True,
                                cwd=HERE, start_new_session=True, env={
                                    **os.environ, "TORCH_LOGS": "recompiles,graph_breaks,cudagraphs", **env})
        started.append((name, proc, log, time.time(), out_file))
        if not parallel:
            results[name] = finish(*started.pop()[1:], deadline)
    results.update({name: finish(*rest, deadline) for name, *rest in started})
    return results


def finish(proc, log, t0, out_file, deadline):
    try:
        rc = proc.wait(timeout=max(20, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: bench.py's children go too
        rc = "killed at the time budget"
    log.seek(0)
    text = log.read()
    res = {"status": "ok" if rc == 0 else "failed", "seconds": round(time.time() - t0, 1),
           "graph_breaks": text.count("Graph break in user code"),
           "recompiles": text.count("Recompiling function"),
           "cudagraph_skips": text.count("skipping cudagraphs")}
    if rc != 0:
        res["tail"] = f"exit {rc}: " + "\n".join(text.strip().splitlines()[-15:])
    elif os.path.exists(out_file):
        with open(out_file) as f:
            res["metrics"] = json.load(f)
    return res


# -----------------------------------------------------------------------------
# the JSON

def entry(r, name):
    """A run's entry, without its metrics.json; NO_CUDA for a run this device does not make."""
    return {k: v for k, v in r[name].items() if k != "metrics"} if name in r else {"status": NO_CUDA}


def parity(r, eager, compiled):
    """Loss logs [[step, loss, lr], ...] of the two runs, step by step."""
    if not r.get(eager, {}).get("metrics") or not r.get(compiled, {}).get("metrics"):
        return next(entry(r, n) for n in (eager, compiled) if entry(r, n)["status"] != "ok")
    a, b = ({s: loss for s, loss, _ in r[n]["metrics"]["loss_log"]} for n in (eager, compiled))
    steps = sorted(set(a) & set(b))
    ok = steps and all(abs(a[s] - b[s]) <= ATOL + RTOL * abs(a[s]) for s in steps)
    return {"status": "ok" if ok else "differs", "max_abs_diff": max(abs(a[s] - b[s]) for s in steps),
            "steps": len(steps), "eager": [a[s] for s in steps], "compiled": [b[s] for s in steps]}


def report(r, a, cuda, seconds):
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "model": a.minilm or "random bert", "data": a.data_dir or "synthetic mrpc",
           "seconds": round(seconds), "run_seconds": {k: v.get("seconds") for k, v in r.items()},
           "tolerance": {"rtol": RTOL, "atol": ATOL},
           "probes": {"grad_accum_2": entry(r, "lora_compiled_8x2"),
                      "dynamic_lora": entry(r, "dynamic_lora_compiled"),
                      "nf4_cudagraph_or_error": entry(r, "memory_qlora_compiled")},
           "parity": {"lora": parity(r, "lora", "lora_compiled_8x2"),
                      "tlora_plus": parity(r, "tlora_plus", "tlora_plus_compiled")},
           "speed": entry(r, "speed"), "memory": {}}
    if "metrics" in r["speed"]:
        ms = {(row["impl"], row["method"], row["compile"]): row["step_ms"]
              for row in r["speed"]["metrics"]["rows"]}
        peft, ours = ms["peft", "lora", False], ms["ours", "lora", False]
        ours_c = ms.get(("ours", "lora", True))
        out["speed"] = {"status": "ok", "peft_ms": peft, "ours_ms": ours, "ratio": ours / peft,
                        **({"ours_compiled_ms": ours_c, "ratio_compiled": ours_c / peft} if ours_c else {})}
    for name in ("lora", "lora_compiled", "qlora", "qlora_compiled"):
        m = r.get("memory_" + name, {})
        out["memory"][name] = ({"status": "ok", "peak_mb": m["metrics"]["peak_memory_mb"]} if "metrics" in m
                               else entry(r, "memory_" + name))
    # TLoRA+'s compiled step where there is one: train.py's s_per_step leaves compile time out once its
    # metrics.json has compile_seconds
    name = next((n for n in ("tlora_plus_compiled", "tlora_plus") if "metrics" in r.get(n, {})), None)
    m = r[name]["metrics"] if name else {}
    out["projection"] = {"status": "failed"} if not name else {
        "status": "ok", "run": name, "s_per_step": m["s_per_step"],
        "seconds_30_epochs": MRPC_STEPS_30_EPOCHS * m["s_per_step"],
        "includes_compile": name != "tlora_plus" and "compile_seconds" not in m}
    if "ours_compiled_ms" in out["speed"]:  # bench.py's median after warm-up: no compile in it
        out["projection"]["seconds_30_epochs_lora_bench"] = \
            MRPC_STEPS_30_EPOCHS * out["speed"]["ours_compiled_ms"] / 1e3
    return out


def summary(res):
    def line(e):
        nums = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items()
                         if k not in ("status", "tail", "seconds", "eager", "compiled", "run"))
        tail = f" ({e['tail'].splitlines()[-1]})" if "tail" in e else ""
        return e["status"] + (f": {nums}" if nums else "") + tail
    lines = [f"gpu_check on {res['device']}, torch {res['torch']}, {res['seconds']} s"]
    for part in ("probes", "parity", "memory"):
        lines += [f"  {part} {name}: {line(e)}" for name, e in res[part].items()]
    return "\n".join(lines + [f"  speed: {line(res['speed'])}", f"  projection: {line(res['projection'])}"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minilm", default=None, help="MiniLM folder (default: a random BERT)")
    p.add_argument("--data_dir", default=None, help="GLUE folder with MRPC/ (default: a synthetic MRPC)")
    p.add_argument("--out", default="results/gpu_check.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget_s", type=float, default=450, help="start no run after this many seconds")
    p.add_argument("--compile_on_cpu", action="store_true",
                   help="on CPU, run the --compile parts too, one at a time (a cold compile takes minutes)")
    a = p.parse_args(argv)
    t0, cuda = time.time(), a.device.startswith("cuda")
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        bert = (without_dropout(a.minilm, os.path.join(tmp, "minilm")) if a.minilm else
                random_bert(os.path.join(tmp, "bert"), *((384, 6, 12) if cuda else (32, 2, 4))))
        glue = (trimmed_mrpc(a.data_dir, os.path.join(tmp, "glue")) if a.data_dir else write_mrpc(
            os.path.join(tmp, "glue"), 64 if cuda else 32, lambda rng: " ".join(rng.choices(WORDS, k=8))))
        compiled = cuda or a.compile_on_cpu
        r = run_all(plan(a, cuda, compiled, tmp, bert, glue), parallel=not compiled, deadline=t0 + a.budget_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = report(r, a, cuda, time.time() - t0)
    checkpoint.write_json(a.out, result)
    print(summary(result) + f"\nwrote {a.out}")
    return result


if __name__ == "__main__":
    main()
