"""ExpertParallelMoEMLP over 2 and 4 processes (gloo on the CPU, NCCL where there is a GPU per rank) against the
single-process MoEMLP on the same global weights: each rank's output and input gradient, and the gathered
expert gradients and all-reduced router gradient. A small GPT with expert-parallel MoE layers and its dense
parameters under FSDP2 (fully_shard_dense) against the single-process GPT: outputs, every gradient, an optimizer
step and the gathered checkpoint; the same for a GPT of plain MoEMLPs under plain DDP. Plus the setup errors,
raised before any collective, and the example training script under torchrun."""

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import triton_moe
from conftest import DEVICE, assert_close, gpu_only, make_input, make_layer
from triton_moe import MoEConfig
from triton_moe.expert_parallel import (ExpertParallelMoEMLP, data_parallel, fsdp_param_groups, fully_shard_dense,
                                        gather_state_dict, shard_state_dict, split_experts)
from triton_moe.testing.ground_truth import max_rel_error
from triton_moe.testing.gpt import GPT, GPTConfig

EXPERT_SIZES = [(2, 64), (2, 48), (4, 16)]  # 8 experts, variable widths
HIDDEN = 32
# The GPT under FSDP and expert parallelism computes the single-process GPT's fp32 math in other summation orders
# (gradients averaged over the ranks, the experts' rows in another order): they agree to about 1e-6 of the largest
# element, and the tolerance is ten times that.
FSDP_MAX_REL = 1e-5

# name -> config overrides, the expert ranges per world size (None: an even split), tokens on each rank,
# experts no token is routed to, whether the layer runs under `data_parallel` (DDP) on a group of its own.
CASES = {
    "uneven_ranges_starved_experts": dict(
        activation="relu_squared", ranges={2: [(0, 3), (3, 8)], 4: [(0, 1), (1, 4), (4, 6), (6, 8)]},
        tokens=[5, 12, 19, 26], starved=(6, 7), ddp=False),  # with 4 ranks, rank 3 receives no rows at all
    "even_split_rank_without_tokens_ddp": dict(
        activation="swiglu", ranges={2: None, 4: None}, tokens=[17, 0, 9, 30], starved=(), ddp=True),
    # a zero router: every logit ties, and the lower expert index wins as in the single-process layer
    "tied_router_logits": dict(
        activation="relu_squared", ranges={2: None, 4: None}, tokens=[7, 7, 7, 7], starved=(), ddp=False,
        zero_router=True),
}


def run_case(case, rank, world_size, ep_group, dtype):
    config = MoEConfig(expert_sizes=EXPERT_SIZES, num_active_experts=2, hidden_size=HIDDEN,
                       activation=case["activation"])
    reference = make_layer(triton_moe.MoEMLP, config, torch.float32)  # the same weights on every rank
    x = make_input((case["tokens"][rank], HIDDEN), torch.float32, seed=10 + rank)
    if case["starved"]:
        x = x.abs()
        with torch.no_grad():  # positive inputs, negative router rows: these experts get no token anywhere
            reference.router.weight[list(case["starved"])] = -1.0
    if case.get("zero_router"):
        with torch.no_grad():
            reference.router.weight.zero_()
    upstream = make_input(x.shape, torch.float32, seed=50 + rank)

    ep = ExpertParallelMoEMLP(config, ep_group, case["ranges"][world_size]).to(DEVICE)
    ep.load_global_state_dict(reference.state_dict())
    model = data_parallel(torch.nn.Sequential(ep)) if case["ddp"] else ep

    results = []
    for layer, module in ((reference, reference), (model, ep)):
        x_leaf = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype, enabled=dtype != torch.float32):
            out = layer(x_leaf)
        ((out * upstream).sum() + module.aux_loss).backward()
        results.append((out, x_leaf.grad))
    (ref_out, ref_dx), (ep_out, ep_dx) = results
    for name, got, want in (("output", ep_out, ref_out), ("grad x", ep_dx, ref_dx)):
        if want.numel():
            assert_close(f"rank {rank}: {name}", got, want, dtype)
        else:
            assert got.shape == want.shape

    # The reference's gradients summed over the ranks' batches are those of the sum of the ranks' losses.
    scale = 1 / world_size if case["ddp"] else 1.0  # under DDP: of the mean
    router_grad = ep.router.weight.grad.clone()
    if not case["ddp"]:
        dist.all_reduce(router_grad)
    want = {"router.weight": reference.router.weight.grad}
    got = {"router.weight": router_grad}
    for name in ("w1", "v1", "w2"):
        if getattr(reference, name) is not None:
            want[name] = getattr(reference, name).grad
            got[name] = ep.gather_expert_rows(getattr(ep, name).grad)
    for name in want:
        dist.all_reduce(want[name])
        assert_close(f"rank {rank}: grad {name}", got[name], want[name] * scale, dtype)
    for name in case["starved"]:
        offsets = config.expert_width_offsets
        assert got["w1"][offsets[name]:offsets[name + 1]].abs().max() == 0

    gathered = ep.global_state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(gathered[name], value), name


