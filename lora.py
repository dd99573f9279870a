"""
LoRA (Hu et al. 2021) as PEFT implements it, with per-matrix learning rates (seed 000 read as LoRA+, SPEC §2.1),
and the small interface every nanoPEFT method follows (`Method`):

    wrap(model)            inject adapters, freeze everything else but the task head; returns the model
    param_groups(model)    optimizer groups: [{"params", "lr", "weight_decay"}, ...]
    extra_loss(model)      a term added to the task loss (None here)
    after_step(model, t)   called after the t-th optimizer step (nothing here)
    save(model, dir) / load(model, dir)   the trained tensors only

dynamic_lora.py, tlora_plus.py and adaq_lora.py subclass LoRALinear and LoRA and change only what their paper
changes. The baselines of SPEC §3 (full fine-tuning, head only, BitFit) sit at the end of this file.
"""
import json
import math
import os

import torch
import torch.nn as nn
from torch.nn import functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import hf_name

BLOCK_LINEARS = ("query", "key", "value", "c_attn", "out", "fc", "proj")  # "all-linear" (SPEC §1.2)


class LoRALinear(nn.Module):
    """Y = X W0ᵀ + b + s·((dropout(X) Aᵀ) Bᵀ), s = α/r (rsLoRA: α/√r)        (SPEC §1.3)
    `base` stays frozen and unchanged: an nn.Linear (out, in), GPT-2's Conv1D (in, out) or quant.Linear4bit."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0, rslora=False):
        super().__init__()
        self.base, self.r = base, r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = type(base).__name__ == "Conv1D"  # GPT-2 stores W0ᵀ
        weight = getattr(base, "weight", None)  # None for quant.Linear4bit: its tensors are uint8 codes + stats
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = (weight if weight is not None else next(base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: U(-1/√in, 1/√in); B = 0 so ΔW = 0
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the adapter path only
        self.merged = False

    def delta_weight(self):
        """ΔW = s·B·A, (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def adapter(self, x):
        """The adapter path, right to left so ΔW is never built: (N, in) -> (N, r) -> (N, out)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A) * self.scaling, self.lora_B)

    def forward(self, x):
        y = self.base(x)
        return y if self.merged else y + self.adapter(x)

    @torch.no_grad()
    def _add_to_base(self, sign):
        if not hasattr(self.base, "merge_delta"):  # plain float weight
            w = self.base.weight
            w += sign * (self.delta_weight().t() if self.fan_in_fan_out else self.delta_weight()).to(w.dtype)
        else:  # a quantized base decides how (quant.Linear4bit)
            self.base.merge_delta(sign * self.delta_weight())

    def merge(self):
        """W0 += ΔW (Conv1D: W0ᵀ += ΔWᵀ); forward then costs what the base alone costs."""
        if not self.merged:
            self._add_to_base(+1)
            self.merged = True

    def unmerge(self):
        if self.merged:
            self._add_to_base(-1)
            self.merged = False


# -----------------------------------------------------------------------------
# injecting adapters

def target_names(model, targets):
    """Qualified names of the block linears to adapt: targets is "all-linear" or a list such as ["query", "value"]."""
    wanted = BLOCK_LINEARS if targets == "all-linear" else tuple(targets)
    unknown = [t for t in wanted if t not in BLOCK_LINEARS]
    if unknown:
        raise SystemExit(f"error: unknown target {unknown[0]!r}; --targets takes layer names among "
                         f"{', '.join(BLOCK_LINEARS)}")
    names = [n for n, m in model.named_modules() if n.startswith("h.") and n.rsplit(".", 1)[-1] in wanted
             and hasattr(m, "in_features")]
    if not names:
        raise SystemExit(f"error: no layer of this {model.cfg.family} model is named {', '.join(wanted)}")
    return names


def inject(model, targets, make_layer):
    """Replace each target linear by make_layer(base). Returns {qualified name: adapter layer}."""
    layers = {}
    for name in target_names(model, targets):
        parent, _, attr = name.rpartition(".")
        layers[name] = make_layer(getattr(model.get_submodule(parent), attr))
        setattr(model.get_submodule(parent), attr, layers[name])
    return layers


def adapter_layers(model, cls=LoRALinear):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def freeze_all_but(model, trainable):
    """requires_grad only for parameters whose name passes trainable(name); the task head always trains."""
    for n, p in model.named_parameters():
        p.requires_grad = n.startswith("head.") or trainable(n)


def merge(model, float_only=False):
    """Fold every adapter into its base weight. float_only skips 4-bit bases (merging one keeps an fp32 copy)."""
    for layer in adapter_layers(model).values():
        if not (float_only and hasattr(layer.base, "merge_delta")):
            layer.merge()


def unmerge(model):
    for layer in adapter_layers(model).values():
        layer.unmerge()


def no_decay(name, p):
    """HF Trainer's rule (SPEC §1.4): biases and LayerNorm weights get no weight decay."""
    return p.ndim < 2


def head_groups(model, lr, wd):
    params = [(n, p) for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad]
    return [{"params": [p for n, p in params if not no_decay(n, p)], "lr": lr, "weight_decay": wd, "name": "head"},
            {"params": [p for n, p in params if no_decay(n, p)], "lr": lr, "weight_decay": 0.0, "name": "head_nd"}]


def peft_key(family, name):
    """Our tensor name -> its key in a peft adapter file: h.0.attn.query.lora_A ->
    base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight; the head keeps HF's name."""
    mod, _, leaf = name.rpartition(".")
    return "base_model.model." + (hf_name(family, mod) + f".{leaf}.weight" if leaf.startswith("lora_") else
                                  hf_name(family, name))


def saved_method(path, default):
    """The method a nanoPEFT safetensors file was written by (its metadata), else `default`."""
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("nanopeft_method", default)


def write_text(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)
    return write


def write_atomic(folder, files):
    """files: {name: callable(path)}; each is written to a temp name and renamed, so no half-written file remains."""
    os.makedirs(folder, exist_ok=True)
    for name, write in files.items():
        tmp = os.path.join(folder, f".{name}.tmp")
        write(tmp)
        os.replace(tmp, os.path.join(folder, name))


# -----------------------------------------------------------------------------
# the method interface, and the baselines of SPEC §3 that need no adapter

class Method:
    """Full fine-tuning (SPEC §3): every parameter trains. The base class of every method."""
    name, default_lr = "full", 2e-5

    def __init__(self, args):
        self.args = args
        self.lr = args.lr if args.lr is not None else self.default_lr

    def trains(self, name):  # which backbone parameters train
        return True

    def wrap(self, model):
        freeze_all_but(model, self.trains)
        return model

    def param_groups(self, model):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        wd = self.args.weight_decay
        groups = [{"params": [p for n, p in params if not no_decay(n, p)], "lr": self.lr, "weight_decay": wd,
                   "name": "backbone"},
                  {"params": [p for n, p in params if no_decay(n, p)], "lr": self.lr, "weight_decay": 0.0,
                   "name": "backbone_nd"}]
        head_lr = self.args.head_lr if self.args.head_lr is not None else self.lr
        return [g for g in groups + head_groups(model, head_lr, wd) if g["params"]]

    def label(self):
        """How a results table names this run; a method with variants adds them (tlora_plus: config and λ)."""
        return self.name

    def extra_loss(self, model):
        return None

    def after_step(self, model, step):
        pass

    def save(self, model, folder):
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        write_atomic(folder, {"trainable.safetensors": lambda p: save_file(tensors, p,
                                                                            metadata={"nanopeft_method": self.name})})

    def load(self, model, folder):
        path = os.path.join(folder, "trainable.safetensors")
        if not os.path.exists(path):
            raise SystemExit(f"error: {folder} holds no {self.name} checkpoint (trainable.safetensors); "
                             f"was it trained with another --method?")
        saved = saved_method(path, None)
        if saved != self.name:
            raise SystemExit(f"error: {path} was trained with --method {saved}; pass --method {saved} to load it")
        missing = set(load_file(path)) - set(dict(model.named_parameters()))
        if missing:
            raise SystemExit(f"error: {path} has tensors this model lacks (e.g. {sorted(missing)[0]}): another model?")
        model.load_state_dict(load_file(path), strict=False)


class HeadOnly(Method):
    """Feature extraction: the backbone is frozen, only the task head trains (SPEC §3)."""
    name, default_lr = "head", 1e-3

    def trains(self, name):
        return False


class BitFit(Method):
    """y = x W0ᵀ + b_trainable: every backbone bias trains, plus the head (SPEC §3)."""
    name, default_lr = "bitfit", 4e-4

    def trains(self, name):
        return name.endswith(".bias") and name.startswith("h.")


class LoRA(Method):
    """LoRA with per-matrix learning rates (seed 000 / LoRA+, SPEC §2.1): every A at lr, every B at lr·lr_ratio,
    the task head at head_lr. lr_ratio 1 is the seed's "remove adaptive learning rate" ablation."""
    name, default_lr = "lora", 1e-4

    def make_layer(self, base):
        a = self.args
        return LoRALinear(base, a.rank, a.alpha, a.dropout, a.rslora)

    def trains(self, name):
        return ".lora_" in name

    def wrap(self, model):
        for p in model.parameters():
            p.requires_grad = False
        inject(model, self.args.targets, self.make_layer)
        return super().wrap(model)

    def param_groups(self, model):
        a = self.args
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n.endswith("lora_A")], "lr": self.lr, "weight_decay":
                   a.weight_decay, "name": "A"},
                  {"params": [p for n, p in named if n.endswith("lora_B")], "lr": self.lr * a.lr_ratio, "weight_decay":
                   a.weight_decay, "name": "B"}]
        head_lr = a.head_lr if a.head_lr is not None else 4e-4  # SPEC §2.1: the head at a fixed 4e-4
        return [g for g in groups + head_groups(model, head_lr, a.weight_decay) if g["params"]]

    # ---- adapter files in peft's format: peft.PeftModel.from_pretrained loads them into transformers' model
    def adapter_tensors(self, model):
        """{our name: tensor} that save() writes and load() fills: the trained ones (a subclass may add buffers)."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def peft_config(self, model):
        a, family = self.args, model.cfg.family
        return {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": a.rank, "lora_alpha": a.alpha,
                "lora_dropout": a.dropout, "use_rslora": a.rslora, "fan_in_fan_out": family == "gpt2",
                "target_modules": sorted(hf_name(family, n) for n in adapter_layers(model)), "bias": "none",
                "modules_to_save": {"gpt2": ["score"], "roberta": ["classifier"], "bert": ["classifier", "pooler"]}[
                    family], "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": a.model}

    def save(self, model, folder):
        family = model.cfg.family
        tensors = {peft_key(family, n): p.detach().contiguous() for n, p in self.adapter_tensors(model).items()}
        cfg = json.dumps(self.peft_config(model), indent=2)
        meta = {"format": "pt", "nanopeft_method": self.name}  # peft's own files have no method: read as lora
        write_atomic(folder, {"adapter_model.safetensors": lambda p: save_file(tensors, p, metadata=meta),
                              "adapter_config.json": write_text(cfg)})

    def load(self, model, folder):
        path = os.path.join(folder, "adapter_config.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: {folder} has no adapter_config.json; was it trained with another --method?")
        with open(path) as f:
            cfg = json.load(f)
        saved = saved_method(os.path.join(folder, "adapter_model.safetensors"), str(cfg.get("peft_type")).lower())
        if saved != self.name:
            raise SystemExit(f"error: {folder} holds a {saved} adapter; pass --method {saved} to load it")
        params = self.adapter_tensors(model)
        ours = {peft_key(model.cfg.family, n): n for n in params}
        for key, t in load_file(os.path.join(folder, "adapter_model.safetensors")).items():
            name = ours.get(key)
            if name is None:
                raise SystemExit(f"error: adapter tensor {key} matches no layer of this model; wrong --model?")
            if params[name].shape != t.shape:
                raise SystemExit(f"error: adapter tensor {key} is {tuple(t.shape)} but this model's is "
                                 f"{tuple(params[name].shape)}: pass the --rank it was trained with ({cfg.get('r')})")
            with torch.no_grad():
                params[name].copy_(t)
