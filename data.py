"""
The eight GLUE tasks: read from the hub through `datasets`, or from a folder in the official GLUE TSV layout
(--data_dir, as written by GLUE's download_glue_data.py), tokenized once, then batched with dynamic padding
(their metrics are metrics.py's). Labels follow the HF `glue` configs (e.g. RTE/QNLI: entailment = 0). The
GLUE dev split is the reported "test".
Two causal-LM tasks train a GPT-2 on prompt -> response text and are scored on generated answers
(metrics.py's ROUGE/BLEU, as the ADAQ-LoRA paper scores instruction tuning): alpaca (instruction/input/output)
and gsm8k (question/answer). Last, a run's examples and batches from train.py's flags: a seeded subset, the
held-out slice, each epoch's order drawn from (seed, epoch), and torchrun's shard of a batch.
"""
import json
import os
import random
from dataclasses import dataclass

import torch


@dataclass
class Task:
    name: str           # HF glue config name
    folder: str         # GLUE TSV folder
    text: tuple         # HF column names of the one or two sentences
    tsv_text: tuple     # TSV column names (CoLA, headerless: column indices)
    tsv_label: object   # TSV label column
    labels: tuple       # TSV label strings in HF label order; () = regression
    dev: str = "dev.tsv"
    max_len: int = 128  # tokens per example (RTE and QNLI: 256)

    @property
    def num_labels(self):
        return len(self.labels) or 1