def check_mistakes_are_errors(rank):
    """Ranks whose rows differ in dtype raise a ValueError on every rank before the rows are exchanged (gloo
    would abort the process); a checkpoint of another expert layout is refused, naming both."""
    config = MoEConfig(expert_sizes=EXPERT_SIZES, num_active_experts=2, hidden_size=HIDDEN)
    ep = ExpertParallelMoEMLP(config).to(DEVICE)
    x = make_input((6, HIDDEN), torch.float16 if rank == 0 else torch.float32, seed=rank)
    with pytest.raises(ValueError, match="one dtype and hidden size: rank .* torch.float16"):
        ep(x)
    other_layout = MoEConfig(expert_sizes=[(6, 64), (2, 16)], num_active_experts=2, hidden_size=HIDDEN)
    with pytest.raises(ValueError, match="expert_sizes '6x64,2x16'.*expert_sizes '2x64,2x48,4x16'"):
        ep.load_global_state_dict(triton_moe.MoEMLP(other_layout).state_dict())


def check_layer(rank, world_size, dtype):
    with pytest.raises(ValueError, match="one \\(start, end\\) per rank"):
        ExpertParallelMoEMLP(MoEConfig(expert_sizes=EXPERT_SIZES, num_active_experts=2, hidden_size=HIDDEN),
                             expert_ranges=[(0, 8)] * (world_size + 1))
    ep_group = dist.new_group()  # the expert exchanges apart from DDP's all-reduces
    for case in CASES.values():
        run_case(case, rank, world_size, None if not case["ddp"] else ep_group, dtype)
    check_mistakes_are_errors(rank)
    check_built_on_the_meta_device(rank, world_size)


def check_built_on_the_meta_device(rank, world_size):
    """A layer built on the meta device and moved by to_empty (every tensor filled with -7 here) holds this rank's
    width offsets again (a buffer outside the state_dict, which loading leaves alone), and gives the output of a
    layer built on the device."""
    config = MoEConfig(expert_sizes=EXPERT_SIZES, num_active_experts=2, hidden_size=HIDDEN)
    ranges = {2: [(0, 3), (3, 8)], 4: [(0, 1), (1, 4), (4, 6), (6, 8)]}[world_size]
    built = ExpertParallelMoEMLP(config, expert_ranges=ranges).to(DEVICE)
    built.load_global_state_dict(make_layer(triton_moe.MoEMLP, config, torch.float32).state_dict())
    with torch.device("meta"):
        layer = ExpertParallelMoEMLP(config, expert_ranges=ranges)
    empty_like = torch.empty_like
    torch.empty_like = lambda *args, **kwargs: empty_like(*args, **kwargs).fill_(-7)  # uninitialised memory
    try:
        layer.to_empty(device=DEVICE)
    finally:
        torch.empty_like = empty_like
    layer.load_global_state_dict(built.global_state_dict())
    assert torch.equal(layer.local_width_offsets, built.local_width_offsets)
    x = make_input((5 + rank, HIDDEN), torch.float32, seed=rank)
    assert torch.equal(layer(x), built(x))


