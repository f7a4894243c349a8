"""Pretraining with the DeepSeek-V3 recipe: `dsv3 train`.

Notable features:
- `TrainConfig` is a frozen dataclass; a TOML/JSON file sets it and every field is also a command-line flag
  (`--max-steps 100`, `--balance aux_loss`, ...), later sources winning.
- AdamW (beta 0.9/0.95, weight decay 0.1 on matrices), gradient clipping at 1.0, the report's learning-rate shape
  (warm-up, constant, cosine, tail) and optional batch-size ramp through gradient accumulation.
- Auxiliary-loss-free balancing (bias update after each step, gamma switched off after a token count) with the
  complementary sequence-wise loss; `--balance aux_loss` runs the classic auxiliary loss instead, for the ablation.
- Multi-token prediction: loss lambda/D * sum_k CE_k with lambda 0.3 then 0.1; per-depth loss and top-1 accuracy.
- bf16 autocast on the GPU, fp32 on the CPU, FP8 (`--precision fp8`) through `dsv3.fp8_train`; optional
  torch.compile and activation checkpointing. Master weights are always fp32. Under bf16 or FP8 the AdamW moments
  are bf16, as in the report (one Triton pass per parameter, 1.57x torch's fused fp32-moment AdamW on the `1b`
  model; validation loss within seed spread of fp32 moments, docs/experiments.md); fp32 training keeps fp32 ones.
- Checkpoints every N steps and at the end: the model in HF format plus the optimiser, schedules, data position and
  RNG state, written atomically, the last K kept; `--resume` continues the same run exactly.
- A non-finite loss stops the run with a clear message before the optimiser touches the weights.
- Metrics: a progress bar (loss, tokens/s, MFU, MaxVio) and `metrics.jsonl`; validation loss and bits per byte.
- Data parallel across processes and machines under torchrun, through `dsv3.parallel` (FSDP2): each rank reads its
  slice of every global batch, the MoE loads are summed over ranks before the bias update, losses and metrics are
  global averages, rank 0 alone writes files; the optimiser state is checkpointed sharded (DCP).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .balance import balance_loss, max_violation, update_bias
from .checkpoint import load_model, save_model
from .config import ModelConfig
from .fp8_train import clip_and_step, make_adamw
from .info import model_stats
from .loss import head_cross_entropy
from .loader import PackedLoader, TokenDataset, iter_eval_batches
from .model import build_model
from .parallel import (accumulation_steps, all_reduce_loads, all_reduce_mean, barrier, broadcast_object,
                       gather_model, init_distributed, load_full_state_dict, load_optimizer,
                       parallelize, save_optimizer, shutdown_distributed)
from .schedule import LRSchedule, batch_size_at, step_value


@dataclass(frozen=True)
class TrainConfig:
    # model
    preset: str = "tiny"
    model_config: str | None = None  # a config.json (or folder) instead of the preset
    init_from: str | None = None  # an HF checkpoint to start from; its config sets the shapes, not the preset
    mtp_depth: int | None = None  # None: the config's num_nextn_predict_layers; 0 disables MTP
    # data
    data: str | None = None  # a folder made by `dsv3 prepare`
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward on each rank
    batch_size: int = 8  # sequences per optimiser step, all ranks together
    batch_start: int | None = None  # batch-size ramp: start here...
    batch_ramp_tokens: int = 0  # ...and reach batch_size after this many tokens
    # optimisation
    max_steps: int = 1000
    lr: float = 2.2e-4
    min_lr: float = 2.2e-5
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16_moments: bool | None = None  # AdamW moments in bf16 (None: under bf16 or fp8 precision, as in the report)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp8
    compile: bool = False
    activation_checkpointing: bool = False
    # balancing
    balance: str = "aux_free"  # aux_free (bias update + sequence-wise loss) or aux_loss (classic auxiliary loss)
    bias_update_speed: float = 0.001  # gamma
    bias_update_stop_tokens: int | None = None  # gamma -> 0 from here (the report: the last 500B tokens)
    seq_aux_alpha: float = 1e-4  # complementary sequence-wise loss (aux_free)
    aux_loss_alpha: float = 1e-3  # classic auxiliary loss (aux_loss)
    # multi-token prediction
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_tokens: int | None = None
    # run
    out: str = "runs/train"
    seed: int = 0
    device: str | None = None
    log_interval: int = 10
    eval_interval: int = 200
    eval_batches: int = 20
    save_interval: int = 500
    keep_checkpoints: int = 2
    peak_tflops: float | None = None  # for MFU; None: known GPUs only
    deterministic: bool | None = None  # None: on the CPU only, where it costs little and makes resume bit-exact

    def __post_init__(self) -> None:
        checks = [
            (self.balance in ("aux_free", "aux_loss"), f"balance must be aux_free or aux_loss, got {self.balance!r}"),
            (self.precision in ("auto", "fp32", "bf16", "fp8"),
             f"precision must be auto, fp32, bf16 or fp8, got {self.precision!r}"),
            (self.micro_batch >= 1 and self.batch_size % self.micro_batch == 0,
             f"batch_size ({self.batch_size}) must be a multiple of micro_batch ({self.micro_batch})"),
            (self.batch_start is None or 1 <= self.batch_start <= self.batch_size,
             f"batch_start ({self.batch_start}) must lie in 1..batch_size"),
            (self.max_steps >= 1 and self.seq_len >= 2, "max_steps must be >= 1 and seq_len >= 2"),
            (self.lr > 0 and self.min_lr >= 0, "lr must be positive and min_lr non-negative"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


class TrainingDiverged(RuntimeError):
    """The loss went non-finite; the weights were not updated with it."""


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0}


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 FLOP/s of a known GPU, None elsewhere. MFU is quoted against the bf16 peak even for FP8 runs,
    so the two compare on one scale."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms and biases are left alone."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """n rounded up to a multiple of `multiple`; 128, as DeepSeek-V3 pads its 128,815 tokens to 129,280 (1,010 x 128).
    Why: a head whose rows are not a multiple of 8 has no aligned tensor-core GEMM, and cuBLAS falls back to sm75
    kernels: the `1b` step at DeepSeek-V3's exact 128,815 took 190 ms of kernels instead of 100 on an H200."""
    return -(-n // multiple) * multiple


class Trainer:
    def __init__(self, tc: TrainConfig, resume: str | Path | None = None, progress: bool = True):
        self.tc, self.progress = tc, progress
        self.rank, self.world_size, _, self.device = init_distributed(tc.device)
        accumulation_steps(tc.batch_size, tc.micro_batch, self.world_size)  # a clear error if it does not divide
        self.precision = tc.precision if tc.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if tc.data is None:
            raise ValueError("no training data: pass --data DIR (a folder made by `dsv3 prepare`)")
        self.train_data = TokenDataset(tc.data, "train")
        self.val_data = TokenDataset(tc.data, "val")
        self.out = Path(tc.out)

        self.resume_from = find_checkpoint(Path(resume)) if resume else None
        cfg = self._model_config(tc)
        if tc.mtp_depth is not None:
            cfg = cfg.replace(num_nextn_predict_layers=tc.mtp_depth)
        if tc.balance == "aux_free" and cfg.topk_method != "noaux_tc":
            raise ValueError("balance aux_free needs topk_method noaux_tc (a gate with a correction bias)")
        self.cfg = cfg
        torch.manual_seed(tc.seed)
        self.model = build_model(cfg, device=self.device, dtype=torch.float32, seed=tc.seed)
        if tc.init_from:
            self._load_initial_weights(tc.init_from)
        if tc.activation_checkpointing:
            for block in [*self.model.layers, *(m.block for m in self.model.mtp)]:
                block.checkpoint = True
        if self.precision == "fp8":
            if self.world_size > 1:
                raise ValueError("precision fp8 is not supported with several processes yet (FP8 weight caches "
                                 "under FSDP2 are untested); use bf16")
            from .fp8_train import apply_fp8

            apply_fp8(self.model)
        self.moe = self.model.moe_layers()
        for moe in self.moe:
            moe.keep_routing = self._balance_alpha() > 0
        if self.world_size > 1:
            parallelize(self.model, param_dtype=torch.bfloat16 if self.precision == "bf16" else None)
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.optimizer = self._make_optimizer()
        self.loader = PackedLoader(self.train_data, tc.micro_batch, tc.seq_len, seed=tc.seed, rank=self.rank,
                                   world_size=self.world_size)
        self.schedule = LRSchedule.report_shape(tc.lr, tc.min_lr, tc.warmup_steps, tc.max_steps)
        self.step, self.tokens_seen = 0, 0
        self.last_checkpoint: Path | None = None
        stats = model_stats(cfg, tc.seq_len)
        self.flops_per_token = stats.train_flops_per_token if cfg.num_nextn_predict_layers else \
            3 * stats.fwd_flops_per_token
        peak = tc.peak_tflops * 1e12 if tc.peak_tflops is not None else peak_bf16_flops(self.device)
        self.peak_flops = peak * self.world_size if peak else None  # the whole job's
        if self.resume_from:
            self._resume(self.resume_from)

    # ---- pieces ----------------------------------------------------------------------------------------------
    def _balance_alpha(self) -> float:
        return self.tc.seq_aux_alpha if self.tc.balance == "aux_free" else self.tc.aux_loss_alpha

    def _model_config(self, tc: TrainConfig) -> ModelConfig:
        vocab = self.train_data.vocab_size
        if self.resume_from:
            # A resumed run keeps its own model, whatever the preset or this version's vocabulary padding say.
            cfg = ModelConfig.from_hf(self.resume_from / "model")
        elif tc.init_from:
            if tc.model_config:
                raise ValueError("give --init-from or --model-config, not both: the checkpoint's config.json sets "
                                 "the model's shapes")
            cfg = ModelConfig.from_hf(tc.init_from)
            if cfg.vocab_size < vocab:
                raise ValueError(f"--init-from {tc.init_from} has a vocabulary of {cfg.vocab_size} tokens, fewer "
                                 f"than the {vocab} of the data in {tc.data}")
        else:
            cfg = ModelConfig.from_hf(tc.model_config) if tc.model_config else ModelConfig.preset(tc.preset)
            # The vocabulary is the tokenizer's, padded; the preset only sets the shape of everything else.
            cfg = cfg.replace(vocab_size=padded_vocab_size(vocab))
        return cfg.replace(quantization_config=None)

    def _load_initial_weights(self, path: str) -> None:
        # Every weight comes from the checkpoint (FP8 ones dequantised), except MTP depths it lacks, which keep
        # their fresh initialisation: --mtp-depth may ask for more than it has.
        source_depth = ModelConfig.from_hf(path).num_nextn_predict_layers
        source = load_model(path, device=self.device, dtype=torch.float32, fp8_gemms=False,
                            mtp=source_depth > 0 and self.cfg.num_nextn_predict_layers > 0).state_dict()
        own = self.model.state_dict()
        missing = [k for k in own if k not in source and not k.startswith("mtp.")]
        if missing:
            raise ValueError(f"--init-from {path} lacks {len(missing)} of the model's weights, e.g. {missing[0]}")
        self.model.load_state_dict({k: v for k, v in source.items() if k in own}, strict=False)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = adamw_param_groups(self.model, self.tc.weight_decay)
        bf16_moments = self.tc.bf16_moments if self.tc.bf16_moments is not None else self.precision != "fp32"
        return make_adamw(groups, lr=self.tc.lr, betas=(self.tc.beta1, self.tc.beta2),
                          weight_decay=self.tc.weight_decay, bf16_moments=bf16_moments)

    def _autocast(self):
        enabled = self.precision in ("bf16", "fp8")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _losses(self, batch: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict]:
        """batch: [B, T + 1] -> total loss and its parts (detached) for one micro-batch."""
        inputs = batch[:, :-1]
        depth = self.cfg.num_nextn_predict_layers
        with self._autocast():
            out = self.forward(inputs, mtp=depth > 0, head=False)
            main, _ = head_cross_entropy(out.hidden.flatten(0, 1), self.model.lm_head.weight,
                                         batch[:, 1:].flatten())
            total, parts = main, {"loss": main.detach()}
            if depth:
                mtp_losses, mtp_acc = mtp_terms(out.mtp_hidden, self.model.lm_head.weight, batch)
                total = total + lam / depth * torch.stack(mtp_losses).sum()
                parts["mtp_loss"] = [x.detach() for x in mtp_losses]
                parts["mtp_acc"] = mtp_acc
        alpha = self._balance_alpha()
        if alpha > 0 and self.moe:
            per_seq = self.tc.balance == "aux_free" or self.cfg.seq_aux
            bal = sum(balance_loss(m.routing, batch.shape[0], self.cfg.n_routed_experts,
                                   self.cfg.num_experts_per_tok, per_sequence=per_seq) for m in self.moe)
            total = total + alpha * bal
            parts["balance_loss"] = bal.detach()
        return total, parts

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> dict:
        """Train to max_steps, or pause at step `stop_at` with a checkpoint (resume later with the same config)."""
        deterministic = self.tc.deterministic if self.tc.deterministic is not None else self.device.type == "cpu"
        before = torch.are_deterministic_algorithms_enabled()
        # Some parallel CPU kernels (scatter-adds such as the embedding's gradient) sum in a varying order otherwise.
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            return self._train(stop_at)
        finally:
            torch.use_deterministic_algorithms(before)

    def _train(self, stop_at: int | None) -> dict:
        tc = self.tc
        end = min(stop_at, tc.max_steps) if stop_at is not None else tc.max_steps
        lead = self.rank == 0
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2))
        metrics = (self.out / "metrics.jsonl").open("a") if lead else None
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (self.progress and lead), desc="train",
                   unit="step")
        self.model.train()
        last = {}
        t_log, tokens_log = time.perf_counter(), self.tokens_seen
        while self.step < end:
            lr = self.schedule(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch_size = batch_size_at(self.tokens_seen, tc.batch_start or tc.batch_size, tc.batch_size,
                                       tc.batch_ramp_tokens, multiple=tc.micro_batch * self.world_size)
            accum = accumulation_steps(batch_size, tc.micro_batch, self.world_size)
            lam = step_value(self.tokens_seen, tc.mtp_lambda, tc.mtp_lambda_late, tc.mtp_lambda_switch_tokens)
            loads = [torch.zeros(self.cfg.n_routed_experts, device=self.device, dtype=torch.long) for _ in self.moe]
            sums: dict = {}
            for _ in range(accum):
                batch = next(self.loader).to(self.device, non_blocking=True)
                total, parts = self._losses(batch, lam)
                (total / accum).backward()
                for load, moe in zip(loads, self.moe):
                    load += moe.load
                _accumulate(sums, parts, 1 / accum)
            all_reduce_loads(loads)  # every rank must move its biases alike
            sums = all_reduce_mean(sums)
            loss = float(sums["loss"])
            if not math.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                where = self.last_checkpoint or "none written yet"
                raise TrainingDiverged(f"non-finite loss ({loss}) at step {self.step}; stopped before the update. "
                                       f"Last good checkpoint: {where}")
            grad_norm = clip_and_step(self.optimizer, self.model.parameters(), tc.grad_clip)
            self.optimizer.zero_grad(set_to_none=True)
            gamma = step_value(self.tokens_seen, tc.bias_update_speed, 0.0, tc.bias_update_stop_tokens)
            if tc.balance == "aux_free":
                update_bias(self.moe, loads, gamma)
            self.step += 1
            self.tokens_seen += batch_size * tc.seq_len
            bar.update(1)

            if self.step % tc.log_interval == 0 or self.step == tc.max_steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t_log
                tok_s = (self.tokens_seen - tokens_log) / max(elapsed, 1e-9)
                t_log, tokens_log = time.perf_counter(), self.tokens_seen
                last = {"step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": lr,
                        "grad_norm": float(grad_norm), "batch_size": batch_size, "tokens_per_s": tok_s,
                        "mfu": tok_s * self.flops_per_token / self.peak_flops if self.peak_flops else None,
                        "maxvio": [max_violation(x) for x in loads], "mtp_lambda": lam, "bias_gamma": gamma,
                        **{k: _to_py(v) for k, v in sums.items() if k != "loss"}}
                if lead:
                    _write(metrics, last)
                    bar.set_postfix(_postfix(last))
            if self.step % tc.eval_interval == 0 or self.step == tc.max_steps:
                ev = {"step": self.step, "tokens": self.tokens_seen, **self.evaluate()}
                if lead:
                    _write(metrics, ev)
                last.update(ev)
            if self.step % tc.save_interval == 0 or self.step == end:
                self.save_checkpoint()
        bar.close()
        if lead:
            metrics.close()
        if self.step == tc.max_steps:
            self._save_model(self.out / "model")
        return last

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss, bits per byte, MaxVio per layer and MTP accuracy on the first eval_batches batches.
        Under FSDP every rank takes part in every forward, so each rank evaluates the same batches."""
        self.model.eval()
        depth = self.cfg.num_nextn_predict_layers
        nats, count, loads = 0.0, 0, [torch.zeros(self.cfg.n_routed_experts, device=self.device) for _ in self.moe]
        acc_sum = [0.0] * depth
        batches = 0
        for batch in iter_eval_batches(self.val_data, self.tc.micro_batch, self.tc.seq_len, self.tc.eval_batches):
            batch = batch.to(self.device)
            with self._autocast():
                out = self.forward(batch[:, :-1], mtp=depth > 0, head=False)
                loss, _ = head_cross_entropy(out.hidden.flatten(0, 1), self.model.lm_head.weight,
                                             batch[:, 1:].flatten())
                accs = mtp_terms(out.mtp_hidden, self.model.lm_head.weight, batch)[1] if depth else []
            nats += float(loss) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
            for load, moe in zip(loads, self.moe):
                load += moe.load
            for k, acc in enumerate(accs):
                acc_sum[k] += float(acc)
            batches += 1
        self.model.train()
        val_loss = nats / count
        tokens_per_byte = len(self.val_data) / max(self.val_data.num_bytes, 1)
        result = {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) * tokens_per_byte,
                  "val_maxvio": [max_violation(x) for x in loads]}
        if depth:
            result["val_mtp_acc"] = [a / batches for a in acc_sum]
        return result

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _save_model(self, path: Path) -> None:
        full = gather_model(self.model)  # under FSDP a collective: every rank takes part, rank 0 gets the model
        if full is not None:
            save_model(full, path, tokenizer_dir=self.train_data.tokenizer_path.parent)

    def save_checkpoint(self) -> Path:
        """out/checkpoints/step-N/{model (HF format), trainer_state.pt[, optimizer/ (sharded, DCP)]}, written to a
        temporary folder first, which rank 0 renames once every rank has written its part."""
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = None
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        tmp = broadcast_object(tmp)
        try:
            self._save_model(tmp / "model")
            # Every rank seeds alike and draws alike, so rank 0's RNG state stands for all of them.
            state = {"step": self.step, "tokens_seen": self.tokens_seen,
                     "loader": self.loader.state_dict(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else [],
                     "train_config": json.dumps(dataclasses.asdict(self.tc))}
            if self.world_size > 1:
                save_optimizer(self.model, self.optimizer, tmp / "optimizer")
            else:
                state["optimizer"] = self.optimizer.state_dict()
            if self.rank == 0:
                torch.save(state, tmp / "trainer_state.pt")
            barrier()  # every rank's optimiser shard is on disk
            if self.rank == 0:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_checkpoint = final
        if self.rank == 0:
            for old in sorted(root.glob("step-*"))[:-self.tc.keep_checkpoints]:
                shutil.rmtree(old)
        barrier()  # no rank goes on (and possibly resumes from it) before the checkpoint is in place
        return final

    def _resume(self, path: Path) -> None:
        # weights_only: the optimiser state is tensors and numbers; nothing else may be unpickled.
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        self.loader.load_state_dict(state["loader"])  # first: it refuses a different batch layout or world size
        saved = load_model(path / "model", device="cpu", dtype=torch.float32)
        load_full_state_dict(self.model, saved.state_dict())
        if (path / "optimizer").is_dir():
            load_optimizer(self.model, self.optimizer, path / "optimizer")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"][0], self.device)
        self.last_checkpoint = path


def find_checkpoint(path: Path) -> Path:
    """The training checkpoint `path` names: a step-* folder, or the latest one in a run's checkpoints folder (or in
    the run folder's)."""
    if path.name == "checkpoints" or (path / "checkpoints").is_dir():
        root = path if path.name == "checkpoints" else path / "checkpoints"
        found = sorted(root.glob("step-*"))
        if not found:
            raise FileNotFoundError(f"no checkpoint to resume from in {root}")
        path = found[-1]
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no trainer_state.pt)")
    return path


