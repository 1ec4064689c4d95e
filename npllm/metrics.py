"""What a training run measures and writes beside its checkpoints: metrics.jsonl, the loss plot, the log line.

    RUN/metrics.jsonl   one JSON object per optimizer step: step, loss, lr, grad_norm, tokens_per_s, mfu, and
                        val_loss / val_ppl / val_bpb (bits per byte) at evaluation steps (step 0 holds the untrained
                        model's)
    RUN/loss.png        train and validation loss against step (when matplotlib is installed)

MFU (model FLOPs utilisation) divides the FLOPs a step needs (``npllm.models.decoder.flops_per_token``) by the time
it took and by the peak rate of this machine's own matmul, measured in the same process (``measure_peak_flops``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .config import ModelConfig, TrainConfig
from .files import atomic_write
from .layers.loss import IGNORE_INDEX
from .models import batch_loss, num_params
from .parallel.comm import LocalComm
from .parallel.cores import side_by_side

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(out_dir) -> list[dict]:
    """Every row of RUN/metrics.jsonl (an empty list when there is none)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):  # a run killed while writing its last line: that step did not finish
                break
            raise ValueError(f"{path}:{number}: damaged metrics line, not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: damaged metrics line, expected an object with an integer step")
        rows.append(row)
    return rows


def write_metrics(out_dir, rows: list[dict]) -> None:
    """Replace RUN/metrics.jsonl with ``rows``, atomically (a fresh run starts it empty; a resume drops the rows
    after its checkpoint, which belong to a run that did not survive)."""
    atomic_write(Path(out_dir) / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in rows))