def assert_same_math(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = max_rel_error(got, want)  # NaN never passes
    assert err <= FSDP_MAX_REL, f"{name}: max rel error {err:.3g} > {FSDP_MAX_REL}"


def check_fully_shard(rank, world_size):
    """A GPT with an expert-parallel MoE layer (uneven expert ranges, variable widths), its dense parameters and
    router under fully_shard_dense (the block one FSDP group, the rest another), against the single-process GPT on
    the same weights, in fp32: each rank's logits and loss, every gradient after FSDP's reduce-scatter and the
    experts' division, one SGD step, and the gathered checkpoint. The reference's gradient is the mean of its
    gradients on the ranks' batches, as the single-process model's on the batches together (an aux loss per batch)."""
    ranges = {2: [(0, 3), (3, 8)], 4: [(0, 1), (1, 4), (4, 6), (6, 8)]}[world_size]
    moe = MoEConfig(expert_sizes=EXPERT_SIZES, num_active_experts=2, hidden_size=HIDDEN, activation="swiglu")
    config = GPTConfig(moe=moe, n_layer=1, n_head=2, n_embd=HIDDEN, block_size=8)
    torch.manual_seed(0)
    reference = GPT(config, triton_moe.MoEMLP).to(DEVICE)
    ep_group = dist.new_group()  # the expert exchanges apart from FSDP's collectives
    model = GPT(config, functools.partial(ExpertParallelMoEMLP, process_group=ep_group, expert_ranges=ranges))
    fully_shard_dense(model.to(DEVICE), modules=model.transformer.h)
    model.load_state_dict(shard_state_dict(model, reference.state_dict()))  # the dense ones distributed
    assert isinstance(model.lm_head.weight, DTensor) and isinstance(model.transformer.h[0].mlp.router.weight, DTensor)
    assert not isinstance(model.transformer.h[0].mlp.w1, DTensor)

    generator = torch.Generator().manual_seed(100 + rank)
    idx, targets = torch.randint(256, (2, 1 + rank % 2, 8), generator=generator).to(DEVICE)  # (B, T) each, B 1 or 2
    results = []
    for net in (reference, model):
        logits, loss = net(idx, targets)  # (B, T, vocab), []
        loss.backward()
        results.append((logits, loss))
    (ref_logits, ref_loss), (ep_logits, ep_loss) = results
    assert_same_math(f"rank {rank}: logits", ep_logits, ref_logits)
    assert_same_math(f"rank {rank}: loss", ep_loss, ref_loss)
    for param in reference.parameters():  # the single-process gradient of the mean of the ranks' losses
        dist.all_reduce(param.grad)
        param.grad /= world_size

    expert_layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, ExpertParallelMoEMLP)}
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        layer_name, _, short_name = name.rpartition(".")
        if isinstance(param, DTensor):
            got = param.grad.full_tensor()
        else:
            assert short_name in ("w1", "v1", "w2"), f"{name} is not sharded by FSDP"
            got = expert_layers[layer_name].gather_expert_rows(param.grad)
        assert_same_math(f"rank {rank}: grad {name}", got, reference_params[name].grad)

    # foreach, as on a GPU by default: it needs the DTensors and the rank-local experts in param groups apart
    torch.optim.SGD(fsdp_param_groups(model.parameters()), lr=0.5, foreach=True).step()
    torch.optim.SGD(reference.parameters(), lr=0.5, foreach=True).step()
    checkpoint = gather_state_dict(model)
    for name, want in reference.state_dict().items():
        assert not isinstance(checkpoint[name], DTensor), name
        assert_same_math(f"rank {rank}: {name} after a step", checkpoint[name], want)

    unsharded = GPT(config, functools.partial(ExpertParallelMoEMLP, process_group=ep_group))
    with pytest.raises(ValueError, match="modules holds an MoE layer's router"):
        fully_shard_dense(unsharded, modules=[unsharded.transformer.h[0].mlp.router])
    with pytest.raises(ValueError, match="mesh must be 1-D over the ranks"):
        fully_shard_dense(unsharded, mesh=init_device_mesh(DEVICE, (1, world_size)))


def check_plain_ddp(rank, world_size, compiled):
    """The plain data parallelism of nanoGPT's train.py: a GPT whose MoE layers hold every expert on every rank,
    wrapped whole in DDP (compiled first, as train.py does, where `compiled`: under DDP, Dynamo's DDP optimizer
    compiles the graph), against the single-process GPT on the same weights, in fp32: each rank's loss, every
    gradient after DDP's all-reduce (the mean of the single-process gradients on the ranks' batches), and one SGD
    step. On a rank, some expert gets no token, so its weight gradient there is the zeros the kernels write, which
    DDP averages with the other rank's."""
    moe = MoEConfig(expert_sizes=EXPERT_SIZES, num_active_experts=2, hidden_size=HIDDEN)
    config = GPTConfig(moe=moe, n_layer=2, n_head=2, n_embd=HIDDEN, block_size=8)
    torch.manual_seed(0)
    reference = GPT(config, triton_moe.MoEMLP).to(DEVICE)
    model = GPT(config, triton_moe.MoEMLP).to(DEVICE)
    model.load_state_dict(reference.state_dict())
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        torch.compile(model, backend="inductor" if DEVICE == "cuda" else "aot_eager") if compiled else model)

    generator = torch.Generator().manual_seed(100 + rank)
    idx, targets = torch.randint(256, (2, 1 + rank % 2, 8), generator=generator).to(DEVICE)  # (B, T) each, B 1 or 2
    losses = []
    for net in (reference, ddp_model):
        _, loss = net(idx, targets)
        loss.backward()
        losses.append(loss)
    assert_same_math(f"rank {rank}: loss", losses[1], losses[0])
    starved = torch.tensor([sum(int((block.mlp.tokens_per_expert == 0).sum()) for block in model.transformer.h)],
                           device=DEVICE)
    dist.all_reduce(starved)
    assert starved.item() > 0, "no expert went without tokens on any rank: another batch seed would test that"
    for param in reference.parameters():  # the single-process gradient of the mean of the ranks' losses
        dist.all_reduce(param.grad)
        param.grad /= world_size
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert_same_math(f"rank {rank}: grad {name}", param.grad, reference_params[name].grad)

    torch.optim.SGD(model.parameters(), lr=0.5).step()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    for name, want in reference.state_dict().items():
        assert_same_math(f"rank {rank}: {name} after a step", model.state_dict()[name], want)


