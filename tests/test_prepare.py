"""dsv3.prepare: corpus discovery, the by-file split, tokenization round trips, determinism and bad inputs."""

import argparse
import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

import dsv3.prepare as prep
from dsv3.loader import TokenDataset
from dsv3.prepare import EOD_TOKEN, prepare, split_by_file, stdlib_sources, summary

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEEPSEEK = DATA / "tokenizers" / "deepseek-v3" / "tokenizer.json"
SPECIALS = f"a document that quotes {EOD_TOKEN} and <｜end▁of▁sentence｜> must keep them as text"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """A folder with text files, a .jsonl and a .parquet, and the documents each file should give."""
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    english = (DATA / "corpus" / "shakespeare.txt").read_text(encoding="utf-8")[:120_000]
    chinese = (DATA / "corpus" / "debian-reference.zh-cn.txt").read_text(encoding="utf-8")[:3000]
    root = tmp_path_factory.mktemp("corpus")
    (root / "nested" / "deeper").mkdir(parents=True)
    docs: dict[str, list[str]] = {}

    def text_file(rel: str, text: str) -> None:
        (root / rel).write_text(text, encoding="utf-8")
        docs[str((root / rel).resolve())] = [text]

    text_file("act1.txt", english[:30_000])
    text_file("act2.md", english[30_000:60_000])
    text_file("nested/act3.rst", english[60_000:90_000])
    text_file("nested/zh.py", chinese)
    text_file("nested/deeper/NOTES", english[90_000:95_000])  # no suffix: taken because it decodes as UTF-8

    records = [{"text": english[95_000 + 500 * i:95_500 + 500 * i]} for i in range(20)]
    records[3:3] = [{"text": ""}, {"text": None}, {"text": SPECIALS}, {"text": "emoji 🙂 and ä", "id": 7}]
    (root / "nested" / "docs.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    docs[str((root / "nested" / "docs.jsonl").resolve())] = [r["text"] for r in records if r["text"]]

    rows = [english[105_000 + 700 * i:105_700 + 700 * i] for i in range(12)] + [None, chinese[:400]]
    pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows}), root / "rows.parquet", row_group_size=5)
    docs[str((root / "rows.parquet").resolve())] = [r for r in rows if r]

    (root / "image.bin").write_bytes(bytes(range(256)) * 4)  # passed over: not text
    (root / "nested" / "__init__.py").write_text("")  # passed over: empty
    (root / ".hidden.txt").write_text("never read")  # hidden: not even counted
    return root, docs