class MetricsLog:
    """Appends one row per step to RUN/metrics.jsonl, flushed as it goes. ``enabled=False`` (every rank but world
    rank 0 under mpirun) writes nothing."""

    def __init__(self, out_dir, enabled: bool = True):
        self.file = open(Path(out_dir) / METRICS_FILE, "a") if enabled else None

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def plot_losses(out_dir) -> Path | None:
    """RUN/loss.png from metrics.jsonl when matplotlib is installed (it is optional: `pip install -e '.[plot]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(out_dir)
    train_rows = [r for r in rows if "loss" in r]  # the step-0 record holds only the untrained val loss
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", linewidth=1)
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = atomic_write(Path(out_dir) / PLOT_FILE, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def validation_loss(params: dict, cfg: ModelConfig, batches: list[dict], tc: TrainConfig, xp, comm=None,
                    token_bytes=None, row_groups: int = 1):
    """Mean loss over the counted targets of ``batches`` (``npllm.batches.validation_batches``), forward only; with
    the tokenizer's ``token_bytes`` table, (loss, bits per byte) instead: the summed -log2 p over the bytes the
    targets stand for.

    comm: a parallel run's ParallelComm; each batch is then a global batch of dp * batch_size rows, each dp rank
    scores its rows, and each batch's sum of losses is all-reduced over dp before the batches are added in order:
    one process's number (to rounding). row_groups: a batch's rows in this many groups whose forward passes run side
    by side, one per core (the trainer's --row_groups, as its training steps; npllm.parallel.cores.side_by_side).
    """
    tp, dp = (LocalComm(), LocalComm()) if comm is None else (comm.tp, comm.dp)
    mine = slice(dp.rank * tc.batch_size, (dp.rank + 1) * tc.batch_size)  # this dp rank's rows of each batch
    sums, counts = np.zeros(len(batches)), np.zeros(len(batches))  # (n_batches,) loss * n and n of this rank's rows
    n_bytes = np.zeros(len(batches))  # (n_batches,) the bytes this rank's counted targets stand for
    threads = None if xp is np and tp.size == 1 else 1  # one after the other on a GPU and under tp (collectives)

    def loss_sum(part):
        """The task of one group of rows: the sum of its counted targets' losses (0 without any)."""
        def run():
            n = int((part["targets"] != IGNORE_INDEX).sum())
            if n == 0:
                return 0.0
            return batch_loss(params, {key: xp.asarray(value) for key, value in part.items()}, cfg, tp=tp) * n
        return run

    for i, batch in enumerate(batches):
        rows = {key: value[mine] for key, value in batch.items()}  # (B, ...) each; a short last batch may leave none
        if len(rows["targets"]) == 0:
            continue
        groups = [g for g in np.array_split(np.arange(len(rows["targets"])), row_groups) if len(g)]
        parts = [{key: value[g] for key, value in rows.items()} for g in groups]
        sums[i] = sum(side_by_side([loss_sum(part) for part in parts], threads=threads))  # added in row order
        counted = rows["targets"][rows["targets"] != IGNORE_INDEX]  # (n,) weight each batch by its counted targets
        counts[i] = len(counted)
        if token_bytes is not None:
            n_bytes[i] = token_bytes[counted].sum()
    sums, counts = dp.allreduce(sums), dp.allreduce(counts)  # (n_batches,) each: the whole global batches
    loss = sum(float(batch_sum) for batch_sum in sums) / sum(int(batch_count) for batch_count in counts)
    if token_bytes is None:
        return loss
    total_bytes = float(dp.allreduce(n_bytes).sum())
    return loss, loss * float(counts.sum()) / (math.log(2) * total_bytes) if total_bytes else float("nan")


def validation_metrics(params: dict, cfg: ModelConfig, batches: list[dict], tc: TrainConfig, xp, comm,
                       token_bytes, row_groups: int = 1) -> dict:
    """{"val_loss", "val_ppl", "val_bpb"} of ``validation_loss`` (bits per byte from the tokenizer's table; none
    without one)."""
    if token_bytes is None:
        loss = validation_loss(params, cfg, batches, tc, xp, comm, row_groups=row_groups)
        return dict(val_loss=loss, val_ppl=perplexity(loss))
    loss, bpb = validation_loss(params, cfg, batches, tc, xp, comm, token_bytes, row_groups=row_groups)
    return dict(val_loss=loss, val_ppl=perplexity(loss), val_bpb=bpb)


def start_lines(cfg, tc, data, comm, params_on_rank: int, peak: float, start: str | None = None,
                row_groups: int = 1) -> list[str]:
    """The first lines of a run's log: the model, the data, the device (and the row groups run side by side), the
    layout, the vocabulary's padding, and ``start`` (where a resumed or initialised run starts from)."""
    groups = f" | rows in {row_groups} groups side by side" if row_groups > 1 else ""
    lines = [f"model: {num_params(cfg):,} parameters ({cfg.n_layers} layers, dim {cfg.dim}, vocab "
             f"{cfg.vocab_size}) | data: {data.dir} ({len(data.train):,} train / {len(data.val):,} val {data.unit}) | "
             f"device {tc.device} {tc.dtype}{groups} | peak {peak / 1e12:.3f} TFLOP/s "
             f"({'given' if tc.peak_tflops else 'measured'}{', all ranks' if comm.world.size > 1 else ''})"]
    if comm.world.size > 1:
        lines.append(f"parallel: {comm.world.size} ranks = tp {comm.tp.size} x dp {comm.dp.size}, zero={tc.zero} | "
                     f"global batch {comm.dp.size} x {tc.batch_size} rows | {params_on_rank:,} parameters on each rank")
    V_tok = data.tokenizer.vocab_size
    if V_tok < cfg.vocab_size:
        lines.append(f"note: the tokenizer has {V_tok} tokens and the model vocab_size={cfg.vocab_size}: embedding "
                     f"rows and logits {V_tok}..{cfg.vocab_size - 1} are padding that no token uses")
    return lines + ([start] if start else [])


def format_line(m: dict, total_steps: int) -> str:
    """The log line of one step (of step 0: the untrained model's validation only)."""
    line = f"step {m['step']:>{len(str(total_steps))}}/{total_steps}"
    if "loss" in m:
        line += (f" | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad norm {m['grad_norm']:.3f} | "
                 f"{m['tokens_per_s']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}%")
    if "val_loss" in m:
        line += f" | val loss {m['val_loss']:.4f} | val ppl {m['val_ppl']:.2f}"
    if "val_bpb" in m:
        line += f" | val bpb {m['val_bpb']:.4f}"
    return line


def perplexity(loss: float) -> float:
    """exp(loss), capped where float64's exp would overflow."""
    return math.exp(min(loss, 700.0))


def measure_peak_flops(xp, dtype) -> float:
    """FLOP/s of a large square matmul on this device and dtype, the best of a few runs.

    This is the ceiling our own matmuls could reach here, so MFU = achieved / this is an honest utilisation figure
    for the machine at hand (a vendor's datasheet peak can be given instead with --peak_tflops).
    """
    n = 1024 if xp is np else 8192
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype=dtype)  # (n, n)
    best = math.inf
    for _ in range(8):  # the first runs warm up threads and caches
        start = time.perf_counter()
        c = a @ a
        float(c[0, 0])  # waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_rss_bytes() -> int:
    """The most physical memory this process has held so far (its high-water mark), in bytes."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib if sys.platform == "darwin" else kib * 1024


def remove_stale_temp_files(out_dir) -> None:
    """Temp files that a killed process left beside its metrics or plot (``.NAME.PID.RANDOM.tmp``)."""
    for entry in Path(out_dir).iterdir():
        if entry.name.startswith((f".{METRICS_FILE}.", f".{PLOT_FILE}.")) and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)

