"""
TLoRA+ (arXiv 2604.13368, §3): a three-factor adapter whose factors learn at different rates; and the original
TLoRA it extends (Islam 2025, arXiv 2504.18735).

    ΔW = s·C·B·A     C (out, r), B (r, r), A (r, in), s = 1
    Y  = X W0ᵀ + b + s·(((X Aᵀ) Bᵀ) Cᵀ)
    η_A = η,  η_B = η·λ^{3/2},  η_C = η·λ^{1/2}        (TLoRA+'s Eq. 8, with one global λ = ratio)

What differs from lora.py:
- A third factor C follows B, and B shrinks to (r, r). tlora_train picks the trainable factors: B (T1, the
  original TLoRA), AB (T2a), CB (T2b) or ABC (T3, the paper's "Ours"). A frozen factor is a buffer drawn from
  a per-module seed, and is saved with the trained ones, since it is random.
- LeCun init, variance 1/fan-in: A ~ N(0, 1/in), C ~ N(0, 1/r).
- s = 1 and no adapter dropout: the paper has neither, so LoRA's alpha and dropout do not apply.
- The original TLoRA (--method tlora): T1 plus one learnable scalar g per module (init 1), ΔW = g·C·B·A, with
  B and g both at η.
Choices of ours: B = 0 at init so ΔW = 0 at step 0 (b_init lecun gives the paper's literal N(0, 1/r)); the
paper's comparison states no λ, so "Ours" runs at λ = 4, the low end of its recommended 4–8; the head learns
at η; tlora_init official follows the official code (itanvir/tlora) instead: A stored (in, r) and C (r, out),
each kaiming_normal_(a=√5), so A ~ N(0, 1/(3r)), C ~ N(0, 1/(3·out)), plus Dropout(0.5) on the adapter output.
"""
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from lora import LoRA, LoRALinear, MethodConfig, check_rates

CONFIGS = ("B", "AB", "CB", "ABC")  # the trainable factors of T1, T2a, T2b, T3


class TLoRALinear(LoRALinear):
    """Y = X W0ᵀ + b + s·g·(((X_d Aᵀ) Bᵀ) Cᵀ), where g exists only for the original TLoRA (scalar=True).
    The factors not named in `trainable` are buffers; all three keep lora.py's names lora_A, lora_B,
    lora_C."""

    def __init__(self, base, r=8, trainable="ABC", b_init="zero", seed=0, scalar=False, init="paper"):
        if trainable not in CONFIGS:
            raise ValueError(f"trainable must be one of {', '.join(CONFIGS)}, not {trainable!r}")
        # for create_factors
        self.trainable, self.b_init, self.seed, self.scalar, self.init = trainable, b_init, seed, scalar, init
        # s = α/r = 1 and p = 0: the paper has neither
        super().__init__(base, r, alpha=r, dropout=0.0)
        # the official code drops half of the adapter's *output* (nn.Dropout(0.5) after the product)
        self.out_dropout = nn.Dropout(0.5) if init == "official" else nn.Identity()

    def create_factors(self, dtype, device):
        """A (r2, in) ~ N(0, 1/in), C (out, r1) ~ N(0, 1/r1): LeCun. B (r1, r2) = 0 (or N(0, 1/r2),
        b_init lecun)."""
        r = self.r
        # A and C from this module's own seed, B last: b_init moves B only
        g = torch.Generator().manual_seed(self.seed)
        A = torch.randn(r, self.in_features, generator=g) / math.sqrt(self.in_features)  # (r2, in)
        C = torch.randn(self.out_features, r, generator=g) / math.sqrt(r)                # (out, r1)
        if self.init == "official":  # itanvir/tlora: kaiming_normal_(a=√5) on its (in, r) and (r, out)
            A = nn.init.kaiming_normal_(torch.empty(self.in_features, r), a=math.sqrt(5), generator=g).t()
            C = nn.init.kaiming_normal_(torch.empty(r, self.out_features), a=math.sqrt(5), generator=g).t()
            # fan_in is dim 1 there: A ~ N(0, 1/(3r)), C ~ N(0, 1/(3·out)); ours is (r, in) and (out, r)
        B = (torch.randn(r, r, generator=g) / math.sqrt(r) if self.b_init == "lecun"
             else torch.zeros(r, r))  # (r1, r2)
        for x, t in (("A", A), ("B", B), ("C", C)):
            t = t.to(device=device, dtype=dtype)
            if x in self.trainable:
                setattr(self, "lora_" + x, nn.Parameter(t))
            else:
                self.register_buffer("lora_" + x, t)  # frozen, but in the state dict and saved
        # TLoRA's g
        self.lora_g = nn.Parameter(torch.ones((), dtype=dtype, device=device)) if self.scalar else None

    def gain(self):
        return self.scaling if self.lora_g is None else self.scaling * self.lora_g

    def delta_weight(self):
        """ΔW = s·g·C·B·A, (out, in): what LoRALinear's merge()/unmerge() add to and subtract from W0."""
        return self.gain() * (self.lora_C @ self.lora_B @ self.lora_A)

    def adapter(self, x):
        """The adapter path, right to left so ΔW is never built: (N, in) -> (N, r2) -> (N, r1) -> (N, out)."""
        return self.out_dropout(F.linear(F.linear(F.linear(self.dropout(x), self.lora_A) * self.gain(),
                                                  self.lora_B), self.lora_C))


