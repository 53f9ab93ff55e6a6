"""Both implementations on the same weights and input: every intermediate of forward_with_intermediates, and the
gradients of a backward (x, router, w1, (v1), w2: the intermediates of the backward), compared one to one
(Triton vs the stk reference), over the config table; a table per config and dtype.

    uv run python scripts/check_intermediates.py                        # CPU: seed table, 64 tokens, fp32
    uv run python scripts/check_intermediates.py --configs 8exp_variable --dtypes float16
    uv run python scripts/check_intermediates.py --inject-fault w1_grad_scale   # must fail

Exits non-zero when any intermediate or gradient differs beyond the dtype's tolerance (relative L2 error, max
relative error and cosine; triton_moe.testing.ground_truth.TOLERANCES; integer ones must be equal). The loss of the
backward is <output, g> + aux_loss with a fixed random g. Runs on a GPU when there is one (then also bf16 and
the realistic shapes), else on the CPU through Triton's interpreter.
"""

import sys

import torch

from triton_moe.testing.compare import CONFIGS, DEVICE, cases, compare, flat, parse_arguments, report
from triton_moe.testing.faults import inject_fault
from triton_moe.testing.ground_truth import run_layer

EXACT = ("expert_indices", "tokens_per_expert", "row_to_token")
ROUTING = ("router_logits", "routing_weights", "aux_loss")  # fp32 whatever the expert dtype


def forward_backward(layer, x, upstream) -> tuple[dict, dict]:
    """Intermediates of a forward, and the gradients of <output, upstream> + aux_loss (keys grad_x, grad_w1...)."""
    intermediates, grads = run_layer(layer, x, upstream)
    grads = {f"grad_{name}": grad for name, grad in grads.items()}
    return {key: value.detach() if torch.is_tensor(value) else value for key, value in intermediates.items()}, grads


def main(argv=None) -> int:
    args = parse_arguments(__doc__, argv)
    failures = 0
    for progress, name, dtype_name, dtype, ours, ref, x, upstream in cases(args):
        fault = f", fault {args.inject_fault} injected into triton" if args.inject_fault else ""
        print(f"\n## [{progress}] {name} {CONFIGS[name]['expert_sizes']} top-{ours.config.num_active_experts}, "
              f"{args.activation}, {args.tokens} tokens, {dtype_name} on {DEVICE}{fault}: "
              "triton vs stk reference", flush=True)
        with inject_fault(args.inject_fault):
            got, got_grads = forward_backward(ours, x, upstream)
        want, want_grads = forward_backward(ref, x, upstream)
        got.update(got_grads)
        want.update(want_grads)
        print(f"| {'intermediate':<18} | {'max abs':>10} | {'max rel':>10} | {'rel L2':>10} | {'cosine':>10} "
              "| ok |")
        print(f"|{'-' * 20}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 12}|----|")
        for key in want:
            a, b = flat(got[key]), flat(want[key])
            if a.shape != b.shape:
                print(f"| {key:<18} | shape {tuple(a.shape)} != {tuple(b.shape)} | NO |")
                failures += 1
                continue
            result = compare(a, b, torch.float32 if key in ROUTING else dtype)
            if key in EXACT:
                result["ok"] = result["max_abs"] == 0
            failures += not result["ok"]
            print(f"| {key:<18} | {result['max_abs']:>10.3e} | {result['max_rel']:>10.3e} | "
                  f"{result['rel_l2']:>10.3e} | {result['cosine']:>10.7f} | {'ok' if result['ok'] else 'NO':>2} |")
    return report(failures, "intermediates")


if __name__ == "__main__":
    sys.exit(main())
