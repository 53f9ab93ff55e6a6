"""MoELayer: what the Triton MoEMLP and the stk reference share: parameters, input checks, routing, aux loss.

A subclass implements `_experts(x, routing, intermediates)`, the expert computation from routed tokens to
the combined output, and may replace `_route` (the plain-torch `routing.route`) by a faster one with the same
results. Everything around it (flattening `[..., hidden]`, dtype handling, the router and its
auxiliary loss) lives here once, so the two implementations differ only where they are meant to.
"""

import os
import warnings

import torch
import torch.nn as nn

from triton_moe.config import MoEConfig, check_bool, expert_sizes_of_widths, format_expert_sizes
from triton_moe.routing import Routing, route


INTERMEDIATE_KEYS = (
    "router_logits", "expert_indices", "routing_weights", "tokens_per_expert", "row_to_token",
    "sorted_x", "h_pre", "h_act", "y_expert", "output", "aux_loss",
)  # plus "h_up" (x v1ᵀ per expert) when the activation is swiglu


class MoELayer(nn.Module):
    """Parameters (identical names, shapes and init in every implementation, so a state_dict loads into any):

    - `router`: `nn.Linear(hidden, E, bias=False)`, weight [E, hidden]
    - `w1`: [total_width, hidden], up projection (the gate for swiglu)
    - `v1`: [total_width, hidden], the second up projection, only for swiglu: `silu(x w1ᵀ) * (x v1ᵀ)`
    - `w2`: [total_width, hidden], down projection (`y = h w2`)
    Expert `e` owns rows `config.expert_width_offsets[e]:config.expert_width_offsets[e + 1]` of w1, v1, w2.
    Init: every parameter ~ Normal(0, config.init_std), as nanoGPT initialises its linear layers.
    - `expert_widths`: a buffer [E] int64, the experts' widths in order: the layout the rows of w1, v1, w2 follow.
    It travels in the state_dict, so that loading one of another layout raises a ValueError that names both; a
    state_dict without it (older checkpoints) loads as before, checked by the tensors' shapes alone.

    `weight_rows` (default `config.total_width`) is how many rows of w1, v1, w2 this module holds: fewer when it
    holds only some experts' rows (expert parallelism, `triton_moe.expert_parallel`).
    """

    def __init__(self, config: MoEConfig, weight_rows: int | None = None):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, such as MoEConfig(expert_sizes='4x512,4x256', "
                            f"num_active_experts=2, hidden_size=768), got {type(config).__name__}")
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        rows = config.total_width if weight_rows is None else weight_rows
        self.weight_rows = rows
        self.router = nn.Linear(hidden, config.num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(rows, hidden))
        self.v1 = nn.Parameter(torch.empty(rows, hidden)) if config.is_gated else None
        self.w2 = nn.Parameter(torch.empty(rows, hidden))
        self.register_buffer("expert_widths", torch.tensor(config.expert_widths, dtype=torch.int64))
        self.aux_loss = None  # the last forward's weighted auxiliary loss, a tensor in the graph
        self.tokens_per_expert = None  # the last forward's (token, slot) assignments per expert, [E] int64
        self._forward_without_grad = False  # whether the last forward outside a backward ran without autograd
        self.reset_parameters()

    def __getstate__(self):
        # The last forward's aux loss belongs to that forward's autograd graph, which copy.deepcopy and pickle
        # refuse: a copy (an EMA model, a snapshot) starts without one, and without the last forward's counts, as a
        # new layer does.
        state = super().__getstate__()
        return {**state, "aux_loss": None, "tokens_per_expert": None}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = state_dict.get(prefix + "expert_widths")
        if saved is not None and (not isinstance(saved, torch.Tensor) or saved.dim() != 1):
            raise ValueError(f"the state_dict's {prefix}expert_widths must be a 1-D tensor of the experts' widths, "
                             f"got {saved!r}")
        if saved is not None and saved.tolist() != self.config.expert_widths:
            saved_sizes = format_expert_sizes(expert_sizes_of_widths(saved.tolist()))
            raise ValueError(
                f"the state_dict holds experts of expert_sizes {saved_sizes!r}, but this layer "
                f"has expert_sizes {self.config.expert_sizes_text!r}: the rows of w1, v1 and w2 would go to other "
                "experts")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # A checkpoint from before the layout was saved: the tensors' shapes are all it can be checked by.
        if prefix + "expert_widths" in missing_keys:
            missing_keys.remove(prefix + "expert_widths")
        # load_state_dict(assign=True) into a layer built on the meta device hands it the checkpoint's tensors but
        # no buffer outside the state_dict: those are made from the config where the weights now are.
        for name, values in self._layout_buffers().items():
            buffer = getattr(self, name)
            if buffer.is_meta and not self.w1.is_meta:
                setattr(self, name, torch.tensor(values, dtype=buffer.dtype, device=self.w1.device))

    def _layout_buffers(self) -> dict[str, list[int]]:
        """The buffers that hold the expert layout, by name, with the values the config gives them (a subclass adds
        its own)."""
        return {"expert_widths": self.config.expert_widths}

    def _apply(self, fn, recurse=True):
        # Module.to_empty hands every tensor uninitialised memory (a model built on the meta device, then moved),
        # and load_state_dict leaves a buffer alone that the state_dict does not hold: the layout buffers are
        # written from the config again after every move, in place, so that no kernel reads another layout.
        super()._apply(fn, recurse)
        with torch.no_grad():
            for name, values in self._layout_buffers().items():
                buffer = getattr(self, name)
                buffer.copy_(torch.tensor(values, dtype=buffer.dtype))
        return self

    def reset_parameters(self):
        for param in self.parameters():
            nn.init.normal_(param, mean=0.0, std=self.config.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> [..., hidden], same dtype; the weighted aux loss is kept on `self.aux_loss`."""
        self._check_input(x)
        self._check_aux_loss_reaches_autograd()
        output, self.aux_loss, self.tokens_per_expert = self._route_and_experts(x)  # output [..., hidden]
        return output.to(x.dtype)

    def _route_and_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output [..., hidden], aux_loss [], tokens_per_expert [E] int64) of x [..., hidden], checked: _route,
        then _experts, on x's tokens flattened to [N, hidden] (N >= 0). A subclass may run the two as one (MoEMLP's
        eager path) with the same results."""
        x_flat = self._flatten_input(x)  # [N, hidden]
        routing = self._route(x_flat)
        tokens_per_expert = self._count_tokens_per_expert(routing)  # int64: never part of autograd
        output = self._experts_or_empty(x_flat, routing, None)  # [N, hidden]
        return output.view(x.shape), routing.aux_loss, tokens_per_expert

    def _check_aux_loss_reaches_autograd(self):
        """Warn when the forward is a recomputation whose first run had autograd off: reentrant checkpointing
        (torch.utils.checkpoint(..., use_reentrant=True)) runs the forward under no_grad, so the aux loss the
        training loss took then has no gradient, and the recomputation's aux loss reaches no loss."""
        if torch.compiler.is_compiling():
            return
        recomputing = torch._C._current_graph_task_id() != -1
        if not recomputing:
            self._forward_without_grad = not torch.is_grad_enabled()
        elif torch.is_grad_enabled() and self._forward_without_grad and any(
                param.requires_grad for param in self.parameters()):
            warnings.warn(
                f"{type(self).__name__} ran under reentrant activation checkpointing (use_reentrant=True): its aux "
                "loss reached the training loss without a gradient, so the router gets none from it. Use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False).", stacklevel=3)

    def forward_with_intermediates(self, x: torch.Tensor) -> dict:
        """Forward that also returns every intermediate, unpadded, rows in the expert-sorted order.

        Keys (N tokens, k = top-k, E experts): router_logits [N, E], expert_indices [N, k], routing_weights
        [N, k], tokens_per_expert [E], row_to_token [N*k], sorted_x [N*k, hidden], h_pre and h_act (lists of
        E tensors [count_e, width_e], before and after the activation; h_pre is x w1ᵀ, the gate for swiglu),
        h_up (swiglu only: x v1ᵀ per expert), y_expert [N*k, hidden] (down projection before the routing
        weight), output [..., hidden], aux_loss [].
        """
        self._check_input(x)
        x_flat = self._flatten_input(x)
        routing = self._route(x_flat)
        self.aux_loss = routing.aux_loss
        self.tokens_per_expert = self._count_tokens_per_expert(routing)  # int64: never part of autograd
        intermediates = {
            "router_logits": routing.router_logits,
            "expert_indices": routing.expert_indices,
            "routing_weights": routing.routing_weights,
            "aux_loss": routing.aux_loss,
        }
        output = self._experts_or_empty(x_flat, routing, intermediates)
        intermediates["output"] = output.view(x.shape).to(x.dtype)
        return intermediates

    def _route(self, x: torch.Tensor) -> Routing:
        """Router logits, top-k weights and indices, aux loss of x [N, hidden] (N >= 0): `routing.route`."""
        return route(x, self.router.weight, self.config)

    def _count_tokens_per_expert(self, routing: Routing) -> torch.Tensor:
        """[E] int64: how many (token, slot) assignments went to each expert (no host synchronisation)."""
        indices = routing.expert_indices.flatten()
        counts = torch.zeros(self.config.num_experts, dtype=torch.int64, device=indices.device)
        return counts.scatter_add_(0, indices, torch.ones_like(indices))

    def _experts(self, x: torch.Tensor, routing: Routing, intermediates: dict | None) -> torch.Tensor:
        """Expert MLPs and the weighted combine: x [N, hidden] (N >= 1) -> [N, hidden] in the compute dtype or in
        x's (forward casts it to x's).

        When `intermediates` is a dict, add tokens_per_expert, row_to_token, sorted_x, h_pre, h_act, (h_up),
        y_expert to it.
        """
        raise NotImplementedError

    def _experts_or_empty(self, x, routing, intermediates):
        if x.shape[0] > 0:
            return self._experts(x, routing, intermediates)
        # No tokens: an empty output that still depends on every parameter, so that they get zero grads.
        zero = sum(param.sum() for param in self.parameters()) * 0.0
        if intermediates is not None:
            widths, hidden = self.config.expert_widths, self.config.hidden_size
            empty_rows = [x.new_zeros(0, width) for width in widths]
            intermediates.update(
                tokens_per_expert=torch.zeros(len(widths), dtype=torch.long, device=x.device),
                row_to_token=torch.zeros(0, dtype=torch.long, device=x.device),
                sorted_x=x.new_zeros(0, hidden), h_pre=empty_rows, h_act=empty_rows,
                y_expert=x.new_zeros(0, hidden),
            )
            if self.config.is_gated:
                intermediates["h_up"] = empty_rows
        return x.new_zeros(0, self.config.hidden_size) + zero.to(x.dtype)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the expert GEMMs run in: autocast's where it is on, else the input's; bf16 runs in fp32 on
        Triton's CPU interpreter, whose bf16 loads and stores are wrong."""
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        # The environment, not kernels.host.running_in_interpreter: this module stays importable without Triton.
        if dtype == torch.bfloat16 and x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return torch.float32
        return dtype

    def _flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden], checked, as [N, hidden], contiguous (a copy only where x is not)."""
        return x.reshape(-1, self.config.hidden_size).contiguous()

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.is_meta:
            raise ValueError("x is on the meta device, where no kernel runs: move a model built there to a device "
                             "(to_empty, then load_state_dict or reset_parameters) before its forward")
        if x.layout != torch.strided or x.is_nested:
            raise ValueError(f"x must be a dense tensor, got layout {x.layout}{' (nested)' if x.is_nested else ''}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"x must have shape [..., hidden] with at least 2 dims, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"x's last dim must be hidden_size={self.config.hidden_size}, got shape {tuple(x.shape)}"
            )
        self._check_parameters(x.device)
        # A process that sees a GPU runs Triton without its interpreter (triton_moe.kernels picks it only where no
        # CUDA device is visible), and would fail at the first launch on a CPU tensor, deep in Triton's launcher.
        # (Without a GPU, TRITON_INTERPRET=0 is how benchmarks/kernel_code.py records the launches instead.)
        if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
            raise ValueError(
                "x and the layer are on the CPU, where the Triton kernels run only through Triton's interpreter, "
                "which this process does not use (a CUDA device is visible): move the model and its inputs to the "
                "GPU, or set TRITON_INTERPRET=1 in the environment before triton_moe is imported")

    def _check_parameters(self, device: torch.device):
        """Every parameter on `device` (x's) with the shape the layer was built with: a parameter replaced since
        (`.data =`, a new `nn.Parameter`) would otherwise reach the kernels, or torch's router GEMM, with another
        shape or device, and fail there or read another layout."""
        config, params = self.config, self._parameters  # w1, v1 (where gated), w2: read once, past Module.__getattr__
        weight_shape = (self.weight_rows, config.hidden_size)
        for name, param, shape in (("router.weight", self.router.weight, (config.num_experts, config.hidden_size)),
                                   ("w1", params["w1"], weight_shape), ("v1", params.get("v1"), weight_shape),
                                   ("w2", params["w2"], weight_shape)):
            if param is None:
                continue
            if param.device != device:
                raise ValueError(f"x is on {device} but the layer's {name} is on {param.device}")
            if param.shape != shape:
                raise ValueError(f"the layer's {name} must have shape {shape} (its experts' rows, hidden_size), "
                                 f"got {tuple(param.shape)}")

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"expert_sizes={cfg.expert_sizes}, top_k={cfg.num_active_experts}, "
                f"hidden_size={cfg.hidden_size}, activation={cfg.activation!r}")


def aux_loss(model: nn.Module, detach_layers: bool = False) -> torch.Tensor:
    """Sum of the last forward's weighted auxiliary losses over all MoE layers of `model` (0 if none ran).

    detach_layers: also leave each layer's `aux_loss` without gradient (its value stays, for logging), so that the
    sum returned here is the only way from the aux losses to the gradients: the call that puts them into the loss.
    Inside a forward that torch.compile compiles, this keeps the layers' aux losses, which leave the compiled graph
    as module state, out of its backward: AOTAutograd otherwise hands that backward a zero gradient for each of
    them every step, a launch and a copy each under CUDA graphs. A later call returns the sum without gradient.
    """
    check_model(model)
    check_bool("detach_layers", detach_layers)
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.aux_loss is not None]
    if not layers:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    total = torch.stack([layer.aux_loss for layer in layers]).sum()
    if detach_layers:
        for layer in layers:
            layer.aux_loss = layer.aux_loss.detach()
    return total


def check_model(model) -> None:
    """A TypeError unless `model` is an nn.Module (the model, or the layer, holding the MoE layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module holding MoE layers, got {type(model).__name__}")
