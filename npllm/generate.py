"""Text generation: prefill + KV-cached decoding, sampling, beam search, and ``python -m npllm.generate``.

    prompt ids (T0,) -> model_forward(prompt)            one forward over the whole prompt (prefill)
                     -> last logits row -> next token     npllm.sampling (greedy / temperature / top-k / top-p)
                     -> model_forward(token, past_kv)     one position at a time, reusing every earlier key/value

The KV cache is the list of L pairs (k, v), each (B, NKV, T_past, hs), that ``model_forward`` returns as
``cache["present_kv"]``: keys after RoPE, values, for every position so far. Feeding it back as ``past_kv`` puts the
new tokens at positions T_past, T_past + 1, ... (RoPE angles or pos_emb rows for those positions), so one cached
step computes exactly what the full forward computes for the last position. ``use_kv_cache=False`` runs that full
forward over the whole sequence at every step instead, for comparison.

Choices (docs/generation.md explains them):
  * Prompts of different lengths are grouped by length and each group decodes as one batch. Left-padding would shift
    the positions of learned or rotary embeddings and need an attention mask that model_forward does not have;
    equal-length groups need neither and give each prompt exactly the tokens it would get alone.
  * Prompt i samples with its own generator, ``np.random.default_rng(SeedSequence(seed).spawn(n)[i])``, so its
    tokens do not depend on the other prompts, on the grouping, or on the cache.
  * The context is never slid: prompt + max_new_tokens must fit in cfg.max_seq_len, checked before any work,
    so the cached and uncached paths see the same context and give the same tokens.
  * A sequence stops after emitting eos_id (the EOS is part of its output) or after max_new_tokens.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .backend import asnumpy, get_array_module
from .checks import check_int, check_number
from .cli import run_command
from .config import ModelConfig
from .models.decoder import model_forward
from .run import load_trained
from .sampling import SamplingConfig, log_softmax, sample_token

DEFAULT_LENGTH_PENALTY = 1.0  # beam score = sum of log-probs / (generated length ** alpha)


# ----------------------------------------------------------------------------------------------------------
# input checks


def check_prompt(prompt, cfg: ModelConfig, max_new_tokens: int) -> list[int]:
    """A prompt as a list of ints in [0, V) that leaves room for max_new_tokens in the context; else ValueError."""
    arr = np.asarray(prompt).reshape(-1)  # (T0,)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"prompt must hold integer token ids, got dtype {arr.dtype}")
    ids = [int(t) for t in arr]
    if not ids:
        raise ValueError("a prompt must hold at least one token (the model needs one to predict the next)")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is out of range; ids must be in [0, {cfg.vocab_size})")
    if len(ids) + max_new_tokens > cfg.max_seq_len:
        room = cfg.max_seq_len - len(ids)
        hint = f"lower max_new_tokens to at most {room}" if room > 0 else "shorten the prompt"
        raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"max_seq_len={cfg.max_seq_len}; {hint}")
    return ids


def check_max_new_tokens(max_new_tokens) -> int:
    return check_int("max_new_tokens", max_new_tokens)


# ----------------------------------------------------------------------------------------------------------
# one forward for the next-token logits, cached or not


def last_logits(params, cfg: ModelConfig, tokens: np.ndarray, past_kv=None):
    """Logits of the last position (B, V) as float64 on the host, and the KV cache to pass next.

    tokens (B, T) host ints: the new tokens only when past_kv is given, else the whole sequence.
    """
    xp = get_array_module(params["tok_emb"])
    logits, cache = model_forward(params, xp.asarray(tokens), cfg, past_kv=past_kv)  # (B, T, V)
    return np.asarray(asnumpy(logits[:, -1, :]), dtype=np.float64), cache["present_kv"]  # (B, V)


def select_rows(past_kv, rows: np.ndarray):
    """The KV cache of the batch rows ``rows`` (in that order, repeats allowed): each (k, v) gathered on axis 0."""
    xp = get_array_module(past_kv[0][0])
    index = xp.asarray(rows)
    return [(k[index], v[index]) for k, v in past_kv]  # L x 2 x (len(rows), NKV, T_past, hs)


# ----------------------------------------------------------------------------------------------------------
# sampling decode


class DecodeStep(NamedTuple):
    prompt_index: int  # which prompt (position in the list given to decode_steps)
    token: int  # the token chosen at this step
    logits: np.ndarray  # (V,) float64: the logits it was chosen from
    finished: bool  # True when this is the sequence's last token (EOS, or the max_new_tokens-th)


def prompt_generators(seed: int, n_prompts: int) -> list[np.random.Generator]:
    """One independent generator per prompt, from np.random.SeedSequence(seed)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_prompts)]


