"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU. The interpreter, under which the other
CPU tests run them, checks what they compute but not what only the compiler refuses (the types of values carried
through loops, tile shapes, dot operand layouts): without this, only a GPU run would show such an error."""

import pytest

triton = pytest.importorskip("triton")

from dsv3.ops import (adamw, combine, cross_entropy, dispatch, fp8_gemm, fp8_gemv, gemv, mla_decode,  # noqa: E402
                      mla_prepare, moe_decode, swiglu)
from dsv3.ops.tuning import GEMV_TILES, INTERPRET, pdl_meta  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRET, reason="under the interpreter the kernels are not compiled")
HOPPER = triton.backends.compiler.GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 227 * 1024  # per block on the H100/H200: a kernel asking more fails at launch


def _compile(kernel, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> None:
    """Compile `kernel` for sm_90 with `types` for its pointers and scalars (other arguments are i32 scalars)."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # an autotuned kernel wraps its JITFunction
        fn = fn.fn
    constant = {fn.arg_names[i] for i in fn.constexprs}
    assert constant == set(constexprs), f"constexprs to give: {sorted(constant)}"
    signature = {name: "constexpr" if name in constant else types.get(name, "i32") for name in fn.arg_names}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    assert "ptx" in compiled.asm
    shared = compiled.metadata.shared
    assert shared <= SHARED_MEMORY, f"{fn.__name__} needs {shared} B of shared memory"


def test_programmatic_dependent_launch_is_for_cuda_only():
    # The grid-dependency instructions exist from sm_90 on; a CPU tensor (the interpreter's launches) never asks.
    import torch

    assert pdl_meta(torch.device("cpu")) == {"PDL": False}


@pytest.mark.parametrize("pdl", [False, True])
def test_mla_decode_kernels(pdl):
    ptr = {"Q": "*bf16", "QPE": "*bf16", "KV": "*bf16", "BT": "*i64", "SEQ": "*i64", "LENS": "*i64",
           "OUT": "*fp32", "LSE": "*fp32", "scale": "fp32"}
    _compile(mla_decode._mla_decode_split, ptr,  # the DeepSeek-V3 latent: C 512, R 64
             dict(C=512, R=64, BLOCK_C=512, BLOCK_R=64, BLOCK_H=mla_decode.BLOCK_H, BLOCK_N=mla_decode.BLOCK_N,
                  PAGE=64, PDL=pdl), num_warps=8, num_stages=2)  # as mla_decode_triton launches it
    _compile(mla_decode._mla_merge, {"PART": "*fp32", "LSE": "*fp32", "W": "*bf16", "OUT": "*bf16"},
             dict(C=512, V=128, BLOCK_S=mla_decode.MERGE_S, BLOCK_C=512, BLOCK_V=mla_decode.MERGE_V, PDL=pdl))


