"""The benchmark harness shared by bench_forward.py, bench_fwd_bwd.py and bench_moe.py.

Configs, the implementations under test, timing (CUDA events, warm-up, median of repeats), model FLOPs, the
measured dense bf16 peak, peak memory, and the markdown table + JSON every benchmark writes. No asserts on
timings: a benchmark reports, it does not judge.
"""

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import triton_moe
from baselines import GroupedMMMoE, LoopMoE, megablocks_dmoe, scattermoe_moe
from triton_moe import kernels, reference
from triton_moe.config import MoEConfig
from triton_moe.router_ops import fused_sort_by_expert
from triton_moe.routing import route, sort_by_expert
from triton_moe.testing.shapes import REALISTIC_CONFIGS, SEED_CONFIGS

SEED_TOKENS = 8 * 512  # the seed table's batch 8 x seq 512
REALISTIC_TOKENS = 16384

# name -> (MoEConfig kwargs, tokens)
CONFIGS = {name: (kwargs, SEED_TOKENS) for name, kwargs in SEED_CONFIGS.items()}
CONFIGS.update({name: (kwargs, REALISTIC_TOKENS) for name, kwargs in REALISTIC_CONFIGS.items()})
SEED_NAMES = list(SEED_CONFIGS)
REALISTIC_NAMES = [name for name in CONFIGS if name not in SEED_CONFIGS]

IMPLEMENTATIONS = {
    "triton": triton_moe.MoEMLP,
    "stk_reference": reference.MoEMLP,
    "grouped_mm": GroupedMMMoE,
    "torch_loop": LoopMoE,
    "megablocks": None,  # built by OPTIONAL_BASELINES where it imports
    "scattermoe": None,  # built by OPTIONAL_BASELINES where the scattermoe package is on the Python path
}
# the baselines that may not build here: (config, device, dtype) -> (layer, None) or (None, why it is skipped)
OPTIONAL_BASELINES = {
    "megablocks": megablocks_dmoe,
    "scattermoe": lambda config, dev, dtype: scattermoe_moe(config),
}
# speedup column -> the implementation it compares every row with: that one's ms / the row's ms, per config
SPEEDUP_BASELINES = {"speedup_vs_reference": "stk_reference", "speedup_vs_scattermoe": "scattermoe"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(description, extra=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--configs", nargs="+", default=SEED_NAMES + REALISTIC_NAMES,
                        help=f"config names or 'seed' / 'realistic' (default: all): {', '.join(CONFIGS)}")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--activation", default="relu_squared", choices=["relu_squared", "swiglu", "gelu"])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=None, help="override every config's token count")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--back-to-back", action="store_true",
                        help="also time every implementation over --repeats calls back to back (no sync between)")
    parser.add_argument("--clocks", action="store_true",
                        help="on a GPU, sample its SM clock and power draw (nvidia-smi) while timing; report them")
    parser.add_argument("--out", default=None, help="JSON path (default: runs/<benchmark>.json)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    names = []
    for name in args.configs:
        names += {"seed": SEED_NAMES, "realistic": REALISTIC_NAMES}.get(name, [name])
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    args.configs = names
    return args


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def call_ms(fn) -> float:
    """Wall time of one fn() in ms: CUDA events on a GPU (the device's work finished), perf_counter on the CPU."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_ms(fn, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in ms (call_ms)."""
    for _ in range(warmup):
        fn()
    return statistics.median(call_ms(fn) for _ in range(repeats))


def round_robin_ms(steps: dict, rounds: int) -> dict:
    """{label: [ms of each call]} of steps[label](index) for index in range(rounds), the labels taken in turn in
    each round: a drift of the host's pace during the run then falls on every label alike, which comparisons of
    host-bound steps (A against B, MoE against dense) need."""
    times = {label: [] for label in steps}
    for index in range(rounds):
        for label, step in steps.items():
            times[label].append(call_ms(lambda: step(index)))
    return times


def print_round_robin(times: dict, baseline: str) -> None:
    """Per label of round_robin_ms's times: the median ms, its ratio to the baseline label's median, the quartiles."""
    reference = statistics.median(times[baseline])
    for label, label_times in times.items():
        median = statistics.median(label_times)
        quartiles = statistics.quantiles(label_times, n=4)
        print(f"{label:14s} {median:.3f} ms  ({median / reference:.3f}x)  p25 {quartiles[0]:.3f} "
              f"p75 {quartiles[2]:.3f}")


def back_to_back_ms(fn, warmup: int, repeats: int) -> float:
    """Mean time of fn() in ms over `repeats` calls run back to back, as a training loop runs them: the host queues
    the next call while the device runs the last, so this is the larger of the host's and the device's time."""
    for _ in range(warmup):
        fn()
    synchronize()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - begin) * 1e3 / repeats


