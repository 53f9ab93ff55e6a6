"""Routing and the expert sort over the Triton kernels of kernels/router.py: torch.library custom ops with their
autograd, which torch.compile sees as opaque nodes, and the two functions the layer calls. Eager calls skip the
custom ops' dispatch (as ops.expert_mlp does) and call the launchers directly, through an
autograd.Function for the route; MoEMLP's eager forward calls route_forward and route_backward from its own
autograd node (layer_ops.py).

    fused_route(x, router_weight, config)        -> FusedRouting: routing.route's Routing, plus the per-segment
                                                    counts, scanned, that spare the sort its counting passes
    fused_sort_by_expert(expert_indices, E, sort_tables) -> routing.sort_by_expert's ExpertSort
Launches: the route's forward is the router GEMM and 2 kernels (top-k softmax; the scans of its per-segment tables
and the aux loss); its backward 1 kernel and the GEMM's two products (fp32; with bf16 on a GPU, also the stacked
[W; W] and the sum of dW's two halves); the sort 1 kernel given the route's scans, 3 without.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_moe.config import MoEConfig
from triton_moe.kernels.host import ceil_div
from triton_moe.kernels.route import route_segment_tokens, topk_softmax, topk_softmax_backward
from triton_moe.kernels.sort import SORT_SEGMENT_ASSIGNMENTS, count_expert_segments, sort_by_expert_segments
from triton_moe.ops import kernel_op, refuse_create_graph
from triton_moe.routing import ExpertSort, Routing, sort_key_dtype


@dataclass
class SortTables:
    """The counting sort's tables: what its scatter needs besides the indices. The flat assignments
    f = token * k + slot go in segments of segment_assignments; each assignment's row is expert_row_offsets[e] +
    segment_expert_starts[b, e] + its rank in the segment."""

    segment_assignments: int  # flat assignments per segment
    segment_expert_starts: Tensor  # [cdiv(N*k, segment_assignments), E] int32: assignments to e in the earlier segments
    ranks_in_segment: Tensor  # [N, k] int32: rank of each assignment among its segment's earlier ones to its expert
    tokens_per_expert: Tensor  # [E] int64
    expert_row_offsets: Tensor  # [E + 1] int64: exclusive scan of tokens_per_expert, the total at the end


@dataclass
class FusedRouting(Routing):
    """A Routing, and what the route counted on the way for the sort."""

    sort_tables: SortTables  # the route's counts and their scans, for fused_sort_by_expert


def _tensor_core_router(x: Tensor, router_weight: Tensor) -> bool:
    """Whether the router GEMMs run on the tensor cores: bf16 x and router weight on a GPU.

    A product of two bf16 values is exact in fp32, so a bf16 GEMM accumulating in fp32 gives the fp32 GEMM's logits
    up to summation order (measured: largest error 2e-6 of the largest logit, fp32's own 8e-7). The backward's
    fp32 gradient is split into bf16 hi + lo, exact to about 2^-17, finer than the bf16 gradients it makes.
    Elsewhere (fp32 or fp16 inputs, an fp32 router weight, the CPU) the GEMMs run in fp32.
    """
    return x.is_cuda and x.dtype == torch.bfloat16 and router_weight.dtype == torch.bfloat16


def _autocast_off(device_type: str):
    """A context with autocast off: torch.autocast(enabled=False) where autocast is on, else nothing (entering an
    autocast context costs host time on every call, and the backward usually runs without autocast)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def router_gemm(x: Tensor, router_weight: Tensor) -> Tensor:
    """x [N, H] @ router_weight [E, H]^T -> logits [N, E] fp32, whatever autocast says."""
    with _autocast_off(x.device.type):
        if _tensor_core_router(x, router_weight):
            return torch.mm(x, router_weight.t(), out_dtype=torch.float32)
        return F.linear(x.float(), router_weight.float())


def route_forward(x: Tensor, router_weight: Tensor, top_k: int, normalize_weights: bool, load_balance_coef: float,
                  z_loss_coef: float) -> tuple[Tensor, ...]:
    """(router_logits [N, E] fp32, then topk_softmax's seven results) of tokens x [N, H] and router_weight [E, H]."""
    logits = router_gemm(x, router_weight)  # (N, E)
    return (logits, *topk_softmax(logits, top_k, normalize_weights, load_balance_coef, z_loss_coef))


def route_backward(
    grad_routing_weights: Tensor, grad_aux_loss: Tensor | None, grad_router_logits: Tensor | None, x: Tensor,
    router_weight: Tensor, router_logits: Tensor, expert_row_offsets: Tensor, normalize_weights: bool,
    load_balance_coef: float, z_loss_coef: float,
) -> tuple[Tensor, Tensor]:
    """(grad_x [N, H], grad_router_weight [E, H]) in their inputs' dtypes: the top-k softmax's backward kernel,
    then the router GEMM's two products."""
    tensor_cores = _tensor_core_router(x, router_weight)
    grad_logits = topk_softmax_backward(  # (N, E) fp32, or (N, 2E) bf16: hi | lo
        grad_routing_weights, grad_aux_loss, router_logits, expert_row_offsets, normalize_weights,
        load_balance_coef, z_loss_coef, grad_router_logits,
        split_dtype=torch.bfloat16 if tensor_cores else None)
    with _autocast_off(x.device.type):
        if not tensor_cores:
            grad_x = (grad_logits @ router_weight.float()).to(x.dtype)  # (N, H)
            grad_router_weight = (grad_logits.t() @ x.float()).to(router_weight.dtype)  # (E, H)
            return grad_x, grad_router_weight
        # [hi | lo] @ [W; W] = (hi + lo) @ W, accumulated in fp32 and rounded once to bf16.
        grad_x = torch.mm(grad_logits, router_weight.repeat(2, 1))  # (N, H)
        grad_weight_halves = torch.mm(grad_logits.t(), x, out_dtype=torch.float32)  # (2E, H): hiᵀ x over loᵀ x
        num_experts = router_weight.shape[0]
        grad_router_weight = torch.empty_like(router_weight)  # (E, H)
        torch.add(grad_weight_halves[:num_experts], grad_weight_halves[num_experts:], out=grad_router_weight)
        return grad_x, grad_router_weight


# The route's two ops stay opaque to Inductor, which would otherwise run the router GEMMs its own way: the logits,
# and with them the aux loss and the gradients, would then differ from eager's in the last bits.
@torch.library.custom_op("triton_moe::route", mutates_args=())
def _route(
    x: Tensor, router_weight: Tensor, top_k: int, normalize_weights: bool, load_balance_coef: float,
    z_loss_coef: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(router_logits [N, E] fp32, routing_weights [N, k] fp32, expert_indices [N, k] int64, aux_loss [] fp32,
    segment_expert_starts [segments, E] int32, ranks_in_segment [N, k] int32, tokens_per_expert [E] int64,
    expert_row_offsets [E + 1] int64); see route_forward and kernels.router.topk_softmax."""
    return route_forward(x, router_weight, top_k, normalize_weights, load_balance_coef, z_loss_coef)


@_route.register_fake
def _(x, router_weight, top_k, normalize_weights, load_balance_coef, z_loss_coef):
    num_tokens, num_experts = x.shape[0], router_weight.shape[0]
    num_segments = ceil_div(num_tokens, route_segment_tokens(num_tokens, num_experts))
    return (x.new_empty((num_tokens, num_experts), dtype=torch.float32),
            x.new_empty((num_tokens, top_k), dtype=torch.float32),
            x.new_empty((num_tokens, top_k), dtype=torch.int64),
            x.new_empty((), dtype=torch.float32),
            x.new_empty((num_segments, num_experts), dtype=torch.int32),
            x.new_empty((num_tokens, top_k), dtype=torch.int32),
            x.new_empty((num_experts,), dtype=torch.int64),
            x.new_empty((num_experts + 1,), dtype=torch.int64))


@torch.library.custom_op("triton_moe::route_backward", mutates_args=())
def _route_backward(
    grad_routing_weights: Tensor, grad_aux_loss: Tensor | None, grad_router_logits: Tensor | None, x: Tensor,
    router_weight: Tensor, router_logits: Tensor, expert_row_offsets: Tensor, normalize_weights: bool,
    load_balance_coef: float, z_loss_coef: float,
) -> tuple[Tensor, Tensor]:
    """(grad_x [N, H], grad_router_weight [E, H]); see route_backward."""
    return route_backward(grad_routing_weights, grad_aux_loss, grad_router_logits, x, router_weight, router_logits,
                          expert_row_offsets, normalize_weights, load_balance_coef, z_loss_coef)


@_route_backward.register_fake
def _(grad_routing_weights, grad_aux_loss, grad_router_logits, x, router_weight, router_logits, expert_row_offsets,
      normalize_weights, load_balance_coef, z_loss_coef):
    return torch.empty_like(x), torch.empty_like(router_weight)


def _setup_context(ctx, inputs, output):
    x, router_weight, top_k, normalize_weights, load_balance_coef, z_loss_coef = inputs
    router_logits, *_, expert_row_offsets = output
    # The backward picks the experts again from the logits, and counts them from expert_row_offsets, which the
    # expert MLP keeps too: under torch.compile each saved tensor is an output of the forward graph and an input of
    # the backward graph, with host work at both ends every step.
    ctx.save_for_backward(x, router_weight, router_logits, expert_row_offsets)
    ctx.top_k = top_k
    ctx.loss_arguments = (normalize_weights, load_balance_coef, z_loss_coef)
    # Autograd would otherwise hand the backward zero gradients for the five index and count outputs: a launch each.
    ctx.set_materialize_grads(False)


def _backward(ctx, grads, backward) -> tuple:
    """The autograd backward of the route, its work done by `backward` (the custom op or the plain function);
    grads: the gradients of the route's eight outputs: the logits', the weights' and the aux loss's are used."""
    refuse_create_graph()
    grad_router_logits, grad_routing_weights, _, grad_aux_loss = grads[:4]
    x, router_weight, router_logits, expert_row_offsets = ctx.saved_tensors
    if grad_routing_weights is None:  # only the aux loss (or the logits) reached the loss
        grad_routing_weights = router_logits.new_zeros((router_logits.shape[0], ctx.top_k))
    # None for the aux loss (left out of the loss) or the logits: the kernel skips that term.
    contiguous = lambda grad: None if grad is None else grad.contiguous()
    grad_x, grad_router_weight = backward(
        grad_routing_weights.contiguous(), contiguous(grad_aux_loss), contiguous(grad_router_logits), x,
        router_weight, router_logits, expert_row_offsets, *ctx.loss_arguments)
    return grad_x, grad_router_weight, None, None, None, None


_route.register_autograd(lambda ctx, *grads: _backward(ctx, grads, _route_backward), setup_context=_setup_context)


class Route(torch.autograd.Function):
    """The eager path of the route: route_forward and route_backward without the custom ops' dispatch (as
    ops.ExpertMLP); under torch.compile the custom op runs instead (_route_with_autograd)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = route_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, grads, route_backward)


