"""npllm: a large-language-model trainer written as readable, hand-derived array math.

Every forward and backward pass is plain NumPy (or CuPy on NVIDIA GPUs) in ``npllm.layers``;
``npllm.models.decoder`` composes them. Start reading at ``npllm.models.decoder.loss_and_grads``.
"""

__version__ = "0.1.0"
