"""Sinusoidal positional encoding (Vaswani et al. 2017, section 3.5), interleaved sin/cos.

Column 2i holds a sine and column 2i + 1 the cosine of the same angle, pos * base^(-2i/C):
    PE[pos, 2i] = sin(pos / base^(2i/C)),    PE[pos, 2i + 1] = cos(pos / base^(2i/C)),    base = 10000.
This is the layout of the paper's formula, of the PyTorch tutorials' PositionalEncoding (pe[:, 0::2] = sin,
pe[:, 1::2] = cos) and of Hugging Face's DistilBERT (create_sinusoidal_embeddings). Hugging Face's Marian/FSMT-style
SinusoidalPositionalEmbedding puts all sines first and then all cosines ([sin | cos], the same numbers with the
columns permuted); torch.nn.Transformer has no positional encoding of its own.

The table has no parameters: a model adds it to the scaled token embeddings, x = emb * sqrt(C) + PE, and the
backward of that sum passes dx to the embeddings unchanged (PE needs no gradient). Derivation:
docs/derivations/positions.md
"""

import numpy as np

from ..checks import is_int


def sinusoidal_table(positions, dim, xp=np, dtype=np.float32, base=10000.0):
    """PE (T, dim) for integer ``positions`` (T,), interleaved sin/cos. Computed in float64, then cast to ``dtype``.

    dim must be even (each frequency fills one sin column and one cos column); base is the 10000 of the paper.
    """
    if not is_int(dim) or dim < 2 or dim % 2:
        raise ValueError(f"dim={dim!r} is not allowed; use an even int >= 2 (one sin and one cos column per "
                         "frequency)")
    if not base > 1.0:
        raise ValueError(f"base={base!r} is not allowed; use a number > 1")
    pos = np.asarray(positions)
    if pos.ndim != 1 or not (np.issubdtype(pos.dtype, np.integer) or pos.size == 0) or (pos < 0).any():
        raise ValueError(f"positions must be a 1-D array of ints >= 0; got dtype {pos.dtype}, shape {pos.shape}")
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # (dim/2,): base^(-2i/dim)
    angles = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, dim/2): pos / base^(2i/dim)
    table = np.empty((pos.shape[0], dim), dtype=np.float64)  # (T, dim)
    table[:, 0::2] = np.sin(angles)  # column 2i
    table[:, 1::2] = np.cos(angles)  # column 2i + 1
    return xp.asarray(table, dtype=dtype)
