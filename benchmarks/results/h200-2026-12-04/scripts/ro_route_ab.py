"""The seed GPT step under mode="reduce-overhead", round-robin in one process: the route's backward as it was
(saving expert_indices and tokens_per_expert, the old kernel reading them) against today's (picking the experts
again from the logits, counting from expert_row_offsets), for uniform and variable widths, beside dense.
Wall ms per step (CUDA events), medians over the rounds. Gradients of one step compared old vs new."""
import statistics, sys
import torch
from torch import Tensor
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".carry/route_old")
import bench_train_step as b
import route_old
from triton_moe import router_ops
from triton_moe.testing.gpt import get_batch, load_bytes

# The two variants differ only in the route op's autograd formula, which the compile caches do not key on.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False


@torch.library.custom_op("ab_old::route_backward", mutates_args=())
def old_route_backward(grad_routing_weights: Tensor, grad_aux_loss: Tensor | None, grad_router_logits: Tensor | None,
                       x: Tensor, router_weight: Tensor, router_logits: Tensor, expert_indices: Tensor,
                       tokens_per_expert: Tensor, normalize_weights: bool, load_balance_coef: float,
                       z_loss_coef: float) -> tuple[Tensor, Tensor]:
    tensor_cores = router_ops._tensor_core_router(x, router_weight)
    grad_logits = route_old.topk_softmax_backward(
        grad_routing_weights, grad_aux_loss, router_logits, expert_indices, tokens_per_expert,
        normalize_weights, load_balance_coef, z_loss_coef, grad_router_logits,
        split_dtype=torch.bfloat16 if tensor_cores else None)
    with router_ops._autocast_off(x.device.type):
        if not tensor_cores:
            return (grad_logits @ router_weight.float()).to(x.dtype), (grad_logits.t() @ x.float()).to(router_weight.dtype)
        grad_x = torch.mm(grad_logits, router_weight.repeat(2, 1))
        halves = torch.mm(grad_logits.t(), x, out_dtype=torch.float32)
        e = router_weight.shape[0]
        grad_w = torch.empty_like(router_weight)
        torch.add(halves[:e], halves[e:], out=grad_w)
        return grad_x, grad_w

@old_route_backward.register_fake
def _(g, ga, gl, x, w, *rest):
    return torch.empty_like(x), torch.empty_like(w)

def old_setup(ctx, inputs, output):
    x, router_weight, _, normalize_weights, load_balance_coef, z_loss_coef = inputs
    router_logits, _, expert_indices, _, _, _, tokens_per_expert, _ = output
    ctx.save_for_backward(x, router_weight, router_logits, expert_indices, tokens_per_expert)
    ctx.loss_arguments = (normalize_weights, load_balance_coef, z_loss_coef)
    ctx.set_materialize_grads(False)

def old_backward(ctx, *grads):
    grad_router_logits, grad_routing_weights, _, grad_aux_loss = grads[:4]
    x, router_weight, router_logits, expert_indices, tokens_per_expert = ctx.saved_tensors
    if grad_routing_weights is None:
        grad_routing_weights = router_logits.new_zeros(expert_indices.shape)
    c = lambda g: None if g is None else g.contiguous()
    gx, gw = old_route_backward(grad_routing_weights.contiguous(), c(grad_aux_loss), c(grad_router_logits), x,
                                router_weight, router_logits, expert_indices, tokens_per_expert, *ctx.loss_arguments)
    return gx, gw, None, None, None, None

def use(version):
    if version == "old":
        router_ops._route.register_autograd(old_backward, setup_context=old_setup)
    else:
        router_ops._route.register_autograd(lambda ctx, *grads: router_ops._backward(ctx, grads, router_ops._route_backward),
                                            setup_context=router_ops._setup_context)

scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
variants = [("dense", "dense", "new"), ("uniform, old route", "triton_uniform", "old"),
            ("uniform, new route", "triton_uniform", "new"), ("variable, old route", "triton_variable", "old"),
            ("variable, new route", "triton_variable", "new")]
steps, grads = {}, {}
for label, mlp, version in variants:
    use(version)
    model = b.build_model(scale, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model, mode="reduce-overhead")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the first step's gradients, for the comparison
        _, loss = fwd(*batches[0])
    loss.backward()
    grads[label] = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    def step(i, fwd=fwd, opt=opt):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(*batches[i % 8])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for i in range(6):
        step(i)
    torch.cuda.synchronize()
    steps[label] = step
use("new")
for mlp in ("uniform", "variable"):
    old, new = grads[f"{mlp}, old route"], grads[f"{mlp}, new route"]
    print(f"# {mlp}: gradients old vs new route bitwise equal: {all(torch.equal(a, c) for a, c in zip(old, new))}; "
          f"largest |diff| {max(float((a - c).abs().max()) for a, c in zip(old, new)):.3e}")
times = {label: [] for label in steps}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 150
for r in range(rounds):
    for label, step in steps.items():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); step(r); e.record(); e.synchronize()
        times[label].append(s.elapsed_time(e))
dense = statistics.median(times["dense"])
print(f"# {rounds} rounds, median ms per step (MoE tax vs dense)")
for label, ts in times.items():
    med = statistics.median(ts)
    print(f"{label:22s} {med:.3f} ms  ({med / dense:.3f}x)  p25 {statistics.quantiles(ts, n=4)[0]:.3f} p75 {statistics.quantiles(ts, n=4)[2]:.3f}")
