"""The router's fp32 GEMMs: torch's (cuBLAS, as the route ran them before kernels/router_gemm.py) against the Triton
kernels, three ways.

1. Each product alone at the GPT shapes (fp32 x and router weight, as under autocast), from a CUDA graph of 20
   calls, µs per call; the largest error of each against the fp64 product, relative to the largest |element|.
2. The Triton kernels' tiles swept at two shapes.
3. The seed GPT step round-robin in one process (as ro_route_ab.py): dense, uniform and variable widths with the
   old and the new router GEMMs, under mode="reduce-overhead" and eagerly.
4. One MoEMLP's forward + backward under bf16 autocast (x fp32, as a LayerNorm hands it), from a CUDA graph,
   old and new router GEMMs alternating: µs per replay.
Usage: router_gemm_ab.py [rounds] [sections, e.g. 1234]
"""
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
import bench_train_step as b  # noqa: E402
from triton_moe import router_ops  # noqa: E402
from triton_moe.kernels import router_gemm, tuning  # noqa: E402
from triton_moe.kernels.tuning import GemmTiles  # noqa: E402
from triton_moe.testing.gpt import get_batch, load_bytes  # noqa: E402

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 100
sections = sys.argv[2] if len(sys.argv) > 2 else "123"


def graph_us(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(15):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); graph.replay(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e) * 1000 / reps)
    return statistics.median(times)


def rel_error(got, a, b_):
    exact = a.double() @ b_.double()
    return float((got.double() - exact).abs().max() / exact.abs().max())


