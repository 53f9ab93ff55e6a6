"""What graphing each MoE layer gives an eager step: the seed GPT eager, with its MoE layers as they are and replayed
from torch.cuda.make_graphed_callables as the README advises (a module returning the output and the aux loss, which
keeps its gradient), round-robin against dense. argv[2] = "detached": graph the layer alone, its aux loss without
gradient (a bound, not a training setup)."""
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_train_step as b  # noqa: E402
from harness import print_round_robin, round_robin_ms  # noqa: E402
from triton_moe.testing.gpt import get_batch, load_bytes  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
detached = sys.argv[2:] == ["detached"]
scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)


class OutputAndAuxLoss(torch.nn.Module):
    """The README's advice: graph a module that returns the layer's output and its aux loss."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x), self.layer.aux_loss


class Detached(torch.nn.Module):
    """A layer graphed alone: its aux loss, a tensor of the captured graph, leaves it without gradient."""

    def __init__(self, layer, sample):
        super().__init__()
        self.layer = torch.cuda.make_graphed_callables(layer, (sample,))

    def forward(self, x):
        y = self.layer(x)
        self.layer.aux_loss = self.layer.aux_loss.detach()
        return y


class GraphedLayer(torch.nn.Module):
    """A layer replayed from make_graphed_callables of OutputAndAuxLoss: its aux loss, with its gradient, goes back on
    the layer for the GPT's aux_loss(model)."""

    def __init__(self, layer, sample):
        super().__init__()
        self.layer = layer
        self.graphed = torch.cuda.make_graphed_callables(OutputAndAuxLoss(layer), (sample,))

    def forward(self, x):
        y, self.layer.aux_loss = self.graphed(x)
        return y


steps = {}
for mlp, graphed in (("dense", False), ("triton_uniform", False), ("triton_uniform", True),
                     ("triton_variable", False), ("triton_variable", True)):
    model = b.build_model(scale, mlp)
    if graphed:
        sample = torch.randn(scale.batch_size, scale.block_size, scale.n_embd, device="cuda", requires_grad=True)
        for block in model.transformer.h:
            with autocast():
                block.mlp = (Detached if detached else GraphedLayer)(block.mlp, sample)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i, model=model, opt=opt):
        with autocast():
            _, loss = model(*batches[i % 8])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for i in range(5):
        step(i)
    steps["dense" if mlp == "dense" else f"{mlp[7:]}{' graphed' if graphed else ''}"] = step
torch.cuda.synchronize()
print(f"# eager seed GPT step, {rounds} rounds round-robin")
print_round_robin(round_robin_ms(steps, rounds), "dense")
