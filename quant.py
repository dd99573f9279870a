"""
NF4 quantization with double quantization for a frozen base (QLoRA, Dettmers et al. 2023, arXiv 2305.14314,
§3 "QLoRA Finetuning": 4-bit NormalFloat Quantization and Double Quantization, with its bit count below).
- W is flattened row-major and cut into 64-value blocks. Each block keeps its absmax m_k and, per value, the
  4-bit index of the nearest NF4 level to w/m_k. NF4 has 16 levels at normal quantiles, and two indices share
  a byte.
- Double quantization stores m_k - mean(m) as 8-bit codes of bnb's signed dynamic map, with one fp32 scale per
  256 blocks: 4 + 8/64 + 32/(64*256) ≈ 4.127 bits per weight.
- This is pure torch and bit-compatible with bitsandbytes on CPU: quantize_4bit(quant_type="nf4",
  blocksize=64, compress_statistics=False/True) gives the same bytes, absmax, absmax codes, scales and offset
  (see the tests). bnb is only the test reference. bnb's CUDA 8-bit kernel picks the nearest absmax code by a
  midpoint search instead of the CPU grid reproduced below, so on CUDA ~0.15% of absmax codes can differ by
  one step.
- Linear4bit keeps only those tensors as buffers and dequantizes in its forward (bf16 on CUDA, fp32 on CPU).
  The two small tables its dequantize reads (NF4 levels, dynamic map) are non-persistent buffers of each
  layer: they move with .to(device) and stay out of the state dict. A CPU table read inside a compiled CUDA
  graph would be a CPU graph input and break CUDA graphs on every call.
  Merging a LoRA delta into it keeps an fp32 copy Ŵ + ΔW and never requantizes, so unmerge is exact.
"""
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # the fp32 values bnb hardcodes (QLoRA §3); nf4_code_book() derives them


def nf4_code_book(offset=0.9677083):
    """QLoRA's NF4 levels (bnb create_normal_map): 8 positive and 7 negative normal quantiles, plus 0, over
    max."""
    ppf = lambda p: torch.special.ndtri(p.double())  # like scipy norm.ppf: fp64 on fp32 grid points
    pos = ppf(torch.linspace(offset, 0.5, 9)[:-1])  # (8,)  one more positive level: NF4 is asymmetric
    neg = -ppf(torch.linspace(offset, 0.5, 8)[:-1])  # (7,)
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values  # (16,) fp32
    return levels / levels.max()  # bnb normalises after rounding to fp32; this makes it bit-equal to NF4


def dynamic_map():
    """bnb's signed 8-bit dynamic map (create_dynamic_map(signed=True)): for e = 0..6, the midpoints of 2^e
    equal steps of [0.1, 1] times 10^(e-6), with both signs, plus 0 and 1."""
    mids = lambda b: (b[:-1] + b[1:]) / 2
    pos = torch.cat([10.0 ** (e - 6) * mids(torch.linspace(0.1, 1, 2 ** e + 1)) for e in range(7)])  # (127,)
    return torch.cat([pos, -pos, torch.tensor([0.0, 1.0])]).sort().values  # (256,) fp32, sorted


# The tables, on the CPU. quantize_nf4 copies the ones it needs to the weight's device (once per weight);
# a Linear4bit holds its own copies of NF4_PAIRS and DYNAMIC as buffers for the forward.
NF4_T = torch.tensor(NF4)  # (16,) fp32
# (15,) midpoints; bucketize sends a tie to the lower level, as bnb does
NF4_BOUNDS = (NF4_T[:-1] + NF4_T[1:]) / 2
# (256, 2): byte -> (high, low) levels
NF4_PAIRS = torch.stack([NF4_T.repeat_interleave(16), NF4_T.repeat(16)], dim=1)
DYNAMIC = dynamic_map()  # (256,) fp32
# bnb's CPU kernel (csrc/cpu_ops.cpp) snaps x in [-1, 1] to a grid of 65536 points and takes the code nearest
# the grid point. Codes match it bit for bit; the exact nearest code differs for ~0.15% of random inputs.
DYNAMIC_LUT = torch.searchsorted((DYNAMIC[:-1] + DYNAMIC[1:]) / 2,  # (65536,) int64
                                 -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32) / 65535)


