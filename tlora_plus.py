"""
TLoRA+ (arXiv 2604.13368, seed 002; SPEC §2.3): a three-factor adapter whose factors learn at different rates.

    ΔW = s·C·B·A     C (out, r1), B (r1, r2), A (r2, in), r1 = r2 = r, s = 1
    Y  = X W0ᵀ + b + s·(((X_d Aᵀ) Bᵀ) Cᵀ)

What differs from lora.py:
- A third factor C follows B, and B shrinks to (r, r). --tlora_train picks which factors train (SPEC's table):
  B = T1 (the original TLoRA), AB = T2a, CB = T2b, ABC = T3, the paper's "Ours". A frozen factor is a buffer
  drawn from a per-module seed, and is saved with the trained ones, since it is random.
- LeCun init, variance 1/fan-in: A ~ N(0, 1/in), C ~ N(0, 1/r). B = 0, so ΔW = 0 at step 0 (a SPEC Reading);
  --b_init lecun gives the paper's literal N(0, 1/r).
- s = 1 and no adapter dropout (SPEC: the paper has neither), so --alpha and --dropout do not apply here.
- The TLoRA+ learning rates, with one global λ = --ratio: η_A = η, η_B = η·λ^{3/2}, η_C = η·λ^{1/2}. The head
  learns at η, and weight decay applies in every group. (LoRA here: η_B = η·lr_ratio, head at 4e-4.)
- The original TLoRA ([TLoRA-orig], --method tlora): T1 plus one learnable scalar g per module (init 1), so
  ΔW = g·C·B·A, with B and g both at η.
Merge/unmerge, injection, freezing and the adapter files are lora.py's. The keys follow peft's pattern
base_model.model.<hf name>.lora_X.weight, but peft cannot load these files: it has no TLoRA.
"""
import itertools
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from lora import LoRA, LoRALinear, adapter_layers, head_groups
from model import hf_name

CONFIGS = ("B", "AB", "CB", "ABC")  # the trainable factors of T1, T2a, T2b, T3 (SPEC §2.3)


class TLoRALinear(LoRALinear):
    """Y = X W0ᵀ + b + s·g·(((X_d Aᵀ) Bᵀ) Cᵀ), where g exists only for the original TLoRA (scalar=True).
    The factors not named in `trainable` are buffers; all three keep lora.py's names lora_A, lora_B, lora_C."""

    def __init__(self, base, r=8, trainable="ABC", b_init="zero", seed=0, scalar=False):
        super().__init__(base, r, alpha=r, dropout=0.0)  # s = α/r = 1 and p = 0: SPEC §2.3 (the paper has neither)
        if trainable not in CONFIGS:
            raise ValueError(f"trainable must be one of {', '.join(CONFIGS)}, not {trainable!r}")
        dtype, device = self.lora_A.dtype, self.lora_A.device  # LoRALinear took these from the base weight
        del self.lora_A, self.lora_B  # LoRA's (r, in) and (out, r) Parameters; redrawn below
        g = torch.Generator().manual_seed(seed)  # A and C from this module's own seed, B last: b_init moves only B
        A = torch.randn(r, self.in_features, generator=g) / math.sqrt(self.in_features)  # (r2, in), Var 1/in
        C = torch.randn(self.out_features, r, generator=g) / math.sqrt(r)                # (out, r1), Var 1/r1
        B = torch.randn(r, r, generator=g) / math.sqrt(r) if b_init == "lecun" else torch.zeros(r, r)  # (r1, r2)
        for x, t in (("A", A), ("B", B), ("C", C)):
            t = t.to(device=device, dtype=dtype)
            if x in trainable:
                setattr(self, "lora_" + x, nn.Parameter(t))
            else:
                self.register_buffer("lora_" + x, t)  # frozen, but in the state dict and saved
        self.lora_g = nn.Parameter(torch.ones((), dtype=dtype, device=device)) if scalar else None  # TLoRA's g, ()

    def gain(self):
        return self.scaling if self.lora_g is None else self.scaling * self.lora_g

    def delta_weight(self):
        """ΔW = s·g·C·B·A, (out, in): what LoRALinear's merge()/unmerge() add to and subtract from W0."""
        return self.gain() * (self.lora_C @ self.lora_B @ self.lora_A)

    def adapter(self, x):
        """The adapter path, right to left so ΔW is never built: (N, in) -> (N, r2) -> (N, r1) -> (N, out)."""
        return F.linear(F.linear(F.linear(self.dropout(x), self.lora_A) * self.gain(), self.lora_B), self.lora_C)


