"""The architectures, each composed from ``npllm.layers`` with Megatron's f and g written where they act.

    spec.py      ParamSpec, and what is read off an architecture's specs (shapes, split axes, initial values)
    decoder.py   the decoder-only transformer: GPT-2 and LLaMA shapes (pre-norm, RoPE or learned positions, GQA,
                 SwiGLU or GELU, tied or untied head)
"""
