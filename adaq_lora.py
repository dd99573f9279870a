"""
ADAQ-LoRA (Feng et al. 2024, §3): AdaLoRA's SVD-form adapter and rank allocator (Zhang et al. 2023, "Adaptive
Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv 2303.10512, §3.1-3.3, as peft implements it) on
a frozen NF4 + double-quant base (quant.py, QLoRA). `--method adalora` is the same adapter on a float base.

    ΔW_k = c·P_k·diag(λ_k)·Q_k,  c = α/(init_r + 1e-5)      P = lora_B (out, r), λ = lora_E (r, 1),
                                                            Q = lora_A (r, in)
    L    = CE + γ·R,   R = 1/(2n)·Σ_k (||Q_k Q_kᵀ − I||_F + ||P_kᵀ P_k − I||_F)       (peft's form, unsquared)
    I(w) = |w ⊙ ∂L/∂w|,   Ī ← β1·Ī + (1 − β1)·I,   Ū ← β2·Ū + (1 − β2)·|I − Ī|,   s(w) = Ī ⊙ Ū
    S_k,i = s(λ_k,i) + mean_j s(Q_k,ij) + mean_j s(P_k,ji)                             (the triplet score)
    b(t) = b0 for t ≤ tinit;  bT for t > T − tfinal;
           else ⌊(b0 − bT)·(1 − (t − tinit)/(T − tfinal − tinit))³ + bT⌋
    every ΔT steps: λ_k,i ← 0 for the b0 − b(t) lowest S over all matrices;
                    from T − tfinal on the mask is frozen

What differs from lora.py: the layer's three factors and init (create_factors), the regulariser (extra_loss)
and the allocator (after_step: after optimizer.step, before zero_grad, with t = completed steps).
Choices of ours: masked λ stay trainable and can recover until the mask freezes, so masking frees no memory
(the ranks only shrink in the saved file); the paper's 4-bit base is bitsandbytes' NF4, ours is quant.py's,
bit-identical to it.
"""
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lora import LoRA, LoRALinear, MethodConfig, adapter_layers, check_rates


class SVDLinear(LoRALinear):
    """Y = X W0ᵀ + b + c·((dropout(X) (Q ⊙ λ)ᵀ) Pᵀ), c = α/(init_r + 1e-5): peft's SVDLinear. The rank r is
    init_r for the layer's whole life; the allocator zeroes entries of λ."""

    def __init__(self, base, r=12, alpha=32, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.scaling = alpha / (r + 1e-5)  # peft divides by ranknum + 1e-5, and ranknum stays init_r

    def create_factors(self, dtype, device):
        """P, Q ~ N(0, 0.02²) and λ = 0, so ΔW = 0 at the start (peft's reset_lora_parameters)."""
        new = lambda *shape: torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))
        self.lora_A = new(self.r, self.in_features)   # Q, (r, in): right singular vectors
        self.lora_E = new(self.r, 1)                  # λ, (r, 1): singular values
        self.lora_B = new(self.out_features, self.r)  # P, (out, r): left singular vectors
        torch.nn.init.normal_(self.lora_A, std=0.02)
        torch.nn.init.zeros_(self.lora_E)
        torch.nn.init.normal_(self.lora_B, std=0.02)

    def delta_weight(self):
        return self.gain() * (self.lora_B @ (self.lora_A * self.lora_E))  # (out, in)

    def adapter(self, x):
        return F.linear(F.linear(self.dropout(x), self.lora_A * self.lora_E), self.lora_B) * self.gain()


