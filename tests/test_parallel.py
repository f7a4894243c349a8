"""Data-parallel training (FSDP2, gloo, 2 CPU processes) against one process with the same global batch: losses,
routing biases, the HF checkpoint, exact resume through `dsv3 train --resume`, and the fp32 gates under bf16
mixed precision.

The 2-process part is one torchrun launch (`--standalone`: a free port) of this file as the worker script
(`python tests/test_parallel.py DATA WORK` on each rank); one launch keeps the file fast on 2 cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.parallel import (accumulation_steps, all_reduce_loads, all_reduce_mean, broadcast_object, gather_model,
                           init_distributed, parallelize)
from dsv3.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
# Global batch 8 = micro-batch 2 x 4 accumulation steps in one process, 2 x 2 x 2 ranks in two.
TRAIN = dict(preset="tiny", seq_len=32, micro_batch=2, batch_size=8, max_steps=4, lr=3e-3, warmup_steps=2,
             log_interval=1, eval_interval=1000, eval_batches=2, save_interval=1000, seed=0)


def _tc(data, out, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**TRAIN, **kw})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


# ---- the worker: runs on each of the 2 ranks ---------------------------------------------------------------------
def _worker(data: Path, work: Path) -> None:
    """A straight run; a run paused at step 2 and resumed by the CLI (which ends the process group); a bf16 step."""
    from dsv3.cli import main

    rank, world, _, _ = init_distributed("cpu")
    assert world == 2
    trainer = Trainer(_tc(data, work / "straight"), progress=False)
    trainer.train()
    buffers = dict(trainer.model.named_buffers())
    torch.save({"types": {n: type(b).__name__ for n, b in buffers.items()},
                "buffers": {n: b.detach().clone() for n, b in buffers.items()}}, work / f"buffers-{rank}.pt")
    (work / f"mixed-{rank}.json").write_text(json.dumps(_mixed_precision_step(rank)))
    Trainer(_tc(data, work / "paused", activation_checkpointing=True), progress=False).train(stop_at=2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN.items()]
    sys.exit(main(["train", f"--data={data}", f"--out={work / 'paused'}", "--resume", "--no-progress",
                   "--activation-checkpointing=true", *flags]))


def _mixed_precision_step(rank: int) -> dict:
    """One forward/backward of a model sharded with bf16 parameters, beside an unsharded fp32 copy under autocast."""
    from dsv3.loss import head_cross_entropy

    cfg = dsv3.ModelConfig.preset("tiny")
    reference, model = dsv3.build_model(cfg, seed=1), dsv3.build_model(cfg, seed=1)
    parallelize(model, param_dtype=torch.bfloat16)
    seen = {}
    for name in ("mlp.gate", "self_attn.o_proj"):
        model.layers[1].get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.__setitem__(name, str(module.weight.dtype)))
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))

    def loss(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(tokens[:, :-1], mtp=True, head=False)
            return head_cross_entropy(out.hidden.flatten(0, 1), m.lm_head.weight, tokens[:, 1:].flatten())[0]

    sharded = loss(model)
    sharded.backward()
    grad = model.layers[1].mlp.gate.weight.grad
    return {"dtypes": seen, "loss": sharded.item(), "reference_loss": loss(reference).item(),
            "gate_grad_dtype": str(grad.dtype), "gate_grad_norm": grad.full_tensor().norm().item()}


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.conftest import shakespeare_dataset  # here, not at the top: torchrun runs this file as a script

    return shakespeare_dataset(tmp_path_factory, n_files=4, val_fraction=0.25)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """One process, then the two ranks of `_worker`; (the folder, the workers' stdout)."""
    work = tmp_path_factory.mktemp("runs")
    Trainer(_tc(dataset, work / "single"), progress=False).train()
    return work, _torchrun([str(Path(__file__).resolve()), str(dataset), str(work)]).stdout


# ---- tests -------------------------------------------------------------------------------------------------------
def test_two_ranks_match_one_process(runs):
    work, _ = runs
    single, sharded = _records(work / "single"), _records(work / "straight")
    # Rank 0 alone writes: one record per step and the final evaluation, not two of each.
    assert len(single) == len(sharded) == TRAIN["max_steps"] + 1
    for a, b in zip(single[:-1], sharded[:-1]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["maxvio"] == a["maxvio"]  # from the loads summed over both ranks
        for key in ("balance_loss", "mtp_loss", "mtp_acc"):  # averaged over the ranks
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert sharded[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)
    assert single[-2]["loss"] < single[0]["loss"] - 0.3  # and it learns


def test_routing_biases_stay_replicated_and_match(runs):
    work, _ = runs
    ranks = [torch.load(work / f"buffers-{r}.pt") for r in range(2)]
    names = [n for n in ranks[0]["buffers"] if n.endswith("e_score_correction_bias")]
    assert len(names) == 3  # two MoE layers and the MTP block
    assert all(ranks[r]["types"][n] == "Tensor" for r in range(2) for n in names)  # not sharded by FSDP
    single = dsv3.load_model(work / "single" / "model").state_dict()
    for n in names:
        assert torch.count_nonzero(single[n]) > 0  # the biases did move
        assert torch.equal(ranks[0]["buffers"][n], ranks[1]["buffers"][n])
        # Each update is +-gamma from the sign of integer loads summed over the ranks: exactly the one-process update.
        assert torch.equal(ranks[0]["buffers"][n], single[n])


def test_sharded_run_writes_the_same_hf_checkpoint(runs):
    work, _ = runs
    a, b = work / "single" / "model", work / "straight" / "model"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    single, sharded = dsv3.load_model(a).state_dict(), dsv3.load_model(b).state_dict()
    assert single.keys() == sharded.keys()
    for name in single:
        # Adam moves an element by up to lr a step however small its gradient, so an element whose gradient is
        # near zero (an embedding row of a rare token) can end up apart by a rounding of the two runs' different
        # summation orders (one batch vs two halves): a few such elements may miss 1e-5, by far less than lr.
        diff = (sharded[name].float() - single[name].float()).abs()
        assert (diff > 1e-5).sum() <= max(2, diff.numel() // 10_000) and diff.max() < 0.1 * TRAIN["lr"], name


def test_resume_on_two_ranks_continues_exactly(runs):
    work, stdout = runs
    straight, resumed = _records(work / "straight"), _records(work / "paused")
    assert [r.get("loss") for r in resumed] == [r.get("loss") for r in straight]
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]
    a = dsv3.load_model(work / "straight" / "model").state_dict()
    b = dsv3.load_model(work / "paused" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The optimiser state was saved sharded, one file per rank; no temporary folder was left behind.
    ckpts = work / "paused" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    opt = ckpts / "step-00000002" / "optimizer"
    assert (opt / ".metadata").is_file() and len(list(opt.glob("*.distcp"))) == 2
    # Only rank 0 printed the summary.
    assert sum(line.startswith("{") for line in stdout.splitlines()) == 1


def test_gates_stay_fp32_under_bf16_parameters(runs):
    work, _ = runs
    for rank in range(2):
        r = json.loads((work / f"mixed-{rank}.json").read_text())
        assert r["dtypes"] == {"mlp.gate": "torch.float32", "self_attn.o_proj": "torch.bfloat16"}
        assert r["gate_grad_dtype"] == "torch.float32" and r["gate_grad_norm"] > 0
        assert r["loss"] == pytest.approx(r["reference_loss"], abs=5e-3)  # bf16 weights vs fp32 under autocast


def test_one_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert init_distributed("cpu") == (0, 1, 0, torch.device("cpu"))
    loads = [torch.tensor([3, 1]), torch.tensor([0, 4])]
    assert all_reduce_loads(loads) is loads and loads[0].tolist() == [3, 1]
    values = {"loss": torch.tensor(2.5), "mtp_acc": [torch.tensor(0.25)]}
    assert all_reduce_mean(values) is values
    assert broadcast_object("x") == "x"
    model = dsv3.build_model(dsv3.ModelConfig.preset("tiny"))
    assert gather_model(model) is model
    with pytest.raises(ValueError, match="process group"):
        parallelize(model)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun"):
        init_distributed("cpu")


def test_accumulation_steps():
    assert accumulation_steps(8, 2, 1) == 4 and accumulation_steps(8, 2, 2) == 2 and accumulation_steps(16, 4, 4) == 1
    with pytest.raises(ValueError, match=r"multiple of micro_batch x world_size \(2 x 3 = 6\)"):
        accumulation_steps(8, 2, 3)
    with pytest.raises(ValueError, match="micro_batch x world_size"):
        accumulation_steps(4, 4, 2)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
