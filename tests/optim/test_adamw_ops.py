"""The fused AdamW ops (peftx::adamw_step, peftx::adamw8bit_step) against their pure-torch references,
bit for bit: dtypes, odd and tail sizes, many tensors per call, non-contiguous inputs, maximize, the
8-bit state's non-finite blocks, opcheck, torch.compile, and bad input."""

import pytest
import torch

from peftx.ops import optim as optim_ops
from peftx.ops import optim_reference
from peftx.ops.optim_reference import (DYNAMIC_CODE, UNSIGNED_DYNAMIC_CODE, dequantize_blockwise_ref,
                                       quantize_blockwise_ref)

from .conftest import HYPER, clone_all, make_8bit_case, make_fp32_case



def _on_cpu(ref):
    """The in-place reference run on CPU copies of its tensor arguments, results copied back. The
    ops promise torch's separately rounded operations, which is what torch computes on the CPU; its
    CUDA kernels contract a * b + c into FMAs, so on a GPU the op is held to the CPU reference (bit
    for bit), not to torch-on-CUDA (which differs from it in the last bit)."""
    def run(*args, **kw):
        cpu = [[t.cpu() for t in a] if isinstance(a, (list, tuple)) else a for a in args]
        ref(*cpu, **kw)
        for a, c in zip(args, cpu):
            if isinstance(a, (list, tuple)):
                for t, u in zip(a, c):
                    t.copy_(u)
    return run


adamw_step_ref = _on_cpu(optim_reference.adamw_step_ref)
adamw8bit_step_ref = _on_cpu(optim_reference.adamw8bit_step_ref)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [[1], [5, 1000, 70001], [256, 257, 511, 4096], [0, 3, 16384]]


