"""Gradients of x, router, w1, (v1), w2: Triton vs the stk reference, and each vs the fp64 per-expert loop.
Cosine similarity, relative L2 error ||a - b|| / ||b|| and max relative error; a table per config and dtype.

    uv run python scripts/grad_similarity.py                            # CPU: seed table, 64 tokens, fp32
    uv run python scripts/grad_similarity.py --configs 64exp_variable --activation swiglu

Cosine alone cannot see a gradient off by a scale factor; the relative errors can. Exits non-zero when a
gradient of either implementation is beyond the dtype's tolerance against the fp64 loop
(triton_moe.testing.ground_truth.TOLERANCES: relative L2 error, max relative error and cosine). The loss is
<output, g> + aux_loss with a fixed random g. `--inject-fault NAME` runs the Triton layer with a deliberate
defect (triton_moe.testing.faults); the script must then fail.
"""

import sys

from triton_moe.testing.compare import DEVICE, cases, compare, parse_arguments, report
from triton_moe.testing.faults import inject_fault
from triton_moe.testing.ground_truth import run_with_loop


def main(argv=None) -> int:
    args = parse_arguments(__doc__, argv)
    failures = 0
    for progress, name, dtype_name, dtype, ours, ref, x, upstream in cases(args):
        fault = f", fault {args.inject_fault} injected into triton" if args.inject_fault else ""
        print(f"\n## [{progress}] {name}, {args.activation}, {args.tokens} tokens, {dtype_name} on {DEVICE}{fault}",
              flush=True)
        with inject_fault(args.inject_fault):
            _, _, ours_grads, truth = run_with_loop(ours, x, upstream)
        _, _, ref_grads, _ = run_with_loop(ref, x, upstream)
        print("| grad | pair | cosine | rel L2 | max rel | ok |\n|---|---|---:|---:|---:|---|")
        for key in truth:
            pairs = {"triton vs fp64": (ours_grads[key], truth[key]),
                     "stk vs fp64": (ref_grads[key], truth[key]),
                     "triton vs stk": (ours_grads[key], ref_grads[key])}
            for pair, (got, want) in pairs.items():
                result = compare(got, want, dtype)
                # Pass/fail is each implementation against the truth; triton vs stk is shown for reading.
                judged = pair != "triton vs stk"
                failures += judged and not result["ok"]
                verdict = ("ok" if result["ok"] else "NO") if judged else ""
                print(f"| {key} | {pair} | {result['cosine']:.7f} | {result['rel_l2']:.3e} | "
                      f"{result['max_rel']:.3e} | {verdict} |")
    return report(failures, "gradients")


if __name__ == "__main__":
    sys.exit(main())
