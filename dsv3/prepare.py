"""`dsv3 prepare`: a text corpus -> token shards for pretraining (read back by `dsv3.loader`).

Notable features:
- Inputs: text files, folders, `.jsonl` (one document per line, in its `text` field) and `.parquet` (one document per
  row, in its `text` column). A plain text file is one document. Empty or null texts in jsonl/parquet are left out.
- Folder rule: folders are walked recursively, skipping hidden entries (`.git`, `.venv`) and `__pycache__`; files
  ending in .txt .md .py .rst .jsonl .parquet are taken, any other file only when its first 8 KiB hold no NUL byte
  and decode as UTF-8. Empty files inside folders are passed over (an empty `__init__.py` is normal); an empty file
  named as an input is an error. A text file that is not valid UTF-8 is skipped with a warning naming it.
- Tokenizer: a given `tokenizer.json` (copied into the dataset, with its tokenizer_config.json) or a byte-level BPE
  trained on the training files only, with `<|end_of_document|>` as its special token. Special-token strings inside
  documents are encoded as plain text, so no document can forge a separator.
- Separator: the EOS id is appended after every document, and nothing else is added (no BOS). For the DeepSeek-V3
  tokenizer that is `<｜end▁of▁sentence｜>`, id 1.
- Split by whole source files, ranked by a hash of (seed, file path relative to the corpus root), so validation text
  is never seen in training and adding a file does not reshuffle the others.
- Parallel tokenization over bounded work units (a text file, 16 MiB of jsonl lines, a parquet row group); results
  are written in input order, so the dataset is byte-identical for any number of workers.
- Output: flat token shards (uint16 when the vocabulary fits, else uint32) readable by np.memmap, the document end
  offsets of each split, a copy of the tokenizer and `index.json` (counts, UTF-8 bytes per split for bits per byte,
  dtype, vocabulary, EOS, source files per split). Everything is written to a temporary sibling folder that is
  renamed into place, so a crash never leaves a half-written dataset.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

INDEX = "index.json"
FORMAT = "dsv3-tokens-1"
TOKENIZER = "tokenizer.json"
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")  # copied along when beside the tokenizer
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
EOD_TOKEN = "<|end_of_document|>"
# Tried in order when a given tokenizer.json has no tokenizer_config.json beside it that names its EOS.
KNOWN_EOS = ("<｜end▁of▁sentence｜>", EOD_TOKEN, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
SHARD_TOKENS = 2**27  # 256 MiB of uint16, 512 MiB of uint32
JSONL_UNIT_BYTES = 16 * 2**20
SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Unit:
    """One task for a tokenizing worker: a whole text file, bytes [start, stop) of a jsonl file (the lines that
    begin there), or row group `start` of a parquet file. `size` (bytes) drives the progress bar."""
    path: str
    kind: str
    start: int
    stop: int
    size: int


# ---- finding the corpus --------------------------------------------------------------------------------------------
def _kind(path: Path) -> str:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath, name)


def _read_error(path: Path, e: OSError) -> ValueError:
    return ValueError(f"cannot read {path}: {e.strerror or e}")


def _looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise _read_error(path, e) from e
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


def _utf8_problem(path: Path) -> str | None:
    """Why a text file cannot be used, or None. Decodes in 1 MiB pieces so a huge file is never in memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while piece := f.read(2**20):
                try:
                    decoder.decode(piece)
                except UnicodeDecodeError as e:
                    return f"not UTF-8 text ({e.reason} at byte {offset + e.start})"
                offset += len(piece)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at the end of the file)"
    except OSError as e:
        raise _read_error(path, e) from e
    return None


