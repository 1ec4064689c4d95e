"""Fast paths beside the reference layers.

Each module here computes exactly what a function of ``npllm/layers`` computes, under the same signature (a few
keyword-only tuning arguments may follow, e.g. tile sizes), only faster or in less memory. The reference stays the
readable version a student reads next to its derivation; the fast one is tested against it in float64 on awkward
shapes (tests/test_fast_<name>.py) and checked with finite differences on its own.

Modules:
    attention.py    flash-style self-attention: query x key tiles with an online softmax, the backward recomputes
                    each tile's probabilities from the stored row logsumexp (FlashAttention-2), GQA by broadcast;
                    same contract as npllm.layers.attention. Its core (flash_core_forward / flash_core_backward)
                    also does bidirectional attention and key padding masks.
    pool.py         the shared thread pool: map_rows(fn, n_rows, row_size) over row chunks on this process's cores
    mlp.py          GELU-tanh, SwiGLU, ReLU MLPs: fused, chunked, all-core elementwise work; npllm.layers.mlp's contract
    norm.py         RMSNorm and LayerNorm chunk by chunk of rows on all cores; npllm.layers.norm's contract and bits
    loss.py         vocabulary-parallel cross-entropy in one pass, no second (N, V_tp) array (in_place: none at all)
    optim.py        adamw_update fused and chunked over each tensor on all cores; npllm.optim's contract and bits
"""
