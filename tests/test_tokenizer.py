"""Tests for npllm/tokenizer.py: exact vocab, fixed special ids, byte fallback, determinism, errors, CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from npllm.corpus import default_corpus_text
from npllm.files import atomic_write
from npllm.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(default_corpus_text()[:100_000], encoding="utf-8")  # ~100 KB of English prose and code
    return path


@pytest.fixture(scope="module")
def tok(text_file, tmp_path_factory):
    return train_tokenizer([text_file], VOCAB, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("vocab_size", [400, 777])
def test_vocab_size_is_exact(text_file, tmp_path, vocab_size):
    tok = train_tokenizer([text_file], vocab_size, tmp_path)
    assert tok.vocab_size == vocab_size
    assert json.loads((tmp_path / "tokenizer.json").read_text())["vocab_size"] == vocab_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer.model"]  # no temp files left


def test_special_ids_and_byte_pieces(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    # byte b is id 3 + b: "\x00" is byte 0; "日" (not in an English vocab) is the UTF-8 bytes E6 97 A5
    assert tok.encode("\x00") == [3]
    assert tok.encode("日") == [3 + 0xE6, 3 + 0x97, 3 + 0xA5]
    info = json.loads((tok.model_path.parent / "tokenizer.json").read_text())
    assert (info["unk_id"], info["bos_id"], info["eos_id"], info["pad_id"]) == (0, 1, 2, -1)


@pytest.mark.parametrize("text", ["", "hello world", "  indented\tcode()\n\n    more\r\n",
                                  "héllo wörld → 日本語 🙂", "def f(x):\n    return x ** 2  # comment\n"])
def test_roundtrip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\u2581"), max_size=200))
def test_roundtrip_any_text(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_bos_eos_flags(tok):
    ids = tok.encode("abc")
    assert tok.encode("abc", bos=True) == [1] + ids
    assert tok.encode("abc", eos=True) == ids + [2]
    assert tok.encode("abc", bos=True, eos=True) == [1] + ids + [2]
    assert tok.decode([1] + ids + [2]) == "abc"


def test_learned_pieces_compress_english(tok):
    text = "The assert statement is a convenient way to insert debugging assertions into a program."
    assert len(tok.encode(text)) < 0.6 * len(text.encode())  # one token per byte without merges


def test_decode_rejects_out_of_range_ids(tok):
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, VOCAB])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_training_is_deterministic_and_fingerprint_is_file_hash(text_file, tok, tmp_path):
    again = train_tokenizer([text_file], VOCAB, tmp_path)
    assert again.model_path.read_bytes() == tok.model_path.read_bytes()
    assert again.fingerprint == tok.fingerprint == hashlib.sha256(tok.model_path.read_bytes()).hexdigest()


def test_load(tok):
    loaded = Tokenizer.load(tok.model_path.parent)
    assert loaded.fingerprint == tok.fingerprint and loaded.vocab_size == tok.vocab_size
    assert loaded.encode("some text, ü") == tok.encode("some text, ü")


def test_load_missing_dir_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.load(tmp_path / "nowhere")


def test_load_rejects_mismatched_json(tok, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(tok.model_path.read_bytes())
    (tmp_path / "tokenizer.json").write_text(json.dumps({"fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="do not belong together"):
        Tokenizer.load(tmp_path)


def test_vocab_too_large_for_text(text_file, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=200000 is too large .* <= \d+"):
        train_tokenizer([text_file], 200_000, tmp_path)


@pytest.mark.parametrize("vocab_size", [0, 259, 300.0, True])
def test_vocab_below_minimum(text_file, tmp_path, vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 260"):
        train_tokenizer([text_file], vocab_size, tmp_path)


def test_vocab_too_small_for_characters(text_file, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=265 is too small .* >= \d+"):
        train_tokenizer([text_file], 265, tmp_path)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], VOCAB, tmp_path / "out")
    with pytest.raises(ValueError, match="no input files"):
        train_tokenizer([], VOCAB, tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        train_tokenizer([tmp_path / "latin1.txt"], VOCAB, tmp_path / "out")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([tmp_path / "blank.txt"], VOCAB, tmp_path / "out")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, b"new", "not bytes")  # fails half way through writing
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "npllm.tokenizer", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_train(text_file, tmp_path):
    result = run_cli("train", "--input", text_file, "--vocab_size", 400, "--out", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "vocab_size=400" in result.stdout
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 400


def test_cli_missing_input_is_one_line_error(tmp_path):
    result = run_cli("train", "--input", tmp_path / "missing.txt", "--vocab_size", 400, "--out", tmp_path / "tok")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: input file not found: {tmp_path / 'missing.txt'}"]
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_corrupt_tokenizer_json_is_one_error_naming_the_file(tmp_path, content):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400 + "0123456789 " * 50)
    train_tokenizer([corpus], 300, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json is corrupt"):
        Tokenizer.load(tmp_path / "tok")
