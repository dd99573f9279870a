"""
The baselines of SPEC §3, each a Method (lora.py) with its own config: full fine-tuning, feature extraction (the
task head only) and BitFit. None of them adds a layer, so none has anything to merge; all save their trained
tensors to trainable.safetensors.
"""
from dataclasses import dataclass

from lora import Method, MethodConfig


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
    """y = x W0ᵀ + b_trainable: every bias inside the blocks (linears and LayerNorms) trains, plus the head."""
    name = "bitfit"
    Config = BitFitConfig

    def trains(self, name):
        return name.endswith(".bias") and name.startswith("h.")
