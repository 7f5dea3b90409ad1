# SPDX-License-Identifier: Apache-2.0
"""4-bit formats: tables, packing, quantize/dequantize against the references, bitsandbytes
bit-compatibility (direct comparison when bitsandbytes is installed), double quantisation."""

import math

import pytest
import torch

import tilefuse
from tilefuse.reference import lowbit as ref

FMTS = ["nf4", "fp4", "e2m1", "int4"]

try:  # Optional cross-check; installed with `pip install --no-deps bitsandbytes==0.50.2`.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - any import failure just disables the cross-check
    bnbF = None
needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes not installed (optional)")


def test_tables_match_definitions():
    # NF4: sorted, [-1, 1], 0 exactly at code 7, midpoints are bitsandbytes' thresholds.
    nf4 = ref.code_table("nf4", torch.float64)
    assert torch.all(nf4[1:] > nf4[:-1]) and nf4[0] == -1 and nf4[15] == 1 and nf4[7] == 0
    mids = ((ref.code_table("nf4")[1:] + ref.code_table("nf4")[:-1]) / 2).tolist()
    assert mids == torch.tensor(ref._NF4_THRESHOLDS, dtype=torch.float32).tolist()
    # FP4 (bitsandbytes): sign bit 3, magnitudes by code.
    fp4 = ref.code_table("fp4") * 12  # float32 table: 0.0625 / 12 is not exact
    assert torch.allclose(fp4[:8], torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]), rtol=1e-7)
    assert torch.equal(fp4[8:], -fp4[:8])
    # E2M1 (OCP): magnitudes 0 .5 1 1.5 2 3 4 6.
    assert ref.code_table("e2m1")[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt", FMTS)
def test_kernel_tables_match_reference(fmt, cpu_isa):
    # Dequantising every code with scale 1 reads the C++ table out.
    codes = torch.arange(16, dtype=torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    zero = torch.zeros(1, dtype=torch.uint8) if fmt == "int4" else None
    out = torch.ops.tilefuse.dequantize_4bit(packed, torch.ones(1), zero, None, None, None, fmt,
                                             32, 256, [1, 16], torch.float32)
    assert torch.equal(out.view(-1), ref.code_table(fmt))


def test_dynamic_map():
    m = ref.dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.all(m[1:] >= m[:-1]) and m[-1] == 1.0 and m.min() > -1.0 and (m == 0).any()


@needs_bnb
def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(ref.dynamic_map(), bnbF.create_dynamic_map(signed=True))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape,block", [((64, 128), 64), ((37, 53), 64), ((5, 7), 32),
                                         ((3, 1000), 256), ((129,), 128), ((16, 4096), 4096)])
def test_quantize_matches_reference(fmt, shape, block, cpu_isa):
    w = torch.randn(shape) * 3
    packed, state = tilefuse.quantize_4bit(w, fmt, block)
    rp, rs, rz = ref.quantize_4bit(w, fmt, block)
    assert packed.dtype == torch.uint8 and packed.shape == rp.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(state.absmax, rs)
    if fmt == "int4":
        assert torch.equal(state.zero, rz)
    assert torch.equal(packed, rp)
    deq = tilefuse.dequantize_4bit(packed, state)
    assert deq.shape == w.shape and deq.dtype == w.dtype
    assert torch.equal(deq, ref.dequantize_4bit(rp, rs, fmt, block, w.shape, zero=rz))


@pytest.mark.parametrize("fmt", FMTS)
def test_all_zero_blocks_and_constant_blocks(fmt, cpu_isa):
    w = torch.randn(4, 128)
    w[1] = 0.0          # two all-zero blocks
    w[2, :64] = 0.25    # constant block
    packed, state = tilefuse.quantize_4bit(w, fmt, 64)
    deq = tilefuse.dequantize_4bit(packed, state)
    assert torch.equal(deq[1], torch.zeros(128))
    assert torch.isfinite(deq).all()
    if fmt != "e2m1":  # e2m1: 0.25 = 2^-2 is exact too; int4/nf4/fp4: absmax maps exactly
        assert torch.allclose(deq[2, :64], torch.full((64,), 0.25), rtol=1e-6)
    else:
        assert torch.equal(deq[2, :64], torch.full((64,), 0.25))


