"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685, §4.1) as peft
implements it, with one learning rate per factor (LoRA+, Hayou et al. 2024, arXiv 2402.12354, §3).

    Y = X W0ᵀ + b + s·((dropout(X) Aᵀ) Bᵀ)      A (r, in), B (out, r), s = α/r (rsLoRA: α/√r)
    η_A = η,  η_B = λ·η                        λ = lr_ratio; λ = 1 is plain LoRA

It works on any PyTorch model; targets are module names:

    method = LoRA(LoRAConfig(rank=8, targets=("query", "value")))
    model = method.wrap(model, head=("classifier",))   # adapters in; all frozen but them and the head
    opt = torch.optim.AdamW(method.param_groups(model))
    ...train...
    method.merge(model)                                 # W0 += ΔW for inference: no extra cost per token

Choices of ours: dropout acts on the adapter's input only (as peft); the head trains in its own group at
head_lr (the improved-LoRA paper's per-matrix rates fix it at 4e-4). The interface every method shares is
written down once, at the end of this file.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


# -----------------------------------------------------------------------------
# the LoRA layer

def features(base):
    """(in, out) of a linear layer: nn.Linear and quant.Linear4bit name them; transformers' Conv1D does not,
    and stores W0ᵀ (in, out)."""
    if hasattr(base, "in_features"):
        return base.in_features, base.out_features
    return tuple(base.weight.shape)

class LoRALinear(nn.Module):
    """Y = X W0ᵀ + b + s·((dropout(X) Aᵀ) Bᵀ). `base` stays frozen: an nn.Linear (out, in), GPT-2's Conv1D
    (in, out) or quant.Linear4bit. create_factors() is the one method a subclass overrides to change them."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0, rslora=False):
        super().__init__()
        self.fan_in_fan_out = type(base).__name__ == "Conv1D"  # GPT-2 stores W0ᵀ
        self.in_features, self.out_features = features(base)
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ValueError(f"rank {r} does not fit a {self.out_features}x{self.in_features} layer: "
                             f"pass a rank between 1 and {min(self.in_features, self.out_features)}")
        self.base, self.r = base, r
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # the adapter path's only
        self.merged = False
        weight = getattr(base, "weight", None)  # None for quant.Linear4bit: uint8 codes + statistics
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = (weight if weight is not None else next(base.buffers())).device
        self.create_factors(dtype, device)

    def create_factors(self, dtype, device):
        """A ~ U(-1/√in, 1/√in) (peft's kaiming_uniform_(a=√5)); B = 0, so ΔW = 0 at step 0."""
        # (r, in)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=dtype, device=device))
        # (out, r)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def gain(self):
        """The factor in front of B·A: s here; a subclass may scale it (Dynamic LoRA's m_l·s_l, TLoRA's g)."""
        return self.scaling

    def delta_weight(self):
        return self.gain() * (self.lora_B @ self.lora_A)  # ΔW (out, in)

    def adapter(self, x):
        """Right to left, so ΔW is never built: (N, in) -> (N, r) -> (N, out)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A) * self.gain(), self.lora_B)

    def forward(self, x):
        y = self.base(x)  # the frozen path sees x itself
        return y if self.merged else y + self.adapter(x)

    @torch.no_grad()
    def add_to_base(self, delta):
        if hasattr(self.base, "merge_delta"):  # a 4-bit base decides how (quant.Linear4bit)
            self.base.merge_delta(delta)
        else:
            w = self.base.weight
            w += (delta.t() if self.fan_in_fan_out else delta).to(w.dtype)

    def merge(self):
        """W0 += ΔW: the forward then costs what the base alone costs. For export and inference; training
        and its evaluations run unmerged, so W0 is never rounded."""
        if not self.merged:
            self.add_to_base(self.delta_weight())
            self.merged = True

    def unmerge(self):
        """W0 -= ΔW: exact for a 4-bit base, up to float rounding for a float one."""
        if self.merged:
            self.add_to_base(-self.delta_weight())
            self.merged = False


# -----------------------------------------------------------------------------
# injecting adapters into any model, by module name

def is_linear(module):
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit")


def find_targets(model, targets, head=()):
    """Names of the modules to adapt. targets: "all-linear" (every linear layer outside the head and an LM
    head, as peft reads it), a tuple of name suffixes such as ("query", "value"), or a predicate
    (name, module) -> bool."""
    outside = lambda n: not n.startswith(tuple(h + "." for h in head)) and n not in head
    if targets == "all-linear":
        match = lambda n, m: is_linear(m) and outside(n) and n.rsplit(".", 1)[-1] != "lm_head"
    elif callable(targets):
        match = targets
    else:
        match = lambda n, m: any(n == t or n.endswith("." + t) for t in targets) and outside(n)
    names = [n for n, m in model.named_modules() if n and match(n, m)]
    if not names:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
        raise ValueError(f"no module of this model matches targets {targets!r}; its linear layers are "
                         f"named {', '.join(layers)}")
    return names


def inject(model, names, make_layer):
    """Replace each named module by make_layer(module, name). Returns {name: the new layer}."""
    layers = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        layers[name] = make_layer(model.get_submodule(name), name)
        setattr(model.get_submodule(parent), attr, layers[name])
    return layers


def adapter_layers(model, cls=LoRALinear):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


# -----------------------------------------------------------------------------
# what every method shares (the interface note at the end lists it)

@dataclass
class MethodConfig:
    lr: float = 2e-5            # the learning rate of the trained tensors (full fine-tuning's)
    head_lr: float = None       # the head's learning rate (None: lr)
    weight_decay: float = 0.1   # AdamW's, on every tensor of two or more dimensions


def groups_for(name, params, lr, wd):
    """Two AdamW groups: `name` with weight decay and `name`_nd without (biases and norms, as HF's
    Trainer)."""
    return [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": wd, "name": name},
            {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0,
             "name": name + "_nd"}]


class Method:
    """Freezes all but what trains(name) names and the head, which the caller names."""
    name = "method"
    Config = MethodConfig
    quant = "none"  # how the frozen base is stored unless the caller says otherwise (adaq_lora: "nf4")

    def __init__(self, cfg=None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.head = ()

    def trains(self, name):
        return False

    def in_head(self, name):
        return name.startswith(tuple(h + "." for h in self.head))

    def wrap(self, model, head=(), batches=None):
        self.head = tuple(head)
        for n, p in model.named_parameters():
            p.requires_grad = self.in_head(n) or self.trains(n)
        return model

    def head_lr(self):
        return self.cfg.head_lr if self.cfg.head_lr is not None else self.cfg.lr

    def param_groups(self, model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = groups_for("backbone", [p for n, p in named if not self.in_head(n)], self.cfg.lr,
                            self.cfg.weight_decay)
        groups += groups_for("head", [p for n, p in named if self.in_head(n)], self.head_lr(),
                             self.cfg.weight_decay)
        return [g for g in groups if g["params"]]

    def label(self):
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
        return {}

    def load_state_dict(self, state):
        pass

    def merge(self, model):
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.merge()

    def unmerge(self, model):
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.unmerge()


# -----------------------------------------------------------------------------
# the method

@dataclass
class LoRAConfig(MethodConfig):
    rank: int = 8                 # r
    alpha: float = 16             # s = alpha / r
    dropout: float = 0.1          # on the adapter's input only
    rslora: bool = False          # s = alpha / √r (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732)
    targets: str = "all-linear"   # "all-linear", or module-name suffixes: "query,value" or ("query", "value")
    lr: float = 4e-4              # η of every A (loralib's MRPC rate)
    lr_ratio: float = 1.0         # λ: every B at λ·η; 1 is plain LoRA (LoRA+ suggests 16 with lr 1e-4)
    head_lr: float = 4e-4         # the head's fixed rate

    def __post_init__(self):
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = tuple(self.targets.split(","))
        if self.rank < 1:
            raise ValueError(f"--rank must be ≥ 1, not {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), not {self.dropout}")
        if not self.lr_ratio > 0:
            raise ValueError(f"--lr_ratio must be > 0, not {self.lr_ratio}")
        check_rates(self)


def check_rates(cfg):
    """lr, head_lr and weight_decay are ≥ 0 (`not ≥` also refuses nan)."""
    for name in ("lr", "head_lr", "weight_decay"):
        v = getattr(cfg, name)
        if v is not None and not v >= 0:
            raise ValueError(f"--{name} must be ≥ 0, not {v}")


class LoRA(Method):
    """Plain LoRA by default (A and B at lr); every B at lr·lr_ratio is LoRA+'s per-matrix rates."""
    name = "lora"
    Config = LoRAConfig

    def make_layer(self, base, name):
        c = self.cfg
        return LoRALinear(base, c.rank, c.alpha, c.dropout, c.rslora)

    def trains(self, name):
        return ".lora_" in name

    def wrap(self, model, head=(), batches=None):
        for p in model.parameters():
            p.requires_grad = False
        inject(model, find_targets(model, self.cfg.targets, head), self.make_layer)
        return super().wrap(model, head)

    def lr_multipliers(self):
        """η_X / η for each factor lora_X."""
        return {"A": 1.0, "B": self.cfg.lr_ratio}

    def param_groups(self, model):
        c = self.cfg
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = []
        # a factor's group: all its matrices (or TLoRA's scalars g)
        for x, m in self.lr_multipliers().items():
            ps = [p for n, p in named if n.endswith(".lora_" + x)]
            groups.append({"params": ps, "lr": c.lr * m, "name": x,
                           "weight_decay": 0.0 if all(p.ndim < 2 for p in ps) else c.weight_decay})
        head = [p for n, p in named if self.in_head(n)]
        return [g for g in groups + groups_for("head", head, self.head_lr(), c.weight_decay) if g["params"]]


# -----------------------------------------------------------------------------
# The interface every method follows (here, tlora_plus.py, dynamic_lora.py, adaq_lora.py, baselines.py): all
# that train.py calls, in the order a run calls it. A method is built from its own dataclass config:
# LoRA(LoRAConfig(rank=8)). Errors are ValueErrors with a one-line message; only scripts exit.
#
#   quant                                 "none" or "nf4": how the frozen base is stored by default
#   wrap(model, head=(), batches=None)    inject adapters by module name and freeze all but them and the
#                                         modules named in `head`; `batches` (dicts of the model's forward
#                                         arguments) is for a method that calibrates before its adapters exist
#   trains(name) -> bool                  which tensors besides the head train
#   param_groups(model)                   [{"params", "lr", "weight_decay", "name"}, ...] for AdamW
#   schedule(total_steps, warmup_steps)   the run's length, once before training
#   extra_loss(model) -> tensor or None   added to the task loss
#   after_step(model, step)               after the step-th optimizer step, before zero_grad
#   merge(model) / unmerge(model)         fold the adapters into the base weights (export, latency), and back
#   label(), report(model)                the row name in tables; extra facts for metrics.json
#   state_dict() / load_state_dict(s)     the method's own training state, for checkpoints
#
# Files (peft's adapter format and ours) are peft_format.py's; a method knows no file.
