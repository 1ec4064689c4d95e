"""Every layer as a pair of pure functions.

``<op>_forward(p, x, ...) -> (y, cache)`` and ``<op>_backward(dy, cache) -> (dx, grads)``, where ``p`` is a dict of
the layer's own parameters under short local names (``{"w": ..., "b": ...}``) and ``grads`` has exactly the keys of
``p``. Backward returns fresh arrays; summing gradients is left to the models (``npllm.models``). The derivation of
each backward is in ``docs/derivations/<op>.md``.
"""
