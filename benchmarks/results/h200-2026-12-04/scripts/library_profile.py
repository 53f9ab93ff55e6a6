"""cProfile of the seed GPT's eager step (variable widths) with enable_cuda_graphs, the backward in the calling thread
so that the profile sees it: where the host's time goes with the layers replayed."""
import cProfile
import pstats
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_train_step as b  # noqa: E402
import triton_moe  # noqa: E402
from triton_moe.testing.gpt import get_batch, load_bytes  # noqa: E402

scale = b.SCALES["seed"]
data = load_bytes(b.DATA)
gen = torch.Generator().manual_seed(0)
batches = [tuple(t.cuda() for t in get_batch(data, scale.batch_size, scale.block_size, gen)) for _ in range(8)]
model = b.build_model(scale, "triton_variable")
triton_moe.enable_cuda_graphs(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
torch.autograd.set_multithreading_enabled(False)


def step(i):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(*batches[i % 8])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


for i in range(5):
    step(i)
torch.cuda.synchronize()
profile = cProfile.Profile()
profile.enable()
for i in range(50):
    step(i)
torch.cuda.synchronize()
profile.disable()
stats = pstats.Stats(profile)
stats.sort_stats("tottime").print_stats(30)
stats.sort_stats("cumulative").print_stats(40)
