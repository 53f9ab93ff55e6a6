"""Train a small byte-level GPT whose MoE MLPs are expert-parallel, with data parallelism over the same ranks.

    uv run torchrun --nproc_per_node 2 examples/train_ep.py --steps 3               # CPU: gloo, a tiny model
    torchrun --nproc_per_node 8 examples/train_ep.py --steps 200 --n-embd 512       # GPUs: NCCL, one GPU per rank
    torchrun --nproc_per_node 8 examples/train_ep.py --steps 200 --dense fsdp       # the dense parameters sharded

Every rank holds 1/P of each layer's experts (ExpertParallelMoEMLP) and reads its own batches. The attention,
norms, embeddings and routers are replicated and averaged by DDP (`--dense ddp`, `data_parallel`), or sharded by
FSDP2, one group per block (`--dense fsdp`, `fully_shard_dense`). All ranks start from the weights of one
single-process model (same seed), cut to their experts; at the end the shards are gathered into a single-process
checkpoint that `triton_moe/testing/gpt.py`'s GPT with `triton_moe.MoEMLP` loads.
"""

import argparse
import functools
import gc
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from triton_moe import MoEConfig, MoEMLP
from triton_moe.expert_parallel import (ExpertParallelMoEMLP, data_parallel, fsdp_param_groups, fully_shard_dense,
                                        gather_state_dict, shard_state_dict)
from triton_moe.testing.gpt import GPT, GPTConfig, get_batch, load_bytes

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per rank (CPU 2, GPU 16)")
    parser.add_argument("--block-size", type=int, default=None, help="context length (CPU 32, GPU 256)")
    parser.add_argument("--n-layer", type=int, default=None, help="CPU 2, GPU 4")
    parser.add_argument("--n-embd", type=int, default=None, help="CPU 32, GPU 256")
    parser.add_argument("--expert-sizes", default=None,
                        help="count:width,... (CPU 2:64,2:32; GPU 4:512,4:256); experts split evenly over ranks")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dense", choices=("ddp", "fsdp"), default="ddp",
                        help="the dense parameters and routers: replicated under DDP, or sharded by FSDP2")
    parser.add_argument("--data", default=str(ROOT / "data" / "classics.txt"))
    parser.add_argument("--save", default=None, help="write the gathered single-process checkpoint here")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    defaults = dict(batch_size=(2, 16), block_size=(32, 256), n_layer=(2, 4), n_embd=(32, 256),
                    expert_sizes=("2:64,2:32", "4:512,4:256"))
    for name, (cpu, gpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    args.expert_sizes = [tuple(int(v) for v in group.split(":")) for group in args.expert_sizes.split(",")]
    return args


def main():
    args = parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(device)
    ep_group = dist.new_group()  # the experts' exchanges on a communicator of their own, apart from DDP's or FSDP's

    moe = MoEConfig(expert_sizes=args.expert_sizes, num_active_experts=args.top_k, hidden_size=args.n_embd)
    config = GPTConfig(moe=moe, n_layer=args.n_layer, n_head=max(args.n_embd // 64, 1), n_embd=args.n_embd,
                       block_size=args.block_size)
    torch.manual_seed(0)  # the same single-process weights on every rank
    global_state = GPT(config, MoEMLP).state_dict()
    gpt = GPT(config, functools.partial(ExpertParallelMoEMLP, process_group=ep_group)).to(device)
    gpt.load_state_dict(shard_state_dict(gpt, global_state))
    if args.dense == "fsdp":
        model = fully_shard_dense(gpt, modules=gpt.transformer.h)  # shards gpt in place
        params = fsdp_param_groups(model.parameters())  # FSDP's DTensors and the experts apart, for foreach
    else:
        model = data_parallel(gpt)
        params = model.parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    data = load_bytes(Path(args.data))
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=backend == "nccl")
    for step in range(args.steps):
        begin = time.perf_counter()
        x, y = (t.to(device) for t in get_batch(data, args.batch_size, args.block_size, generator))
        with autocast:
            _, loss = model(x, y)  # cross-entropy + the MoE layers' aux loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            tokens = args.batch_size * args.block_size * world_size
            print(f"step {step}: loss {mean_loss.item() / world_size:.4f}, "
                  f"{tokens / (time.perf_counter() - begin):.0f} tokens/s over {world_size} ranks")

    checkpoint = gather_state_dict(gpt)  # a collective: every rank takes part
    if rank == 0 and args.save:
        torch.save(checkpoint, args.save)
        print(f"wrote the single-process checkpoint {args.save}")
    # FSDP's modules hold its device mesh's process groups: released here, before destroy_process_group, their gloo
    # threads end with them; left to the interpreter's exit, their teardown can abort the process.
    del model, gpt, optimizer, params
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
