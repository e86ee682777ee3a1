"""The storage formats next to plain NF4 on CPU: FP4, double-quantized statistics, int8 row-wise.

Bit-exactness against bitsandbytes 0.50.2 (when installed) and against golden vectors it wrote
(tests/data/formats_golden.json, always), the format tables in csrc/quant_format.h, the Python
QuantStack API, the experts ops per format against the dequantized reference, opcheck,
torch.compile and the errors for statistics or formats that do not fit.
"""

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch

import moequant
from moequant import QuantStack, compress_statistics, dequant_expert, ops, quantize
from moequant.reference import experts_forward_reference

from conftest import HAS_BNB
from experts_cases import format_kwargs, in_format, make_case, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "..", "csrc", "quant_format.h")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (quant_type, double_quant) of every stack format
FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True), ("int8", False)]
FORMAT_IDS = ["nf4", "nf4+dq", "fp4", "fp4+dq", "int8"]

requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (golden vectors still run)")


def from_bits(values) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.uint32).view(np.float32).copy())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float tensors (NaN == NaN, +0 != -0)."""
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(HERE, "data", "formats_golden.json")) as f:
        return json.load(f)


def header_table(name: str) -> torch.Tensor:
    block = open(HEADER).read().split(f"#define {name}")[1]
    text = block.split("{", 1)[1].split("}", 1)[0].replace("\\", "")
    return torch.tensor([float(v.strip().rstrip("f")) for v in text.split(",") if v.strip()], dtype=torch.float32)


# ---- format tables ----------------------------------------------------------------------


def test_dynamic_map_matches_header(golden):
    assert same_bits(header_table("MOEQUANT_DYNAMIC_MAP_VALUES"), from_bits(golden["dynamic_map_bits"]))


@requires_bnb
def test_tables_rederived_from_bitsandbytes():
    import bitsandbytes.functional as F

    assert same_bits(header_table("MOEQUANT_DYNAMIC_MAP_VALUES"), F.create_dynamic_map(signed=True))
    fp4 = F.get_4bit_type("fp4", device="cpu")
    assert same_bits(header_table("MOEQUANT_FP4_VALUES"), fp4)
    order = torch.argsort(fp4)
    assert same_bits(header_table("MOEQUANT_FP4_MIDPOINTS"), (fp4[order[:-1]] + fp4[order[1:]]) / 2)
    # the rank -> code table packed into kFP4CodeOfRank
    packed = int(open(HEADER).read().split("kFP4CodeOfRank = ")[1].split("ull")[0], 16)
    assert [(packed >> (4 * r)) & 0xF for r in range(16)] == order.tolist()


# ---- golden vectors (no bitsandbytes needed) ----------------------------------------------


def test_fp4_golden(golden):
    b = golden["blocksize"]
    for case in golden["fp4"]:
        w = from_bits(case["input_bits"])
        s = quantize(w.view(1, b), "fp4", b, double_quant=False)
        assert s.packed.view(-1).tolist() == case["packed"]
        assert same_bits(s.absmax.view(-1), from_bits([case["absmax_bits"]]))


def test_double_quant_golden(golden):
    for case in golden["double_quant"]:
        absmax = from_bits(case["absmax_bits"])
        codes, scale, offset = ops.compress_statistics(absmax)
        assert codes.dtype == torch.uint8 and codes.tolist() == case["codes"]
        assert same_bits(scale, from_bits(case["scale_bits"]))
        assert same_bits(offset.view(1), from_bits([case["offset_bits"]]))
        # a stack of two matrices compresses each row on its own
        codes2, scale2, offset2 = ops.compress_statistics(torch.stack([absmax, absmax.flip(0)]))
        assert codes2[0].tolist() == case["codes"] and same_bits(scale2[0], scale) and same_bits(offset2[:1], offset.view(1))


def test_int8_golden(golden):
    for case in golden["int8"]:
        w = from_bits(case["input_bits"]).view(case["shape"])
        s = quantize(w, "int8")
        assert s.packed.dtype == torch.int8 and s.packed.view(-1).tolist() == case["codes"]
        assert same_bits(s.absmax, from_bits(case["row_absmax_bits"]))


def test_int8_edge_cases_pinned(golden):
    """What bitsandbytes stores for int8 edge rows (documented in the README)."""
    special = golden["int8"][1]
    s = quantize(from_bits(special["input_bits"]).view(special["shape"]), "int8")
    assert s.packed[0].tolist() == [0] * 8 and s.absmax[0].item() == 0.0  # all-zero row: 0 * Inf = NaN -> 0
    assert s.packed[1].tolist() == [0] * 8 and s.absmax[1].isnan()  # NaN row: all codes 0, absmax NaN
    assert s.packed[2].tolist() == [0] * 8 and s.absmax[2].isinf()  # Inf row: 127/Inf = 0 -> codes 0
    ties = quantize(from_bits(golden["int8"][0]["input_bits"]).view(2, 8), "int8")
    assert ties.packed[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]  # round half to even


def test_fp4_zero_codes_pinned():
    """+0 and -0 both store code 0; a tiny positive value stores code 8, a tiny negative one code 0
    (bitsandbytes' order of its two zero codes); both decode to +0."""
    w = torch.zeros(1, 64)
    w[0, :5] = torch.tensor([1.0, 0.0, -0.0, 1e-3, -1e-3])
    codes = quantize(w, "fp4", 64, double_quant=False).packed.view(-1).long()
    nibbles = torch.stack([codes >> 4, codes & 0xF], 1).view(-1)
    assert nibbles[:5].tolist() == [3, 0, 0, 8, 0]
    deq = dequant_expert(quantize(w, "fp4", 64, double_quant=False))
    assert same_bits(deq[0, 1:5], torch.zeros(4))


# ---- bit-exact against bitsandbytes ------------------------------------------------------


def bnb_default_dequantize_4bit(packed, state):
    """bitsandbytes' default-backend (PyTorch) dequantization of a 4-bit `packed` with its quant
    `state`: F.dequantize_4bit's steps (double-quantized statistics decoded first) with the default
    backend's kernel, which does not depend on the CPU's instruction set."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize,
                                    state.shape, state.dtype)


@requires_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_4bit_formats_match_bnb_per_expert(quant_type, dtype, blocksize):
    import bitsandbytes.functional as F

    w = (torch.randn(3, 40, 96) * 0.5).to(dtype)
    w[1, :4] = 0  # all-zero blocks
    w[2, 5, 7] = 100.0  # one outlier block
    plain = quantize(w, quant_type, blocksize, double_quant=False)
    dq = quantize(w, quant_type, blocksize, double_quant=True)
    assert torch.equal(plain.packed, dq.packed)
    for e in range(3):
        bp, st = F.quantize_4bit(w[e].flatten(), blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(plain.packed[e].view(-1), bp.view(-1))
        assert same_bits(plain.absmax[e], st.absmax)
        bp2, st2 = F.quantize_4bit(w[e].flatten(), blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(dq.absmax[e], st2.absmax)
        assert same_bits(dq.absmax_scale[e], st2.state2.absmax)
        assert same_bits(dq.absmax_offset[e].view(1), st2.offset.view(1))
        for stack, packed, state in ((plain, bp, st), (dq, bp2, st2)):
            got = dequant_expert(stack, e)
            ref = bnb_default_dequantize_4bit(packed, state).view(40, 96)  # in the weight's dtype
            assert same_bits(got, ref)
            # bitsandbytes' native CPU kernel agrees up to the sign of zero: on some CPUs (seen on one
            # without AVX-512) it decodes FP4's code 8 to -0.0, where its default backend and moequant
            # give +0.0.
            assert torch.equal(got, F.dequantize_4bit(packed, state).view(40, 96))


@requires_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_bnb_partial_groups_and_specials(quant_type):
    import bitsandbytes.functional as F

    # 300 blocks per matrix: one full group of 256 and a partial one; NaN and Inf blocks
    w = torch.randn(3, 300, 64)
    w[0, 3, 5] = float("nan")
    w[1, 299, 0] = float("inf")
    w[2] = w[2] * 1e-3
    s = quantize(w, quant_type, 64)
    assert s.absmax.shape == (3, 300) and s.absmax_scale.shape == (3, 2) and s.absmax_offset.shape == (3,)
    for e in range(3):
        _, st = F.quantize_4bit(w[e].flatten(), blocksize=64, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(s.absmax[e], st.absmax)
        assert same_bits(s.absmax_scale[e], st.state2.absmax) and same_bits(s.absmax_offset[e].view(1), st.offset.view(1))


@requires_bnb
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matches_bnb(dtype):
    import bitsandbytes.functional as F

    w = torch.randn(2, 24, 80).to(dtype)
    w[0, 3] = 0
    w[1, 4, :5] = torch.tensor([1.0, 0.5, -0.5, 1.5, 254.0]).to(dtype)
    s = quantize(w, "int8")
    assert s.packed.shape == (2, 24, 80) and s.absmax.shape == (2, 24) and not s.double_quant
    for e in range(2):
        q, stats, _ = torch.ops.bitsandbytes.int8_vectorwise_quant(w[e].clone(), 0.0)
        assert torch.equal(s.packed[e], q) and same_bits(s.absmax[e], stats)
        ref = F.int8_vectorwise_dequant(q, stats)
        assert same_bits(dequant_expert(s, e, torch.float32), ref)
        assert torch.equal(dequant_expert(s, e, torch.bfloat16), ref.to(torch.bfloat16))


# ---- API, sizes, round trips ---------------------------------------------------------------


def test_reconstruction_error_ordering():
    """Gaussian weights: int8 < nf4 <~ fp4, double quant costs nearly nothing (pinned)."""
    w = torch.randn(4, 256, 512)
    err = {}
    for qt, dq in FORMATS:
        s = quantize(w, qt, 64, double_quant=dq)
        err[(qt, dq)] = ((s.dequantize(torch.float32) - w).norm() / w.norm()).item()
    assert err[("int8", False)] < 0.01 < err[("nf4", False)] < err[("fp4", False)] < 0.15
    assert err[("int8", False)] < err[("nf4", False)] / 5
    for qt in ("nf4", "fp4"):
        assert err[(qt, False)] <= err[(qt, True)] < err[(qt, False)] * 1.01


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_bytes_per_weight(fmt):
    qt, dq = fmt
    w = torch.randn(4, 128, 256)
    s = quantize(w, qt, 64, double_quant=dq)
    nb = 128 * 256 // 64
    expected = {("nf4", False): 0.5 + 4 / 64, ("fp4", False): 0.5 + 4 / 64,
                ("int8", False): 1.0 + 4 / 256}.get(fmt, 0.5 + (nb + 4 * 2 + 4) / (128 * 256))
    assert s.bytes_per_weight == pytest.approx(expected)
    assert s.nbytes() == moequant.formats.stack_nbytes(w.shape, 64, qt, dq)
    assert s.format == (f"{qt}+dq" if dq else qt)


def test_double_quant_default_and_compress_statistics():
    w = torch.randn(2, 32, 128)
    assert quantize(w).double_quant and quantize(w, "fp4").double_quant and not quantize(w, "int8").double_quant
    assert not moequant.quantize_nf4(w).double_quant
    later = compress_statistics(quantize(w, double_quant=False))
    now = quantize(w)
    for a, b in zip(later.tensors(), now.tensors()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="int8"):
        compress_statistics(quantize(w, "int8"))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_state_dict_round_trip(fmt):
    qt, dq = fmt
    s = quantize(torch.randn(3, 16, 128).to(torch.bfloat16), qt, 32, double_quant=dq)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    back = QuantStack.from_state_dict(torch.load(buf, weights_only=True), quant_type=qt, double_quant=dq)
    assert back.format == s.format and back.dtype == torch.bfloat16 and back.blocksize == 32
    assert torch.equal(back.dequantize(), s.dequantize())
    assert torch.equal(s.to("cpu").dequantize(expert=1), s.dequantize()[1])


def test_state_dict_format_mismatch_is_an_error():
    state = quantize(torch.randn(2, 16, 64), "fp4").state_dict()
    with pytest.raises(ValueError, match=r"saved as 'fp4\+dq', not quant_type='nf4'"):
        QuantStack.from_state_dict(state, quant_type="nf4")
    with pytest.raises(ValueError, match="with double-quantized statistics.*double_quant=False"):
        QuantStack.from_state_dict(state, double_quant=False)
    int8 = quantize(torch.randn(2, 16, 64), "int8").state_dict()
    with pytest.raises(ValueError, match="saved as 'int8'"):
        QuantStack.from_state_dict(int8, quant_type="nf4")
    # a state without quant_type (earlier versions) is plain NF4
    old = moequant.quantize_nf4(torch.randn(2, 16, 64)).state_dict()
    del old["quant_type"]
    assert QuantStack.from_state_dict(old, quant_type="nf4", double_quant=False).format == "nf4"
    broken = dict(state, absmax=state["absmax"].float())
    with pytest.raises(ValueError, match="absmax is torch.float32"):
        QuantStack.from_state_dict(broken)
    # a state missing a tensor names it (not a bare KeyError)
    for key in ("packed", "absmax", "blocksize", "absmax_offset"):
        partial = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ValueError, match=f"the state lacks '{key}'"):
            QuantStack.from_state_dict(partial)


def test_python_format_errors():
    w = torch.randn(2, 16, 64)
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4', 'int8'\), got 'int4'"):
        quantize(w, "int4")
    with pytest.raises(ValueError, match="double_quant=True needs a 4-bit quant_type.*quant_type='int8'"):
        quantize(w, "int8", double_quant=True)
    a, b = quantize(w, "nf4"), quantize(w.transpose(1, 2).contiguous(), "int8")
    with pytest.raises(ValueError, match="gate_up and down must share a quant_type, got 'nf4' and 'int8'"):
        moequant.experts_forward(torch.randn(3, 64), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), a, b)


# ---- op-level errors ------------------------------------------------------------------------


def test_op_errors():
    s = quantize(torch.randn(2, 16, 128), "nf4", 64)  # 32 blocks per matrix -> 1 group
    p, a, sc, off = s.packed, s.absmax, s.absmax_scale, s.absmax_offset
    with pytest.raises(RuntimeError, match=r'quant_type must be one of "nf4", "fp4", "int8", got "nf8"'):
        ops.dequant_expert(p, a, 64, torch.float32, None, "nf8", sc, off)
    with pytest.raises(RuntimeError, match=r'quant_type must be one of "nf4", "fp4", "int8", got "q4"'):
        ops.quantize_nf4(torch.randn(4, 64), 64, "q4")
    with pytest.raises(RuntimeError, match="absmax is uint8 \\(double-quantized\\), so absmax_scale and absmax_offset must be given"):
        ops.dequant_expert(p, a, 64, torch.float32, None, "nf4")
    with pytest.raises(RuntimeError, match=r"absmax_scale must be float32 \[2, 1\]"):
        ops.dequant_expert(p, a, 64, torch.float32, None, "nf4", sc.view(2, 1, 1), off)
    with pytest.raises(RuntimeError, match=r"absmax_scale must be float32 \[2, 1\]"):
        ops.dequant_expert(p, a, 64, torch.float32, None, "nf4", sc.double(), off)
    with pytest.raises(RuntimeError, match=r"absmax_offset must be float32 \[2\]"):
        ops.dequant_expert(p, a, 64, torch.float32, None, "nf4", sc, off[:1])
    with pytest.raises(RuntimeError, match=r"absmax must have shape \[2, 32\]"):
        ops.dequant_expert(p, a[:, :16], 64, torch.float32, None, "nf4", sc, off)
    with pytest.raises(RuntimeError, match="absmax must be float32 \\(plain statistics\\) or uint8"):
        ops.dequant_expert(p, a.to(torch.int32), 64, torch.float32, None, "nf4", sc, off)
    plain = quantize(torch.randn(2, 16, 128), "nf4", 64, double_quant=False)
    with pytest.raises(RuntimeError, match="only for double-quantized statistics"):
        ops.dequant_expert(plain.packed, plain.absmax, 64, torch.float32, None, "nf4", sc, off)
    q = quantize(torch.randn(2, 16, 128), "int8")
    with pytest.raises(RuntimeError, match="int8 stacks have no double-quantized statistics"):
        ops.dequant_expert(q.packed, a[:, :16], 64, torch.float32, None, "int8", sc, off)
    with pytest.raises(RuntimeError, match=r'packed must be int8 \[..., N, K\] for quant_type "int8"'):
        ops.dequant_expert(p, q.absmax, 64, torch.float32, None, "int8")
    with pytest.raises(RuntimeError, match=r'packed must be uint8 \[..., N, K/2\] for quant_type "nf4"'):
        ops.dequant_expert(q.packed, q.absmax, 64, torch.float32, None, "nf4")
    with pytest.raises(RuntimeError, match=r'absmax must have shape \[2, 16\] for quant_type "int8"'):
        ops.dequant_expert(q.packed, q.absmax[:, :8], 64, torch.float32, None, "int8")
    with pytest.raises(RuntimeError, match="compress_statistics: absmax must be float32"):
        ops.compress_statistics(a)
    empty_codes, empty_scale, empty_offset = ops.compress_statistics(torch.empty(3, 0))
    assert empty_codes.shape == (3, 0) and empty_scale.shape == (3, 0) and empty_offset.isnan().all()


# ---- experts ops per format ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS[1:], ids=FORMAT_IDS[1:])
@pytest.mark.parametrize("layout", ["plain", "transposed_interleaved"])
@pytest.mark.parametrize("lora", [False, True])
def test_experts_match_reference_per_format(fmt, layout, lora):
    case = make_case(transposed=layout != "plain", interleaved=layout != "plain", bias=layout != "plain",
                     lora=(lora, lora), activation="swiglu_oai" if layout != "plain" else "silu", sentinels=True)
    case = in_format(case, *fmt)
    kw = format_kwargs(case)
    out = ops.experts_forward(*case.args(), **kw)
    ref = experts_forward_reference(*case.args(), **kw)
    assert rel_err(out, ref) < 1e-5
    # the reference really decodes this format: plain-NF4 weights give another result
    nf4_ref = experts_forward_reference(*make_case(transposed=layout != "plain", interleaved=layout != "plain",
                                                   bias=layout != "plain", lora=(lora, lora), sentinels=True,
                                                   activation="swiglu_oai" if layout != "plain" else "silu").args(),
                                        **case.kwargs)
    assert rel_err(ref, nf4_ref) > 1e-4
    grad = torch.randn_like(out)
    inputs = case.differentiable()
    for g, w in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert rel_err(g, w) < 2e-5
    # the typed wrapper passes the format through
    typed = moequant.experts_forward(
        case.hidden, case.index, case.weights, case.gate_up, case.down,
        **{k: v for k, v in case.kwargs.items() if k == "activation" or k in ("transposed", "interleaved", "gate_up_bias", "down_bias")},
        gate_up_lora=(case.kwargs["gate_up_lora_A"], case.kwargs["gate_up_lora_B"], case.kwargs["gate_up_lora_scaling"]) if lora else None,
        down_lora=(case.kwargs["down_lora_A"], case.kwargs["down_lora_B"], case.kwargs["down_lora_scaling"]) if lora else None)
    torch.testing.assert_close(typed, out)


def test_experts_mixed_double_quant_per_projection():
    case = make_case(lora=(True, False))
    case = dataclasses.replace(case, gate_up=compress_statistics(case.gate_up))  # down stays plain
    kw = format_kwargs(case)
    assert kw["down_absmax_scale"] is None and kw["gate_up_absmax_scale"] is not None
    out = ops.experts_forward(*case.args(), **kw)
    ref = experts_forward_reference(*case.args(), **kw)
    assert rel_err(out, ref) < 1e-5


def test_experts_op_format_errors():
    case = in_format(make_case(requires_grad=False), "nf4", True)
    kw = format_kwargs(case)
    with pytest.raises(RuntimeError, match='quant_type must be one of "nf4", "fp4", "int8", got "int4"'):
        ops.experts_forward(*case.args(), **dict(kw, quant_type="int4"))
    with pytest.raises(RuntimeError, match="gate_up_absmax is uint8 \\(double-quantized\\), so gate_up_absmax_scale"):
        ops.experts_forward(*case.args(), **dict(kw, gate_up_absmax_scale=None, gate_up_absmax_offset=None))
    with pytest.raises(RuntimeError, match="gate_up_absmax_scale and gate_up_absmax_offset must be given"):
        ops.experts_forward(*case.args(), **dict(kw, gate_up_absmax_offset=None))
    with pytest.raises(RuntimeError, match=r"down_absmax_scale must be float32 \[6, 1\]"):
        ops.experts_forward(*case.args(), **dict(kw, down_absmax_scale=kw["down_absmax_scale"][:3]))
    with pytest.raises(RuntimeError, match='gate_up_packed must be int8 \\[E, N, K\\] for quant_type "int8"'):
        ops.experts_forward(*case.args(), **dict(kw, quant_type="int8"))
    i8 = in_format(make_case(requires_grad=False), "int8", False)
    with pytest.raises(RuntimeError, match="int8 stacks have no double-quantized statistics"):
        ops.experts_forward(*i8.args()[:3], i8.gate_up.packed, case.gate_up.absmax[:, :64], *i8.args()[5:],
                            **dict(format_kwargs(i8), gate_up_absmax_scale=kw["gate_up_absmax_scale"],
                                   gate_up_absmax_offset=kw["gate_up_absmax_offset"]))


# ---- opcheck, torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_opcheck_stack_ops(fmt):
    qt, dq = fmt
    w = torch.randn(3, 16, 128, dtype=torch.bfloat16)
    torch.library.opcheck(ops.quantize_nf4.default, (w, 64, qt))
    s = quantize(w, qt, 64, double_quant=dq)
    args = (s.packed, s.absmax, 64)
    stats = (qt, s.absmax_scale, s.absmax_offset)
    torch.library.opcheck(ops.dequant_expert.default, (*args, torch.float32, None, *stats))
    torch.library.opcheck(ops.dequant_expert.default, (*args, torch.bfloat16, 2, *stats))
    if qt != "int8":
        plain = quantize(w, qt, 64, double_quant=False)
        torch.library.opcheck(ops.compress_statistics.default, (plain.absmax,))
        torch.library.opcheck(ops.compress_statistics.default, (plain.absmax[0],))  # 2-D weight: 0-d offset


@pytest.mark.parametrize("fmt", [("nf4", True), ("fp4", True), ("int8", False)], ids=["nf4+dq", "fp4+dq", "int8"])
def test_opcheck_experts_ops(fmt):
    case = in_format(make_case(T=6, lora=(True, True), bias=True), *fmt)
    torch.library.opcheck(ops.experts_forward.default, case.args(), format_kwargs(case))
    nograd = in_format(make_case(T=6, lora=(True, True), bias=True, requires_grad=False), *fmt)
    kw = format_kwargs(nograd)
    torch.library.opcheck(ops._experts_forward_train.default, nograd.args(), kw)
    out, h = ops._experts_forward_train(*nograd.args(), **kw)
    torch.library.opcheck(ops.experts_backward.default, (torch.randn_like(out), *nograd.args()[:3], h, *nograd.args()[3:]),
                          kw)


def test_compile_fullgraph_double_quant():
    torch._dynamo.reset()
    case = in_format(make_case(lora=(True, False), bias=True, requires_grad=False), "nf4", True)
    kw = format_kwargs(case)
    lora_a = kw.pop("gate_up_lora_A").clone().requires_grad_()

    def f(hidden, index, weights, a):
        return ops.experts_forward(hidden, index, weights, *case.args()[3:], **kw, gate_up_lora_A=a) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = case.hidden.clone().requires_grad_()
    x2 = case.hidden.clone().requires_grad_()
    eager = f(x1, case.index, case.weights, lora_a)
    comp = compiled(x2, case.index, case.weights, lora_a)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(torch.autograd.grad(comp.sum(), [x2, lora_a]), torch.autograd.grad(eager.sum(), [x1, lora_a])):
        torch.testing.assert_close(a, b)
    g = torch.compile(lambda a: ops.compress_statistics(a), fullgraph=True, dynamic=True, backend="aot_eager")
    for absmax in (case.gate_up.dequantize().abs().amax(-1), torch.rand(3, 300)):
        for x, y in zip(g(absmax), ops.compress_statistics(absmax)):
            assert torch.equal(x, y)


# ---- parametrization ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_parametrization_reads_dequantized_and_keeps_statistics(fmt):
    from moequant.integrations.parametrize import is_quantized, quant_stack_of, quantize_parameter

    qt, dq = fmt
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(2, 32, 64, dtype=torch.bfloat16))
    stack = quantize_parameter(module, "w", 32, quant_type=qt, double_quant=dq)
    assert is_quantized(module, "w") and stack.format == (f"{qt}+dq" if dq else qt)
    assert torch.equal(module.w, stack.dequantize())
    keys = set(module.state_dict())
    assert ("parametrizations.w.0.absmax_scale" in keys) == dq and "parametrizations.w.0.absmax" in keys
    module.half()
    back = quant_stack_of(module, "w")
    assert back.dtype == torch.float16 and module.w.dtype == torch.float16
    assert back.absmax.dtype == stack.absmax.dtype
    if dq:
        assert back.absmax_scale.dtype == torch.float32 and back.absmax_offset.dtype == torch.float32
    assert torch.equal(module.w, stack.dequantize(torch.float16))


def test_quant_stack_or_none():
    """The experts forward's one-walk lookup: the stack quant_stack_of gives for a quantized
    parameter, None for a plain one, one parametrized by something else, or a module without any."""
    from torch.nn.utils import parametrize

    from moequant.integrations.parametrize import quant_stack_of, quant_stack_or_none, quantize_parameter

    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    module = torch.nn.Module()
    assert quant_stack_or_none(module, "w") is None
    module.w = torch.nn.Parameter(torch.randn(2, 32, 64))
    module.v = torch.nn.Parameter(torch.randn(2, 32, 64))
    parametrize.register_parametrization(module, "v", Double())
    assert quant_stack_or_none(module, "w") is None and quant_stack_or_none(module, "v") is None
    quantize_parameter(module, "w", 32, quant_type="nf4", double_quant=True)
    found, expected = quant_stack_or_none(module, "w"), quant_stack_of(module, "w")
    assert found == expected and found.packed is module.parametrizations.w.original
    assert quant_stack_or_none(module, "v") is None
    for name in ("v", "u"):  # parametrized otherwise, and no such parameter
        with pytest.raises(ValueError, match=f"Module.{name} is not quantized by moequant"):
            quant_stack_of(module, name)