@pytest.mark.parametrize("k", [2048, 4096, gemv.MAX_K])
def test_gemv_kernel(k):
    _compile(gemv._gemv_kernel, {"X": "*bf16", "W": "*bf16", "Y": "*bf16"},
             dict(BLOCK_N=gemv.TILE // k, BLOCK_K=k, PDL=True))  # as gemv_triton launches it


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("interleave", [False, True])
def test_mla_prepare_kernel(interleave, block_m):
    ptr = {name: "*bf16" for name in ("Q", "KV", "WUK", "NW", "CACHE", "QLAT", "QPE")}
    _compile(mla_prepare._prepare, {**ptr, "COS": "*fp32", "SIN": "*fp32", "SLOTS": "*i64", "eps": "fp32"},
             dict(C=512, NOPE=128, R=64, INTERLEAVE=interleave, BLOCK_M=block_m, BLOCK_C=mla_prepare.BLOCK_C,
                  BLOCK_NOPE=128, BLOCK_CF=512, BLOCK_HR=32, KV_ROWS=mla_prepare.KV_ROWS, INTERPRETED=False,
                  PDL=True))


@pytest.mark.parametrize("pdl", [False, True])
def test_select_kernel(pdl):
    sig = {"X": "*fp32", "BIAS": "*fp32", "INDICES": "*i64", "COUNTS": "*i64"}
    # DeepSeek-V3's routing: 256 experts in 8 groups, top-4 groups, top-8 experts
    _compile(moe_decode._select_kernel, sig,
             dict(E=256, G=8, PG=32, K=8, TOPK_GROUP=4, HAS_BIAS=True, GROUP_TOP2=True, ATOMIC_COUNTS=True, BLOCK_T=1,
                  BLOCK_G=8, BLOCK_PG=32, BLOCK_K=8, PDL=pdl), num_warps=1)


@pytest.mark.parametrize("pdl", [False, True])
def test_gate_route_kernel(pdl):
    sig = {"X": "*bf16", "W": "*fp32", "LOGITS": "*fp32", "ARRIVED": "*i32", "BIAS": "*fp32", "WEIGHTS": "*fp32",
           "INDICES": "*i64", "SCORES": "*fp32", "COUNTS": "*i64", "scale": "fp32"}
    # DeepSeek-V3's routing at batch 1, hidden 7168 (as gate_route_triton launches it)
    _compile(moe_decode._gate_route_kernel, sig,
             dict(E=256, G=8, PG=32, K=8, TOPK_GROUP=4, HAS_BIAS=True, SOFTMAX=False, GROUP_TOP2=True, NORM=True,
                  BLOCK_E=2, BLOCK_D=2048, BLOCK_T=1, BLOCK_G=8, BLOCK_PG=32, BLOCK_K=8, PDL=pdl), num_warps=1)


# Every tile as launched by default; programmatic dependent launch (DSV3_PDL=1) with the first.
GEMV_CASES = [(tile, False) for tile in GEMV_TILES] + [(GEMV_TILES[0], True)]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tile,pdl", GEMV_CASES)  # the autotuner may pick any tile
def test_expert_kernels(fp8, tile, pdl):
    rows, cols, warps, stages = tile
    weight = "*fp8e4nv" if fp8 else "*bf16"
    _compile(moe_decode._gate_up_kernel,
             {"X": "*bf16", "W": weight, "WS": "*fp32", "SG": "*bf16", "SU": "*bf16", "IDX": "*i64", "H": "*bf16"},
             dict(K=8, NS=1, FP8=fp8, X_SETTLED=pdl, BLOCK_I=rows, BLOCK_D=cols, PDL=pdl), warps, stages)
    _compile(moe_decode._down_kernel,
             {"H": "*bf16", "W": weight, "WS": "*fp32", "SD": "*bf16", "IDX": "*i64", "WTS": "*fp32", "Y": "*fp32"},
             dict(K=8, NS=1, FP8=fp8, BLOCK_D=rows, BLOCK_I=cols, PDL=pdl), warps, stages)


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_quantisation_kernels(pow2):
    fp8, tiles = "*fp8e4nv", {"start_ptr": "*i32", "end_ptr": "*i32"}
    block = fp8_gemm.BLOCK
    _compile(fp8_gemm._quant_act_kernel, {"x_ptr": "*bf16", "q_ptr": fp8, "s_ptr": "*fp32", "qt_ptr": fp8,
                                          "st_ptr": "*fp32", **tiles}, dict(POW2=pow2, WITH_COLS=True, BLOCK=block),
             num_warps=8)
    _compile(fp8_gemm._quant_weight_kernel, {"w_ptr": "*fp32", "q_ptr": fp8, "s_ptr": "*fp32"},
             dict(POW2=pow2, BLOCK=block), num_warps=8)


@pytest.mark.parametrize("config", range(len(fp8_gemm._GEMM_CONFIGS)))  # the autotuner may pick any
def test_fp8_gemm_kernels(config):
    fp8, block = "*fp8e4nv", fp8_gemm.BLOCK
    gemm, wgrad = fp8_gemm._GEMM_CONFIGS[config], fp8_gemm._WGRAD_CONFIGS[config]
    _compile(fp8_gemm._gemm_kernel, {"a_ptr": fp8, "sa_ptr": "*fp32", "b_ptr": fp8, "sb_ptr": "*fp32",
                                     "c_ptr": "*bf16", "group_ptr": "*i32", "start_ptr": "*i32", "end_ptr": "*i32"},
             {**gemm.kwargs, "BLOCK": block}, gemm.num_warps, gemm.num_stages)
    _compile(fp8_gemm._wgrad_kernel, {"dy_ptr": fp8, "sdy_ptr": "*fp32", "x_ptr": fp8, "sx_ptr": "*fp32",
                                      "w_ptr": "*fp32", "first_ptr": "*i32"}, {**wgrad.kwargs, "BLOCK": block},
             wgrad.num_warps, wgrad.num_stages)


@pytest.mark.parametrize("grad", [False, True])
def test_head_loss_kernel(grad):
    _compile(cross_entropy._ce_kernel, {"L": "*bf16", "T": "*i64", "LOSS": "*fp32", "CORRECT": "*i1"},
             dict(GRAD=grad, BLOCK=cross_entropy.BLOCK_V), num_warps=8)


@pytest.mark.parametrize("block_d", [1024, 4096])  # 1b's hidden size, and wider rows on 8 warps
def test_moe_dispatch_and_combine_kernels(block_d):
    warps = 4 if block_d <= 2048 else 8
    _compile(dispatch._dispatch_kernel, {"x_ptr": "*bf16", "where_ptr": "*i64", "xs_ptr": "*bf16"},
             dict(K=8, BLOCK_D=block_d), warps)
    _compile(combine._combine_backward_kernel, {"grad_ptr": "*bf16", "ys_ptr": "*bf16", "where_ptr": "*i64",
                                                "w_ptr": "*fp32", "d_ys_ptr": "*bf16", "d_w_ptr": "*fp32"},
             dict(K=8, BLOCK_D=block_d), warps)


@pytest.mark.parametrize("block_i", [512, 4096])
def test_swiglu_backward_kernel(block_i):
    _compile(swiglu._swiglu_backward_kernel, {"grad_ptr": "*bf16", "h_ptr": "*bf16", "d_h_ptr": "*bf16"},
             dict(BLOCK_M=swiglu.BLOCK_ELEMENTS // block_i, BLOCK_I=block_i), num_warps=8)


@pytest.mark.parametrize("moment", ["*bf16", "*fp32"])
@pytest.mark.parametrize("scaled", [False, True])  # with clipping's factor read from SCALE, and without
def test_adamw_kernel(moment, scaled):
    scalars = {name: "fp32" for name in ("decay", "step_size", "bias2_sqrt", "beta1", "beta2", "eps")}
    _compile(adamw._adamw_kernel, {"P": "*fp32", "G": "*fp32", "M": moment, "V": moment, "SCALE": "*fp32", **scalars},
             dict(BLOCK=adamw.BLOCK, SCALED=scaled))


@pytest.mark.parametrize("tile,pdl", GEMV_CASES)
def test_fp8_gemv_kernel(tile, pdl):
    rows, cols, warps, stages = tile
    _compile(fp8_gemv._fp8_gemv_kernel, {"X": "*bf16", "W": "*fp8e4nv", "WS": "*fp32", "Y": "*bf16"},
             dict(BLOCK_N=rows, BLOCK_K=cols, PDL=pdl), warps, stages)
