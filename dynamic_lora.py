"""
Dynamic LoRA (arXiv 2501.14859, §3): LoRA whose per-layer rank comes from the input variance seen in a
calibration pass (§3.2), and whose per-layer scale follows the layer's importance during training (§3.1).

    r_l = min(max(⌊r·(1 + β·v_l) + 0.5⌋, 1), r_max, in_l, out_l),   v_l = Var(X_l) / mean_j Var(X_j)
    Y   = X W0ᵀ + b + m_l·s_l·((X_d A_lᵀ) B_lᵀ),   s_l = α / r_l,   m_l = L_n·ω_l
    I_l = ||G_lᵀ X_l||_F / √(out_l·in_l)  (the RMS of ∂L/∂W_l, G_l = ∂L/∂Y_l),   Ī_l ← β_I·Ī_l + (1 − β_I)·I_l
    ω_l = Ī_l / Σ_j Ī_j,    L = L_task + λ1·Σ_l ||A_l||_F² + λ2·Σ_l ||B_l||_F²

What differs from lora.py: the ranks r_l (calibration in wrap), the buffer m_l in front of B·A (after_step)
and the L2 terms (extra_loss).

Choices of ours, where the paper leaves it open:
- Calibration runs the model in eval mode, forward only, on the first n_cal training batches, and counts each
  layer's input over the non-padding tokens (a batch's attention_mask), in float64.
- I_l is measured every importance_every steps, from that step's batch, before clipping; m stays 1 until the
  first measurement. ω is updated every omega_every steps from omega_start (default: the warmup steps) on.
- G_l is the gradient at the layer's whole output (base + adapter), so I_l is the sensitivity of L to W_l.
"""
import math
from dataclasses import dataclass

import torch

from lora import LoRA, LoRAConfig, LoRALinear, adapter_layers, features, find_targets


class DynamicLoRALinear(LoRALinear):
    """LoRALinear of rank r_l with a multiplier m_l (a buffer, 1 at init): ΔW = m_l·s_l·B·A. While `sample` is
    on and the layer trains, it measures I_l = ||Gᵀ X||_F / √(out·in) in backward and keeps it in
    `importance`."""

    def __init__(self, base, r, alpha=16, dropout=0.0, rslora=False):
        super().__init__(base, r, alpha, dropout, rslora)
        self.register_buffer("lora_m", torch.ones((), device=self.lora_A.device))  # m_l, ()
        self.sample, self.importance, self.grad_w = False, None, None

    def gain(self):
        return self.lora_m * self.scaling

    def forward(self, x):
        y = super().forward(x)
        if self.sample and self.training and y.requires_grad:
            X = x.detach().reshape(-1, self.in_features)  # (N, in)

            def measure(G):  # G = ∂L/∂Y, (…, out): one extra (out, N) @ (N, in) product
                G = G.reshape(-1, self.out_features)
                gW = G.t().float() @ X.float()  # ∂L/∂W_l, (out, in)
                # summed over a step's --grad_accum micro-batches; after_step frees it
                self.grad_w = gW if self.grad_w is None else self.grad_w + gW
                self.importance = self.grad_w.norm() / math.sqrt(self.out_features * self.in_features)
            y.register_hook(measure)
        return y


@dataclass
class DynamicLoRAConfig(LoRAConfig):
    beta: float = 0.125            # r_l = r·(1 + β·v_l): a mean rank of about 1.125·r
    r_max: int = None              # None: 4·r
    n_cal: int = 32                # calibration batches
    importance_every: int = 10     # T_s: measure I_l on every T_s-th step
    importance_beta: float = 0.9   # β_I: Ī's EMA
    omega_every: int = 100         # T_ω: update ω and m every T_ω steps ...
    omega_start: int = None        # ... from this step on (None: the run's warmup steps)
    lambda1: float = 1e-4          # λ1·Σ||A_l||²
    lambda2: float = 1e-4          # λ2·Σ||B_l||²
    lr: float = 4e-4               # A and B
    lr_ratio: float = 1.0          # B at the same rate as A
    head_lr: float = 4e-4

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"--beta must be ≥ 0, not {self.beta}: r_l = r·(1 + β·v_l) with v_l ≥ 0")
        if self.r_max is not None and self.r_max < 1:
            raise ValueError(f"--r_max must be ≥ 1, not {self.r_max}")
        if not 0 < self.importance_beta < 1 or self.lambda1 < 0 or self.lambda2 < 0:
            raise ValueError(f"--importance_beta must be in (0, 1) and --lambda1, --lambda2 ≥ 0 (got "
                             f"{self.importance_beta}, {self.lambda1}, {self.lambda2})")
        if self.omega_start is not None and self.omega_start < 0:
            raise ValueError(f"--omega_start must be ≥ 0, not {self.omega_start}")
        for name in ("n_cal", "importance_every", "omega_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1, not {getattr(self, name)}")


@torch.no_grad()
def input_variances(model, names, batches, n_cal):
    """Var(X_l) over the non-padding (token, feature) entries of each named layer's input, in float64, over
    the first n_cal batches: dicts of the model's forward arguments (their attention_mask, if any, says which
    tokens are padding). Forward only, in eval mode, before any adapter exists."""
    S1, S2, n = {l: 0.0 for l in names}, {l: 0.0 for l in names}, {l: 0 for l in names}
    keep = {}  # the current batch's non-padding positions, (B, T) bool

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0] if keep["mask"] is None else inputs[0][keep["mask"]]
            x = x.double()  # (tokens, in)
            S1[name] += x.sum().item()
            S2[name] += (x * x).sum().item()
            n[name] += x.numel()
        return record

    handles = [model.get_submodule(l).register_forward_hook(hook(l)) for l in names]
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    seen = 0
    for b in batches:
        if seen == n_cal:
            break
        b = {k: v.to(device) for k, v in b.items()}
        keep["mask"] = b["attention_mask"].bool() if "attention_mask" in b else None  # (B, T)
        model(**b)
        seen += 1
    for h in handles:
        h.remove()
    model.train(was_training)
    if seen < n_cal:
        raise ValueError(f"--n_cal {n_cal} asks for more calibration batches than the training set has "
                         f"({seen}); pass --n_cal {seen} or fewer")
    return {l: S2[l] / n[l] - (S1[l] / n[l]) ** 2 for l in names}