def decode_steps(params, cfg: ModelConfig, prompts, max_new_tokens: int, sampling: SamplingConfig | None = None,
                 *, seed: int = 0, eos_id: int | None = None, use_kv_cache: bool = True) -> Iterator[DecodeStep]:
    """Yield every generated token as it is chosen, prompt group by prompt group (equal-length prompts batched).

    prompts: a list of token-id lists. sampling: SamplingConfig (default greedy). Within a group, the tokens of one
    step come in prompt order; a prompt's tokens come in the order generated.
    """
    sampling = SamplingConfig(temperature=0.0) if sampling is None else sampling
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    prompts = [check_prompt(p, cfg, max_new_tokens) for p in prompts]
    rngs = prompt_generators(seed, len(prompts))
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for length in sorted(groups):
        rows = np.array(groups[length])  # (B,) prompt indices of this group
        yield from _decode_group(params, cfg, np.array([prompts[i] for i in rows]), rows, rngs, max_new_tokens,
                                 sampling, eos_id, use_kv_cache)


def _decode_group(params, cfg, seqs, rows, rngs, max_new_tokens, sampling, eos_id, use_kv_cache):
    """Decode a batch of equal-length prompts seqs (B, T0); rows (B,) are their prompt indices."""
    past_kv = None
    step_input = seqs  # (B, T0) the prefill feeds the whole prompt
    for step in range(max_new_tokens):
        if use_kv_cache:
            logits, past_kv = last_logits(params, cfg, step_input, past_kv)  # (B, V); past_kv grows by T_in
        else:
            logits, _ = last_logits(params, cfg, seqs)  # (B, V) full forward over everything so far
        tokens = np.array([sample_token(logits[b], rngs[r], sampling) for b, r in enumerate(rows)])  # (B,)
        last_step = step == max_new_tokens - 1
        done = (tokens == eos_id) if eos_id is not None else np.zeros(len(rows), bool)  # (B,)
        for b, r in enumerate(rows):
            yield DecodeStep(int(r), int(tokens[b]), logits[b], bool(done[b] or last_step))
        if last_step or done.all():
            return
        keep = np.flatnonzero(~done)  # (B',) rows still generating
        seqs = np.concatenate([seqs, tokens[:, None]], axis=1)[keep]  # (B', T+1)
        rows = rows[keep]
        if use_kv_cache:
            step_input = tokens[keep, None]  # (B', 1) only the new token goes in; the rest is in past_kv
            if len(keep) < len(done):
                past_kv = select_rows(past_kv, keep)


