"""Tests for npllm/tokenizer.py: our bpe (exact vocab, fixed special ids, byte fallback, determinism, errors, CLI),
the char kind, pretrained sentencepiece and Hugging Face (GPT-2) tokenizers, copying, byte counts."""

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from npllm.corpus import default_corpus_text
from npllm.files import atomic_write
from npllm.sources import split_text
from npllm.tokenizer import (CHARS_FILE, Tokenizer, copy_tokenizer, fingerprint_of, load_tokenizer,
                             train_tokenizer)
from tests.helpers import gpt2_style, llama_style_sentencepiece

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
EXOTIC = ["", "\x00", "héllo wörld → 日本語 🙂", "e\u0301 ﬁ Ω \u200b\u2028\r\n\t", "\U0010ffff\ud800\udfff",
          "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ▁ <|endoftext|> </s>"]


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
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*tokenizer.model"):
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
    with pytest.raises(ValueError, match="no inputs given"):
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
    assert len(result.stdout.strip().splitlines()) == 1 and "kind=bpe vocab_size=400" in result.stdout
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 400


def test_cli_missing_input_is_one_line_error(tmp_path):
    result = run_cli("train", "--input", tmp_path / "missing.txt", "--vocab_size", 400, "--out", tmp_path / "tok")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"npllm.tokenizer: error: input not found: "
                                                  f"{tmp_path / 'missing.txt'} (pass text or .jsonl files, folders "
                                                  f"or glob patterns)"]
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_corrupt_tokenizer_json_is_one_error_naming_the_file(tmp_path, content):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400 + "0123456789 " * 50)
    train_tokenizer([corpus], 300, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json is corrupt"):
        Tokenizer.load(tmp_path / "tok")


def test_a_folder_of_jsonl_trains_like_the_same_text_in_a_file(tmp_path):
    lines = default_corpus_text()[:60_000].splitlines(keepends=True)
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w") as f:
        for i in range(0, len(lines), 20):
            f.write(json.dumps({"body": "".join(lines[i:i + 20])}) + "\n")
    (tmp_path / "plain.txt").write_text("".join(lines))
    from_jsonl = train_tokenizer([tmp_path / "in"], 400, tmp_path / "t1", field="body")
    from_text = train_tokenizer([tmp_path / "plain.txt"], 400, tmp_path / "t2")
    assert from_jsonl.fingerprint == from_text.fingerprint  # the same lines, so the same model


# ---- char -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    path = tmp_path_factory.mktemp("text") / "text.txt"  # a checkout without ../shared: the default corpus
    path.write_text(default_corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def char_tok(shakespeare, tmp_path_factory):
    return train_tokenizer([shakespeare], None, tmp_path_factory.mktemp("char"), kind="char")


def test_char_vocab_is_the_texts_characters(char_tok, shakespeare):
    text = shakespeare.read_text(encoding="utf-8")
    chars = sorted(set(text))
    assert char_tok.vocab_size == 2 + len(chars) and (char_tok.eos_id, char_tok.bos_id, char_tok.unk_id) == (0, 0, None)
    assert char_tok.encode("".join(chars)) == list(range(2, 2 + len(chars)))  # ids in code-point order
    info = json.loads((char_tok.directory / "tokenizer.json").read_text())
    assert info["kind"] == "char" and info["files"] == [CHARS_FILE] and info["vocab_size"] == char_tok.vocab_size
    assert char_tok.fingerprint == hashlib.sha256((char_tok.directory / CHARS_FILE).read_bytes()).hexdigest()


def test_char_round_trip_of_the_whole_training_text(char_tok, shakespeare):
    text = shakespeare.read_text(encoding="utf-8")
    ids = char_tok.encode(text)
    assert len(ids) == len(text) and char_tok.decode(ids) == text  # no escapes: every character is in the vocab


@pytest.mark.parametrize("text", EXOTIC)
def test_char_round_trip_of_exotic_unicode(char_tok, text):
    assert char_tok.decode(char_tok.encode(text)) == text


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=60))  # any code point, lone surrogates included
def test_char_round_trip_of_any_text_and_its_byte_count(char_tok, text):
    ids = char_tok.encode(text, eos=True)
    assert all(0 <= i < char_tok.vocab_size for i in ids)
    assert char_tok.decode(ids) == text
    counter = char_tok.byte_counter()
    cut = len(ids) // 3
    counter.add(ids[:cut])  # a chunk may end inside an escape
    counter.add(ids[cut:])
    assert counter.total == len(text.encode("utf-8", "surrogatepass")) + 1  # + 1 for the EOS


