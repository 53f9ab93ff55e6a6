"""Router logits [N, E] = x [N, H] W^T in fp32: cuBLAS against Triton variants (ieee FMA dot, tf32x3 tensor-core
dot, a broadcast-multiply-sum on the CUDA cores). µs per call from a CUDA graph of 20; error vs fp64 / largest."""
import statistics
import torch, triton, triton.language as tl
import torch.nn.functional as F

@triton.jit
def dot_kernel(x_ptr, w_ptr, out_ptr, N, E, H, TT: tl.constexpr, TE: tl.constexpr, TK: tl.constexpr,
               PREC: tl.constexpr):
    ts = tl.program_id(0) * TT + tl.arange(0, TT)
    es = tl.program_id(1) * TE + tl.arange(0, TE)
    acc = tl.zeros((TT, TE), tl.float32)
    for k0 in range(0, H, TK):
        ks = k0 + tl.arange(0, TK)
        a = tl.load(x_ptr + ts.to(tl.int64)[:, None] * H + ks[None, :], mask=(ts < N)[:, None] & (ks < H)[None, :], other=0.)
        b = tl.load(w_ptr + es[None, :] * H + ks[:, None], mask=(es < E)[None, :] & (ks < H)[:, None], other=0.)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(out_ptr + ts.to(tl.int64)[:, None] * E + es[None, :], acc, mask=(ts < N)[:, None] & (es < E)[None, :])

@triton.jit
def bcast_kernel(x_ptr, w_ptr, out_ptr, N, E, H, TT: tl.constexpr, TE: tl.constexpr, TK: tl.constexpr):
    ts = tl.program_id(0) * TT + tl.arange(0, TT)
    es = tl.program_id(1) * TE + tl.arange(0, TE)
    acc = tl.zeros((TT, TE), tl.float32)
    for k0 in range(0, H, TK):
        ks = k0 + tl.arange(0, TK)
        a = tl.load(x_ptr + ts.to(tl.int64)[:, None] * H + ks[None, :], mask=(ts < N)[:, None] & (ks < H)[None, :], other=0.)
        b = tl.load(w_ptr + es[:, None] * H + ks[None, :], mask=(es < E)[:, None] & (ks < H)[None, :], other=0.)
        acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    tl.store(out_ptr + ts.to(tl.int64)[:, None] * E + es[None, :], acc, mask=(ts < N)[:, None] & (es < E)[None, :])

def graph_us(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(15):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1000 / reps)
    return statistics.median(ts)

for n, h, e in [(8192, 256, 8), (8192, 256, 64), (4096, 256, 128), (8192, 2048, 128)]:
    x = torch.randn(n, h, device="cuda"); w = torch.randn(e, h, device="cuda") * h**-0.5
    exact = x.double() @ w.double().T
    err = lambda got: float((got.double() - exact).abs().max() / exact.abs().max())
    out = torch.empty(n, e, device="cuda")
    rows = [f"cuBLAS {graph_us(lambda: F.linear(x, w)):.1f} ({err(F.linear(x, w)):.1e})"]
    ep = max(16, triton.next_power_of_2(e))
    for kind, tt, te, tk, warps in [("ieee", 64, min(ep, 64), 32, 4), ("tf32x3", 64, min(ep, 64), 32, 4),
                                     ("tf32x3", 128, min(ep, 64), 32, 4), ("tf32x3", 64, min(ep, 128), 64, 4),
                                     ("tf32x3", 128, min(ep, 128), 32, 8),
                                     ("bcast", 32, min(ep, 16), 8, 4), ("bcast", 64, min(ep, 16), 8, 4),
                                     ("bcast", 32, min(ep, 16), 16, 4), ("bcast", 16, min(ep, 32), 8, 4)]:
        grid = (triton.cdiv(n, tt), triton.cdiv(e, te))
        if kind == "bcast":
            fn = lambda: bcast_kernel[grid](x, w, out, n, e, h, TT=tt, TE=te, TK=tk, num_warps=warps)
        else:
            fn = lambda: dot_kernel[grid](x, w, out, n, e, h, TT=tt, TE=te, TK=tk, PREC=kind, num_warps=warps)
        try:
            us = graph_us(fn); fn(); rows.append(f"{kind} {tt}x{te}x{tk}/{warps}w {us:.1f} ({err(out):.1e})")
        except Exception as ex:
            rows.append(f"{kind} {tt}x{te}x{tk}: {type(ex).__name__} {str(ex)[:80]}")
    print(f"## {n}x{h} E={e}\n  " + "\n  ".join(rows))