@dataclass
class AdaLoRAConfig(MethodConfig):
    init_r: int = 12              # every matrix starts at this rank: b0 = init_r·n triplets
    target_r: int = 8             # the average rank at the end: bT = target_r·n
    alpha: float = 32             # c = alpha / (init_r + 1e-5)
    dropout: float = 0.1          # on the adapter's input only
    targets: str = "all-linear"   # "all-linear", or module-name suffixes: "query,value"
    tinit: int = 200              # steps at the full budget b0 before masking starts
    tfinal: int = 1000            # the last steps, at bT with the mask frozen
    delta_t: int = 10             # mask every ΔT steps in between
    beta1: float = 0.85           # Ī's EMA (sensitivity)
    beta2: float = 0.85           # Ū's EMA (uncertainty)
    orth_reg_weight: float = 0.5  # γ
    lr: float = 3e-4              # P, λ and Q; the head too unless head_lr is given

    def __post_init__(self):
        if self.init_r < 1:
            raise ValueError(f"--init_r must be ≥ 1, not {self.init_r}")
        if not 0 <= self.target_r <= self.init_r:
            raise ValueError(f"--target_r {self.target_r} must be between 0 and --init_r {self.init_r}: "
                             f"masking only lowers ranks")
        if self.delta_t < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"--delta_t must be ≥ 1 and --tinit, --tfinal ≥ 0 (got {self.delta_t}, "
                             f"{self.tinit}, {self.tfinal})")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"--beta1 and --beta2 must be in (0, 1), not {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"--orth_reg_weight must be ≥ 0 and --dropout in [0, 1), not "
                             f"{self.orth_reg_weight} and {self.dropout}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = tuple(self.targets.split(","))
        check_rates(self)


class RankAllocator:
    """peft's RankAllocator over {name: SVDLinear}: importance EMAs per entry of P, λ, Q, the triplet score,
    the cubic budget and the global threshold. step(t) is the whole per-step protocol."""

    def __init__(self, layers, cfg, total_step):
        self.layers, self.cfg, self.T = layers, cfg, total_step
        self.b0, self.bT = cfg.init_r * len(layers), cfg.target_r * len(layers)
        self.ipt, self.unc = {}, {}  # Ī, Ū per (layer, factor)
        self.keep = {n: torch.ones(l.r, dtype=torch.bool, device=l.lora_E.device) for n, l in layers.items()}
        self.budgets = []            # b(t) at every step

    def budget(self, t):
        """(b(t), whether to mask at t): the cubic schedule."""
        c, T = self.cfg, self.T
        if t <= c.tinit:
            return self.b0, False
        if t > T - c.tfinal:
            return self.bT, True
        mul = 1 - (t - c.tinit) / (T - c.tfinal - c.tinit)
        return int((self.b0 - self.bT) * mul ** 3 + self.bT), t % c.delta_t == 0

    def factors(self):
        for name, layer in self.layers.items():
            for x in ("A", "E", "B"):
                yield (name, x), getattr(layer, "lora_" + x)

    @torch.no_grad()
    def update_ipt(self):
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for key, p in self.factors():
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)  # I = |w ⊙ ∇w|
            if key not in self.ipt:
                self.ipt[key], self.unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            self.ipt[key] = b1 * self.ipt[key] + (1 - b1) * ipt
            self.unc[key] = b2 * self.unc[key] + (1 - b2) * (ipt - self.ipt[key]).abs()  # with Ī already new

    def scores(self):
        """{name: S (r,)}: s(λ_i) + the mean of s over Q's row i + the mean over P's column i."""
        s = lambda n, x: self.ipt[(n, x)] * self.unc[(n, x)]
        return {n: s(n, "E").view(-1) + s(n, "A").mean(1) + s(n, "B").mean(0) for n in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, b):
        """Zero λ of all but the b best triplets (ties at the threshold are masked too, as in peft)."""
        S = self.scores()
        if b < self.b0:
            threshold = torch.cat(list(S.values())).kthvalue(self.b0 - b).values
            self.keep = {n: s > threshold for n, s in S.items()}
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self):
        for n, layer in self.layers.items():
            layer.lora_E.masked_fill_(~self.keep[n].view(-1, 1), 0.0)

    def step(self, t):
        """After the t-th optimizer step, before zero_grad."""
        final = self.T - self.cfg.tfinal
        if t < final:
            self.update_ipt()
            b, now = self.budget(t)
            if now:
                self.mask_to_budget(b)
        elif t == final:  # the last allocation: no update, mask to bT, freeze it, forget the EMAs
            b = self.bT
            self.mask_to_budget(b)
            self.ipt, self.unc = {}, {}
        else:
            b = self.bT
            self.apply_mask()
        self.budgets.append(b)

    def ranks(self):
        return {n: int(k.sum()) for n, k in self.keep.items()}


