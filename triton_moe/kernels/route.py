"""The route in a few launches: top-k softmax over router logits, the aux loss, the counts the expert sort takes,
and the backward.

Forward (N tokens, E experts, k slots; the tokens are cut into segments of route_segment_tokens(N, E)):
    _topk_softmax_kernel       per segment: softmax, top-k, (renormalised) weights, expert indices, and per segment
                               the partials of the aux loss (sums of probabilities, sums of lse²) and of the sort
                               (assignment counts, each assignment's rank in its segment)
    sort._segment_table_kernel per chunk of experts: scans the [segments, E] counts over the segments (the sort's
                               segment starts, assignments per expert) and sums the aux loss's partials; the last
                               program to finish scans the experts' totals (expert_row_offsets) and adds up the aux loss
Backward:
    _topk_softmax_backward_kernel   per tile of tokens: recomputes the softmax and the top-k picks from the logits
                                    -> grad of the logits (fp32, or split into two 16-bit halves for the router's
                                    tensor-core GEMMs)
Every reduction runs in a fixed order, so every result is bitwise reproducible. Every size follows from the input
shapes, so nothing synchronises with the host.
"""

import torch
import triton
import triton.language as tl

from triton_moe.kernels.host import (ceil_div, check_int, check_tensor_dim, check_tensor_shape, next_power_of_2,
                                     traceable)
from triton_moe.kernels.sort import check_shape, launch_segment_table, no_sort_tables
from triton_moe.kernels.tuning import (INTERPRETER_ROUTE_TILE_ELEMENTS, ROUTE_BACKWARD_ELEMENTS_PER_THREAD,
                                       ROUTE_BACKWARD_TILE_ELEMENTS, ROUTE_SEGMENT_TOKENS, ROUTE_FORWARD_NUM_WARPS,
                                       ROUTE_MIN_SEGMENTS, ROUTE_TILE_ELEMENTS, running_in_interpreter)

# The largest finite fp32: real experts whose logit is -inf still rank above padding and taken experts (-inf).
_FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _softmax_rows(logits_ptr, tokens, experts, num_tokens, num_experts):
    """(probs, lse, logits) of a [tokens, EXPERTS_POW2] tile; padding experts have logit -inf, probability 0.

    Tokens past the last read logits 0 rather than -inf, so that their softmax stays finite (it is then ignored).
    """
    token_mask = tokens < num_tokens
    expert_mask = experts < num_experts
    logits = tl.load(logits_ptr + tokens[:, None] * num_experts + experts[None, :],
                     mask=token_mask[:, None] & expert_mask[None, :], other=0.0)
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    exp_shifted = tl.exp(logits - row_max[:, None])
    exp_sum = tl.sum(exp_shifted, axis=1)
    probs = exp_shifted / exp_sum[:, None]
    lse = row_max + tl.log(exp_sum)
    return probs, lse, logits


