"""MoEMLP's whole eager layer as one autograd node: the route (router_ops.route_forward), the expert sort
(kernels/sort.py) and the expert MLP (ops.expert_mlp_forward) forward, and their backwards in reverse.

    moe_layer(x, router_weight, w1, v1, w2, expert_width_offsets, config, compute_dtype)
        -> (out [..., H] in x's dtype, aux_loss [] fp32, tokens_per_expert [E] int64), x [..., H]

The same functions in the same order as the route's and the expert MLP's own autograd (router_ops.fused_route,
router_ops.fused_sort_by_expert, ops.expert_mlp), so the same kernels give the same bits; what it saves is host
time: one node instead of two, no dataclasses between them, no views in the graph (of x's tokens, of the output,
of the routing weights). On a nanoGPT-sized step the host's time is the step's. torch.compile takes the custom ops
of those two modules instead: this is the eager path only.
"""

import torch
from torch import Tensor

from triton_moe.config import MoEConfig
from triton_moe.kernels.route import route_segment_tokens
from triton_moe.kernels.sort import sort_by_expert_segments
from triton_moe.ops import (checked_host_arguments, expert_mlp_backward, expert_mlp_forward, refuse_create_graph,
                            saved_for_backward)
from triton_moe.router_ops import route_backward, route_forward

_NUM_INPUTS = 14  # MoELayerFunction.forward's arguments after ctx


class MoELayerFunction(torch.autograd.Function):
    """Route, sort and expert MLP forward; expert MLP and route backward. The backward sums x's two gradients
    (through the experts and through the router) as autograd sums them where the two are nodes of their own."""

    @staticmethod
    def forward(ctx, x, router_weight, w1, v1, w2, expert_width_offsets, expert_widths, activation, keep_sorted_x,
                compute_dtype, top_k, normalize_weights, load_balance_coef, z_loss_coef):
        # x [..., H] flattened here, and the output and x's gradient shaped back, leave no view nodes in the graph.
        ctx.x_shape = x.shape
        x = x.reshape(-1, x.shape[-1]).contiguous()  # (N, H)
        # router_logits [N, E] fp32; routing_weights, expert_indices [N, k]; aux_loss []; segment_expert_starts
        # [segments, E]; ranks_in_segment [N, k]; tokens_per_expert [E]; expert_row_offsets [E + 1]
        (router_logits, routing_weights, expert_indices, aux_loss, segment_expert_starts, ranks_in_segment,
         tokens_per_expert, expert_row_offsets) = route_forward(x, router_weight, top_k, normalize_weights,
                                                                load_balance_coef, z_loss_coef)
        segment_assignments = route_segment_tokens(x.shape[0], router_weight.shape[0]) * top_k
        # [N*k] each: rows by expert, then token, then slot
        row_to_flat, row_to_token, _, flat_to_row = sort_by_expert_segments(
            expert_indices, segment_expert_starts, ranks_in_segment, expert_row_offsets, segment_assignments)
        expert_inputs = (x, routing_weights.view(-1), w1, v1, w2, row_to_token, row_to_flat, flat_to_row,
                         expert_row_offsets, expert_width_offsets, expert_widths, activation, keep_sorted_x,
                         compute_dtype)
        expert_outputs = expert_mlp_forward(*expert_inputs)
        expert_saved, ctx.expert_host_arguments = saved_for_backward(expert_inputs, expert_outputs)
        # x in its own dtype for the router's gradients; the expert MLP keeps its compute-dtype copy (or x again)
        ctx.save_for_backward(x, router_weight, router_logits, expert_row_offsets, *expert_saved)
        ctx.top_k, ctx.gated = top_k, v1 is not None
        ctx.route_arguments = (normalize_weights, load_balance_coef, z_loss_coef)
        ctx.mark_non_differentiable(tokens_per_expert)
        # Autograd would otherwise hand the backward a zero aux-loss gradient when the loss leaves the aux loss out.
        ctx.set_materialize_grads(False)
        return expert_outputs[0].view(ctx.x_shape), aux_loss, tokens_per_expert

    @staticmethod
    def backward(ctx, grad_out, grad_aux_loss, _):
        refuse_create_graph()
        x, router_weight, router_logits, expert_row_offsets, *expert_saved = ctx.saved_tensors
        num_tokens = x.shape[0]
        if grad_out is None:  # only the aux loss reached the loss
            grad_x = grad_w1 = grad_v1 = grad_w2 = None
            grad_routing_weights = router_logits.new_zeros(num_tokens * ctx.top_k)  # (N*k,)
        else:
            grad_x, grad_routing_weights, grad_w1, grad_v1, grad_w2 = expert_mlp_backward(
                grad_out.reshape(x.shape).contiguous(), *expert_saved, *ctx.expert_host_arguments)
            if not ctx.gated:  # no v1: its gradient is a placeholder
                grad_v1 = None
        grad_x_router, grad_router_weight = route_backward(
            grad_routing_weights.view(num_tokens, -1), None if grad_aux_loss is None else grad_aux_loss.contiguous(),
            None, x, router_weight, router_logits, expert_row_offsets, *ctx.route_arguments)
        grad_x = grad_x_router if grad_x is None else grad_x.add_(grad_x_router)
        grads = (grad_x.view(ctx.x_shape), grad_router_weight, grad_w1, grad_v1, grad_w2)
        return grads + (None,) * (_NUM_INPUTS - len(grads))


def layer_host_arguments(x: Tensor, w1: Tensor, v1: Tensor | None, w2: Tensor, expert_width_offsets: Tensor,
                         config: MoEConfig, compute_dtype: torch.dtype) -> tuple:
    """MoELayerFunction's arguments after the weights, checked: expert_width_offsets [E + 1] (the one tensor among
    them), then host values."""
    keep_sorted_x, compute_dtype = checked_host_arguments(x, w1, v1, w2, config.keep_sorted_x, compute_dtype)
    return (expert_width_offsets, config.expert_widths, config.activation, keep_sorted_x, compute_dtype,
            config.num_active_experts, config.normalize_weights, float(config.load_balance_coef),
            float(config.z_loss_coef))


def moe_layer(x: Tensor, router_weight: Tensor, w1: Tensor, v1: Tensor | None, w2: Tensor,
              expert_width_offsets: Tensor, config: MoEConfig, compute_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """(out [..., H] in x's dtype, aux_loss [] fp32, tokens_per_expert [E] int64) of tokens x [..., H] (at least
    one token) through MoEMLP's router and experts, as router_ops.fused_route, router_ops.fused_sort_by_expert and
    ops.expert_mlp give them; differentiable in x, router_weight and the weights (out and aux_loss)."""
    return MoELayerFunction.apply(
        x, router_weight, w1, v1, w2, *layer_host_arguments(x, w1, v1, w2, expert_width_offsets, config, compute_dtype))
