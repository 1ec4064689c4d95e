"""``python -m npllm.generate`` for the checkpoints that are not a decoder alone. npllm/generate.py holds the decoder's
decoding and the command line, which comes here on ``cfg.arch``:

    encoder (BERT)    --fill_mask="The [MASK] sat on the mat." [--top_k=5]
                      the text as one row [CLS] ... [SEP] with every [MASK] as cfg.mask_id (mlm.encode_masked_text),
                      one forward, and at each [MASK] the top_k tokens by probability, softmax over the whole
                      vocabulary (models.bert.fill_mask); "filled" is the text with every [MASK] replaced by its
                      most likely token (each [MASK] guessed on its own, all in the same forward)
    encoder-decoder   --prompt=SOURCE ... (or --prompt_file): each prompt is a source sentence, encoded as
                      pairs.encode_pair encodes a pair's source, encode(source) + [eos]; the decoder starts from
                      pairs.bos_of(tokenizer) and the output ends at eos or after max_new_tokens.
                      greedy (the default)           models.seq2seq.greedy
                      --beams=K [--length_penalty]   models.seq2seq.translate, the best of its K hypotheses
                      --temperature/--top_k/--top_p  ``sample``: greedy's loop with npllm.sampling's rule

Every path runs the encoder once per source and computes each decoder layer's cross-attention keys/values of it
once; the decoder's self-attention keys/values are cached. Sources are decoded SOURCES_PER_CALL at a time, padded
to the longest of them (a padded source position is never attended to, so each source gets the tokens it gets
alone). Decoding chooses among the tokenizer's ids only: a model with more vocabulary rows than its tokenizer has
tokens (a character tokenizer under seq2seq-nano's 2048 rows, say) computes its head for the tokenizer's ids
(``tokenizer_vocabulary``), so it never emits an id the tokenizer cannot write.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .config import GenerateConfig, ModelConfig
from .generate import DEFAULT_MAX_NEW_TOKENS, PromptPrinter, prompt_generators
from .sampling import SamplingConfig, sample_token

DEFAULT_FILL_MASK_TOP_K = 5  # guesses shown per [MASK] when --top_k is not given
SOURCES_PER_CALL = 32  # sources decoded together: one encoder batch, one decoder batch


# ----------------------------------------------------------------------------------------------------------
# encoder-decoder: sources -> outputs


def tokenizer_vocabulary(params: dict, cfg: ModelConfig, n_tokens: int) -> tuple[dict, ModelConfig]:
    """The same encoder-decoder over the ids [0, n_tokens) only: the embedding rows and head columns of the ids
    above are dropped (they are the model's padding rows, which no source holds and decoding must never choose).
    Every other number is unchanged; the logits of the kept ids are the model's own, and the log-softmax of beam
    search and sampling normalises over the kept ids."""
    from .models.seq2seq import embedding_names

    if n_tokens == cfg.vocab_size:
        return params, cfg
    kept = dict(params)  # the same order: param_specs' order
    for name in set(embedding_names(cfg)):
        kept[name] = params[name][:n_tokens]  # (n_tokens, C)
    if "lm_head" in params:
        kept["lm_head"] = params["lm_head"][:, :n_tokens]  # (C, n_tokens)
    return kept, dataclasses.replace(cfg, vocab_size=n_tokens)


def sample(params: dict, cfg: ModelConfig, src_ids, max_new_tokens: int, sampling: SamplingConfig, rngs, *,
           bos_id: int, eos_id: int) -> list:
    """Sampled outputs of every source at once: models.seq2seq.greedy with ``npllm.sampling.sample_token`` in place
    of the argmax, source i drawing from its own generator rngs[i] (so its tokens do not depend on the other
    sources). One token list per source, ending with eos_id when it was drawn within max_new_tokens."""
    from .models.seq2seq import greedy

    def draw(z, live):  # z (n_live, V) float64 logits of the live sources
        return np.array([sample_token(z[row], rngs[i], sampling) for row, i in enumerate(live)])  # (n_live,)

    return greedy(params, cfg, src_ids, max_new_tokens, bos_id=bos_id, eos_id=eos_id, choose=draw)


def source_ids(tokenizer, text: str) -> list[int]:
    """A source sentence's ids as training saw them (npllm.pairs.encode_pair): encode(text) + [eos]."""
    from .pairs import encode_pair

    return encode_pair(tokenizer, text, "")[0]


def run_translation(gc: GenerateConfig, params: dict, cfg: ModelConfig, tokenizer, texts: list[str],
                    out) -> PromptPrinter:
    """Decode every prompt of ``texts`` as a source and print its output (text, or one JSON object per source:
    prompt = the source, completion = the output), in prompt order. Returns the printer (its token counts)."""
    from .models.seq2seq import greedy, translate
    from .pairs import bos_of

    if gc.no_kv_cache:
        raise ValueError("--no_kv_cache is for decoder checkpoints; an encoder-decoder always decodes with its "
                         "caches (the memory's cross-attention keys/values and the self-attention keys/values)")
    max_new = min(DEFAULT_MAX_NEW_TOKENS, cfg.max_seq_len) if gc.max_new_tokens is None else gc.max_new_tokens
    if max_new > cfg.max_seq_len:
        raise ValueError(f"--max_new_tokens={max_new} is not allowed; the model's decoder reads at most "
                         f"max_seq_len={cfg.max_seq_len} positions")
    sources = [source_ids(tokenizer, text) for text in texts]
    for i, ids in enumerate(sources):
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"source number {i + 1} ({texts[i][:40]!r}) is {len(ids)} tokens with its eos; the "
                             f"encoder reads at most max_seq_len={cfg.max_seq_len}: shorten it")
    params, cfg = tokenizer_vocabulary(params, cfg, tokenizer.vocab_size)
    bos, eos = bos_of(tokenizer), tokenizer.eos_id
    rngs = prompt_generators(gc.seed, len(sources))  # source i's own stream, whatever the chunking
    printer = PromptPrinter(tokenizer, [[] for _ in texts], texts, gc.stop, gc.json, out)
    for first in range(0, len(sources), SOURCES_PER_CALL):
        chunk = sources[first:first + SOURCES_PER_CALL]
        if gc.beams > 1:
            best = [hyps[0] for hyps in translate(params, cfg, chunk, max_new, gc.beams, gc.length_penalty,
                                                  bos_id=bos, eos_id=eos)]
            outputs = [(h.tokens, h.finished) for h in best]
        else:
            if gc.samples:
                lists = sample(params, cfg, chunk, max_new, gc.sampling, rngs[first:first + len(chunk)],
                               bos_id=bos, eos_id=eos)
            else:
                lists = greedy(params, cfg, chunk, max_new, bos_id=bos, eos_id=eos)
            outputs = [(t, bool(t) and t[-1] == eos) for t in lists]
        for i, (generated, finished) in enumerate(outputs, start=first):
            stopped = any(printer.stopped(i, t) for t in generated)  # feeds the tokens up to a stop string
            printer.finish(i, eos=finished and not stopped)
    return printer


