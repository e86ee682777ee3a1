"""experts_forward / experts_backward on CPU against the plain-PyTorch reference and autograd."""

import inspect

import pytest
import torch

from moequant import ops
from moequant.experts import experts_op_args
from moequant.reference import experts_forward_reference

from experts_cases import make_case, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def check_against_reference(case, dtype):
    out = ops.experts_forward(*case.args(), **case.kwargs)
    ref = experts_forward_reference(*case.args(), **case.kwargs)
    assert out.shape == case.hidden.shape and out.dtype == case.hidden.dtype
    assert rel_err(out, ref) < TOL[dtype]
    grad = torch.randn_like(out)
    inputs = case.differentiable()
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for g, w, t in zip(got, want, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert rel_err(g, w) < TOL[dtype] * 2


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "swiglu_oai"])
@pytest.mark.parametrize("layout", ["plain", "transposed_interleaved", "interleaved"])
@pytest.mark.parametrize("lora", [(False, False), (True, False), (False, True), (True, True)])
def test_options_fp32(activation, layout, lora):
    case = make_case(activation=activation, transposed=layout == "transposed_interleaved",
                     interleaved=layout != "plain", bias=layout != "plain", lora=lora, dtype=torch.float32)
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("routing", ["uniform", "skewed"])
def test_dtypes_and_routing(dtype, routing):
    case = make_case(dtype=dtype, routing=routing, lora=(True, True), bias=True, sentinels=True)
    check_against_reference(case, dtype)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_top_k(k):
    check_against_reference(make_case(k=k, E=8), torch.float32)


@pytest.mark.parametrize("T", [0, 1, 2])
def test_tiny_token_counts(T):
    case = make_case(T=T, lora=(True, True))
    out = ops.experts_forward(*case.args(), **case.kwargs)
    assert out.shape == (T, 64)
    if T:
        check_against_reference(case, torch.float32)
    else:
        out.sum().backward()
        assert case.hidden.grad.shape == (0, 64)
        assert torch.equal(case.kwargs["down_lora_A"].grad, torch.zeros_like(case.kwargs["down_lora_A"]))


def test_int32_index_and_sentinels_contribute_zero():
    case = make_case(index_dtype=torch.int32, sentinels=True)
    check_against_reference(case, torch.float32)
    # Dropping the sentinel slots (weight 0 instead) gives the same output.
    idx = case.index.clone()
    w = case.weights.detach().clone()
    sentinel = idx >= 6
    w[sentinel] = 0
    idx[sentinel] = 0
    a = ops.experts_forward(*case.args(), **case.kwargs)
    b = ops.experts_forward(case.hidden, idx, w, *case.args()[3:], **case.kwargs)
    torch.testing.assert_close(a, b)


# The CPU kernel reads LoRA factors as given, converting one routed expert's at a time: float32
# factors on bf16/fp16 inputs, and B as PEFT passes it at inference (an expert-minor view of its
# [out, r*E] storage), give what contiguous float32 copies give, forward and backward.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_factors_as_given(dtype):
    case = make_case(T=9, E=8, k=2, dtype=dtype, lora=(True, True), rank=6, bias=True, requires_grad=False)
    names = ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B")
    contiguous = {n: case.kwargs[n].float() for n in names}
    as_given = {n: (f.permute(1, 2, 0).contiguous().permute(2, 0, 1) if n.endswith("_B") else f)
                for n, f in contiguous.items()}
    assert not as_given["down_lora_B"].is_contiguous()
    results = []
    for factors in (contiguous, as_given):
        leaves = {n: f.detach().requires_grad_() for n, f in factors.items()}
        out = ops.experts_forward(*case.args(), **dict(case.kwargs, **leaves))
        grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
        results.append((out, grads))
    (out, grads), (out_given, grads_given) = results
    torch.testing.assert_close(out_given, out)  # the dtype's own tolerance: BLAS may sum in another order
    for g, g_given in zip(grads, grads_given):
        assert g_given.dtype == torch.float32
        torch.testing.assert_close(g_given, g)
    ref = experts_forward_reference(*case.args(), **dict(case.kwargs, **contiguous))
    assert rel_err(out, ref) < TOL[dtype]


def test_zero_token_experts_get_zero_lora_grads():
    case = make_case(routing="skewed", lora=(True, True), E=8, k=2)
    out = ops.experts_forward(*case.args(), **case.kwargs)
    out.square().sum().backward()
    idle = [e for e in range(8) if not (case.index == e).any()]
    assert idle, "the skewed case must leave some experts idle"
    for name in ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"):
        g = case.kwargs[name].grad
        assert torch.count_nonzero(g[idle]) == 0
        assert torch.count_nonzero(g) > 0


