"""What costs host time in a mode="reduce-overhead" GPT step: the seed GPT (dense MLP) with extra tensors per
block handed from the forward to the backward, or a differentiable aux scalar per block kept on the module (a
graph output without a gradient), or an int tensor kept on the module; and the MoE model with and without its
tokens_per_expert. Wall (events) and host (perf_counter, no sync) ms per step, medians of 60 steps, 2 rounds."""
import statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import bench_train_step as b
import triton_moe
from triton_moe.testing import gpt as gptmod
from triton_moe.testing.gpt import get_batch, load_bytes

scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(4)]


class SaveExtras(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *extras):
        ctx.save_for_backward(*extras)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _ = ctx.saved_tensors
        return (grad,) + (None,) * len(_)


class Probe(gptmod.DenseMLP):
    extras = 0
    aux = False
    counts = False

    def forward(self, x):
        y = super().forward(x)
        if self.extras:
            base = x.detach().flatten()[:128].to(torch.int64)
            y = SaveExtras.apply(y, *[base + i for i in range(self.extras)])
        if self.aux:
            self.aux_loss = x.float().square().mean() * 1e-6
        if self.counts:
            self.tokens_per_expert = x.detach().flatten()[:8].to(torch.int64)
        return y


def model_for(variant):
    if variant.startswith("dense"):
        model = b.build_model(scale, "dense")
        for block in model.transformer.h:
            mlp = block.mlp
            mlp.__class__ = Probe
            mlp.extras = int(variant.split("extras")[1]) if "extras" in variant else 0
            mlp.aux = "aux" in variant
            mlp.counts = "counts" in variant
        return model
    model = b.build_model(scale, "triton_uniform" if "uniform" in variant else "triton_variable")
    if "nocounts" in variant:
        for m in model.modules():
            if isinstance(m, triton_moe.MoELayer):
                m._count_tokens_per_expert = lambda routing: None
    return model


def loss_of(model, out_loss):
    extra = [m.aux_loss for m in model.modules() if isinstance(m, Probe) and m.aux]
    return out_loss + sum(extra) if extra else out_loss


def measure(variant, steps=60):
    torch._dynamo.reset(); torch.cuda.empty_cache()
    model = model_for(variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    def fwd_loss(idx, tgt):
        _, loss = model(idx, tgt)
        return loss_of(model, loss)
    fwd = torch.compile(fwd_loss, mode="reduce-overhead")
    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(*batches[i % 4])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for i in range(8): step(i)
    torch.cuda.synchronize()
    walls, hosts = [], []
    for i in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); t = time.perf_counter(); step(i); hosts.append(time.perf_counter() - t); e.record(); e.synchronize()
        walls.append(s.elapsed_time(e))
    return statistics.median(walls), statistics.median(hosts) * 1e3


variants = sys.argv[1].split(",")
for rnd in range(2):
    for v in variants:
        try:
            w, h = measure(v)
            print(f"round {rnd} {v:28s} wall {w:.3f} ms  host {h:.3f} ms", flush=True)
        except Exception as err:
            print(f"round {rnd} {v}: {type(err).__name__}: {str(err)[:300]}", flush=True)
