"""The expert MLP of one MoE layer, from routed tokens to the combined output: its forward and backward over the
Triton kernels, registered as torch.library custom ops with their autograd (see below), so torch.compile works.

Forward (R = N * k expert-sorted rows; hidden activations are [R, max_width] matrices, kernels/layout.py):
    up_projection      x [N, H] gathered by row_to_token, @ w1_eᵀ (and v1_eᵀ); the epilogue applies the
                       activation and the row's routing weight w_r = routing_weights[row_to_flat[r]]
                       -> h_pre, (h_up), h_act_weighted = act(h_pre[, h_up]) * w_r          [R, max_width] each
                       and, for the backward, the rows it gathered: sorted_x [R, H] = x[row_to_token] (when
                       tuning.sorted_rows_pay_off: large problems on Hopper; and MoEConfig.keep_sorted_x)
    down_projection    h_act_weighted @ w2_e -> y_rows [R, H]
    combine_rows       sum of each token's k rows, in slot order -> out [N, H]
Backward:
    down_projection_backward   dA = grad_out gathered by row_to_token, @ w2_eᵀ (where it pays off, the rows it
                               gathers are written to sorted_grad_out [R, H]); the activation recomputed from h_pre
                               (in dA's epilogue for large relu²/gelu problems, else a row pass after it) gives
                               dh_pre, (dh_up), and the routing-weight gradients, written back through row_to_flat
                               in (token, slot) order
    weight_grad                dw2_e = Σ_r h_act_weighted[r] ⊗ sorted_grad_out[r] (or grad_out[token(r)], gathered)
    input_grad_rows + combine  dx = Σ_slots dh_pre @ w1_e (+ dh_up @ v1_e)
    weight_grad                dw1_e = Σ_r dh_pre[r] ⊗ sorted_x[r] (or x[token(r)]; dv1 in the same launch)
Saved for backward: x (and sorted_x when kept), the weights, h_pre (and h_up), the routing weights and the small index
tensors, and for large problems h_act_weighted. Keeping h_act_weighted costs one hidden-activation matrix; in
exchange dW2 is the same plain GEMM as dW1, where recomputing the activation and the weight on its operand tiles
made it the slowest GEMM of a large problem's step. Small problems recompute it there, which costs little, and keep
the memory. Keeping sorted_x costs R·H (k times x); in exchange dW1 reads its token rows in order, by TMA
(docs/tuning.md). Nothing here reads a device value on the host: every shape follows from N, k and the widths.
Dtypes: the GEMMs run in the compute dtype (autocast's, for the module). x and the weights come in their own dtypes
(fp32 parameters under autocast) and are cast inside the forward, which keeps the copies for the backward; the
combine writes the output in x's dtype, the backward casts grad_out once, and the kernels that sum dx and the
weight gradients in fp32 write them in x's and the weights' dtypes (but for the persistent weight-gradient kernel,
kernels/grouped_gemm.weight_grad). Casts at the autograd level would cost a launch and a graph node each way for
each of x, w1, (v1,) w2 and the output.
"""

import torch
from torch import Tensor

from triton_moe.kernels import (ExpertLayout, combine_rows, down_projection, down_projection_backward,
                                input_grad_rows, sorted_rows_pay_off, up_projection, weight_grad)
from triton_moe.kernels.host import FLOAT_DTYPES, running_in_interpreter
from triton_moe.routing import ExpertSort


def kernel_op(name: str):
    """Decorator: the function, whose launchers (kernels/) launch Triton kernels, as the torch.library custom op
    `name`. On a GPU it is a triton_op: Inductor decomposes it into the kernel launches it makes and launches them
    from its generated code, without the launchers' host time. Inductor cannot launch the interpreter's kernels, so
    under Triton's CPU interpreter it is an opaque custom_op."""
    define = torch.library.custom_op if running_in_interpreter() else torch.library.triton_op
    return lambda fn: define(name, fn, mutates_args=())


def _layout(row_to_token: Tensor, expert_row_offsets: Tensor, expert_width_offsets: Tensor,
            expert_widths: list[int]) -> ExpertLayout:
    """The kernels' layout from the custom ops' arguments (which take no dataclass)."""
    return ExpertLayout(expert_row_offsets, expert_width_offsets, expert_widths, row_to_token.shape[0])


