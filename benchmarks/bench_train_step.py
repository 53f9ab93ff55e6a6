"""The whole training step of a nanoGPT-style GPT (forward, backward, fused AdamW) with each MLP, in eager mode,
in eager mode with the MoE layers replayed from CUDA graphs (triton_moe.enable_cuda_graphs; the Triton layer only),
under torch.compile and under torch.compile(mode="reduce-overhead") (CUDA graphs).

    uv run python benchmarks/bench_train_step.py                        # both scales, every MLP and mode
    uv run python benchmarks/bench_train_step.py --scales seed --mlps dense triton_uniform --modes eager

MLPs in every block of the GPT (triton_moe/testing/gpt.py): a dense MLP of the MoE layers' active width (top-k times the
mean expert width), the Triton layer with uniform and with variable widths of the same mean, the stk reference and
the torch._grouped_mm layer, both on the variable widths. Reports the median ms per step (CUDA events around the
whole step, the host time the GPU waits on included), tokens/s, the peak memory allocated during the timed steps
(weights and optimizer state included), the time of the first steps (compilation) and the MoE tax: a step's time
over the dense MLP's in the same mode. bf16 autocast with fp32 weights, as nanoGPT trains. A row whose warm-up or
timing fails, or runs past --row-timeout seconds, is reported as skipped with the reason.
"""

import argparse
import contextlib
import json
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from triton_moe import reference
import triton_moe
from baselines import GroupedMMMoE
from triton_moe.testing.gpt import GPT, GPTConfig, dense_mlp, get_batch, load_bytes
from harness import call_ms, environment
from triton_moe import MoEConfig

DATA = Path(__file__).resolve().parent.parent / "data" / "classics.txt"


