"""Draw the figures of docs/: python docs/figures/make_figures.py  (writes the PNGs next to this file).

    lr_schedule.png         warmup + cosine, from npllm.optim.lr_at (docs/derivations/adamw.md)
    gelu_vs_silu.png        GELU (tanh form) and SiLU and their derivatives (docs/derivations/mlp.md)
    attention_backward.png  the data flow of attention_backward (docs/derivations/attention.md)

Needs matplotlib (pip install -e '.[plot]'); the Agg backend, so no display is needed. tests/test_docs.py runs
``main`` into a temporary directory to check that the three figures are still drawn and stay small.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from npllm.layers.mlp import GELU_A, GELU_K  # noqa: E402
from npllm.optim import lr_at  # noqa: E402

HERE = Path(__file__).resolve().parent
DPI = 100


def lr_schedule(path: Path) -> None:
    """The trainer's defaults for a 300-step run: lr 1e-3, min_lr 1e-4, warmup 10% of the steps."""
    total, warmup, lr, min_lr = 300, 30, 1e-3, 1e-4
    steps = np.arange(total + 30)
    rates = [lr_at(int(s), lr=lr, warmup_steps=warmup, total_steps=total, min_lr=min_lr) for s in steps]
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=DPI)
    ax.plot(steps, rates, color="tab:blue", lw=2)
    ax.axvspan(0, warmup, color="tab:orange", alpha=0.15, label=f"linear warmup: lr * (step + 1) / {warmup}")
    ax.axvspan(warmup, total, color="tab:green", alpha=0.08, label="cosine from lr down to min_lr")
    ax.axhline(min_lr, color="gray", ls=":", lw=1)
    ax.annotate("lr_at(0) = lr / warmup", (0, lr / warmup), (40, 2.2e-4), arrowprops=dict(arrowstyle="->"))
    ax.annotate("(lr + min_lr) / 2 half-way", (165, (lr + min_lr) / 2), (190, 7.5e-4),
                arrowprops=dict(arrowstyle="->"))
    ax.annotate("min_lr from step = total on", (total, min_lr), (205, 4.2e-4), arrowprops=dict(arrowstyle="->"))
    ax.set_xlabel("step (0-based)")
    ax.set_ylabel("learning rate lr_t")
    ax.set_title(f"npllm.optim.lr_at(step, lr={lr:g}, min_lr={min_lr:g}, warmup_steps={warmup}, total_steps={total})",
                 fontsize=9.5)
    ax.set_xlim(0, steps[-1])
    ax.set_ylim(0, 1.1e-3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gelu_vs_silu(path: Path) -> None:
    """The two activations and the derivatives their backwards multiply by (the formulas of mlp.md)."""
    h = np.linspace(-6, 6, 601)
    sig = 0.5 * (1 + np.tanh(0.5 * h))
    silu, dsilu = h * sig, sig * (1 + h * (1 - sig))
    th = np.tanh(GELU_K * (h + GELU_A * h**3))
    gelu = 0.5 * h * (1 + th)
    dgelu = 0.5 * (1 + th) + 0.5 * h * (1 - th**2) * GELU_K * (1 + 3 * GELU_A * h**2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=DPI)
    for ax, (f_gelu, f_silu), title in ((left, (gelu, silu), "the functions"),
                                        (right, (dgelu, dsilu), "their derivatives (what backward multiplies by)")):
        ax.plot(h, f_gelu, color="tab:blue", lw=2, label="GELU (tanh form, GPT-2)")
        ax.plot(h, f_silu, color="tab:red", lw=2, ls="--", label="SiLU = h * sigmoid(h) (SwiGLU's gate)")
        ax.axhline(0, color="gray", lw=0.8)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("h")
        ax.grid(alpha=0.3)
    left.plot(h, np.maximum(h, 0), color="gray", lw=1, ls=":", label="ReLU, for reference")
    left.set_xlim(-4, 4)
    left.set_ylim(-0.5, 4)
    right.axhline(1, color="gray", lw=0.8, ls=":")
    right.set_ylim(-0.25, 1.25)
    left.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _box(ax, x, y, text, color, w=3.3, h=0.72, note=None):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04", fc=color, ec="black",
                                lw=1))
    ax.text(x, y + (0.1 if note else 0), text, ha="center", va="center", fontsize=8.5, family="monospace")
    if note:
        ax.text(x, y - 0.22, note, ha="center", va="center", fontsize=7, color="dimgray")