def _route_with_autograd(*inputs):
    return _route(*inputs) if torch.compiler.is_compiling() else Route.apply(*inputs)


@kernel_op("triton_moe::count_expert_segments")
def _count_expert_segments(expert_indices: Tensor, num_experts: int,
                         segment_assignments: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(segment_expert_starts [segments, E] int32, ranks_in_segment [N, k] int32, tokens_per_expert [E] int64,
    expert_row_offsets [E + 1] int64); see kernels.router."""
    return count_expert_segments(expert_indices, num_experts, segment_assignments)


@_count_expert_segments.register_fake
def _(expert_indices, num_experts, segment_assignments):
    num_segments = ceil_div(expert_indices.numel(), segment_assignments)
    return (expert_indices.new_empty((num_segments, num_experts), dtype=torch.int32),
            expert_indices.new_empty(expert_indices.shape, dtype=torch.int32),
            expert_indices.new_empty((num_experts,), dtype=torch.int64),
            expert_indices.new_empty((num_experts + 1,), dtype=torch.int64))


@kernel_op("triton_moe::sort_by_expert")
def _sort_by_expert(
    expert_indices: Tensor, segment_expert_starts: Tensor, ranks_in_segment: Tensor, expert_row_offsets: Tensor,
    segment_assignments: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_to_flat, row_to_token, row_expert, flat_to_row), fields of ExpertSort; see
    kernels.router.sort_by_expert_segments."""
    return sort_by_expert_segments(expert_indices, segment_expert_starts, ranks_in_segment, expert_row_offsets,
                                 segment_assignments)


@_sort_by_expert.register_fake
def _(expert_indices, segment_expert_starts, ranks_in_segment, expert_row_offsets, segment_assignments):
    num_assignments = expert_indices.numel()
    rows = expert_indices.new_empty((num_assignments,), dtype=torch.int64)
    row_expert = rows.new_empty((num_assignments,), dtype=sort_key_dtype(segment_expert_starts.shape[1]))
    return rows, torch.empty_like(rows), row_expert, torch.empty_like(rows)


def fused_route(x: Tensor, router_weight: Tensor, config: MoEConfig) -> FusedRouting:
    """Route tokens `x` [N, hidden] with `router_weight` [E, hidden], as routing.route does, in fp32.

    The fields of Routing have route's dtypes and values: the same expert_indices, the weights, logits and aux loss
    up to fp32 rounding. Gradients reach x and router_weight from routing_weights, aux_loss and router_logits.
    sort_tables hands fused_sort_by_expert the route's per-segment expert counts, scanned.
    """
    top_k = config.num_active_experts
    # router_logits [N, E]; routing_weights, expert_indices [N, k]; aux_loss []; segment_expert_starts [segments, E];
    # ranks_in_segment [N, k]; tokens_per_expert [E]; expert_row_offsets [E + 1]
    router_logits, routing_weights, expert_indices, aux_loss, *sort_tables = _route_with_autograd(
        x, router_weight, top_k, config.normalize_weights, float(config.load_balance_coef),
        float(config.z_loss_coef))
    segment_tokens = route_segment_tokens(x.shape[0], router_weight.shape[0])
    sort_tables = SortTables(segment_tokens * top_k, *sort_tables)
    return FusedRouting(router_logits, routing_weights, expert_indices, aux_loss, sort_tables)


def fused_sort_by_expert(expert_indices: Tensor, num_experts: int,
                         sort_tables: SortTables | None = None) -> ExpertSort:
    """Sort the assignments of `expert_indices` [N, k] (int32/int64 in [0, num_experts)) by expert, stably: the
    ExpertSort of routing.sort_by_expert, field for field, dtype for dtype.

    sort_tables: FusedRouting.sort_tables of the route that gave these indices, which spares the counting
    launches; None counts here (any indices, a token may even list an expert twice).
    """
    compiling = torch.compiler.is_compiling()
    if sort_tables is None:
        count = _count_expert_segments if compiling else count_expert_segments
        sort_tables = SortTables(SORT_SEGMENT_ASSIGNMENTS,
                                           *count(expert_indices, num_experts, SORT_SEGMENT_ASSIGNMENTS))
    elif sort_tables.tokens_per_expert.shape != (num_experts,):
        raise ValueError(f"sort_tables must count num_experts = {num_experts} experts, got tokens_per_expert "
                         f"of shape {tuple(sort_tables.tokens_per_expert.shape)}")
    sort = _sort_by_expert if compiling else sort_by_expert_segments
    row_to_flat, row_to_token, row_expert, flat_to_row = sort(
        expert_indices, sort_tables.segment_expert_starts, sort_tables.ranks_in_segment,
        sort_tables.expert_row_offsets, sort_tables.segment_assignments)
    return ExpertSort(row_to_flat, row_to_token, row_expert, flat_to_row, sort_tables.tokens_per_expert,
                      sort_tables.expert_row_offsets)
