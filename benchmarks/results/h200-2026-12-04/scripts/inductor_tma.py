"""Can Inductor launch the TMA kernels? torch.compile(layer) forward + backward at hidden 2048, three ways:
default (portable kernels in a trace), persistent (tma_readable assumes 16-byte alignment inside a trace: the
persistent kernels' device-side descriptors and the host-side TensorDescriptors of the up/dA weights), against
eager. ms per fwd+bwd (CUDA events, median of 10), and the largest difference from eager per tensor."""
import statistics, sys, traceback
import torch
sys.path.insert(0, "benchmarks")
import harness
import triton_moe
from triton_moe.kernels import grouped_gemm, tuning, host

# The variants differ only in what the launchers decide inside the trace, which the compile caches do not key on.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

original = tuning.tma_readable
def portable(matrix):
    return False if host.tracing() else original(matrix)

def assume_aligned(matrix):
    if host.tracing():
        row_bytes = matrix.shape[1] * matrix.element_size()
        return tuning.tma_reads_rows(matrix.shape[0], row_bytes, matrix.device)
    return original(matrix)

persistent_original = grouped_gemm.takes_persistent_kernel
def persistent_in_trace(hidden_rows, other):
    tuning.tma_readable = assume_aligned
    try:
        return persistent_original(hidden_rows, other)
    finally:
        tuning.tma_readable = portable


def run(layer, x, grad):
    layer.zero_grad(set_to_none=True)
    xx = x.detach().requires_grad_()
    out = layer(xx)
    out.backward(grad)
    return [out, xx.grad] + [p.grad for p in layer.parameters()]

def time_ms(fn, n=10):
    ts = []
    for _ in range(3):
        fn()
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)

for name in sys.argv[1:] or ["h2048_128x768_top8", "h2048_64x1024_top8"]:
    config, tokens = harness.make_config(name, "relu_squared")
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(config).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    ref = run(layer, x, grad)
    print(f"## {name}: eager {time_ms(lambda: run(layer, x, grad)):.3f} ms")
    for label, readable in (("compiled, portable kernels", portable),
                            ("compiled, persistent kernels in the trace", "persistent")):
        if readable == "persistent":
            tuning.tma_readable = grouped_gemm.tma_readable = portable
            grouped_gemm.takes_persistent_kernel = persistent_in_trace
        else:
            tuning.tma_readable = grouped_gemm.tma_readable = readable
        torch._dynamo.reset()
        try:
            compiled = torch.compile(layer, fullgraph=True)
            got = run(compiled, x, grad)
            torch.cuda.synchronize()
            diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref)]
            print(f"  {label}: {time_ms(lambda: run(compiled, x, grad)):.3f} ms; max |diff| vs eager "
                  + " ".join(f"{d:.2e}" for d in diffs) + f" (bitwise: {all(d == 0 for d in diffs)})")
        except Exception as error:
            print(f"  {label}: FAILED {type(error).__name__}: {str(error)[:600]}")
            traceback.print_exc(limit=-6)
        finally:
            tuning.tma_readable = grouped_gemm.tma_readable = original
            grouped_gemm.takes_persistent_kernel = persistent_original