def _equal(a, b):
    # Bitwise (NaN payloads aside): the kernels and references do the same separately rounded operations.
    return all(torch.equal(x.float().nan_to_num(7.0), y.float().nan_to_num(7.0)) and x.dtype == y.dtype
               for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_step_matches_reference(device, dtype, sizes, maximize):
    case = make_fp32_case(sizes, dtype, device)
    ours, ref = clone_all(case), clone_all(case)
    hyper = {**HYPER, "maximize": maximize}
    optim_ops.adamw_step(*ours, **hyper)
    adamw_step_ref(*ref, **hyper)
    for got, want in zip(ours[:4], ref[:4]):
        assert _equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw8bit_step_matches_reference(device, dtype, sizes, maximize):
    case = make_8bit_case(sizes, dtype, device)
    ours, ref = clone_all(case), clone_all(case)
    hyper = {**HYPER, "maximize": maximize}
    optim_ops.adamw8bit_step(*ours, **hyper)
    adamw8bit_step_ref(*ref, **hyper)
    for got, want in zip(ours[:6], ref[:6]):
        assert _equal(got, want)


def test_adamw8bit_from_zero_state_and_many_steps(device):
    # bitsandbytes' initial state (codes 0, absmax 0) decodes to zeros; run 20 steps against the ref.
    sizes = [300, 4096, 777]
    params = [torch.randn(n, device=device) for n in sizes]
    state = [[torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes],
             [torch.zeros((n + 255) // 256, device=device) for n in sizes]] * 2
    ours = [[p.clone() for p in params]] + [[t.clone() for t in s] for s in state]
    ref = [[p.clone() for p in params]] + [[t.clone() for t in s] for s in state]
    for step in range(1, 21):
        grads = [torch.randn(n, device=device) for n in sizes]
        steps = [torch.tensor(float(step))] * 3
        optim_ops.adamw8bit_step(ours[0], grads, ours[1], ours[2], ours[3], ours[4], steps, **HYPER)
        adamw8bit_step_ref(ref[0], grads, ref[1], ref[2], ref[3], ref[4], steps, **HYPER)
    for got, want in zip(ours, ref):
        assert _equal(got, want)


def test_adamw8bit_non_finite_block(device):
    params, grads, qm, am, qv, av, steps = make_8bit_case([1000], torch.float32, device)
    grads[0][300] = float("inf")  # block 1
    grads[0][700] = float("nan")  # block 2
    case = (params, grads, qm, am, qv, av, steps)
    ours, ref = clone_all(case), clone_all(case)
    optim_ops.adamw8bit_step(*ours, **HYPER)
    adamw8bit_step_ref(*ref, **HYPER)
    for got, want in zip(ours[:6], ref[:6]):
        assert _equal(got, want)
    assert torch.isnan(ours[3][0][1:3]).all() and torch.isfinite(ours[3][0][[0, 3]]).all()
    assert (ours[2][0][256:768] == 0).all()


def test_mixed_dtypes_in_one_call(device):
    case = make_fp32_case([100, 200, 300], torch.float32, device)
    case[0][1] = case[0][1].bfloat16()
    case[1][1] = case[1][1].bfloat16()
    case[0][2] = case[0][2].half()
    case[1][2] = case[1][2].half()
    ours, ref = clone_all(case), clone_all(case)
    optim_ops.adamw_step(*ours, **HYPER)
    adamw_step_ref(*ref, **HYPER)
    for got, want in zip(ours[:4], ref[:4]):
        assert _equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(device, dtype):
    p = torch.randn(64, 48, dtype=dtype, device=device).t()  # [48, 64], strides (1, 48)
    g = torch.randn(64, 48, dtype=dtype, device=device).t()
    m, v = torch.randn(64, 48, device=device).t() * 0.1, torch.rand(64, 48, device=device).t() * 0.01
    steps = [torch.tensor(2.0)]
    ours = [p.clone().t().contiguous().t(), m.clone().t().contiguous().t(), v.clone().t().contiguous().t()]
    assert not ours[0].is_contiguous()
    ref = [p.contiguous(), m.contiguous(), v.contiguous()]
    optim_ops.adamw_step([ours[0]], [g], [ours[1]], [ours[2]], steps, **HYPER)
    adamw_step_ref([ref[0]], [g.contiguous()], [ref[1]], [ref[2]], steps, **HYPER)
    for got, want in zip(ours, ref):
        assert torch.equal(got, want)
    # 8-bit: non-contiguous param and grad (codes are the param's shape)
    params, grads, qm, am, qv, av, steps = make_8bit_case([48 * 64], dtype, device)
    p8 = params[0].view(48, 64).t()
    g8 = grads[0].view(48, 64).t()
    codes = [qm[0].view(48, 64).t().contiguous(), qv[0].view(48, 64).t().contiguous()]
    ours = [p8.clone().t().contiguous().t(), codes[0].clone(), am[0].clone(), codes[1].clone(), av[0].clone()]
    ref = [p8.contiguous(), codes[0].clone(), am[0].clone(), codes[1].clone(), av[0].clone()]
    optim_ops.adamw8bit_step([ours[0]], [g8], [ours[1]], [ours[2]], [ours[3]], [ours[4]], steps, **HYPER)
    adamw8bit_step_ref([ref[0]], [g8.contiguous()], [ref[1]], [ref[2]], [ref[3]], [ref[4]], steps, **HYPER)
    for got, want in zip(ours, ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("eight_bit", [False, True])
def test_increment_steps_counts_each_tensor_once(device, eight_bit):
    # Slices of one parameter share its step tensor: the op counts the update once per tensor.
    make, op, ref = ((make_8bit_case, optim_ops.adamw8bit_step, adamw8bit_step_ref) if eight_bit else
                     (make_fp32_case, optim_ops.adamw_step, adamw_step_ref))
    case = list(make([300, 512, 70], torch.float32, device))
    shared = torch.tensor(4.0)
    case[-1] = [shared, shared, torch.tensor(9.0)]
    ours, want = clone_all(case), clone_all(case)
    ours[-1] = [ours[-1][0], ours[-1][0], ours[-1][2]]
    want[-1] = [want[-1][0], want[-1][0], want[-1][2]]
    op(*ours, increment_steps=True, **HYPER)
    ref(*want, increment_steps=True, **HYPER)
    assert [s.item() for s in ours[-1]] == [5.0, 5.0, 10.0]
    for got, exp in zip(ours[:-1], want[:-1]):
        assert _equal(got, exp)
    before = [s.item() for s in ours[-1]]
    with pytest.raises(RuntimeError, match="lr must be"):  # a bad call counts nothing
        op(*ours, increment_steps=True, **{**HYPER, "lr": -1.0})
    assert [s.item() for s in ours[-1]] == before


def test_empty_lists_are_a_no_op(device):
    optim_ops.adamw_step([], [], [], [], [], **HYPER)
    optim_ops.adamw8bit_step([], [], [], [], [], [], [], **HYPER)


def test_dynamic_maps_are_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(F.create_dynamic_map(signed=True).float(), DYNAMIC_CODE)
    assert torch.equal(F.create_dynamic_map(signed=False).float(), UNSIGNED_DYNAMIC_CODE)


def test_quantize_ref_encodes_nearest_code():
    # The nearest code (the definition: the count of fp32 midpoints below x; ties to the lower code), over many orders of magnitude and
    # exactly at / one ulp around every midpoint.
    for code, signed in ((DYNAMIC_CODE, True), (UNSIGNED_DYNAMIC_CODE, False)):
        mid = (code[:-1] + code[1:]) / 2
        around = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))])
        x = (torch.rand(20000) * 2 - 1) * 10.0 ** torch.randint(-7, 1, (20000,)).float()
        values = torch.cat([x if signed else x.abs(), around.clamp(-1 if signed else 0, 1)])
        values = torch.cat([values, torch.ones(255 - values.numel() % 256)])  # full blocks: absmax 1
        values[255::256] = 1.0
        q, absmax = quantize_blockwise_ref(values, code)
        assert torch.equal(absmax, torch.ones_like(absmax))
        nearest = (values.view(-1, 1) - code.view(1, -1)).abs()
        best = nearest.min(dim=1).values
        # nearest, up to the fp32 rounding of the midpoints themselves
        assert torch.all((code[q.long()] - values).abs() - best <= values.abs() * 2.0 ** -23)
        assert torch.all(q.long() == torch.searchsorted(mid, values, right=False))
        assert torch.allclose(dequantize_blockwise_ref(q, absmax, code), values, atol=0.02)


OPCHECK_TESTS = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("increment", [False, True])
def test_opcheck(device, increment):
    case = make_fp32_case([7, 300], torch.float32, device)
    hyper = [*HYPER.values(), increment]
    torch.library.opcheck(torch.ops.peftx.adamw_step.default, (*clone_all(case), *hyper), test_utils=OPCHECK_TESTS)
    case8 = make_8bit_case([7, 600], torch.bfloat16, device)
    torch.library.opcheck(torch.ops.peftx.adamw8bit_step.default, (*clone_all(case8), *hyper),
                          test_utils=OPCHECK_TESTS)


def test_torch_compile_fullgraph(device):
    case = make_fp32_case([33, 1000], torch.float32, device)
    ours, ref = clone_all(case), clone_all(case)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(params, grads, m, v, steps):
        optim_ops.adamw_step(params, grads, m, v, steps, **HYPER)

    step(*ours)
    adamw_step_ref(*ref, **HYPER)
    for got, want in zip(ours[:4], ref[:4]):
        assert _equal(got, want)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("lr", -1e-3, "lr must be"), ("eps", -1.0, "eps must be"), ("beta1", 1.0, "beta1 must be in"),
    ("beta2", -0.1, "beta2 must be in"), ("weight_decay", float("nan"), "weight_decay must be"),
    ("lr", float("inf"), "lr must be")])