def generate(params, cfg: ModelConfig, prompts, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
             seed: int = 0, eos_id: int | None = None, use_kv_cache: bool = True,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """The generated tokens (prompt excluded, EOS included when emitted) for each prompt, in prompt order.

    on_token(prompt_index, token) is called for every token as soon as it is chosen (streaming).
    """
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode_steps(params, cfg, prompts, max_new_tokens, sampling, seed=seed, eos_id=eos_id,
                             use_kv_cache=use_kv_cache):
        out[step.prompt_index].append(step.token)
        if on_token is not None:
            on_token(step.prompt_index, step.token)
    return out


def stream(params, cfg: ModelConfig, prompt, max_new_tokens: int, sampling: SamplingConfig | None = None, *,
           seed: int = 0, eos_id: int | None = None, use_kv_cache: bool = True) -> Iterator[int]:
    """Yield the tokens generated for one prompt, one at a time, as they are produced."""
    for step in decode_steps(params, cfg, [prompt], max_new_tokens, sampling, seed=seed, eos_id=eos_id,
                             use_kv_cache=use_kv_cache):
        yield step.token


# ----------------------------------------------------------------------------------------------------------
# beam search


@dataclass(frozen=True)
class Hypothesis:
    tokens: list  # generated tokens (prompt excluded), EOS last when finished
    logprob: float  # sum of the log-probabilities of the tokens
    score: float  # logprob / len(tokens) ** length_penalty
    finished: bool  # ended with EOS (else it reached max_new_tokens)


def normalized_score(logprob: float, length: int, length_penalty: float) -> float:
    """Length normalisation: sum of log-probs / length ** alpha (alpha = 0: raw sum; 1: mean log-prob)."""
    return logprob / length ** length_penalty


def beam_search(params, cfg: ModelConfig, prompt, max_new_tokens: int, beams: int, *,
                length_penalty: float = DEFAULT_LENGTH_PENALTY, eos_id: int | None = None,
                use_kv_cache: bool = True) -> list[Hypothesis]:
    """Beam search for one prompt; returns ``beams`` hypotheses, best (highest score) first.

    Each step extends every live hypothesis by every token and keeps the (beams - finished) best extensions by total
    log-probability (all have the same length, so this is also the order by normalised score). An extension ending
    in eos_id is finished and leaves the beam, which shrinks by one; search ends when the beam is empty or after
    max_new_tokens. The final ranking, across lengths, is by ``normalized_score``. With beams=1 this is greedy.
    """
    check_int("beams", beams)
    check_number("length_penalty", length_penalty, 0)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    prompt = check_prompt(prompt, cfg, max_new_tokens)
    V = cfg.vocab_size
    seqs = np.array([prompt])  # (n_live, T) prompt + generated, one row per live hypothesis
    live_logprob = np.zeros(1)  # (n_live,)
    finished: list[Hypothesis] = []
    past_kv, step_input = None, seqs
    for step in range(max_new_tokens):
        if use_kv_cache:
            logits, past_kv = last_logits(params, cfg, step_input, past_kv)  # (n_live, V)
        else:
            logits, _ = last_logits(params, cfg, seqs)  # (n_live, V)
        candidates = live_logprob[:, None] + log_softmax(logits)  # (n_live, V) total log-prob of each extension
        width = beams - len(finished)
        best = np.argsort(-candidates.ravel(), kind="stable")[:width]  # (width,) ties: lower beam, then lower id
        parent, token = best // V, best % V  # (width,) each
        is_eos = token == eos_id if eos_id is not None else np.zeros(width, bool)
        new_seqs = np.concatenate([seqs[parent], token[:, None]], axis=1)  # (width, T+1)
        for j in np.flatnonzero(is_eos):
            generated = new_seqs[j, len(prompt):].tolist()
            lp = float(candidates[parent[j], token[j]])
            finished.append(Hypothesis(generated, lp, normalized_score(lp, len(generated), length_penalty), True))
        keep = np.flatnonzero(~is_eos)  # (n_live',)
        seqs, live_logprob = new_seqs[keep], candidates[parent[keep], token[keep]]
        if len(keep) == 0:
            break
        if use_kv_cache:
            past_kv = select_rows(past_kv, parent[keep])  # each survivor continues from its parent's keys/values
            step_input = token[keep, None]  # (n_live', 1)
    unfinished = [Hypothesis(row[len(prompt):].tolist(), float(lp),
                             normalized_score(float(lp), len(row) - len(prompt), length_penalty), False)
                  for row, lp in zip(seqs, live_logprob)]
    return sorted(finished + unfinished, key=lambda h: -h.score)


# ----------------------------------------------------------------------------------------------------------
# text


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A prompt's token ids: eos_id first (the training stream puts EOS before every document but the first, so it
    marks "a document starts here"), then the text's tokens. An empty prompt starts a document from nothing."""
    return [tokenizer.eos_id] + tokenizer.encode(text)