SHAPES = [(8192, 256, 8), (8192, 256, 64), (4096, 256, 128), (8192, 2048, 128), (16384, 2048, 64)]
if "1" in sections:
    print("## 1. each product alone, fp32 operands: µs per call (CUDA graph of 20), error vs fp64 / largest")
    print("| N, H, E | logits torch | logits triton | grad_x torch | grad_x triton | grad_W torch | grad_W triton |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, h, e in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn((n, h), device="cuda", generator=gen)
        w = torch.randn((e, h), device="cuda", generator=gen) * h**-0.5
        g = torch.randn((n, e), device="cuda", generator=gen)
        cells = []
        for old, new, a, b_ in (
                (lambda: F.linear(x, w), lambda: router_gemm.router_logits(x, w), x, w.T),
                (lambda: g @ w, lambda: router_gemm.router_input_grad(g, w, torch.float32), g, w),
                (lambda: g.t() @ x, lambda: router_gemm.router_weight_grad(g, x, torch.float32), g.T, x)):
            cells.append(f"{graph_us(old):.1f} ({rel_error(old(), a, b_):.1e})")
            cells.append(f"{graph_us(new):.1f} ({rel_error(new(), a, b_):.1e})")
        print(f"| {n}, {h}, {e} | " + " | ".join(cells) + " |")

if "2" in sections:
    original_precision = router_gemm.router_gemm_precision
    router_gemm.router_gemm_precision = lambda device: "ieee"
    print("\nThe Triton kernels with input_precision='ieee' (FMAs) instead: µs (error)")
    for n, h, e in SHAPES:
        x = torch.randn((n, h), device="cuda"); w = torch.randn((e, h), device="cuda") * h**-0.5
        g = torch.randn((n, e), device="cuda")
        print(f"{n}, {h}, {e}: " + "; ".join(
            f"{name} {graph_us(call):.1f} ({rel_error(call(), a, b_):.1e})" for name, call, a, b_ in (
                ("logits", lambda: router_gemm.router_logits(x, w), x, w.T),
                ("grad_x", lambda: router_gemm.router_input_grad(g, w, torch.float32), g, w),
                ("grad_W", lambda: router_gemm.router_weight_grad(g, x, torch.float32), g.T, x))))
    router_gemm.router_gemm_precision = original_precision

if "2" in sections:
    print("\n## 2. tiles (tile_m, tile_n, tile_k, warps): µs per call")
    chosen = router_gemm.router_gemm_tiles
    candidates = {
        "logits": [(16, None, 32, 2), (32, None, 32, 4), (64, None, 32, 4), (64, None, 16, 4), (128, None, 32, 8),
                   (32, None, 64, 4), (64, 64, 32, 4), (128, 64, 32, 8)],
        "input_grad": [(64, 64, None, 4), (32, 64, None, 4), (64, 128, None, 4), (128, 64, None, 8),
                       (128, 128, None, 8), (32, 128, None, 4)],
        "weight_grad": [(None, 64, 32, 4), (None, 32, 32, 4), (None, 128, 32, 4), (None, 64, 64, 4),
                        (None, 64, 16, 4), (None, 128, 32, 8)],
    }
    for n, h, e in [(8192, 256, 8), (8192, 2048, 128)]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn((n, h), device="cuda", generator=gen)
        w = torch.randn((e, h), device="cuda", generator=gen)
        g = torch.randn((n, e), device="cuda", generator=gen)
        calls = {"logits": lambda: router_gemm.router_logits(x, w),
                 "input_grad": lambda: router_gemm.router_input_grad(g, w, torch.float32),
                 "weight_grad": lambda: router_gemm.router_weight_grad(g, x, torch.float32)}
        for product, options in candidates.items():
            default = chosen(product, e)
            row = []
            for tm, tn, tk, warps in options:
                tiles = GemmTiles(tm or default.tile_m, tn or default.tile_n, tk or default.tile_k, warps, 3)
                router_gemm.router_gemm_tiles = lambda p, experts, tiles=tiles, product=product: (
                    tiles if p == product else chosen(p, experts))
                try:
                    row.append(f"{(tiles.tile_m, tiles.tile_n, tiles.tile_k, warps)}: {graph_us(calls[product]):.1f}")
                except Exception as error:  # noqa: BLE001
                    row.append(f"{(tiles.tile_m, tiles.tile_n, tiles.tile_k, warps)}: {type(error).__name__}")
            router_gemm.router_gemm_tiles = chosen
            print(f"{n}x{h} E={e} {product} (default {default.tile_m, default.tile_n, default.tile_k}): "
                  + "; ".join(row))
    for splits_tokens in (128, 256, 512, 1024):
        n, h, e = 8192, 256, 8
        x = torch.randn((n, h), device="cuda"); g = torch.randn((n, e), device="cuda")
        original = router_gemm.router_weight_grad_split_tokens
        router_gemm.router_weight_grad_split_tokens = lambda *args, t=splits_tokens: t
        print(f"8192x256 E=8 weight_grad, runs of {splits_tokens} tokens: "
              f"{graph_us(lambda: router_gemm.router_weight_grad(g, x, torch.float32)):.1f} µs")
        router_gemm.router_weight_grad_split_tokens = original
    print("default runs at 8192x256 E=8:", tuning.router_weight_grad_split_tokens(8192, 8, 256, torch.device("cuda")))


new_router_gemm, new_route_backward = router_ops.router_gemm, router_ops.route_backward


def old_router_gemm(x, router_weight):
    with router_ops._autocast_off(x.device.type):
        if router_ops._tensor_core_router(x, router_weight):
            return torch.mm(x, router_weight.t(), out_dtype=torch.float32)
        return F.linear(x.float(), router_weight.float())


def old_route_backward(grad_routing_weights, grad_aux_loss, grad_router_logits, x, router_weight, router_logits,
                       expert_row_offsets, normalize_weights, load_balance_coef, z_loss_coef):
    tensor_cores = router_ops._tensor_core_router(x, router_weight)
    assert not tensor_cores
    grad_logits = router_ops.topk_softmax_backward(
        grad_routing_weights, grad_aux_loss, router_logits, expert_row_offsets, normalize_weights,
        load_balance_coef, z_loss_coef, grad_router_logits)
    with router_ops._autocast_off(x.device.type):
        return ((grad_logits @ router_weight.float()).to(x.dtype),
                (grad_logits.t() @ x.float()).to(router_weight.dtype))


def use(version):
    router_ops.router_gemm = old_router_gemm if version == "old" else new_router_gemm
    router_ops.route_backward = old_route_backward if version == "old" else new_route_backward


if "3" in sections:
    scale = b.SCALES["seed"]
    data = load_bytes(b.DATA)
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
    variants = []
    for mode in ("reduce-overhead", "eager"):
        variants += [(f"{mode}: dense", "dense", "new", mode)]
        for mlp in ("uniform", "variable"):
            variants += [(f"{mode}: {mlp}, {version}", f"triton_{mlp}", version, mode) for version in ("old", "new")]
    steps, grads = {}, {}
    for label, mlp, version, mode in variants:
        use(version)
        torch.manual_seed(0)
        model = b.build_model(scale, mlp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fwd = torch.compile(model, mode=mode) if mode != "eager" else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(*batches[0])
        loss.backward()
        grads[label] = {name: p.grad.clone() for name, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)

        def step(i, fwd=fwd, opt=opt, version=version):
            use(version)  # eager steps call the router functions each time; graphs replay what they captured
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = fwd(*batches[i % 8])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        for i in range(6):
            step(i)
        torch.cuda.synchronize()
        steps[label] = step
    use("new")
    for mode in ("reduce-overhead", "eager"):
        for mlp in ("uniform", "variable"):
            old, new = grads[f"{mode}: {mlp}, old"], grads[f"{mode}: {mlp}, new"]
            worst = max(old, key=lambda name: float((old[name] - new[name]).abs().max()))
            print(f"# {mode} {mlp}: first step's gradients old vs new: largest |diff| "
                  f"{float((old[worst] - new[worst]).abs().max()):.3e} in {worst}; router weights' largest |diff| "
                  + ", ".join(f"{float((old[n] - new[n]).abs().max() / old[n].abs().max()):.1e}"
                              for n in old if n.endswith("router.weight")) + " (relative to the largest)")
    times = {label: [] for label in steps}
    for r in range(rounds):
        for label, step in steps.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); step(r); e.record(); e.synchronize()
            times[label].append(s.elapsed_time(e))
    print(f"# {rounds} rounds, median ms per step (MoE tax vs dense of the same mode)")
    for label, ts in times.items():
        dense = statistics.median(times[label.split(":")[0] + ": dense"])
        med = statistics.median(ts)
        print(f"{label:32s} {med:.3f} ms  ({med / dense:.3f}x)  p25 {statistics.quantiles(ts, n=4)[0]:.3f} "
              f"p75 {statistics.quantiles(ts, n=4)[2]:.3f}")

if "4" in sections:
    import copy
    import triton_moe
    print("\n## 4. one layer's forward + backward under autocast (x fp32), CUDA graph, µs per replay (3 rounds)")
    print("| config | tokens | hidden | old router GEMMs | new |")
    print("|---|---:|---:|---:|---:|")
    for sizes, k, hidden, tokens in [("8x384", 2, 256, 8192), ("4x512,4x256", 2, 256, 8192), ("64x256", 8, 256, 4096),
                                     ("128x768", 8, 2048, 8192), ("32x1024,64x768,32x512", 8, 2048, 8192)]:
        cfg = triton_moe.MoEConfig(expert_sizes=sizes, num_active_experts=k, hidden_size=hidden)
        torch.manual_seed(0)
        layer = triton_moe.MoEMLP(cfg).cuda()
        x = torch.randn(tokens, hidden, device="cuda")
        replays = {}
        for version in ("old", "new"):
            use(version)
            copy_ = copy.deepcopy(layer)
            xx = x.clone().requires_grad_()

            def step(copy_=copy_, xx=xx):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = copy_(xx)
                (out.float().square().mean() + copy_.aux_loss).backward()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                step()
            replays[version] = (graph, step)
        use("new")
        times = {"old": [], "new": []}
        for _ in range(3):
            for version, (graph, _) in replays.items():
                for _ in range(5):
                    graph.replay()
                ts = []
                for _ in range(100):
                    a, b_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); graph.replay(); b_.record(); b_.synchronize(); ts.append(a.elapsed_time(b_) * 1000)
                times[version].append(statistics.median(ts))
        print(f"| {sizes} top-{k} | {tokens} | {hidden} | {' / '.join(f'{t:.1f}' for t in times['old'])} | "
              f"{' / '.join(f'{t:.1f}' for t in times['new'])} |")
