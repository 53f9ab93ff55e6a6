"""Baseline MoE layers the benchmarks compare against, on the same MoELayer parameters and routing.

- `LoopMoE`: a per-expert Python loop of torch.matmul (what a first implementation looks like).
- `GroupedMMMoE`: argsort, index gather, torch._grouped_mm for the up and down projections (one call per width
  class for variable widths), index_add_ combine, autograd throughout.
- `megablocks_dmoe`: megablocks' dMoE where megablocks imports (uniform widths only), else None with a reason.
- `scattermoe_moe`: our routing, then ScatterMoE's MLP or GLUMLP on our weights where the `scattermoe` package
  imports (uniform widths only), else None with a reason. ScatterMoE is not vendored: it comes from the Python path.
The stk reference (`reference.MoEMLP`) is one more baseline.
"""

import copy
import functools

import torch
import torch.nn as nn

from triton_moe.activations import apply_activation
from triton_moe.layer import MoELayer
from triton_moe.routing import Routing, route, sort_by_expert


class LoopMoE(MoELayer):
    """One pair of matmuls per expert, tokens selected by a mask; weighted index_add_ combine."""

    def _experts(self, x: torch.Tensor, routing: Routing, intermediates: dict | None) -> torch.Tensor:
        cfg = self.config
        output = torch.zeros_like(x, dtype=torch.float32)  # [N, H]
        offsets = cfg.expert_width_offsets
        for expert in range(cfg.num_experts):
            tokens, slots = (routing.expert_indices == expert).nonzero(as_tuple=True)
            rows = slice(offsets[expert], offsets[expert + 1])
            x_e = x[tokens]
            h_up = x_e @ self.v1[rows].to(x.dtype).T if cfg.is_gated else None
            h_act = apply_activation(cfg.activation, x_e @ self.w1[rows].to(x.dtype).T, h_up)
            y_e = h_act @ self.w2[rows].to(x.dtype)
            output.index_add_(0, tokens, y_e.float() * routing.routing_weights[tokens, slots][:, None])
        return output.to(x.dtype)


class GroupedMMMoE(MoELayer):
    """torch._grouped_mm over the expert-sorted rows; experts of one width form one grouped call."""

    def _experts(self, x: torch.Tensor, routing: Routing, intermediates: dict | None) -> torch.Tensor:
        cfg = self.config
        sort = sort_by_expert(routing.expert_indices, cfg.num_experts)
        x_sorted = x[sort.row_to_token]  # [R, H]
        sorted_routing_weights = routing.routing_weights.flatten()[sort.row_to_flat]  # [R]
        row_offsets = sort.expert_row_offsets.tolist()  # host values to slice each width class's rows
        y_parts, first_expert = [], 0
        for count, width in cfg.expert_sizes:
            experts = slice(first_expert, first_expert + count)
            rows = slice(row_offsets[first_expert], row_offsets[first_expert + count])
            weight_rows = slice(cfg.expert_width_offsets[first_expert],
                                cfg.expert_width_offsets[first_expert + count])
            group_ends = (sort.expert_row_offsets[experts.start + 1:experts.stop + 1]
                          - row_offsets[first_expert]).to(torch.int32)  # [count]
            as_groups = lambda w: w[weight_rows].to(x.dtype).view(count, width, cfg.hidden_size)  # [count, W, H]
            x_class = x_sorted[rows]
            h_pre = torch._grouped_mm(x_class, as_groups(self.w1).transpose(1, 2), offs=group_ends)
            h_up = torch._grouped_mm(x_class, as_groups(self.v1).transpose(1, 2), offs=group_ends) \
                if cfg.is_gated else None
            h_act = apply_activation(cfg.activation, h_pre, h_up)
            y_parts.append(torch._grouped_mm(h_act, as_groups(self.w2), offs=group_ends))
            first_expert += count
        y_sorted = torch.cat(y_parts) * sorted_routing_weights[:, None].to(x.dtype)  # [R, H]
        return torch.zeros_like(x).index_add_(0, sort.row_to_token, y_sorted)


def megablocks_dmoe(config, device, dtype):
    """(layer, None) with megablocks' dMoE for a uniform-width config, or (None, reason it is skipped)."""
    if not config.uniform_width:
        return None, "megablocks supports one expert width only"
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as error:  # megablocks does not import at all without its CUDA extension
        return None, f"megablocks does not import here ({type(error).__name__}: {error})"
    args = Arguments(hidden_size=config.hidden_size, ffn_hidden_size=config.expert_widths[0],
                     moe_num_experts=config.num_experts, moe_top_k=config.num_active_experts,
                     mlp_type="mlp", mlp_impl="sparse", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     device=device)
    return _Megablocks(dMoE(args)), None