# -----------------------------------------------------------------------------
# the methods: TLoRA+ (T1/T2a/T2b/T3 with the λ learning rates), then the original TLoRA

@dataclass
class TLoRAPlusConfig(MethodConfig):
    rank: int = 8                   # r1 = r2 = r
    targets: str = "all-linear"     # "all-linear", or module-name suffixes: "query,value"
    tlora_train: str = "ABC"        # the trainable factors: B (T1), AB (T2a), CB (T2b), ABC (T3, "Ours")
    ratio: float = 4.0              # λ: η_B = η·λ^{3/2}, η_C = η·λ^{1/2}
    b_init: str = "zero"            # "zero" (ΔW = 0 at step 0) or "lecun", the paper's N(0, 1/r)
    seed: int = 0                   # module k draws its frozen factors from seed 10⁴·seed + k
    tlora_init: str = "paper"       # "paper": LeCun A and C, no dropout; "official": the itanvir/tlora
                                    # code's kaiming_normal_(a=√5) and Dropout(0.5) on the output
    lr: float = 1e-4                # η
    head_lr: float = None           # None: η, "the head uses η"

    def __post_init__(self):
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = tuple(self.targets.split(","))
        if self.rank < 1:
            raise ValueError(f"--rank must be ≥ 1, not {self.rank}")
        if self.tlora_train not in CONFIGS:
            raise ValueError(f"--tlora_train must be one of {', '.join(CONFIGS)}, not {self.tlora_train!r}")
        if self.b_init not in ("zero", "lecun"):
            raise ValueError(f"--b_init must be zero or lecun, not {self.b_init!r}")
        if self.tlora_init not in ("paper", "official"):
            raise ValueError(f"--tlora_init must be paper or official, not {self.tlora_init!r}")
        if not self.ratio > 0:
            raise ValueError(f"--ratio must be > 0 (TLoRA+'s λ), not {self.ratio}")
        check_rates(self)


class TLoRAPlus(LoRA):
    """TLoRA+ with the λ learning rates; "Ours" is ABC at ratio 4. Param groups and injection are LoRA's."""
    name = "tlora_plus"
    Config = TLoRAPlusConfig
    scalar = False

    def config(self):
        return self.cfg.tlora_train

    def variant(self):
        """The model-changing choices beyond the defaults, for the label."""
        c = self.cfg
        return (("" if c.b_init == "zero" else f" b_init={c.b_init}")
                + ("" if c.tlora_init == "paper" else f" {c.tlora_init}-init"))

    def label(self):
        return f"{self.name} {self.config()} λ={self.cfg.ratio:g}" + self.variant()

    def wrap(self, model, head=(), batches=None):
        self.seeds = itertools.count(10_000 * self.cfg.seed)  # module k of a seed-S run draws from 10⁴·S + k
        return super().wrap(model, head)

    def make_layer(self, base, name):  # no alpha, no dropout: s = 1, p = 0
        c = self.cfg
        return TLoRALinear(base, c.rank, self.config(), c.b_init, next(self.seeds), self.scalar, c.tlora_init)

    def lr_multipliers(self):
        """η_X / η per factor: λ^{3/2} for B and λ^{1/2} for C (Eq. 8, its n read as one global λ)."""
        lam = self.cfg.ratio
        return {"A": 1.0, "B": lam ** 1.5, "C": lam ** 0.5}


class TLoRA(TLoRAPlus):
    """The original TLoRA (arXiv 2504.18735): T1 plus a learnable scalar g per module, ΔW = g·C·B·A. B and g
    train at η with no ratio; tlora_train and ratio do not apply."""
    name, scalar = "tlora", True

    def config(self):
        return "B"

    def label(self):  # tlora_train and ratio do not apply
        return self.name + self.variant()

    def lr_multipliers(self):
        return {"B": 1.0, "g": 1.0}