@triton.jit
def _top_k_scores(logits, expert_mask):
    """What the top k are picked on, slot by slot (argmax, ties to the lowest expert, the pick then set to -inf).

    Softmax is monotonic, so the top k are picked on the logits, exactly, whatever rounding the exponential has
    here or in torch. Like torch.topk on probabilities, NaN ranks above everything, ties go to the lowest expert,
    and a real expert even at logit -inf ranks above padding and taken experts: every pick is a real, new expert.
    The forward and the backward pick from these scores alike, so the backward finds the forward's experts.
    """
    scores = tl.where(logits != logits, float("inf"), tl.maximum(logits, -_FP32_MAX))
    return tl.where(expert_mask[None, :], scores, float("-inf"))


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, routing_weights_ptr, expert_indices_ptr, ranks_in_segment_ptr,
    segment_prob_sums_ptr, segment_expert_counts_ptr, segment_lse_sq_sums_ptr, table_ticket_ptr,
    num_tokens, num_experts,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SEGMENT_TOKENS: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    TOP_K_POW2: tl.constexpr,
):
    """Softmax and top-k of one segment of SEGMENT_TOKENS tokens, TILE_TOKENS at a time, and the segment's partials.

    Writes routing_weights, expert_indices and ranks_in_segment [N, k] (the rank of an assignment among the segment's
    earlier assignments to the same expert), and row `segment` of segment_prob_sums [segments, E] fp32 (sum of the
    probabilities over the segment's tokens), segment_expert_counts [segments, E] int32 and segment_lse_sq_sums
    [segments].
    Program 0 zeroes _segment_table_kernel's counter, table_ticket.
    """
    segment = tl.program_id(0)
    if segment == 0:
        tl.store(table_ticket_ptr, 0)
    experts = tl.arange(0, EXPERTS_POW2)  # (EXPERTS_POW2,)
    slots = tl.arange(0, TOP_K_POW2)  # (TOP_K_POW2,)
    expert_mask = experts < num_experts
    takers_before = tl.zeros((EXPERTS_POW2,), dtype=tl.int32)  # assignments of the segment's earlier tiles
    prob_sums = tl.zeros((EXPERTS_POW2,), dtype=tl.float32)
    lse_sq_sums = tl.zeros((TILE_TOKENS,), dtype=tl.float32)
    for tile_start in range(0, SEGMENT_TOKENS, TILE_TOKENS):
        tokens = segment.to(tl.int64) * SEGMENT_TOKENS + tile_start + tl.arange(0, TILE_TOKENS)  # (TILE_TOKENS,)
        token_mask = tokens < num_tokens
        probs, lse, logits = _softmax_rows(logits_ptr, tokens, experts, num_tokens, num_experts)

        scores = _top_k_scores(logits, expert_mask)  # (TILE_TOKENS, EXPERTS_POW2)
        slot_of_expert = tl.full((TILE_TOKENS, EXPERTS_POW2), -1, tl.int32)  # the slot that took (token, expert)
        weights = tl.zeros((TILE_TOKENS, TOP_K_POW2), dtype=tl.float32)
        indices = tl.zeros((TILE_TOKENS, TOP_K_POW2), dtype=tl.int32)
        # A loop rather than static_range: unrolled, the compiler keeps every round's values live, and spills.
        for slot in range(TOP_K):
            expert = tl.argmax(scores, axis=1, tie_break_left=True)  # (TILE_TOKENS,)
            chosen = experts[None, :] == expert[:, None]  # (TILE_TOKENS, EXPERTS_POW2)
            weight = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
            weights = tl.where(slots[None, :] == slot, weight[:, None], weights)
            indices = tl.where(slots[None, :] == slot, expert[:, None], indices)
            slot_of_expert = tl.where(chosen, slot, slot_of_expert)
            scores = tl.where(chosen, float("-inf"), scores)
        if NORMALIZE:
            weights = weights / tl.sum(weights, axis=1)[:, None]

        # A token takes each expert at most once, so an assignment's rank among the segment's earlier ones with the
        # same expert is the number of earlier tokens of the segment that took that expert.
        taken = ((slot_of_expert >= 0) & token_mask[:, None]).to(tl.int32)  # (TILE_TOKENS, EXPERTS_POW2)
        earlier_takers = tl.cumsum(taken, axis=0) - taken + takers_before[None, :]
        ranks = tl.zeros((TILE_TOKENS, TOP_K_POW2), dtype=tl.int32)
        for slot in range(TOP_K):
            rank = tl.sum(tl.where(slot_of_expert == slot, earlier_takers, 0), axis=1)  # (TILE_TOKENS,)
            ranks = tl.where(slots[None, :] == slot, rank[:, None], ranks)

        out_offsets = tokens[:, None] * TOP_K + slots[None, :]  # (TILE_TOKENS, TOP_K_POW2)
        out_mask = token_mask[:, None] & (slots[None, :] < TOP_K)
        tl.store(routing_weights_ptr + out_offsets, weights, mask=out_mask)
        tl.store(expert_indices_ptr + out_offsets, indices.to(tl.int64), mask=out_mask)
        tl.store(ranks_in_segment_ptr + out_offsets, ranks, mask=out_mask)
        takers_before += tl.sum(taken, axis=0)
        prob_sums += tl.sum(tl.where(token_mask[:, None], probs, 0.0), axis=0)
        lse_sq_sums += tl.where(token_mask, lse * lse, 0.0)

    table_offsets = segment.to(tl.int64) * num_experts + experts
    tl.store(segment_expert_counts_ptr + table_offsets, takers_before, mask=expert_mask)
    tl.store(segment_prob_sums_ptr + table_offsets, prob_sums, mask=expert_mask)
    tl.store(segment_lse_sq_sums_ptr + segment, tl.sum(lse_sq_sums, axis=0))