@dataclass(frozen=True)
class Scale:
    """A GPT shape and the MoE layers of its blocks: uniform and variable widths of one mean, so that the two have
    the same active FLOPs per token when the routing is balanced."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    top_k: int
    uniform: list
    variable: list

    @property
    def active_width(self) -> int:
        experts = sum(count for count, _ in self.uniform)
        return self.top_k * sum(count * width for count, width in self.uniform) // experts


SCALES = {
    # nanoGPT-sized: the step is bound by host time
    "seed": Scale(n_layer=4, n_head=4, n_embd=256, block_size=512, batch_size=16, top_k=2,
                  uniform=[(8, 384)], variable=[(4, 512), (4, 256)]),
    # hidden 2048: the GEMMs dominate
    "h2048": Scale(n_layer=2, n_head=16, n_embd=2048, block_size=512, batch_size=16, top_k=8,
                   uniform=[(128, 768)], variable=[(32, 1024), (64, 768), (32, 512)]),
}
MLPS = ("dense", "triton_uniform", "triton_variable", "stk_reference", "grouped_mm")
MODES = ("eager", "eager-graphs", "compile", "reduce-overhead")
# What "eager-graphs" runs: the MLPs enable_cuda_graphs graphs, and dense as in eager, the baseline of the MoE tax
TRITON_MLPS = ("triton_uniform", "triton_variable")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    parser.add_argument("--mlps", nargs="+", default=list(MLPS), choices=MLPS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, graph recording)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--row-timeout", type=int, default=240, help="seconds one row may take, warm-up included")
    parser.add_argument("--calling-thread-backward", action="store_true",
                        help="run the backward in the calling thread instead of autograd's device thread "
                             "(torch.autograd.set_multithreading_enabled(False)), as bench_fwd_bwd.py can")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_train_step.json"))
    args = parser.parse_args()
    for name in ("warmup", "steps", "row_timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not torch.cuda.is_available():
        parser.error("bench_train_step.py times CUDA training steps: it needs a GPU")
    return args


def build_model(scale: Scale, mlp: str) -> GPT:
    expert_sizes = scale.uniform if mlp == "triton_uniform" else scale.variable
    moe = MoEConfig(expert_sizes=expert_sizes, num_active_experts=scale.top_k, hidden_size=scale.n_embd)
    config = GPTConfig(moe=moe, n_layer=scale.n_layer, n_head=scale.n_head, n_embd=scale.n_embd,
                       block_size=scale.block_size)
    mlp_cls = {"dense": dense_mlp(scale.active_width), "triton_uniform": triton_moe.MoEMLP,
               "triton_variable": triton_moe.MoEMLP, "stk_reference": reference.MoEMLP,
               "grouped_mm": GroupedMMMoE}[mlp]
    torch.manual_seed(0)
    return GPT(config, mlp_cls).cuda()


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise RowTimeout in the main thread after `seconds` (a compilation that does not finish, say)."""
    def expire(signum, frame):
        raise RowTimeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def time_row(scale: Scale, mlp: str, mode: str, batches, args) -> dict:
    model = build_model(scale, mlp)
    torch.autograd.set_multithreading_enabled(not args.calling_thread_backward)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if mode == "eager-graphs":
        triton_moe.enable_cuda_graphs(model)
    forward = model if mode in ("eager", "eager-graphs") else torch.compile(
        model, mode="reduce-overhead" if mode == "reduce-overhead" else None)

    def step(inputs, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    begin = time.perf_counter()
    for index in range(args.warmup):
        step(*batches[index % len(batches)])
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - begin
    torch.cuda.reset_peak_memory_stats()
    times = [call_ms(lambda: step(*batches[(args.warmup + index) % len(batches)])) for index in range(args.steps)]
    ms = statistics.median(times)
    tokens = scale.batch_size * scale.block_size
    return dict(ms=ms, tokens_per_s=tokens / ms * 1e3, peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20,
                warmup_s=warmup_s, spread_ms=[min(times), max(times)])


def main():
    args = parse_args()
    env = environment()
    print(f"# bench_train_step: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print(f"# command: {env['command']}; triton_moe source {env['source']}")
    data = load_bytes(DATA)
    rows, skipped = [], []
    for scale_name in args.scales:
        scale = SCALES[scale_name]
        generator = torch.Generator().manual_seed(0)
        batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, generator))
                   for _ in range(8)]
        for mode in args.modes:
            for mlp in args.mlps:
                if mode == "eager-graphs" and mlp not in (*TRITON_MLPS, "dense"):
                    continue
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                label = f"{scale_name} {mlp} {mode}"
                try:
                    with time_limit(args.row_timeout):
                        result = time_row(scale, mlp, mode, batches, args)
                except Exception as error:  # a baseline that cannot compile or capture: say why, go on
                    reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
                    skipped.append(dict(scale=scale_name, mlp=mlp, mode=mode, reason=reason))
                    print(f"# skipped {label}: {reason}", flush=True)
                    continue
                rows.append(dict(scale=scale_name, mlp=mlp, mode=mode, **result))
                print(f"# {label}: {result['ms']:.2f} ms/step, warm-up {result['warmup_s']:.1f} s", flush=True)
    dense_ms = {(row["scale"], row["mode"]): row["ms"] for row in rows if row["mlp"] == "dense"}
    for row in rows:
        dense = dense_ms.get((row["scale"], row["mode"]))
        row["moe_tax"] = row["ms"] / dense if dense else None
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(environment=env, scales={name: vars(SCALES[name]) for name in args.scales},
                                        args={k: str(v) for k, v in vars(args).items()}, results=rows,
                                        skipped=skipped), indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def print_table(rows):
    print("\n| scale | MLP | mode | ms/step | tokens/s | MoE tax | peak MiB | first steps s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        tax = "-" if row["moe_tax"] is None else f"{row['moe_tax']:.2f}×"
        print(f"| {row['scale']} | {row['mlp']} | {row['mode']} | {row['ms']:.2f} | {row['tokens_per_s']:,.0f} | "
              f"{tax} | {row['peak_memory_mib']:,.0f} | {row['warmup_s']:.1f} |")


def plot(rows, path: Path):
    """ms per step, one panel per scale, one group of bars per MLP, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(dict.fromkeys(row["scale"] for row in rows))
    if not scales:
        return
    fig, axes = plt.subplots(1, len(scales), figsize=(6 * len(scales), 4), squeeze=False)
    for axis, scale in zip(axes[0], scales):
        mlps = [mlp for mlp in MLPS if any(row["mlp"] == mlp and row["scale"] == scale for row in rows)]
        for offset, mode in enumerate(MODES):
            values = [next((row["ms"] for row in rows if (row["scale"], row["mlp"], row["mode"]) == (scale, mlp, mode)),
                           0.0) for mlp in mlps]
            axis.bar([i + 0.2 * (offset - 1.5) for i in range(len(mlps))], values, width=0.2, label=mode)
        axis.set_xticks(range(len(mlps)), [mlp.replace("_", "\n") for mlp in mlps], fontsize=8)
        axis.set_ylabel("ms per training step")
        axis.set_title(f"{scale}")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
