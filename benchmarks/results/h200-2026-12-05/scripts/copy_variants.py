"""Where the gathering GEMMs' row copies (sorted_x, sorted_grad_out, for the weight gradients) should be made, at
the hidden-2048 configs. Part 1 times each piece alone (device µs per launch from CUDA-graph replays of 20); part 2
the whole layer's forward + backward under four variants, patched into ops at run time, alternating in one process:
  base     the copies written by the gathering GEMMs (column tile 0 of each row tile), as the layer does;
  sep      a gather pass of its own writes each copy, then the GEMM gathers from the token rows, copying nothing;
  sorted   a gather pass of its own writes each copy, then the GEMM reads the copy in order (row_to_token = arange);
  nocopy   no copies: the weight gradients gather the token rows (and dW2 recomputes its operand from h_pre).

    python3 benchmarks/results/h200-2026-12-05/scripts/copy_variants.py [configs...]
"""
import sys

import torch

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402
from sweep_tiles import graph_us  # noqa: E402

import triton_moe.ops as ops  # noqa: E402
from triton_moe import kernels  # noqa: E402
from triton_moe.kernels import tuning  # noqa: E402
from triton_moe.kernels import permute  # noqa: E402
from triton_moe.kernels.host import ceil_div  # noqa: E402

CONFIGS = sys.argv[1:] or ["h2048_64x1024_top8", "h2048_128x768_top8", "h2048_64x1024_top8_swiglu"]


def gather_into(rows, src, row_to_token):
    """rows[r] = src[row_to_token[r]], the permute kernel's launch into a given buffer."""
    tile_h = tuning.permute_tile_h(src.shape[1])
    permute._gather_rows_kernel[(ceil_div(rows.shape[0], 1),)](
        src, row_to_token, rows, rows.shape[0], src.shape[1], TILE_ROWS=1, TILE_H=tile_h,
        num_warps=tuning.PERMUTE_NUM_WARPS)


def identity(row_to_token):
    return torch.arange(row_to_token.shape[0], device=row_to_token.device, dtype=row_to_token.dtype)


ORIGINAL = dict(up=ops.up_projection, dA=ops.down_projection_backward, pay_off=ops.sorted_rows_pay_off,
                keeps=ops._keeps_weighted_activations)


def patch(variant):
    ops.up_projection, ops.down_projection_backward = ORIGINAL["up"], ORIGINAL["dA"]
    ops.sorted_rows_pay_off, ops._keeps_weighted_activations = ORIGINAL["pay_off"], ORIGINAL["keeps"]
    if variant == "nocopy":
        ops.sorted_rows_pay_off = lambda *args: False
        ops._keeps_weighted_activations = lambda *args: False
    if variant in ("sep", "sorted"):
        def up(x, w1, v1, row_to_token, layout, activation, rw=None, *, sorted_x=None, **kw):
            if sorted_x is None:
                return ORIGINAL["up"](x, w1, v1, row_to_token, layout, activation, rw, **kw)
            gather_into(sorted_x, x, row_to_token)
            if variant == "sep":
                return ORIGINAL["up"](x, w1, v1, row_to_token, layout, activation, rw, **kw)
            return ORIGINAL["up"](sorted_x, w1, v1, identity(row_to_token), layout, activation, rw, **kw)

        def dA(grad_out, w2, h_pre, h_up, row_to_token, layout, rw, activation, *, sorted_grad_out=None, **kw):
            if sorted_grad_out is None:
                return ORIGINAL["dA"](grad_out, w2, h_pre, h_up, row_to_token, layout, rw, activation, **kw)
            gather_into(sorted_grad_out, grad_out, row_to_token)
            if variant == "sep":
                return ORIGINAL["dA"](grad_out, w2, h_pre, h_up, row_to_token, layout, rw, activation, **kw)
            return ORIGINAL["dA"](sorted_grad_out, w2, h_pre, h_up, identity(row_to_token), layout, rw, activation,
                                  **kw)
        ops.up_projection, ops.down_projection_backward = up, dA


def problem(name):
    """(config, tokens) of a harness config name, with "_swiglu" at its end for that activation."""
    activation = "swiglu" if name.endswith("swiglu") else "relu_squared"
    return harness.make_config(name.removesuffix("_swiglu"), activation)


