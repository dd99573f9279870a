"""
A run's folder: every file written atomically (a temp file, then a rename), the check that --out_dir holds no
other run, and the checkpoint that --save_every writes and --resume reads back, bit for bit: the trained
tensors, AdamW, the schedule, every RNG, the loop's progress and the method's own state. Ctrl-C asks the loop
to save one and stop. A finished run's files, metrics.json last.
"""
import json
import os
import random
import shutil
import signal
import threading

import torch


def write_atomic(folder, files, size_mb=0.0):
    """files: {name: callable(path)}. Each is written to a temp name, then renamed. A failed write removes its
    temp file and raises one OSError line that names the folder and the free space
    (size_mb: what is needed)."""
    os.makedirs(folder, exist_ok=True)
    for name, write in files.items():
        tmp = os.path.join(folder, f".{name}.tmp")
        try:
            write(tmp)
        except BaseException as e:  # a full disk, a Ctrl-C: no temp file stays behind
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, Exception):  # safetensors' own errors are not OSErrors
                free = shutil.disk_usage(folder).free / 2**20
                raise OSError(f"could not write {name} to {folder} ({type(e).__name__}); {free:.1f} MB free "
                              f"there{f', about {size_mb:.1f} MB needed' if size_mb else ''}: "
                              f"free some space or pass another --out_dir") from None
            raise
        os.replace(tmp, os.path.join(folder, name))


CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("metrics.json", CHECKPOINT, "adapter_model.safetensors", "adapter_config.json",
             "trainable.safetensors", "predictions.jsonl")
RESUME_MAY_CHANGE = ("out_dir", "resume", "overwrite", "save_every", "log_every")  # not what it trains


def check_out_dir(args):
    """Before anything loads: the folder is writable and holds no other run unless --resume continues it or
    --overwrite replaces it (whose files go first, so none can pass for this run's)."""
    d = args.out_dir
    if not d and (args.resume or args.save_every):
        raise ValueError("--resume and --save_every need --out_dir (where the checkpoint lives)")
    if not d:
        return
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"--out_dir {d} is a file; pass a folder")
    os.makedirs(d, exist_ok=True)
    if not os.access(d, os.W_OK):
        raise ValueError(f"--out_dir {d} is not writable; pass a folder you can write to")
    used = [f for f in RUN_FILES if os.path.exists(os.path.join(d, f))]
    if args.resume:
        if "metrics.json" in used:
            raise ValueError(f"the run in {d} is complete (metrics.json); nothing to resume")
        if CHECKPOINT not in used:
            raise ValueError(f"{d} has no {CHECKPOINT} to resume from; drop --resume to start the run")
    elif used and not args.overwrite:
        raise ValueError(f"--out_dir {d} holds another run ({used[0]}); pass --overwrite to replace it, "
                         f"--resume to continue it, or another folder")
    else:
        for f in used:
            os.remove(os.path.join(d, f))


def write_file(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_text(path, text):
    write_atomic(os.path.dirname(path) or ".", {os.path.basename(path): lambda tmp: write_file(tmp, text)})


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_run(out_dir, result, predictions=None):
    """A finished run's files, after its adapter (peft_format.save): predictions.jsonl (a causal LM's answers,
    a JSON line per prompt), then metrics.json last, so that a folder with metrics.json holds a whole run."""
    if predictions:
        write_text(os.path.join(out_dir, "predictions.jsonl"),
                   "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    write_json(os.path.join(out_dir, "metrics.json"), result)
    if os.path.exists(os.path.join(out_dir, CHECKPOINT)):
        os.remove(os.path.join(out_dir, CHECKPOINT))


def trained_state(model):
    """The tensors training changes: the trainable parameters and the adapters' buffers (Dynamic LoRA's m)."""
    return {**{n: p for n, p in model.named_parameters() if p.requires_grad},
            **{n: b for n, b in model.named_buffers() if ".lora_" in n}}


def restore(model, tensors):
    """Copy saved tensors back into the model's trained tensors, in place."""
    trained = trained_state(model)
    with torch.no_grad():
        for n, t in tensors.items():
            trained[n].copy_(t)


def save(args, progress, model, method, opt, sched):
    """Everything to continue bit for bit: trained tensors, AdamW, the schedule, every RNG, the loop's
    progress and the method's own state."""
    state = {"args": vars(args), "progress": progress, "opt": opt.state_dict(), "sched": sched.state_dict(),
             "method": method.state_dict(),
             "tensors": {n: t.detach() for n, t in trained_state(model).items()},
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    write_atomic(args.out_dir, {CHECKPOINT: lambda path: torch.save(state, path)})


def load(args, model, method, opt, sched):
    """Back to a checkpoint's state, after refusing one that another command wrote. Returns the loop's
    progress."""
    path = os.path.join(args.out_dir, CHECKPOINT)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"args", "progress", "tensors", "rng"} <= set(state):
            raise TypeError("not a train.py checkpoint")
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); start again with "
                         f"--overwrite") from None
    saved, now = state["args"], vars(args)
    for k in sorted(set(saved) | set(now), key=lambda k: (k != "method", k)):  # the method first
        if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k):
            raise ValueError(f"{path} is a checkpoint of a run with --{k} {saved.get(k)}, not {now.get(k)}: "
                             f"resume with the flags it was started with, or --overwrite to start over")
    restore(model, state["tensors"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    method.load_state_dict(state["method"])
    rng = state["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    progress = state["progress"]
    progress["window"] = progress["window"].to(args.device)
    if progress["kept"] is not None:
        epoch, tensors = progress["kept"]
        progress["kept"] = (epoch, {n: t.to(args.device) for n, t in tensors.items()})
    return progress


def interrupt_flag():
    """Ctrl-C sets stop["now"]: the loop ends its step, saves a checkpoint and stops (twice: stops now)."""
    stop = {"now": False, "restore": lambda: None}

    def handler(signum, frame):
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        previous = signal.signal(signal.SIGINT, handler)
        stop["restore"] = lambda: signal.signal(signal.SIGINT, previous)
    return stop
