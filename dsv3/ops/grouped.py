"""Grouped GEMM for the routed experts: rows sorted by expert, one matrix per expert.

`grouped_mm(x, w, offs)` multiplies each run of rows `x[offs[e-1]:offs[e]]` by `w[e]`. The fast path is
`torch._grouped_mm` (one kernel for all experts on Hopper, and a native CPU path in recent torch); the reference
is a loop over the non-empty experts, kept for devices where the fused op is missing and as the test oracle.
"""

from __future__ import annotations

import functools

import torch


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # x: [M, K] sorted by group, w: [G, K, N], offs: [G] int32 cumulative row ends -> [M, N]
    out = x.new_empty(x.shape[0], w.shape[-1])
    ends = offs.tolist()  # a host sync: acceptable on the reference path only
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


@functools.cache
def _fused_supported(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device_type == "cuda":
        # The CUTLASS kernel behind it needs Hopper and bf16; other cases fall back inside torch or fail.
        return capability is not None and capability >= (9, 0) and dtype == torch.bfloat16
    try:
        a = torch.zeros(2, 8, dtype=dtype, device=device_type)
        b = torch.zeros(1, 8, 8, dtype=dtype, device=device_type)
        torch._grouped_mm(a, b, torch.tensor([2], dtype=torch.int32, device=device_type))
        return True
    except (RuntimeError, NotImplementedError):
        return False


# Under torch.compile the answer is a constant of the graph: dynamo would otherwise put the capability query into
# the graph as an op and run the trial call on fake tensors, and both fail there.
@torch.compiler.assume_constant_result
def _fused_on(device: torch.device, dtype: torch.dtype) -> bool:
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return _fused_supported(device.type, dtype, cap)


def fused_available(x: torch.Tensor) -> bool:
    return _fused_on(x.device, x.dtype)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # x: [M, K], w: [G, K, N], offs: [G] int32 -> [M, N]
    if torch.is_autocast_enabled(x.device.type):
        # Autocast does not know this op: follow its dtype by hand, as it would for F.linear.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    # Under torch.compile torch._grouped_mm takes bf16 only: its meta kernel, which the compiler traces with,
    # refuses other dtypes. And on the CPU (torch 2.13) inductor's code for its backward gave NaN expert gradients
    # in bf16 where eager gave none, so compiled CPU training takes the reference too (a graph break at its host
    # sync); compiled CPU inference (the engine) keeps the fused op.
    training = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    compiled_ok = x.dtype == torch.bfloat16 and (x.is_cuda or not training)
    if x.shape[0] > 0 and fused_available(x) and (compiled_ok or not torch.compiler.is_compiling()):
        return torch._grouped_mm(x, w, offs=offs)
    return grouped_mm_reference(x, w, offs)
