"""The bottom layer of llmfab: facts every other layer shares, importing none of them.

- :mod:`llmfab.core.errors`: the one exception hierarchy;
- :mod:`llmfab.core.formats`: the weight-format catalogue (GGUF block sizes),
  the N:M sparsity patterns, the quantized-activation block;
- :mod:`llmfab.core.numerics`: the accelerator's arithmetic (binary32 ops,
  exp/reciprocal/rsqrt tables, RoPE tables), bit-exact;
- :mod:`llmfab.core.cache`: where the user's cache directory is, atomic writes into it.

The layers import downwards only: host -> sim -> hw -> compiler -> boards -> core
(tests/test_layers.py checks every import).
"""
