"""Expert parallelism: the E experts of one MoE layer split across the ranks of a torch.distributed group.

Each rank holds a contiguous range of experts (their rows of w1, v1, w2) and the whole, replicated router. One
forward on a rank with N local tokens (k = top-k, R = N * k assignments, P ranks):
    route            x [N, H] -> routing_weights, expert_indices [N, k]                 (routing.py, replicated)
    sort by expert   -> the R rows ordered by expert, so each destination rank's rows are contiguous
    exchange counts  all_to_all of the per-expert counts, read on the host: the split sizes (EP syncs here)
    dispatch         all_to_all_single of x's rows [R, H] -> received rows [R_in, H], by source then expert
    local experts    ops.expert_mlp with top_k = 1 and unit weights: its gather sorts the received rows by
                     local expert, its combine puts the outputs back in the order they arrived -> [R_in, H]
    return           the reverse all_to_all_single -> [R, H], in this rank's sorted order
    combine          routing weights applied in fp32, each token's k rows summed in slot order -> [N, H]
The backward runs both exchanges in reverse (`AllToAll.backward`). An expert's gradient is the gradient of the
sum of every rank's loss; the router's gradient is this rank's only. Data parallelism over the same ranks averages
the router's and divides the experts' by P: `data_parallel` (DDP) or `fully_shard_dense` (FSDP2) does both.
"""

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from triton_moe.config import MoEConfig
from triton_moe.layer import MoELayer, check_model
from triton_moe.ops import expert_mlp
from triton_moe.routing import Routing, sort_by_expert

EXPERT_PARAMETERS = ("w1", "v1", "w2")
_EXCHANGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # by their codes in the exchange
LOCAL_BUFFERS = ("local_width_offsets",)  # rank-specific, like the expert parameters


def split_experts(num_experts: int, world_size: int,
                  expert_ranges: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """The `(start, end)` expert range of each rank: `expert_ranges` checked, or E split evenly over the ranks.

    Ranges are half-open, one per rank in group-rank order, contiguous, non-empty, and cover 0..E together.
    """
    if expert_ranges is None:
        if num_experts % world_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the process group's size "
                             f"{world_size}; pass expert_ranges=[(start, end), ...] to split them unevenly")
        per_rank = num_experts // world_size
        return [(rank * per_rank, (rank + 1) * per_rank) for rank in range(world_size)]
    ranges = [tuple(r) for r in expert_ranges]
    for rank, bounds in enumerate(ranges):
        if len(bounds) != 2 or not all(isinstance(bound, int) and not isinstance(bound, bool) for bound in bounds):
            raise ValueError(f"expert_ranges must hold one (start, end) pair of ints per rank; rank {rank} has "
                             f"{bounds!r}: {ranges}")
    if len(ranges) != world_size:
        raise ValueError(f"expert_ranges must give one (start, end) per rank of the process group "
                         f"({world_size}), got {len(ranges)}: {ranges}")
    next_start = 0
    for rank, (start, end) in enumerate(ranges):
        if start != next_start or end <= start:
            raise ValueError(f"expert_ranges must be contiguous, non-empty (start, end) ranges covering experts "
                             f"0..{num_experts} in rank order; rank {rank} has ({start}, {end}), expected start "
                             f"{next_start}: {ranges}")
        next_start = end
    if next_start != num_experts:
        raise ValueError(f"expert_ranges cover experts 0..{next_start}, but the layer has num_experts="
                         f"{num_experts}: {ranges}")
    return ranges


def _group_rank_and_size(process_group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ExpertParallelMoEMLP needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group (e.g. under torchrun) before building it")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


class AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with variable split sizes; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows, output_splits: list[int], input_splits: list[int], group):
        received = rows.new_empty((sum(output_splits), *rows.shape[1:]))
        dist.all_to_all_single(received, rows.contiguous(), output_splits, input_splits, group=group)
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return received

    @staticmethod
    def backward(ctx, grad_received):
        output_splits, input_splits = ctx.splits
        return AllToAll.apply(grad_received, input_splits, output_splits, ctx.group), None, None, None