class _Megablocks(nn.Module):
    """dMoE takes [seq, batch, hidden] and returns (output, bias): adapt it to [N, hidden] -> [N, hidden]."""

    def __init__(self, dmoe):
        super().__init__()
        self.dmoe = dmoe

    def forward(self, x):
        return self.dmoe(x[:, None, :])[0][:, 0, :]


def scattermoe_moe(config):
    """(layer, None) with a ScatterMoEMoE on MoELayer's initial weights for a uniform-width config, or (None, reason
    it is skipped)."""
    if not config.uniform_width:
        return None, "ScatterMoE supports one expert width only"
    try:
        import scattermoe  # noqa: F401
    except Exception as error:  # not on the Python path, or it fails to import with this torch / Triton
        return None, (f"scattermoe does not import here ({type(error).__name__}: {error}); put its package on "
                      "PYTHONPATH (the GPU runs carry it in .carry/site)")
    return ScatterMoEMoE(MoELayer(config)), None


def scattermoe_weights(config, w1, v1, w2):
    """Our expert weights w1, v1 (None unless gated), w2 [total_width, H] in ScatterMoE's layout: (up [E, W, H], or
    [E, 2W, H] for swiglu, down [E, H, W]), views where the layouts agree.

    ScatterMoE's ParallelExperts holds weight [E, out, in] and computes x weight[e]ᵀ (F.linear), as its own
    per-token reference (dumb_forward in its tests/test_mlp.py) reads it:
    - up: expert e's rows of w1 are [W, H] = [out, in] already: w1.view(E, W, H). GLUMLP's up projection is one
      [E, 2W, H] weight whose output it splits in halves (h, gates) to compute silu(gates) * h: per expert, the
      rows of v1 (the up, h) and then the rows of w1 (the gate).
    - down: y = h w2[e] with w2[e] [W, H] = [in, out]; ScatterMoE's [out, in] is its transpose, [E, H, W].
    """
    if not config.uniform_width:
        raise ValueError(f"config: ScatterMoE supports one expert width only, got expert_sizes "
                         f"{config.expert_sizes_text!r}")
    experts, width, hidden = config.num_experts, config.expert_widths[0], config.hidden_size
    up = w1.view(experts, width, hidden)
    if v1 is not None:
        up = torch.cat([v1.view(experts, width, hidden), up], dim=1)
    return up, w2.view(experts, width, hidden).transpose(1, 2)


class ScatterMoEMoE(nn.Module):
    """Our routing (`routing.route`, as GroupedMMMoE runs it) and ScatterMoE's MLP (relu_squared, gelu) or GLUMLP
    (swiglu) over the experts, on the weights of `layer`, a MoELayer of uniform width.

    Parameters: `router` (a copy of layer's) and `experts`, ScatterMoE's module, whose `experts.weight` and
    `output_experts.weight` are copies of layer's w1, (v1), w2 in ScatterMoE's layout (`scattermoe_weights`), made
    here once. The forward is the whole layer, router included: [..., H] -> [..., H]; the aux loss is kept on
    `aux_loss` as MoELayer does.
    """

    def __init__(self, layer: MoELayer):
        super().__init__()
        from scattermoe.mlp import GLUMLP, MLP

        cfg = self.config = layer.config
        up, down = scattermoe_weights(cfg, layer.w1.detach(), None if layer.v1 is None else layer.v1.detach(),
                                      layer.w2.detach())
        sizes = dict(input_size=cfg.hidden_size, hidden_size=cfg.expert_widths[0], num_experts=cfg.num_experts,
                     top_k=cfg.num_active_experts)
        if cfg.is_gated:
            self.experts = GLUMLP(**sizes)  # its activation, nn.SiLU(), on the gate half: swiglu
        else:
            self.experts = MLP(**sizes, activation=functools.partial(apply_activation, cfg.activation, h_up=None))
        self.router = copy.deepcopy(layer.router)
        with torch.no_grad():
            self.experts.experts.weight.copy_(up)
            self.experts.output_experts.weight.copy_(down)
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_flat = x.reshape(-1, self.config.hidden_size)  # [N, H]
        routing = route(x_flat, self.router.weight, self.config)
        self.aux_loss = routing.aux_loss
        # ScatterMoE's combine multiplies the routing weights into its output as a matmul, in the output's dtype.
        output = self.experts(x_flat, routing.routing_weights.to(x.dtype), routing.expert_indices)  # [N, H]
        return output.view(x.shape)
