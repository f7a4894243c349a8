"""dsv3.loader: memmapped reads across shards, packing, seeded order, exact resume, rank sharding, eval batches."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from dsv3.loader import PackedLoader, TokenDataset, iter_eval_batches
from dsv3.prepare import FORMAT, prepare

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def counting_dataset(folder: Path, n: int, shard_sizes: list[int], doc_ends: list[int]) -> Path:
    """A dataset in the `dsv3 prepare` layout whose train tokens are 0, 1, ..., n-1, so every token tells its
    position, and whose val split is empty."""
    assert sum(shard_sizes) == n and doc_ends[-1] == n
    folder.mkdir(parents=True)
    shards, start = [], 0
    for i, size in enumerate(shard_sizes):
        np.arange(start, start + size, dtype=np.uint32).tofile(folder / f"train-{i:05d}.bin")
        shards.append({"file": f"train-{i:05d}.bin", "tokens": size})
        start += size
    np.array(doc_ends, dtype=np.uint64).tofile(folder / "train.docs.bin")
    (folder / "val.docs.bin").write_bytes(b"")
    empty = {"tokens": 0, "documents": 0, "bytes": 0, "shards": [], "doc_ends": "val.docs.bin", "files": []}
    index = {"format": FORMAT, "tokenizer": "tokenizer.json", "vocab_size": n, "dtype": "uint32", "eos_id": 0,
             "splits": {"train": {"tokens": n, "documents": len(doc_ends), "bytes": 3 * n, "shards": shards,
                                  "doc_ends": "train.docs.bin", "files": []}, "val": empty}}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def counting(tmp_path) -> TokenDataset:
    # 1000 tokens in shards of awkward sizes, so windows cross shard boundaries.
    return TokenDataset(counting_dataset(tmp_path / "ds", 1000, [37, 400, 1, 562], [10, 500, 1000]))


def starts(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def test_dataset_reads_any_range_across_shards(counting, tmp_path):
    assert len(counting) == 1000 and counting.num_documents == 3 and counting.num_bytes == 3000
    for a, b in [(0, 1000), (30, 40), (36, 38), (437, 438), (436, 439), (999, 1000), (5, 5)]:
        assert counting.tokens(a, b).tolist() == list(range(a, b))
    assert counting.document(0).tolist() == list(range(9))  # the last token of a document is its EOS
    assert counting.document(2).tolist() == list(range(500, 999))
    with pytest.raises(IndexError, match="outside the 1000 tokens"):
        counting.tokens(990, 1001)
    with pytest.raises(ValueError, match="'val' split .* is empty"):
        TokenDataset(counting.folder, "val")
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenDataset(counting.folder, "test")
    with pytest.raises(FileNotFoundError, match="no index.json"):
        TokenDataset(tmp_path)
    (counting.folder / "train-00003.bin").write_bytes(b"\0" * 8)  # a truncated shard
    with pytest.raises(ValueError, match="train-00003.bin holds 2 tokens, the index says 562"):
        TokenDataset(counting.folder)


def test_an_epoch_is_a_permutation_of_windows(counting):
    loader = PackedLoader(counting, batch_size=4, seq_len=16, extra=2, seed=5)
    # Windows start every 16 tokens and need 16 + 1 + 2 tokens: starts 0, 16, ..., 976 (976 + 19 <= 1000).
    assert loader.num_windows == len(range(0, 1000 - 19 + 1, 16)) == 62 and loader.batches_per_epoch == 15
    seen = []
    for _ in range(loader.batches_per_epoch):
        batch = next(loader)
        assert batch.dtype == torch.int64 and batch.shape == (4, 19)
        assert torch.equal(batch, batch[:, :1] + torch.arange(19))  # contiguous tokens of the stream
        seen += starts(batch)
    assert len(set(seen)) == 60 and all(s % 16 == 0 and s + 19 <= 1000 for s in seen)
    assert seen != sorted(seen)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["index"] == 0


def test_order_is_fixed_by_the_seed_and_reshuffled_each_epoch(counting):
    def epochs(seed: int, shuffle: bool = True) -> list[list[int]]:
        loader = PackedLoader(counting, batch_size=5, seq_len=10, seed=seed, shuffle=shuffle)
        return [sum((starts(next(loader)) for _ in range(loader.batches_per_epoch)), []) for _ in range(2)]

    first = epochs(0)
    assert epochs(0) == first
    assert epochs(1) != first
    assert first[0] != first[1] and sorted(first[0]) != sorted(first[1])  # other windows sit out epoch 1
    assert epochs(0, shuffle=False) == [list(range(0, 950, 10))] * 2


@pytest.mark.parametrize("k", [0, 1, 7, 8, 9, 20])
def test_resume_continues_exactly(counting, k):
    # 8 batches per epoch; k covers the first batch, an epoch's last batch, the next epoch's first, and epoch 2.
    loader = PackedLoader(counting, batch_size=3, seq_len=40, extra=1, seed=11)
    # Windows of 42 tokens every 40: starts 0..920, 24 windows, 8 batches of 3.
    assert loader.num_windows == 24 and loader.batches_per_epoch == 8
    uninterrupted = [next(loader) for _ in range(30)]
    first = PackedLoader(counting, batch_size=3, seq_len=40, extra=1, seed=11)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it survives a checkpoint's JSON round trip
    resumed = PackedLoader(counting, batch_size=3, seq_len=40, extra=1, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[k:], (next(resumed) for _ in range(30 - k))))
    for epoch in range(3):  # every epoch uses every window once
        windows = sum((starts(b) for b in uninterrupted[8 * epoch:8 * epoch + 8]), [])
        assert sorted(windows) == list(range(0, 921, 40))


def test_resume_refuses_another_layout(counting):
    state = PackedLoader(counting, batch_size=3, seq_len=40, seed=11).state_dict()
    with pytest.raises(ValueError, match="batch_size=3 \\(now 4\\)"):
        PackedLoader(counting, batch_size=4, seq_len=40, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=11 \\(now 12\\)"):
        PackedLoader(counting, batch_size=3, seq_len=40, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="an epoch has 8 batches"):
        PackedLoader(counting, batch_size=3, seq_len=40, seed=11).load_state_dict({**state, "index": 8})


def test_ranks_take_disjoint_slices_of_the_global_batch(counting):
    world = 3
    ranks = [PackedLoader(counting, batch_size=2, seq_len=20, seed=4, rank=r, world_size=world) for r in range(world)]
    single = PackedLoader(counting, batch_size=2 * world, seq_len=20, seed=4)
    assert ranks[0].batches_per_epoch == single.batches_per_epoch == 49 // 6
    per_rank = [[] for _ in range(world)]
    for _ in range(2 * single.batches_per_epoch):  # two epochs
        batches = [next(loader) for loader in ranks]
        assert torch.equal(torch.cat(batches), next(single))
        for r, b in enumerate(batches):
            per_rank[r] += starts(b)
    epoch0 = [set(w[:2 * single.batches_per_epoch]) for w in per_rank]
    assert all(not epoch0[a] & epoch0[b] for a in range(world) for b in range(a + 1, world))
    with pytest.raises(ValueError, match="rank < world_size"):
        PackedLoader(counting, batch_size=2, seq_len=20, rank=3, world_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(counting, batch_size=20, seq_len=20, world_size=3)


def test_eval_batches_are_consecutive_windows(counting):
    batches = list(iter_eval_batches(counting, batch_size=4, seq_len=100))
    # Windows of 101 tokens every 100: starts 0..800 (900 + 101 > 1000), so batches of 4, 4 and 1.
    assert [b.shape[0] for b in batches] == [4, 4, 1]
    assert torch.equal(torch.cat(batches), torch.arange(0, 900, 100)[:, None] + torch.arange(101))
    assert [starts(b) for b in iter_eval_batches(counting, 4, 100, max_batches=2)] == [[0, 100, 200, 300],
                                                                                      [400, 500, 600, 700]]
    assert torch.equal(next(iter_eval_batches(counting, 2, 100, extra=3)), torch.tensor([0, 100])[:, None]
                       + torch.arange(104))
    with pytest.raises(ValueError, match="fewer than one window"):
        next(iter_eval_batches(counting, 2, 1000))


def test_loader_over_a_prepared_corpus_yields_corpus_text(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    text = (DATA / "corpus" / "shakespeare.txt").read_text(encoding="utf-8")[:20_000]
    (tmp_path / "play.txt").write_text(text)
    prepare([tmp_path / "play.txt"], tmp_path / "ds", vocab_size=400, val_fraction=0.0, workers=1)
    ds = TokenDataset(tmp_path / "ds")
    tok = Tokenizer.from_file(str(ds.tokenizer_path))
    loader = PackedLoader(ds, batch_size=4, seq_len=64, seed=0)
    for _ in range(3):
        batch = next(loader)
        assert batch.shape == (4, 65) and 0 <= batch.min() and batch.max() < ds.vocab_size
        for row in batch.tolist():
            if ds.eos_id not in row:  # only the window holding the document's end has its EOS
                assert tok.decode(row) in text