@triton.jit
def _topk_softmax_backward_kernel(
    grad_weights_ptr, grad_aux_loss_ptr, logits_ptr, expert_row_offsets_ptr,
    grad_logits_in_ptr, grad_logits_ptr,
    num_tokens, num_experts, prob_sum_grad_scale, lse_sq_grad_scale,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_GRAD_AUX: tl.constexpr,
    HAS_GRAD_LOGITS_IN: tl.constexpr,
    SPLIT: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
):
    """grad_logits of one tile of TILE_TOKENS tokens, from the weights' gradient and (if HAS_GRAD_AUX) the aux
    loss's, plus the logits' own gradient at grad_logits_in_ptr when HAS_GRAD_LOGITS_IN.

    The experts of each token's slots are picked again from the logits, as the forward picked them (_top_k_scores),
    and each expert's assignments are the difference of expert_row_offsets [E + 1]: the forward's expert_indices and
    tokens_per_expert need not be kept for the backward.

    Stored as fp32 [N, E], or with SPLIT as [N, 2E] of grad_logits_ptr's 16-bit dtype: hi = the gradient rounded,
    in columns [0, E), and lo = the gradient minus hi, rounded, in columns [E, 2E), so that hi + lo keeps about
    twice the dtype's mantissa.

    With s_j = p[idx_j] and, when normalising, w_j = s_j / S (S = sum_j s_j):
        dL/ds_j = (g_j - sum_m g_m w_m) / S, or g_j without normalising;
        dp = dL/ds scattered to the chosen experts + grad_aux * prob_sum_grad_scale * count_e;
        dlogits = p * (dp - sum_e p_e dp_e) + grad_aux * lse_sq_grad_scale * 2 * lse * p.
    """
    tile = tl.program_id(0)
    tokens = tile.to(tl.int64) * TILE_TOKENS + tl.arange(0, TILE_TOKENS)  # (TILE_TOKENS,)
    experts = tl.arange(0, EXPERTS_POW2)  # (EXPERTS_POW2,)
    token_mask = tokens < num_tokens
    expert_mask = experts < num_experts
    probs, lse, logits = _softmax_rows(logits_ptr, tokens, experts, num_tokens, num_experts)
    scores = _top_k_scores(logits, expert_mask)  # (TILE_TOKENS, EXPERTS_POW2)

    grad_selected = tl.zeros((TILE_TOKENS, EXPERTS_POW2), dtype=tl.float32)  # g_j at the expert of slot j
    chosen_any = tl.zeros((TILE_TOKENS, EXPERTS_POW2), dtype=tl.int1)
    selected_sum = tl.zeros((TILE_TOKENS,), dtype=tl.float32)  # S
    grad_dot_selected = tl.zeros((TILE_TOKENS,), dtype=tl.float32)  # sum_j g_j s_j
    for slot in range(TOP_K):  # not unrolled, as in the forward
        expert = tl.argmax(scores, axis=1, tie_break_left=True)  # (TILE_TOKENS,)
        grad = tl.load(grad_weights_ptr + tokens * TOP_K + slot, mask=token_mask, other=0.0)
        chosen = experts[None, :] == expert[:, None]  # (TILE_TOKENS, EXPERTS_POW2)
        scores = tl.where(chosen, float("-inf"), scores)
        grad_selected = tl.where(chosen, grad[:, None], grad_selected)
        chosen_any = chosen_any | chosen
        if NORMALIZE:
            selected = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
            selected_sum += selected
            grad_dot_selected += grad * selected
    if NORMALIZE:
        # sum_m g_m w_m = sum_m g_m s_m / S
        grad_probs = (grad_selected - tl.where(chosen_any, (grad_dot_selected / selected_sum)[:, None], 0.0)) \
            / selected_sum[:, None]
    else:
        grad_probs = grad_selected
    if HAS_GRAD_AUX:
        grad_aux = tl.load(grad_aux_loss_ptr)
        # d aux / d(sum over tokens of p_e) is proportional to the (constant) count of expert e.
        counts = (tl.load(expert_row_offsets_ptr + experts + 1, mask=expert_mask, other=0)
                  - tl.load(expert_row_offsets_ptr + experts, mask=expert_mask, other=0)).to(tl.float32)
        grad_probs += (grad_aux * prob_sum_grad_scale) * counts[None, :]
    grad_probs_dot = tl.sum(probs * grad_probs, axis=1)  # (TILE_TOKENS,)
    grad_logits = probs * (grad_probs - grad_probs_dot[:, None])
    if HAS_GRAD_AUX:
        grad_logits += (2.0 * grad_aux * lse_sq_grad_scale) * lse[:, None] * probs
    mask = token_mask[:, None] & expert_mask[None, :]
    offsets = tokens[:, None] * num_experts + experts[None, :]  # (TILE_TOKENS, EXPERTS_POW2) into [N, E]
    if HAS_GRAD_LOGITS_IN:
        grad_logits += tl.load(grad_logits_in_ptr + offsets, mask=mask, other=0.0)
    if SPLIT:
        split_dtype = grad_logits_ptr.dtype.element_ty
        hi = grad_logits.to(split_dtype)
        lo = (grad_logits - hi.to(tl.float32)).to(split_dtype)
        offsets = tokens[:, None] * (2 * num_experts) + experts[None, :]  # into [N, 2E]
        tl.store(grad_logits_ptr + offsets, hi, mask=mask)
        tl.store(grad_logits_ptr + offsets + num_experts, lo, mask=mask)
    else:
        tl.store(grad_logits_ptr + offsets, grad_logits, mask=mask)


