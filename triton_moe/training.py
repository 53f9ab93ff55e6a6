"""Helpers for training code around MoE layers: what to log, and what a token costs (for MFU).

    loss = task_loss + aux_loss(model)                       # triton_moe.aux_loss: every MoE layer's last forward
    expert_load(model)                                       # {layer name: fraction of assignments per expert [E]}
    active_parameters(model)                                 # the parameters one token runs through
    flops_per_token(model, seq_len)                          # 6 × active parameters + attention, as nanoGPT counts

An MoE layer holds every expert's weights but runs each token through its top-k experts only, so the model's
parameter count overstates a token's work: nanoGPT's estimate_mfu, fed the whole count, reads too high.
"""

import torch
import torch.nn as nn

from triton_moe.config import check_bool, require_int
from triton_moe.layer import MoELayer, check_model


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """{name: layer} of every MoE layer in `model`."""
    check_model(model)
    return {name: module for name, module in model.named_modules() if isinstance(module, MoELayer)}


def expert_load(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: [E] fp32 fraction of the last forward's (token, slot) assignments that went to each expert}.

    Kept on the device like the aux loss; reading the values (.tolist(), logging) synchronises. A layer that has
    not run yet is left out. A balanced router gives 1/E each.
    """
    loads = {}
    for name, layer in moe_layers(model).items():
        if layer.tokens_per_expert is not None:
            counts = layer.tokens_per_expert.float()
            loads[name] = counts / counts.sum().clamp(min=1.0)
    return loads


def _expert_parameters_per_row(layer: MoELayer) -> int:
    """Weights of one row of w1 (and v1) and w2: what one unit of expert width holds."""
    return layer.config.hidden_size * (3 if layer.config.is_gated else 2)


def active_parameters(model: nn.Module, from_last_forward: bool = False) -> int:
    """The parameters one token runs through: every parameter outside the experts (the routers included), and
    per MoE layer top-k experts' weights.

    from_last_forward=False: top-k experts of the mean width (with variable widths, what a balanced router
    gives); True: weighted by where the last forward's tokens went (expert_load; reads the counts to the host).
    Every parameter counts, the embeddings too (nanoGPT's get_num_params leaves out the position embeddings).
    """
    check_bool("from_last_forward", from_last_forward)
    layers = moe_layers(model)
    total = sum(param.numel() for param in model.parameters())
    for layer in layers.values():
        config = layer.config
        per_row = _expert_parameters_per_row(layer)
        total -= layer.w1.shape[0] * per_row  # the rows this layer holds (fewer under expert parallelism)
        if from_last_forward and layer.tokens_per_expert is not None:
            counts = layer.tokens_per_expert.double().cpu()
            widths = torch.tensor(config.expert_widths, dtype=torch.float64)
            routed_width = float((counts * widths).sum() / counts.sum().clamp(min=1.0))
        else:
            routed_width = config.total_width / config.num_experts
        total += round(config.num_active_experts * routed_width * per_row)
    return total


def flops_per_token(model: nn.Module, seq_len: int, n_layer: int, n_embd: int,
                    from_last_forward: bool = False) -> float:
    """Training FLOPs per token, as nanoGPT's estimate_mfu counts them (PaLM's appendix B): 6 × active parameters
    for the matrix products of forward and backward, plus 12 × n_layer × n_embd × seq_len for attention."""
    require_int("seq_len", seq_len, minimum=1)
    require_int("n_layer", n_layer, minimum=0)
    require_int("n_embd", n_embd, minimum=1)
    return 6 * active_parameters(model, from_last_forward) + 12 * n_layer * n_embd * seq_len