@dataclass
class QuantState:
    packed: torch.Tensor  # (ceil(n/2),) uint8: two 4-bit codes per byte, first value in the high nibble
    absmax: torch.Tensor  # (nb,) fp32 one per block, or uint8 dynamic-map codes of absmax - offset
                          # (double quant)
    scale: Optional[torch.Tensor]  # (ceil(nb/256),) fp32: max |absmax - offset| per 256 blocks (double quant)
    offset: Optional[torch.Tensor]  # () fp32: mean absmax (double quant)
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    pairs: Optional[torch.Tensor] = None  # (256, 2) fp32 NF4_PAIRS on the codes' device (a layer's buffer)
    dynamic: Optional[torch.Tensor] = None  # (256,) fp32 DYNAMIC there too (double quant)


def pack_nibbles(codes):
    codes = codes.to(torch.uint8)  # (n,) values 0..15
    if codes.numel() % 2:  # bnb pads the scaled values with 0.0, whose code is 7
        codes = F.pad(codes, (0, 1), value=7)
    return codes[0::2] << 4 | codes[1::2]  # (ceil(n/2),) uint8


def _scaled_blocks(w, blocksize):
    """bnb's quantize_4bit on CPU, to the bit: full blocks multiply by 1/absmax (absmax clamped at 1e-38 so an
    all-zero block scales to 0, not NaN); a partial last block divides by its absmax and stores it clamped."""
    full = w.numel() // blocksize * blocksize
    head = w[:full].view(-1, blocksize)  # (nb_full, blocksize)
    absmax = head.abs().amax(dim=1)  # (nb_full,) fp32
    scaled = (head * (1 / absmax.clamp(min=1e-38))[:, None]).flatten()  # (full,)
    if full < w.numel():
        tail_max = w[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])  # (nb,)
        scaled = torch.cat([scaled, w[full:] / tail_max])  # (n,)
    return absmax, scaled.clamp(-1, 1)


def quantize_dynamic(x, blocksize=256):
    """bnb quantize_blockwise on CPU: 8-bit dynamic-map codes per block of x, and each block's absmax. Run
    once per weight at load time, so the lookup table's copy to x's device is not in any step."""
    blocks = F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)  # (nb, blocksize), zero-padded
    absmax = blocks.abs().amax(dim=1)  # (nb,) fp32
    inv = torch.where(absmax > 0, 1 / absmax, 0.0)
    # bnb's grid index, before truncation
    grid = ((blocks * inv[:, None]).clamp(-1, 1) + 1) * 0.5 * 65535 + 0.5
    # bnb: code 0 if absmax = 0
    codes = DYNAMIC_LUT.to(x.device)[grid.long()].masked_fill(absmax[:, None] == 0, 0)
    return codes.to(torch.uint8).flatten()[:x.numel()], absmax  # (n,) uint8, (nb,) fp32


def dequantize_dynamic(codes, scale, offset, blocksize=256, dynamic=None):
    """The inverse: dynamic (256,) is the map on codes' device; None copies DYNAMIC there (not in a step)."""
    dynamic = DYNAMIC.to(codes.device) if dynamic is None else dynamic
    vals = F.pad(dynamic[codes.long()], (0, -codes.numel() % blocksize))  # (nb*blocksize,)
    return (vals.view(-1, blocksize) * scale[:, None]).flatten()[:codes.numel()] + offset  # (n,) fp32