class ExpertParallelMoEMLP(MoELayer):
    """The Triton MoE MLP with its experts split across the ranks of `process_group` (default: the world).

    `expert_ranges`: one half-open `(start, end)` range of experts per rank, contiguous, covering 0..E (ranks may
    hold different numbers of experts and widths); default: E split evenly, which needs E divisible by the
    group's size. Parameters: the router [E, H] (replicated: keep it in sync across ranks) and this rank's
    experts' rows of w1, v1, w2, `[local_width, H]`. Fill them from a single-process layer's state_dict with
    `load_global_state_dict`; `global_state_dict` gathers them back. Every rank of the group must call forward
    and backward together (collectives), with any number of tokens, zero included.
    """

    def __init__(self, config: MoEConfig, process_group=None,
                 expert_ranges: list[tuple[int, int]] | None = None):
        rank, world_size = _group_rank_and_size(process_group)
        ranges = split_experts(config.num_experts, world_size, expert_ranges)
        start, end = ranges[rank]
        offsets = config.expert_width_offsets
        super().__init__(config, weight_rows=offsets[end] - offsets[start])
        self.process_group, self.rank, self.world_size = process_group, rank, world_size
        self.expert_ranges = ranges
        self.local_experts = range(start, end)
        self.local_rows = slice(offsets[start], offsets[end])  # this rank's rows of the global w1, v1, w2
        self.local_widths = config.expert_widths[start:end]
        self.experts_per_rank = [e - s for s, e in ranges]
        self.register_buffer("local_width_offsets", torch.tensor(self._local_width_offsets()), persistent=False)

    def _local_width_offsets(self) -> list[int]:
        """[local experts + 1]: where each of this rank's experts' rows starts in its w1, v1, w2, then their end."""
        offsets = self.config.expert_width_offsets[self.local_experts.start:self.local_experts.stop + 1]
        return [offset - offsets[0] for offset in offsets]

    def _layout_buffers(self) -> dict[str, list[int]]:
        return {**super()._layout_buffers(), "local_width_offsets": self._local_width_offsets()}

    def _experts_or_empty(self, x, routing, intermediates):
        return self._experts(x, routing, intermediates)  # a rank without tokens still joins the exchanges

    def _experts(self, x: torch.Tensor, routing: Routing, intermediates: dict | None) -> torch.Tensor:
        if intermediates is not None:
            raise NotImplementedError("forward_with_intermediates is not available under expert parallelism; "
                                      "gather the weights (global_state_dict) into an MoEMLP instead")
        cfg, group = self.config, self.process_group
        num_tokens, k = routing.expert_indices.shape
        dtype = self.compute_dtype(x)
        sort = sort_by_expert(routing.expert_indices, cfg.num_experts)  # rows by expert: by destination rank
        send_counts, recv_counts = self._exchange_counts(sort.tokens_per_expert, dtype)
        send_splits = [sum(send_counts[s:e]) for s, e in self.expert_ranges]  # rows to each rank
        num_local = len(self.local_experts)
        recv_splits = [sum(recv_counts[i:i + num_local]) for i in range(0, len(recv_counts), num_local)]

        # Each token's k rows, in sorted order; expand + a permutation keeps the backward free of atomics.
        sorted_x = x.to(dtype)[:, None].expand(num_tokens, k, cfg.hidden_size).reshape(-1, cfg.hidden_size)
        sorted_x = sorted_x[sort.row_to_flat]  # [R, H]
        received = AllToAll.apply(sorted_x, recv_splits, send_splits, group)  # [R_in, H]: by source, then expert
        y_received = self._local_experts(received, recv_counts, dtype)  # [R_in, H], same order
        y_rows = AllToAll.apply(y_received, send_splits, recv_splits, group)  # [R, H], sorted order
        y_slots = y_rows[sort.flat_to_row].view(num_tokens, k, cfg.hidden_size)  # [N, k, H]
        output = (y_slots.float() * routing.routing_weights[..., None]).sum(dim=1)  # [N, H] fp32
        return output.to(dtype)

    def _exchange_counts(self, tokens_per_expert: torch.Tensor, dtype: torch.dtype) -> tuple[list[int], list[int]]:
        """This rank's rows per expert [E], and the rows it receives per (source rank, local expert) [P * E_local].

        all_to_all_single takes its split sizes as Python ints, so the counts are read on the host: expert
        parallelism synchronises once per forward, here. Each rank also sends every other its rows' dtype and
        hidden size, so that ranks that disagree raise a ValueError, all of them, before the rows are exchanged
        (which would abort the process, or hang).
        """
        num_local, num_experts = len(self.local_experts), self.config.num_experts
        own_header = [_EXCHANGE_DTYPES.index(dtype), self.config.hidden_size]
        header = tokens_per_expert.new_tensor(own_header)  # (2,)
        send = torch.cat([part for first, last in self.expert_ranges
                          for part in (tokens_per_expert[first:last], header)])  # (E + 2P,)
        recv = tokens_per_expert.new_empty(self.world_size * (num_local + 2))
        dist.all_to_all_single(recv, send, [num_local + 2] * self.world_size,
                               [count + 2 for count in self.experts_per_rank], group=self.process_group)
        counts = torch.cat([tokens_per_expert, recv]).tolist()
        received = [counts[num_experts + rank * (num_local + 2):][:num_local + 2]  # its counts, dtype, hidden
                    for rank in range(self.world_size)]
        ranks_disagree = [(rank, _EXCHANGE_DTYPES[code], hidden) for rank, (*_, code, hidden) in enumerate(received)
                          if [code, hidden] != own_header]
        if ranks_disagree:
            raise ValueError(
                f"expert-parallel ranks must exchange rows of one dtype and hidden size: rank {self.rank} has "
                f"{dtype}, hidden {self.config.hidden_size}; " + ", ".join(
                    f"rank {rank} has {other_dtype}, hidden {hidden}" for rank, other_dtype, hidden in ranks_disagree))
        return counts[:num_experts], [count for row in received for count in row[:num_local]]

    def _local_experts(self, received: torch.Tensor, recv_counts: list[int], dtype) -> torch.Tensor:
        """Run the local experts on the received rows [R_in, H]; outputs [R_in, H] in the same order."""
        num_local = len(self.local_experts)
        expert_of_row = torch.repeat_interleave(
            torch.arange(num_local, device=received.device).repeat(self.world_size),
            torch.tensor(recv_counts, device=received.device), output_size=received.shape[0])  # [R_in]
        # Each received row is a "token" with one slot: the sort's gather orders them by local expert (stably),
        # and the combine of top_k = 1 with unit weights writes each output back to its row.
        sort = sort_by_expert(expert_of_row[:, None], num_local)
        unit_weights = torch.ones(received.shape[0], device=received.device, dtype=torch.float32)
        return expert_mlp(received, unit_weights, self.w1, self.v1, self.w2, sort, self.local_width_offsets,
                          self.local_widths, self.config.activation, self.config.keep_sorted_x, dtype)

    def load_global_state_dict(self, state_dict: dict) -> None:
        """Load a single-process layer's state_dict: the router and this rank's experts' rows."""
        self.load_state_dict(shard_state_dict(self, state_dict))

    def gather_expert_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's `local` [local_width, ...] (a weight shard or its gradient) -> the global [total_width, ...].

        A collective: every rank of the group calls it.
        """
        offsets = self.config.expert_width_offsets
        widths = [offsets[e] - offsets[s] for s, e in self.expert_ranges]
        padded = local.new_zeros((max(widths), *local.shape[1:]))  # all_gather needs equal shapes
        padded[:local.shape[0]] = local
        shards = [torch.empty_like(padded) for _ in widths]
        dist.all_gather(shards, padded.contiguous(), group=self.process_group)
        return torch.cat([shard[:width] for shard, width in zip(shards, widths)])

    def global_state_dict(self) -> dict:
        """The single-process layer's state_dict (router, global w1, v1, w2), on every rank. A collective."""
        return gather_state_dict(self)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}/{self.world_size}, "
                f"local_experts={self.local_experts.start}..{self.local_experts.stop - 1}")


