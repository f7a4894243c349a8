"""HF-format checkpoints in and out: config.json + (sharded) safetensors, bf16/fp32 or FP8 block-scaled.

Notable features:
- One name table (`NAME_TABLE`) maps native parameter names to the HF checkpoint's, for loading, saving and tests.
  Stacked experts `[E, 2I, D]` / `[E, D, I]` become the checkpoint's per-expert gate/up/down matrices.
- The MTP module is layer `num_hidden_layers + k` in the checkpoint; its `embed_tokens` and `shared_head.head` are
  copies of the main model's (shared in dsv3) and are checked equal on load, never silently dropped.
- Loading is lazy: the model is built on the meta device and each tensor is read from the safetensors mmap straight
  into its parameter, so a checkpoint is never in memory twice. FP8 e4m3 weights with `weight_scale_inv` are
  dequantised on any device, the CPU included. Safetensors only: nothing is ever unpickled.
- Errors name the tensor: missing, unexpected, misshaped, or a config that does not match the weights.
- Writing is atomic: shards go to a temporary sibling folder that is renamed into place when complete.
- `dsv3 convert` turns FP8 checkpoints into bf16 and back, tensor by tensor, without building a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .fp8 import FP8, dequantize_weight_blocks, quantize_weight_blocks
from .fp8_infer import fp8_served, replace_experts, replace_linears
from .model import Rotary, Transformer, cast_model
from .ops import fp8_gemm as ops

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or the DeepSeek-V3 layout."""


# ---- names -------------------------------------------------------------------------------------------------------
# (native regex, HF template). `{L}` is the index of MTP depth k's layer: num_hidden_layers + k.
NAME_TABLE: list[tuple[str, str]] = [
    (r"embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.(.+)", "model.layers.{0}.{1}"),
    (r"mtp\.(\d+)\.block\.(.+)", "model.layers.{L}.{1}"),
    (r"mtp\.(\d+)\.(enorm\.weight|hnorm\.weight|eh_proj\.weight(?:_scale_inv)?)", "model.layers.{L}.{1}"),
    (r"mtp\.(\d+)\.head_norm\.weight", "model.layers.{L}.shared_head.norm.weight"),
]
# Tensors of MTP layer {L} that dsv3 shares with the main model: (HF suffix, native name).
MTP_SHARED = [("embed_tokens.weight", "embed_tokens.weight"), ("shared_head.head.weight", "lm_head.weight")]
# Stacked expert tensor -> per-expert HF matrices: (native suffix, [(HF name, which half of the rows)]). FP8
# serving's stacks (`Fp8WeightExperts`) and their `_scale_inv` grids split the same way.
EXPERT_SPLIT = {
    "mlp.experts.gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    "mlp.experts.down_proj": [("down_proj", None)],
}
NOT_FP8 = re.compile(r"(embed_tokens|lm_head|shared_head\.head|norm|layernorm|mlp\.gate)\.weight$")


def hf_name(native: str, cfg: ModelConfig) -> str:
    for pattern, template in NAME_TABLE:
        m = re.fullmatch(pattern, native)
        if m:
            layer = cfg.num_hidden_layers + int(m.group(1)) if template.count("{L}") else None
            return template.format(*m.groups(), L=layer)
    raise KeyError(f"no HF name for native tensor {native!r}")


def _expert_stack(native: str, cfg: ModelConfig) -> tuple[str, str, str] | None:
    """For a stacked expert tensor: (its EXPERT_SPLIT key, the HF prefix "...mlp.experts.", the HF tail "weight"
    or "weight_scale_inv"); None for any other tensor."""
    base = native.removesuffix("_scale_inv")
    stacked = next((s for s in EXPERT_SPLIT if base.endswith(s)), None)
    if stacked is None:
        return None
    tail = "weight" if base == native else "weight_scale_inv"
    return stacked, hf_name(base, cfg)[: -len(stacked.split(".")[-1])], tail


def hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under their HF checkpoint names (experts split, MTP's shared tensors repeated)."""
    cfg = model.cfg
    state = model.state_dict()
    for native, tensor in state.items():
        found = _expert_stack(native, cfg)
        if found is None:
            yield hf_name(native, cfg), tensor
            continue
        stacked, prefix, tail = found
        half = tensor.shape[1] // 2  # I rows of weights, or the scale rows of I
        for e in range(tensor.shape[0]):
            for proj, part in EXPERT_SPLIT[stacked]:
                rows = tensor[e] if part is None else tensor[e, part * half:(part + 1) * half]
                yield f"{prefix}{e}.{proj}.{tail}", rows
    for k in range(len(model.mtp)):
        for suffix, native in MTP_SHARED:
            yield f"model.layers.{cfg.num_hidden_layers + k}.{suffix}", state[native]


def fp8_eligible(name: str, tensor: torch.Tensor) -> bool:
    # The official release quantises every linear weight except embedding, heads and the router.
    return tensor.dim() == 2 and name.endswith(".weight") and not NOT_FP8.search(name)


# ---- reading -----------------------------------------------------------------------------------------------------
class _Reader:
    """Lazy access to the tensors of a checkpoint folder by HF name, through safetensors' mmap."""

    def __init__(self, path: Path):
        if (path / INDEX).is_file():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        elif (path / SINGLE).is_file():
            with safe_open(path / SINGLE, framework="pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"{path} holds neither {INDEX} nor {SINGLE}")
        for file in set(weight_map.values()):
            if not (path / file).is_file():
                raise CheckpointError(f"{path / INDEX} names shard {file}, which is missing")
        self.path, self.weight_map, self._open = path, weight_map, {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def _file(self, name: str):
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.path / file, framework="pt")
        return self._open[file]

    def shape(self, name: str) -> list[int]:
        return self._file(name).get_slice(name).get_shape()

    def stored(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored (FP8 stays FP8)."""
        return self._file(name).get_tensor(name)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor `name` in `dtype`, dequantised through its `_scale_inv` if it is stored as FP8."""
        t = self.stored(name)
        if t.dtype == FP8:
            scale = name + "_scale_inv"
            if scale not in self.weight_map:
                raise CheckpointError(f"{name} is float8_e4m3fn but {scale} is missing")
            return dequantize_weight_blocks(t, self._file(scale).get_tensor(scale), dtype)
        return t.to(dtype)


def load_model(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               mtp: bool = True, fp8_gemms: bool | None = None) -> Transformer:
    """Build the model of an HF DeepSeek-V3 folder and fill it from its safetensors.

    dtype defaults to the checkpoint's `torch_dtype` (bf16 for the official release, FP8 weights dequantised).
    `mtp=False` loads without the MTP modules (a checkpoint without them needs it; saves memory for plain decoding).
    `fp8_gemms`: keep the FP8 weights of the linear layers as stored and run them through FP8 GEMMs
    (`fp8_infer.py`). None (the default) does so when the checkpoint is FP8 and `device` has FP8 tensor cores;
    True forces it, emulated where the kernels cannot run (the CPU tests); False dequantises everything.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if dtype is None:
        dtype = getattr(torch, cfg.torch_dtype, None) or torch.bfloat16
    device = torch.device(device or "cpu")
    reader = _Reader(path)

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    cast_model(model, dtype)
    model.rotary = Rotary(cfg).to(device)  # a non-persistent buffer: computed, not loaded
    unsupported = ops.fp8_unsupported_reason(device)
    if fp8_gemms or (fp8_gemms is None and cfg.quantized_fp8 and unsupported is None):
        stored_fp8 = {n[: -len("_scale_inv")] for n in reader.names() if n.endswith("_scale_inv")}
        replace_linears(model, lambda m: fp8_served(m) and hf_name(m + ".weight", cfg) in stored_fp8,
                        emulate=unsupported is not None)
        if any(".mlp.experts." in n for n in stored_fp8):
            replace_experts(model, emulate=unsupported is not None)
        if unsupported is None:
            ops.cublas_block_scaled(device)  # its one-time self-check syncs: now, not inside a CUDA-graph capture

    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    expected: set[str] = set()
    for native, target in params.items():
        if native.startswith("rotary."):
            continue
        found = _expert_stack(native, cfg)
        if found is None:
            name = hf_name(native, cfg)
            expected.add(name)
            if target.dtype == FP8:  # an Fp8WeightLinear's weight, kept as stored
                owner = model.get_submodule(native.rpartition(".")[0])
                _copy_in_fp8(reader, name, target, (owner.out_features, owner.in_features))
            else:
                _copy_in(reader, name, target)
            continue
        stacked, prefix, tail = found
        half = target.shape[1] // 2  # I rows (Ip for an FP8 stack, whose halves are padded), or their scale rows
        owner = model.get_submodule(native.rpartition(".")[0])
        for e in range(target.shape[0]):
            for proj, part in EXPERT_SPLIT[stacked]:
                name = f"{prefix}{e}.{proj}.{tail}"
                expected.add(name)
                dest = target.data[e] if part is None else target.data[e, part * half:(part + 1) * half]
                if target.dtype == FP8:  # an Fp8WeightExperts stack, kept as stored
                    shape = (owner.dim, owner.inter) if part is None else (owner.inter, owner.dim)
                    _copy_in_fp8(reader, name, dest, shape)
                else:
                    _copy_in(reader, name, dest)
    for k in range(len(model.mtp)):
        for suffix, native in MTP_SHARED:
            name = f"model.layers.{cfg.num_hidden_layers + k}.{suffix}"
            expected.add(name)
            if name in reader.names() and not torch.equal(reader.get(name, dtype).to(device), params[native].data):
                raise CheckpointError(f"{name} differs from {hf_name(native, cfg)}; dsv3 shares the MTP "
                                      f"embedding and head with the main model (as DeepSeek-V3 does)")

    _check_leftovers(reader, expected, cfg, mtp)
    model.eval()
    return model


def _copy_in(reader: _Reader, name: str, dest: torch.Tensor) -> None:
    if name not in reader.weight_map:
        raise CheckpointError(f"missing tensor {name} (expected shape {list(dest.shape)})")
    shape = reader.shape(name)
    if list(shape) != list(dest.shape):
        raise CheckpointError(f"tensor {name} has shape {list(shape)} but the config implies {list(dest.shape)}; "
                              f"config.json does not match the weights")
    with torch.no_grad():
        dest.copy_(reader.get(name, dest.dtype))


def _copy_in_fp8(reader: _Reader, name: str, dest: torch.Tensor, shape: tuple[int, int]) -> None:
    # dest: e4m3 [Np, Kp], the stored weight of `shape` [N, K] zero-padded to whole 128x128 blocks (Fp8WeightLinear)
    t = reader.stored(name)
    if t.dtype != FP8 or tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name} is {t.dtype} {list(t.shape)}, but the config implies an FP8 weight of "
                              f"{list(shape)}; config.json does not match the weights")
    with torch.no_grad():
        dest.zero_()
        dest[: shape[0], : shape[1]].copy_(t)


def _check_leftovers(reader: _Reader, expected: set[str], cfg: ModelConfig, mtp: bool) -> None:
    mtp_prefix = re.compile(r"model\.layers\.(\d+)\.")
    unexpected = []
    for name in sorted(reader.names() - expected):
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in expected:
            continue
        m = mtp_prefix.match(name)
        if not mtp and m and int(m.group(1)) >= cfg.num_hidden_layers:
            continue  # MTP layers skipped on purpose
        unexpected.append(name)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"unexpected tensors in checkpoint: {', '.join(unexpected[:5])}{more}; "
                              f"config.json does not match the weights")


# ---- writing -----------------------------------------------------------------------------------------------------
def save_model(model: Transformer, path: str | Path, fp8: bool = False, dtype: torch.dtype | None = None,
               tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as an HF DeepSeek-V3 folder, atomically.

    dtype defaults to the model's own (fp32 stays fp32); with fp8=True linear weights are stored e4m3 in 128x128
    blocks with `weight_scale_inv`, the rest in `dtype` (bf16 by default), like the official release.
    The router weight and bias are always fp32.
    """
    if dtype is None:
        dtype = torch.bfloat16 if fp8 else model.embed_tokens.weight.dtype
    cfg = model.cfg.replace(torch_dtype=str(dtype).removeprefix("torch."),
                            quantization_config=dict(FP8_QUANT_CONFIG) if fp8 else None)
    tensors = ((name, t.detach()) for name, t in hf_tensors(model))
    return write_checkpoint(path, cfg.to_hf(), tensors, fp8=fp8, dtype=dtype,
                            extra_files=_tokenizer_files(tokenizer_dir), max_shard_bytes=max_shard_bytes)


def _tokenizer_files(folder: str | Path | None) -> list[Path]:
    if folder is None:
        return []
    return [Path(folder) / f for f in TOKENIZER_FILES if (Path(folder) / f).is_file()]


def _store(name: str, t: torch.Tensor, fp8: bool, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    if t.dtype == FP8:  # already quantised (convert's pass-through, a model serving FP8 weights)
        yield name, t.contiguous()
    elif name.endswith("_scale_inv"):
        yield name, t.to(torch.float32, copy=True)
    elif fp8 and fp8_eligible(name, t):
        q, scale = quantize_weight_blocks(t)
        yield name, q
        yield name + "_scale_inv", scale
    elif name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias"):
        yield name, t.to(torch.float32, copy=True)  # routing stays fp32: near-ties decide experts
    else:
        # A copy: safetensors refuses tensors sharing storage (expert slices, MTP's shared embedding and head).
        yield name, t.to(dtype, copy=True).contiguous()


def write_checkpoint(path: str | Path, config: dict, tensors: Iterable[tuple[str, torch.Tensor]], fp8: bool,
                     dtype: torch.dtype, extra_files: Iterable[Path] = (), max_shard_bytes: int = 5 * 2**30) -> Path:
    """Stream (HF name, tensor) pairs into shards in a temporary folder, then rename it to `path`."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes, files = [0], []
        total = 0

        def flush() -> None:
            files.append(f"part-{len(files):05d}.safetensors")
            save_file(shards[-1], str(tmp / files[-1]), metadata={"format": "pt"})
            _fsync(tmp / files[-1])
            shards[-1] = {}
            sizes[-1] = 0

        weight_map: dict[str, str] = {}
        for name, t in tensors:
            for stored_name, stored in _store(name, t, fp8, dtype):
                nbytes = stored.numel() * stored.element_size()
                if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                    flush()
                if stored_name in weight_map or stored_name in shards[-1]:
                    raise CheckpointError(f"tensor {stored_name} written twice")
                shards[-1][stored_name] = stored.cpu()
                weight_map[stored_name] = str(len(files))
                sizes[-1] += nbytes
                total += nbytes
        flush()
        # Name the shards the way HF does once their count is known.
        n = len(files)
        final = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for old, new in zip(files, final):
            os.replace(tmp / old, tmp / new)
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: final[int(v)] for k, v in sorted(weight_map.items())}}
            _write_text(tmp / INDEX, json.dumps(index, indent=2))
        _write_text(tmp / "config.json", json.dumps(config, indent=2))
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_text(path: Path, text: str) -> None:
    path.write_text(text + "\n")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder into place. An older checkpoint at `path` stays whole until the new one is there."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "ckpt")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ---- conversion --------------------------------------------------------------------------------------------------
def convert(src: str | Path, dst: str | Path, to: str, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Rewrite a checkpoint as bf16 (`to="bf16"`) or FP8 block-scaled (`to="fp8"`), one tensor at a time."""
    src = Path(src)
    if to not in ("bf16", "fp8"):
        raise ValueError(f"convert target must be bf16 or fp8, got {to!r}")
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder {src} does not exist")
    cfg = ModelConfig.from_hf(src)
    reader = _Reader(src)
    fp8 = to == "fp8"
    cfg = cfg.replace(torch_dtype="bfloat16", quantization_config=dict(FP8_QUANT_CONFIG) if fp8 else None)
    names = sorted(n for n in reader.names() if not n.endswith("_scale_inv"))
    # Routing tensors keep fp32 exactly; the rest pass through bf16 on their way to FP8 or bf16.
    tensors = ((n, reader.get(n, torch.float32 if NOT_FP8.search(n) or n.endswith("bias") else torch.bfloat16))
               for n in names)
    extra = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    return write_checkpoint(dst, cfg.to_hf(), tensors, fp8=fp8, dtype=torch.bfloat16, extra_files=extra,
                            max_shard_bytes=max_shard_bytes)


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert an HF DeepSeek-V3 checkpoint between FP8 and bf16")
    p.add_argument("src", help="checkpoint folder to read")
    p.add_argument("dst", help="folder to write (replaced atomically)")
    p.add_argument("--to", choices=["bf16", "fp8"], required=True)

    def run(args) -> int:
        out = convert(args.src, args.dst, args.to)
        print(f"wrote {args.to} checkpoint to {out}")
        return 0

    p.set_defaults(func=run)
