"""The one-pass AdamW kernel (`ops.adamw`) against its foreach reference, under Triton's interpreter (a subprocess,
as Triton reads TRITON_INTERPRET when kernels are defined) and on a GPU; the reference itself is checked against
torch.optim.AdamW in tests/test_fp8.py."""

import os

import pytest
import torch

from dsv3.ops import adamw
from tests.conftest import rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _run(step, device: str, moment_dtype: torch.dtype, grad_dtype: torch.dtype, weight_decay: float,
         scale: float | None = None):
    # Parameters of awkward sizes (one element, one block and a bit, a matrix, an empty one), three steps with
    # fresh gradients; the steps counted per parameter, one of them behind the others (added to its group later).
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (adamw.BLOCK + 3,), (37, 129), (0, 4)]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    ms = [torch.zeros(s, dtype=moment_dtype, device=device) for s in shapes]
    vs = [torch.zeros(s, dtype=moment_dtype, device=device) for s in shapes]
    for t in range(1, 4):
        grads = [torch.randn(s, generator=gen).to(device, grad_dtype) for s in shapes]
        grad_scale = None if scale is None else torch.tensor([scale], device=device)  # clipping's factor
        versions = [x._version for x in params + ms + vs]
        step(params, grads, ms, vs, [t, t, t, max(t - 1, 1)], 3e-3, 0.9, 0.95, 1e-8, weight_decay, grad_scale)
        # Updated in place as far as autograd can tell too (the FP8 weight cache requantises on a new version).
        assert all(x._version > v for x, v in zip(params + ms + vs, versions) if x.numel())
    return params, ms, vs


def _check(device: str) -> None:
    for moment_dtype, grad_dtype, wd, scale in [(torch.bfloat16, torch.float32, 0.1, None),
                                                (torch.float32, torch.bfloat16, 0.0, None),
                                                (torch.bfloat16, torch.bfloat16, 0.1, None),
                                                (torch.float32, torch.float32, 0.1, 0.37)]:
        got = _run(adamw.adamw_step_triton_, device, moment_dtype, grad_dtype, wd, scale)
        want = _run(adamw.adamw_step_reference_, device, moment_dtype, grad_dtype, wd, scale)
        # Parameters: the same fp32 arithmetic up to rounding order. With bf16 moments one fp32 rounding apart can
        # round a stored moment to the neighbouring bf16 value (up to 0.8% apart), which moves the next updates by
        # about as much of lr (3e-3): 1.2% of lr measured after three steps.
        atol = 6e-5 if moment_dtype == torch.bfloat16 else 1e-7
        for a, b in zip(got[0], want[0]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=atol)
        # bf16 moments: a moment stored one rounding apart at one step carries that absolute difference (times
        # beta) into the next, where cancellation can leave a small moment: on the H200 one of 4,773 came out 16%
        # apart, 4.4e-4 absolute. So the bound is absolute, in bf16 steps of the largest moment: one on a GPU, two
        # under Triton's interpreter, which rounds fp32 to bf16 towards zero (the GPU to nearest).
        for ga, gb in zip(got[1:], want[1:]):
            for a, b in zip(ga, gb):
                assert a.dtype == moment_dtype
                if moment_dtype == torch.float32:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
                elif b.numel():
                    steps = 2 if device == "cpu" else 1
                    torch.testing.assert_close(a, b, rtol=0, atol=steps * 2 ** -7 * b.abs().max().item())
        assert not torch.equal(got[0][2], _run(adamw.adamw_step_triton_, device, moment_dtype, grad_dtype,
                                               wd + 0.5, scale)[0][2])  # weight decay reaches the parameters
        if scale is not None:  # and the factor reaches the moments: m after three steps is linear in it
            unscaled = _run(adamw.adamw_step_triton_, device, moment_dtype, grad_dtype, wd)
            torch.testing.assert_close(got[1][2], scale * unscaled[1][2], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")
def test_kernel_matches_reference_interpreted():
    _check("cpu")


def _check_sharded() -> None:
    # FSDP's parameters, gradients and moments are DTensors; the step updates their local shards (one rank here),
    # clipping's factor (a plain tensor, the whole model's) included.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(3)
        plain = [torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)] + [torch.zeros(6, 5)] * 2
        plain = [t.clone() for t in plain]
        sharded = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in plain]
        scale = torch.tensor([0.5])
        adamw.adamw_step_(*[[t] for t in sharded], [1], 1e-2, 0.9, 0.95, 1e-8, 0.1, scale)
        adamw.adamw_step_reference_(*[[t] for t in plain], [1], 1e-2, 0.9, 0.95, 1e-8, 0.1, scale)
        for a, b in zip(sharded, plain):
            torch.testing.assert_close(a.to_local(), b)
        assert not torch.equal(sharded[0].to_local(), sharded[1].to_local())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")
