"""Reading the token shards that `dsv3 prepare` writes: a memmapped dataset and a packing loader for pretraining.

Notable features:
- `TokenDataset` maps the shards with np.memmap, so the tokens are never loaded whole; any token range can be read,
  across shard boundaries. It also gives each document's tokens and the split's UTF-8 byte count (bits per byte).
- `PackedLoader` packs documents back to back (each ends with EOS) and cuts windows of `seq_len + 1 + extra` tokens
  that start every `seq_len` tokens: inputs `w[:seq_len]`, targets `w[1:seq_len + 1]`, and `extra` more tokens for
  multi-token prediction. With this stride every token but the first is a main-head target exactly once per epoch.
- Order: each epoch is a permutation of the windows seeded by (seed, epoch). Windows left over after the last full
  global batch sit out that epoch; the next epoch's permutation gives them their chance.
- Exact resume: `state_dict()` holds (epoch, batch index) and the layout it is valid for; a loader restored from it
  yields exactly the batches an uninterrupted one would have, and a mismatched layout is refused.
- Distributed without process groups: `batch_size` is per rank; each step takes `batch_size * world_size` windows
  from the permutation and rank r reads the r-th slice of them, so ranks never share a window.
- `iter_eval_batches`: consecutive windows from the start of the split, in order, for validation.
- Memory: one epoch's order costs 8 bytes per window (an int64 permutation); tokens stay on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .prepare import FORMAT, INDEX


class TokenDataset:
    """One split ("train" or "val") of a dataset folder made by `dsv3 prepare`."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise FileNotFoundError(f"{self.folder} has no {INDEX}; make the dataset with `dsv3 prepare`")
        self.index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{self.folder / INDEX} is format {self.index.get('format')!r}, expected {FORMAT!r}")
        if split not in self.index["splits"]:
            raise ValueError(f"no split {split!r} in {self.folder} (splits: {', '.join(self.index['splits'])})")
        info = self.index["splits"][split]
        if info["tokens"] == 0:
            raise ValueError(f"the {split!r} split of {self.folder} is empty (was it prepared with val_fraction 0?)")
        self.split, self.info = split, info
        self.dtype = np.dtype(self.index["dtype"])
        self.shards = [np.memmap(self.folder / s["file"], dtype=self.dtype, mode="r") for s in info["shards"]]
        for shard, s in zip(self.shards, info["shards"]):
            if len(shard) != s["tokens"]:
                raise ValueError(f"{self.folder / s['file']} holds {len(shard)} tokens, the index says {s['tokens']}")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # shard i holds tokens starts[i]:starts[i+1]
        self.doc_ends = np.memmap(self.folder / info["doc_ends"], dtype=np.uint64, mode="r")

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.index["eos_id"]

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the split's documents: bits per byte = summed loss in bits over all tokens / num_bytes."""
        return self.info["bytes"]

    @property
    def num_documents(self) -> int:
        return len(self.doc_ends)

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.index["tokenizer"]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, copied out of the shards."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) is outside the {len(self)} tokens of {self.split!r}")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            lo, hi = start - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            parts.append(self.shards[i][lo:hi])
            start += hi - lo
            i += 1
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, without its EOS."""
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.tokens(start, int(self.doc_ends[i]) - 1)


def _windows(dataset: TokenDataset, seq_len: int, extra: int) -> int:
    """Number of windows of seq_len + 1 + extra tokens that start every seq_len tokens."""
    if seq_len < 1 or extra < 0:
        raise ValueError(f"seq_len must be positive and extra non-negative, got {seq_len} and {extra}")
    span = seq_len + 1 + extra
    return (len(dataset) - span) // seq_len + 1 if len(dataset) >= span else 0


def _batch(dataset: TokenDataset, windows: np.ndarray, seq_len: int, span: int) -> torch.Tensor:
    rows = [dataset.tokens(int(w) * seq_len, int(w) * seq_len + span) for w in windows]
    return torch.from_numpy(np.stack(rows).astype(np.int64))  # [B, span]


class PackedLoader:
    """An endless iterator of LongTensor batches [batch_size, seq_len + 1 + extra] for one rank."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, extra: int = 0, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.dataset, self.batch_size, self.seq_len, self.extra = dataset, batch_size, seq_len, extra
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.span = seq_len + 1 + extra
        self.num_windows = _windows(dataset, seq_len, extra)
        step = batch_size * world_size
        self.batches_per_epoch = self.num_windows // step
        if self.batches_per_epoch == 0:
            raise ValueError(f"the {dataset.split!r} split has {len(dataset)} tokens: {self.num_windows} windows of "
                             f"{self.span} tokens, fewer than one global batch of {batch_size} x {world_size}")
        self.epoch = self.index = 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
                           if self.shuffle else np.arange(self.num_windows))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> torch.Tensor:
        step = self.batch_size * self.world_size
        first = self.index * step + self.rank * self.batch_size
        batch = _batch(self.dataset, self._epoch_order()[first:first + self.batch_size], self.seq_len, self.span)
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def _layout(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "extra": self.extra, "world_size": self.world_size, "num_windows": self.num_windows}

    def state_dict(self) -> dict:
        """Where the next batch comes from, and the layout that position means something in. Same on every rank."""
        return {"epoch": self.epoch, "index": self.index, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if mismatched:
            raise ValueError("cannot resume: the loader state was saved for a different layout "
                             + ", ".join(f"{k}={saved} (now {now})" for k, (saved, now) in mismatched.items()))
        if not 0 <= state["index"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"cannot resume at epoch {state['epoch']}, batch {state['index']}: an epoch has "
                             f"{self.batches_per_epoch} batches")
        self.epoch, self.index = state["epoch"], state["index"]


def iter_eval_batches(dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int | None = None,
                      extra: int = 0) -> Iterator[torch.Tensor]:
    """Batches [<= batch_size, seq_len + 1 + extra] of consecutive windows from the split's start, in order; the last
    batch may be smaller. Stops after `max_batches` batches (None: all windows)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = _windows(dataset, seq_len, extra)
    if n == 0:
        raise ValueError(f"the {dataset.split!r} split has {len(dataset)} tokens, fewer than one window of "
                         f"{seq_len + 1 + extra}")
    for b, first in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _batch(dataset, np.arange(first, min(first + batch_size, n)), seq_len, seq_len + 1 + extra)