def _expert_layers(model: nn.Module):
    """(prefix for names, layer) of each expert-parallel layer in `model`."""
    check_model(model)
    return [(f"{name}." if name else "", module) for name, module in model.named_modules()
            if isinstance(module, ExpertParallelMoEMLP)]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of `model`'s parameters sharded by expert parallelism (each rank holds different ones)."""
    return [prefix + name for prefix, layer in _expert_layers(model)
            for name in EXPERT_PARAMETERS if getattr(layer, name) is not None]


def shard_state_dict(model: nn.Module, global_state_dict: dict) -> dict:
    """The state_dict of the single-process twin of `model` (MoEMLP where `model` has ExpertParallelMoEMLP),
    with each expert-parallel layer's w1, v1, w2 cut down to this rank's rows, and each tensor that FSDP shards in
    `model` (a DTensor in its state_dict) distributed as there: for `model.load_state_dict`."""
    if not isinstance(global_state_dict, Mapping):
        raise TypeError(f"global_state_dict must be a state_dict (a mapping of names to tensors), got "
                        f"{type(global_state_dict).__name__}")
    local = dict(global_state_dict)
    for prefix, layer in _expert_layers(model):
        for name in EXPERT_PARAMETERS:
            if prefix + name in local:
                local[prefix + name] = local[prefix + name][layer.local_rows]
    for name, current in model.state_dict().items():
        if isinstance(current, DTensor) and name in local:
            # every rank holds the whole tensor: each keeps its own shard, without communication
            local[name] = distribute_tensor(local[name], current.device_mesh, current.placements, src_data_rank=None)
    return local