def mtp_terms(mtp_hidden: list[torch.Tensor], head: torch.Tensor,
              batch: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-depth cross-entropy and top-1 accuracy. mtp_hidden: D x [B, T, D]; head: [V, D]; batch: [B, T + 1].
    Depth k's output at position i predicts batch[:, i + k + 1], so positions T - k.. have no target in the batch
    and are left out."""
    t = batch.shape[1] - 1
    losses, accs = [], []
    for k, hidden in enumerate(mtp_hidden, start=1):
        loss, acc = head_cross_entropy(hidden[:, : t - k].flatten(0, 1), head, batch[:, k + 1:].flatten())
        losses.append(loss)
        accs.append(acc)
    return losses, accs


def _accumulate(sums: dict, parts: dict, weight: float) -> None:
    for k, v in parts.items():
        if isinstance(v, list):
            sums[k] = [a + b * weight for a, b in zip(sums.get(k, [0.0] * len(v)), v)]
        else:
            sums[k] = sums.get(k, 0.0) + v * weight


def _to_py(v):
    return [float(x) for x in v] if isinstance(v, list) else float(v)


def _write(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def _postfix(m: dict) -> dict:
    out = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
    if m.get("mfu") is not None:
        out["mfu"] = f"{100 * m['mfu']:.1f}%"
    if m["maxvio"]:
        out["maxvio"] = f"{max(m['maxvio']):.2f}"
    return out


# ---- command line ----------------------------------------------------------------------------------------------
def load_train_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown training settings {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its annotation."""
    for f in dataclasses.fields(TrainConfig):
        kind = str(f.type)
        conv = _parse_bool if "bool" in kind else int if "int" in kind else float if "float" in kind else str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=None,
                       help=f"(default {f.default!r})")