def test_bad_hyperparameters_leave_tensors_untouched(field, value, message):
    case = make_fp32_case([10], torch.float32)
    before = clone_all(case)
    with pytest.raises(RuntimeError, match=message):
        optim_ops.adamw_step(*case, **{**HYPER, field: value})
    for got, want in zip(case[:4], before[:4]):
        assert _equal(got, want)


def test_bad_lists_and_state():
    params, grads, m, v, steps = make_fp32_case([10, 20], torch.float32)
    with pytest.raises(RuntimeError, match=r"grads must have one tensor per parameter \(2\), got 1"):
        optim_ops.adamw_step(params, grads[:1], m, v, steps, **HYPER)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] must be Float"):
        optim_ops.adamw_step(params, grads, [m[0], m[1].double()], v, steps, **HYPER)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] must have 10 elements, got 20"):
        optim_ops.adamw_step(params, grads, m, [v[1], v[1]], steps, **HYPER)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have the dtype of params\[0\]"):
        optim_ops.adamw_step(params, [grads[0].double(), grads[1]], m, v, steps, **HYPER)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float32, float16 or bfloat16"):
        optim_ops.adamw_step([params[0].double(), params[1]], [grads[0].double(), grads[1]], m, v, steps, **HYPER)
    with pytest.raises(RuntimeError, match=r"steps\[1\] must be the step count of this update \(>= 1\), got 0"):
        optim_ops.adamw_step(params, grads, m, v, [steps[0], torch.tensor(0.0)], **HYPER)
    p8, g8, qm, am, qv, av, s8 = make_8bit_case([300], torch.float32)
    with pytest.raises(RuntimeError, match=r"exp_avg_absmax\[0\] must have 2 elements, got 1"):
        optim_ops.adamw8bit_step(p8, g8, qm, [am[0][:1]], qv, av, s8, **HYPER)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq_codes\[0\] must be Byte"):
        optim_ops.adamw8bit_step(p8, g8, qm, am, [qv[0].float()], av, s8, **HYPER)
