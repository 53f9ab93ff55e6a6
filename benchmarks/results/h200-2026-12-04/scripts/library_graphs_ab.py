"""The seed GPT's eager step with its MoE layers replayed by triton_moe.enable_cuda_graphs, against the same models
eager and against make_graphed_callables of a module returning (output, aux loss), round-robin against dense."""
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_train_step as b  # noqa: E402
import triton_moe  # noqa: E402
from harness import print_round_robin, round_robin_ms  # noqa: E402
from triton_moe.testing.gpt import get_batch, load_bytes  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]


class GraphedLayer(torch.nn.Module):
    """make_graphed_callables of a module returning the layer's output and aux loss, as the README advised before."""

    def __init__(self, layer, sample):
        super().__init__()
        self.layer = layer
        wrapped = type("OutputAndAuxLoss", (torch.nn.Module,), dict(forward=lambda self, x: (self.l(x), self.l.aux_loss)))()
        wrapped.l = layer
        self.graphed = torch.cuda.make_graphed_callables(wrapped, (sample,))

    def forward(self, x):
        y, self.layer.aux_loss = self.graphed(x)
        return y


steps, models = {}, {}
for mlp, how in (("dense", "eager"), ("triton_uniform", "eager"), ("triton_uniform", "library"),
                 ("triton_uniform", "make_graphed"), ("triton_variable", "eager"), ("triton_variable", "library"),
                 ("triton_variable", "make_graphed")):
    model = b.build_model(scale, mlp)
    if how == "library":
        assert triton_moe.enable_cuda_graphs(model) == scale.n_layer
    if how == "make_graphed":
        sample = torch.randn(scale.batch_size, scale.block_size, scale.n_embd, device="cuda", requires_grad=True)
        for block in model.transformer.h:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                block.mlp = GraphedLayer(block.mlp, sample)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cache = how != "make_graphed"

    def step(i, model=model, opt=opt, cache=cache):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
            _, loss = model(*batches[i % 8])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for i in range(5):
        step(i)
    label = "dense" if mlp == "dense" else f"{mlp[7:]} {how}"
    steps[label] = step
    models[label] = model
torch.cuda.synchronize()
for label, model in models.items():
    layers = [m for m in model.modules() if isinstance(m, triton_moe.MoEMLP) and m.cuda_graphs is not None]
    if layers:
        print(f"# {label}: replays per layer after warm-up {[m.cuda_graphs.replays for m in layers]}")
print(f"# eager seed GPT step, {rounds} rounds round-robin")
print_round_robin(round_robin_ms(steps, rounds), "dense")
for label, model in models.items():
    layers = [m for m in model.modules() if isinstance(m, triton_moe.MoEMLP) and m.cuda_graphs is not None]
    if layers:
        print(f"# {label}: replays per layer at the end {[m.cuda_graphs.replays for m in layers]}")

# One layer (8x512 + ... the seed GPT's variable config), forward + backward back to back: the host's time per call.
import copy  # noqa: E402


layer = models["variable eager"].transformer.h[0].mlp
library = copy.deepcopy(layer)
triton_moe.enable_cuda_graphs(library)
sample = torch.randn(scale.batch_size * scale.block_size, scale.n_embd, device="cuda", requires_grad=True)
grad = torch.randn_like(sample)
wrapped = GraphedLayer(copy.deepcopy(layer), sample)
layer_steps = {}
for label, module in (("layer eager", layer), ("layer library", library), ("layer make_graphed", wrapped)):
    def layer_step(i, module=module):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = module(sample)
        aux = module.layer.aux_loss if isinstance(module, GraphedLayer) else module.aux_loss
        torch.autograd.backward((out, aux), (grad, torch.ones_like(aux)))
    for i in range(3):
        layer_step(i)
    layer_steps[label] = lambda i, f=layer_step: [f(j) for j in range(20)]
print("# one variable-width layer, 20 forward + backward back to back per call, 30 rounds round-robin")
print_round_robin(round_robin_ms(layer_steps, 30), "layer eager")
