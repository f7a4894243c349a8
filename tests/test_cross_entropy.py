"""The fused cross-entropy rows (`ops.cross_entropy`): the reference against PyTorch's log-softmax and its autograd
gradient, the Triton kernel against the reference under Triton's interpreter (a subprocess, as Triton reads
TRITON_INTERPRET when kernels are defined) and on a GPU at DeepSeek-V3's vocabulary."""

import os

import pytest
import torch
import torch.nn.functional as F

from dsv3.ops import cross_entropy as ce
from tests.conftest import on_cpu_under_the_interpreter, rerun_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_triton_interpreter's subprocess")


def _rows(n: int, v: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, v, generator=gen)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[1] = -100  # ignored
    logits[2, 7] = logits[2, v - 1] = logits[2].max() + 1  # a tie for the argmax: the lower index wins
    targets[2] = 7
    return logits.to(device), targets.to(device)


def test_reference_is_log_softmax_and_its_gradient():
    logits, targets = _rows(6, 50, torch.float64)
    x = logits.clone().requires_grad_()
    want = F.cross_entropy(x, targets, reduction="none", ignore_index=-100)
    want.sum().backward()
    loss, correct = ce.softmax_grad_reference_(logits, targets, grad=True)
    torch.testing.assert_close(loss, want.float())
    torch.testing.assert_close(logits, x.grad)  # overwritten with the gradient
    assert torch.equal(correct, (x.argmax(-1) == targets) & (targets >= 0))
    assert correct[2] and not correct[1]


@on_cpu_under_the_interpreter(ce.triton)
def test_under_the_triton_interpreter():
    rerun_under_interpreter(__file__, "kernel", timeout=300)


def _check_kernel(n: int, v: int, dtype: torch.dtype, device: str, grad: bool):
    logits, targets = _rows(n, v, dtype, device)
    ref = logits.clone()
    want_loss, want_correct = ce.softmax_grad_reference_(ref, targets, grad)
    loss, correct = ce.softmax_grad_triton_(logits, targets, grad)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(correct, want_correct)
    if grad:  # the same fp32 value rounded to the logits' dtype, up to the exp's last bits
        torch.testing.assert_close(logits.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)
    else:
        torch.testing.assert_close(logits, _rows(n, v, dtype, device)[0])  # untouched


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [True, False])
def test_kernel_matches_reference(dtype, grad):
    _check_kernel(5, ce.BLOCK_V + 904, dtype, "cpu", grad)  # two blocks per row, the second partly masked


@pytest.mark.skipif(not torch.cuda.is_available() or ce.triton is None, reason="needs CUDA and triton")
def test_gpu_matches_reference_at_the_deepseek_vocabulary():
    _check_kernel(64, 129280, torch.bfloat16, "cuda", True)
    _check_kernel(64, 129280, torch.float32, "cuda", False)