def _check_parquet(path: Path) -> None:
    import pyarrow as pa  # imported here: only parquet inputs need it, and `dsv3 --help` should stay quick
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"cannot read parquet file {path}: {e}") from e
    if "text" not in schema.names:
        raise ValueError(f"parquet file {path} has no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"the 'text' column of parquet file {path} holds {kind}, not strings")


def _check_jsonl(path: Path) -> None:
    """Reads up to the first record with text: a cheap early check (the workers check every line) that lets a folder
    walk pass over jsonl data files of other shapes."""
    next(_jsonl_documents(Unit(str(path), "jsonl", 0, 2**20, 0)), None)


def _check_data_file(path: Path) -> None:
    if _kind(path) == "parquet":
        _check_parquet(path)
    elif _kind(path) == "jsonl":
        _check_jsonl(path)


def discover(inputs: Iterable[str | Path], exclude: Path | None = None) -> tuple[list[Path], list[dict], int]:
    """(files to tokenize, sorted; skipped files as {path, reason}; number of empty or non-text files passed over in
    folders). Folder walks leave out `exclude` (the output dataset, which may sit inside the corpus). Raises for
    missing, unreadable or empty inputs and for folders without any text file. A jsonl or parquet file named as an
    input must hold text; one met in a folder walk that does not (a data table, say) is skipped with a warning."""
    exclude = exclude.resolve() if exclude is not None else None
    found: dict[Path, bool] = {}  # path -> named as an input (not met in a folder walk)
    passed_over = 0
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no inputs given")
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"input not found: {item}")
        if item.is_dir():
            before = len(found)
            for path in _walk(item):
                if exclude is not None and path.resolve().is_relative_to(exclude):
                    continue
                known = path.suffix.lower() in TEXT_SUFFIXES or _kind(path) != "text"
                if path.stat().st_size == 0 or not (known or _looks_like_text(path)):
                    passed_over += 1
                else:
                    found.setdefault(path.resolve(), False)
            if len(found) == before:
                raise ValueError(f"no text files in folder {item}")
        elif item.stat().st_size == 0:
            raise ValueError(f"input file is empty: {item}")
        else:
            found[item.resolve()] = True

    files, skipped = [], []
    for path, named in sorted(found.items()):
        try:
            _check_data_file(path)
        except ValueError as e:
            if named:
                raise
            reason = str(e)
        else:  # an unreadable text file raises here, named or not
            reason = _utf8_problem(path) if _kind(path) == "text" else None
        if reason:
            warnings.warn(f"skipping {path}: {reason}")
            skipped.append({"path": str(path), "reason": reason})
            continue
        files.append(path)
    if not files:
        raise ValueError(f"empty corpus: no usable text in {', '.join(map(str, inputs))}")
    return files, skipped, passed_over


def split_by_file(files: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, val), each in the input order. round(val_fraction * len(files)) files, at least one, go to validation:
    those ranked first by sha256 of the seed and their path relative to the files' common folder."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(files), []
    if len(files) < 2:
        raise ValueError(f"the validation split takes whole files, but the corpus is the single file {files[0]}; "
                         "give more files or val_fraction 0")
    root = os.path.commonpath([str(p.parent) for p in files])

    def rank(path: Path) -> str:
        return hashlib.sha256(f"{seed}:{path.relative_to(root).as_posix()}".encode()).hexdigest()

    n_val = min(max(1, round(val_fraction * len(files))), len(files) - 1)
    val = set(sorted(files, key=rank)[:n_val])
    return [p for p in files if p not in val], [p for p in files if p in val]


