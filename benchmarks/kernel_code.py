"""The machine code of the layer's Triton kernels, without a GPU: one forward + backward of MoEMLP runs on the CPU
with every launch recorded instead of made, and each recorded launch is compiled for an NVIDIA target (sm_90 by
default) with Triton's own compiler. Writes one PTX file per launch, with debug information and labels stripped,
so that the folders of two trees compare with diff: a change meant to leave the kernels alone can be checked on a
machine without a GPU. Also prints which arguments torch.compile's mutation analysis finds each launch writing
(Inductor clones and writes back whatever it finds written), and exits 1 if it finds a kernel writing outside its
outputs.

    uv run python benchmarks/kernel_code.py --out runs/ptx
    uv run python benchmarks/kernel_code.py --out runs/ptx_large --activation swiglu --large
    diff -r runs/ptx_before runs/ptx

--large takes the large-problem paths (TMA descriptors, sorted token rows, the fused dA epilogue, the persistent
kernels) at a small shape. Each launch's line says how many warps its kernel compiled to: the persistent kernels'
warp specialisation makes their 4 warps 12, and falls back to 4 silently where it cannot split the loop. The PTX
depends on the installed Triton; compare folders written by one Triton version.

    uv run python benchmarks/kernel_code.py --direct-launch

checks kernels.host.DirectLaunch instead: every launch of a forward + backward, with x aligned to 16 bytes and
not, must reach the compiled kernels' launchers with the same kernel and arguments as through kernel[grid].
"""

import argparse
import os
import re
import sys
from pathlib import Path

# Before triton_moe.kernels is imported: real JIT kernels rather than the interpreter's.
os.environ["TRITON_INTERPRET"] = "0"
# Before torch is imported: no GPU, on any machine. The layer runs on CPU tensors here, which it refuses outside the
# interpreter where a GPU is visible (MoELayer._check_input): the launches are recorded, not made.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# What each kernel writes: an argument outside its list that the mutation analysis finds written is an error (for
# one handed to a @triton.jit helper whose results address a store, the analysis counts it as written).
OUTPUTS = {
    "_topk_softmax_kernel": {"routing_weights_ptr", "expert_indices_ptr", "ranks_in_segment_ptr",
                             "segment_expert_counts_ptr", "segment_prob_sums_ptr", "segment_lse_sq_sums_ptr",
                             "table_ticket_ptr"},
    "_segment_table_kernel": {"segment_expert_starts_ptr", "tokens_per_expert_ptr", "expert_row_offsets_ptr",
                            "chunk_balance_ptr", "table_ticket_ptr", "aux_loss_ptr"},
    "_scatter_sorted_rows_kernel": {"row_to_flat_ptr", "row_to_token_ptr", "row_expert_ptr", "flat_to_row_ptr"},
    "_expert_rows_gemm": {"out_ptr", "out2_ptr", "out3_ptr", "a_rows_ptr", "partials_ptr"},
    "_weight_grad_gemm": {"out_ptr", "out2_ptr", "partials_ptr"},
    "_sum_row_splits": {"out_ptr", "out2_ptr"},
    "_activation_backward_rows": {"d_act_ptr", "dh_up_ptr", "d_routing_weights_ptr"},
    "_gather_rows_kernel": {"rows_ptr"},
    "_combine_rows_kernel": {"out_ptr"},
    "_topk_softmax_backward_kernel": {"grad_logits_ptr"},
    "_tile_table_kernel": {"tile_table_ptr", "num_tiles_ptr"},
    "_persistent_rows_gemm": {"out_ptr"},
    "_persistent_weight_grad": {"out_ptr"},
}


