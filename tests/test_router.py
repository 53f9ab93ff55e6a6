"""fused_route and fused_sort_by_expert (triton_moe/router_ops.py over triton_moe/kernels/route.py and sort.py)
against the
plain-torch routing.route and routing.sort_by_expert: forward, gradients, edge cases, validation, custom ops."""

import pytest
import torch

from triton_moe.config import MoEConfig
from triton_moe.kernels import route as route_kernels
from triton_moe.kernels import sort as sort_kernels
from triton_moe.router_ops import SortTables, fused_route, fused_sort_by_expert
from triton_moe.routing import ExpertSort, route, sort_by_expert
from triton_moe import router_ops
from conftest import DEVICE, HALF_DTYPES, RefuseLaunch, gpu_only

HIDDEN = 32
# Everything runs in fp32: the kernels' exponentials and summation orders differ from torch's by a few ulps of the
# largest terms. Sums over the tokens (router_weight's gradient) cancel to small elements, so the absolute
# tolerance scales with the largest element.
RTOL = 1e-5
ATOL_PER_LARGEST = 1e-6
EXPERTS_AND_TOP_K = [(experts, top_k) for experts in (1, 3, 8, 64, 130) for top_k in (1, 2, 8) if top_k <= experts]
NUM_TOKENS = [0, 1, 37, 300]


pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def make_config(num_experts, top_k, normalize_weights=True):
    # Coefficients above the defaults, so that both terms of the aux loss weigh in its gradient.
    return MoEConfig(expert_sizes=[(num_experts, 16)], num_active_experts=top_k, hidden_size=HIDDEN,
                     normalize_weights=normalize_weights, load_balance_coef=0.5, z_loss_coef=0.1)


