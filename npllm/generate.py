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

The command line reads the checkpoint's cfg.arch: a decoder continues each prompt (here); an encoder-decoder
translates each prompt as a source sentence, and an encoder (BERT) fills in the [MASK]s of each --fill_mask text
(npllm/generate_encoders.py).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .backend import asnumpy, get_array_module
from .checks import check_int, check_number
from .cli import run_command
from .config import GenerateConfig, ModelConfig, options_help, parse_options
from .models.decoder import model_forward
from .run import load_trained
from .sampling import SamplingConfig, log_softmax, sample_token

DEFAULT_LENGTH_PENALTY = 1.0  # beam score = sum of log-probs / (generated length ** alpha)
DEFAULT_MAX_NEW_TOKENS = 100  # --max_new_tokens when not given


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
                 *, seed: int = 0, eos_id: int | None = None, use_kv_cache: bool = True,
                 should_stop: Callable[[int, int], bool] | None = None) -> Iterator[DecodeStep]:
    """Yield every generated token as it is chosen, prompt group by prompt group (equal-length prompts batched).

    prompts: a list of token-id lists. sampling: SamplingConfig (default greedy). Within a group, the tokens of one
    step come in prompt order; a prompt's tokens come in the order generated. should_stop(prompt_index, token) is
    asked for every token: True ends that prompt there, like an EOS (a stop string, say).
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
                                 sampling, eos_id, use_kv_cache, should_stop)


def _decode_group(params, cfg, seqs, rows, rngs, max_new_tokens, sampling, eos_id, use_kv_cache, should_stop):
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
        if should_stop is not None:
            done |= np.array([should_stop(int(r), int(tokens[b])) for b, r in enumerate(rows)], dtype=bool)
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


class PromptPrinter:
    """Prints each prompt's text as its tokens come, in prompt order, though a batch makes them in any order.

    The prompt being printed streams; the others' text is held until their turn. With stop strings, text that could
    still become a stop string is held back, and a prompt's text ends right before the first stop string in it.
    json: instead of text, one JSON object per prompt when it is finished (in prompt order).
    """

    def __init__(self, tokenizer, prompts: list[list[int]], texts: list[str], stop: tuple, json_lines: bool, out):
        self.streams = [TextStream(tokenizer, ids) for ids in prompts]
        self.prompt_texts = [stream.shown for stream in self.streams]  # each prompt as the model reads it
        self.opened = [False] * len(prompts)  # its prompt text printed
        self.texts, self.stop, self.json, self.out = texts, stop, json_lines, out
        self.generated = [""] * len(prompts)  # each prompt's new text so far (stop string cut off)
        self.tokens = [0] * len(prompts)
        self.reason = [None] * len(prompts)  # "eos", "length" or "stop" once finished
        self.shown = [0] * len(prompts)  # characters of generated[i] already printed
        self.current = 0
        self.header = len(prompts) > 1
        self.started = time.perf_counter()
        self.seconds = [0.0] * len(prompts)

    def stopped(self, i: int, token: int) -> bool:
        """Take prompt i's next token; True when its text now holds a stop string."""
        self.tokens[i] += 1
        self.generated[i] += self.streams[i].push(token)
        for stop in self.stop:
            at = self.generated[i].find(stop)
            if at >= 0:
                self.generated[i] = self.generated[i][:at]
                self.reason[i] = "stop"
                return True
        return False

    def finish(self, i: int, eos: bool) -> None:
        if self.reason[i] is None:
            self.generated[i] += self.streams[i].finish()
            self.reason[i] = "eos" if eos else "length"
        self.seconds[i] = time.perf_counter() - self.started
        self.flush()

    def flush(self) -> None:
        """Print what may be printed: the current prompt's safe text, and every finished prompt in turn."""
        while self.current < len(self.texts):
            i = self.current
            if not self.json:
                if not self.opened[i]:
                    self.opened[i] = True
                    self.out.write((f"[{i}] " if self.header else "") + self.prompt_texts[i])
                hold = 0 if self.reason[i] is not None else max((len(s) - 1 for s in self.stop), default=0)
                upto = max(self.shown[i], len(self.generated[i]) - hold)
                self.out.write(self.generated[i][self.shown[i]:upto])
                self.shown[i] = upto
            if self.reason[i] is None:
                break
            if self.json:
                self.out.write(json.dumps(dict(index=i, prompt=self.texts[i], completion=self.generated[i],
                                               new_tokens=self.tokens[i], finish_reason=self.reason[i],
                                               tokens_per_s=round(self.tokens[i] / max(self.seconds[i], 1e-9), 2)),
                                          ensure_ascii=False))
            self.out.write("\n")
            self.current += 1
        self.out.flush()