# -----------------------------------------------------------------------------
# the methods: TLoRA+ (T1/T2a/T2b/T3 with the λ learning rates), then the original TLoRA

class TLoRAPlus(LoRA):
    """--tlora_train B | AB | CB | ABC with the TLoRA+ learning rates. The paper's "Ours" is ABC at --ratio 4
    (SPEC Reading: its comparison runs state no λ; 4 is the low end of the recommended 4–8)."""
    name, default_lr = "tlora_plus", 1e-4  # SPEC §2.3: lr 1e-4 (5e-5 in the λ sweep)
    scalar = False

    def config(self):
        return self.args.tlora_train

    def label(self):
        return f"{self.name} {self.config()} λ={self.args.ratio:g}"

    def wrap(self, model):
        self.seeds = itertools.count(10_000 * self.args.seed)  # module k of a --seed S run draws from 10⁴·S + k
        return super().wrap(model)  # LoRA.wrap: inject make_layer, then freeze all but lora_* Parameters and head

    def make_layer(self, base):  # --alpha and --dropout are not passed: s = 1, p = 0 (SPEC §2.3)
        a = self.args
        return TLoRALinear(base, a.rank, self.config(), a.b_init, next(self.seeds), self.scalar)

    def lr_multipliers(self):
        """η_X / η per factor: λ^{3/2} for B and λ^{1/2} for C, Eq. 8 with n read as the global λ (SPEC §2.3)."""
        lam = self.args.ratio
        return {"A": 1.0, "B": lam ** 1.5, "C": lam ** 0.5}

    def param_groups(self, model):
        a = self.args
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n.endswith(".lora_" + x)], "lr": self.lr * m,
                   "weight_decay": a.weight_decay, "name": x} for x, m in self.lr_multipliers().items()]
        head_lr = a.head_lr if a.head_lr is not None else self.lr  # SPEC §2.3: "the head uses η"
        return [g for g in groups + head_groups(model, head_lr, a.weight_decay) if g["params"]]

    def adapter_tensors(self, model):
        """The trained tensors plus the frozen factors: they are random, and a load must reproduce the outputs."""
        return {**super().adapter_tensors(model), **{n: b for n, b in model.named_buffers() if ".lora_" in n}}

    def peft_config(self, model):  # adapter_config.json in peft's spirit; peft_type names our method
        a, family = self.args, model.cfg.family
        return {"peft_type": self.name.upper(), "task_type": "SEQ_CLS", "r": a.rank, "trainable": self.config(),
                "b_init": a.b_init, "scaling": 1.0, "dropout": 0.0, "learnable_scalar": self.scalar,
                "lr_multipliers": self.lr_multipliers(), "seed": a.seed,
                "target_modules": sorted(hf_name(family, n) for n in adapter_layers(model)),
                "base_model_name_or_path": a.model}


class TLoRA(TLoRAPlus):
    """The original TLoRA ([TLoRA-orig], SPEC "TLoRA baseline"): T1 plus a learnable scalar g per module,
    ΔW = g·C·B·A. B and g train at η with no ratio; --tlora_train and --ratio do not apply."""
    name, scalar = "tlora", True

    def config(self):
        return "B"

    def label(self):  # --tlora_train and --ratio do not apply
        return self.name

    def lr_multipliers(self):
        return {"B": 1.0, "g": 1.0}
