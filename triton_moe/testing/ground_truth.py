"""The ground truth everything is checked against: a plain per-expert loop in fp64, and the error measures.

Deliberately naive (a Python loop over experts, dense matmuls), so that it is easy to trust by reading.
"""

import torch

from triton_moe.activations import apply_activation
from triton_moe.config import MoEConfig
from triton_moe.routing import top_k_experts

# Bounds against the fp64 loop, per compute dtype: max |a - b| / max |b| (error relative to the tensor's scale),
# relative L2 error ||a - b|| / ||b|| (sees a wrong scale or a missing part, which cosine does not) and cosine
# similarity. fp32 is IEEE arithmetic throughout; 16-bit bounds allow for rounding of the operands and of the
# stored hidden activations. rel_l2 from measurements (grad_similarity, check_intermediates; README "How we know
# the checks work"): fp32 <= 6e-7 against fp64 and Triton vs stk (CPU); fp16 <= 6.3e-4 against fp64 (CPU);
# bf16 gradients 3-5.3e-3 against fp64 and <= 5.2e-3 Triton vs stk (H100). Each bound is 2-15x above those.
TOLERANCES = {
    torch.float32: dict(max_rel=1e-4, rel_l2=1e-5, cosine=0.99999),
    torch.float16: dict(max_rel=1e-2, rel_l2=2e-3, cosine=0.9995),
    torch.bfloat16: dict(max_rel=5e-2, rel_l2=1e-2, cosine=0.999),
}


def dense_loop_moe(config: MoEConfig, params: dict, x: torch.Tensor) -> dict:
    """A plain per-expert loop in fp64: routing, each expert's MLP on its tokens, weighted sum.

    `params` holds fp64 tensors router [E, H], w1, (v1), w2 [total_width, H]; x is [N, H] fp64. Returns the
    same keys as `forward_with_intermediates`, rows in the same order (by expert, then token, then slot).
    """
    k, num_experts = config.num_active_experts, config.num_experts
    logits = x @ params["router"].T  # [N, E]
    probs = logits.softmax(dim=-1)
    indices = top_k_experts(logits, k)  # [N, k]: the routing rule every implementation follows
    weights = probs.gather(1, indices)  # [N, k]
    if config.normalize_weights:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts = torch.stack([(indices == e).sum() for e in range(num_experts)])
    num_tokens = x.shape[0]
    load_balance = num_experts * ((counts / max(num_tokens * k, 1)) * probs.sum(0) / max(num_tokens, 1)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().sum() / max(num_tokens, 1)
    aux = config.load_balance_coef * load_balance + config.z_loss_coef * z_loss

    output = torch.zeros_like(x)
    rows_token, rows_x, rows_y, h_pre, h_up, h_act = [], [], [], [], [], []
    # Each weight split into its experts' rows once: the backward then joins their gradients in one cat, where a
    # slice per expert would add a zero-filled [total_width, H] gradient per expert.
    w1, w2 = params["w1"].split(config.expert_widths), params["w2"].split(config.expert_widths)
    v1 = params["v1"].split(config.expert_widths) if config.is_gated else None
    for e in range(num_experts):
        tokens, slots = (indices == e).nonzero(as_tuple=True)  # row-major: by token, then slot
        x_e = x[tokens]
        pre = x_e @ w1[e].T
        up = x_e @ v1[e].T if config.is_gated else None
        act = apply_activation(config.activation, pre, up)
        y_e = act @ w2[e]
        output = output.index_add(0, tokens, y_e * weights[tokens, slots][:, None])
        rows_token.append(tokens)
        rows_x.append(x_e)
        rows_y.append(y_e)
        h_pre.append(pre)
        h_up.append(up)
        h_act.append(act)
    result = dict(
        router_logits=logits, expert_indices=indices, routing_weights=weights, tokens_per_expert=counts,
        row_to_token=torch.cat(rows_token), sorted_x=torch.cat(rows_x), h_pre=h_pre, h_act=h_act,
        y_expert=torch.cat(rows_y), output=output, aux_loss=aux,
    )
    if config.is_gated:
        result["h_up"] = h_up
    return result


def fp64_params(layer) -> dict:
    params = {"router": layer.router.weight, "w1": layer.w1, "w2": layer.w2}
    if layer.v1 is not None:
        params["v1"] = layer.v1
    return {name: p.detach().double().requires_grad_() for name, p in params.items()}


def layer_grads(layer) -> dict:
    grads = {"router": layer.router.weight.grad, "w1": layer.w1.grad, "w2": layer.w2.grad}
    if layer.v1 is not None:
        grads["v1"] = layer.v1.grad
    return grads


def run_layer(layer, x, upstream):
    """(intermediates, grads) of one forward_with_intermediates of `layer` on x and the backward of
    <output, upstream> + aux_loss; grads are keyed x, router, w1, (v1), w2."""
    x = x.detach().requires_grad_()
    intermediates = layer.forward_with_intermediates(x)
    ((intermediates["output"].float() * upstream.float()).sum() + intermediates["aux_loss"]).backward()
    return intermediates, {"x": x.grad, **layer_grads(layer)}


def run_with_loop(layer, x, upstream):
    """Intermediates and gradients of `layer` and of the fp64 loop on the same weights, input and upstream grad.

    The loss is <output, upstream> + aux_loss. Returns (got, want, got_grads, want_grads); grads are keyed
    x, router, w1, (v1), w2.
    """
    got, got_grads = run_layer(layer, x, upstream)
    params = fp64_params(layer)
    x64 = x.detach().double().reshape(-1, x.shape[-1]).requires_grad_()
    want = dense_loop_moe(layer.config, params, x64)
    ((want["output"] * upstream.double().reshape(want["output"].shape)).sum() + want["aux_loss"]).backward()
    want_grads = {"x": x64.grad.view(x.shape), **{name: p.grad for name, p in params.items()}}
    want["output"] = want["output"].view(x.shape)
    return got, want, got_grads, want_grads


def max_rel_error(got, want) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / scale if scale > 0 else (got - want).abs().max().item()


def rel_l2_error(got, want) -> float:
    """||got - want|| / ||want||: sees a wrong scale, which cosine does not."""
    got, want = got.double().flatten().cpu(), want.double().flatten().cpu()
    norm = want.norm().item()
    return (got - want).norm().item() / norm if norm > 0 else (got - want).norm().item()


def cosine(got, want) -> float:
    got, want = got.double().flatten().cpu(), want.double().flatten().cpu()
    if got.norm() == 0 and want.norm() == 0:
        return 1.0
    return torch.nn.functional.cosine_similarity(got, want, dim=0).item()
