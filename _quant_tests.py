# ---- quant.py
# NF4 + double quant against bitsandbytes on CPU (quantize_4bit / dequantize_4bit, quant_type="nf4", blocksize=64):
# packed bytes, absmax, absmax codes, scales, offset and dequantized values must be bit-identical.
import pytest
import torch

import quant

QUANT_SHAPES = [(7, 13), (3, 100), (64, 64), (130, 257), (5, 80), (1, 1), (300, 256)]  # mostly not multiples of 64


def _quant_cases():
    """Random weights, each of 192+ values with block 1 all zero, then a weight whose partial last block is zero
    and an all-zero one (bnb stores absmax 0 for a zero full block, 1e-38 for a zero partial block)."""
    for seed, shape in enumerate(QUANT_SHAPES):
        W = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        if W.numel() >= 192:
            W.view(-1)[64:128] = 0
        yield W
    W = torch.randn(3, 100)
    W.view(-1)[256:] = 0
    yield W
    yield torch.zeros(3, 100)


def _bnb_dequantize(packed, state):
    import bitsandbytes.functional as bnbF
    with torch._dynamo.config.patch(disable=True):  # bnb torch.compiles its odd-last-dim fallback: ~15 s on CPU
        return bnbF.dequantize_4bit(packed, state)


def _bnb_dequant_is_reliable(shape):
    # bnb's AVX-512 CPU kernel reads absmax per row (row r, column block j -> absmax[r * (in // 64) + j]), which is
    # wrong when in % 16 == 0 but in % 64 != 0: its own round trip of a (5, 80) weight is off by ~1.0.
    return shape[-1] % 16 != 0 or shape[-1] % 64 == 0


def test_nf4_code_book_matches_qlora_quantiles():
    derived, table = quant.nf4_code_book(), torch.tensor(quant.NF4)
    assert torch.equal(derived, table), f"max diff {(derived - table).abs().max().item():.3g}"


def test_dynamic_map_matches_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    ref = bnbF.create_dynamic_map(signed=True)
    assert torch.equal(quant.DYNAMIC, ref), f"max diff {(quant.DYNAMIC - ref).abs().max().item():.3g}"


def test_packing_round_trip_puts_first_value_in_high_nibble():
    codes = torch.randint(0, 16, (101,), dtype=torch.uint8)
    packed = quant.pack_nibbles(codes)
    assert packed.shape == (51,) and packed[0] == codes[0] * 16 + codes[1], f"{packed[0]} from {codes[:2].tolist()}"
    levels = quant.NF4_PAIRS[packed.long()].flatten()[:101]  # how dequantize_nf4 unpacks
    assert torch.equal(levels, torch.tensor(quant.NF4)[codes.long()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matches_bitsandbytes_codes(dtype):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    for W in _quant_cases():
        W, shape = W.to(dtype), tuple(W.shape)
        packed, ref = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type="nf4")
        ours = quant.quantize_nf4(W, blocksize=64, double_quant=False)
        assert packed.shape == (ours.packed.numel(), 1), f"{shape}: bnb packed shape {tuple(packed.shape)}"
        diff = (packed.flatten() != ours.packed).sum().item()
        assert diff == 0, f"{shape}: {diff} of {ours.packed.numel()} packed bytes differ"
        am_err = (ref.absmax - ours.absmax).abs().max().item()
        assert torch.equal(ref.absmax, ours.absmax), f"{shape}: absmax max diff {am_err:.3g}"
        if _bnb_dequant_is_reliable(shape):
            err = (_bnb_dequantize(packed, ref).float() - quant.dequantize_nf4(ours).float()).abs().max().item()
            assert err == 0, f"{shape}: dequantized max abs diff {err:.3g}"


def test_double_quant_matches_bitsandbytes_absmax():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    for W in [*_quant_cases(), torch.randn(1000, 1000)]:  # (1000, 1000): 15625 blocks, so 62 groups of 256
        shape = tuple(W.shape)
        packed, ref = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = quant.quantize_nf4(W, blocksize=64, double_quant=True)
        assert torch.equal(packed.flatten(), ours.packed), f"{shape}: packed bytes differ"
        diff = (ref.absmax != ours.absmax).sum().item()
        assert diff == 0, f"{shape}: {diff} of {ours.absmax.numel()} absmax codes differ"
        assert torch.equal(ref.state2.absmax, ours.scale), f"{shape}: scales {ref.state2.absmax} vs {ours.scale}"
        assert torch.equal(ref.offset, ours.offset), f"{shape}: offset {ref.offset.item()} vs {ours.offset.item()}"
        if _bnb_dequant_is_reliable(shape):
            err = (_bnb_dequantize(packed, ref) - quant.dequantize_nf4(ours)).abs().max().item()
            assert err == 0, f"{shape}: dequantized max abs diff {err:.3g}"


def test_all_zero_blocks_dequantize_to_zero_not_nan():
    W = torch.zeros(3, 100)  # one full and one partial block, both zero
    for dq in (False, True):
        What = quant.dequantize_nf4(quant.quantize_nf4(W, double_quant=dq))
        assert not What.isnan().any() and (What == 0).all(), f"double_quant={dq}: {What.abs().max()}"


def test_nf4_error_within_half_gap_plus_double_quant_error():
    W = torch.randn(96, 200, generator=torch.Generator().manual_seed(0))  # 300 blocks, the last one partial
    for dq in (False, True):
        state = quant.quantize_nf4(W, double_quant=dq)
        blocks = torch.nn.functional.pad(W.flatten(), (0, -W.numel() % 64)).view(-1, 64)
        m = blocks.abs().amax(1)  # (nb,) exact absmax
        m_hat = quant.dequantize_dynamic(state.absmax, state.scale, state.offset) if dq else state.absmax
        bound = (0.152 * m + (m_hat - m).abs()).repeat_interleave(64)[:W.numel()]  # NF4's largest half-gap is 0.152
        excess = ((quant.dequantize_nf4(state) - W).abs().flatten() - bound).max().item()
        assert excess <= 1e-6, f"double_quant={dq}: error exceeds the bound by {excess:.3g}"


def test_nf4_bits_per_param():
    model = torch.nn.Sequential(torch.nn.Linear(768, 768), torch.nn.Linear(768, 3072))
    bits = quant.bits_per_param(quant.quantize_model(model, skip=()))
    assert 4.12 <= bits <= 4.13, f"{bits:.4f} bits/param (SPEC: 4 + 8/64 + 32/(64*256) = 4.127)"
    plain = torch.nn.Linear(768, 768)
    plain_bits = quant.bits_per_param(torch.nn.Sequential(quant.Linear4bit.from_linear(plain, double_quant=False)))
    assert abs(plain_bits - 4.5) < 1e-9, f"{plain_bits:.4f} bits/param without double quant (4 + 32/64)"


def _conv1d(in_features, out_features):
    class Conv1D(torch.nn.Module):  # GPT-2 layout: weight (in, out), y = x W + b; quant matches it by class name
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.randn(in_features, out_features) * 0.02)  # (in, out)
            self.bias = torch.nn.Parameter(torch.randn(out_features))

        def forward(self, x):
            return x @ self.weight + self.bias

    return Conv1D()