def _arrow(ax, start, end, label=None):
    ax.annotate("", end, start, arrowprops=dict(arrowstyle="-|>", color="black", lw=1.2, shrinkA=0, shrinkB=0))
    if label:
        ax.text((start[0] + end[0]) / 2 + 0.08, (start[1] + end[1]) / 2, label, fontsize=7.5, va="center",
                family="monospace")


def attention_backward(path: Path) -> None:
    """Boxes and arrows: the gradient from dy back through wo, P @ v, the softmax, the scores and RoPE to dx."""
    grad, weight, end = "#dbe9f6", "#fde2c8", "#d5ecd4"
    fig, ax = plt.subplots(figsize=(9.5, 8.6), dpi=DPI)
    ax.set_xlim(0, 10)
    ax.set_ylim(0.2, 12.2)
    ax.axis("off")
    ax.set_title("attention_backward, for the forward y = merge_heads(softmax(q @ k.T * scale) @ v) @ wo + bo:\n"
                 "the gradient flows from dy (top) to dx (bottom) in blue; weight gradients branch off in orange",
                 fontsize=9.5)
    _box(ax, 3.2, 11.5, "dy  (B, T, C)", end, w=2.4)
    _box(ax, 3.2, 10.2, "do = dy @ wo.T  -> (B, NKV, G, T, hs)", grad, w=4.6, note="output projection (linear.md)")
    _box(ax, 8.0, 10.2, "dwo = o_merged.T @ dy\ndbo = sum of dy over rows", weight, w=3.0, h=0.8)
    _box(ax, 1.8, 8.6, "dP = do @ v.T", grad, w=2.9, note="(B, NKV, G, T, Tk); uses v")
    _box(ax, 5.6, 8.6, "dv = sum over g of P.T @ do", grad, w=3.6, note="(B, NKV, Tk, hs); uses P; the GQA sum")
    _box(ax, 1.8, 6.9, "ds = P * (dP - sum_j dP * P)", grad, w=3.4,
         note="softmax Jacobian diag(P) - P P^T (softmax.md)")
    _box(ax, 1.1, 5.2, "dq = scale * ds @ k", grad, w=2.1, note="uses k")
    _box(ax, 3.9, 5.2, "dk = scale * sum_g ds.T @ qg", grad, w=3.2, note="uses qg; the GQA sum")
    _box(ax, 2.75, 3.6, "RoPE^T: rope_backward(dq), rope_backward(dk)", grad, w=5.2,
         note="rope.md; skipped without RoPE")
    _box(ax, 7.8, 2.2, "dwq, dwk, dwv = x.T @ (dq, dk, dv rows)\ndbq, dbk, dbv = row sums", weight, w=4.2, h=0.8)
    _box(ax, 3.2, 2.2, "dx = dq @ wq.T + dk @ wk.T + dv @ wv.T", grad, w=4.5, note="x was used three times: the sum")
    _box(ax, 3.2, 0.8, "dx  (B, T, C)", end, w=2.4)
    _arrow(ax, (3.2, 11.14), (3.2, 10.56))
    _arrow(ax, (4.4, 11.4), (6.5, 10.6))
    _arrow(ax, (2.4, 9.84), (1.9, 8.96))
    _arrow(ax, (4.0, 9.84), (5.3, 8.96))
    _arrow(ax, (1.8, 8.24), (1.8, 7.26))
    _arrow(ax, (1.4, 6.54), (1.1, 5.56))
    _arrow(ax, (2.3, 6.54), (3.6, 5.56))
    _arrow(ax, (1.1, 4.84), (1.6, 3.96))
    _arrow(ax, (3.9, 4.84), (3.3, 3.96))
    _arrow(ax, (2.75, 3.24), (2.8, 2.56), label="dq, dk")
    _arrow(ax, (6.6, 8.24), (4.6, 2.56))
    ax.text(5.75, 5.6, "dv", fontsize=7.5, family="monospace")
    _arrow(ax, (5.35, 3.4), (6.4, 2.62))
    _arrow(ax, (6.75, 8.24), (7.6, 2.62))
    _arrow(ax, (3.2, 1.84), (3.2, 1.16))
    ax.text(7.75, 7.6, "kept by the forward\n(the cache): x, qg,\nk and v after RoPE,\nP, o_merged, the\nRoPE tables, scale",
            fontsize=8, color="dimgray", va="top", bbox=dict(fc="white", ec="lightgray", ls="--"))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(out_dir: Path = HERE) -> list[Path]:
    """Write the three PNGs into out_dir and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (("lr_schedule", lr_schedule), ("gelu_vs_silu", gelu_vs_silu),
                       ("attention_backward", attention_backward)):
        path = out_dir / f"{name}.png"
        draw(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"{written}  {written.stat().st_size:,} bytes")
