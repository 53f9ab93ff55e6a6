"""GPU test + benchmark of the Gluon gathered up projection (.carry/gluon/gather_up.py) on Hopper.

Run from the repo root (torch 2.11 + triton 3.6 on the H200):
    PYTHONPATH=$PWD:$PWD/.carry/site python .carry/gluon/gpu_test.py            # every part
    PYTHONPATH=$PWD:$PWD/.carry/site python .carry/gluon/gpu_test.py small_uniform bench_64x1024   # some parts
Each part runs in a child process with a timeout (a deadlocked kernel hangs its process: the parent reports
TIMEOUT and goes on), and every check inside a part is wrapped so that one failure does not hide the others.
Without a GPU it checks its imports and exits 0.
Parts: env, table, small_uniform, small_ragged, bench_64x1024, bench_128x768.
"""
import math
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
for p in (HERE, REPO, os.path.join(REPO, ".carry", "site")):
    if p not in sys.path:
        sys.path.insert(0, p)

PART_TIMEOUT_S = int(os.environ.get("GLUON_TEST_TIMEOUT", "240"))
PARTS = ["env", "table", "small_uniform", "small_ragged", "bench_64x1024", "bench_128x768"]


def log(*a):
    print(*a, flush=True)


def guarded(name, fn, *a, **k):
    """Run fn, print the error instead of raising. Returns fn's result or None."""
    try:
        return fn(*a, **k)
    except Exception as e:  # noqa: BLE001
        log(f"  [{name}] ERROR {type(e).__name__}: {str(e).strip()[:2000]}")
        traceback.print_exc(limit=6)
        return None


# ------------------------------------------------------------------------------------------------ imports
def imports():
    """torch, triton_moe's up_projection/ExpertLayout (imported before triton, as triton_moe requires), gather_up."""
    import torch
    repo = {}
    try:
        from triton_moe.kernels import ExpertLayout, up_projection  # must precede any other triton import
        repo = dict(ExpertLayout=ExpertLayout, up_projection=up_projection)
    except Exception as e:  # noqa: BLE001
        log(f"  [imports] triton_moe.kernels failed: {type(e).__name__}: {e}")
    import gather_up as gu
    return torch, repo, gu


