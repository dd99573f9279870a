"""
The interface every nanoPEFT method follows (`Method`), then LoRA (Hu et al. 2021) as peft implements it, with
per-matrix learning rates (seed 000 read as LoRA+, SPEC §2.1), then LoRA's adapter files in peft's format.

A method is built from its own small dataclass config, never from train.py's flags: LoRA(LoRAConfig(r=8)).
The whole interface, all that train.py (finetune.py) calls, in the order a run calls it:

    quant                                "none" or "nf4": how the frozen base is stored unless --quant says
                                         (a class attribute, read before wrap)
    wrap(model, batches=None) -> model   inject adapters, freeze all but them and the task head; `batches`
                                         (training batches) is for a method that calibrates on data before
                                         its adapters exist (Dynamic LoRA), the others ignore it
    trains(name) -> bool                 which backbone tensors train (the task head always does)
    param_groups(model)                  [{"params", "lr", "weight_decay", "name"}, ...] for AdamW
    schedule(total_steps, warmup_steps)  the run's length, once before training
    extra_loss(model) -> tensor or None  added to the task loss
    after_step(model, step)              after the step-th optimizer step, before zero_grad (so the step's
                                         gradients are still there)
    merge(model) / unmerge(model)        fold the adapters into the base weights for evaluation, and back
    save(model, folder) / load(model, folder)   the trained tensors only
    label() -> str, report(model) -> dict       the row name in eval.py's tables; extra facts for metrics.json
    state_dict() / load_state_dict(state)       the method's own training state, for checkpoints and --resume

Merging goes through an adapter-layer protocol: every module with merge() and unmerge() (LoRALinear and its
subclasses) is merged; a layer that cannot merge (a bottleneck adapter) simply has none. Errors are exceptions
(ValueError, FileNotFoundError) with a one-line message; only the scripts exit.

dynamic_lora.py, tlora_plus.py and adaq_lora.py subclass LoRALinear and LoRA and change only what their paper
changes. The baselines of SPEC §3 (full fine-tuning, head only, BitFit, the Houlsby adapter) are in
baselines.py.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import hf_name

BLOCK_LINEARS = ("query", "key", "value", "c_attn", "out", "fc", "proj")  # "all-linear" (SPEC §1.2)


# -----------------------------------------------------------------------------
# the interface

@dataclass
class MethodConfig:
    lr: float = 2e-5            # learning rate of the trained backbone tensors
                                # (SPEC §3: full fine-tuning 2e-5)
    head_lr: float = None       # the task head's learning rate; None: lr
    weight_decay: float = 0.1   # AdamW's, on every tensor with two or more dimensions (SPEC §1.4)


def no_decay(p):
    """HF Trainer's rule (SPEC §1.4): biases and LayerNorm weights (fewer than two dimensions) get no
    weight decay."""
    return p.ndim < 2


def groups_for(name, params, lr, wd):
    """Two AdamW groups for `params`: `name` with weight decay and `name`_nd (biases, norms) without."""
    return [{"params": [p for p in params if not no_decay(p)], "lr": lr, "weight_decay": wd, "name": name},
            {"params": [p for p in params if no_decay(p)], "lr": lr, "weight_decay": 0.0,
             "name": name + "_nd"}]


def mergeable_layers(model):
    """The adapter-layer protocol: every module that can fold itself into its base weight."""
    return {n: m for n, m in model.named_modules() if callable(getattr(m, "merge", None))
            and callable(getattr(m, "unmerge", None))}


class Method:
    """What every method shares. The task head always trains; `trains(name)` says which backbone
    tensors do."""
    name = "method"
    Config = MethodConfig
    quant = "none"  # how the frozen base is stored unless --quant says otherwise (adaq_lora: "nf4")

    def __init__(self, cfg=None):
        self.cfg = cfg if cfg is not None else self.Config()

    def trains(self, name):
        return False

    def wrap(self, model, batches=None):
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("head.") or self.trains(n)
        return model

    def head_lr(self):
        return self.cfg.head_lr if self.cfg.head_lr is not None else self.cfg.lr

    def param_groups(self, model):
        backbone = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
        groups = groups_for("backbone", backbone, self.cfg.lr, self.cfg.weight_decay)
        groups += groups_for("head", head, self.head_lr(), self.cfg.weight_decay)
        return [g for g in groups if g["params"]]

    def label(self):
        """How a results table names this run; a method with variants adds them (tlora_plus: config and λ)."""
        return self.name

    def report(self, model):
        return {}

    def schedule(self, total_steps, warmup_steps):
        pass

    def extra_loss(self, model):
        return None

    def after_step(self, model, step):
        pass

    def state_dict(self):
        """The method's training state beyond the model's tensors (AdaLoRA's allocator, Dynamic LoRA's
        importance EMAs), for a checkpoint; load_state_dict puts it back on --resume."""
        return {}

    def load_state_dict(self, state):
        pass

    def merge(self, model, float_only=False):
        """Fold every adapter into its base weight. float_only skips 4-bit bases (merging one keeps an
        fp32 copy)."""
        for layer in mergeable_layers(model).values():
            if not (float_only and hasattr(getattr(layer, "base", None), "merge_delta")):
                layer.merge()

    def unmerge(self, model):
        for layer in mergeable_layers(model).values():
            layer.unmerge()

    def save(self, model, folder):
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        meta = {"nanopeft_method": self.name}
        write_atomic(folder, {"trainable.safetensors": lambda path: save_file(tensors, path, metadata=meta)})

    def load(self, model, folder):
        path = os.path.join(folder, "trainable.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} holds no {self.name} checkpoint (trainable.safetensors); "
                                    f"was it trained with another --method?")
        saved = saved_method(path, None)
        if saved != self.name:
            raise ValueError(f"{path} was trained with --method {saved}; pass --method {saved} to load it")
        tensors = load_file(path)
        params = dict(model.named_parameters())
        missing = sorted(set(tensors) - set(params))
        if missing:
            raise ValueError(f"{path} has tensors this model lacks (e.g. {missing[0]}): another model?")
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{path}: {n} is {tuple(t.shape)} but this model's is "
                                 f"{tuple(params[n].shape)}")
        model.load_state_dict(tensors, strict=False)


def saved_method(path, default):
    """The method a nanoPEFT safetensors file was written by (its metadata), else `default`."""
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("nanopeft_method", default)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}); "
                         f"re-save it") from None


def write_atomic(folder, files):
    """files: {name: callable(path)}; each is written to a temp name and renamed, so no half-written
    file remains."""
    os.makedirs(folder, exist_ok=True)
    for name, write in files.items():
        tmp = os.path.join(folder, f".{name}.tmp")
        try:
            write(tmp)
        except BaseException:  # a full disk, a Ctrl-C: leave no temp file behind
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, os.path.join(folder, name))


def write_text(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)
    return write


# -----------------------------------------------------------------------------
# the LoRA layer

class LoRALinear(nn.Module):
    """Y = X W0ᵀ + b + s·((dropout(X) Aᵀ) Bᵀ), s = α/r (rsLoRA: α/√r)        (SPEC §1.3)
    `base` stays frozen and unchanged: an nn.Linear (out, in), GPT-2's Conv1D (in, out) or quant.Linear4bit.
    The factors are made by create_factors(), the one method a subclass overrides to change them."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0, rslora=False):
        super().__init__()
        if not 1 <= r <= min(base.in_features, base.out_features):
            raise ValueError(f"rank {r} does not fit a {base.out_features}x{base.in_features} layer: "
                             f"pass a rank between 1 and {min(base.in_features, base.out_features)}")
        self.base, self.r = base, r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = type(base).__name__ == "Conv1D"  # GPT-2 stores W0ᵀ
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the adapter path only
        self.merged = False
        # None for quant.Linear4bit: its tensors are uint8 codes + stats
        weight = getattr(base, "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = (weight if weight is not None else next(base.buffers())).device
        self.create_factors(dtype, device)

    def create_factors(self, dtype, device):
        """lora_A (r, in) ~ U(-1/√in, 1/√in), peft's kaiming_uniform_(a=√5);
        lora_B (out, r) = 0, so ΔW = 0."""
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features,
                                               dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r,
                                               dtype=dtype, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def gain(self):
        """The factor in front of B·A: s here; a subclass may scale it (Dynamic LoRA's m_l·s_l,
        TLoRA's s·g)."""
        return self.scaling

    def delta_weight(self):
        """ΔW = s·B·A, (out, in)."""
        return self.gain() * (self.lora_B @ self.lora_A)

    def adapter(self, x):
        """The adapter path, right to left so ΔW is never built: (N, in) -> (N, r) -> (N, out)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A) * self.gain(), self.lora_B)

    def forward(self, x):
        y = self.base(x)  # the frozen path sees x itself: dropout is the adapter's only (SPEC §1.1)
        return y if self.merged else y + self.adapter(x)

    @torch.no_grad()
    def merge(self):
        """W0 += ΔW (Conv1D: W0ᵀ += ΔWᵀ); forward then costs what the base alone costs. A float W0 is kept
        aside until unmerge: (W0 + ΔW) − ΔW differs from W0 in the last bits, and a run that evaluates on
        merged weights every epoch must train on the same W0 as a run resumed from a checkpoint."""
        if self.merged:
            return
        if hasattr(self.base, "merge_delta"):  # a quantized base decides how (quant.Linear4bit)
            self.base.merge_delta(self.delta_weight())
        else:
            w = self.base.weight
            self.w0 = w.detach().clone()
            w += (self.delta_weight().t() if self.fan_in_fan_out else self.delta_weight()).to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if hasattr(self.base, "merge_delta"):
            self.base.merge_delta(-self.delta_weight())
        else:
            self.base.weight.copy_(self.w0)  # exactly W0
            del self.w0
        self.merged = False


# -----------------------------------------------------------------------------
# injecting adapters

def target_names(model, targets):
    """Qualified names of the block linears to adapt: targets is "all-linear" or a list such as
    ["query", "value"]."""
    wanted = BLOCK_LINEARS if targets == "all-linear" else tuple(targets)
    unknown = [t for t in wanted if t not in BLOCK_LINEARS]
    if unknown:
        raise ValueError(f"unknown target {unknown[0]!r}; --targets takes layer names among "
                         f"{', '.join(BLOCK_LINEARS)}")
    names = [n for n, m in model.named_modules() if n.startswith("h.") and n.rsplit(".", 1)[-1] in wanted
             and hasattr(m, "in_features")]
    if not names:
        raise ValueError(f"no layer of this {model.cfg.family} model is named {', '.join(wanted)}")
    return names


def inject(model, targets, make_layer):
    """Replace each target linear by make_layer(base, name). Returns {qualified name: adapter layer}."""
    layers = {}
    for name in target_names(model, targets):
        parent, _, attr = name.rpartition(".")
        layers[name] = make_layer(getattr(model.get_submodule(parent), attr), name)
        setattr(model.get_submodule(parent), attr, layers[name])
    return layers


def adapter_layers(model, cls=LoRALinear):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


# -----------------------------------------------------------------------------
# the method

@dataclass
class LoRAConfig(MethodConfig):
    r: int = 8                    # adapter rank
    alpha: float = 16             # scale s = alpha / r
    dropout: float = 0.1          # on the adapter's input only (SPEC §1.1)
    rslora: bool = False          # s = alpha / √r
    targets: object = "all-linear"  # "all-linear" or a list of BLOCK_LINEARS names
    lr: float = 4e-4              # every A ([loralib]'s MRPC rate)
    lr_ratio: float = 1.0         # every B at lr·lr_ratio: 1 is plain LoRA (peft, loralib); seed 000 / LoRA+
                                  # tunes it (its untuned default: --lr 1e-4 --lr_ratio 16)
    head_lr: float = 4e-4         # SPEC §2.1: the head at a fixed 4e-4

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout {self.dropout} is not in [0, 1)")


class LoRA(Method):
    """LoRA, plain by default (A and B at lr), with seed 000's per-matrix learning rates one field away
    (SPEC §2.1, LoRA+): every B at lr·lr_ratio. The task head learns at head_lr."""
    name = "lora"
    Config = LoRAConfig

    def make_layer(self, base, name):
        c = self.cfg
        return LoRALinear(base, c.r, c.alpha, c.dropout, c.rslora)

    def trains(self, name):
        return ".lora_" in name

    def wrap(self, model, batches=None):
        for p in model.parameters():
            p.requires_grad = False
        inject(model, self.cfg.targets, self.make_layer)
        return super().wrap(model)

    def lr_multipliers(self):
        """η_X / η for each factor lora_X."""
        return {"A": 1.0, "B": self.cfg.lr_ratio}

    def param_groups(self, model):
        c = self.cfg
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = []
        for x, m in self.lr_multipliers().items():
            ps = [p for n, p in named if n.endswith(".lora_" + x)]  # a factor's group: all matrices or all
            groups.append({"params": ps, "lr": c.lr * m, "name": x,  # scalars (TLoRA's g: no decay)
                           "weight_decay": 0.0 if all(no_decay(p) for p in ps) else c.weight_decay})
        head = [p for n, p in named if n.startswith("head.")]
        return [g for g in groups + groups_for("head", head, self.head_lr(), c.weight_decay) if g["params"]]

    # ---- adapter files in peft's format: peft.PeftModel.from_pretrained loads them into transformers' model
    def adapter_tensors(self, model):
        """{our name: tensor} that save() writes and load() fills: the trained ones (a subclass may add
        buffers)."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def peft_config(self, model):
        c, family = self.cfg, model.cfg.family
        return {"peft_type": "LORA", **peft_task(model), "r": c.r, "lora_alpha": c.alpha,
                "lora_dropout": c.dropout, "use_rslora": c.rslora, "fan_in_fan_out": family == "gpt2",
                "target_modules": sorted(hf_name(family, n) for n in adapter_layers(model)), "bias": "none",
                "init_lora_weights": True, "inference_mode": True,
                "base_model_name_or_path": getattr(model, "name_or_path", "")}

    def file_tensors(self, model):
        """{key in the adapter file: tensor}: peft's keys for the adapter tensors (AdaLoRA: kept ones)."""
        return {peft_key(model.cfg.family, n): p.detach().contiguous()
                for n, p in self.adapter_tensors(model).items()}

    def save(self, model, folder):
        tensors = self.file_tensors(model)
        cfg = json.dumps(self.peft_config(model), indent=2)
        # peft's own files have no method: read as lora
        meta = {"format": "pt", "nanopeft_method": self.name}
        write_atomic(folder,
                     {"adapter_model.safetensors": lambda path: save_file(tensors, path, metadata=meta),
                      "adapter_config.json": write_text(cfg)})

    def load(self, model, folder):
        cfg = read_adapter_config(folder)
        path = os.path.join(folder, "adapter_model.safetensors")
        saved = saved_method(path, str(cfg.get("peft_type")).lower())
        if saved != self.name:
            raise ValueError(f"{folder} holds a {saved} adapter; pass --method {saved} to load it")
        params = self.adapter_tensors(model)
        ours = {peft_key(model.cfg.family, n): n for n in params}
        tensors = load_file(path)
        for key, t in tensors.items():
            name = ours.get(key)
            if name is None:
                raise ValueError(f"adapter tensor {key} matches no layer of this model; wrong --model?")
            if params[name].shape != t.shape:
                raise ValueError(f"adapter tensor {key} is {tuple(t.shape)} but this model's is "
                                 f"{tuple(params[name].shape)}: pass the --rank it was trained with "
                                 f"({cfg.get('r')})")
        absent = sorted(k for k in ours if k not in tensors)
        if absent:
            raise ValueError(f"{path} lacks {absent[0]} ({len(absent)} tensors missing): "
                             f"a partial adapter file?")
        with torch.no_grad():
            for key, t in tensors.items():
                params[ours[key]].copy_(t)


# -----------------------------------------------------------------------------
# peft's file format

MODULES_TO_SAVE = {"gpt2": ["score"], "roberta": ["classifier"], "bert": ["classifier", "pooler"]}


def peft_task(model):
    """peft's task_type and the trained head it saves whole: a classifier, or none for a causal LM."""
    if model.head is None:
        return {"task_type": "CAUSAL_LM", "modules_to_save": None}
    return {"task_type": "SEQ_CLS", "modules_to_save": MODULES_TO_SAVE[model.cfg.family]}


def peft_key(family, name):
    """Our tensor name -> its key in a peft adapter file: h.0.attn.query.lora_A ->
    base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight; the head keeps HF's name."""
    mod, _, leaf = name.rpartition(".")
    if leaf.startswith("lora_"):
        return f"base_model.model.{hf_name(family, mod)}.{leaf}.weight"
    return "base_model.model." + hf_name(family, name)


def read_adapter_config(folder):
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no adapter_config.json; was it trained with another --method?")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); "
                         f"re-save the adapter") from None
