"""benchmarks.common.GpuMonitor against a stand-in nvidia-smi on PATH: it parses the samples, skips "[N/A]" rows,
asks for the device by UUID, and gives None without a CUDA device or without nvidia-smi."""

import os
import stat
import time
import types

import torch

from benchmarks.common import GpuMonitor


def _fake_smi(tmp_path, lines: list[str]) -> str:
    script = tmp_path / "nvidia-smi"
    body = "\n".join(f'echo "{line}"' for line in lines)
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args"\n{body}\nexec sleep 30\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def test_summary_of_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, ["1600, 690.5, 700.00", "[N/A], 1, 700", "1700, 650.5, 700.00"])
                       + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid="1234-abcd"))
    with GpuMonitor(torch.device("cuda")) as gpu:
        deadline = time.time() + 10
        while len(gpu.samples) < 2 and time.time() < deadline:
            time.sleep(0.05)
    assert gpu.summary() == {"sm_mhz_mean": 1650, "sm_mhz_min": 1600, "power_w_mean": 670.5,
                             "power_limit_w": 700.0, "samples": 2}
    assert (tmp_path / "args").read_text().split()[:2] == ["-i", "GPU-1234-abcd"]


def test_none_without_cuda_or_nvidia_smi(tmp_path, monkeypatch):
    with GpuMonitor(torch.device("cpu")) as gpu:
        pass
    assert gpu.summary() is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    with GpuMonitor(torch.device("cuda")) as gpu:
        pass
    assert gpu.summary() is None