def operands(name):
    """(config, x, every kernel's operands of one forward and backward: harness.triton_operands), bf16."""
    config, tokens = problem(name)
    layer, _ = harness.build_layer("triton", config, torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        return config, x, harness.triton_operands(layer, x)


def pieces(name):
    config, x, o = operands(name)
    with torch.no_grad():
        s, L, act, rw = o.sort, o.layout, config.activation, o.routing_weights
        ident = identity(s.row_to_token)
        sx, sg = o.sorted_x.clone(), torch.empty_like(o.sorted_x)
        gather_into(sg, o.grad_out, s.row_to_token)

        def up(a, r2t, copy):
            return kernels.up_projection(a, o.w1, o.v1, r2t, L, act, rw, routing_weight_index=s.row_to_flat,
                                         sorted_x=copy)

        def dA(g, r2t, copy):
            return kernels.down_projection_backward(g, o.w2, o.h_pre, o.h_up, r2t, L, rw, act,
                                                    routing_weight_index=s.row_to_flat, sorted_grad_out=copy)
        # the same reduction order whatever the rows' source: the results must be equal bit for bit
        same = [torch.equal(up(x, s.row_to_token, None)[2], up(sx, ident, None)[2]),
                torch.equal(up(x, s.row_to_token, None)[2], up(x, s.row_to_token, o.sorted_x)[2]),
                torch.equal(dA(o.grad_out, s.row_to_token, None)[0], dA(sg, ident, None)[0])]
        table = {
            "gather x": lambda: gather_into(o.sorted_x, x, s.row_to_token),
            "up, copying (base)": lambda: up(x, s.row_to_token, o.sorted_x),
            "up, gathering, no copy": lambda: up(x, s.row_to_token, None),
            "up, sorted rows": lambda: up(sx, ident, None),
            "gather grad_out": lambda: gather_into(o.sorted_x, o.grad_out, s.row_to_token),
            "dA, copying (base)": lambda: dA(o.grad_out, s.row_to_token, o.sorted_x),
            "dA, gathering, no copy": lambda: dA(o.grad_out, s.row_to_token, None),
            "dA, sorted rows": lambda: dA(sg, ident, None),
            "dW1, sorted rows (base)": lambda: kernels.weight_grad(o.dh_pre, o.dh_up, sx, None, L),
            "dW1, gathering": lambda: kernels.weight_grad(o.dh_pre, o.dh_up, x, s.row_to_token, L),
            "dW2, sorted rows (base)": lambda: kernels.weight_grad(o.h_act, None, sg, None, L),
            "dW2, gathering": lambda: kernels.weight_grad(o.h_act, None, o.grad_out, s.row_to_token, L),
            "dW2, gathering, from h_pre": lambda: kernels.weight_grad(
                o.h_pre, o.h_up, o.grad_out, s.row_to_token, L, activation=act, routing_weights=rw,
                routing_weight_index=s.row_to_flat),
        }
        print(f"\n## {name}: pieces, device µs per launch (bit-equal h_act / copy-free / dh_pre: {same})", flush=True)
        for label, fn in table.items():
            print(f"  {label:30s} {graph_us(fn):8.1f}", flush=True)


def layer_variants(name, variants, patch, rounds=2, device_time=True):
    """The layer's forward + backward at `name` under each variant (patch(variant) before it; the first is the
    base), alternating, `rounds` times: eager one call, back to back, graph replay and, with device_time, the sum of
    the kernels' device time; then whether each variant's output and gradients equal the base's bit for bit."""
    config, tokens = problem(name)
    columns = "eager one call / back to back / graph" + (" / device" if device_time else "")
    print(f"\n## {name}: the layer's forward + backward, ms ({columns})", flush=True)
    outputs = {}
    for round_ in range(rounds):
        for variant in variants:
            patch(variant)
            torch.manual_seed(0)
            layer, _ = harness.build_layer("triton", config, torch.bfloat16)
            x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
            step = harness.forward_backward_step(layer, x)
            times = [harness.time_ms(step, warmup=5, repeats=30), harness.back_to_back_ms(step, warmup=3, repeats=30),
                     harness.time_ms(harness.graphed_forward_backward_step(layer, x), warmup=3, repeats=30)]
            if device_time:
                times.append(harness.kernel_launches(step)[1] / 1e3)
            flops = 3 * harness.model_flops(config, x, layer.router.weight)
            if round_ == 0:
                layer.zero_grad(set_to_none=True)
                xg = x.detach().requires_grad_()
                out = layer(xg)
                out.backward(torch.ones_like(out))
                outputs[variant] = [out, xg.grad, layer.w1.grad, layer.w2.grad, layer.router.weight.grad]
            graph = times[2]
            print(f"  round {round_} {variant:13s} {' '.join(f'{t:7.3f}' for t in times)}  "
                  f"({flops / graph / 1e9:5.1f} TFLOP/s graphed, {flops / graph / 1e9 / 7.7:4.1f}% of 770)", flush=True)
    patch(variants[0])
    for variant in variants[1:]:
        print(f"  {variant} against {variants[0]}, bit-equal out/dx/dw1/dw2/drouter:",
              [torch.equal(a, b) for a, b in zip(outputs[variant], outputs[variants[0]])], flush=True)


if __name__ == "__main__":
    print(torch.__version__, kernels.__name__, torch.cuda.get_device_name())
    for name in CONFIGS:
        pieces(name)
    for name in CONFIGS:
        layer_variants(name, ("base", "sep", "sorted", "nocopy"), patch)