class ClockSampler:
    """The GPU's SM clock and power draw, sampled by nvidia-smi every `period_ms` while the sampler is open, then
    summarised over the wall-time windows the benchmark marked (`window`). A sustained large problem can meet the
    board's power limit: the clock then falls, and back-to-back time rises with it."""

    QUERY = "timestamp,clocks.sm,power.draw"

    def __init__(self, period_ms: int = 20):
        self.period_ms = period_ms
        self.samples = []  # (seconds since the epoch, SM MHz, W), read when the sampler closes

    @staticmethod
    def gpu_id() -> str:
        """nvidia-smi's name for torch's current device: its UUID, which does not depend on how either orders GPUs."""
        return f"GPU-{torch.cuda.get_device_properties(torch.cuda.current_device()).uuid}"

    def __enter__(self):
        self._log = tempfile.TemporaryFile("w+")
        self._process = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", f"-lms={self.period_ms}",
             f"--id={self.gpu_id()}"], stdout=self._log, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        self._process.terminate()
        self._process.wait()
        self._log.seek(0)
        self.samples = parse_clock_log(self._log.read().splitlines())
        self._log.close()

    @staticmethod
    def window(fn, *args):
        """fn(*args)'s result and the wall-time window (start, end) of the call, in seconds since the epoch."""
        start = time.time()
        result = fn(*args)
        return result, (start, time.time())