def ranks_from_variances(variances, shapes, r, beta, r_max):
    """r_l = min(max(⌊r·(1 + β·v_l) + 0.5⌋, 1), r_max, in_l, out_l), v_l = Var_l / mean_j Var_j.
    shapes: {name: (in, out)}."""
    mean = sum(variances.values()) / len(variances)
    return {l: min(max(math.floor(r * (1 + beta * v / mean) + 0.5), 1), r_max, *shapes[l])
            for l, v in variances.items()}


class DynamicLoRA(LoRA):
    """LoRA with calibrated ranks, importance-driven multipliers m_l and L2 terms on A and B."""
    name = "dynamic_lora"
    Config = DynamicLoRAConfig

    def wrap(self, model, head=(), batches=None):
        c = self.cfg
        names = find_targets(model, c.targets, head)
        if batches is None:
            raise ValueError("Dynamic LoRA calibrates its ranks on training batches: "
                             "pass wrap(model, batches)")
        self.variances = input_variances(model, names, batches, c.n_cal)
        shapes = {l: features(model.get_submodule(l)) for l in names}  # (in, out)
        self.ranks = ranks_from_variances(self.variances, shapes, c.rank, c.beta, c.r_max or 4 * c.rank)
        # LoRA.wrap: inject make_layer at each target, freeze all but A, B, the head
        super().wrap(model, head)
        self.layers = adapter_layers(model, DynamicLoRALinear)
        self.ema = {}         # Ī_l, once measured
        self.trajectory = []  # one row per ω update
        # schedule() sets the run's warmup steps when omega_start is None
        self.omega_start = c.omega_start or 0
        self.arm(1)
        return model

    def make_layer(self, base, name):
        c = self.cfg
        return DynamicLoRALinear(base, self.ranks[name], c.alpha, c.dropout, c.rslora)

    # ---- the training-time hooks: the run's length, the L2 terms, importance and ω after each step
    def schedule(self, total_steps, warmup_steps):
        if self.cfg.omega_start is None:
            self.omega_start = warmup_steps  # t_ω0 = the warmup steps

    def arm(self, step):
        """Switch the importance hooks on for `step` if it is a sampled one, off otherwise."""
        self.sample_next = step % self.cfg.importance_every == 0
        for layer in self.layers.values():
            layer.sample = self.sample_next

    def extra_loss(self, model):
        """λ1·Σ_l ||A_l||_F² + λ2·Σ_l ||B_l||_F²: through Adam, on top of AdamW's decoupled decay."""
        c = self.cfg
        return sum(c.lambda1 * l.lora_A.square().sum() + c.lambda2 * l.lora_B.square().sum()
                   for l in self.layers.values())

    @torch.no_grad()
    def after_step(self, model, step):
        c = self.cfg
        if self.sample_next:  # this step measured I_l in backward: fold it into the EMA
            for layer in self.layers.values():
                if layer.grad_w is not None and torch.distributed.is_initialized():  # every rank's rows
                    torch.distributed.all_reduce(layer.grad_w)
                    layer.grad_w /= torch.distributed.get_world_size()  # as DDP averages gradients
                    layer.importance = layer.grad_w.norm() / math.sqrt(layer.out_features * layer.in_features)
            measured = {n: l.importance for n, l in self.layers.items() if l.importance is not None}
            values = torch.stack(list(measured.values())).tolist() if measured else []  # one host sync
            for name, I in zip(measured, values):
                prev = self.ema.get(name)
                self.ema[name] = I if prev is None else c.importance_beta * prev + (1 - c.importance_beta) * I
                self.layers[name].importance = self.layers[name].grad_w = None
        if step >= self.omega_start and step % c.omega_every == 0 and len(self.ema) == len(self.layers):
            total = sum(self.ema.values())
            for name, layer in self.layers.items():  # ω_l = Ī_l / ΣĪ, m_l = L_n·ω_l
                layer.lora_m.fill_(len(self.layers) * self.ema[name] / total)
            self.trajectory.append({"step": step, "m": {n: l.lora_m.item() for n, l in self.layers.items()}})
        self.arm(step + 1)

    def state_dict(self):
        """Ī, the ω trajectory and the sampling switch (m_l is a buffer, saved with the tensors)."""
        return {"ema": self.ema, "trajectory": self.trajectory, "omega_start": self.omega_start,
                "sample_next": self.sample_next}

    def load_state_dict(self, state):
        self.ema, self.trajectory = dict(state["ema"]), list(state["trajectory"])
        self.omega_start, self.sample_next = state["omega_start"], state["sample_next"]
        for layer in self.layers.values():
            layer.sample = self.sample_next

    def report(self, model):
        """The calibrated r_l, the final m_l and the m_l trajectory (one row per ω update), for
        metrics.json."""
        m = {n: layer.lora_m.item() for n, layer in self.layers.items()}
        return {"ranks": self.ranks, "variances": self.variances, "m": m, "m_trajectory": self.trajectory}
