"""Test support: deliberate defects in the Triton layer, to show that the checking tools can say no.

    with inject_fault("w1_grad_scale"):
        loss = model(x).sum(); loss.backward()      # every triton_moe.MoEMLP in here runs with the defect

The defect wraps `triton_moe.moe.expert_mlp` (the expert MLP's autograd entry point) for the duration of the
`with`, and the layer takes its two-node path (the route's node, then expert_mlp's: MoELayer._route_and_experts)
instead of the eager one-node path, which runs the same kernels without calling expert_mlp
(test_one_node_eager_path_matches_the_two_node_path_bit_for_bit). The kernels are untouched, and nothing in
triton_moe imports this module.
It lives in the package, not in scripts/ or benchmarks/, because the tools of both folders import it.
"""

import contextlib

import torch

import triton_moe.moe
from triton_moe.layer import MoELayer
from triton_moe.moe import MoEMLP

FAULTS = {
    "w1_grad_scale": "the gradient of w1 multiplied by 0.3",
    "router_grad_zero": "no gradient through the routing weights (the router learns from the aux loss only)",
    "drop_last_expert_grad": "the last expert's rows of dW1, dV1 and dW2 are zero, as if skipped by the GEMMs",
    "forward_weight_off_by_one": "the routing weight of slot j applied to slot j+1 (cyclic), in the forward",
}


class _EditGrad(torch.autograd.Function):
    """Identity in the forward; the backward passes the gradient through `edit`."""

    @staticmethod
    def forward(ctx, tensor, edit):
        ctx.edit = edit
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return ctx.edit(grad), None


def _scale_rows_grad(tensor, rows: slice, factor: float):
    def edit(grad):
        grad = grad.clone()
        grad[rows] *= factor
        return grad

    return _EditGrad.apply(tensor, edit)


def _faulty(name, expert_mlp):
    # Each takes expert_mlp's arguments: x, routing_weights, w1, v1, w2, sort, expert_width_offsets, then the rest.
    def w1_grad_scale(x, routing_weights, w1, v1, w2, *rest):
        w1 = _scale_rows_grad(w1, slice(None), 0.3)
        return expert_mlp(x, routing_weights, w1, v1, w2, *rest)

    def router_grad_zero(x, routing_weights, w1, v1, w2, *rest):
        return expert_mlp(x, routing_weights.detach(), w1, v1, w2, *rest)

    def drop_last_expert_grad(x, routing_weights, w1, v1, w2, sort, expert_width_offsets, *rest):
        last = slice(expert_width_offsets[-2].item(), expert_width_offsets[-1].item())
        w1, w2 = _scale_rows_grad(w1, last, 0.0), _scale_rows_grad(w2, last, 0.0)
        v1 = _scale_rows_grad(v1, last, 0.0) if v1 is not None else None
        return expert_mlp(x, routing_weights, w1, v1, w2, sort, expert_width_offsets, *rest)

    def forward_weight_off_by_one(x, routing_weights, w1, v1, w2, *rest):
        # routing_weights is in (token, slot) order: roll the slots, so that slot j's weight lands on slot j+1.
        shifted = routing_weights.view(x.shape[0], -1).roll(1, dims=1).flatten()
        return expert_mlp(x, shifted, w1, v1, w2, *rest)

    return locals()[name]


@contextlib.contextmanager
def inject_fault(name: str | None):
    """Run every Triton MoEMLP with the defect `name` (a key of FAULTS) inside the block; None: no defect."""
    if name is None:
        yield
        return
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; choose one of {sorted(FAULTS)}")
    original, route_and_experts = triton_moe.moe.expert_mlp, MoEMLP._route_and_experts
    triton_moe.moe.expert_mlp = _faulty(name, original)
    MoEMLP._route_and_experts = MoELayer._route_and_experts
    try:
        yield
    finally:
        triton_moe.moe.expert_mlp = original
        MoEMLP._route_and_experts = route_and_experts


def add_fault_argument(parser):
    """The --inject-fault option the checking tools share."""
    parser.add_argument("--inject-fault", choices=sorted(FAULTS), metavar="NAME",
                        help="run the Triton implementation with a deliberate defect, to check that this tool "
                             "fails: " + "; ".join(f"{name}: {text}" for name, text in FAULTS.items()))