def test_gradcheck_fp64():
    case = make_case(T=5, H=32, I=16, E=3, k=2, dtype=torch.float64, bias=True, lora=(True, True), rank=2,
                     activation="gelu_tanh", sentinels=True)
    names = ["gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B"]
    packed = case.args()[3:]

    def f(hidden, weights, a1, b1, a2, b2):
        kw = dict(case.kwargs, **dict(zip(names, (a1, b1, a2, b2))))
        return ops.experts_forward(hidden, case.index, weights, *packed, **kw)

    assert torch.autograd.gradcheck(f, tuple(case.differentiable()), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_swiglu_oai_clamp_region_gradcheck():
    # Large weights push gate/up past the clamp limit, exercising both sides of it.
    case = make_case(T=6, H=32, I=16, E=3, k=2, dtype=torch.float64, activation="swiglu_oai", transposed=True,
                     interleaved=True, bias=True, weight_scale=3.0)
    packed = case.args()[3:]
    h = torch.ops.moequant._experts_forward_train(*case.args(), **case.kwargs)[1]
    assert (h.abs() > 7).any() and (h.abs() < 7).any()

    def f(hidden, weights):
        return ops.experts_forward(hidden, case.index, weights, *packed, **case.kwargs)

    assert torch.autograd.gradcheck(f, (case.hidden, case.weights), eps=1e-7, atol=1e-5, rtol=1e-4)


def test_deterministic_backward():
    case = make_case(lora=(True, True), T=40, E=8, k=4)
    grads = []
    for _ in range(2):
        out = ops.experts_forward(*case.args(), **case.kwargs)
        grads.append(torch.autograd.grad(out, case.differentiable(), torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_backward_without_saved_gate_up_out_matches():
    case = make_case(lora=(True, True), bias=True, requires_grad=False)
    out, h = torch.ops.moequant._experts_forward_train(*case.args(), **case.kwargs)
    assert torch.equal(out, ops.experts_forward(*case.args(), **case.kwargs))
    g = torch.randn_like(out)
    with_saved = ops.experts_backward(g, *case.args()[:3], h, *case.args()[3:], **case.kwargs)
    recomputed = ops.experts_backward(g, *case.args()[:3], None, *case.args()[3:], **case.kwargs)
    for a, b in zip(with_saved, recomputed):
        torch.testing.assert_close(a, b)


def test_no_grad_saves_nothing():
    case = make_case()
    with torch.no_grad():
        out = ops.experts_forward(*case.args(), **case.kwargs)
    assert out.grad_fn is None
    out = ops.experts_forward(*case.args(), **case.kwargs)
    assert out.grad_fn is not None


def test_forward_saves_no_dequantized_weight():
    case = make_case(T=8, H=64, I=32, E=4, k=2)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.experts_forward(*case.args(), **case.kwargs)
    # Only the inputs themselves, empty placeholders for absent options, and gate_up_out [T*k, 2I].
    input_ptrs = {t.data_ptr() for t in case.args()}
    new = [t for t in saved if t.data_ptr() not in input_ptrs and t.numel() > 0]
    assert [tuple(t.shape) for t in new] == [(16, 64)]


@pytest.mark.parametrize("lora", [False, True])
def test_opcheck(lora):
    case = make_case(T=6, lora=(lora, lora), bias=True)
    torch.library.opcheck(ops.experts_forward.default, case.args(), case.kwargs)
    nograd = make_case(T=6, lora=(lora, lora), bias=True, requires_grad=False)
    # The internal ops are called below autograd (by experts_forward's autograd kernel), so they
    # are checked with inputs that do not require grad.
    torch.library.opcheck(ops._experts_forward_train.default, nograd.args(), nograd.kwargs)
    out, h = ops._experts_forward_train(*nograd.args(), **nograd.kwargs)
    torch.library.opcheck(ops.experts_backward.default,
                          (torch.randn_like(out), *nograd.args()[:3], h, *nograd.args()[3:]), nograd.kwargs)


class ExpertsModule(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.lora_a = torch.nn.Parameter(case.kwargs["gate_up_lora_A"].detach().clone())
        self.lora_b = torch.nn.Parameter(case.kwargs["gate_up_lora_B"].detach().clone())

    def forward(self, hidden, index, weights):
        c = self.case
        kw = dict(c.kwargs, gate_up_lora_A=self.lora_a, gate_up_lora_B=self.lora_b)
        return ops.experts_forward(hidden, index, weights, *c.args()[3:], **kw) * 2.0 + hidden


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    case = make_case(lora=(True, False), bias=True, requires_grad=False)
    module = ExpertsModule(case)
    compiled = torch.compile(module, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for T in (12, 9):
        c2 = make_case(T=T, lora=(True, False), bias=True, requires_grad=False)
        x1 = c2.hidden.clone().requires_grad_()
        x2 = c2.hidden.clone().requires_grad_()
        w1 = c2.weights.clone().requires_grad_()
        w2 = c2.weights.clone().requires_grad_()
        eager = module(x1, c2.index, w1)
        comp = compiled(x2, c2.index, w2)
        torch.testing.assert_close(comp, eager)
        ge = torch.autograd.grad(eager.sum(), [x1, w1, module.lora_a, module.lora_b])
        gc = torch.autograd.grad(comp.sum(), [x2, w2, module.lora_a, module.lora_b])
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b)


def test_compile_inductor_inference():
    torch._dynamo.reset()
    case = make_case(requires_grad=False)
    f = torch.compile(lambda h, i, w: ops.experts_forward(h, i, w, *case.args()[3:], **case.kwargs).relu(),
                      fullgraph=True)
    torch.testing.assert_close(f(*case.args()[:3]), ops.experts_forward(*case.args(), **case.kwargs).relu())


def test_bad_inputs():
    c = make_case(requires_grad=False)
    args, kw = list(c.args()), dict(c.kwargs)

    def call(**over):
        a = list(args)
        names = ["hidden", "index", "weights", "gu_p", "gu_a", "d_p", "d_a"]
        for i, n in enumerate(names):
            if n in over:
                a[i] = over.pop(n)
        return ops.experts_forward(*a, **dict(kw, **over))

    bad_index = c.index.clone()
    bad_index[2, 1] = -1
    with pytest.raises(RuntimeError, match="top_k_index must be >= 0"):
        call(index=bad_index)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        call(index=c.index.float())
    with pytest.raises(RuntimeError, match="top_k_weights must have the shape"):
        call(weights=c.weights[:, :2])
    with pytest.raises(RuntimeError, match="hidden_states must be a float tensor"):
        call(hidden=c.hidden[0])
    with pytest.raises(RuntimeError, match="gate_up_packed must hold a logical"):
        call(hidden=torch.randn(12, 32))
    with pytest.raises(RuntimeError, match="same number of experts"):
        call(d_p=c.down.packed[:3], d_a=c.down.absmax[:3])
    with pytest.raises(RuntimeError, match="activation must be one of"):
        call(activation="relu")
    with pytest.raises(RuntimeError, match="must be given together"):
        call(gate_up_lora_A=torch.randn(6, 4, 64))
    with pytest.raises(RuntimeError, match="LoRA ranks disagree"):
        call(gate_up_lora_A=torch.randn(6, 4, 64), gate_up_lora_B=torch.randn(6, 64, 5))
    with pytest.raises(RuntimeError, match=r"down_lora_A must have shape \[6, r, 32\]"):
        call(down_lora_A=torch.randn(6, 4, 64), down_lora_B=torch.randn(6, 64, 4))
    with pytest.raises(RuntimeError, match=r"gate_up_bias must have shape \[6, 64\]"):
        call(gate_up_bias=torch.randn(6, 32))
    with pytest.raises(RuntimeError, match="must be on"):
        call(weights=c.weights.to("meta"))
    with pytest.raises(RuntimeError, match="absmax must have shape"):
        call(gu_a=c.gate_up.absmax[:, :-1])


@pytest.mark.parametrize("op_name", ["experts_forward", "_experts_forward_train"])
def test_experts_op_args_follows_the_schema(op_name):
    # The hot paths call the op positionally through experts_op_args; a schema change that the
    # helper does not follow would pass arguments to the wrong parameters.
    schema = getattr(ops, op_name).default._schema
    params = list(inspect.signature(experts_op_args).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for p, a in zip(params, schema.arguments):
        if a.has_default_value():
            assert p.default == a.default_value, p.name
        else:
            assert p.default is inspect.Parameter.empty, p.name
    names = [p.name for p in params]
    sentinel_args = experts_op_args(*range(7), **{n: n for n in names[7:]})
    assert list(sentinel_args) == list(range(7)) + names[7:]


def test_experts_op_args_gives_the_keyword_call():
    case = make_case(transposed=True, interleaved=True, bias=True, lora=(True, True), dtype=torch.float32)
    by_keyword = ops.experts_forward(*case.args(), **case.kwargs)
    positional = ops.experts_forward(*experts_op_args(*case.args(), **case.kwargs))
    assert torch.equal(by_keyword, positional)