TASKS = {
    "cola": Task("cola", "CoLA", ("sentence",), (3,), 1, ("0", "1")),
    "sst2": Task("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("0", "1")),
    "mrpc": Task("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                 ("0", "1")),
    "stsb": Task("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", ()),
    "qqp": Task("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                ("0", "1")),
    "mnli": Task("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                 ("entailment", "neutral", "contradiction"), dev="dev_matched.tsv"),
    "qnli": Task("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                 ("entailment", "not_entailment"), max_len=256),
    "rte": Task("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                ("entailment", "not_entailment"), max_len=256),
}


@dataclass
class GenTask:
    """A prompt -> response task for a causal LM: the loss covers the response tokens only, and evaluation
    generates on the held-out split."""
    name: str
    fields: tuple       # JSON keys of the instruction, the input (None: none) and the response
    hub: tuple          # datasets.load_dataset(*hub)
    test_file: str      # the evaluation split in --data_dir; "": a seeded 80/20 split of the one file
    max_len: int = 512  # prompt + response tokens in training
    num_labels = 0      # no task head: GPT-2's tied LM head scores the tokens
    labels = ()


GEN_TASKS = {
    "alpaca": GenTask("alpaca", ("instruction", "input", "output"), ("tatsu-lab/alpaca",), ""),
    "gsm8k": GenTask("gsm8k", ("question", None, "answer"), ("gsm8k", "main"), "test.jsonl"),
}


def get_task(name):
    if name not in TASKS and name not in GEN_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join([*TASKS, *GEN_TASKS])}")
    return TASKS.get(name) or GEN_TASKS[name]


def read_tsv(task, path):
    """-> list of (texts, label) from one GLUE TSV file (no quoting: GLUE text holds stray quotes)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; --data_dir must hold {task.folder}/train.tsv and "
                         f"{task.folder}/{task.dev} in the GLUE layout")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a TSV file; --data_dir must hold the GLUE layout")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")  # MRPC's header starts with a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8; re-save the file as UTF-8") from None
    lines = [(n, line.split("\t")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if isinstance(task.tsv_label, int):  # CoLA: no header
        cols, label_col, numbered = task.tsv_text, task.tsv_label, lines
    else:
        if not lines:
            raise ValueError(f"{path} is empty; expected a header and examples")
        header, numbered = lines[0][1], lines[1:]
        missing = [c for c in task.tsv_text + (task.tsv_label,) if c not in header]
        if missing:
            raise ValueError(f"{path} has no column {missing[0]!r} (header: {', '.join(header)})")
        cols, label_col = [header.index(c) for c in task.tsv_text], header.index(task.tsv_label)
    if not numbered:
        raise ValueError(f"{path} has no examples; expected GLUE's {task.folder} rows")
    need = max(*cols, label_col) + 1
    out = []
    for n, row in numbered:
        if len(row) < need:
            raise ValueError(f"{path} line {n} has {len(row)} tab-separated fields, "
                             f"{task.folder} needs {need}")
        value = row[label_col]
        if task.labels:
            if value not in task.labels:
                raise ValueError(f"{path} line {n}: label {value!r} is not one of {task.labels}")
            label = task.labels.index(value)
        else:
            try:
                label = float(value)
            except ValueError:
                raise ValueError(f"{path} line {n}: score {value!r} is not a number") from None
        out.append((tuple(row[c] for c in cols), label))
    return out


def read_hub(task, split):
    """The HF `glue` dataset; offline, one clear line."""
    import datasets
    try:
        ds = datasets.load_dataset("glue", task.name, split=split)
    except Exception as e:
        raise ConnectionError(f"cannot load GLUE {task.name!r} from the hub ({type(e).__name__}); offline, "
                         "pass --data_dir DIR holding the GLUE TSVs (e.g. ../shared/data/glue)") from None
    return [(tuple(ex[c] for c in task.text), ex["label"]) for ex in ds]


def load_split(task, split, data_dir=None):
    """split: "train" or "dev". A GLUE task: (texts, label) rows; a causal-LM task: (prompt, response)."""
    if isinstance(task, GenTask):
        return load_gen_split(task, split, data_dir)
    if data_dir:
        return read_tsv(task, os.path.join(data_dir, task.folder,
                                           "train.tsv" if split == "train" else task.dev))
    hub = "train" if split == "train" else ("validation_matched" if task.name == "mnli" else "validation")
    return read_hub(task, hub)


def subset(rows, n, seed=None):
    """The first n rows, or (seed given) n rows drawn by random.Random(seed), kept in file order."""
    if seed is None or n >= len(rows):
        return rows[:n]
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def holdout_split(rows, fraction=0.1, seed=0):
    """(train rows, held-out rows): a seeded `fraction` of train that never trains, to choose an epoch or a
    learning rate without looking at the reported dev split (by default 10% of train, seed 0)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(fraction * len(rows)))])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# -----------------------------------------------------------------------------
# causal-LM tasks (instruction tuning, as the ADAQ-LoRA paper's Alpaca_zh and School_math)

def read_records(task, path):
    """-> list of (prompt, response) from a JSON list or a JSONL file of task.fields records; prompt =
    instruction + "\n" + input (when there is one)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; --data_dir must be {task.name}'s JSON/JSONL file or the "
                                f"folder holding it")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path} is empty; expected {task.name} records with the fields "
                         f"{', '.join(k for k in task.fields if k)}")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON or JSONL ({e.msg}); one record per line, or one list") from None
    instruction, extra, output = task.fields
    rows = []
    for n, r in enumerate(records, 1):
        missing = [k for k in (instruction, output) if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{path} record {n} has no {missing[0]!r} field; {task.name} records need "
                             f"{instruction!r} and {output!r}")
        if not str(r[output]).strip():
            raise ValueError(f"{path} record {n} has an empty {output!r}: nothing to learn; drop the record")
        prompt = r[instruction] + (f"\n{r[extra]}" if extra and r.get(extra) else "")
        rows.append((prompt, r[output]))
    return rows


def gen_files(task, data_dir):
    """--data_dir: the task's file itself, or a folder holding train.jsonl (and the test file), or one
    JSON/JSONL file."""
    if os.path.isfile(data_dir):
        return [data_dir]
    if task.test_file:
        return [os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, task.test_file)]
    found = sorted(f for f in os.listdir(data_dir) if f.endswith((".json", ".jsonl"))) \
        if os.path.isdir(data_dir) else []
    if len(found) != 1:
        raise FileNotFoundError(f"--data_dir {data_dir} must be a {task.name} JSON/JSONL file or a folder "
                                f"with exactly one (found {len(found)})")
    return [os.path.join(data_dir, found[0])]


def load_gen_split(task, split, data_dir=None, seed=42, test_fraction=0.2):
    """The task's train or evaluation ("dev") rows. A task without a test split (alpaca) is split 80/20 with
    a seeded shuffle (seed 42)."""
    if data_dir:
        files = gen_files(task, data_dir)
        if len(files) == 2:  # gsm8k: its own test split
            return read_records(task, files[0 if split == "train" else 1])
        rows = read_records(task, files[0])
    else:
        import datasets
        try:
            ds = datasets.load_dataset(*task.hub, split="test" if split == "dev" and task.test_file
                                       else "train")
        except Exception as e:
            raise ConnectionError(f"cannot load {task.hub[0]!r} from the hub ({type(e).__name__}); offline, "
                                  f"pass --data_dir with the task's JSON/JSONL files") from None
        instruction, extra, output = task.fields
        rows = [(r[instruction] + (f"\n{r[extra]}" if extra and r[extra] else ""), r[output]) for r in ds]
        if task.test_file:
            return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(rows)))
    keep = sorted(order[:n_test]) if split == "dev" else sorted(order[n_test:])
    return [rows[i] for i in keep]


def encode_lm(tok, rows, max_len, train=True, chat=False):
    """Causal-LM examples: input_ids = prompt "\n" response EOS, with label -100 on the prompt (the loss
    covers the response); chat=True renders the prompt through the tokenizer's chat template instead (a user
    turn, then the assistant's header), and EOS is the template's end of turn. train=False keeps the prompt
    alone, and the reference text. A response cut to fit max_len loses its end (and EOS); returns (examples,
    how many were cut). A prompt that leaves no room for a response is refused."""
    out, cut, long = [], 0, []
    for prompt, response in rows:
        p = tok.encode_chat(prompt) if chat else tok.tokenize(prompt + "\n")
        if len(p) >= max_len:
            long.append(len(p))
            continue
        r = (tok.tokenize(response) + [tok.eos]) if train else []
        if len(p) + len(r) > max_len:
            r, cut = r[:max_len - len(p)], cut + 1
        ids = p + r
        out.append(dict(input_ids=ids, token_type_ids=[0] * len(ids), label=[-100] * len(p) + r,
                        prompt=prompt, reference=response))
    if long:
        raise ValueError(f"{len(long)} of {len(rows)} prompts have {max(long)} tokens or more, leaving no "
                         f"room under --max_len {max_len}; pass --max_len {max(long) + 1} or more")
    return out, cut


def prompt_batches(examples, batch_size, pad_id):
    """Length-sorted batches of prompts, padded on the left (generation appends on the right), with each
    batch's original indices."""
    order = sorted(range(len(examples)), key=lambda j: len(examples[j]["input_ids"]))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        T = max(len(examples[j]["input_ids"]) for j in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for row, j in enumerate(idx):
            n = len(examples[j]["input_ids"])
            ids[row, T - n:], mask[row, T - n:] = torch.tensor(examples[j]["input_ids"]), 1
        yield idx, dict(input_ids=ids, attention_mask=mask)


def encode(tok, rows, max_len):
    """-> list of dicts {input_ids, token_type_ids, label}."""
    return [dict(zip(("input_ids", "token_type_ids"), tok.encode(*texts, max_len=max_len)), label=label)
            for texts, label in rows]


def collate(examples, pad_id, regression=False, multiple=1):
    """Pad to the longest example of the batch (dynamic padding), rounded up to a multiple of `multiple` so
    that a compiled step sees a handful of shapes (length bucketing); the attention mask hides the extra
    padding."""
    T = -(-max(len(e["input_ids"]) for e in examples) // multiple) * multiple
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    types = torch.zeros((len(examples), T), dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], types[i, :n], mask[i, :n] = (torch.tensor(e["input_ids"]),
                                                 torch.tensor(e["token_type_ids"]), 1)
    if isinstance(examples[0]["label"], list):  # a causal LM's per-token labels, -100 where no loss
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e["label"])] = torch.tensor(e["label"])
    else:
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.float if regression else torch.long)
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels)


