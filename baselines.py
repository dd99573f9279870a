"""
The baselines of SPEC §3, each a Method (lora.py) with its own config: full fine-tuning, feature extraction
(the task head only), BitFit, and the Houlsby bottleneck adapter. None of them has anything to merge (the
adapter is nonlinear); all save their trained tensors to trainable.safetensors.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from lora import Method, MethodConfig, inject


@dataclass
class FullConfig(MethodConfig):
    lr: float = 2e-5  # SPEC §3


class FullFineTuning(Method):
    """Every parameter trains."""
    name = "full"
    Config = FullConfig

    def trains(self, name):
        return True


@dataclass
class HeadConfig(MethodConfig):
    lr: float = 1e-3  # SPEC §3


class HeadOnly(Method):
    """Feature extraction: the backbone is frozen, only the task head trains."""
    name = "head"
    Config = HeadConfig

    def trains(self, name):
        return False


@dataclass
class BitFitConfig(MethodConfig):
    lr: float = 4e-4  # SPEC §3


class BitFit(Method):
    """y = x W0ᵀ + b_trainable: every bias inside the blocks (linears and LayerNorms) trains, plus the
    head."""
    name = "bitfit"
    Config = BitFitConfig

    def trains(self, name):
        return name.endswith(".bias") and name.startswith("h.")


class HoulsbyAdapterLayer(nn.Module):
    """f(h) = h + GELU(h W_dᵀ + b_d) W_uᵀ + b_u on the output h of a frozen dense layer (SPEC §3), W_d (m, d)
    and W_u (d, m). W_d ~ N(0, 0.01²), W_u = 0 and both biases 0, so f is the identity at init. Nonlinear, so
    it has no merge(): evaluation runs it as it trains."""

    def __init__(self, base, m=64):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        d = base.out_features
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
    targets: tuple = ("out", "proj")  # after the attention-output and the FFN-output dense layers (SPEC §3)
    lr: float = 3e-4                # SPEC §3


class Houlsby(Method):
    """Two bottleneck adapters per block (Houlsby et al. 2019), before each residual add and LayerNorm. The
    adapters, every LayerNorm and the task head train."""
    name = "adapter"
    Config = HoulsbyConfig

    def trains(self, name):
        # h.0.attn.out.adapter_down.weight -> adapter_down, h.0.ln_1.bias -> ln_1
        module = name.rsplit(".", 2)[-2]
        return module.startswith(("adapter_", "ln_"))

    def wrap(self, model, batches=None):
        if self.cfg.adapter_size < 1:
            raise ValueError(f"--adapter_size must be ≥ 1, not {self.cfg.adapter_size}")
        inject(model, list(self.cfg.targets),
               lambda base, name: HoulsbyAdapterLayer(base, self.cfg.adapter_size))
        return super().wrap(model)
