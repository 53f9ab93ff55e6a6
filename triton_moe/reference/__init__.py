"""The stk block-sparse MoEMLP that triton_moe is compared against (same config and parameter layout).

Needs the sparse toolkit stanford-stk: `pip install ".[reference]"` from a clone, or `pip install stanford-stk==0.7.1`.
"""

import importlib.util

if importlib.util.find_spec("stk") is None:
    raise ImportError('triton_moe.reference needs stanford-stk (PyPI\'s "stk" is another package): '
                      'pip install stanford-stk==0.7.1, or ".[reference]" from a clone of triton-moe')

import triton_moe.kernels  # noqa: E402, F401  (on CPU-only machines: the interpreter, before stk imports triton)
from triton_moe.reference.moe import BLOCK_SIZE, MoEMLP, check_block_aligned  # noqa: E402

__all__ = ["BLOCK_SIZE", "MoEMLP", "check_block_aligned"]
