"""Top-k routing and the expert sort, in plain torch; shared by the Triton layer and the stk reference.

Nothing here synchronises with the device: every size is known from the input's shape.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triton_moe.config import MoEConfig


@dataclass
class Routing:
    router_logits: torch.Tensor  # [N, E] fp32
    routing_weights: torch.Tensor  # [N, k] fp32, renormalised to sum 1 when config.normalize_weights
    expert_indices: torch.Tensor  # [N, k] int64, experts of each token in descending probability, ties to the
    # lower expert index
    aux_loss: torch.Tensor  # [] fp32: load_balance_coef * load-balancing loss + z_loss_coef * z-loss


@dataclass
class ExpertSort:
    """The N*k (token, slot) assignments sorted by expert, stably: by expert, then token, then slot."""

    row_to_flat: torch.Tensor  # [N*k] int64: flat assignment index token*k + slot of each sorted row
    row_to_token: torch.Tensor  # [N*k] int64: token of each sorted row
    row_expert: torch.Tensor  # [N*k] int16 (int32 past 32767 experts): expert of each sorted row, non-decreasing
    flat_to_row: torch.Tensor  # [N*k] int64: sorted row of each flat assignment (inverse of row_to_flat)
    tokens_per_expert: torch.Tensor  # [E] int64
    expert_row_offsets: torch.Tensor  # [E + 1] int64: rows of expert e are offsets[e]:offsets[e + 1]


def top_k_experts(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] int64: each token's k largest logits' experts in descending order, the rule every implementation
    follows. Picked on the logits rather than the probabilities, whose rounding can tie two different logits; equal
    logits go to the lower expert index first and NaN ranks above everything (a stable descending sort)."""
    return torch.sort(router_logits, dim=-1, descending=True, stable=True).indices[:, :k]


def route(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig) -> Routing:
    """Route tokens `x` [N, hidden] with `router_weight` [E, hidden]; logits and losses in fp32."""
    num_tokens = x.shape[0]
    k = config.num_active_experts
    with torch.autocast(device_type=x.device.type, enabled=False):
        router_logits = F.linear(x.float(), router_weight.float())  # [N, E]
    probs = torch.softmax(router_logits, dim=-1)  # [N, E]
    expert_indices = top_k_experts(router_logits, k)  # [N, k]
    routing_weights = probs.gather(1, expert_indices)  # [N, k]
    if config.normalize_weights:
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)

    # Sums divided by max(count, 1) rather than means, so that N = 0 gives a zero loss, not NaN.
    assignments_per_expert = torch.zeros(config.num_experts, device=x.device, dtype=torch.float32)
    assignments_per_expert.index_add_(0, expert_indices.flatten(), torch.ones_like(routing_weights.flatten()))
    fraction_routed = assignments_per_expert / max(num_tokens * k, 1)  # f_e [E]
    mean_prob = probs.sum(dim=0) / max(num_tokens, 1)  # P_e [E]
    load_balance_loss = config.num_experts * (fraction_routed * mean_prob).sum()
    z_loss = torch.logsumexp(router_logits, dim=-1).square().sum() / max(num_tokens, 1)
    aux_loss = config.load_balance_coef * load_balance_loss + config.z_loss_coef * z_loss
    return Routing(router_logits, routing_weights, expert_indices, aux_loss)


def sort_key_dtype(num_experts: int) -> torch.dtype:
    """The dtype of the expert ids the sort orders (ExpertSort.row_expert): int16, or int32 past 32767 experts.
    Radix sort makes one pass per key byte: 16-bit keys take 2 passes where the int64 indices would take 8."""
    return torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32


def sort_by_expert(expert_indices: torch.Tensor, num_experts: int) -> ExpertSort:
    """Sort the assignments of `expert_indices` [N, k] by expert (stable, so token then slot order is kept)."""
    flat_experts = expert_indices.flatten().to(sort_key_dtype(num_experts))  # [N*k]
    row_expert, row_to_flat = torch.sort(flat_experts, stable=True)  # [N*k] each
    k = expert_indices.shape[1]
    row_to_token = torch.div(row_to_flat, k, rounding_mode="floor")
    flat_to_row = torch.empty_like(row_to_flat)
    flat_to_row[row_to_flat] = torch.arange(row_to_flat.numel(), device=row_to_flat.device)
    # searchsorted on the sorted experts gives the offsets without a histogram (whose CUDA version syncs).
    expert_ids = torch.arange(num_experts + 1, device=flat_experts.device, dtype=row_expert.dtype)
    expert_row_offsets = torch.searchsorted(row_expert, expert_ids)  # [E + 1]
    tokens_per_expert = expert_row_offsets.diff()  # [E]
    return ExpertSort(row_to_flat, row_to_token, row_expert, flat_to_row, tokens_per_expert, expert_row_offsets)