@pytest.fixture(scope="module")
def bpe_dataset(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "ds"
    prepare([corpus[0]], out, vocab_size=512, val_fraction=0.3, workers=2, seed=3)
    return out


def check_dataset(out: Path, docs: dict[str, list[str]], decode) -> dict:
    """Round trip of every document, EOS only at document ends, counts and bytes as in the index."""
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    seen_files = []
    for split, info in index["splits"].items():
        ds = TokenDataset(out, split)
        expected = [d for f in info["files"] for d in docs[f["path"]]]
        seen_files += [f["path"] for f in info["files"]]
        assert ds.num_documents == info["documents"] == len(expected)
        assert [decode(ds.document(i).tolist()) for i in range(ds.num_documents)] == expected
        stream = ds.tokens(0, len(ds))
        assert len(stream) == info["tokens"] == sum(f["tokens"] for f in info["files"])
        assert np.array_equal(np.flatnonzero(stream == index["eos_id"]) + 1, ds.doc_ends)
        assert ds.num_bytes == sum(len(d.encode("utf-8")) for d in expected) == sum(f["bytes"] for f in info["files"])
        assert stream.dtype == np.dtype(index["dtype"]) and stream.max() < index["vocab_size"]
    assert sorted(seen_files) == sorted(docs)  # every file in exactly one split
    return index


def test_round_trip_trained_bpe(corpus, bpe_dataset):
    root, docs = corpus
    tok = Tokenizer.from_file(str(bpe_dataset / "tokenizer.json"))
    index = check_dataset(bpe_dataset, docs, tok.decode)
    assert index["dtype"] == "uint16" and index["vocab_size"] <= 512
    assert (index["eos_token"], index["eos_id"]) == (EOD_TOKEN, 0) and index["passed_over"] == 2
    train, val = ({f["path"] for f in index["splits"][s]["files"]} for s in ("train", "val"))
    assert len(val) == round(0.3 * len(docs)) and not train & val


def test_round_trip_deepseek_matches_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, docs = corpus
    index = prepare([root], tmp_path / "ds", tokenizer=DEEPSEEK, val_fraction=0.2, workers=2)
    hf = transformers.AutoTokenizer.from_pretrained(DEEPSEEK.parent)
    check_dataset(tmp_path / "ds", docs, lambda ids: hf.decode(ids))
    assert (index["dtype"], index["eos_id"], index["eos_token"]) == ("uint32", 1, "<｜end▁of▁sentence｜>")
    assert index["vocab_size"] == len(hf)
    config = "tokenizer_config.json"
    assert (tmp_path / "ds" / config).read_bytes() == (DEEPSEEK.parent / config).read_bytes()
    for split in ("train", "val"):
        ds, files = TokenDataset(tmp_path / "ds", split), index["splits"][split]["files"]
        first = docs[files[0]["path"]][0]
        assert ds.document(0).tolist() == hf.encode(first, add_special_tokens=False)
    # Quoted special tokens stay text: the peer tokenizer, told to split them as text, gives the same ids.
    ds = TokenDataset(tmp_path / "ds", next(s for s, i in index["splits"].items()
                                            if any(f["path"].endswith("docs.jsonl") for f in i["files"])))
    quoted = next(ds.document(i) for i in range(ds.num_documents) if hf.decode(ds.document(i)) == SPECIALS)
    assert 1 not in quoted.tolist()
    assert quoted.tolist() == hf.encode(SPECIALS, add_special_tokens=False, split_special_tokens=True)


def test_output_is_the_same_for_any_workers_units_and_shards(corpus, bpe_dataset, tmp_path, monkeypatch):
    root, _ = corpus
    monkeypatch.setattr(prep, "JSONL_UNIT_BYTES", 777)  # cuts lines of the jsonl file at arbitrary bytes
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare([root], out, tokenizer=bpe_dataset / "tokenizer.json", val_fraction=0.3, workers=workers, seed=3,
                shard_tokens=1000)
        for split in ("train", "val"):
            ref, ds = TokenDataset(bpe_dataset, split), TokenDataset(out, split)
            assert len(ds.shards) == -(-len(ds) // 1000) > 1
            assert np.array_equal(ds.tokens(0, len(ds)), ref.tokens(0, len(ref)))
            assert np.array_equal(ds.doc_ends, ref.doc_ends)


def test_split_by_file_is_seeded_disjoint_and_never_empty():
    files = [Path(f"/corpus/{d}/f{i}.txt") for d in "ab" for i in range(10)]
    train, val = split_by_file(files, 0.1, seed=0)
    assert len(val) == 2 and sorted(train + val) == sorted(files) and not set(train) & set(val)
    assert split_by_file(files, 0.1, seed=0) == (train, val)
    assert len({tuple(split_by_file(files, 0.1, seed=s)[1]) for s in range(6)}) > 1
    moved = [Path("/elsewhere") / p.relative_to("/corpus") for p in files]  # the rank uses paths under the root
    assert [p.name for p in split_by_file(moved, 0.1, seed=0)[1]] == [p.name for p in val]
    assert split_by_file(files, 0.0, seed=0) == (files, [])
    assert len(split_by_file(files[:2], 0.9, seed=0)[1]) == 1  # never all files
    assert len(split_by_file(files, 0.001, seed=0)[1]) == 1  # never none
    with pytest.raises(ValueError, match="single file"):
        split_by_file(files[:1], 0.01, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_file(files, 1.0, seed=0)


def test_undecodable_file_is_skipped_with_a_warning(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"ok{i}.txt").write_text(f"file {i} is fine " * 20)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.txt"):
        index = prepare([tmp_path], tmp_path / "out", vocab_size=300, val_fraction=0.3, workers=1)
    assert [s["path"] for s in index["skipped"]] == [str((tmp_path / "latin1.txt").resolve())]
    assert "not UTF-8" in index["skipped"][0]["reason"]
    assert "latin1.txt" in summary(index, tmp_path / "out")
    assert sum(len(s["files"]) for s in index["splits"].values()) == 3


def test_data_files_without_text_in_a_folder_are_skipped_with_a_warning(tmp_path):
    # A walked folder (site-packages, say) holds data tables: they are passed over, while the same files named as
    # inputs are errors (test_bad_inputs_raise_clear_errors).
    for i in range(3):
        (tmp_path / f"ok{i}.py").write_text(f"x = {i}\n" * 20)
    pq.write_table(pa.table({"price": [1.0, 2.0]}), tmp_path / "table.parquet")
    (tmp_path / "records.jsonl").write_text(json.dumps({"id": 1}) + "\n")
    with pytest.warns(UserWarning, match="skipping"):
        index = prepare([tmp_path], tmp_path / "out", vocab_size=300, val_fraction=0.3, workers=1)
    reasons = {Path(s["path"]).name: s["reason"] for s in index["skipped"]}
    assert reasons.keys() == {"table.parquet", "records.jsonl"}
    assert "no 'text' column" in reasons["table.parquet"] and "no 'text' field" in reasons["records.jsonl"]
    assert sum(len(s["files"]) for s in index["splits"].values()) == 3


def write(path: Path, text: str = "some text\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.filterwarnings("ignore:skipping")
@pytest.mark.parametrize("case, error, message", [
    ("missing", FileNotFoundError, "input not found: .*nope.txt"),
    ("empty file", ValueError, "input file is empty: .*empty.txt"),
    ("empty folder", ValueError, "no text files in folder .*hollow"),
    ("only empty or binary", ValueError, "no text files in folder .*junk"),
    ("all undecodable", ValueError, "empty corpus"),
    ("jsonl without text", ValueError, "bad.jsonl: the line at byte 14 has no 'text' field"),
    ("jsonl not json", ValueError, "bad.jsonl: the line at byte 0 is not valid JSON"),
    ("parquet without text", ValueError, "bad.parquet has no 'text' column"),
    ("one file split", ValueError, "single file"),
    ("both tokenizers", ValueError, "exactly one of"),
    ("tiny vocab", ValueError, "at least 257"),
    ("missing tokenizer", FileNotFoundError, "tokenizer file not found"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, case, error, message):
    good = write(tmp_path / "good.txt")
    kwargs, inputs = {"vocab_size": 300, "workers": 1, "val_fraction": 0.0}, [good]
    if case == "missing":
        inputs = [good, tmp_path / "nope.txt"]
    elif case == "empty file":
        inputs = [good, write(tmp_path / "empty.txt", "")]
    elif case == "empty folder":
        (tmp_path / "hollow" / "inner").mkdir(parents=True)
        inputs = [good, tmp_path / "hollow"]
    elif case == "only empty or binary":
        write(tmp_path / "junk" / "a.txt", "")
        (tmp_path / "junk" / "b.dat").write_bytes(b"\x00\x01\x02")
        inputs = [tmp_path / "junk"]
    elif case == "all undecodable":
        (tmp_path / "x.txt").write_bytes(b"\xff\xfe\xfa")
        inputs = [tmp_path / "x.txt"]
    elif case == "jsonl without text":
        inputs = [write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"body": "b"}\n')]
    elif case == "jsonl not json":
        inputs = [write(tmp_path / "bad.jsonl", "plain words\n")]
    elif case == "parquet without text":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
        inputs = [tmp_path / "bad.parquet"]
    elif case == "one file split":
        kwargs["val_fraction"] = 0.1
    elif case == "both tokenizers":
        kwargs["tokenizer"] = DEEPSEEK
    elif case == "tiny vocab":
        kwargs["vocab_size"] = 100
    elif case == "missing tokenizer":
        kwargs = {"tokenizer": tmp_path / "none.json", "workers": 1, "val_fraction": 0.0}
    with pytest.raises(error, match=message):
        prepare(inputs, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left behind


def test_failed_run_leaves_the_previous_dataset_intact(tmp_path):
    for i in range(2):
        write(tmp_path / "corpus" / f"{i}.txt", f"text number {i} " * 50)
    out = tmp_path / "ds"
    first = prepare([tmp_path / "corpus"], out, vocab_size=300, val_fraction=0.5, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The bad line is only met while tokenizing, in a worker, after the temporary dataset has been started.
    write(tmp_path / "corpus" / "late.jsonl", '{"text": "fine"}\n' * 3 + '{"text": 5}\n')
    with pytest.raises(ValueError, match="late.jsonl: the 'text' field of the line at byte 51 is not a string"):
        prepare([tmp_path / "corpus"], out, vocab_size=300, val_fraction=0.5, workers=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds"]
    assert TokenDataset(out).num_documents == first["splits"]["train"]["documents"]
    # Replacing works, but a folder that is not a dataset is never replaced.
    (tmp_path / "corpus" / "late.jsonl").unlink()
    prepare([tmp_path / "corpus"], out, vocab_size=300, val_fraction=0.5, workers=1, seed=1)
    write(tmp_path / "precious" / "thesis.tex")
    with pytest.raises(ValueError, match="not a dsv3 dataset"):
        prepare([tmp_path / "corpus"], tmp_path / "precious", vocab_size=300, val_fraction=0.5, workers=1)


def test_a_dataset_inside_its_corpus_is_not_read_back(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.txt", f"words of file {i} " * 30)
    first = prepare([tmp_path], tmp_path / "ds", vocab_size=300, val_fraction=0.3, workers=1)
    second = prepare([tmp_path], tmp_path / "ds", vocab_size=300, val_fraction=0.3, workers=1)
    assert second == first and first["passed_over"] == 0


def test_cli_prints_a_summary(tmp_path, capsys):
    for i in range(3):
        write(tmp_path / "corpus" / f"{i}.txt", f"line {i}\n" * 40)
    parser = argparse.ArgumentParser()
    prep.register(parser.add_subparsers())
    args = parser.parse_args(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "ds"),
                              "--vocab-size", "300", "--val-fraction", "0.3", "--workers", "1", "--seed", "2"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    for split in ("train", "val"):
        s = index["splits"][split]
        row = next(r for r in map(str.split, lines) if r and r[0] == split)
        assert row[1:5] == [str(len(s["files"])), str(s["documents"]), str(s["tokens"]), str(s["bytes"])]
        assert float(row[5]) == pytest.approx(s["bytes"] / s["tokens"], abs=1e-3)
    with pytest.raises(SystemExit):  # exactly one tokenizer source
        parser.parse_args(["prepare", "x", "--out", "y"])


def test_stdlib_sources_are_the_standard_library_without_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources()
    names = {p.relative_to(root).as_posix() for p in files}
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= names
    assert all(p.suffix == ".py" and p.stat().st_size > 0 for p in files)
    assert not any({"site-packages", "test", "tests"} & set(n.split("/")) for n in names)
    assert not any(n.endswith("/__pycache__") for n in names)