def train_batches(examples, batch_size, pad_id, regression, rng, multiple=1):
    """One epoch of shuffled batches (rng: a random.Random, so every epoch's order is seeded)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i:i + batch_size]], pad_id, regression, multiple)


def eval_batches(examples, batch_size, pad_id, regression, multiple=1):
    """Length-sorted batches (little padding) with each batch's original indices, to restore the order."""
    order = sorted(range(len(examples)), key=lambda j: len(examples[j]["input_ids"]))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield idx, collate([examples[j] for j in idx], pad_id, regression, multiple)


# -----------------------------------------------------------------------------
# a run's examples and batches, from train.py's flags (args)

def to_device(batch, device):
    """Pinned host memory and an asynchronous copy on CUDA; as is on CPU."""
    cuda = device.startswith("cuda")
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) for k, v in batch.items()}


def load_examples(task, split, args, tok):
    """split: "dev", "train", or "holdout" (--select holdout: a seeded 10% of train that never trains)."""
    rows = load_split(task, "dev" if split == "dev" else "train", args.data_dir)
    if split != "dev" and args.max_train_samples:
        rows = subset(rows, args.max_train_samples, args.subset_seed)
    if split != "dev" and args.select == "holdout":
        train, held = holdout_split(rows)
        rows = held if split == "holdout" else train
    if task.num_labels:
        return encode(tok, rows, args.max_len or task.max_len)
    if split != "train" and args.eval_samples:
        rows = subset(rows, args.eval_samples, args.subset_seed)
    max_len = args.max_len or task.max_len
    chat = not args.no_chat_template and getattr(tok, "chat_template", None) is not None
    examples, cut = encode_lm(tok, rows, max_len, train=split == "train", chat=chat)
    if cut:
        print(f"{cut} of {len(rows)} {split} responses were cut to fit --max_len {max_len}")
    return examples


def epoch_batches(examples, epoch, args, tok, world=1):
    """One epoch of shuffled batches of B·world, in an order drawn from (seed, epoch) alone."""
    rng = random.Random(args.seed + (epoch << 32))  # epoch 0: random.Random(seed)
    B, regression = args.batch_size * world, get_task(args.task).num_labels == 1
    return train_batches(examples, B, tok.pad_id, regression, rng, args.pad_multiple)


def shard(batch, rank, world):
    """This rank's rows of a global batch: rows rank·B … (rank+1)·B of B·world. A short last batch is split as
    evenly as it goes; a rank left with no row gets the last one again."""
    n = len(batch["labels"])
    bounds = [round(i * n / world) for i in range(world + 1)]
    rows = slice(bounds[rank], bounds[rank + 1]) if bounds[rank + 1] > bounds[rank] else slice(n - 1, n)
    return {k: v[rows] for k, v in batch.items()}


def calibration(task, args, tok):
    """The first epoch's batches as the forward's arguments (no labels), tokenized only if a method reads
    them (Dynamic LoRA)."""
    for b in epoch_batches(load_examples(task, "train", args, tok), 0, args, tok):
        yield {k: v for k, v in b.items() if k != "labels"}
