"""Row splits of the weight gradients at small problems: the layer's forward + backward from a CUDA graph
(device time) and the weight-gradient kernels' device time, per fixed split and tuning's choice; then the seed GPT
step under mode="reduce-overhead" with tuning's splits and with none, alternating."""
import sys
import torch
sys.path.insert(0, "benchmarks")
import harness
import triton_moe
from triton_moe.kernels import grouped_gemm, tuning

auto = tuning.weight_grad_row_splits
def set_splits(s):
    grouped_gemm.weight_grad_row_splits = auto if s == "auto" else (lambda *a, s=s: s)

CONFIGS = [("8x384", 2, 8192, "relu_squared"), ("4x512,4x256", 2, 8192, "relu_squared"),
           ("8x512", 2, 4096, "relu_squared"), ("8x384", 2, 8192, "swiglu"),
           ("64x256", 8, 4096, "relu_squared"), ("16x512,32x256,16x128", 8, 4096, "relu_squared")]
if "layers" in sys.argv[1:]:
  for sizes, k, tokens, act in CONFIGS:
    cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=k, hidden_size=256, activation=act)
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
    ref = None
    line = f"{sizes} top{k} {tokens} {act}:"
    for s in (1, 2, 3, 4, 6, 8, "auto"):
        set_splits(s)
        gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
        def step(x=x.detach().requires_grad_()):
            layer.zero_grad(set_to_none=True); x.grad = None
            layer(x).backward(gy)
        step(); torch.cuda.synchronize()
        grads = [p.grad.float().clone() for p in layer.parameters() if p.grad is not None]
        if ref is None:
            ref = grads
        diff = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref))
        graph_ms = harness.time_ms(harness.graphed_forward_backward_step(layer, x), 10, 100)
        table, total = harness.kernel_launches(step)
        wg = sum(us for name, _, us in table if name in ("_weight_grad_gemm", "_sum_row_splits"))
        line += f" | S={s}: graph {graph_ms*1e3:.1f} µs, dW {wg:.1f} µs, rel {diff:.1e}"
    print(line, flush=True)
  set_splits("auto")

if "step" in sys.argv[1:]:
    import bench_train_step as b
    from triton_moe.testing.gpt import get_batch, load_bytes
    scale = b.SCALES["seed"]
    data = load_bytes(b.DATA)
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
    class A: warmup = 8; steps = 40; calling_thread_backward = False
    for rnd in range(2):
        for mlp, s in (("dense", 1), ("triton_uniform", 1), ("triton_uniform", "auto"), ("triton_variable", 1), ("triton_variable", "auto")):
            set_splits(s)
            torch._dynamo.reset(); torch.cuda.empty_cache()
            r = b.time_row(scale, mlp, "reduce-overhead", batches, A)
            print(f"round {rnd} {mlp:16s} splits {s}: {r['ms']:.3f} ms/step (spread {r['spread_ms'][0]:.2f}-{r['spread_ms'][1]:.2f}), peak {r['peak_memory_mib']:.0f} MiB", flush=True)
