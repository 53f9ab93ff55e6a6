"""The seed GPT (8x384 and 4x512+4x256) compiled with Inductor: the gradients of one step from the same weights and
batch, the forward summing the aux losses plainly (twice, separately compiled: the control) and with
detach_layers=True. Prints the largest relative difference per comparison and whether all are bitwise equal."""
import sys
import torch
sys.path.insert(0, "benchmarks")
import bench_train_step as b
import triton_moe.testing.gpt as gpt_module
from triton_moe import aux_loss
from triton_moe.testing.gpt import get_batch, load_bytes
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
batch = tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, torch.Generator().manual_seed(0)))
for mlp in ("triton_uniform", "triton_variable"):
    grads = {}
    for label, detach in (("plain", False), ("plain again", False), ("detach_layers", True)):
        gpt_module.aux_loss = lambda model, detach_layers=False, d=detach: aux_loss(model, detach_layers=d)
        torch._dynamo.reset()
        model = b.build_model(scale, mlp)
        fwd = torch.compile(model)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fwd(*batch)
        loss.backward()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for other in ("plain again", "detach_layers"):
        diffs = {n: ((grads[other][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in grads["plain"].items()}
        worst = max(diffs, key=diffs.get)
        equal = all(torch.equal(grads[other][n], g) for n, g in grads["plain"].items())
        print(f"{mlp}: plain vs {other}: bitwise equal {equal}; largest rel diff {diffs[worst]:.2e} ({worst})", flush=True)