class TextStream:
    """Turns tokens into text increments for printing as they come.

    Sentencepiece joins pieces with context (a leading space, bytes of one UTF-8 character split over several
    byte-fallback tokens), so each step decodes the whole sequence and emits what was added since the last step,
    holding back an incomplete character (shown as U+FFFD) until its last byte arrives.
    """

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer, self.ids = tokenizer, list(prompt)
        self.shown = tokenizer.decode(self.ids)  # the text printed so far

    def push(self, token: int) -> str:
        """The new text that ``token`` completes (maybe empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""  # an unfinished character, or an edit of earlier text: wait for more tokens
        new, self.shown = text[len(self.shown):], text
        return new

    def finish(self) -> str:
        """Whatever was held back, once no token will follow (an unfinished character prints as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return new


# ----------------------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m npllm.generate", description="Generate text from an npllm checkpoint.")
    parser.add_argument("--ckpt", required=True, help="run directory or ckpt_XXXXXXXX directory")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text; repeat for several prompts (default: one empty prompt)")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (default 1.0)")
    parser.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens; 0 = all (default)")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus mass in (0, 1]; 1 = all (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beams", type=int, default=1, help="beam search with this many beams (1: sampling)")
    parser.add_argument("--length_penalty", type=float, default=DEFAULT_LENGTH_PENALTY,
                        help="beam score = sum log-prob / length ** length_penalty")
    parser.add_argument("--no_kv_cache", action="store_true", help="full forward at every step (slow, reference)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    return parser


def parse_args(argv):
    """Parsed, checked options: every bad value becomes one ValueError line."""
    args = build_parser().parse_args(argv)
    sampling_given = [n for n in ("temperature", "top_k", "top_p") if getattr(args, n) is not None]
    args.sampling = SamplingConfig(
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p)
    check_int("--beams", args.beams)  # 1: no beam search
    if args.beams > 1 and sampling_given:
        raise ValueError(f"--{sampling_given[0]} applies to sampling; beam search (--beams={args.beams}) is "
                         f"deterministic and takes no sampling options")
    check_int("--max_new_tokens", args.max_new_tokens)
    check_number("--length_penalty", args.length_penalty, 0)
    check_int("--seed", args.seed, 0)
    args.prompts = args.prompt if args.prompt else [""]
    for i, text in enumerate(args.prompts):
        try:
            text.encode("utf-8")  # the shell hands undecodable bytes over as lone surrogates
        except UnicodeEncodeError as err:
            raise ValueError(f"--prompt number {i + 1} is not valid UTF-8 (byte {err.object[err.start]!r} at "
                             f"{err.start}); pass UTF-8 text") from None
    return args


def run(args, out=None) -> None:
    out = sys.stdout if out is None else out
    params, cfg, tokenizer, _, ckpt_dir = load_trained(args.ckpt, args.device, args.tokenizer)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the model in {ckpt_dir} has vocab_size={cfg.vocab_size} but its tokenizer "
                         f"{tokenizer.vocab_size} tokens: generation cannot sample a padded vocabulary yet")
    prompts = [prompt_ids(tokenizer, text) for text in args.prompts]
    for ids in prompts:
        check_prompt(ids, cfg, args.max_new_tokens)  # refuse an overlong request before generating anything
    use_cache = not args.no_kv_cache

    if args.beams > 1:
        for i, ids in enumerate(prompts):
            best = beam_search(params, cfg, ids, args.max_new_tokens, args.beams, eos_id=tokenizer.eos_id,
                               length_penalty=args.length_penalty, use_kv_cache=use_cache)[0]
            header = f"[{i}] " if len(prompts) > 1 else ""
            out.write(f"{header}{tokenizer.decode(ids + best.tokens)}\n")
            out.flush()
        return

    if len(prompts) == 1:  # one prompt: print the text as it is produced
        text = TextStream(tokenizer, prompts[0])
        out.write(text.shown)
        out.flush()
        for token in stream(params, cfg, prompts[0], args.max_new_tokens, args.sampling, seed=args.seed,
                            eos_id=tokenizer.eos_id, use_kv_cache=use_cache):
            out.write(text.push(token))
            out.flush()
        out.write(text.finish() + "\n")
        return

    generated: list[list[int]] = [[] for _ in prompts]  # several prompts: print each one when it is finished
    for step in decode_steps(params, cfg, prompts, args.max_new_tokens, args.sampling, seed=args.seed,
                             eos_id=tokenizer.eos_id, use_kv_cache=use_cache):
        generated[step.prompt_index].append(step.token)
        if step.finished:
            i = step.prompt_index
            out.write(f"[{i}] {tokenizer.decode(prompts[i] + generated[i])}\n")
            out.flush()


def main(argv=None) -> int:
    return run_command("npllm.generate", lambda a: run(parse_args(a)), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
