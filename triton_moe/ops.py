"""Autograd over the Triton kernels: the expert MLP of one MoE layer, from routed tokens to the combined output.

Forward (R = N * k expert-sorted rows, hidden activations ragged: expert e's rows are a [count_e, W_e] block):
    up_projection      x [N, H] gathered by row_to_token, @ w1_eᵀ (and v1_eᵀ), activation in the epilogue
                       -> h_pre, (h_up), h_act          ragged [Σ_e count_e * W_e]
    down_projection    h_act @ w2_e, times the row's routing weight in the epilogue -> y_rows [R, H]
    combine_rows       sum of each token's k rows, in slot order -> out [N, H]
Backward:
    down_projection_backward   grad_out gathered by row_to_token, @ w2_eᵀ; the epilogue recomputes the
                               activation from h_pre: routing-weight grads, dh_pre, (dh_up)
    down_weight_grad           dw2_e = Σ_r act(h_pre)[r] * w_r ⊗ grad_out[token(r)]
    input_grad_rows + combine  dx = Σ_slots dh_pre @ w1_e (+ dh_up @ v1_e)
    up_weight_grad             dw1_e = Σ_r dh_pre[r] ⊗ x[token(r)] (and dv1 in the same launch)
Saved for backward: x, the weights, h_pre (and h_up), the routing weights and the small index tensors.
h_act is not saved: the backward recomputes it from h_pre where it is needed.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triton_moe.kernels import (combine_rows, down_projection, down_projection_backward, down_weight_grad,
                                input_grad_rows, up_projection, up_weight_grad)
from triton_moe.routing import ExpertSort


@dataclass
class ExpertLayout:
    """Where each expert's rows and hidden activations lie, for one batch's routing."""

    row_to_token: torch.Tensor  # [R] token of each expert-sorted row
    flat_to_row: torch.Tensor  # [N*k] sorted row of each (token, slot)
    expert_row_offsets: torch.Tensor  # [E+1] rows of expert e: offsets[e]:offsets[e+1]
    expert_width_offsets: torch.Tensor  # [E+1] static: weight rows of expert e
    expert_widths: list[int]  # [E] host ints: they size the launch grids
    expert_h_offsets: torch.Tensor  # [E+1] int64: start of expert e's [count_e, W_e] block in a ragged buffer
    h_numel: int  # Σ_e count_e * W_e
    top_k: int

    @classmethod
    def from_sort(cls, sort: ExpertSort, expert_widths: list[int], expert_width_offsets: torch.Tensor,
                  expert_widths_tensor: torch.Tensor, top_k: int) -> "ExpertLayout":
        hidden_per_expert = sort.tokens_per_expert * expert_widths_tensor  # [E]
        expert_h_offsets = F.pad(hidden_per_expert.cumsum(0), (1, 0))  # [E+1] int64
        num_rows = sort.row_to_token.numel()
        if len(set(expert_widths)) == 1:
            h_numel = num_rows * expert_widths[0]
        else:
            # Variable widths: the ragged buffer's size depends on the routing, so it is read back to size the
            # allocation. This is the one host-device synchronisation of the layer.
            h_numel = int(expert_h_offsets[-1])
        return cls(sort.row_to_token, sort.flat_to_row, sort.expert_row_offsets, expert_width_offsets,
                   expert_widths, expert_h_offsets, h_numel, top_k)

    @property
    def num_rows(self) -> int:
        return self.row_to_token.numel()

    def offsets(self) -> tuple:
        """The layout arguments every grouped-GEMM launcher takes, in their order."""
        return self.expert_row_offsets, self.expert_width_offsets, self.expert_widths, self.expert_h_offsets


class ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_weights, w1, v1, w2, layout: ExpertLayout, activation: str):
        h_pre, h_up, h_act = up_projection(x, w1, v1, layout.row_to_token, *layout.offsets(), layout.h_numel,
                                           activation)  # ragged [h_numel] each
        y_rows = down_projection(h_act, w2, *layout.offsets(), layout.num_rows, row_weights)  # [R, H]
        out = combine_rows(y_rows, layout.flat_to_row, layout.top_k)  # [N, H]
        ctx.save_for_backward(x, row_weights, w1, v1, w2, h_pre, h_up)
        ctx.layout, ctx.activation = layout, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, row_weights, w1, v1, w2, h_pre, h_up = ctx.saved_tensors
        layout, activation = ctx.layout, ctx.activation
        grad_out = grad_out.contiguous()  # [N, H]
        dh_pre, dh_up, d_row_weights = down_projection_backward(
            grad_out, w2, h_pre, h_up, layout.row_to_token, *layout.offsets(), row_weights, activation)
        dw2 = down_weight_grad(h_pre, h_up, grad_out, layout.row_to_token, *layout.offsets(), row_weights,
                               activation)  # [TW, H]
        dx_rows = input_grad_rows(dh_pre, w1, dh_up, v1, *layout.offsets(), layout.num_rows)  # [R, H]
        dx = combine_rows(dx_rows, layout.flat_to_row, layout.top_k)  # [N, H]
        dw1, dv1 = up_weight_grad(dh_pre, dh_up, x, layout.row_to_token, *layout.offsets())  # [TW, H] each
        return dx, d_row_weights, dw1, dv1, dw2, None, None


def expert_mlp(x, row_weights, w1, v1, w2, layout: ExpertLayout, activation: str) -> torch.Tensor:
    """The experts' MLPs on their routed rows and the weighted sum per token.

    x [N, H], w1/v1/w2 [TW, H] in one dtype (fp32, fp16, bf16; v1 None unless swiglu), row_weights [R] fp32
    (routing weight of each expert-sorted row). Returns [N, H] in x's dtype; differentiable in x, row_weights
    and the weights.
    """
    return ExpertMLP.apply(x, row_weights, w1, v1, w2, layout, activation)