def test_char_vocab_65_escapes_the_two_rarest_characters(shakespeare, tmp_path):
    text = shakespeare.read_text(encoding="utf-8")
    n_chars = len(set(text))
    tok = train_tokenizer([shakespeare], n_chars, tmp_path, kind="char")
    assert tok.vocab_size == n_chars  # 65 for tinyshakespeare
    counts = {c: text.count(c) for c in set(text)}
    rarest = sorted(counts, key=lambda c: (counts[c], ord(c)))[:2]
    for c in rarest:
        ids = tok.encode(c)
        assert ids[0] == tok.escape_id and len(ids) == 1 + tok.digits
        assert tok.vocab_size ** (tok.digits - 1) <= 0x10FFFF < tok.vocab_size ** tok.digits
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("vocab_size", [2, 400, 3.0])
def test_char_vocab_size_outside_what_the_text_allows(shakespeare, tmp_path, vocab_size):
    with pytest.raises(ValueError, match=r"vocab_size=.* is not allowed for --kind=char .* from 3 to \d+"):
        train_tokenizer([shakespeare], vocab_size, tmp_path, kind="char")


def test_char_smallest_vocab_escapes_all_but_one(tmp_path):
    (tmp_path / "t.txt").write_text("aaab")
    tok = train_tokenizer([tmp_path / "t.txt"], 3, tmp_path / "tok", kind="char")
    assert tok.encode("a") == [2] and tok.digits == 13  # 3**12 <= 0x10FFFF < 3**13
    assert tok.decode(tok.encode("ab日")) == "ab日"


def test_char_malformed_escapes_decode_to_replacement(char_tok):
    k, V = char_tok.digits, char_tok.vocab_size
    assert char_tok.decode([5, 1] + [0] * (k - 1)) == char_tok.decode([5]) + "\ufffd"  # cut short
    assert char_tok.decode([1] + [V - 1] * k) == "\ufffd"  # V**k - 1 > 0x10FFFF
    assert char_tok.decode([0, 5, 0]) == char_tok.decode([5])  # eos decodes to nothing


def test_char_training_is_deterministic(shakespeare, char_tok, tmp_path):
    again = train_tokenizer([shakespeare], None, tmp_path, kind="char")
    assert again.fingerprint == char_tok.fingerprint


def test_cli_train_char(shakespeare, tmp_path):
    result = run_cli("train", "--kind=char", "--input", shakespeare, "--vocab_size=40", "--out", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert "kind=char vocab_size=40" in result.stdout
    assert load_tokenizer(tmp_path / "tok").kind == "char"
    result = run_cli("train", "--input", shakespeare, "--out", tmp_path / "tok2")
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        "npllm.tokenizer: error: --kind=bpe needs --vocab_size (an integer >= 260)"]


# ---- pretrained: sentencepiece (LLaMA-style) and Hugging Face tokenizers (GPT-2-style) -------------------------------
# (the two builders are in tests/helpers.py: test_convert.py puts them into Hugging Face model directories too)