def register(sub) -> None:
    p = sub.add_parser("train", help="pretrain a DeepSeek-V3 model with the report's recipe")
    p.add_argument("--config", help="a TOML or JSON file of training settings (flags override it)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue a run: a checkpoint folder, or (no value) the latest under --out")
    p.add_argument("--stop-at", type=int, help="pause at this step with a checkpoint (continue with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    add_train_flags(p)

    def run(args) -> int:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        tc = load_train_config(args.config, {k: v for k, v in vars(args).items() if k in names})
        resume = None
        if args.resume:
            resume = Path(tc.out) / "checkpoints" if args.resume == "auto" else Path(args.resume)
        rank = init_distributed(tc.device)[0]  # under torchrun: the process group, before the Trainer needs it
        try:
            last = Trainer(tc, resume=resume, progress=not args.no_progress).train(stop_at=args.stop_at)
        except TrainingDiverged as e:
            if rank == 0:
                print(f"dsv3 train: {e}")
            return 1
        finally:
            shutdown_distributed()
        if rank == 0:
            print(json.dumps({k: v for k, v in last.items() if not isinstance(v, list)}))
            if last.get("step") == tc.max_steps:
                print(f"model written to {Path(tc.out) / 'model'}")
        return 0

    p.set_defaults(func=run)
