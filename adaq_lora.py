"""
ADAQ-LoRA (seed 003; SPEC §2.4): AdaLoRA's SVD-form adapter and its rank allocator (Zhang et al. 2023, as peft
implements it) on a frozen NF4 + double-quant base (quant.py). `--method adalora` is the same adapter on a
float base.

    ΔW_k = c·P_k·diag(λ_k)·Q_k,  c = α/(init_r + 1e-5)    P = lora_B (out, r), λ = lora_E (r, 1),
                                                          Q = lora_A (r, in)
    L    = CE + γ·R,   R = 1/(2n)·Σ_k (||Q_k Q_kᵀ − I||_F + ||P_kᵀ P_k − I||_F)       (peft's form, unsquared)
    I(w) = |w ⊙ ∂L/∂w|,   Ī ← β1·Ī + (1 − β1)·I,   Ū ← β2·Ū + (1 − β2)·|I − Ī|,   s(w) = Ī ⊙ Ū
    S_k,i = s(λ_k,i) + mean_j s(Q_k,ij) + mean_j s(P_k,ji)                             (the triplet score)
    b(t) = b0 for t ≤ tinit;  bT for t > T − tfinal;
           else ⌊(b0 − bT)·(1 − (t − tinit)/(T − tfinal − tinit))³ + bT⌋
    every ΔT steps: λ_k,i ← 0 for the b0 − b(t) lowest S over all matrices;
                    from T − tfinal on the mask is frozen

What differs from lora.py: the layer's three factors and init (create_factors), the regulariser (extra_loss),
the allocator (after_step: after optimizer.step, before zero_grad, with t = completed steps), and peft's
ADALORA file format (rank_pattern: the kept triplets; the file holds only those). Masked λ stay trainable
and can recover until the mask freezes; masking frees no memory (SPEC §2.4), the ranks only shrink in the
saved file.
"""
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from lora import (LoRA, LoRALinear, MethodConfig, adapter_layers, peft_key, peft_task,
                  read_adapter_config, saved_method)
from model import hf_name


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
    targets: object = "all-linear"
    tinit: int = 200              # steps at the full budget b0 before masking starts
    tfinal: int = 1000            # the last steps, at bT with the mask frozen
    delta_t: int = 10             # mask every ΔT steps in between
    beta1: float = 0.85           # Ī's EMA (sensitivity)
    beta2: float = 0.85           # Ū's EMA (uncertainty)
    orth_reg_weight: float = 0.5  # γ
    lr: float = 3e-4              # P, λ and Q (SPEC §2.4); the head too unless head_lr is given

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


class RankAllocator:
    """peft's RankAllocator over {name: SVDLinear}: importance EMAs per entry of P, λ, Q, the triplet score,
    the cubic budget and the global threshold. step(t) is the whole per-step protocol
    (SPEC §2.4 "allocate")."""

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
    """AdaLoRA (SPEC §3 baseline, §2.4 adapter): SVD adapters on every target, one lr for P, λ, Q, the
    orthogonal regulariser, and the rank allocator after each step. Call schedule(T, warmup) before
    training."""
    name = "adalora"
    Config = AdaLoRAConfig

    def make_layer(self, base, name):
        return SVDLinear(base, self.cfg.init_r, self.cfg.alpha, self.cfg.dropout)

    def lr_multipliers(self):
        return {"A": 1.0, "E": 1.0, "B": 1.0}

    def wrap(self, model, batches=None):
        super().wrap(model)
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

    # ---- peft's ADALORA files: the kept triplets only, and rank_pattern (which ones) per matrix
    def peft_config(self, model):
        c, family = self.cfg, model.cfg.family
        keep = self.allocator.keep if self.allocator else {}
        return {"peft_type": "ADALORA", **peft_task(model), "init_r": c.init_r, "target_r": c.target_r,
                "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.delta_t, "beta1": c.beta1, "beta2": c.beta2,
                "orth_reg_weight": c.orth_reg_weight, "total_step": self.allocator.T if self.allocator else
                c.tinit + c.tfinal + 1, "lora_alpha": c.alpha, "lora_dropout": c.dropout,
                "fan_in_fan_out": family == "gpt2", "bias": "none", "inference_mode": True,
                "target_modules": sorted(hf_name(family, n) for n in self.layers),
                "init_lora_weights": True,
                "rank_pattern": {hf_name(family, n) + ".lora_E": k.tolist() for n, k in keep.items()} or None,
                "base_model_name_or_path": getattr(model, "name_or_path", "")}

    def file_key(self, family, name):
        """peft stores AdaLoRA factors without '.weight': base_model.model.<hf module>.lora_E."""
        mod, _, leaf = name.rpartition(".")
        return f"base_model.model.{hf_name(family, mod)}.{leaf}" if leaf.startswith("lora_") else \
            peft_key(family, name)

    def file_tensors(self, model):
        """Only the kept triplets: rows of Q and λ, columns of P, under peft's AdaLoRA keys."""
        keep = self.allocator.keep if self.allocator else {}
        tensors = {}
        for n, p in self.adapter_tensors(model).items():
            mod, _, leaf = n.rpartition(".")
            if mod in keep:
                p = p[:, keep[mod]] if leaf == "lora_B" else p[keep[mod]]
            tensors[self.file_key(model.cfg.family, n)] = p.detach().contiguous()
        return tensors

    def load(self, model, folder):
        """Fill each layer's kept triplets from the file and zero the rest (P, λ, Q) so ΔW is the
        saved one."""
        cfg = read_adapter_config(folder)
        path = os.path.join(folder, "adapter_model.safetensors")
        saved = saved_method(path, str(cfg.get("peft_type")).lower())
        if saved != self.name:
            raise ValueError(f"{folder} holds a {saved} adapter; pass --method {saved} to load it")
        if cfg.get("init_r") != self.cfg.init_r:
            raise ValueError(f"{folder} was trained with --init_r {cfg.get('init_r')}; pass it")
        family, tensors, params = model.cfg.family, load_file(path), self.adapter_tensors(model)
        pattern = cfg.get("rank_pattern") or {}
        keys = {self.file_key(family, n): n for n in params}
        missing = sorted(k for k in keys if k not in tensors)
        if missing or len(tensors) != len(keys):
            raise ValueError(f"{path} does not match this model's adapters (e.g. "
                             f"{(missing or sorted(set(tensors) - set(keys)) or ['?'])[0]}): another --model "
                             f"or --targets?")
        with torch.no_grad():
            for key, n in keys.items():
                mod, _, leaf = n.rpartition(".")
                p, t = params[n], tensors[key]
                if mod not in self.layers:  # the task head
                    p.copy_(t)
                    continue
                keep = torch.tensor(pattern.get(hf_name(family, mod) + ".lora_E", [True] * p.shape[-1 if
                                    leaf == "lora_B" else 0]), dtype=torch.bool, device=p.device)
                if int(keep.sum()) != t.shape[1 if leaf == "lora_B" else 0]:
                    raise ValueError(f"{key} has {tuple(t.shape)}, which does not fit its rank_pattern")
                p.zero_()
                if leaf == "lora_B":
                    p[:, keep] = t.to(p)
                else:
                    p[keep] = t.to(p)


class AdaQLoRA(AdaLoRA):
    """ADAQ-LoRA: AdaLoRA with every adapted base weight stored in NF4 + double quant (quant.Linear4bit)."""
    name = "adaq_lora"
    quant = "nf4"
