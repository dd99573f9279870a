"""
The baselines the papers compare against, each a Method (lora.py) with its own config: full fine-tuning,
feature extraction (the task head only), BitFit (Ben Zaken et al. 2022, arXiv 2106.10199) and the bottleneck
adapter (Houlsby et al. 2019, arXiv 1902.00751, §2.1). None has anything to merge: the adapter is nonlinear.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from lora import Method, MethodConfig, features, find_targets, inject


@dataclass
class FullConfig(MethodConfig):
    lr: float = 2e-5


class FullFineTuning(Method):
    """Every parameter trains."""
    name = "full"
    Config = FullConfig

    def trains(self, name):
        return True


@dataclass
class HeadConfig(MethodConfig):
    lr: float = 1e-3


class HeadOnly(Method):
    """Feature extraction: the backbone is frozen, only the task head trains."""
    name = "head"
    Config = HeadConfig

    def trains(self, name):
        return False


@dataclass
class BitFitConfig(MethodConfig):
    lr: float = 4e-4


class BitFit(Method):
    """y = x W0ᵀ + b_trainable: every bias (linears and LayerNorms) trains, plus the head."""
    name = "bitfit"
    Config = BitFitConfig

    def trains(self, name):
        return name.endswith(".bias")

    def wrap(self, model, head=(), batches=None):
        if not any(n.endswith(".bias") for n, _ in model.named_parameters()):
            raise ValueError("--method bitfit trains biases, and this model has none; pick another method")
        return super().wrap(model, head)


class HoulsbyAdapterLayer(nn.Module):
    """f(h) = h + GELU(h W_dᵀ + b_d) W_uᵀ + b_u on the output h of a frozen dense layer, W_d (m, d)
    and W_u (d, m). W_d ~ N(0, 0.01²), W_u = 0 and both biases 0, so f is the identity at init. Nonlinear, so
    it has no merge(): evaluation runs it as it trains."""

    def __init__(self, base, m=64):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = d_in, d = features(base)
        weight = getattr(base, "weight", None)  # None for a quant.Linear4bit base
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = (weight if weight is not None else next(base.buffers())).device
        self.adapter_down = nn.Linear(d, m, device=device, dtype=dtype)  # W_d (m, d), b_d (m,)
        self.adapter_up = nn.Linear(m, d, device=device, dtype=dtype)    # W_u (d, m), b_u (d,)
        nn.init.normal_(self.adapter_down.weight, std=0.01)
        for t in (self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias):
            nn.init.zeros_(t)

    def forward(self, x):
        h = self.base(x)
        return h + self.adapter_up(F.gelu(self.adapter_down(h)))


@dataclass
class HoulsbyConfig(MethodConfig):
    adapter_size: int = 64          # the bottleneck m
    targets: str = "out,proj,o_proj,down_proj"  # after attention-out and FFN-out (our names; Llama's)
    lr: float = 3e-4

    def __post_init__(self):
        if self.adapter_size < 1:
            raise ValueError(f"--adapter_size must be ≥ 1, not {self.adapter_size}")
        self.targets = tuple(self.targets.split(",")) if isinstance(self.targets, str) else self.targets


class Houlsby(Method):
    """Two bottleneck adapters per block (Houlsby et al. 2019), before each residual add and LayerNorm. The
    adapters, every LayerNorm and the task head train."""
    name = "adapter"
    Config = HoulsbyConfig

    def trains(self, name):
        module = name.rpartition(".")[0]  # h.0.attn.out.adapter_down.weight -> h.0.attn.out.adapter_down
        return module.rpartition(".")[2].startswith("adapter_") or module in self.norms

    def wrap(self, model, head=(), batches=None):
        self.norms = {n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
        inject(model, find_targets(model, self.cfg.targets, head),
               lambda base, name: HoulsbyAdapterLayer(base, self.cfg.adapter_size))
        return super().wrap(model, head)
