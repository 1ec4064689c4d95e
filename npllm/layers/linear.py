"""Affine map y = x @ w + b with w stored (in, out).

Derivation: docs/derivations/linear.md
"""


def linear_forward(p, x):
    """p = {"w": (Cin, Cout), optional "b": (Cout,)}, x (..., Cin) -> y (..., Cout)."""
    y = x @ p["w"]  # (..., Cout)
    if "b" in p:
        y = y + p["b"]
    cache = (x, p)  # keep x for dw and w for dx; nothing to recompute
    return y, cache


def linear_backward(dy, cache):
    """forward was y = x @ w + b, so dx = dy @ w.T, dw = x.T @ dy, db = sum of dy over rows."""
    x, p = cache
    w = p["w"]
    dx = dy @ w.T  # (..., Cin)
    x2 = x.reshape(-1, w.shape[0])  # (N, Cin) with N = all leading dims
    dy2 = dy.reshape(-1, w.shape[1])  # (N, Cout)
    if w.flags.f_contiguous and not w.flags.c_contiguous:  # w is a transposed view (a tied head's tok_emb.T)
        grads = {"w": (dy2.T @ x2).T}  # (Cin, Cout), laid out like w: its transpose is contiguous like the table
    else:
        grads = {"w": x2.T @ dy2}  # (Cin, Cout)
    if "b" in p:
        grads["b"] = dy2.sum(axis=0)  # (Cout,)
    return dx, grads