def test_sharded_parameters_step_through_their_local_shards_interpreted():
    _check_sharded()


@pytest.mark.skipif(INTERPRETED, reason="the interpreted run takes the kernel")
def test_sharded_parameters_step_through_the_reference():
    # On the CPU without the interpreter the reference serves (CPU training under bf16 or FP8 emulation).
    _check_sharded()


def _check_fp8_cache_follows_the_step(device: str) -> None:
    # The FP8 layers keep their quantised weights until the weight's version moves; the kernel's step must move it,
    # or FP8 training runs on its first weights for ever (found on the H200: a small model "learnt" random tokens
    # to a loss of 0.07 through its trainable head while every FP8 layer stayed frozen).
    from dsv3.fp8_train import apply_fp8, make_adamw
    from dsv3.ops.fp8_gemm import fp8_unsupported_reason

    emulate = fp8_unsupported_reason(torch.device(device)) is not None  # the kernels on Hopper

    def fp8_linear() -> torch.nn.Linear:
        return apply_fp8(torch.nn.Linear(256, 128, bias=False).to(device), emulate=emulate)

    lin = fp8_linear()
    x = torch.randn(8, 256, device=device)
    before = lin(x)
    opt = make_adamw(lin.parameters(), lr=1e-1, weight_decay=0.0, bf16_moments=True)
    lin.weight.grad = torch.ones_like(lin.weight)
    opt.step()  # every weight moves by lr (Adam's first step)
    fresh = fp8_linear()
    with torch.no_grad():
        fresh.weight.copy_(lin.weight)
    assert not torch.equal(lin(x), before)
    torch.testing.assert_close(lin(x), fresh(x))


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")
def test_fp8_weight_cache_follows_the_kernels_step_interpreted():
    _check_fp8_cache_follows_the_step("cpu")


@pytest.mark.skipif(INTERPRETED or adamw.triton is None, reason="this is the subprocess, or no triton")
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "interpreted")


@pytest.mark.skipif(not torch.cuda.is_available() or adamw.triton is None, reason="needs CUDA and triton")
def test_kernel_matches_reference_on_the_gpu():
    _check("cuda")
    _check_fp8_cache_follows_the_step("cuda")


def test_dispatch_takes_the_reference_on_the_cpu_and_for_strided_tensors():
    p, g = torch.ones(4, 3), torch.full((3, 4), 0.5).t()  # a transposed (non-contiguous) gradient
    m, v = torch.zeros(4, 3), torch.zeros(4, 3)
    adamw.adamw_step_([p], [g], [m], [v], [1], 1e-2, 0.9, 0.95, 1e-8, 0.0)
    want, mw, vw = torch.ones(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)
    adamw.adamw_step_reference_([want], [g.contiguous()], [mw], [vw], [1], 1e-2, 0.9, 0.95, 1e-8, 0.0)
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(p, torch.full((4, 3), 1 - 1e-2))  # Adam's first step moves each weight by lr
