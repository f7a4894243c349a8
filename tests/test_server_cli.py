"""`dsv3 serve` as a user runs it: a real process on 127.0.0.1 that serves a tiny checkpoint, drains a stream in
flight when it gets SIGTERM, and, without --model, serves the quickstart's checkpoint or says to make one."""

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import dsv3
from dsv3.server import cli
from dsv3.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "deepseek-v3"
REPO = Path(__file__).resolve().parents[1]
SERVE = ("import argparse, sys; from dsv3.server import cli; p = argparse.ArgumentParser(); "
         "cli.register(p.add_subparsers()); a = p.parse_args(); sys.exit(a.func(a))")


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="verb"))
    return parser.parse_args(argv)


def test_without_a_model_it_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _parse(["serve"])
    with pytest.raises(FileNotFoundError, match=r"run `dsv3 quickstart` first"):
        args.func(args)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.resolve_model("no/such/folder")


def test_without_a_model_it_serves_the_quickstart_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "quickstart" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dsv3.ModelConfig.preset("tiny").to_hf()))
    assert cli.resolve_model(None) == Path("runs/quickstart/model")


def _health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_serve_and_drain_on_sigterm(tmp_path):
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"DeepSeek-V3 tokenizer not found at {TOKENIZER_DIR}")
    tok = Tokenizer.from_path(TOKENIZER_DIR)
    cfg = dsv3.ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    dsv3.save_model(dsv3.build_model(cfg, seed=0), tmp_path / "model", tokenizer_dir=TOKENIZER_DIR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--model", str(tmp_path / "model"), "--port", str(port),
         "--api-key", "k1", "--api-key", "k2", "--served-model-name", "tiny", "--device", "cpu",
         "--max-seq-len", "512"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while _health(port) != 200:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        stream = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=100, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connections while it drains
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        rest = list(chunks)
        assert first.choices and rest[-1].usage.completion_tokens == 100  # the stream in flight ran to its end
        assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
        out, _ = proc.communicate(timeout=60)
        # uvicorn re-raises the signal once it has shut down gracefully: the default action ends the process
        assert proc.returncode == -signal.SIGTERM, out
        assert "Waiting for connections to close" in out or "Shutting down" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