def quantize_nf4(W, blocksize=64, double_quant=True):
    """bnb quantize_4bit(W, blocksize, compress_statistics=double_quant, quant_type="nf4") as a QuantState,
    with the dequantize tables copied to W's device."""
    w = W.detach().reshape(-1).float()  # (n,) row-major
    absmax, scaled = _scaled_blocks(w, blocksize)  # (nb,), (n,)
    packed = pack_nibbles(torch.bucketize(scaled, NF4_BOUNDS.to(w.device)))
    pairs = NF4_PAIRS.to(w.device)
    if not double_quant:
        return QuantState(packed, absmax, None, None, W.shape, W.dtype, blocksize, pairs)
    offset = absmax.mean()  # () the mean is subtracted so the 8-bit codes spend their range on the spread
    codes, scale = quantize_dynamic(absmax - offset)
    return QuantState(packed, codes, scale, offset, W.shape, W.dtype, blocksize, pairs,
                      DYNAMIC.to(w.device))


def dequantize_nf4(state, dtype=None):
    """Ŵ in state.shape, cast to dtype (default: the quantized weight's dtype). Every tensor it reads, the
    tables included, comes from `state`, so all of them sit on the codes' device."""
    absmax = state.absmax.float()  # (nb,)
    if state.scale is not None:
        absmax = dequantize_dynamic(state.absmax, state.scale.float(), state.offset.float(),
                                    dynamic=state.dynamic)
    n, bs = state.shape.numel(), state.blocksize
    # (2*ceil(n/2),) fp32; ~3x faster than pairs[idx]
    vals = F.embedding(state.packed.int(), state.pairs).flatten()
    if len(vals) < len(absmax) * bs:  # a partial last block
        vals = F.pad(vals, (0, len(absmax) * bs - len(vals)))
    w = (vals.view(-1, bs) * absmax[:, None]).flatten()[:n]
    return w.view(state.shape).to(dtype or state.dtype)  # fp32 product, then one cast: like bnb


def compile_dequantize():
    """--compile: Linear4bit dequantizes with dequantize_nf4 compiled by inductor, which fuses its table
    lookups, the double-quant decode and the block scaling into a few loops (~2.5x faster on CPU here); the
    plain function above stays the readable reference, and the two are tested equal bit for bit."""
    global dequantize
    dequantize = torch.compile(dequantize_nf4, dynamic=False)


dequantize = dequantize_nf4  # what Linear4bit calls


