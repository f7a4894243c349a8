from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "tokenizers" / "deepseek-v3"


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