def worker(rank, world_size, port, backend, check, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the processes share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        check(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(check, backend, world_size, *args):
    """Run `check(rank, world_size, *args)` in `world_size` processes of one `backend` group: gloo where no GPU is
    visible (the kernels run on the CPU in Triton's interpreter), NCCL with a GPU per rank; skipped elsewhere."""
    if backend == "gloo" and torch.cuda.is_available():
        pytest.skip("gloo runs the kernels on CPU tensors, in Triton's interpreter, which is used where no GPU is "
                    "visible")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        pytest.skip(f"NCCL needs {world_size} CUDA devices, {torch.cuda.device_count()} visible")
    mp.spawn(worker, args=(world_size, free_port(), backend, check, args), nprocs=world_size, join=True)


# bf16 through autocast, as training runs it: the parameters stay fp32, the expert GEMMs and exchanges run in bf16
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"),
                                   pytest.param(torch.bfloat16, marks=gpu_only, id="bfloat16")])
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_matches_single_process_layer(backend, world_size, dtype):
    spawn(check_layer, backend, world_size, dtype)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_fully_shard_dense_matches_single_process_gpt(backend, world_size):
    spawn(check_fully_shard, backend, world_size)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_plain_ddp_matches_single_process_gpt(backend, compiled):
    spawn(check_plain_ddp, backend, 2, compiled)


@pytest.mark.parametrize("num_experts, world_size, expert_ranges, match", [
    (8, 3, None, "not divisible by the process group's size 3"),
    (8, 2, [(0, 3), (4, 8)], "contiguous"),
    (8, 2, [(0, 3), (3, 7)], "cover experts 0..7"),
    (8, 2, [(0, 0), (0, 8)], "non-empty"),
    (8, 2, [(0, 8)], "one \\(start, end\\) per rank"),
    (8, 2, [(0, 4.0), (4, 8)], "pair of ints per rank; rank 0 has \\(0, 4.0\\)"),
    (8, 2, [("0", "4"), (4, 8)], "pair of ints per rank; rank 0"),
    (8, 2, [(0, 2, 4), (4, 8)], "pair of ints per rank; rank 0"),
])
def test_bad_expert_split_is_refused(num_experts, world_size, expert_ranges, match):
    with pytest.raises(ValueError, match=match):
        split_experts(num_experts, world_size, expert_ranges)


@pytest.mark.parametrize("call, error, match", [
    (lambda: gather_state_dict(None), TypeError, "model must be an nn.Module"),
    (lambda: shard_state_dict(None, {}), TypeError, "model must be an nn.Module"),
    (lambda: shard_state_dict(torch.nn.Linear(2, 2), None), TypeError, "global_state_dict must be a state_dict"),
    (lambda: data_parallel(None), TypeError, "model must be an nn.Module"),
    (lambda: fully_shard_dense(torch.nn.Sequential(torch.nn.Linear(2, 2)), modules=torch.nn.Linear(2, 2)),
     TypeError, "modules must be an iterable of modules"),
])
def test_the_helpers_name_a_wrong_argument(call, error, match):
    """Checked before any collective, so one process without a process group shows them."""
    with pytest.raises(error, match=match):
        call()


def test_uneven_split_is_accepted():
    assert split_experts(8, 3, [(0, 1), (1, 5), (5, 8)]) == [(0, 1), (1, 5), (5, 8)]
    assert split_experts(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_without_process_group_raises():
    config = MoEConfig(expert_sizes=EXPERT_SIZES, num_active_experts=2, hidden_size=HIDDEN)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoEMLP(config)


@pytest.mark.parametrize("dense", ["ddp", "fsdp"])
def test_train_example_runs_under_torchrun(dense):
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs for NCCL (or no GPU, for gloo on the CPU)")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(root / "examples" / "train_ep.py"),
                             "--steps", "2", "--dense", dense], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "step 1: loss" in result.stdout