class AdaLoRA(LoRA):
    """AdaLoRA: SVD adapters on every target, one lr for P, λ, Q, the orthogonal regulariser, and the rank
    allocator after each step. Call schedule(T, warmup) before training."""
    name = "adalora"
    Config = AdaLoRAConfig

    def make_layer(self, base, name):
        return SVDLinear(base, self.cfg.init_r, self.cfg.alpha, self.cfg.dropout)

    def lr_multipliers(self):
        return {"A": 1.0, "E": 1.0, "B": 1.0}

    def wrap(self, model, head=(), batches=None):
        super().wrap(model, head)
        self.layers = adapter_layers(model, SVDLinear)
        self.allocator, self.orth = None, []  # self.orth: R at every step, on the device until report()
        return model

    def schedule(self, total_steps, warmup_steps):
        c = self.cfg
        if total_steps <= c.tinit + c.tfinal:
            raise ValueError(f"AdaLoRA needs more steps ({total_steps}) than --tinit {c.tinit} + --tfinal "
                             f"{c.tfinal}: lower them or train longer")
        self.allocator = RankAllocator(self.layers, c, total_steps)

    def orthogonality(self):
        """R = 1/(2n)·Σ_k (||Q Qᵀ − I||_F + ||PᵀP − I||_F)."""
        terms = []
        for layer in self.layers.values():
            for cov in (layer.lora_A @ layer.lora_A.t(), layer.lora_B.t() @ layer.lora_B):  # (r, r) each
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(layer.r, device=cov.device)))
        return torch.stack(terms).mean()

    def extra_loss(self, model):
        R = self.orthogonality()
        self.orth.append(R.detach())
        return self.cfg.orth_reg_weight * R

    def after_step(self, model, step):
        if self.allocator is None:
            raise ValueError("AdaLoRA's budget needs the run's length: call "
                             "schedule(total_steps, warmup_steps) before training")
        self.allocator.step(step)

    def state_dict(self):
        """The allocator's EMAs, masks and budgets, and R so far: a resumed run allocates as if never
        stopped."""
        a = self.allocator
        key = lambda k: f"{k[0]}|{k[1]}"
        return {"ipt": {key(k): t for k, t in a.ipt.items()}, "unc": {key(k): t for k, t in a.unc.items()},
                "keep": a.keep, "budgets": a.budgets, "orth": torch.stack(self.orth) if self.orth else None}

    def load_state_dict(self, state):
        a, dev = self.allocator, next(iter(self.layers.values())).lora_A.device
        unkey = lambda k: tuple(k.split("|"))
        a.ipt = {unkey(k): t.to(dev) for k, t in state["ipt"].items()}
        a.unc = {unkey(k): t.to(dev) for k, t in state["unc"].items()}
        a.keep, a.budgets = {n: k.to(dev) for n, k in state["keep"].items()}, list(state["budgets"])
        self.orth = [] if state["orth"] is None else list(state["orth"].to(dev))

    def report(self, model):
        """The kept rank of every matrix, the budget b(t) and the regulariser R at every step."""
        a = self.allocator
        return {"ranks": a.ranks() if a else {n: l.r for n, l in self.layers.items()},
                "budget": a.budgets if a else [],
                "orth_loss": torch.stack(self.orth).tolist() if self.orth else []}


class AdaQLoRA(AdaLoRA):
    """ADAQ-LoRA: AdaLoRA with every adapted base weight stored in NF4 + double quant (quant.Linear4bit)."""
    name = "adaq_lora"
    quant = "nf4"