def stdlib_sources() -> list[Path]:
    """The .py files of the running Python's standard library, without site-packages, test folders and empty files:
    a corpus that needs no download."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in _walk(root)
            if p.suffix == ".py" and p.stat().st_size > 0 and not skip.intersection(p.relative_to(root).parts)]


# ---- reading documents -----------------------------------------------------------------------------------------------
def _units(path: Path) -> list[Unit]:
    kind, size = _kind(path), path.stat().st_size
    if kind == "jsonl":
        return [Unit(str(path), kind, a, min(a + JSONL_UNIT_BYTES, size), min(JSONL_UNIT_BYTES, size - a))
                for a in range(0, size, JSONL_UNIT_BYTES)]
    if kind == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return [Unit(str(path), kind, i, i + 1, meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
    return [Unit(str(path), kind, 0, size, size)]


def _jsonl_documents(unit: Unit) -> Iterator[str]:
    with open(unit.path, "rb") as f:
        if unit.start:
            # A line belongs to the unit it begins in: finish the line that holds byte start - 1.
            f.seek(unit.start - 1)
            f.readline()
        while (offset := f.tell()) < unit.stop and (line := f.readline()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{unit.path}: the line at byte {offset} is not valid JSON: {e}") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f"{unit.path}: the line at byte {offset} has no 'text' field")
            text = record["text"]
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{unit.path}: the 'text' field of the line at byte {offset} is not a string")
            if text:
                yield text


def _documents(unit: Unit) -> Iterator[str]:
    if unit.kind == "jsonl":
        yield from _jsonl_documents(unit)
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        column = pq.ParquetFile(unit.path).read_row_group(unit.start, columns=["text"]).column("text")
        yield from (text for text in column.to_pylist() if text)
    else:
        yield Path(unit.path).read_bytes().decode("utf-8")


# ---- tokenizing ------------------------------------------------------------------------------------------------------
def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) whose id 0 is `EOD_TOKEN`."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes and {EOD_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return tok


def eos_token(tok: Tokenizer, path: Path) -> str:
    """The end-of-document token of a given tokenizer.json: its tokenizer_config.json's `eos_token`, else the first
    of KNOWN_EOS in its vocabulary."""
    names = list(KNOWN_EOS)
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        try:
            named = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except ValueError as e:
            raise ValueError(f"{config} is not valid JSON: {e}") from None
        named = named.get("content") if isinstance(named, dict) else named
        if isinstance(named, str):
            names.insert(0, named)
    for name in names:
        if tok.token_to_id(name) is not None:
            return name
    raise ValueError(f"{path} has none of the end-of-document tokens {names}")


class _Encoder:
    """Unit -> (tokens with EOS after each document, document lengths in tokens, UTF-8 bytes of the documents)."""

    def __init__(self, tokenizer_file: str, eos_id: int, dtype: str):
        self.tok = Tokenizer.from_file(tokenizer_file)
        self.tok.encode_special_tokens = True  # a document quoting "<｜end▁of▁sentence｜>" must not end early
        self.eos_id, self.dtype = eos_id, np.dtype(dtype)

    def __call__(self, unit: Unit) -> tuple[np.ndarray, np.ndarray, int]:
        docs = list(_documents(unit))
        encodings = self.tok.encode_batch_fast(docs, add_special_tokens=False)
        lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int64)
        ends = np.cumsum(lengths)
        tokens = np.empty(int(ends[-1]) if len(ends) else 0, self.dtype)
        for e, end in zip(encodings, ends):
            tokens[end - len(e.ids) - 1:end - 1] = e.ids
        tokens[ends - 1] = self.eos_id
        return tokens, lengths, sum(len(d.encode("utf-8")) for d in docs)


_worker_encoder: _Encoder | None = None  # one per pool process, so the tokenizer is loaded once, not per task


def _start_worker(*args) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(*args)


def _encode_in_worker(unit: Unit):
    return _worker_encoder(unit)


@contextlib.contextmanager
def _encoded(units: list[Unit], encoder_args: tuple, workers: int) -> Iterator[Iterator]:
    """Results of the units, in order."""
    if workers == 1:
        yield map(_Encoder(*encoder_args), units)
        return
    # fork starts workers at once without re-importing dsv3 (and torch); elsewhere fork is unsafe, so spawn.
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    # Each worker is one process, so the tokenizer's own threads would only compete; setting this before the fork
    # also stops tokenizers from warning that parallelism was used in the parent (by BPE training).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, initializer=_start_worker, initargs=encoder_args)
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield pool.imap(_encode_in_worker, units)


# ---- writing ---------------------------------------------------------------------------------------------------------
class _SplitWriter:
    """Appends a split's tokens to `{split}-NNNNN.bin` shards of at most `shard_tokens` tokens (documents may cross
    shards) and the end offset of every document, counted from the split's first token, to `{split}.docs.bin`
    (uint64)."""

    def __init__(self, folder: Path, split: str, files: list[Path], shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.files = {str(p): {"path": str(p), "documents": 0, "tokens": 0, "bytes": 0} for p in files}
        self.shards: list[dict] = []
        self.shard = None
        self.doc_ends_file = f"{split}.docs.bin"
        self.doc_ends = open(folder / self.doc_ends_file, "wb")
        self.tokens = self.documents = self.bytes = 0

    def add(self, path: str, tokens: np.ndarray, lengths: np.ndarray, nbytes: int) -> None:
        self.doc_ends.write((self.tokens + np.cumsum(lengths)).astype(np.uint64).tobytes())
        stats = self.files[path]
        stats["documents"] += len(lengths)
        stats["tokens"] += len(tokens)
        stats["bytes"] += nbytes
        self.documents += len(lengths)
        self.tokens += len(tokens)
        self.bytes += nbytes
        while len(tokens):
            if self.shard is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self.shard.write(tokens[:room].tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        if self.shard is not None:
            self.shard.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shard = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        self.doc_ends.close()
        if self.shard is not None:
            self.shard.close()
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards,
                "doc_ends": self.doc_ends_file, "files": list(self.files.values())}


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "dataset")
    os.replace(tmp, out)
    shutil.rmtree(old)


def prepare(inputs: list[str | Path], out: Path, tokenizer: Path | None = None, vocab_size: int | None = None,
            val_fraction: float = 0.01, workers: int | None = None, seed: int = 0,
            shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenize `inputs` into the dataset folder `out` (replacing a dataset there) and return its index."""
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give exactly one of tokenizer (a tokenizer.json) or vocab_size (to train a byte-level BPE)")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1 or shard_tokens < 1:
        raise ValueError(f"workers and shard_tokens must be positive, got {workers} and {shard_tokens}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and ((out / INDEX).is_file() or not any(out.iterdir()))):
        raise ValueError(f"{out} exists and is not a dsv3 dataset; refusing to replace it")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    files, skipped, passed_over = discover(inputs, exclude=out)
    splits = dict(zip(("train", "val"), split_by_file(files, val_fraction, seed)))
    units = {path: _units(path) for path in files}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is meant to be shared like any output folder
    try:
        if tokenizer is not None:
            try:
                tok = Tokenizer.from_file(str(tokenizer))
            except Exception as e:  # tokenizers raises a bare Exception for unparsable files
                raise ValueError(f"{tokenizer} is not a tokenizers tokenizer.json: {e}") from e
            eos = eos_token(tok, Path(tokenizer))
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
            for name in TOKENIZER_EXTRAS:  # chat template, BOS/EOS names: checkpoints copy them from the dataset
                if Path(tokenizer).with_name(name).is_file():
                    shutil.copyfile(Path(tokenizer).with_name(name), tmp / name)
        else:
            print(f"training a byte-level BPE of {vocab_size} tokens on {len(splits['train'])} training files")
            tok = train_bpe((d for p in splits["train"] for u in units[p] for d in _documents(u)), vocab_size)
            tok.save(str(tmp / TOKENIZER))
            eos = EOD_TOKEN
        vocab, eos_id = tok.get_vocab_size(with_added_tokens=True), tok.token_to_id(eos)
        dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)

        writers = {s: _SplitWriter(tmp, s, fs, shard_tokens) for s, fs in splits.items()}
        jobs = [(s, u) for s, fs in splits.items() for p in fs for u in units[p]]
        bar = tqdm(total=sum(u.size for _, u in jobs), unit="B", unit_scale=True, desc="tokenizing")
        with bar, _encoded([u for _, u in jobs], (str(tmp / TOKENIZER), eos_id, dtype.str),
                           max(1, min(workers, len(jobs)))) as results:
            for (split, unit), result in zip(jobs, results):
                writers[split].add(unit.path, *result)
                bar.update(unit.size)
        index = {"format": FORMAT, "tokenizer": TOKENIZER,
                 "tokenizer_source": str(Path(tokenizer).resolve()) if tokenizer is not None else None,
                 "vocab_size": vocab, "dtype": dtype.name, "eos_token": eos, "eos_id": eos_id,
                 "seed": seed, "val_fraction": val_fraction,
                 "splits": {s: w.close() for s, w in writers.items()}, "skipped": skipped, "passed_over": passed_over}
        for split, info in index["splits"].items():
            if splits[split] and info["documents"] == 0:
                raise ValueError(f"the {split} split has no documents: its files hold only empty texts")
        (tmp / INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def summary(index: dict, out: Path | str) -> str:
    lines = [f"wrote {out}: vocab {index['vocab_size']}, {index['dtype']}, "
             f"documents end with {index['eos_token']!r} (id {index['eos_id']})",
             f"{'split':<6}{'files':>8}{'documents':>12}{'tokens':>14}{'bytes':>14}{'bytes/token':>13}"]
    for name, s in index["splits"].items():
        ratio = f"{s['bytes'] / s['tokens']:.3f}" if s["tokens"] else "-"
        lines.append(f"{name:<6}{len(s['files']):>8}{s['documents']:>12}{s['tokens']:>14}{s['bytes']:>14}{ratio:>13}")
    if index["skipped"]:
        lines.append(f"skipped {len(index['skipped'])} file(s):")
        lines += [f"  {s['path']}: {s['reason']}" for s in index["skipped"]]
    if index["passed_over"]:
        lines.append(f"passed over {index['passed_over']} empty or non-text file(s) in folders")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a text corpus into token shards for pretraining")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files, folders (walked recursively), .jsonl (a 'text' field per line), "
                        ".parquet (a 'text' column)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (replaced atomically)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", type=Path, help="a tokenizers tokenizer.json to use (copied into OUT)")
    which.add_argument("--vocab-size", type=int, metavar="N",
                       help="train a byte-level BPE of N tokens on the training files")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of the input files held out, whole, for validation (default 0.01, at least one)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per CPU core)")
    p.add_argument("--seed", type=int, default=0, help="chooses the validation files (default 0)")

    def run(args) -> int:
        index = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        val_fraction=args.val_fraction, workers=args.workers, seed=args.seed)
        print(summary(index, args.out))
        return 0

    p.set_defaults(func=run)