def test_e2m1_rounding_and_saturation():
    # Block amax 4 -> scale 2^(2-2) = 1: values are on the E2M1 grid directly.
    vals = torch.tensor([4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.26, 5.5, 0.0, -0.0,
                         3.0, 1.5, -4.0, 0.1] + [0.0] * 16)
    packed, state = tilefuse.quantize_4bit(vals, "e2m1", 32)
    assert state.absmax[0] == 1.0
    got = tilefuse.dequantize_4bit(packed, state)[:16].tolist()
    # ties to even: .25->0, .75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert got == [4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.5, 6.0, 0.0, 0.0, 3.0, 1.5, -4.0,
                   0.0]
    # amax 7.9 -> scale 2^(2-2)=1 as well; 7.9 saturates to 6 (MX semantics).
    packed, state = tilefuse.quantize_4bit(torch.tensor([7.9] + [0.0] * 31), "e2m1", 32)
    assert tilefuse.dequantize_4bit(packed, state)[0] == 6.0


@pytest.mark.parametrize("fmt,published", [("nf4", 0.072798), ("fp4", 0.096543)])
def test_accuracy_matches_bitsandbytes_published(fmt, published):
    # bitsandbytes' test_4bit_quant: randn(1024, 1024), block 64, mean absolute error.
    errs = []
    for _ in range(4):
        w = torch.randn(1024, 1024)
        packed, state = tilefuse.quantize_4bit(w, fmt, 64)
        errs.append((tilefuse.dequantize_4bit(packed, state) - w).abs().mean().item())
    assert abs(sum(errs) / len(errs) - published) / published < 0.02


def test_double_quant_reference_and_bounds(cpu_isa):
    w = torch.randn(300, 256)
    packed, st = tilefuse.quantize_4bit(w, "nf4", 64, double_quant=True)
    packed1, st1 = tilefuse.quantize_4bit(w, "nf4", 64)
    assert torch.equal(packed, packed1)  # codes do not depend on double quantisation
    assert st.absmax.dtype == torch.uint8 and st.nested_absmax.numel() == math.ceil(1200 / 256)
    offset = st1.absmax.mean()
    assert st.nested_offset == offset
    q, am2 = ref.quantize_blockwise_8bit(st1.absmax - offset, ref.dynamic_map(), 256)
    assert torch.equal(am2, st.nested_absmax)
    # bitsandbytes' search agrees with the exact nearest code except at rare near-ties.
    assert (q != st.absmax).float().mean() < 0.01
    recon = ref.dequantize_blockwise_8bit(st.absmax, st.nested_absmax, st.nested_code) + offset
    deq = tilefuse.dequantize_4bit(packed, st)
    assert torch.equal(deq, ref.dequantize_4bit(packed, recon, "nf4", 64, w.shape))
    assert ((recon - st1.absmax).abs() / st1.absmax).max() < 0.02


@needs_bnb
@pytest.mark.parametrize("shape,block", [((64, 128), 64), ((37, 53), 64), ((8, 4096), 256),
                                         ((33, 96), 128)])
def test_nf4_bit_identical_to_bitsandbytes(shape, block, cpu_isa):
    w = torch.randn(shape)
    bp, bs = bnbF.quantize_4bit(w, quant_type="nf4", blocksize=block)
    packed, state = tilefuse.quantize_4bit(w, "nf4", block)
    assert torch.equal(packed, bp) and torch.equal(state.absmax, bs.absmax)
    assert torch.equal(tilefuse.dequantize_4bit(bp, state), bnbF.dequantize_4bit(bp, bs))