def test_linear4bit_equals_linear_on_dequantized_weight():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48)
    for layer in (torch.nn.Linear(48, 40), _conv1d(48, 40)):
        q = quant.Linear4bit.from_linear(layer)
        W_hat = q.dequantized_weight()  # (out, in)
        assert (q.in_features, q.out_features, tuple(W_hat.shape)) == (48, 40, (40, 48))
        W = layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight
        assert torch.equal(W_hat, quant.dequantize_nf4(quant.quantize_nf4(W))), type(layer).__name__
        ref = torch.nn.functional.linear(x, W_hat, layer.bias)
        err = (q(x) - ref).abs().max().item()
        assert err <= 1e-6, f"{type(layer).__name__}: max abs diff {err:.3g}"
        assert q(x.bfloat16()).dtype == torch.bfloat16
        full = [t for t in list(q.parameters()) + list(q.buffers()) if t.is_floating_point() and t.numel() >= 48 * 40]
        assert not full and not any(p.requires_grad for p in q.parameters()), "a full-precision or trainable tensor"


def test_linear4bit_state_dict_round_trip():
    torch.manual_seed(0)
    for dq in (True, False):
        q = quant.Linear4bit.from_linear(torch.nn.Linear(100, 30), double_quant=dq)
        fresh = quant.Linear4bit(100, 30, bias=True, double_quant=dq)
        fresh.load_state_dict(q.state_dict())
        assert set(q.state_dict()) == {"packed", "absmax", "bias"} | ({"scale", "offset"} if dq else set())
        x = torch.randn(4, 100)
        assert torch.equal(fresh(x), q(x)), f"double_quant={dq}"


def test_quantize_model_skips_head():
    model = torch.nn.Module()
    model.attn = _conv1d(64, 192)
    model.mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model.head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    x = torch.randn(3, 64)
    ref = model.mlp(x)
    quant.quantize_model(model, skip=("head",))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.count(".") <= 1 and name}
    assert kinds == {"attn": "Linear4bit", "mlp": "Sequential", "mlp.0": "Linear4bit", "mlp.1": "GELU",
                     "mlp.2": "Linear4bit", "head": "Sequential", "head.0": "Linear", "head.1": "Linear"}, kinds
    assert (model.attn.in_features, model.attn.out_features) == (64, 192)
    rel = ((model.mlp(x) - ref).norm() / ref.norm()).item()
    assert rel < 0.2, f"quantized MLP relative error {rel:.3f}"
