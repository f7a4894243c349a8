"""dsv3.tokenizer against HF transformers' tokenizer for the real DeepSeek-V3 files, and the streaming decoder's
guarantees: pieces concatenate to `decode`, and no piece ends in half a character."""

import json
import random

import pytest

from dsv3.tokenizer import StreamDecoder, Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def texts(tok_dir):
    corpus = tok_dir.parents[1] / "corpus"
    english = (corpus / "shakespeare.txt").read_text()[200_000:203_000]
    chinese = (corpus / "debian-reference.zh-cn.txt").read_text()[50_000:51_500]
    return [english, chinese, "naïve café — 🎉👩‍👩‍👧 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓", "def f(x):\n\treturn x**2  # ok\n\n\n",
            f"{BOS}<｜User｜>hi<｜Assistant｜>yo{EOS}", "   leading and trailing spaces   ", ""]


def test_folder_matches_hf(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok) == 128815
    assert (tok.bos_token, tok.eos_token) == (hf_tok.bos_token, hf_tok.eos_token)
    assert (tok.bos_id, tok.eos_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1)
    assert tok.chat_template == hf_tok.chat_template
    assert tok.token_id("<｜tool▁calls▁begin｜>") == hf_tok.convert_tokens_to_ids("<｜tool▁calls▁begin｜>") == 128806
    assert tok.special_tokens["<｜User｜>"] == hf_tok.convert_tokens_to_ids("<｜User｜>")
    with pytest.raises(ValueError, match="not a token"):
        tok.token_id("<｜no such token｜>")


def test_encode_decode_match_hf(tok, hf_tok, texts):
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_bos=True) == [hf_tok.bos_token_id, *ids]
        assert tok.decode(ids) == hf_tok.decode(ids) == text
        assert tok.decode(ids, skip_special=True) == hf_tok.decode(ids, skip_special_tokens=True)
    # control tokens written in the text are single ids (as when encoding a rendered chat prompt)
    assert tok.encode(f"{BOS}<｜User｜>") == [0, 128803]


def test_bare_tokenizer_json(tok_dir, tok, texts):
    bare = Tokenizer.from_path(tok_dir / "tokenizer.json")
    assert bare.bos_token is None and bare.chat_template is None
    assert bare.encode(texts[0]) == tok.encode(texts[0])
    with pytest.raises(ValueError, match="no BOS token"):
        bare.encode("x", add_bos=True)
    with pytest.raises(ValueError, match="no EOS token"):
        _ = bare.eos_id


def _folder(tmp_path, tok_dir, config=None, template_file=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer.json").symlink_to(tok_dir / "tokenizer.json")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if template_file is not None:
        (tmp_path / "chat_template.jinja").write_text(template_file)
    return tmp_path


def test_config_token_forms(tmp_path, tok_dir):
    t = Tokenizer.from_path(_folder(tmp_path, tok_dir, {"bos_token": BOS, "eos_token": {"content": EOS}}))
    assert (t.bos_id, t.eos_id) == (0, 1)


def test_chat_template_sources(tmp_path, tok_dir):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert Tokenizer.from_path(_folder(tmp_path / "a", tok_dir, {"chat_template": named})).chat_template == "D"
    folder = _folder(tmp_path / "b", tok_dir, {"chat_template": "config"}, template_file="file")
    assert Tokenizer.from_path(folder).chat_template == "file"


@pytest.mark.parametrize("config, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ({"bos_token": 5}, "bos_token must be a string"),
    ({"eos_token": "<｜nope｜>"}, "eos_token '<｜nope｜>' is not in the tokenizer's vocabulary"),
    ({"chat_template": [{"name": "tool_use", "template": "T"}]}, "with a 'default' one"),
])
def test_bad_config(tmp_path, tok_dir, config, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_path(_folder(tmp_path, tok_dir, config))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_path(tmp_path / "broken.json")


def _stream(tok, ids, skip_special=False):
    decoder = StreamDecoder(tok, skip_special=skip_special)
    return [decoder.feed(i) for i in ids] + [decoder.finish()]


def test_stream_decoder_reassembles_text(tok, texts):
    for text in texts:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)
        assert "".join(_stream(tok, ids, skip_special=True)) == tok.decode(ids, skip_special=True)


def test_stream_decoder_holds_partial_characters(tok):
    ids = tok.encode(" 🎉")  # one emoji, four UTF-8 bytes, spread over three byte-level tokens
    assert len(ids) == 3 and all("\ufffd" in tok.decode([i]) for i in ids)
    assert _stream(tok, ids) == ["", "", " 🎉", ""]
    # plain ASCII is never held back: every token is released as soon as it arrives
    ids = tok.encode("The quick brown fox, 42 times.")
    assert _stream(tok, ids) == [tok.decode([i]) for i in ids] + [""]


def test_stream_decoder_random_ids(tok):
    # arbitrary id sequences: byte fragments that never complete, specials, CJK, in any order
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (False, True):
            pieces = _stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special=skip)
            assert not any(p.endswith("\ufffd") for p in pieces[:-1])