class _TargetOnlyDriver:
    """What Triton's compiler asks of the driver when it only compiles: the target, a device, a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _Recorder:
    """Stands in for traceable(kernel): `kernel[grid](*args, **kwargs)` records the launch instead of making it."""

    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.kernel, {**dict(zip(self.kernel.arg_names, args)), **kwargs}))
        return record


def _stripped_ptx(ptx: str) -> str:
    """The PTX without its debug sections, line records, comments and debug labels, which move with the source."""
    code = ptx.split(".section\t.debug")[0]
    return "\n".join(line for line in code.splitlines() if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp\d+:)", line))


def _written_arguments(kernel, arguments: dict) -> list[str] | None:
    """The arguments torch.compile's mutation analysis finds `kernel` writing; None for a launch no trace makes,
    or where this torch has no analysis we know how to call."""
    from torch._higher_order_ops import triton_kernel_wrap

    from triton.tools.tensor_descriptor import TensorDescriptor

    if any(isinstance(value, TensorDescriptor) for value in arguments.values()):
        return None  # a launch with TMA descriptors: the launchers make none inside a trace (tuning.tma_readable)
    launch = {name: value for name, value in arguments.items() if name not in ("num_warps", "num_stages")}
    try:
        if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
            accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, launch, {})
            return sorted(dep.name for dep in accesses.read_writes.writes)
        return sorted(triton_kernel_wrap.identify_mutated_tensors(kernel, launch, {}))
    except (AttributeError, TypeError) as error:  # another torch release's private API
        print(f"no mutation analysis with this torch: {error}")
        return None


def _launches_made(step) -> list:
    """(compiled kernel, grid, arguments) of each launch `step()` makes, recorded at the compiled kernels'
    launchers; tensors as (dtype, shape, 16-byte aligned)."""
    from triton.compiler.compiler import CompiledKernel

    made = []
    describe = lambda value: ((value.dtype, tuple(value.shape), value.data_ptr() % 16 == 0)
                              if isinstance(value, torch.Tensor) else value)
    # run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)
    record = lambda kernel: lambda *launch: made.append((kernel.hash, launch[:3], [describe(v) for v in launch[9:]]))
    CompiledKernel._init_handles = lambda self: None  # nothing to load: no launch is made
    CompiledKernel.run = property(record)
    step()
    return made


def _launcher_modules() -> tuple:
    """The kernel modules whose launchers launch through their module's `traceable` (imported late: after the
    driver is set)."""
    from triton_moe.kernels import grouped_gemm, permute, persistent, route, sort

    return grouped_gemm, permute, persistent, route, sort


def check_direct_launch(layer, x) -> int:
    """DirectLaunch against kernel[grid]: the same compiled kernels with the same arguments, for x and for a copy
    of x that is not 16-byte aligned (Triton specialises pointers on their alignment, so other kernels)."""
    from triton.runtime.jit import JITFunction

    from triton_moe.kernels import host

    misaligned = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x)
    steps = {"aligned": x, "misaligned": misaligned}
    modules = _launcher_modules()
    failures, made = [], {}
    for name, token_rows in steps.items():
        token_rows = token_rows.detach().requires_grad_()
        step = lambda: (layer(token_rows).float().sum() + layer.aux_loss).backward()
        for module in modules:
            module.traceable = lambda kernel: kernel
        made[name] = _launches_made(step)
        for module in modules:
            module.traceable = host.traceable
        first = _launches_made(step)  # DirectLaunch's first launches of these keys go through kernel[grid]
        jit_runs = []
        run = JITFunction.run
        JITFunction.run = lambda self, *args, **kwargs: jit_runs.append(self) or run(self, *args, **kwargs)
        again = _launches_made(step)
        JITFunction.run = run
        for label, launches in (("first", first), ("again", again)):
            if launches != made[name]:
                failures.append(f"{name}, {label} DirectLaunch: not kernel[grid]'s kernels and arguments")
        if jit_runs:
            failures.append(f"{name}: {len(jit_runs)} launches went through kernel[grid] on the second step")
        print(f"{name}: {len(made[name])} launches, DirectLaunch's the same as kernel[grid]'s: "
              f"{first == made[name] and again == made[name]}")
    if [launch[0] for launch in made["aligned"]] == [launch[0] for launch in made["misaligned"]]:
        failures.append("the misaligned x compiled no other kernel: the check cannot tell the keys apart")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the PTX files")
    parser.add_argument("--direct-launch", action="store_true",
                        help="check kernels.host.DirectLaunch against kernel[grid] instead of writing PTX")
    parser.add_argument("--activation", default="relu_squared", choices=["relu_squared", "gelu", "swiglu"])
    parser.add_argument("--expert-sizes", default="4x512,4x256")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--large", action="store_true", help="take the large-problem paths")
    parser.add_argument("--row-splits", type=int, default=None,
                        help="split the weight gradients' rows into this many runs (default: tuning's choice)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    args = parser.parse_args(argv)
    if args.out is None and not args.direct_launch:
        parser.error("--out is required unless --direct-launch")

    triton.runtime.driver.set_active(_TargetOnlyDriver(args.arch))
    import triton_moe
    from triton_moe.kernels import host, persistent, tuning

    host._INTERPRETER = False  # bf16 CPU tensors stand in for the device's
    tuning.running_in_interpreter = lambda: False
    if args.row_splits is not None:
        from triton_moe.kernels import grouped_gemm

        grouped_gemm.weight_grad_row_splits = lambda *problem: args.row_splits
    if args.large:
        tuning.has_tma = lambda device: True
        tuning.has_warp_specialization = lambda device: True
        persistent._num_programs = lambda device: 132  # an H100's or H200's SMs
        for threshold in ("TMA_WEIGHTS_MIN_ROWS_X_HIDDEN", "SORTED_ROWS_MIN_ROWS_X_HIDDEN",
                          "SMALL_PROBLEM_ROWS_X_HIDDEN", "FUSED_DH_MIN_ROWS_X_HIDDEN", "PERSISTENT_MIN_ROWS_X_HIDDEN"):
            setattr(tuning, threshold, 0)

    config = triton_moe.MoEConfig(expert_sizes=args.expert_sizes, num_active_experts=args.top_k,
                                  hidden_size=args.hidden, activation=args.activation)
    torch.manual_seed(0)
    layer = triton_moe.MoEMLP(config).to(torch.bfloat16)
    x = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16, requires_grad=True)
    if args.direct_launch:
        return check_direct_launch(layer, x)
    for module in _launcher_modules():
        module.traceable = _Recorder
    (layer(x).float().sum() + layer.aux_loss).backward()  # the outputs are never computed: only launches recorded

    args.out.mkdir(parents=True, exist_ok=True)
    misread = []  # arguments found written that the kernel only reads
    for index, (kernel, arguments) in enumerate(_Recorder.launches):
        compiled = kernel.warmup(grid=(1,), **arguments)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        name = f"{index:02d}{kernel.fn.__name__}"
        (args.out / f"{name}.ptx").write_text(_stripped_ptx(compiled.asm["ptx"]))
        written = _written_arguments(kernel, arguments)
        print(f"{name}: {compiled.metadata.num_warps} warps, writes {'(not analysed)' if written is None else written}")
        outputs = OUTPUTS.get(kernel.fn.__name__)
        if outputs is None:
            print(f"{name}: not in OUTPUTS, not checked")
        misread += [f"{name}.{argument}" for argument in written or () if outputs and argument not in outputs]
    print(f"wrote {len(_Recorder.launches)} PTX files to {args.out}")
    if misread:
        print(f"the mutation analysis finds these inputs written: {misread}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