# ------------------------------------------------------------------------------------------------ problems
def make_problem(torch, N, H, widths, top_k, balanced, seed=0, empty_expert=None, idx_dtype=None, dev="cuda"):
    """x, w1, row_to_token, row offsets, width offsets, routing weights (expert-sorted rows)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    E = len(widths)
    if balanced:
        # token t -> experts (base_t + j * E/top_k) % E, base a shuffled cycle over the experts: every expert gets
        # exactly N * top_k / E rows when E divides N (and the top_k experts of a token are distinct).
        assert E % top_k == 0
        base = (torch.arange(N, device=dev) % E)[torch.randperm(N, device=dev, generator=g)]
        experts = (base[:, None] + torch.arange(top_k, device=dev)[None, :] * (E // top_k)) % E
    else:
        scores = torch.rand((N, E), device=dev, generator=g)
        scores = scores * torch.linspace(0.2, 1.0, E, device=dev)[None, :]  # imbalanced on purpose
        if empty_expert is not None:
            scores[:, empty_expert] = -1.0
        experts = scores.topk(top_k, dim=1).indices
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    row_to_token = (order // top_k).to(idx_dtype or torch.int32)
    counts = torch.bincount(flat, minlength=E)
    row_offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    row_offsets[1:] = torch.cumsum(counts, 0)
    width_offsets = torch.zeros(E + 1, dtype=torch.int64, device=dev)
    width_offsets[1:] = torch.cumsum(torch.tensor(widths, device=dev), 0)
    x = (torch.randn((N, H), device=dev, generator=g) * 0.5).to(torch.bfloat16)
    w1 = (torch.randn((sum(widths), H), device=dev, generator=g) / math.sqrt(H)).to(torch.bfloat16)
    rw = torch.rand((N * top_k,), device=dev, generator=g).to(torch.float32) + 0.1
    return dict(x=x, w1=w1, row_to_token=row_to_token, row_offsets=row_offsets, width_offsets=width_offsets, rw=rw,
                widths=list(widths), counts=counts.cpu().tolist(), max_width=max(widths), R=N * top_k, H=H)


def reference(torch, P):
    """fp32 h_pre, h_act [R, max_width] (NaN where no value), per expert."""
    R, MW = P["R"], P["max_width"]
    h = torch.full((R, MW), float("nan"), dtype=torch.float32, device=P["x"].device)
    a = torch.full_like(h, float("nan"))
    ro = P["row_offsets"].cpu().tolist()
    wo = P["width_offsets"].cpu().tolist()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for e in range(len(P["widths"])):
            r0, r1, w0, w1_ = ro[e], ro[e + 1], wo[e], wo[e + 1]
            if r1 == r0:
                continue
            xs = P["x"][P["row_to_token"][r0:r1].long()].float()
            acc = xs @ P["w1"][w0:w1_].float().T
            h[r0:r1, :w1_ - w0] = acc
            relu = acc.clamp_min(0)
            a[r0:r1, :w1_ - w0] = relu * relu * P["rw"][r0:r1, None]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return h, a


def check(torch, name, P, out, ref):
    """rel L2 on the valid entries, and the masks: valid entries finite, the others still NaN (prefill)."""
    h_pre, h_act = out
    rh, ra = ref
    valid = ~torch.isnan(rh)
    ok = True
    for label, got, want in (("h_pre", h_pre, rh), ("h_act", h_act, ra)):
        g = got.float()
        gv, wv = g[valid], want[valid]
        finite = torch.isfinite(gv).all().item()
        rel = ((gv - wv).norm() / wv.norm().clamp_min(1e-30)).item()
        maxabs = (gv - wv).abs().max().item() if gv.numel() else 0.0
        untouched = torch.isnan(g[~valid]).all().item() if (~valid).any() else True
        good = finite and rel < 1e-2 and untouched
        ok &= good
        log(f"  {name} {label}: rel_l2={rel:.3e} max_abs={maxabs:.3e} finite={finite} "
            f"cols>=W_e untouched={untouched} (masked entries {(~valid).sum().item()}) -> {'OK' if good else 'FAIL'}")
        if not good and not finite:
            bad = (~torch.isfinite(g)) & valid
            rows = bad.any(1).nonzero().flatten()[:10].tolist()
            log(f"    first rows with non-finite valid entries: {rows}")
    return ok


def run_gluon(gu, P, torch, prefill_nan=True, **kw):
    out = None
    if prefill_nan:
        out = (torch.full((P["R"], P["max_width"]), float("nan"), dtype=torch.bfloat16, device="cuda"),
               torch.full((P["R"], P["max_width"]), float("nan"), dtype=torch.bfloat16, device="cuda"))
    res = gu.gluon_up(P["x"], P["w1"], P["row_to_token"], P["row_offsets"], P["width_offsets"], P["rw"],
                      P["max_width"], out=out, **kw)
    torch.cuda.synchronize()
    return res


def repo_layout(repo, P):
    return repo["ExpertLayout"](P["row_offsets"], P["width_offsets"], tuple(P["widths"]), P["R"])


def run_repo(repo, P):
    layout = repo_layout(repo, P)
    h_pre, _, h_act = repo["up_projection"](P["x"], P["w1"], None, P["row_to_token"], layout, "relu_squared",
                                            P["rw"])
    return h_pre, h_act


def bench(torch, fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def flops(P):
    mean_width = sum(c * w for c, w in zip(P["counts"], P["widths"])) / max(P["R"], 1)
    return 2.0 * P["R"] * P["H"] * mean_width


CONFIGS = {
    "default_128x256_s3": dict(),
    "128x256_s4": dict(NUM_STAGES=4),
    "128x256_s3_epiBlocked": dict(EPI_BLOCKED=True),
    "128x128_s4": dict(BN=128, NUM_STAGES=4),
    "128x128_s5": dict(BN=128, NUM_STAGES=5),
    "default_5_programs": dict(num_programs=5),  # many tiles per program: ring phases wrap across tiles
    "act_from_rounded": dict(ACT_FROM_ROUNDED=True),
}


# ------------------------------------------------------------------------------------------------ parts
def part_env():
    import torch
    import triton
    log(f"  torch {torch.__version__} triton {triton.__version__} cuda {torch.version.cuda}")
    log(f"  device {torch.cuda.get_device_name()} cc {torch.cuda.get_device_capability()} "
        f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}")
    torch_, repo, gu = imports()
    log(f"  triton_moe imported: {bool(repo)}; gather_up imported from {gu.__file__}")


def part_table():
    torch, repo, gu = imports()
    for widths, N, k, bal in (([256] * 16, 1024, 8, True), ([64, 128, 192, 256, 320, 64, 128, 512], 777, 2, False)):
        P = make_problem(torch, N, 256, widths, k, bal, empty_expert=None if bal else 3)
        for BM, BN in ((128, 256), (128, 128)):
            def one():
                tbl, nt, mx = gu.build_tile_table(P["row_offsets"], P["width_offsets"], P["R"], P["max_width"], BM, BN)
                rt, rn = gu.build_tile_table_torch(P["row_offsets"], P["width_offsets"], BM, BN)
                n = int(nt.item())
                same = n == int(rn.item()) and n <= mx and torch.equal(tbl[:n].cpu(), rt[:n].cpu())
                log(f"  table widths={widths[:3]}.. BM={BM} BN={BN}: num_tiles={n} (torch {int(rn.item())}) "
                    f"max_tiles={mx} -> {'OK' if same else 'FAIL'}")
            guarded(f"table {BM}x{BN}", one)


def _correctness(shape_name, P, configs):
    torch, repo, gu = imports()
    ref = guarded("reference", reference, torch, P)
    if ref is None:
        return
    log(f"  {shape_name}: R={P['R']} H={P['H']} widths={P['widths'][:8]}{'...' if len(P['widths']) > 8 else ''} "
        f"rows/expert min={min(P['counts'])} max={max(P['counts'])}")
    for cname in configs:
        kw = CONFIGS[cname]
        out = guarded(f"{shape_name} {cname}", run_gluon, gu, P, torch, **kw)
        if out is not None:
            guarded(f"{shape_name} {cname} check", check, torch, f"{shape_name} {cname}", P, out, ref)
    if repo:
        out = guarded("repo up_projection", run_repo, repo, P)
        if out is not None:
            # the repo zeroes columns past W_e and computes act from the rounded h_pre: compare valid entries only
            valid = ~torch.isnan(ref[0])
            for label, got, want in (("h_pre", out[0], ref[0]), ("h_act", out[1], ref[1])):
                gv, wv = got.float()[valid], want[valid]
                log(f"  {shape_name} repo up_projection {label}: rel_l2 vs fp32 ref = "
                    f"{((gv - wv).norm() / wv.norm()).item():.3e}")


def part_small_uniform():
    torch, _, _ = imports()
    P = make_problem(torch, 1024, 512, [256] * 16, 8, True)
    _correctness("small_uniform", P, list(CONFIGS))
    P64 = make_problem(torch, 1024, 512, [256] * 16, 8, True, idx_dtype=torch.int64)
    _correctness("small_uniform_int64_idx", P64, ["default_128x256_s3"])


def part_small_ragged():
    torch, _, _ = imports()
    # widths multiples of 64 (not of BN), uneven row counts, one expert with no rows
    P = make_problem(torch, 777, 256, [64, 128, 192, 256, 320, 64, 128, 512], 2, False, empty_expert=3)
    _correctness("small_ragged", P, list(CONFIGS))


def _bench_shape(name, E, W):
    torch, repo, gu = imports()
    P = make_problem(torch, 16384, 2048, [W] * E, 8, True)
    F = flops(P)
    log(f"  {name}: N=16384 top-8 R={P['R']} H=2048 E={E} W={W}, {F / 1e12:.3f} TFLOP per call")
    _correctness(name, P, ["default_128x256_s3"])
    results = {}
    for cname in ("default_128x256_s3", "128x256_s4", "128x256_s3_epiBlocked", "128x128_s4", "128x128_s5"):
        kw = dict(CONFIGS[cname])

        def timed():
            cfg = {k: v for k, v in kw.items() if k != "num_programs"}
            tbl = gu.build_tile_table(P["row_offsets"], P["width_offsets"], P["R"], P["max_width"],
                                      cfg.get("BM", 128), cfg.get("BN", gu.DEFAULT_CONFIG["BN"]))
            out = (torch.empty((P["R"], P["max_width"]), dtype=torch.bfloat16, device="cuda"),
                   torch.empty((P["R"], P["max_width"]), dtype=torch.bfloat16, device="cuda"))
            args = (P["x"], P["w1"], P["row_to_token"], P["row_offsets"], P["width_offsets"], P["rw"], P["max_width"])
            t_kernel = bench(torch, lambda: gu.gluon_up(*args, out=out, tile_table=tbl, **cfg))
            t_call = bench(torch, lambda: gu.gluon_up(*args, **cfg))
            return t_kernel, t_call
        t = guarded(f"{name} time {cname}", timed)
        if t:
            results[cname] = t
            log(f"  {name} gluon {cname:24s}: kernel {t[0]:.3f} ms = {F / t[0] / 1e9:.1f} TFLOP/s | "
                f"with table+alloc {t[1]:.3f} ms = {F / t[1] / 1e9:.1f} TFLOP/s")
    if repo:
        def timed_repo():
            layout = repo_layout(repo, P)
            return bench(torch, lambda: repo["up_projection"](P["x"], P["w1"], None, P["row_to_token"], layout,
                                                               "relu_squared", P["rw"]))
        t = guarded(f"{name} time repo", timed_repo)
        if t:
            log(f"  {name} repo up_projection (portable, relu_squared + rw): {t:.3f} ms = {F / t / 1e9:.1f} TFLOP/s")

        def timed_repo_sorted_x():
            layout = repo_layout(repo, P)
            sx = torch.empty((P["R"], P["H"]), dtype=torch.bfloat16, device="cuda")
            return bench(torch, lambda: repo["up_projection"](P["x"], P["w1"], None, P["row_to_token"], layout,
                                                               "relu_squared", P["rw"], sorted_x=sx))
        t = guarded(f"{name} time repo +sorted_x", timed_repo_sorted_x)
        if t:
            log(f"  {name} repo up_projection with sorted_x copy: {t:.3f} ms = {F / t / 1e9:.1f} TFLOP/s")

    def timed_dense():
        # an upper-bound reference: one dense bf16 GEMM of the same FLOPs (no gather, no epilogue)
        a = torch.randn((P["R"], P["H"]), dtype=torch.bfloat16, device="cuda")
        b = torch.randn((W, P["H"]), dtype=torch.bfloat16, device="cuda")
        return bench(torch, lambda: a @ b.T)
    t = guarded(f"{name} time cublas dense", timed_dense)
    if t:
        log(f"  {name} cuBLAS dense [R,H]x[H,W] (upper bound): {t:.3f} ms = {F / t / 1e9:.1f} TFLOP/s")


def part_bench_64x1024():
    _bench_shape("bench_64x1024", 64, 1024)


def part_bench_128x768():
    _bench_shape("bench_128x768", 128, 768)


# ------------------------------------------------------------------------------------------------ driver
def child(part):
    log(f"== part {part}")
    fn = globals()[f"part_{part}"]
    guarded(part, fn)


def main(argv):
    if len(argv) >= 2 and argv[0] == "--child":
        child(argv[1])
        return 0
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001
        log(f"torch import failed: {e}")
        has_gpu = False
    if not has_gpu:
        log("no CUDA device: checking imports only")
        guarded("imports", imports)
        return 0
    parts = argv or PARTS
    summary = []
    for part in parts:
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", part], timeout=PART_TIMEOUT_S)
            status = f"rc={r.returncode}"
        except subprocess.TimeoutExpired:
            status = f"TIMEOUT after {PART_TIMEOUT_S}s (deadlock?)"
            log(f"== part {part}: {status}")
        summary.append(f"{part}: {status} ({time.time() - t0:.0f}s)")
    log("== summary")
    for s in summary:
        log("  " + s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
