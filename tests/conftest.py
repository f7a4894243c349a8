import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "tokenizers" / "deepseek-v3"


def rerun_under_interpreter(test_file: str, keyword: str | None = None, timeout: int = 600,
                            allow_skips: bool = False) -> None:
    """Runs a test file's (keyword-selected) tests again in a subprocess with TRITON_INTERPRET=1, which Triton reads
    when kernels are defined, and asserts they all passed."""
    skip_if_interpreter_broken()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    select = ["-k", keyword] if keyword else []
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, test_file],
                         cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout
    assert allow_skips or " skipped" not in run.stdout, run.stdout


def on_cpu_under_the_interpreter(triton_module):
    """Marks a file's `test_under_the_triton_interpreter` (which calls rerun_under_interpreter): it runs on a machine
    without a GPU (with one, the compiled kernels are tested instead), with the triton package, and not inside the
    rerun itself."""
    def mark(test):
        test = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested")(test)
        test = pytest.mark.skipif(triton_module is None, reason="needs the triton package (its interpreter runs "
                                                                "the kernels)")(test)
        return pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the subprocess")(test)
    return mark


def skip_if_interpreter_broken() -> None:
    """Skip where Triton's interpreter cannot run our kernels at all."""
    import numpy as np
    import triton

    # Triton 3.6's interpreter (the GPU image's) converts scalar kernel arguments with int() of a one-element array,
    # which NumPy 2.4 refuses; Triton 3.9's squeezes first. Checked: 3.6 fails every kernel test here, 3.9 passes.
    if _version(triton.__version__) < (3, 9) and _version(np.__version__) >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run under NumPy {np.__version__}")


def _version(text: str) -> tuple[int, int]:
    return tuple(int(part) for part in text.split(".")[:2])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def shakespeare_dataset(tmp_path_factory, n_files: int, val_fraction: float) -> Path:
    """A `dsv3 prepare` dataset of n_files 50K-character slices of Shakespeare with a 512-token BPE (a module fixture
    for training tests: whole files go to validation, so several are needed)."""
    from dsv3.prepare import prepare

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    text = (SHARED_DATA / "corpus" / "shakespeare.txt").read_text(encoding="utf-8")[: n_files * 50_000]
    src = tmp_path_factory.mktemp("corpus")
    for i in range(n_files):
        (src / f"part{i}.txt").write_text(text[i * 50_000:(i + 1) * 50_000], encoding="utf-8")
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare([src], out, vocab_size=512, val_fraction=val_fraction, workers=1)
    return out


@pytest.fixture(scope="session")
def tok_dir() -> Path:
    """The official DeepSeek-V3 tokenizer folder (tokenizer.json + tokenizer_config.json with the chat template)."""
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"DeepSeek-V3 tokenizer not found at {TOKENIZER_DIR}")
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tok(tok_dir):
    from dsv3.tokenizer import Tokenizer

    return Tokenizer.from_path(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    """transformers' tokenizer for the same folder: the peer for chat templates and token ids."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))
