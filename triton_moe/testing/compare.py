"""What scripts/check_intermediates.py and scripts/grad_similarity.py share: the configs they sweep, twin layers
with the same weights, and one row of a comparison table."""

import argparse

import torch

from triton_moe import reference
import triton_moe
from triton_moe.config import MoEConfig
from triton_moe.testing.shapes import REALISTIC_CONFIGS, SEED_CONFIGS
from triton_moe.testing.faults import add_fault_argument
from triton_moe.testing.ground_truth import TOLERANCES, cosine, max_rel_error, rel_l2_error

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# The hidden-2048 realistic shapes of the benchmark table; on a GPU only.
GPU_CONFIGS = {name: REALISTIC_CONFIGS[name] for name in
               ("h2048_64x1024_top8", "h2048_128x768_top8", "h2048_var_32x1536_64x768_32x384_top8")}
# The smallest shape stk takes with variable widths; for the CPU tests (Triton's interpreter is slow).
TINY_CONFIGS = {"4exp_variable_h128": dict(expert_sizes=[(2, 256), (2, 128)], num_active_experts=2, hidden_size=128)}
CONFIGS = {**SEED_CONFIGS, **GPU_CONFIGS, **TINY_CONFIGS}
# Tokens per config: the seed table's 8 x 512 on a GPU; few on the CPU, where kernels are interpreted.
DEFAULT_TOKENS = 4096 if ON_GPU else 64
DEFAULT_CONFIGS = list(SEED_CONFIGS) + (list(GPU_CONFIGS) if ON_GPU else [])


def add_common_arguments(parser):
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS), metavar="CONFIG",
                        help=f"any of {', '.join(CONFIGS)}; default: the seed table (+ the realistic shapes on a "
                             "GPU)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"] + (["bfloat16"] if ON_GPU else []),
                        choices=list(DTYPES))
    parser.add_argument("--activation", default="relu_squared", choices=["relu_squared", "swiglu", "gelu"])
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    add_fault_argument(parser)


def parse_arguments(description: str, argv=None):
    """The command line of a checking script (its docstring as `description`), with mistakes as usage errors
    (exit 2) that name the flag."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens must be >= 1, got {args.tokens}")
    if "bfloat16" in args.dtypes and not ON_GPU:
        parser.error("--dtypes bfloat16 needs a GPU: Triton's CPU interpreter cannot compute in bf16 (the layers "
                     "compute bf16 inputs in fp32 there, so a bf16 comparison would check nothing of bf16)")
    return args


def report(failures: int, what: str) -> int:
    """Print the verdict line of a comparison; the exit status: 1 when anything was beyond tolerance."""
    print(f"\n{f'all {what} within tolerance' if not failures else f'{failures} {what} beyond tolerance'}")
    return 1 if failures else 0


def cases(args):
    """For each config x dtype of the command line: (progress, name, dtype_name, dtype, triton layer, reference
    layer, x, upstream gradient), the two layers on identical weights; progress is "i/n" of the cases, for the
    tables' headings (a case takes up to a minute on the CPU)."""
    pairs = [(name, dtype_name) for name in args.configs for dtype_name in args.dtypes]
    for index, (name, dtype_name) in enumerate(pairs, 1):
        dtype = DTYPES[dtype_name]
        ours, ref = twin_layers(name, args.activation, dtype, args.seed)
        x, upstream = inputs(ours.config, args.tokens, dtype, args.seed)
        yield f"{index}/{len(pairs)}", name, dtype_name, dtype, ours, ref, x, upstream


def twin_layers(name, activation, dtype, seed):
    """(triton layer, reference layer) with identical weights, on the device, in dtype."""
    config = MoEConfig(**CONFIGS[name], activation=activation)
    torch.manual_seed(seed)
    ours = triton_moe.MoEMLP(config).to(DEVICE, dtype)
    # Weights of scale 1/sqrt(fan-in), so that activations are O(1) and relative errors mean something.
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0, config.hidden_size ** -0.5)
    ref = reference.MoEMLP(config).to(DEVICE, dtype)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def inputs(config, tokens, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, config.hidden_size, generator=generator).to(DEVICE, dtype)
    upstream = torch.randn(tokens, config.hidden_size, generator=generator).to(DEVICE, dtype)
    return x, upstream


def compare(got, want, dtype) -> dict:
    """Error measures of got against want, and whether they are within the dtype's tolerance."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    tol = TOLERANCES[dtype]
    result = dict(max_abs=(got - want).abs().max().item() if want.numel() else 0.0,
                  max_rel=max_rel_error(got, want), rel_l2=rel_l2_error(got, want), cosine=cosine(got, want))
    result["ok"] = bool(result["rel_l2"] <= tol["rel_l2"] and result["max_rel"] <= tol["max_rel"]
                        and (want.numel() <= 1 or result["cosine"] >= tol["cosine"]))
    return result


def flat(value):
    """A tensor, or a per-expert list of tensors flattened into one."""
    return torch.cat([v.flatten() for v in value]) if isinstance(value, list) else value
