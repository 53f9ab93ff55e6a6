"""Check every intermediate of forward_with_intermediates, the output, the aux loss and every gradient of each
MoE implementation against the fp64 per-expert loop, on one built-in config; print a table.

    uv run python scripts/check_intermediates.py                       # 8exp_variable, 256 tokens, fp32
    uv run python scripts/check_intermediates.py --config 64exp_variable --dtype float16

Exits non-zero when any quantity is beyond the dtype's tolerance (triton_moe.ground_truth.TOLERANCES).
Runs on a GPU when there is one, else on the CPU through Triton's interpreter (fp32 and fp16 only there).
"""

import argparse
import sys

import torch

import reference
import triton_moe
from triton_moe.config import SEED_CONFIGS, MoEConfig
from triton_moe.ground_truth import TOLERANCES, cosine, max_rel_error, run_with_loop

IMPLEMENTATIONS = {"triton": triton_moe.MoEMLP, "reference (stk)": reference.MoEMLP}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rows_of(result: dict, grads: dict) -> dict:
    """Flatten results into name -> tensor; per-expert lists become one tensor, integer ones become float."""
    flat = {}
    for name, value in result.items():
        flat[name] = torch.cat([v.flatten() for v in value]) if isinstance(value, list) else value
    flat.update({f"grad {name}": grad for name, grad in grads.items()})
    return {name: value.detach().double().cpu() for name, value in flat.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="8exp_variable", choices=sorted(SEED_CONFIGS))
    parser.add_argument("--activation", default="relu_squared", choices=["relu_squared", "swiglu", "gelu"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    config = MoEConfig(**SEED_CONFIGS[args.config], activation=args.activation)
    print(f"config {args.config} {config.expert_sizes} top-{config.num_active_experts} hidden {config.hidden_size}"
          f" {config.activation}; {args.tokens} tokens, {args.dtype} on {device}")

    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, config.hidden_size, generator=generator).to(device, dtype)
    upstream = torch.randn(args.tokens, config.hidden_size, generator=generator).to(device, dtype)
    tol = TOLERANCES[dtype]
    failures = 0
    for impl_name, cls in IMPLEMENTATIONS.items():
        torch.manual_seed(args.seed)
        layer = cls(config).to(device=device, dtype=dtype)
        got, want, got_grads, want_grads = run_with_loop(layer, x, upstream)
        got_rows, want_rows = rows_of(got, got_grads), rows_of(want, want_grads)
        print(f"\n{impl_name} vs fp64 loop (pass: max rel <= {tol['max_rel']:g}, cosine >= {tol['cosine']})")
        print(f"| {'quantity':<18} | {'max abs':>10} | {'max rel':>10} | {'cosine':>10} | ok |")
        print(f"|{'-' * 20}|{'-' * 12}|{'-' * 12}|{'-' * 12}|----|")
        for name, want_value in want_rows.items():
            got_value = got_rows[name]
            if got_value.shape != want_value.shape:
                print(f"| {name:<18} | shape {tuple(got_value.shape)} != {tuple(want_value.shape)} | NO |")
                failures += 1
                continue
            exact = name in ("expert_indices", "tokens_per_expert", "row_to_token")
            max_abs = (got_value - want_value).abs().max().item() if want_value.numel() else 0.0
            rel, cos = max_rel_error(got_value, want_value), cosine(got_value, want_value)
            # Routing (logits, weights, aux loss) runs in fp32 whatever the expert dtype.
            bound = TOLERANCES[torch.float32] if name in ("router_logits", "expert_weights", "aux_loss") else tol
            ok = max_abs == 0 if exact else (rel <= bound["max_rel"] and (want_value.numel() <= 1
                                                                        or cos >= bound["cosine"]))
            failures += not ok
            print(f"| {name:<18} | {max_abs:>10.3e} | {rel:>10.3e} | {cos:>10.7f} | {'ok' if ok else 'NO':>2} |")
    print(f"\n{'all within tolerance' if failures == 0 else f'{failures} quantities beyond tolerance'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