def make_router_inputs(num_tokens, num_experts, seed=0):
    """x [N, HIDDEN] and router_weight [E, HIDDEN], fp32, requiring grad; logits of order 1, without exact ties."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((num_tokens, HIDDEN), generator=generator)
    router_weight = torch.randn((num_experts, HIDDEN), generator=generator) * HIDDEN**-0.5
    logits = x @ router_weight.T  # (N, E)
    assert (logits.sort(dim=1).values.diff(dim=1) != 0).all(), "tied logits: the expert order would be arbitrary"
    return x.to(DEVICE).requires_grad_(), router_weight.to(DEVICE).requires_grad_()


def assert_close(name, got, want):
    largest = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL_PER_LARGEST * max(largest, 1.0),
                               msg=lambda message: f"{name}: {message}")


def assert_sorts_equal(got: ExpertSort, want: ExpertSort):
    for name in ExpertSort.__dataclass_fields__:
        got_field, want_field = getattr(got, name), getattr(want, name)
        assert got_field.dtype == want_field.dtype, f"{name}: dtype {got_field.dtype} != {want_field.dtype}"
        assert torch.equal(got_field, want_field), f"{name} differs"


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("num_experts, top_k", EXPERTS_AND_TOP_K)
def test_fused_route_matches_route(num_experts, top_k, normalize_weights, num_tokens):
    """Same routing, and the same gradients of x and router_weight from the weights and from the aux loss."""
    config = make_config(num_experts, top_k, normalize_weights)
    x, router_weight = make_router_inputs(num_tokens, num_experts)
    got, want = fused_route(x, router_weight, config), route(x, router_weight, config)
    assert torch.equal(got.expert_indices, want.expert_indices)
    assert torch.equal(got.router_logits, want.router_logits)
    assert_close("routing_weights", got.routing_weights, want.routing_weights)
    assert_close("aux_loss", got.aux_loss, want.aux_loss)

    upstream = torch.randn((num_tokens, top_k), generator=torch.Generator().manual_seed(1)).to(DEVICE)  # (N, k)
    # The aux loss is a mean over the tokens: times N, its gradient per token weighs as much as the weights'.
    got_grads = torch.autograd.grad((got.routing_weights * upstream).sum() + num_tokens * got.aux_loss,
                                    (x, router_weight))
    want_grads = torch.autograd.grad((want.routing_weights * upstream).sum() + num_tokens * want.aux_loss,
                                     (x, router_weight))
    for name, got_grad, want_grad in zip(("x", "router_weight"), got_grads, want_grads):
        assert_close(f"grad of {name}", got_grad, want_grad)


def test_gradient_reaching_the_logits_directly():
    """A loss that also uses router_logits (a z-loss of the user's, say): that gradient joins the route's."""
    config = make_config(64, 8)
    x, router_weight = make_router_inputs(300, 64)
    upstream = torch.randn((300, 64), generator=torch.Generator().manual_seed(2)).to(DEVICE)  # (N, E)
    grads = []
    for routing in (fused_route(x, router_weight, config), route(x, router_weight, config)):
        loss = routing.routing_weights.sum() + routing.aux_loss + (routing.router_logits * upstream).sum()
        grads.append(torch.autograd.grad(loss, (x, router_weight)))
    for name, got_grad, want_grad in zip(("x", "router_weight"), *grads):
        assert_close(f"grad of {name}", got_grad, want_grad)
    # Only the logits reach the loss: the route's own gradients are zero.
    routing = fused_route(x, router_weight, config)
    got = torch.autograd.grad((routing.router_logits * upstream).sum(), (x, router_weight))
    assert_close("grad of x, logits only", got[0], upstream @ router_weight.detach())


def test_aux_loss_left_out_of_the_loss():
    """Without the aux loss in the loss the backward gets no gradient for it and skips its term (no zero tensor
    launched): the gradients are route's, and the launcher's with a zero aux gradient, bit for bit."""
    config = make_config(64, 8)
    x, router_weight = make_router_inputs(300, 64)
    upstream = torch.randn((300, 8), generator=torch.Generator().manual_seed(2)).to(DEVICE)  # (N, k)
    grads = [torch.autograd.grad((routing.routing_weights * upstream).sum(), (x, router_weight))
             for routing in (fused_route(x, router_weight, config), route(x, router_weight, config))]
    for name, got_grad, want_grad in zip(("x", "router_weight"), *grads):
        assert_close(f"grad of {name}", got_grad, want_grad)
    logits = (x @ router_weight.T).detach()  # (N, E)
    *_, expert_row_offsets = route_kernels.topk_softmax(logits, 8, True, 0.5, 0.1)
    arguments = (logits, expert_row_offsets, True, 0.5, 0.1)
    without = route_kernels.topk_softmax_backward(upstream, None, *arguments)
    with_zero = route_kernels.topk_softmax_backward(upstream, torch.zeros((), device=DEVICE), *arguments)
    assert torch.equal(without, with_zero)


@pytest.mark.parametrize("split_dtype", HALF_DTYPES)
def test_split_gradient_keeps_twice_the_precision(split_dtype):
    """The backward's [hi | lo] halves: lo is what rounding the fp32 gradient to hi left over, and hi + lo is within
    about eps² of the fp32 gradient (hi alone is off by up to eps/2)."""
    num_tokens, num_experts, top_k = 300, 64, 8
    x, router_weight = make_router_inputs(num_tokens, num_experts)
    logits = (x @ router_weight.T).detach()  # (N, E)
    *_, expert_row_offsets = route_kernels.topk_softmax(logits, top_k, True, 0.5, 0.1)
    grad_weights = torch.randn((num_tokens, top_k), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grad_aux = torch.tensor(3.0, device=DEVICE)
    arguments = (grad_weights, grad_aux, logits, expert_row_offsets, True, 0.5, 0.1)
    want = route_kernels.topk_softmax_backward(*arguments)  # (N, E) fp32
    halves = route_kernels.topk_softmax_backward(*arguments, split_dtype=split_dtype)  # (N, 2E)
    assert halves.shape == (num_tokens, 2 * num_experts) and halves.dtype == split_dtype
    hi, lo = halves[:, :num_experts], halves[:, num_experts:]
    finfo = torch.finfo(split_dtype)
    # lo of an fp16 split can fall below fp16's normal range, where its spacing is finfo.smallest_normal * eps.
    subnormal_spacing = finfo.smallest_normal * finfo.eps
    assert (lo.float().abs() <= finfo.eps / 2 * hi.float().abs() + subnormal_spacing).all()
    # The two launches are compiled apart: on a GPU their fp32 gradients may differ by fp32 rounding.
    bound = finfo.eps**2 * want.abs() + subnormal_spacing + ATOL_PER_LARGEST * want.abs().max()
    assert ((hi.float() + lo.float() - want).abs() <= bound).all()
    assert ((hi.float() - want).abs() > bound).any(), "lo is needed somewhere, or the test shows nothing"


@gpu_only
def test_bf16_router_gemms_run_on_the_tensor_cores(monkeypatch):
    """bf16 x and router weight: the logits within fp32 rounding of the fp32 GEMM's, the same experts, and the
    gradients the fp32 path rounds to bf16, bit for bit but for rare roundings on the other side of a tie."""
    splits = []
    backward = router_ops.topk_softmax_backward

    def spy(*args, split_dtype=None):
        splits.append(split_dtype)
        return backward(*args, split_dtype=split_dtype)

    monkeypatch.setattr(router_ops, "topk_softmax_backward", spy)
    num_tokens, num_experts, top_k, hidden = 2048, 64, 8, 256
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((num_tokens, hidden), generator=generator).to(DEVICE, torch.bfloat16).requires_grad_()
    router_weight = (torch.randn((num_experts, hidden), generator=generator) * hidden**-0.5).to(
        DEVICE, torch.bfloat16).requires_grad_()
    config = MoEConfig(expert_sizes=[(num_experts, 16)], num_active_experts=top_k, hidden_size=hidden,
                       load_balance_coef=0.5, z_loss_coef=0.1)
    got, want = fused_route(x, router_weight, config), route(x, router_weight, config)
    largest = want.router_logits.abs().max().item()
    torch.testing.assert_close(got.router_logits, want.router_logits, rtol=0, atol=1e-5 * largest)
    # Experts whose logits lie closer than the GEMMs' difference may swap; none do at this seed.
    assert torch.equal(got.expert_indices, want.expert_indices)
    upstream = torch.randn((num_tokens, top_k), generator=generator).to(DEVICE)  # (N, k)
    grads = [torch.autograd.grad((r.routing_weights * upstream).sum() + num_tokens * r.aux_loss, (x, router_weight))
             for r in (got, want)]
    assert splits == [torch.bfloat16]
    for name, got_grad, want_grad in zip(("x", "router_weight"), *grads):
        assert got_grad.dtype == torch.bfloat16
        # One bf16 rounding of an fp32-accurate value each: they differ only where the value lies within the two
        # GEMMs' fp32 difference of a rounding boundary. Without lo that would be about half of the elements.
        equal = (got_grad == want_grad).float().mean().item()
        assert equal >= 0.95, f"grad of {name}: only {equal:.3f} of the elements equal"
        torch.testing.assert_close(got_grad, want_grad, rtol=2**-7, atol=2**-7 * want_grad.abs().max().item())


@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("num_experts, top_k", EXPERTS_AND_TOP_K)
def test_fused_sort_matches_sort_by_expert(num_experts, top_k, num_tokens):
    """The route's segment counts and the sort's own counting give sort_by_expert's ExpertSort exactly."""
    x, router_weight = make_router_inputs(num_tokens, num_experts)
    with torch.no_grad():
        routing = fused_route(x, router_weight, make_config(num_experts, top_k))
    want = sort_by_expert(routing.expert_indices, num_experts)
    assert_sorts_equal(fused_sort_by_expert(routing.expert_indices, num_experts, routing.sort_tables), want)
    assert_sorts_equal(fused_sort_by_expert(routing.expert_indices, num_experts), want)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_tokens, top_k, num_experts", [(300, 3, 5), (100, 4, 3000), (7, 1, 40000)])
def test_sort_of_any_indices(num_tokens, top_k, num_experts, index_dtype):
    """Indices that no top-k gives (repeated experts within a token, most experts empty, int32 row experts past
    32767 experts) sort like sort_by_expert."""
    generator = torch.Generator().manual_seed(0)
    expert_indices = torch.randint(0, num_experts, (num_tokens, top_k), generator=generator)  # (N, k)
    expert_indices = expert_indices.to(device=DEVICE, dtype=index_dtype)
    assert_sorts_equal(fused_sort_by_expert(expert_indices, num_experts),
                       sort_by_expert(expert_indices.long(), num_experts))


def test_every_loop_takes_several_steps(monkeypatch):
    """Tiles small enough that the route kernel walks several tiles a segment, the table kernel several segments a
    program and its last program several steps of each final sum; segments of the sort that do not hold a whole
    number of tokens."""
    monkeypatch.setattr(route_kernels, "INTERPRETER_ROUTE_TILE_ELEMENTS", 256)  # 16 tokens a tile, 4 tiles a segment
    monkeypatch.setattr(route_kernels, "ROUTE_MIN_SEGMENTS", 1)  # segments of ROUTE_SEGMENT_TOKENS however few
    monkeypatch.setattr(sort_kernels, "TABLE_EXPERT_CHUNK", 4)  # 3 programs for 11 experts
    monkeypatch.setattr(sort_kernels, "TABLE_TILE_ELEMENTS", 8)  # 2 segments by 4 experts a step
    monkeypatch.setattr(sort_kernels, "TABLE_SCAN_CHUNK", 2)  # 6 steps over the experts, 2 over chunks and segments
    monkeypatch.setattr(sort_kernels, "ZERO_CHUNK", 4)
    num_experts, top_k = 11, 3
    config = make_config(num_experts, top_k)
    x, router_weight = make_router_inputs(150, num_experts)  # 3 segments, the last one partial
    got, want = fused_route(x, router_weight, config), route(x, router_weight, config)
    assert torch.equal(got.expert_indices, want.expert_indices)
    assert_close("routing_weights", got.routing_weights, want.routing_weights)
    assert_close("aux_loss", got.aux_loss, want.aux_loss)
    want_sort = sort_by_expert(want.expert_indices, num_experts)
    assert_sorts_equal(fused_sort_by_expert(got.expert_indices, num_experts, got.sort_tables), want_sort)
    sort_tables = SortTables(7, *sort_kernels.count_expert_segments(got.expert_indices, num_experts, 7))
    assert_sorts_equal(fused_sort_by_expert(got.expert_indices, num_experts, sort_tables), want_sort)


@pytest.mark.parametrize("num_tokens, segment_tokens", [(150, 16), (1000, 32), (5000, 64)])
def test_small_batches_take_smaller_segments(monkeypatch, num_tokens, segment_tokens):
    """Fewer than ROUTE_MIN_SEGMENTS segments of ROUTE_SEGMENT_TOKENS: the route halves its segments, down to one
    tile, and the sort takes the route's counts with the matching segment size."""
    monkeypatch.setattr(route_kernels, "INTERPRETER_ROUTE_TILE_ELEMENTS", 256)  # 16 tokens a tile, as above
    monkeypatch.setattr(route_kernels, "ROUTE_TILE_ELEMENTS", 256)  # the same on a GPU
    monkeypatch.setattr(route_kernels, "ROUTE_MIN_SEGMENTS", 32)
    num_experts, top_k = 11, 3
    assert route_kernels.route_segment_tokens(num_tokens, num_experts) == segment_tokens
    config = make_config(num_experts, top_k)
    x, router_weight = make_router_inputs(num_tokens, num_experts)
    got, want = fused_route(x, router_weight, config), route(x, router_weight, config)
    assert got.sort_tables.segment_assignments == segment_tokens * top_k
    assert got.sort_tables.segment_expert_starts.shape == (-(-num_tokens // segment_tokens), num_experts)
    assert torch.equal(got.expert_indices, want.expert_indices)
    assert_close("routing_weights", got.routing_weights, want.routing_weights)
    assert_close("aux_loss", got.aux_loss, want.aux_loss)
    assert_sorts_equal(fused_sort_by_expert(got.expert_indices, num_experts, got.sort_tables),
                       sort_by_expert(want.expert_indices, num_experts))


def test_ties_do_not_change_the_weights():
    """With exact ties the kernel takes the lowest expert first (as a stable sort would); whichever tied expert is
    taken, the weights are the same as route's."""
    num_experts, top_k = 16, 4
    generator = torch.Generator().manual_seed(0)
    # One-hot tokens pick rows of an integer-valued router: integer logits, with many ties.
    x = torch.eye(HIDDEN)[torch.randint(0, HIDDEN, (64,), generator=generator)].to(DEVICE)  # (N, H)
    router_weight = torch.randint(0, 3, (num_experts, HIDDEN), generator=generator).float().to(DEVICE)  # (E, H)
    config = make_config(num_experts, top_k)
    got, want = fused_route(x, router_weight, config), route(x, router_weight, config)
    lowest_first = torch.sort(got.router_logits, dim=1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(got.expert_indices, lowest_first)
    assert_close("routing_weights", got.routing_weights, want.routing_weights)


def test_backward_picks_the_forward_experts_among_ties():
    """The backward picks each token's experts again from the logits: among exact ties, the ones the forward took
    (the lowest), so the gradient reaches the logits of the experts whose weights the loss used."""
    num_experts, top_k = 16, 4
    generator = torch.Generator().manual_seed(0)
    x = torch.eye(HIDDEN)[torch.randint(0, HIDDEN, (64,), generator=generator)].to(DEVICE).requires_grad_()
    router_weight = torch.randint(0, 3, (num_experts, HIDDEN), generator=generator).float().to(DEVICE)
    router_weight.requires_grad_()
    upstream = torch.randn((64, top_k), generator=generator).to(DEVICE)  # (N, k): a different gradient per slot
    routing = fused_route(x, router_weight, make_config(num_experts, top_k))
    got = torch.autograd.grad((routing.routing_weights * upstream).sum(), (x, router_weight))
    # The same weights in torch, at the experts the forward took.
    probs = torch.softmax(x @ router_weight.T, dim=1)  # (N, E)
    weights = probs.gather(1, routing.expert_indices)  # (N, k)
    weights = weights / weights.sum(dim=1, keepdim=True)
    want = torch.autograd.grad((weights * upstream).sum(), (x, router_weight))
    for name, got_grad, want_grad in zip(("x", "router_weight"), got, want):
        assert_close(f"grad of {name}", got_grad, want_grad)


def test_route_keeps_no_indices_for_its_backward():
    """The route's backward takes x, the router weight, the logits and expert_row_offsets (which the expert MLP
    keeps as well): not the [N, k] expert indices nor the counts, one tensor each less between a compiled forward
    and its backward."""
    x, router_weight = make_router_inputs(37, 8)
    routing = fused_route(x, router_weight, make_config(8, 2))
    saved = routing.routing_weights.grad_fn.saved_tensors
    want = (x, router_weight, routing.router_logits, routing.sort_tables.expert_row_offsets)
    assert len(saved) == len(want)
    for saved_tensor, want_tensor in zip(saved, want):
        assert saved_tensor.data_ptr() == want_tensor.data_ptr()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the softmax of a row of -inf is NaN
def test_infinite_and_nan_logits_pick_real_distinct_experts():
    """-inf logits rank above padding and taken experts, NaN above everything (as torch.topk ranks NaN): every
    token still gets top_k distinct experts in [0, E), so that the sort stays in bounds."""
    num_experts, top_k = 5, 4
    logits = torch.randn((3, num_experts))  # (N, E)
    logits[0, 1:] = float("-inf")
    logits[1] = float("-inf")
    logits[2, 3] = float("nan")
    expert_indices = route_kernels.topk_softmax(logits.to(DEVICE), top_k, True, 0.0, 0.0)[1].cpu()
    assert ((expert_indices >= 0) & (expert_indices < num_experts)).all()
    assert (expert_indices.sort(dim=1).values.diff(dim=1) > 0).all()
    assert expert_indices[0, 0] == 0 and expert_indices[2, 0] == 3


def test_results_are_reproducible():
    config = make_config(64, 8)
    x, router_weight = make_router_inputs(300, 64)
    runs = []
    for _ in range(2):
        routing = fused_route(x, router_weight, config)
        grads = torch.autograd.grad((routing.routing_weights.sum() + routing.aux_loss), (x, router_weight))
        runs.append((routing.routing_weights, routing.aux_loss, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_no_tokens_launches_nothing(monkeypatch):
    for module, name in ((route_kernels, "_topk_softmax_kernel"), (route_kernels, "_topk_softmax_backward_kernel"),
                         (sort_kernels, "_segment_table_kernel"), (sort_kernels, "_count_expert_segments_kernel"),
                         (sort_kernels, "_scatter_sorted_rows_kernel")):
        monkeypatch.setattr(module, name, RefuseLaunch())
    x, router_weight = make_router_inputs(0, 8)
    routing = fused_route(x, router_weight, make_config(8, 2))
    assert routing.routing_weights.shape == routing.expert_indices.shape == (0, 2)
    assert routing.aux_loss.item() == 0
    grads = torch.autograd.grad(routing.routing_weights.sum() + routing.aux_loss, (x, router_weight))
    assert grads[0].shape == (0, HIDDEN) and not grads[1].any()
    for sort_tables in (routing.sort_tables, None):
        sort = fused_sort_by_expert(routing.expert_indices, 8, sort_tables)
        assert sort.row_to_flat.shape == (0,) and sort.row_expert.dtype == torch.int16
        assert not sort.tokens_per_expert.any() and sort.expert_row_offsets.shape == (9,)
        assert not sort.expert_row_offsets.any()


def test_launchers_name_the_bad_argument():
    logits = torch.randn((4, 8), device=DEVICE)  # (N, E)
    indices = torch.zeros((4, 2), dtype=torch.int64, device=DEVICE)  # (N, k)
    starts, ranks, tokens_per_expert, row_offsets = sort_kernels.count_expert_segments(indices, 8)
    sort_segments = sort_kernels.sort_by_expert_segments
    cases = [
        ("router_logits", lambda: route_kernels.topk_softmax(logits.double(), 2, True, 0.0, 0.0)),
        ("router_logits", lambda: route_kernels.topk_softmax(logits.T, 2, True, 0.0, 0.0)),
        ("router_logits", lambda: route_kernels.topk_softmax(logits[0], 2, True, 0.0, 0.0)),
        ("top_k", lambda: route_kernels.topk_softmax(logits, 9, True, 0.0, 0.0)),
        ("top_k", lambda: route_kernels.topk_softmax(logits, 0, True, 0.0, 0.0)),
        ("z_loss_coef", lambda: route_kernels.topk_softmax(logits, 2, True, 0.0, -1.0)),
        ("grad_routing_weights", lambda: route_kernels.topk_softmax_backward(
            torch.zeros((4, 9), device=DEVICE), torch.zeros((), device=DEVICE), logits, row_offsets, True, 0.0, 0.0)),
        ("grad_routing_weights", lambda: route_kernels.topk_softmax_backward(
            torch.zeros((3, 2), device=DEVICE), torch.zeros((), device=DEVICE), logits, row_offsets, True, 0.0, 0.0)),
        ("grad_aux_loss", lambda: route_kernels.topk_softmax_backward(
            torch.zeros((4, 2), device=DEVICE), torch.zeros(1, device=DEVICE), logits, row_offsets, True, 0.0, 0.0)),
        ("expert_row_offsets", lambda: route_kernels.topk_softmax_backward(
            torch.zeros((4, 2), device=DEVICE), torch.zeros((), device=DEVICE), logits, row_offsets[:8], True, 0.0,
            0.0)),
        ("expert_row_offsets", lambda: route_kernels.topk_softmax_backward(
            torch.zeros((4, 2), device=DEVICE), torch.zeros((), device=DEVICE), logits, row_offsets.int(), True,
            0.0, 0.0)),
        ("grad_router_logits", lambda: route_kernels.topk_softmax_backward(
            torch.zeros((4, 2), device=DEVICE), torch.zeros((), device=DEVICE), logits, row_offsets, True, 0.0, 0.0,
            grad_router_logits=logits[:, :7])),
        ("split_dtype", lambda: route_kernels.topk_softmax_backward(
            torch.zeros((4, 2), device=DEVICE), torch.zeros((), device=DEVICE), logits, row_offsets, True, 0.0, 0.0,
            split_dtype=torch.float32)),
        ("expert_indices", lambda: sort_kernels.count_expert_segments(indices.float(), 8)),
        ("expert_indices", lambda: sort_kernels.count_expert_segments(indices.T, 8)),
        ("num_experts", lambda: sort_kernels.count_expert_segments(indices, 0)),
        ("segment_assignments", lambda: sort_kernels.count_expert_segments(indices, 8, 0)),
        ("segment_expert_starts", lambda: sort_segments(indices, starts[:, :0], ranks, row_offsets, 256)),
        ("segment_expert_starts", lambda: sort_segments(indices, starts, ranks, row_offsets, 4)),
        ("segment_expert_starts", lambda: sort_segments(indices, starts.long(), ranks, row_offsets,
                                                                      256)),
        ("ranks_in_segment", lambda: sort_segments(indices, starts, ranks[:2], row_offsets, 256)),
        ("expert_row_offsets", lambda: sort_segments(indices, starts, ranks, row_offsets[:8], 256)),
        ("expert_row_offsets", lambda: sort_segments(indices, starts, ranks, row_offsets.int(), 256)),
        ("sort_tables", lambda: fused_sort_by_expert(
            indices, 9, SortTables(256, starts, ranks, tokens_per_expert, row_offsets))),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_custom_ops_pass_opcheck():
    """Schema, fake-tensor shapes, autograd registration and AOT dispatch of each op (the backward op also through
    triton_moe::route's autograd)."""
    x, router_weight = make_router_inputs(8, 8)
    torch.library.opcheck(torch.ops.triton_moe.route.default, (x, router_weight, 2, True, 0.5, 0.1))
    routing = fused_route(x, router_weight, make_config(8, 2))
    torch.library.opcheck(torch.ops.triton_moe.count_expert_segments.default, (routing.expert_indices, 8, 16))
    sort_tables = routing.sort_tables
    torch.library.opcheck(torch.ops.triton_moe.sort_by_expert.default,
                          (routing.expert_indices, sort_tables.segment_expert_starts, sort_tables.ranks_in_segment,
                           sort_tables.expert_row_offsets, sort_tables.segment_assignments))


def test_route_segments_shrink_to_one_tile_for_small_batches(monkeypatch):
    """The seed configs' 4096 tokens: 128 experts take segments of one 16-token tile (256 programs), 64 experts one
    32-token tile (128 programs: no smaller segment exists); 16384 tokens keep segments of 64."""
    # the GPU's tiles
    monkeypatch.setattr(route_kernels, "INTERPRETER_ROUTE_TILE_ELEMENTS", route_kernels.ROUTE_TILE_ELEMENTS)
    assert route_kernels.ROUTE_TILE_ELEMENTS == 2048 and route_kernels.ROUTE_MIN_SEGMENTS == 256
    assert route_kernels.route_segment_tokens(4096, 128) == 16
    assert route_kernels.route_segment_tokens(4096, 64) == 32
    assert route_kernels.route_segment_tokens(16384, 128) == 64