@pytest.fixture(scope="module")
def pretrained(shakespeare, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    text = shakespeare.read_text(encoding="utf-8")[:20_000]
    (root / "text.txt").write_text(text)
    return {"sentencepiece": llama_style_sentencepiece(root / "text.txt", root / "llama"),
            "tokenizer.json": gpt2_style(text, root / "gpt2_json", "tokenizer.json"),
            "vocab+merges": gpt2_style(text, root / "gpt2_files", "vocab+merges")}


def test_pretrained_sentencepiece_reads_its_own_special_ids(pretrained):
    tok = load_tokenizer(pretrained["sentencepiece"])
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (5, 3, 4)
    assert tok.fingerprint == hashlib.sha256((pretrained["sentencepiece"] / "tokenizer.model").read_bytes()).hexdigest()
    assert tok.encode("hi", bos=True, eos=True)[::len(tok.encode("hi")) + 1] == [3, 4]
    assert tok.next_cut("a\nb\nc", 1) == -1  # its dummy prefix: documents are encoded whole


@pytest.mark.parametrize("text", ["First Citizen:\nBefore we proceed any further, hear me speak.",
                                  "  two leading spaces\tand a tab\n\n", "wörld 日本"])
def test_pretrained_sentencepiece_round_trip(pretrained, text):
    tok = load_tokenizer(pretrained["sentencepiece"])
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab+merges"])
def test_gpt2_style_tokenizer(pretrained, files):
    tok = load_tokenizer(pretrained[files])
    assert tok.kind == "hf" and tok.vocab_size == 501
    assert (tok.eos_id, tok.bos_id, tok.unk_id) == (500, 500, None)  # <|endoftext|>; GPT-2 has no bos or unk
    text = (pretrained[files].parent / "text.txt").read_text()[:300]  # what it was trained on
    ids = tok.encode(text)
    assert len(ids) < 0.6 * len(text) and tok.decode(ids) == text
    assert tok.decode(tok.encode(text, eos=True)) == text  # eos decodes to nothing


@pytest.mark.parametrize("text", EXOTIC[:-2] + ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ▁ <|endoftext|> </s>", "  \n\n\n x"])
def test_gpt2_style_round_trip_is_exact(pretrained, text):
    tok = load_tokenizer(pretrained["tokenizer.json"])
    ids = tok.encode(text)
    assert 500 not in ids  # "<|endoftext|>" written in the text is text, not the eos id
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode())


def test_both_gpt2_layouts_encode_alike(pretrained, shakespeare):
    a, b = load_tokenizer(pretrained["tokenizer.json"]), load_tokenizer(pretrained["vocab+merges"])
    text = shakespeare.read_text(encoding="utf-8")[20_000:30_000]
    assert a.encode(text) == b.encode(text)


def test_gpt2_style_fingerprint_covers_both_files(pretrained, tmp_path):
    d = pretrained["vocab+merges"]
    tok = load_tokenizer(d)
    assert tok.fingerprint == fingerprint_of([(d / "vocab.json").read_bytes(), (d / "merges.txt").read_bytes()])
    for name in ("vocab.json", "merges.txt"):
        changed = tmp_path / name
        changed.mkdir()
        for other in ("vocab.json", "merges.txt"):
            (changed / other).write_bytes((d / other).read_bytes())
        with open(changed / name, "a") as f:
            f.write("\n" if name == "merges.txt" else " ")
        assert load_tokenizer(changed).fingerprint != tok.fingerprint


def test_fingerprint_changes_with_the_file(pretrained, tmp_path):
    for kind in ("sentencepiece", "tokenizer.json"):
        src = pretrained[kind]
        name = "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json"
        copy = tmp_path / kind
        copy.mkdir()
        raw = (src / name).read_bytes()
        (copy / name).write_bytes(raw)
        before = load_tokenizer(copy).fingerprint
        assert before == hashlib.sha256(raw).hexdigest()
        if kind == "sentencepiece":  # another model: trained with one more piece
            spm.SentencePieceTrainer.train(input=str(src.parent / "text.txt"), model_prefix=str(copy / "tokenizer"),
                                           vocab_size=401, model_type="bpe", byte_fallback=True, unk_id=5,
                                           bos_id=3, eos_id=4, pad_id=-1, num_threads=1, minloglevel=2)
        else:
            (copy / name).write_text(json.dumps(json.loads(raw), indent=1))  # the same model, other bytes
        assert load_tokenizer(copy).fingerprint != before


def test_hf_eos_comes_from_tokenizer_config(pretrained, tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((pretrained["tokenizer.json"] / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"},
                                                         "bos_token": "Ġthe"}))
    tok = load_tokenizer(d)
    assert tok.eos_id == 500 and tok.bos_id == tok._tok.token_to_id("Ġthe")


def test_a_pretrained_tokenizer_without_eos_is_refused(pretrained, tmp_path):
    d = tmp_path / "noeos"
    d.mkdir()
    config = json.loads((pretrained["tokenizer.json"] / "tokenizer.json").read_text())
    config["added_tokens"] = []
    config["model"]["vocab"].pop("<|endoftext|>", None)
    (d / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="found no end-of-text token"):
        load_tokenizer(d)


def test_a_corrupt_hf_tokenizer_is_one_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizers model"):
        load_tokenizer(tmp_path)


# ---- what every kind shares: cuts, byte counts, copies, pickles ---------------------------------------------------

@pytest.fixture(scope="module")
def every_kind(tok, char_tok, pretrained):
    return {"bpe": tok, "char": char_tok, "sentencepiece": load_tokenizer(pretrained["sentencepiece"]),
            "hf": load_tokenizer(pretrained["tokenizer.json"])}


@pytest.mark.parametrize("kind", ["bpe", "char", "hf"])
@pytest.mark.parametrize("chunk_chars", [1, 7, 100, 2000])
def test_pieces_cut_at_next_cut_encode_as_the_whole(every_kind, shakespeare, kind, chunk_chars):
    tok = every_kind[kind]
    text = shakespeare.read_text(encoding="utf-8")[:6000] + "\n\n  \nend\n \nx"
    pieces = list(split_text(text, tok.next_cut, chunk_chars))
    assert len(pieces) > 1 and "".join(p for p, _ in pieces) == text
    assert sum((tok.encode(p) for p, _ in pieces), []) == tok.encode(text)


@pytest.mark.parametrize("kind", ["bpe", "char", "sentencepiece", "hf"])
def test_token_bytes_add_up_to_the_texts_bytes(every_kind, shakespeare, kind):
    tok = every_kind[kind]
    text = shakespeare.read_text(encoding="utf-8")[:3000] + " wörld 日本語"
    ids = tok.encode(text, eos=True)
    counter = tok.byte_counter()
    counter.add(np.array(ids[:100]))
    counter.add(np.array(ids[100:]))
    dummy_prefix = kind == "sentencepiece"  # its first piece starts with a "▁" that is not in the text
    assert counter.total == len(text.encode()) + 1 + dummy_prefix


@pytest.mark.parametrize("kind", ["bpe", "char", "sentencepiece", "hf"])
def test_copy_keeps_the_tokenizer(every_kind, tmp_path, kind):
    tok = every_kind[kind]
    dest = copy_tokenizer(tok, tmp_path / "run" / "tokenizer")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer"]  # no temp directory left
    copied = load_tokenizer(dest)
    assert (copied.kind, copied.fingerprint, copied.vocab_size) == (tok.kind, tok.fingerprint, tok.vocab_size)
    assert (copied.eos_id, copied.bos_id, copied.unk_id) == (tok.eos_id, tok.bos_id, tok.unk_id)
    text = "First Citizen:\nSpeak, speak. wörld"
    assert copied.encode(text) == tok.encode(text)
    info = json.loads((dest / "tokenizer.json").read_text())
    assert info["kind"] == kind and info["fingerprint"] == tok.fingerprint
    assert tok.save(dest) == dest  # the same tokenizer again: left as it is
    other = every_kind["char" if kind != "char" else "bpe"]
    with pytest.raises(ValueError, match="already holds something else"):
        copy_tokenizer(other, dest)


def test_copy_into_an_empty_directory(tok, tmp_path):
    (tmp_path / "empty").mkdir()
    assert load_tokenizer(copy_tokenizer(tok, tmp_path / "empty")).fingerprint == tok.fingerprint


@pytest.mark.parametrize("kind", ["bpe", "char", "sentencepiece", "hf"])
def test_a_pickled_tokenizer_is_the_same(every_kind, kind):
    tok = every_kind[kind]
    again = pickle.loads(pickle.dumps(tok))
    assert (again.kind, again.fingerprint, again.eos_id) == (tok.kind, tok.fingerprint, tok.eos_id)
    assert again.encode("Speak, speak. 日") == tok.encode("Speak, speak. 日")


def test_our_json_is_checked_for_every_kind(char_tok, tmp_path):
    dest = copy_tokenizer(char_tok, tmp_path / "c")
    (dest / CHARS_FILE).write_text(json.dumps({"chars": ["a", "b"]}))
    with pytest.raises(ValueError, match="do not belong together"):
        load_tokenizer(dest)
    (dest / CHARS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="chars.json is missing"):
        load_tokenizer(dest)


def test_cli_show_and_copy(pretrained, tmp_path):
    result = run_cli("show", pretrained["vocab+merges"])
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["kind"], info["eos_id"], info["files"]) == ("hf", 500, ["vocab.json", "merges.txt"])
    result = run_cli("copy", pretrained["tokenizer.json"], "--out", tmp_path / "t")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["hf_tokenizer.json", "tokenizer.json"]
    assert load_tokenizer(tmp_path / "t").kind == "hf"