def route_tile_tokens(num_experts: int) -> int:
    """Tokens per tile of the route kernels for E experts: a power of two that divides ROUTE_SEGMENT_TOKENS."""
    tile_elements = INTERPRETER_ROUTE_TILE_ELEMENTS if running_in_interpreter() else ROUTE_TILE_ELEMENTS
    return max(min(tile_elements // next_power_of_2(num_experts), ROUTE_SEGMENT_TOKENS), 1)


def _backward_tiles(num_experts: int) -> tuple[int, int]:
    """(tokens per tile, warps) of the route's backward kernel: ROUTE_BACKWARD_TILE_ELEMENTS a tile (at least a
    token), ROUTE_BACKWARD_ELEMENTS_PER_THREAD a thread, between 2 and 8 warps."""
    experts_pow2 = next_power_of_2(num_experts)
    if running_in_interpreter():
        return route_tile_tokens(num_experts), 1
    tile_tokens = max(min(ROUTE_BACKWARD_TILE_ELEMENTS // experts_pow2, ROUTE_SEGMENT_TOKENS), 1)
    threads = tile_tokens * experts_pow2 // ROUTE_BACKWARD_ELEMENTS_PER_THREAD
    return tile_tokens, min(max(threads // 32, 2), 8)


def route_segment_tokens(num_tokens: int, num_experts: int) -> int:
    """Tokens per program of the route's forward: ROUTE_SEGMENT_TOKENS, halved while fewer than ROUTE_MIN_SEGMENTS
    programs would run, down to one tile. A power of two, a multiple of route_tile_tokens(num_experts).

    Under torch.compile the sizes may be symbolic: the comparisons then guard on N, and the result is a plain int.
    """
    segment_tokens, tile_tokens = ROUTE_SEGMENT_TOKENS, route_tile_tokens(int(num_experts))
    while segment_tokens > tile_tokens and ceil_div(num_tokens, segment_tokens) < ROUTE_MIN_SEGMENTS:
        segment_tokens //= 2
    return segment_tokens


def _check_coef(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")


def topk_softmax(router_logits: torch.Tensor, top_k: int, normalize_weights: bool, load_balance_coef: float,
                 z_loss_coef: float) -> tuple[torch.Tensor, ...]:
    """Softmax, top-k and the aux loss of router logits, and the counts the expert sort takes; two launches (none
    when N = 0).

    Args:
        router_logits: [N, E] fp32.
        top_k: experts per token, 1 <= top_k <= E.
        normalize_weights: renormalise each token's k weights to sum 1.
        load_balance_coef, z_loss_coef: aux_loss = load_balance_coef * E * sum_e f_e P_e
            + z_loss_coef * mean(logsumexp(logits)²), f_e the fraction of the N * k assignments to e and P_e
            the mean probability of e (both 0 when N = 0).
    Returns:
        routing_weights [N, k] fp32 and expert_indices [N, k] int64, in descending probability (ties: lowest
            expert first);
        aux_loss [] fp32;
        then what sort_by_expert_segments takes, with segment_assignments = B * k for segments of
        B = route_segment_tokens(N, E) tokens: segment_expert_starts [cdiv(N, B), E] int32, the assignments to each
            expert in the segments before each segment; ranks_in_segment [N, k] int32, each assignment's rank among the
            earlier ones of its segment with the same expert; tokens_per_expert [E] int64, the assignments of each
            expert; expert_row_offsets [E + 1] int64, their exclusive scan (what topk_softmax_backward takes).
    """
    check_tensor_dim("router_logits", router_logits, 2, (torch.float32,))
    num_tokens, num_experts = router_logits.shape
    if num_experts < 1:
        raise ValueError(f"router_logits must have at least one expert column, got shape {tuple(router_logits.shape)}")
    check_int("top_k", top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= the number of experts {num_experts}, got {top_k}")
    _check_coef("load_balance_coef", load_balance_coef)
    _check_coef("z_loss_coef", z_loss_coef)
    if num_tokens * top_k >= 2**31:
        raise ValueError(f"router_logits: N * top_k must be below 2**31 (int32 counts), got {num_tokens * top_k}")
    device = router_logits.device
    segment_tokens = route_segment_tokens(num_tokens, num_experts)
    num_segments = ceil_div(num_tokens, segment_tokens)
    routing_weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)  # (N, k)
    expert_indices = torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)  # (N, k)
    ranks_in_segment = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)  # (N, k)
    if num_tokens == 0:
        aux_loss = torch.zeros((), dtype=torch.float32, device=device)
        return (routing_weights, expert_indices, aux_loss, *no_sort_tables(num_experts, ranks_in_segment))
    segment_expert_counts = torch.empty((num_segments, num_experts), dtype=torch.int32, device=device)  # (segments, E)
    segment_prob_sums = torch.empty((num_segments, num_experts), dtype=torch.float32, device=device)  # (segments, E)
    segment_lse_sq_sums = torch.empty(num_segments, dtype=torch.float32, device=device)  # (segments,)
    table_ticket = torch.empty((), dtype=torch.int32, device=device)  # zeroed by the route kernel
    traceable(_topk_softmax_kernel)[(num_segments,)](
        router_logits, routing_weights, expert_indices, ranks_in_segment,
        segment_prob_sums, segment_expert_counts, segment_lse_sq_sums, table_ticket,
        num_tokens, num_experts,
        TOP_K=top_k, NORMALIZE=bool(normalize_weights), SEGMENT_TOKENS=segment_tokens,
        TILE_TOKENS=route_tile_tokens(num_experts), EXPERTS_POW2=next_power_of_2(num_experts),
        TOP_K_POW2=next_power_of_2(top_k),
        num_warps=ROUTE_FORWARD_NUM_WARPS,
    )
    aux_loss = torch.empty((), dtype=torch.float32, device=device)
    segment_expert_starts, tokens_per_expert, expert_row_offsets = launch_segment_table(
        segment_expert_counts, segment_prob_sums, segment_lse_sq_sums, table_ticket, aux_loss, num_tokens * top_k,
        num_tokens, load_balance_coef, z_loss_coef)
    return (routing_weights, expert_indices, aux_loss, segment_expert_starts, ranks_in_segment, tokens_per_expert,
            expert_row_offsets)


def topk_softmax_backward(grad_routing_weights: torch.Tensor, grad_aux_loss: torch.Tensor,
                          router_logits: torch.Tensor, expert_row_offsets: torch.Tensor, normalize_weights: bool,
                          load_balance_coef: float, z_loss_coef: float, grad_router_logits: torch.Tensor | None = None,
                          split_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gradient of topk_softmax's routing_weights and aux_loss with respect to the logits, in one launch.

    Args:
        grad_routing_weights: [N, k] fp32; k is topk_softmax's top_k.
        grad_aux_loss: [] fp32, read on the device; None when the aux loss had no gradient (it is left out).
        router_logits: [N, E] fp32 as given to topk_softmax, and expert_row_offsets [E + 1] int64 as it returned
            them; normalize_weights and the coefficients as given to it. The kernel picks each token's experts
            again from the logits, as topk_softmax did.
        grad_router_logits: None, or [N, E] fp32, a gradient the logits received directly, added to the result.
        split_dtype: None, or torch.bfloat16 / torch.float16: return the gradient g as two 16-bit halves side by
            side, hi = g rounded to split_dtype and lo = (g - hi) rounded, so that a 16-bit GEMM of [hi | lo]
            with an operand stacked twice computes g's product to about twice split_dtype's precision.
    Returns:
        grad_logits: [N, E] fp32, or [N, 2E] of split_dtype (hi | lo) when split_dtype is given.
    """
    check_tensor_dim("router_logits", router_logits, 2, (torch.float32,))
    num_tokens, num_experts = router_logits.shape
    check_tensor_dim("grad_routing_weights", grad_routing_weights, 2, (torch.float32,))
    if grad_routing_weights.shape[0] != num_tokens or not 1 <= grad_routing_weights.shape[1] <= num_experts:
        raise ValueError(f"grad_routing_weights must be [N, k] with N = {num_tokens} and 1 <= k <= {num_experts}, "
                         f"got shape {tuple(grad_routing_weights.shape)}")
    top_k = grad_routing_weights.shape[1]
    if grad_aux_loss is not None:
        check_tensor_dim("grad_aux_loss", grad_aux_loss, 0, (torch.float32,))
    check_tensor_dim("expert_row_offsets", expert_row_offsets, 1, (torch.int64,))
    check_shape("expert_row_offsets", expert_row_offsets, (num_experts + 1,))
    if grad_router_logits is not None:
        check_tensor_shape("grad_router_logits", grad_router_logits, router_logits.shape, (torch.float32,))
    if split_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"split_dtype must be None, torch.bfloat16 or torch.float16, got {split_dtype}")
    _check_coef("load_balance_coef", load_balance_coef)
    _check_coef("z_loss_coef", z_loss_coef)
    if split_dtype is None:
        grad_logits = torch.empty_like(router_logits)  # (N, E)
    else:
        grad_logits = router_logits.new_empty((num_tokens, 2 * num_experts), dtype=split_dtype)  # (N, 2E): hi | lo
    if num_tokens == 0:
        return grad_logits
    tile_tokens, num_warps = _backward_tiles(num_experts)
    # aux_loss = load_balance_coef * E * sum_e (count_e / (N k)) (prob_sum_e / N) + z_loss_coef * lse_sq_sum / N.
    prob_sum_grad_scale = load_balance_coef * num_experts / (num_tokens * top_k * num_tokens)
    traceable(_topk_softmax_backward_kernel)[(ceil_div(num_tokens, tile_tokens),)](
        grad_routing_weights, grad_aux_loss, router_logits, expert_row_offsets, grad_router_logits, grad_logits,
        num_tokens, num_experts, prob_sum_grad_scale, z_loss_coef / num_tokens,
        TOP_K=top_k, NORMALIZE=bool(normalize_weights), HAS_GRAD_AUX=grad_aux_loss is not None,
        HAS_GRAD_LOGITS_IN=grad_router_logits is not None, SPLIT=split_dtype is not None, TILE_TOKENS=tile_tokens,
        EXPERTS_POW2=next_power_of_2(num_experts), num_warps=num_warps,
    )
    return grad_logits