def parse_clock_log(lines) -> list[tuple[float, float, float]]:
    """(seconds since the epoch, SM MHz, W) of each well-formed line of nvidia-smi's
    `--query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader,nounits` output (local time stamps)."""
    samples = []
    for line in lines:
        fields = [field.strip() for field in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((stamp, float(fields[1]), float(fields[2])))
        except (IndexError, ValueError):
            continue
    return samples


def clock_summary(samples, window) -> dict | None:
    """The samples inside `window` (start, end): their number, the SM clock's median and minimum (MHz) and the
    largest power draw (W); None where none fell inside."""
    start, end = window
    inside = [sample for sample in samples if start <= sample[0] <= end]
    if not inside:
        return None
    clocks = [sample[1] for sample in inside]
    return dict(samples=len(inside), sm_mhz_median=statistics.median(clocks), sm_mhz_min=min(clocks),
                watts_max=max(sample[2] for sample in inside))


def dense_peak_tflops(dtype) -> float | None:
    """Measured dense GEMM rate of this device (8192^3 torch.matmul), the '% of peak' denominator."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b, warmup=5, repeats=20)
    return 2 * 8192 ** 3 / ms / 1e9


def make_config(name, activation) -> tuple[MoEConfig, int]:
    kwargs, tokens = CONFIGS[name]
    return MoEConfig(**kwargs, activation=activation), tokens


def build_layer(impl, config, dtype):
    """(layer, None), or (None, why this implementation is skipped for this config)."""
    dev = device()
    if impl in OPTIONAL_BASELINES:
        layer, reason = OPTIONAL_BASELINES[impl](config, dev, dtype)
        return (layer.to(dev, dtype), None) if layer is not None else (None, reason)
    cls = IMPLEMENTATIONS[impl]
    if impl == "grouped_mm" and (dev != "cuda" or not hasattr(torch, "_grouped_mm")):
        return None, "torch._grouped_mm needs a CUDA build of torch that has it"
    try:
        layer = cls(config)
    except ValueError as error:  # e.g. the stk reference's block alignment
        return None, str(error)
    return layer.to(dev, dtype), None


def model_flops(config: MoEConfig, x: torch.Tensor, router_weight: torch.Tensor) -> int:
    """Forward FLOPs of the expert GEMMs for this batch's routing: Σ_e count_e * W_e * H * 2 per projection."""
    with torch.no_grad():
        sort = sort_by_expert(route(x, router_weight, config).expert_indices, config.num_experts)
    widths = torch.tensor(config.expert_widths, device=x.device)
    routed_width = int((sort.tokens_per_expert * widths).sum())
    projections = 3 if config.is_gated else 2
    return 2 * projections * routed_width * config.hidden_size


def triton_operands(layer, x) -> SimpleNamespace:
    """Every operand of every kernel of one Triton forward and backward on x, for timing kernels one by one:
    routing, sort, layout, routed_width (Σ_e count_e * W_e), routing_weights ([N*k], read through sort.row_to_flat),
    the weights, h_pre/h_up/h_act
    (weighted), sorted_x, y_rows, grad_out, sorted_grad_out, dh_pre/dh_up, dx_rows, and dw1_rows / dw2_rows, the token
    rows each weight gradient reads: (the sorted copy, None) or (x or grad_out, row_to_token), as the layer does.
    (sorted_x and sorted_grad_out are None where the layer keeps no copy: tuning.sorted_rows_pay_off.)"""
    cfg = layer.config
    ops = SimpleNamespace(cfg=cfg, x=x, w1=layer.w1.detach(), w2=layer.w2.detach(),
                          v1=None if layer.v1 is None else layer.v1.detach())
    ops.routing = layer._route(x)
    ops.sort = fused_sort_by_expert(ops.routing.expert_indices, cfg.num_experts, ops.routing.sort_tables)
    num_rows = ops.sort.row_to_token.shape[0]
    ops.layout = kernels.ExpertLayout(ops.sort.expert_row_offsets, layer.expert_width_offsets, cfg.expert_widths,
                                      num_rows)
    ops.routed_width = int((ops.sort.tokens_per_expert.cpu() * torch.tensor(cfg.expert_widths)).sum())
    ops.routing_weights = ops.routing.routing_weights.detach().flatten()  # [N*k]
    keep_sorted_x = cfg.keep_sorted_x and kernels.sorted_rows_pay_off(x, num_rows)
    ops.sorted_x = x.new_empty(num_rows, x.shape[1]) if keep_sorted_x else None  # [R, H]
    ops.dw1_rows = (x, ops.sort.row_to_token) if ops.sorted_x is None else (ops.sorted_x, None)
    ops.h_pre, ops.h_up, ops.h_act = kernels.up_projection(
        x, ops.w1, ops.v1, ops.sort.row_to_token, ops.layout, cfg.activation, ops.routing_weights,
        routing_weight_index=ops.sort.row_to_flat, sorted_x=ops.sorted_x)
    ops.y_rows = kernels.down_projection(ops.h_act, ops.w2, ops.layout)
    ops.grad_out = torch.randn_like(x)
    ops.sorted_grad_out = x.new_empty(num_rows, x.shape[1]) if kernels.sorted_rows_pay_off(x, num_rows) else None
    ops.dw2_rows = (ops.grad_out, ops.sort.row_to_token) if ops.sorted_grad_out is None else (ops.sorted_grad_out, None)
    ops.dh_pre, ops.dh_up, _ = kernels.down_projection_backward(
        ops.grad_out, ops.w2, ops.h_pre, ops.h_up, ops.sort.row_to_token, ops.layout, ops.routing_weights,
        cfg.activation, routing_weight_index=ops.sort.row_to_flat, sorted_grad_out=ops.sorted_grad_out)
    ops.dx_rows = kernels.input_grad_rows(ops.dh_pre, ops.w1, ops.dh_up, ops.v1, ops.layout)
    return ops


def peak_memory_mb(fn) -> float | None:
    """Peak memory allocated while fn() runs, above what was allocated before (activations, workspaces)."""
    if not torch.cuda.is_available():
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def environment() -> dict:
    env = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, python=platform.python_version(),
               command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    import triton
    env["triton"] = triton.__version__
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    env["source"] = source_digest(Path(triton_moe.__file__).parent)
    return env


def source_digest(package: Path) -> str:
    """The code that ran, where no commit says it (a copy of a working tree): the first 12 hex digits of the
    sha256 of the package's .py files, their paths and contents, in path order. For a commit's package:
    `git archive <commit> triton_moe | tar -x -C <dir>`, then source_digest(<dir>/triton_moe)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def time_every_config(args, make_step, flops_multiplier, triton_variants, peak) -> tuple[list, list]:
    """The rows (one per config x implementation, timed) and the skipped (config, implementation, why) of
    run_benchmark; each row holds the wall-time windows of its timings under "clock_windows"."""
    dtype, dev = DTYPES[args.dtype], device()
    rows, skipped = [], []
    for name in args.configs:
        config, tokens = make_config(name, args.activation)
        tokens = args.tokens or tokens
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, config.hidden_size, generator=generator).to(dev, dtype)
        for impl in args.impls:
            torch.manual_seed(0)
            layer, reason = build_layer(impl, config, dtype)
            if layer is None:
                skipped.append((name, impl, reason))
                continue
            step = make_step(layer, x)
            # A baseline that cannot run this shape, or whose kernels fail to compile with this Triton, is reported
            # as skipped; for the Triton layer only runtime errors (out of memory) are, so that its bugs stop the run.
            failures = (RuntimeError, NotImplementedError) if impl == "triton" else Exception
            try:
                ms, one_call_window = ClockSampler.window(time_ms, step, args.warmup, args.repeats)
                memory = peak_memory_mb(step)
                back_to_back, queued_window = (ClockSampler.window(back_to_back_ms, step, args.warmup, args.repeats)
                                               if args.back_to_back else (None, None))
                clock_windows = {"one call": one_call_window}
                if queued_window is not None:
                    clock_windows["back to back"] = queued_window
            except failures as error:
                skipped.append((name, impl, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"))
                continue
            router_weight = layer.router.weight if hasattr(layer, "router") else None
            flops = flops_multiplier * model_flops(config, x, router_weight) if router_weight is not None else None
            tflops = flops / ms / 1e9 if flops else None
            variant_ms = {}
            for label, make_variant_step in (triton_variants or {}).items():
                if impl != "triton" or dev != "cuda":
                    continue
                try:
                    variant_ms[label] = time_ms(make_variant_step(layer, x), args.warmup, args.repeats)
                except Exception as error:  # a compilation or capture that fails: say why, keep the eager figures
                    why = (str(error).splitlines() or [""])[0][:160]
                    skipped.append((name, f"triton ({label})", f"{type(error).__name__}: {why}"))
            rows.append(dict(config=name, impl=impl, tokens=tokens, ms=ms, back_to_back_ms=back_to_back, tflops=tflops,
                             pct_peak=100 * tflops / peak if tflops and peak else None, peak_memory_mb=memory,
                             variant_ms=variant_ms,
                             clock_windows=clock_windows))
            del layer, step
            if dev == "cuda":
                torch.cuda.empty_cache()
        ms_of_impl = {row["impl"]: row["ms"] for row in rows if row["config"] == name}
        for row in rows:
            if row["config"] == name:
                for column, baseline in SPEEDUP_BASELINES.items():
                    row[column] = ms_of_impl[baseline] / row["ms"] if baseline in ms_of_impl else None
    return rows, skipped


def run_benchmark(args, benchmark_name, make_step, flops_multiplier, triton_variants=None):
    """Time `make_step(layer, x)()` for every config x implementation; print a markdown table, write JSON.

    flops_multiplier: 1 for forward only, 3 for forward + backward (two GEMMs of the backward per forward one).
    triton_variants: {column label: make_step}, other ways of running the Triton layer (torch.compile, a CUDA
        graph), each timed on a GPU in a column of its own.
    """
    dtype = DTYPES[args.dtype]
    dev = device()
    env = environment()
    peak = dense_peak_tflops(dtype)
    env["dense_peak_tflops"] = peak
    print(f"# {benchmark_name}: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print(f"# command: {env['command']}; triton_moe source {env['source']}")
    if peak:
        print(f"# measured dense {args.dtype} GEMM peak (8192^3 torch.matmul): {peak:.0f} TFLOP/s")
    sampler = ClockSampler() if args.clocks and dev == "cuda" else None
    with sampler or contextlib.nullcontext():
        rows, skipped = time_every_config(args, make_step, flops_multiplier, triton_variants, peak)
    for row in rows:
        windows = row.pop("clock_windows")
        if sampler is not None:
            row["clocks"] = {timing: clock_summary(sampler.samples, window) for timing, window in windows.items()}
    print_table(rows, list(triton_variants or {}))
    if sampler is not None:
        print_clock_table(rows)
    for name, impl, reason in skipped:
        print(f"skipped {impl} on {name}: {reason}")
    out = Path(args.out or f"runs/{benchmark_name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(environment=env, args=vars(args), results=rows,
                                   skipped=[dict(config=c, impl=i, reason=r) for c, i, r in skipped]), indent=2))
    plot_results(rows, out.with_suffix(".png"), f"{benchmark_name}: {env['device']}, {args.dtype}, {env['date']}",
                 "forward" if flops_multiplier == 1 else "forward + backward")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot_results(rows, path: Path, title: str, step: str) -> None:
    """ms per call of each implementation, one panel per config (their times differ by an order of magnitude),
    with the Triton layer's variants (a CUDA graph, torch.compile) and back-to-back times as bars of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(row["config"] for row in rows))
    if not configs:
        return
    fig, axes = plt.subplots(len(configs), 1, figsize=(8, 0.4 + 1.9 * len(configs)), squeeze=False)
    for axis, name in zip(axes[:, 0], configs):
        bars = []  # (label, ms)
        for row in (row for row in rows if row["config"] == name):
            bars.append((row["impl"], row["ms"]))
            if row["back_to_back_ms"] is not None:
                bars.append((f"{row['impl']}, back to back", row["back_to_back_ms"]))
            bars += [(f"{row['impl']}, {label}", ms) for label, ms in row["variant_ms"].items()]
        labels, values = zip(*bars)
        colors = ["tab:blue" if label.startswith("triton") else "tab:gray" for label in labels]
        positions = range(len(bars))[::-1]  # the first bar on top
        axis.barh(positions, values, color=colors)
        axis.set_yticks(positions, labels, fontsize=8)
        for position, value in zip(positions, values):
            axis.text(value, position, f" {value:.2f}", va="center", fontsize=8)
        axis.set_xlim(0, 1.15 * max(values))
        axis.set_title(name, fontsize=9)
        axis.set_xlabel(f"ms per {step}" if axis is axes[-1, 0] else "", fontsize=8)
        axis.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows, variant_labels):
    """The markdown table of `rows`; the back-to-back and vs-ScatterMoE columns only where some row has a value."""
    back_to_back = any(row["back_to_back_ms"] is not None for row in rows)
    vs_scattermoe = any(row.get("speedup_vs_scattermoe") is not None for row in rows)
    print("| config | impl | tokens | ms |" + (" back to back ms |" if back_to_back else "")
          + " speedup vs stk |" + (" speedup vs scattermoe |" if vs_scattermoe else "")
          + " TFLOP/s | % of dense peak | peak mem (MiB) |"
          + "".join(f" {label} ms |" for label in variant_labels))
    print("|---|---|---:|---:|" + ("---:|" if back_to_back else "") + "---:|" + ("---:|" if vs_scattermoe else "")
          + "---:|---:|---:|" + "---:|" * len(variant_labels))
    for row in rows:
        print(f"| {row['config']} | {row['impl']} | {row['tokens']} | {row['ms']:.3f} | "
              + (f"{_fmt(row['back_to_back_ms'], '.3f')} | " if back_to_back else "")
              + f"{_fmt(row.get('speedup_vs_reference'), '.2f')} | "
              + (f"{_fmt(row.get('speedup_vs_scattermoe'), '.2f')} | " if vs_scattermoe else "")
              + f"{_fmt(row['tflops'], '.1f')} | {_fmt(row['pct_peak'], '.1f')} | "
              f"{_fmt(row['peak_memory_mb'], '.0f')} |"
              + "".join(f" {_fmt(row['variant_ms'].get(label), '.3f')} |" for label in variant_labels))


