"""`dsv3 generate` and `dsv3 chat` on a tiny checkpoint with a small byte-level BPE tokenizer: the streamed text is
the engine's tokens decoded, and chat renders the template over the conversation."""

import argparse
import io
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import dsv3
from dsv3 import generate
from dsv3.chat_format import render_chat
from dsv3.engine import Engine, SamplingParams
from dsv3.tokenizer import Tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "héllo wörld, hello world"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))
    cfg = dsv3.ModelConfig.preset("tiny", num_hidden_layers=2, vocab_size=tok.get_vocab_size(), eos_token_id=1,
                                  bos_token_id=0)
    model = dsv3.build_model(cfg, seed=0)
    dsv3.save_model(model, folder / "ckpt", tokenizer_dir=folder)
    return folder / "ckpt"


def _run(argv):
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    return args.func(args)


def _reference(folder, prompt_ids, max_tokens):
    model = dsv3.load_model(folder, dtype=torch.float32)
    tok = Tokenizer.from_path(folder)
    engine = Engine(model)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=(tok.eos_id,))
    return tok.decode(engine.generate([prompt_ids], params)[0].token_ids, skip_special=True)


@pytest.mark.parametrize("speculative", [[], ["--speculative", "--speculative-tokens", "2"]])
def test_generate_streams_the_engines_greedy_text(checkpoint, capsys, speculative):
    tok = Tokenizer.from_path(checkpoint)
    prompt = "héllo the quick"
    assert _run(["generate", "--model", str(checkpoint), "--prompt", prompt, "--temperature", "0",
                 "--max-tokens", "12", "--device", "cpu", *speculative]) == 0
    out = capsys.readouterr()
    ids = tok.encode(prompt, add_bos=True)
    assert out.out == prompt + _reference(checkpoint, ids, 12) + "\n"
    assert f"[{len(ids)} prompt + " in out.err  # the statistics go to stderr
    assert ("drafts accepted a step" in out.err) == bool(speculative)


def test_chat_renders_the_template_each_turn(checkpoint, capsys, monkeypatch):
    tok = Tokenizer.from_path(checkpoint)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nthe fox\n"))
    assert _run(["chat", "--model", str(checkpoint), "--temperature", "0", "--max-tokens", "6",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    replies = out.out.replace(">>> ", "").splitlines()
    for text, reply in zip(["hello", "the fox"], replies):  # /reset: the second turn starts a new conversation
        ids = tok.encode(render_chat(TEMPLATE, [{"role": "user", "content": text}], bos_token="<s>"))
        assert reply == _reference(checkpoint, ids, 6)
        assert f"[{len(ids)} prompt + " in out.err


def test_chat_without_a_template_is_refused(checkpoint, tmp_path):
    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    folder = tmp_path / "no-template"
    folder.mkdir()
    for f in checkpoint.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        _run(["chat", "--model", str(folder), "--device", "cpu"])