class DequantMatmul(torch.autograd.Function):
    """x Ŵᵀ that saves the 4-bit layer, not Ŵ, for backward and dequantizes again there (bnb's MatMul4Bit).
    A plain F.linear would keep every layer's full Ŵ alive until backward: the memory QLoRA exists to save."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.dequantized_weight(dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):  # Ŵ is frozen: only x gets a gradient
        return grad_out @ ctx.layer.dequantized_weight(ctx.dtype), None, None  # (..., out) @ (out, in)


class Linear4bit(nn.Module):
    """A frozen nn.Linear (or GPT-2 Conv1D, transposed) in NF4: y = x Ŵᵀ + b with W (out, in) dequantized per
    call. The packed codes and statistics are the state dict; the lookup tables are non-persistent buffers.
    Quantize after any model.to(dtype): that call would also cast the fp32 absmax/scale/offset and tables."""

    def __init__(self, in_features, out_features, bias=True, double_quant=True, dtype=torch.float32,
                 blocksize=64):
        super().__init__()
        self.in_features, self.out_features, self.dtype, self.blocksize = (
            in_features, out_features, dtype, blocksize)
        n = in_features * out_features
        nb = -(n // -blocksize)
        # (ceil(n/2),) two codes per byte
        self.register_buffer("packed", torch.zeros(-(n // -2), dtype=torch.uint8))
        # (nb,)
        self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8 if double_quant else torch.float32))
        # (ceil(nb/256),) fp32
        self.register_buffer("scale", torch.zeros(-(nb // -256)) if double_quant else None)
        self.register_buffer("offset", torch.zeros(()) if double_quant else None)  # () fp32
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias
                     else None)
        # (out, in) fp32 Ŵ + ΣΔW, only while merged
        self.register_buffer("merged_weight", None, persistent=False)
        self.register_buffer("merged_delta", None, persistent=False)  # (out, in) fp32 ΣΔW, only while merged
        # dequantize's tables, per layer (3 KB) so .to(device) moves them with the codes; not saved
        self.register_buffer("nf4_pairs", NF4_PAIRS.clone(), persistent=False)  # (256, 2) fp32
        self.register_buffer("dynamic", DYNAMIC.clone() if double_quant else None, persistent=False)  # (256,)

    @classmethod
    def from_linear(cls, linear, double_quant=True):
        W = linear.weight.t() if type(linear).__name__ == "Conv1D" else linear.weight  # (out, in)
        q = cls(W.shape[1], W.shape[0], linear.bias is not None, double_quant, W.dtype).to(W.device)
        state = quantize_nf4(W, q.blocksize, double_quant)
        tensors = {"packed": state.packed, "absmax": state.absmax, "scale": state.scale,
                   "offset": state.offset, "bias": linear.bias}
        # the same path a checkpoint takes
        q.load_state_dict({k: v for k, v in tensors.items() if v is not None})
        return q

    def state(self):
        shape = torch.Size((self.out_features, self.in_features))
        return QuantState(self.packed, self.absmax, self.scale, self.offset, shape, self.dtype,
                          self.blocksize, self.nf4_pairs, self.dynamic)

    def dequantized_weight(self, dtype=None):
        return dequantize(self.state(), dtype)  # (out, in)

    def forward(self, x):
        dt = torch.bfloat16 if x.is_cuda else torch.float32
        bias = None if self.bias is None else self.bias.to(dt)
        if self.merged_weight is not None:
            return F.linear(x.to(dt), self.merged_weight.to(dt), bias).to(x.dtype)
        y = DequantMatmul.apply(x.to(dt), self, dt)
        return (y if bias is None else y + bias).to(x.dtype)

    def merge_delta(self, delta):
        """LoRALinear.merge()'s hook (lora.py): Ŵ + ΔW has no exact NF4 form, and requantizing would add a
        second rounding error that unmerge could not undo. So the layer keeps an fp32 copy Ŵ + ΔW for its
        forward and never touches the packed codes. It also sums the deltas: unmerge passes -ΔW, the sum is
        then exactly 0, the fp32 copy is dropped and the layer is its 4-bit self again, bit for bit."""
        delta = delta.detach().float()  # (out, in)
        self.merged_delta = delta if self.merged_delta is None else self.merged_delta + delta
        if not self.merged_delta.any():
            self.merged_weight = self.merged_delta = None
            return
        # the default warning filter shows this once, however many layers merge
        if self.merged_weight is None:
            warnings.warn("merge into a 4-bit base: dequantized to an fp32 copy (Ŵ + ΔW) for the forward, "
                          "not requantized; the NF4 codes are kept and unmerge() restores them exactly",
                          stacklevel=2)
        self.merged_weight = self.dequantized_weight(torch.float32) + self.merged_delta  # (out, in) fp32

    def extra_repr(self):
        dq = self.scale is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, double_quant={dq}"


def quantize_model(model, skip=("head",), double_quant=True):
    """Swap every nn.Linear and Conv1D (by class name) whose qualified name starts with no prefix in skip. The
    type test is exact, so a LoRA layer that subclasses nn.Linear is never swallowed."""
    targets = [name for name, m in model.named_modules()
               if (type(m) is nn.Linear or type(m).__name__ == "Conv1D") and not name.startswith(tuple(skip))]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Linear4bit.from_linear(getattr(parent, child), double_quant))
    return model


def count_params(model):
    """#parameters as the papers count them: a Linear4bit weight is out·in logical values (its bias is already
    a Parameter), not the bytes that store it. Equal to the count before quantize_model."""
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))


def bits_per_param(model):
    """Stored bits (codes, absmax codes, scales, offset) per logical weight, over all Linear4bit modules."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    bits = sum(b.numel() * b.element_size() * 8
               for m in layers for b in (m.packed, m.absmax, m.scale, m.offset) if b is not None)
    return bits / sum(m.in_features * m.out_features for m in layers)
