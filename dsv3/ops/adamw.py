"""AdamW's update in one pass over each parameter's memory (Triton), beside its PyTorch reference.

`adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, ...)` updates the parameters and both moments in place,
with every step's arithmetic in fp32 whatever the moments are stored in (DeepSeek-V3 stores them in bf16). The
reference is torch's foreach ops over fp32 copies: about a dozen passes over the parameters' memory. The kernel
reads each parameter, its gradient and its two moments once and writes the parameter and the moments once: 20 bytes
per fp32 parameter with bf16 moments, the least this update can move. torch's fused AdamW does the same for fp32
moments (28 bytes); it has no bf16-moment form.

The update is torch.optim.AdamW's: decoupled weight decay p *= 1 - lr * wd, m = lerp(m, g, 1 - beta1),
v = beta2 v + (1 - beta2) g^2, p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps). The parameter
update uses the fp32 moments before they are rounded for storage.

`grad_scale`, a device scalar, multiplies every gradient as the kernel reads it: gradient clipping's factor
(`fp8_train.clip_and_step`), which would otherwise cost a pass of its own over every gradient (a read and a write
of 4 bytes a parameter) between the norm and the update. It stays on the device, so clipping needs no host sync.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import increment_version
from torch.distributed.tensor import DTensor

from .tuning import INTERPRET

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

BLOCK = 2048  # elements per program: 8 KB of fp32 parameter


@torch.no_grad()
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[int], lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW step of each parameter (steps: each one's step count, this step included), in place, the
    gradients read times `grad_scale` (a one-element fp32 tensor on their device) when given. The Triton kernel on
    CUDA (contiguous tensors of one shape per parameter), else the reference; either updates FSDP's sharded
    parameters and states through their local shards, as the update is elementwise."""
    tensors = [[_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    if triton is not None and params and (tensors[0][0].is_cuda or INTERPRET) and all(
            t.is_contiguous() for ts in tensors for t in ts):
        adamw_step_triton_(*tensors, steps, lr, beta1, beta2, eps, weight_decay, grad_scale)
    else:
        adamw_step_reference_(*tensors, steps, lr, beta1, beta2, eps, weight_decay, grad_scale)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def adamw_step_reference_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                          grad_scale: torch.Tensor | None = None) -> None:
    grads = [g.float() if grad_scale is None else g.float() * grad_scale for g in grads]
    m32 = [m.float() for m in exp_avgs]  # copies when stored in bf16, the tensors themselves in fp32
    v32 = [v.float() for v in exp_avg_sqs]
    torch._foreach_lerp_(m32, grads, 1 - beta1)
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, grads, grads, value=1 - beta2)
    torch._foreach_copy_(exp_avgs, m32)
    torch._foreach_copy_(exp_avg_sqs, v32)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    denom = torch._foreach_sqrt(v32)
    torch._foreach_div_(denom, [(1 - beta2 ** t) ** 0.5 for t in steps])
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(m32, denom)
    torch._foreach_mul_(updates, [-lr / (1 - beta1 ** t) for t in steps])
    torch._foreach_add_(params, updates)


@torch.no_grad()
def adamw_step_triton_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                       grad_scale: torch.Tensor | None = None) -> None:
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.dtype != torch.float32):
        raise ValueError(f"AdamW: grad_scale must be one fp32 element, got {grad_scale.dtype} of shape "
                         f"{tuple(grad_scale.shape)}")
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        n = p.numel()
        if not n:
            continue
        if not (g.shape == m.shape == v.shape == p.shape):
            raise ValueError(f"AdamW: a parameter of shape {tuple(p.shape)} has a gradient or moments of another "
                             f"shape ({tuple(g.shape)}, {tuple(m.shape)}, {tuple(v.shape)})")
        _adamw_kernel[(triton.cdiv(n, BLOCK),)](
            p, g, m, v, p if grad_scale is None else grad_scale, n, 1 - lr * weight_decay, lr / (1 - beta1 ** t),
            (1 - beta2 ** t) ** 0.5, beta1, beta2, eps, SCALED=grad_scale is not None, BLOCK=BLOCK, num_warps=4)
        # A kernel's stores are invisible to autograd's version counters, which torch's in-place ops move: what
        # keys on them (the FP8 weight cache, `fp8_train._WeightCache`) would keep serving the old weights.
        for written in (p, m, v):
            increment_version(written)


if triton is not None:

    @triton.jit
    def _adamw_kernel(P, G, M, V, SCALE, n, decay, step_size, bias2_sqrt, beta1, beta2, eps, SCALED: tl.constexpr,
                      BLOCK: tl.constexpr):
        # Program i: elements [i * BLOCK, +BLOCK) of one parameter, its gradient and moments (flat, contiguous).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        if SCALED:  # SCALE is a dummy pointer otherwise
            g = g * tl.load(SCALE)
        m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
        tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32) * decay
        p = p - step_size * m / (tl.sqrt_rn(v) / bias2_sqrt + eps)  # IEEE sqrt, as torch.sqrt
        tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