# ----------------------------------------------------------------------------------------------------------
# encoder: fill in [MASK]s


def token_text(tokenizer, ids) -> str:
    """The text of ``ids``; an id beyond the tokenizer's vocabulary (a model row it has no token for, such as a
    [MASK] row of its own) is written <id N>."""
    parts, run = [], []
    for i in [int(t) for t in ids]:
        if i < tokenizer.vocab_size:
            run.append(i)
            continue
        parts += [tokenizer.decode(run), f"<id {i}>"]
        run = []
    return "".join(parts + [tokenizer.decode(run)])


def fill_masks(params: dict, cfg: ModelConfig, tokenizer, texts, top_k: int) -> list[dict]:
    """For each text: {"index", "text", "filled", "masks": [{"position", "guesses": [{"token", "id",
    "probability"}]}]}, the guesses by falling probability. Every text is encoded and checked before any forward."""
    from .mlm import encode_masked_text, mlm_spec
    from .models.bert import fill_mask

    spec = mlm_spec(cfg, tokenizer)
    rows = []
    for i, text in enumerate(texts):
        ids = encode_masked_text(tokenizer, text, spec)  # (T,) [CLS] ... [SEP]
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"--fill_mask number {i + 1} ({text[:40]!r}) is {len(ids)} tokens with [CLS] and [SEP]; "
                             f"the encoder reads at most max_seq_len={cfg.max_seq_len}: shorten it")
        rows.append(ids)
    results = []
    for i, (text, ids) in enumerate(zip(texts, rows)):
        masks = fill_mask(params, cfg, ids, top_k=top_k)  # [(position, [(id, probability), ...])]
        filled = ids.copy()  # (T,)
        for position, guesses in masks:
            filled[position] = guesses[0][0]
        results.append(dict(index=i, text=text, filled=token_text(tokenizer, filled[1:-1]), masks=[
            dict(position=int(position), guesses=[dict(token=token_text(tokenizer, [v]), id=v, probability=p)
                                                  for v, p in guesses])
            for position, guesses in masks]))
    return results


def escape_newlines(text: str) -> str:
    """``text`` with each newline written \\n (as --prompt_file writes one), so that a text stays on its line."""
    return text.replace("\n", "\\n")


def run_fill_mask(gc: GenerateConfig, params: dict, cfg: ModelConfig, tokenizer, out) -> list[dict]:
    """Print ``fill_masks`` of the --fill_mask texts: per text its line, one line per [MASK] with the guesses and
    their probabilities, and the filled text; or one JSON object per text."""
    top_k = DEFAULT_FILL_MASK_TOP_K if gc.top_k is None else gc.top_k
    results = fill_masks(params, cfg, tokenizer, gc.fill_mask, top_k)
    for r in results:
        if gc.json:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
            continue
        out.write(("" if len(results) == 1 else f"[{r['index']}] ") + escape_newlines(r["text"]) + "\n")
        for n, mask in enumerate(r["masks"], start=1):
            shown = ", ".join(f"{g['token']!r} {g['probability']:.4f}" for g in mask["guesses"])
            out.write(f"  [MASK] {n} (token {mask['position']}): {shown}\n")
        out.write(f"  filled: {escape_newlines(r['filled'])}\n")
    out.flush()
    return results
