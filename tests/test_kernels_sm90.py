"""The decode kernels compile for Hopper (sm_90) on a machine without a GPU. The interpreter, under which the other
CPU tests run them, checks what they compute but not what only the compiler refuses (the types of values carried
through loops, tile shapes, dot operand layouts): without this, only a GPU run would show such an error."""

import pytest

triton = pytest.importorskip("triton")

from dsv3.ops import mla_decode, moe_decode  # noqa: E402
from dsv3.ops.tuning import GEMV_TILES, INTERPRET  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRET, reason="under the interpreter the kernels are not compiled")
HOPPER = triton.backends.compiler.GPUTarget("cuda", 90, 32)


def _compile(kernel, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> None:
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # an autotuned kernel wraps its JITFunction
        fn = fn.fn
    names = fn.arg_names
    missing = set(names) - set(signature) - set(constexprs)
    assert not missing, f"no type given for {sorted(missing)}"
    full = {name: signature.get(name, "constexpr") for name in names}
    source = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=constexprs)
    compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    assert "ptx" in compiled.asm


def test_mla_decode_kernels():
    ptr = {"Q": "*bf16", "QPE": "*bf16", "KV": "*bf16", "BT": "*i64", "SEQ": "*i64", "LENS": "*i64",
           "OUT": "*fp32", "LSE": "*fp32", "scale": "fp32"}
    ints = {n: "i32" for n in ("stride_qm", "stride_qh", "stride_pm", "stride_ph", "stride_bt", "stride_seq",
                               "stride_len", "H", "PAGES_PER_SPLIT")}
    _compile(mla_decode._mla_decode_split, {**ptr, **ints},  # the DeepSeek-V3 latent: C 512, R 64
             dict(C=512, R=64, BLOCK_C=512, BLOCK_R=64, BLOCK_H=mla_decode.BLOCK_H, BLOCK_N=mla_decode.BLOCK_N,
                  PAGE=64))
    _compile(mla_decode._mla_merge, {"PART": "*fp32", "LSE": "*fp32", "OUT": "*bf16", "n_splits": "i32", "H": "i32"},
             dict(C=512, BLOCK_S=mla_decode.MERGE_S, BLOCK_C=mla_decode.MERGE_C))


@pytest.mark.parametrize("select_only", [False, True])
def test_route_kernel(select_only):
    sig = {"X": "*fp32", "BIAS": "*fp32", "WEIGHTS": "*fp32", "INDICES": "*i64", "SCORES": "*fp32", "COUNTS": "*i64",
           "T": "i32", "scale": "fp32"}
    # DeepSeek-V3's routing: 256 experts in 8 groups, top-4 groups, top-8 experts
    _compile(moe_decode._route_kernel, sig,
             dict(E=256, G=8, PG=32, K=8, TOPK_GROUP=4, HAS_BIAS=True, SOFTMAX=False, GROUP_TOP2=True, NORM=True,
                  SELECT_ONLY=select_only, ATOMIC_COUNTS=True, BLOCK_T=1, BLOCK_G=8, BLOCK_PG=32, BLOCK_K=8),
             num_warps=1)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tile", [GEMV_TILES[0], GEMV_TILES[-1]])
def test_expert_kernels(fp8, tile):
    rows, cols, warps, stages = tile
    weight = "*fp8e4nv" if fp8 else "*bf16"
    ints = dict.fromkeys(("stride_x", "D", "I", "UP", "WD", "DR", "WI", "n_pairs"), "i32")
    _compile(moe_decode._gate_up_kernel,
             {"X": "*bf16", "W": weight, "WS": "*fp32", "SG": "*bf16", "SU": "*bf16", "IDX": "*i64", "H": "*bf16",
              **ints}, dict(K=8, NS=1, FP8=fp8, BLOCK_I=rows, BLOCK_D=cols), warps, stages)
    _compile(moe_decode._down_kernel,
             {"H": "*bf16", "W": weight, "WS": "*fp32", "SD": "*bf16", "IDX": "*i64", "WTS": "*fp32", "Y": "*fp32",
              **ints}, dict(K=8, NS=1, FP8=fp8, BLOCK_D=rows, BLOCK_I=cols), warps, stages)