@torch.no_grad()
def gather_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` with every expert-parallel layer's shards gathered into the global w1, v1, w2, and FSDP's
    DTensors into whole tensors: the single-process twin's state_dict (a checkpoint), on every rank. A collective:
    every rank calls it."""
    layers = _expert_layers(model)
    state = {name: value.full_tensor() if isinstance(value, DTensor) else value
             for name, value in model.state_dict().items()}
    for prefix, layer in layers:
        for name in EXPERT_PARAMETERS:
            if getattr(layer, name) is not None:
                state[prefix + name] = layer.gather_expert_rows(getattr(layer, name).detach())
    return state


def _rank_local_buffer_names(model: nn.Module) -> list[str]:
    return [prefix + name for prefix, _ in _expert_layers(model) for name in LOCAL_BUFFERS]


def _expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = dict(model.named_parameters())
    return [params[name] for name in expert_parameter_names(model)]


def _average_expert_gradients(experts: list[nn.Parameter], world_size: int) -> None:
    """Divide the experts' gradients by `world_size` as backward computes them.

    Each is the gradient of the sum of the ranks' losses; data parallelism averages the other parameters' over the
    ranks, so this makes every gradient that of the mean of the ranks' losses (EP and DP over the same ranks).
    """
    for param in experts:
        param.register_hook(lambda grad: grad / world_size)


def data_parallel(model: nn.Module, process_group=None, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """`model` under DDP over `process_group`, its expert-parallel experts left out of DDP's all-reduce.

    DDP averages the replicated parameters' gradients (the router included) over the ranks. The experts' are
    divided by the group's size instead, so that every gradient is that of the mean of the ranks' losses (EP and
    DP over the same ranks). The expert layers should use a process group of their own (e.g. `dist.new_group()`),
    so that their exchanges never interleave with DDP's all-reduces on one communicator.
    """
    check_model(model)
    if isinstance(model, ExpertParallelMoEMLP):  # DDP names a root module's parameters inconsistently
        raise ValueError("data_parallel: pass a model that holds the ExpertParallelMoEMLP layers, not a layer")
    _, world_size = _group_rank_and_size(process_group)
    # The local experts' layout buffers differ between ranks too: DDP must not broadcast rank 0's over them.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model) + _rank_local_buffer_names(model))
    _average_expert_gradients(_expert_parameters(model), world_size)
    return nn.parallel.DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)


def fully_shard_dense(model: nn.Module, mesh=None, modules: Iterable[nn.Module] = (), **fsdp_kwargs) -> nn.Module:
    """`model` under FSDP2 (`torch.distributed.fsdp.fully_shard`), its expert-parallel experts left rank-local.

    fully_shard runs on each of `modules` in order, inner ones first (e.g. the transformer blocks: one all-gather
    and one reduce-scatter each), then on `model`, always with the expert layers' w1, v1, w2 as `ignored_params`:
    FSDP shards every other parameter (the routers included) over `mesh` and averages its gradient over the ranks;
    the experts' gradients are divided by the mesh's size instead, as under `data_parallel`. `mesh`: a 1-D
    DeviceMesh over the ranks of every expert layer's process group (default: every rank, on the GPUs where there
    are some); the expert layers should still use a group of their own (`dist.new_group()`), apart from FSDP's.
    An MoE layer reads its router's weight without calling the router: shard the layer or a module that holds it,
    never the router alone. Other keyword arguments go to fully_shard (`mp_policy`, `reshard_after_forward`).

    Load the weights before (`shard_state_dict` also distributes them after); give the optimizer
    `fsdp_param_groups(model.parameters())`. Returns `model`, sharded in place.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("fully_shard_dense: model is under DDP (data_parallel) already, which would average the "
                         "dense gradients a second time; use one of the two")
    if not isinstance(modules, Iterable):  # one module that holds no others (a ModuleList is iterable)
        raise TypeError(f"fully_shard_dense: modules must be an iterable of modules, such as the transformer blocks "
                        f"(model.transformer.h), got {type(modules).__name__}")
    modules = list(modules)
    layers = [layer for _, layer in _expert_layers(model)]
    if any(module is layer.router for module in modules for layer in layers):
        raise ValueError("fully_shard_dense: modules holds an MoE layer's router, whose forward the layer never "
                         "calls, so FSDP would never gather its weight; shard the layer or a module holding it")
    if mesh is None:
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    mesh_ranks = sorted(mesh.mesh.flatten().tolist())
    for layer in layers:
        group = layer.process_group if layer.process_group is not None else dist.group.WORLD
        expert_ranks = sorted(dist.get_process_group_ranks(group))
        if mesh.ndim != 1 or mesh_ranks != expert_ranks:
            raise ValueError(f"fully_shard_dense: mesh must be 1-D over the ranks of the expert layers' process "
                             f"group {expert_ranks}, got a {mesh.ndim}-D mesh over {mesh_ranks}")
    experts = _expert_parameters(model)
    for module in [*modules, model]:
        fully_shard(module, mesh=mesh, ignored_params=set(experts), **fsdp_kwargs)
    _average_expert_gradients(experts, mesh.size())
    return model


def fsdp_param_groups(params) -> list[dict]:
    """An optimizer's param groups for a model under `fully_shard_dense`: `params` (parameters, or param-group
    dicts) with each group split in two, FSDP's DTensors and the rank-local tensors (the experts), its options
    kept in both. foreach and fused optimizer steps (the default on a GPU) refuse a group that mixes the two."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    split = []
    for group in groups:
        group_params = list(group["params"])
        for sharded in (True, False):
            part = [param for param in group_params if isinstance(param, DTensor) == sharded]
            if part:
                split.append({**group, "params": part})
    return split