def _keeps_weighted_activations(x: Tensor, num_rows: int) -> bool:
    """Whether the forward keeps h_act_weighted for dW2: where dW2 reads grad_out's rows sorted, by TMA (large
    problems), a plain operand keeps that GEMM at its rate; elsewhere dW2 recomputes its operand from h_pre as it
    loads it, and the layer keeps one hidden-activation matrix less."""
    return sorted_rows_pay_off(x, num_rows)


def _top_k(x: Tensor, flat_to_row: Tensor) -> int:
    return flat_to_row.shape[0] // x.shape[0] if x.shape[0] else 1


def _in_compute_dtype(tensor: Tensor | None, compute_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """(tensor in compute_dtype, the copy made for it or None where the tensor already is): the copy is an output
    of the forward, which keeps it for the backward."""
    if tensor is None or tensor.dtype == compute_dtype:
        return tensor, None
    copy = tensor.to(compute_dtype)
    return copy, copy


# The forward and backward run as torch.library custom ops under torch.compile (kernel_op): Dynamo sees each as
# one node, with the shapes from the fake implementations, and Inductor launches the kernels they make; eager calls
# run the same two functions without the custom ops' dispatch (ExpertMLP). A custom op returns no None and no alias
# of an input: the unused h_up of a non-gated activation, its gradient dv1, and the compute-dtype copies of inputs
# that already are in the compute dtype, are 1-D empty tensors.
def expert_mlp_forward(
    x: Tensor, routing_weights: Tensor, w1: Tensor, v1: Tensor | None, w2: Tensor,
    row_to_token: Tensor, row_to_flat: Tensor, flat_to_row: Tensor, expert_row_offsets: Tensor,
    expert_width_offsets: Tensor, expert_widths: list[int], activation: str, keep_sorted_x: bool,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [N, H] in x's dtype, h_pre [R, max_width], h_up [R, max_width] or [0] unless gated, h_act_weighted
    [R, max_width] or [0] where the backward recomputes it (_keeps_weighted_activations), sorted_x [R, H] (x's rows
    in expert-sorted order, which dW1 then reads instead of gathering x) or [0, H] without keep_sorted_x or where the
    copy does not pay off (tuning.sorted_rows_pay_off: decided here and in the fake, not in the traced caller, so
    that Dynamo never traces the tuning's cached device queries), then the copies of x, w1, v1, w2 in compute_dtype,
    each [0] where the input already is in it). The GEMMs run in compute_dtype; the combine writes the output in
    x's dtype from its fp32 sums."""
    layout = _layout(row_to_token, expert_row_offsets, expert_width_offsets, expert_widths)
    token_rows, x_copy = _in_compute_dtype(x, compute_dtype)  # (N, H)
    (w1, w1_copy), (v1, v1_copy), (w2, w2_copy) = (_in_compute_dtype(w, compute_dtype) for w in (w1, v1, w2))
    keep_sorted_x = keep_sorted_x and sorted_rows_pay_off(token_rows, layout.num_rows)
    sorted_x = token_rows.new_empty((layout.num_rows if keep_sorted_x else 0, x.shape[1]))  # (R, H), by the up GEMM
    h_pre, h_up, h_act_weighted = up_projection(
        token_rows, w1, v1, row_to_token, layout, activation, routing_weights, routing_weight_index=row_to_flat,
        sorted_x=sorted_x if keep_sorted_x else None)  # (R, max_width) each
    y_rows = down_projection(h_act_weighted, w2, layout)  # (R, H)
    out = combine_rows(y_rows, flat_to_row, _top_k(x, flat_to_row), out_dtype=x.dtype)  # (N, H)
    if not _keeps_weighted_activations(token_rows, layout.num_rows):
        h_act_weighted = x.new_empty(0)
    return (out, h_pre, x.new_empty(0) if h_up is None else h_up, h_act_weighted, sorted_x,
            *(x.new_empty(0) if copy is None else copy for copy in (x_copy, w1_copy, v1_copy, w2_copy)))


def expert_mlp_backward(
    grad_out: Tensor, x: Tensor, sorted_x: Tensor | None, routing_weights: Tensor, w1: Tensor, v1: Tensor | None,
    w2: Tensor, h_pre: Tensor, h_up: Tensor | None, h_act_weighted: Tensor | None, row_to_token: Tensor,
    row_to_flat: Tensor, flat_to_row: Tensor, expert_row_offsets: Tensor, expert_width_offsets: Tensor,
    expert_widths: list[int], activation: str, weight_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx [N, H] in grad_out's dtype, d_routing_weights [N*k] fp32, dw1, dv1 ([0] unless gated), dw2 [TW, H] in
    weight_dtype). x, w1, v1, w2: in the compute dtype, as the forward's GEMMs took them; sorted_x: the forward's
    [R, H], or None where it kept none (then dW1 gathers x's rows); h_act_weighted: the forward's, or None where it
    kept none (then dW2 recomputes it)."""
    layout = _layout(row_to_token, expert_row_offsets, expert_width_offsets, expert_widths)
    grad_out_rows, _ = _in_compute_dtype(grad_out, w2.dtype)  # (N, H)
    # dW2 reads grad_out's rows sorted, written by the dA GEMM on the way, where that pays off (large problems)
    sorted_grad_out = None
    if sorted_rows_pay_off(grad_out_rows, layout.num_rows):
        sorted_grad_out = grad_out_rows.new_empty((layout.num_rows, grad_out.shape[1]))  # (R, H)
    dh_pre, dh_up, d_routing_weights = down_projection_backward(
        grad_out_rows, w2, h_pre, h_up, row_to_token, layout, routing_weights, activation,
        routing_weight_index=row_to_flat, sorted_grad_out=sorted_grad_out)  # (R, max_width) each; (N*k,)
    # the token rows each weight gradient reads: (sorted copy, None), or (token rows, row_to_token) to gather them
    dw2_rows = (grad_out_rows, row_to_token) if sorted_grad_out is None else (sorted_grad_out, None)
    if h_act_weighted is not None:
        dw2, _ = weight_grad(h_act_weighted, None, *dw2_rows, layout, out_dtype=weight_dtype)  # (TW, H)
    else:  # from h_pre, h_act_weighted recomputed as the GEMM loads it
        dw2, _ = weight_grad(h_pre, h_up, *dw2_rows, layout, activation=activation, routing_weights=routing_weights,
                             routing_weight_index=row_to_flat, out_dtype=weight_dtype)  # (TW, H)
    del sorted_grad_out, dw2_rows
    dx_rows = input_grad_rows(dh_pre, w1, dh_up, v1, layout)  # (R, H)
    dx = combine_rows(dx_rows, flat_to_row, _top_k(x, flat_to_row), out_dtype=grad_out.dtype)  # (N, H)
    dw1_rows = (x, row_to_token) if sorted_x is None else (sorted_x, None)
    dw1, dv1 = weight_grad(dh_pre, dh_up, *dw1_rows, layout, out_dtype=weight_dtype)  # (TW, H) each
    return dx, d_routing_weights, dw1, dw1.new_empty(0) if dv1 is None else dv1, dw2


_forward_op = kernel_op("triton_moe::expert_mlp")(expert_mlp_forward)
_backward_op = kernel_op("triton_moe::expert_mlp_backward")(expert_mlp_backward)


NUM_TENSOR_INPUTS = 10  # x, routing_weights, w1, v1, w2, then the five layout tensors; then the host arguments


@_forward_op.register_fake
def _(x, routing_weights, w1, v1, w2, row_to_token, row_to_flat, flat_to_row, expert_row_offsets,
      expert_width_offsets, expert_widths, activation, keep_sorted_x, compute_dtype):
    num_rows = row_to_token.shape[0]
    hidden_shape = (num_rows, max(expert_widths))  # (R, max_width)
    copy_of = lambda tensor: (x.new_empty(0) if tensor is None or tensor.dtype == compute_dtype
                              else torch.empty_like(tensor, dtype=compute_dtype))
    token_rows = x.new_empty(x.shape, dtype=compute_dtype)
    keep_sorted_x = keep_sorted_x and sorted_rows_pay_off(token_rows, num_rows)
    sorted_x = token_rows.new_empty((num_rows if keep_sorted_x else 0, x.shape[1]))
    hidden = lambda: token_rows.new_empty(hidden_shape)
    h_act_weighted = hidden() if _keeps_weighted_activations(token_rows, num_rows) else x.new_empty(0)
    return (torch.empty_like(x), hidden(), x.new_empty(0) if v1 is None else hidden(), h_act_weighted, sorted_x,
            *(copy_of(tensor) for tensor in (x, w1, v1, w2)))


@_backward_op.register_fake
def _(grad_out, x, sorted_x, routing_weights, w1, v1, w2, h_pre, h_up, h_act_weighted, row_to_token, row_to_flat,
      flat_to_row, expert_row_offsets, expert_width_offsets, expert_widths, activation, weight_dtype):
    dw = lambda weight: torch.empty_like(weight, dtype=weight_dtype)
    return (torch.empty_like(grad_out), torch.empty_like(routing_weights), dw(w1), w1.new_empty(0) if v1 is None
            else dw(v1), dw(w2))


def saved_for_backward(inputs: tuple, output: tuple) -> tuple[tuple, tuple]:
    """(the tensors the backward reads, its host arguments) of the forward's inputs and outputs, in the order
    expert_mlp_backward takes them after grad_out. The empty outputs are None (the backward takes None for them):
    under torch.compile each saved tensor is an output of the forward graph and an input of the backward graph, with
    host work at both ends every step."""
    x, routing_weights, w1, v1, w2, *layout_tensors = inputs[:NUM_TENSOR_INPUTS]
    expert_widths, activation, _, _ = inputs[NUM_TENSOR_INPUTS:]
    _, h_pre, h_up, h_act_weighted, sorted_x, *copies = output
    saved_or_none = lambda tensor: tensor if tensor.shape[0] > 0 else None
    # the GEMMs' operands: the compute-dtype copy of each input, or the input itself where no copy was made
    x, w1, v1, w2 = (original if copy.dim() == 1 else copy for original, copy in zip((x, w1, v1, w2), copies))
    tensors = (x, saved_or_none(sorted_x), routing_weights, w1, v1, w2, h_pre, None if v1 is None else h_up,
               saved_or_none(h_act_weighted), *layout_tensors)
    return tensors, (expert_widths, activation, inputs[2].dtype)  # the weights' dtype: their gradients'


def _setup_context(ctx, inputs, output):
    saved_tensors, ctx.host_arguments = saved_for_backward(inputs, output)
    ctx.save_for_backward(*saved_tensors)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    # Autograd would otherwise hand the backward zero gradients for the hidden activations: a matrix each.
    ctx.set_materialize_grads(False)


def refuse_create_graph():
    """Raise where a backward of the layer runs with create_graph=True (grad mode on inside a backward). Its
    kernels run outside autograd, so a gradient it returned would differentiate again without the experts' terms:
    a gradient penalty's or a Hessian-vector product's result would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the Triton MoE layer's backward ran with create_graph=True, but its gradients cannot be differentiated "
            "again: its kernels run outside autograd, so second derivatives (a gradient penalty, Hessian-vector "
            "products) would miss the experts' terms. triton_moe.reference.MoEMLP, whose autograd is torch's, "
            "gives them")


def _backward(ctx, grads, backward) -> tuple:
    """The autograd backward of the forward above, its work done by `backward` (the custom op or the plain
    function); grads: the gradients of the forward's outputs, of which only out's is used."""
    refuse_create_graph()
    grad_out = grads[0]
    x, sorted_x, routing_weights, w1, v1, w2, h_pre, h_up, h_act_weighted, *layout_tensors = ctx.saved_tensors
    dx, d_routing_weights, dw1, dv1, dw2 = backward(
        grad_out.contiguous(), x, sorted_x, routing_weights, w1, v1, w2, h_pre, h_up, h_act_weighted,
        *layout_tensors, *ctx.host_arguments)
    input_grads = (dx, d_routing_weights, dw1, None if v1 is None else dv1, dw2)
    return input_grads + (None,) * (ctx.num_inputs - len(input_grads))  # none for the layout and host arguments


_forward_op.register_autograd(lambda ctx, *grads: _backward(ctx, grads, _backward_op), setup_context=_setup_context)


class ExpertMLP(torch.autograd.Function):
    """The eager path of expert_mlp: the custom op's forward, setup_context and backward as plain Python, without
    the custom op's dispatch, whose host time (schema conversions, the autograd and backend layers, the alias check)
    is a large part of a small layer's step (docs/tuning.md). Under torch.compile the custom op runs instead
    (_expert_mlp)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = expert_mlp_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, grads, expert_mlp_backward)


def _expert_mlp(*inputs):
    return _forward_op(*inputs) if torch.compiler.is_compiling() else ExpertMLP.apply(*inputs)


def checked_host_arguments(x: Tensor, w1: Tensor, v1: Tensor | None, w2: Tensor, keep_sorted_x: bool,
                           compute_dtype: torch.dtype | None) -> tuple[bool, torch.dtype]:
    """(keep_sorted_x, compute_dtype) as the forward takes them, after checking x's, the weights' and the compute
    dtypes: keep_sorted_x only for a backward that computes dW1 (not under no_grad, nor with w1 and v1 frozen), and
    compute_dtype x's where it is None."""
    weight_dtypes = {weight.dtype for weight in (w1, v1, w2) if weight is not None}
    if len(weight_dtypes) != 1:
        raise ValueError(f"w1, v1 and w2 must have one dtype, got {sorted(map(str, weight_dtypes))}")
    if x.dtype not in FLOAT_DTYPES:  # under autocast too: the output comes back in x's dtype
        raise ValueError(f"x's dtype must be torch.float32, torch.float16 or torch.bfloat16, got {x.dtype}")
    compute_dtype = x.dtype if compute_dtype is None else compute_dtype
    if compute_dtype not in FLOAT_DTYPES:
        raise ValueError(f"compute_dtype (autocast's dtype where it is on) must be torch.float32, torch.float16 or "
                         f"torch.bfloat16, got {compute_dtype}")
    keep_sorted_x = (keep_sorted_x and torch.is_grad_enabled()
                     and any(weight is not None and weight.requires_grad for weight in (w1, v1)))
    return keep_sorted_x, compute_dtype


def expert_mlp(x: Tensor, routing_weights: Tensor, w1: Tensor, v1: Tensor | None, w2: Tensor, sort: ExpertSort,
               expert_width_offsets: Tensor, expert_widths: list[int], activation: str,
               keep_sorted_x: bool = True, compute_dtype: torch.dtype | None = None) -> Tensor:
    """The experts' MLPs on their routed rows and the weighted sum per token.

    x [N, H] (fp32, fp16, bf16), w1/v1/w2 [TW, H] in one dtype (v1 None unless swiglu), routing_weights [N*k] fp32
    (the routing weight of each (token, slot) assignment: Routing.routing_weights flattened; the kernels read it
    through sort.row_to_flat). sort: the assignments sorted by expert (routing.ExpertSort); expert_width_offsets
    [E+1] and expert_widths (host ints): the experts' rows of the weights. compute_dtype: the dtype the GEMMs run in
    (None: x's); x and the weights are cast to it inside, so that the gradients come back in their dtypes without a
    cast of their own (the weight gradients and dx are rounded once, from fp32 sums). Returns [N, H] in x's dtype;
    differentiable in x, routing_weights and the weights. keep_sorted_x: let the forward keep x's rows in
    expert-sorted order for dW1 where that pays off (MoEConfig's field of that name).
    """
    keep_sorted_x, compute_dtype = checked_host_arguments(x, w1, v1, w2, keep_sorted_x, compute_dtype)
    return _expert_mlp(x, routing_weights, w1, v1, w2, sort.row_to_token, sort.row_to_flat, sort.flat_to_row,
                       sort.expert_row_offsets, expert_width_offsets, list(expert_widths), activation,
                       keep_sorted_x, compute_dtype)[0]