def print_clock_table(rows):
    """The SM clock (median, minimum) and the largest power draw nvidia-smi sampled during each row's timings."""
    print("\n| config | impl | timing | samples | SM MHz median | SM MHz min | W max |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        for timing, summary in row["clocks"].items():
            if summary is None:
                print(f"| {row['config']} | {row['impl']} | {timing} | 0 | - | - | - |")
                continue
            print(f"| {row['config']} | {row['impl']} | {timing} | {summary['samples']} | "
                  f"{summary['sm_mhz_median']:.0f} | {summary['sm_mhz_min']:.0f} | {summary['watts_max']:.0f} |")


def forward_step(layer, x):
    def step():
        with torch.no_grad():
            layer(x)
    return step


def forward_backward_step(layer, x):
    x = x.detach().requires_grad_()
    grad_out = torch.randn_like(x)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)
    return step


def compiled_forward_backward_step(layer, x):
    """forward_backward_step of torch.compile(layer, mode="reduce-overhead"): Inductor around the layer's custom
    ops, and the forward and backward replayed from CUDA graphs, which takes the launch overhead away."""
    return forward_backward_step(torch.compile(layer, mode="reduce-overhead", fullgraph=True), x)


def graphed_forward_backward_step(layer, x):
    """forward_backward_step captured once in a CUDA graph and replayed: the device time of the layer with no
    host work at all (the upper bound of what any launch-overhead reduction can give)."""
    # A copy: the layer's parameters went through backward on the default stream, and their gradient accumulators
    # would wait on it from inside the capture, which invalidates it. The copy's are made on the capture stream.
    step = forward_backward_step(copy.deepcopy(layer), x)
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):
        for _ in range(3):  # as capture requires: the kernels compiled and the caching allocator warm
            step()
    torch.cuda.current_stream().wait_stream(capture_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture_stream):
        step()

    def replay(step=step):  # step holds the copy's parameters and the inputs, which the graph reads but does not own
        graph.replay()
    return replay


def kernel_launches(step) -> tuple[list[tuple[str, int, float]], float]:
    """The device work of one step() after a warm-up call: ([(kernel, launches, device µs)], device µs in all).

    Counts every CUDA kernel, memset and memcpy the profiler sees, i.e. every launch on the device.
    """
    step()
    synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        step()
        synchronize()
    kernels = {}
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count, micros = kernels.get(event.name, (0, 0.0))
            kernels[event.name] = (count + 1, micros + event.time_range.elapsed_us())
    table = sorted(((name, count, micros) for name, (count, micros) in kernels.items()), key=lambda row: -row[2])
    return table, sum(micros for _, _, micros in table)


if os.environ.get("TRITON_INTERPRET") == "1":
    print("# note: no GPU, kernels run through Triton's CPU interpreter; timings are not meaningful",
          file=sys.stderr)
