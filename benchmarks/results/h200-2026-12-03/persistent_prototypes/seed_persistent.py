"""Issue 20/24 probe: do the persistent kernels help at seed scale (hidden 256, 4096 tokens)? Device time from CUDA
graph replays of the layer's forward + backward, persistent kernels forced (threshold 0, sorted rows too, so the
weight gradients take them) against the defaults, alternating, in one process; and the row GEMMs alone."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from harness import build_layer, graphed_forward_backward_step, make_config, time_ms, triton_operands  # noqa: E402
from sweep_tiles import graph_us  # noqa: E402

from triton_moe import kernels  # noqa: E402
from triton_moe.kernels import tuning  # noqa: E402

MODES = {"default": 2**62, "persistent": 0}


def use(mode, sorted_rows):
    tuning.PERSISTENT_MIN_ROWS_X_HIDDEN = MODES[mode]
    tuning.SORTED_ROWS_MIN_ROWS_X_HIDDEN = 0 if sorted_rows else tuning.SMALL_PROBLEM_ROWS_X_HIDDEN


print(torch.cuda.get_device_name(), flush=True)
for name in ("8exp_uniform", "8exp_variable", "64exp_uniform", "64exp_variable"):
    config, tokens = make_config(name, "relu_squared")
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    layer, _ = build_layer("triton", config, torch.bfloat16)
    cells = []
    for round_ in range(2):
        for mode, sorted_rows in (("default", False), ("persistent", False), ("persistent", True)):
            use(mode, sorted_rows)
            replay = graphed_forward_backward_step(layer, x)
            ms = time_ms(lambda: [replay() for _ in range(20)], warmup=2, repeats=5) / 20
            cells.append(f"{mode}{'+sorted' if sorted_rows else ''} {1e3 * ms:.1f}")
    use("default", False)
    with torch.no_grad():
        o = triton_operands(layer, x)
        gemm = {}
        for mode in ("default", "persistent", "default", "persistent"):
            use(mode, False)
            gemm.setdefault(mode, []).append(
                (graph_us(lambda: kernels.down_projection(o.h_act, o.w2, o.layout)),
                 graph_us(lambda: kernels.input_grad_rows(o.dh_pre, o.w1, None, None, o.layout))))
    print(f"{name}: layer fwd+bwd graph µs: {'; '.join(cells)} | down, dX µs: "
          + "; ".join(f"{m} " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in v) for m, v in gemm.items()), flush=True)