def read_prompts(gc: GenerateConfig) -> list[str]:
    """--prompt values, then the lines of --prompt_file ("-": standard input); one empty prompt when none."""
    prompts = list(gc.prompt)
    if gc.prompt_file is not None:
        source = sys.stdin if gc.prompt_file == "-" else open(gc.prompt_file, encoding="utf-8")
        try:
            prompts += [line.rstrip("\n").replace("\\n", "\n") for line in source if line.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"--prompt_file={gc.prompt_file} is not UTF-8 text ({err.reason})") from None
        finally:
            if source is not sys.stdin:
                source.close()
    prompts = prompts or [""]
    for i, text in enumerate(prompts):
        try:
            text.encode("utf-8")  # the shell hands undecodable bytes over as lone surrogates
        except UnicodeEncodeError as err:
            raise ValueError(f"--prompt number {i + 1} is not valid UTF-8 (byte {err.object[err.start]!r} at "
                             f"{err.start}); pass UTF-8 text") from None
    return prompts


def check_mode(gc: GenerateConfig, cfg: ModelConfig, where) -> None:
    """ValueError unless the options fit the checkpoint's architecture: --fill_mask for an encoder (BERT) and for
    nothing else, --prompt / --prompt_file for a decoder or an encoder-decoder."""
    if gc.fill_mask and cfg.arch != "encoder":
        raise ValueError(f"--fill_mask is for an encoder (BERT) checkpoint; {where} holds arch={cfg.arch!r}, which "
                         f"generates text: pass --prompt=TEXT instead")
    if cfg.arch == "encoder" and not gc.fill_mask:
        raise ValueError(f"{where} holds an encoder (BERT, arch='encoder'), which guesses masked tokens and does not "
                         f"generate text; pass --fill_mask=\"text with [MASK]\" (--prompt is for arch='decoder' or "
                         f"'encoder-decoder')")


def run(gc: GenerateConfig, out=None, err=None) -> None:
    out, err = sys.stdout if out is None else out, sys.stderr if err is None else err
    texts = None if gc.fill_mask else read_prompts(gc)
    params, cfg, tokenizer, _, ckpt_dir = load_trained(gc.ckpt, gc.device, gc.tokenizer)
    check_mode(gc, cfg, ckpt_dir)
    if cfg.arch == "encoder":
        from .generate_encoders import run_fill_mask

        run_fill_mask(gc, params, cfg, tokenizer, out)
        return
    if cfg.arch == "encoder-decoder":
        from .generate_encoders import run_translation

        printer = run_translation(gc, params, cfg, tokenizer, texts, out)
    else:
        printer = run_decoder(gc, params, cfg, tokenizer, texts, ckpt_dir, out)
    seconds, total = time.perf_counter() - printer.started, sum(printer.tokens)
    if not gc.json:
        print(f"npllm.generate: {total} new tokens in {seconds:.2f} s ({total / max(seconds, 1e-9):,.1f} tok/s)",
              file=err)


def run_decoder(gc: GenerateConfig, params, cfg: ModelConfig, tokenizer, texts: list[str], ckpt_dir,
                out) -> PromptPrinter:
    """Continue every prompt of ``texts`` and print it (streaming) or its JSON object; returns the printer."""
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"the model in {ckpt_dir} has vocab_size={cfg.vocab_size} but its tokenizer "
                         f"{tokenizer.vocab_size} tokens: generation cannot sample a padded vocabulary yet")
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if gc.max_new_tokens is None else gc.max_new_tokens
    prompts = [prompt_ids(tokenizer, text) for text in texts]
    for ids in prompts:
        check_prompt(ids, cfg, max_new_tokens)  # refuse an overlong request before generating anything
    printer = PromptPrinter(tokenizer, prompts, texts, gc.stop, gc.json, out)
    if gc.beams > 1:
        for i, ids in enumerate(prompts):
            best = beam_search(params, cfg, ids, max_new_tokens, gc.beams, eos_id=tokenizer.eos_id,
                               length_penalty=gc.length_penalty, use_kv_cache=gc.kv_cache)[0]
            stopped = any(printer.stopped(i, token) for token in best.tokens)
            printer.finish(i, eos=best.finished and not stopped)
    else:
        for step in decode_steps(params, cfg, prompts, max_new_tokens, gc.sampling, seed=gc.seed,
                                 eos_id=tokenizer.eos_id, use_kv_cache=gc.kv_cache, should_stop=printer.stopped):
            if step.finished:
                printer.finish(step.prompt_index, eos=step.token == tokenizer.eos_id)
            elif step.prompt_index == printer.current:
                printer.flush()
    return printer


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.split("\n\n")[0] + "\n\nOptions:\n" + options_help(GenerateConfig))
        return 0
    return run_command("npllm.generate", lambda a: run(GenerateConfig(**parse_options(a, GenerateConfig)[0])), argv)


if __name__ == "__main__":
    sys.exit(main())