@needs_bnb
def test_fp4_matches_bitsandbytes_up_to_documented_thresholds(cpu_isa):
    """We follow bitsandbytes' CUDA quantiser (float-literal thresholds, sign of tiny values);
    its CPU/default path bucketizes against exact midpoints and maps (0, 0.0026] to -0. The two
    differ only there: check every mismatch is one of those cases."""
    w = torch.randn(256, 192)
    bp, bs = bnbF.quantize_4bit(w, quant_type="fp4", blocksize=64)
    packed, state = tilefuse.quantize_4bit(w, "fp4", 64)
    assert torch.equal(state.absmax, bs.absmax)
    ours = ref.unpack_nibbles(packed, w.numel())
    theirs = ref.unpack_nibbles(bp, w.numel())
    y = (w.reshape(-1, 64) * (1.0 / bs.absmax[:, None])).reshape(-1)
    table = ref.code_table("fp4")
    bad = (ours != theirs).nonzero().view(-1)
    lit = torch.tensor(ref._FP4_THRESHOLDS, dtype=torch.float32)
    exact_mid = torch.tensor([0.0625 / 24, 1.03125 / 12, 2.5 / 12, 3.5 / 12, 5 / 12, 7 / 12,
                              10 / 12], dtype=torch.float32)
    for i in bad.tolist():
        a = y[i].abs()
        signed_zero = table[ours[i]] == 0 and table[theirs[i]] == 0
        between = ((a > torch.minimum(lit, exact_mid)) & (a <= torch.maximum(lit, exact_mid))).any()
        assert signed_zero or between, (i, y[i].item(), ours[i].item(), theirs[i].item())
    # bitsandbytes dequantises our packing like we do.
    bs_ours = bnbF.QuantState(absmax=state.absmax, shape=w.shape, dtype=w.dtype, blocksize=64,
                              code=bs.code, quant_type="fp4")
    assert torch.equal(bnbF.dequantize_4bit(packed, bs_ours),
                       tilefuse.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_double_quant_state_converts_from_bitsandbytes(fmt, cpu_isa):
    w = torch.randn(128, 512)
    bp, bs = bnbF.quantize_4bit(w, quant_type=fmt, blocksize=64, compress_statistics=True)
    state = tilefuse.QuantState.from_dict(bs.as_dict(packed=True))
    assert state.double_quant and state.fmt == fmt and tuple(state.shape) == (128, 512)
    # Same dequantised weight as bitsandbytes from its own state: converts without requantising.
    assert torch.equal(tilefuse.dequantize_4bit(bp, state), bnbF.dequantize_4bit(bp, bs))
    # Our double quantisation: same offset and nested absmax; 8-bit codes equal up to
    # bitsandbytes' CPU LUT approximation of its search (rare off-by-one codes).
    packed, ours = tilefuse.quantize_4bit(w, fmt, 64, double_quant=True)
    assert torch.equal(ours.nested_offset, bs.offset) and torch.equal(ours.nested_absmax,
                                                                      bs.state2.absmax)
    assert (ours.absmax.long() - bs.absmax.long()).abs().max() <= 1
    assert (ours.absmax != bs.absmax).float().mean() < 0.02
    # And our state dict is byte-identical to bitsandbytes' serialised form where codes agree.
    d_ours, d_bnb = ours.as_dict(), bs.as_dict(packed=True)
    assert set(d_ours) == set(d_bnb)
    key = f"quant_state.bitsandbytes__{fmt}"
    assert torch.equal(d_ours[key], d_bnb[key])


def test_quant_state_dict_round_trip():
    w = torch.randn(40, 96)
    for fmt, dq in [("nf4", True), ("fp4", False), ("int4", True), ("e2m1", False)]:
        packed, st = tilefuse.quantize_4bit(w, fmt, 32, double_quant=dq)
        st2 = tilefuse.QuantState.from_dict(st.as_dict())
        assert torch.equal(tilefuse.dequantize_4bit(packed, st2),
                           tilefuse.dequantize_4bit(packed, st))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantize_other_dtypes(dtype):
    w = torch.randn(16, 64).to(dtype)
    packed, st = tilefuse.quantize_4bit(w, "nf4", 64)
    p32, _ = tilefuse.quantize_4bit(w.float(), "nf4", 64)
    assert torch.equal(packed, p32) and st.dtype == dtype
    assert tilefuse.dequantize_4bit(packed, st).dtype == dtype


def test_bad_inputs():
    w = torch.randn(8, 64)
    packed, st = tilefuse.quantize_4bit(w, "nf4", 64)
    with pytest.raises(ValueError, match="fmt"):
        tilefuse.quantize_4bit(w, "nf3")
    with pytest.raises(ValueError, match="block_size"):
        tilefuse.quantize_4bit(w, "nf4", 48)
    with pytest.raises(ValueError, match="block_size"):
        tilefuse.quantize_4bit(w, "nf4", 8192)
    with pytest.raises(TypeError, match="w must be a floating"):
        tilefuse.quantize_4bit(torch.ones(4, dtype=torch.int32), "nf4")
    with pytest.raises(ValueError, match="double_quant"):
        tilefuse.quantize_4bit(w, "e2m1", double_quant=True)
    with pytest.raises(TypeError, match="packed must be uint8"):
        tilefuse.dequantize_4bit(packed.to(torch.int8), st)
    with pytest.raises(ValueError, match="packed has"):
        tilefuse.dequantize_4bit(packed[:-1], st)
    import dataclasses
    with pytest.raises(ValueError, match="absmax must have one entry per block"):
        tilefuse.dequantize_4bit(packed, dataclasses.replace(st, absmax=st.absmax[:-1]))
    with pytest.raises(TypeError, match="absmax must be float32"):
        tilefuse.dequantize_4bit(packed, dataclasses.replace(st, absmax=st.absmax.double()))
    with pytest.raises(ValueError, match="needs zero"):
        tilefuse.dequantize_4bit(packed, dataclasses.replace(st, fmt="int4"))
    with pytest.raises(ValueError, match="block_size"):
        tilefuse.dequantize_4bit(packed, dataclasses.replace(st, block_size=100))
    _, st_dq = tilefuse.quantize_4bit(w, "nf4", 64, double_quant=True)
    with pytest.raises(ValueError, match="given together"):
        tilefuse.dequantize_4bit(packed, dataclasses.replace(st_dq, nested_code=None))
    with pytest.raises(TypeError, match="uint8 codes"):
        tilefuse.dequantize_4bit(packed, dataclasses.replace(st_dq, absmax=st.absmax))
    with pytest.raises(ValueError, match="nested_code must have 256"):
        tilefuse.dequantize_4bit(packed, dataclasses.replace(st_dq, nested_code=torch.zeros(16)))
    with pytest.raises(TypeError, match="code must be float32"):
        torch.ops.tilefuse.quantize_blockwise_8bit(w, torch.zeros(256, dtype=torch.float64), 256)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_opcheck_quant_ops(fmt):
    w = torch.randn(24, 40)
    torch.library.opcheck(torch.ops.tilefuse.quantize_4bit.default, (w, fmt, 32))
    packed, st = tilefuse.quantize_4bit(w, fmt, 32, double_quant=True)
    torch.library.opcheck(torch.ops.tilefuse.dequantize_4bit.default,
                          (packed, *st._op_args(), torch.float32))
    torch.library.opcheck(torch.ops.tilefuse.quantize_blockwise_8bit.default,
                          (torch.randn(300), ref.dynamic_map(), 256))
    torch.library.opcheck(torch.ops.tilefuse.quantize_int8.default, (w,))


def test_compile_quantize_dequantize():
    w = torch.randn(32, 64)
    packed, st = tilefuse.quantize_4bit(w, "nf4", 64, double_quant=True)

    @torch.compile(fullgraph=True)
    def f(w, packed, absmax, nabs, ncode, noff):
        p2, a2, _ = torch.ops.tilefuse.quantize_4bit(w, "nf4", 64)
        d = torch.ops.tilefuse.dequantize_4bit(packed, absmax, None, nabs, ncode, noff, "nf4", 64,
                                               256, [32, 64], torch.float32)
        return p2, d

    p2, d = f(w, packed, st.absmax, st.nested_absmax, st.nested_code, st.nested_offset)
    assert torch.equal(p2, packed) and torch.equal(d, tilefuse.dequantize_4bit(packed, st))
