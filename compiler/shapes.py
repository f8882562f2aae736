"""Shape-only models: a model's layout without its weights, for planning and compile studies.

``llmfab plan --model llama2-70b`` plans a model nobody has to download: every
weight is an all-zero block broadcast over its shape (no memory), so the
compiler lays it out (``emit_image=False``) and the performance model
projects it.
"""

from __future__ import annotations

import numpy as np

from llmfab.compiler import quant
from llmfab.compiler.model import Model, ModelDesc, QTensor, expected_shapes

_LLAMA = dict(arch="llama", head_dim=128, vocab_size=32000, context_length=4096, rope_base=10000.0,
              rope_dim=128, rms_eps=1e-5, tied_embeddings=False)

#: named shapes (``--model NAME``) and the weight format they are laid out in
SHAPES = {
    "llama2-7b": ModelDesc(name="LLaMA2-7B-shaped", n_layers=32, dim=4096, n_heads=32, n_kv_heads=32,
                           ffn_dim=11008, **_LLAMA),
    "llama2-13b": ModelDesc(name="LLaMA2-13B-shaped", n_layers=40, dim=5120, n_heads=40, n_kv_heads=40,
                            ffn_dim=13824, **_LLAMA),
    "llama2-70b": ModelDesc(name="LLaMA2-70B-shaped", n_layers=80, dim=8192, n_heads=64, n_kv_heads=8,
                            ffn_dim=28672, **_LLAMA),
}


def shape_model(desc: ModelDesc, qtype: str = "q4_0") -> Model:
    """A model of shape ``desc`` whose weights are all-zero ``qtype`` blocks (broadcast views)."""
    m = Model(desc=desc, path="", source="shape")
    for name, shape in expected_shapes(desc).items():
        if len(shape) == 1:
            m.tensors[name] = QTensor(name, "f32", shape, np.ones(shape, np.float32))
        else:
            rb = shape[1] // 32 * quant.BLOCK_BYTES[qtype]
            m.tensors[name] = QTensor(name, qtype, shape, np.broadcast_to(np.zeros(rb, np.uint8), (shape[0], rb)))
    return m


def named_shape(name: str, qtype: str = "q4_0") -> Model | None:
    """The shape-only model called ``name`` (see :data:`SHAPES`), or None."""
    desc = SHAPES.get(name.lower())
    return shape_model(desc, qtype) if desc is not None else None
