"""Hugging Face models through npllm's commands: `convert --from_hf` / `--to_hf`, and a Hugging Face directory given
directly to generate, evaluate and `train --init_from` (npllm.run.load_trained). Tiny random models and tokenizers
are built here with transformers and the tokenizers library; nothing is downloaded.

The weights' exactness (every tensor, every gradient, float64) is tests/test_hf.py's; here the commands are checked
end to end, in float32: npllm reads the Hugging Face directory to transformers' logits (greedy text is compared in
float64 in test_hf.py: in float32 a random model's near-ties make two correct implementations pick different
tokens), the converted run generates exactly what the directory generates, and an exported run loads with
from_pretrained to the same logits.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from npllm.models.decoder import forward  # noqa: E402  (after the skip: these tests need torch)
from npllm.run import load_trained  # noqa: E402
from npllm.tokenizer import load_tokenizer  # noqa: E402
from tests.helpers import REPO, SHAKESPEARE, gpt2_style, llama_style_sentencepiece  # noqa: E402


def run_module(module, *argv):
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("convert") / "text.txt"
    source = SHAKESPEARE.read_text(encoding="utf-8")[:20_000] if SHAKESPEARE.is_file() else None
    if source is None:
        from npllm.corpus import default_corpus_text

        source = default_corpus_text()[:20_000]
    path.write_text(source, encoding="utf-8")
    return path


def hf_dir(kind, text, root):
    """A tiny random GPT2LMHeadModel or LlamaForCausalLM saved with its tokenizer, as a Hugging Face repo holds it."""
    d = root / kind
    torch.manual_seed(0)
    if kind == "llama":
        llama_style_sentencepiece(text, d)
        tok = load_tokenizer(d)
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48, vocab_size=tok.vocab_size,
                                          max_position_embeddings=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        model = transformers.LlamaForCausalLM(config)
    else:
        gpt2_style(text.read_text(encoding="utf-8"), d, "vocab+merges")
        tok = load_tokenizer(d)
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=tok.vocab_size, n_positions=64,
                                         bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # a model with opinions: greedy text that is not one token repeated
    (d / "config.json").unlink(missing_ok=True)
    model.save_pretrained(d)
    return d, model.eval(), tok


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_directory_generates_like_transformers_and_converts_both_ways(kind, text, tmp_path):
    d, model, tok = hf_dir(kind, text, tmp_path)
    prompt = "ROMEO: "
    ids = [tok.eos_id] + tok.encode(prompt)
    tokens = np.array([ids])
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()  # (1, T, V)
    params, cfg, direct_tok = load_trained(d)[:3]
    assert direct_tok.fingerprint == tok.fingerprint
    assert np.abs(forward(params, tokens, cfg) - theirs).max() <= 1e-4 * np.abs(theirs).max()
    direct = run_module("npllm.generate", f"--ckpt={d}", f"--prompt={prompt}", "--max_new_tokens=8",
                        "--temperature=0", "--json")
    assert direct.returncode == 0, direct.stderr
    got = json.loads(direct.stdout)
    assert got["new_tokens"] >= 1

    run = tmp_path / "run"
    converted = run_module("npllm.convert", f"--from_hf={d}", f"--out={run}")
    assert converted.returncode == 0, converted.stderr
    via_run = run_module("npllm.generate", f"--ckpt={run}", f"--prompt={prompt}", "--max_new_tokens=8",
                         "--temperature=0", "--json")
    assert via_run.returncode == 0, via_run.stderr
    same = {k: v for k, v in json.loads(via_run.stdout).items() if k != "tokens_per_s"}
    assert same == {k: v for k, v in got.items() if k != "tokens_per_s"}  # the same text from the converted run
    assert (run / "tokenizer").is_dir() and load_tokenizer(run / "tokenizer").fingerprint == tok.fingerprint

    scored = run_module("npllm.evaluate", f"--ckpt={d}", f"--data={text}", "--max_tokens=200", "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["n_tokens"] == 199 and 0 < result["bpb"] and np.isfinite(result["loss"])

    out = tmp_path / "exported"
    exported = run_module("npllm.convert", f"--ckpt={run}", f"--to_hf={out}")
    assert exported.returncode == 0, exported.stderr
    back = (transformers.LlamaForCausalLM if kind == "llama" else transformers.GPT2LMHeadModel).from_pretrained(out)
    params, cfg, _ = load_trained(run)[:3]
    with torch.no_grad():
        theirs = back.eval()(torch.tensor(tokens)).logits.numpy()
    ours = forward(params, tokens, cfg)
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
    assert load_tokenizer(out).fingerprint == tok.fingerprint  # the tokenizer went out with the model


def test_init_from_a_hugging_face_directory_trains_on_its_tokenizers_data(text, tmp_path):
    d, _, tok = hf_dir("llama", text, tmp_path)
    data = tmp_path / "data"
    prepared = run_module("npllm.data", "prepare", "--input", text, f"--tokenizer={d}", f"--out={data}")
    assert prepared.returncode == 0, prepared.stderr
    run = tmp_path / "run"
    trained = run_module("npllm.train", f"--init_from={d}", f"--data={data}", f"--out_dir={run}", "--steps=2",
                         "--seq_len=32", "--batch_size=2", "--eval_batches=1", "--peak_tflops=1")
    assert trained.returncode == 0, trained.stderr
    assert "initialised from" in trained.stdout and (run / "latest").is_file()
    assert load_trained(run).tokenizer.fingerprint == tok.fingerprint
    wrong = run_module("npllm.convert", f"--from_hf={d}")
    assert wrong.returncode == 2 and "give --from_hf=DIR --out=RUN" in wrong.stderr
