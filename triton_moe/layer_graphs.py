"""MoEMLP's eager layer replayed from CUDA graphs, where the user asks for it (moe.enable_cuda_graphs): the forward
and the backward of layer_ops' one autograd node, each captured once per input signature and replayed after. A
replay costs the host one graph launch and a few copies in place of the layer's launchers, whose Python sets the
time of a small model's eager step.

    LayerGraphs()(x, router_weight, w1, v1, w2, expert_width_offsets, config, compute_dtype)
        -> what layer_ops.moe_layer returns for the same arguments, bit for bit

The first forward of each input signature (x's shape, dtype and device, the compute dtype, the weights' dtypes)
that a replay can serve captures it; a forward runs moe_layer's eager node instead where a replay cannot stand in:
- without autograd, or with nothing that needs a gradient (a replay keeps its activations for a backward);
- during a backward (activation checkpointing's recomputation), under saved-tensor hooks (non-reentrant
  checkpointing, offloading to the CPU), inside the capture of another CUDA graph, which then holds the eager
  kernels, and where x is not on the current CUDA device, on whose stream a graph replays;
- while the last replayed forward waits for its backward (two forwards before one backward, as gradient
  accumulation over a summed loss does): that forward's activations are the graphs' static tensors, which a second
  replay would overwrite;
- past MAX_SIGNATURES signatures.
The graphs read the parameters where they lie, so optimizer steps and in-place loads reach them; a parameter or
the width offsets moving to new storage (`.data =`, `.to()`) drops the captures, and the next forward captures
anew. One that moves between a forward and its backward (a sharded parameter gathered again) has its backward run
by MoELayerFunction on the replay's activations, as the eager node would. Every result is a copy: the output, the
aux loss, the counts and the gradients never alias a graph's static tensors, which the next replay rewrites.

Each layer captures into a memory pool of its own. Between a forward replay and its backward's replay no other
graph of the layer replays (the rule above), so the pool may place one graph's temporaries where another graph's
static tensors lie without a replay ever overwriting what is still to be read. A backward whose forward's
activations a later replay has overwritten (a second backward through a retained graph) raises a RuntimeError, as
does one whose weights changed in place since the forward where the eager node's backward would raise it.
"""

import weakref

import torch
from torch import Tensor

from triton_moe.config import MoEConfig
from triton_moe.layer_ops import MoELayerFunction, layer_host_arguments
from triton_moe.ops import refuse_create_graph

# Input signatures one layer captures: the training shape, a last partial batch, an evaluation batch with
# gradients. Each holds a forward's activations and the backward's gradients for good.
MAX_SIGNATURES = 4


class _SavedForBackward:
    """What MoELayerFunction.forward keeps for its backward, kept with the captured graphs: a stand-in for the
    autograd context, with the three methods of it that the forward calls."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


class GraphCapture:
    """What LayerGraphs asks of CUDA: whether a forward of x can replay here, a capturing stream and a memory pool
    for a layer, and a function's warm-up and capture. (tests/test_layer_graphs.py puts an emulation in its place
    to check the replay rules on the CPU.)"""

    def can_replay(self, x: Tensor) -> bool:
        """x on the current CUDA device (a graph replays on its stream), and no capture of another graph going on."""
        return (x.is_cuda and x.get_device() == torch.cuda.current_device()
                and not torch.cuda.is_current_stream_capturing())

    def stream_and_pool(self, device: torch.device) -> tuple:
        return torch.cuda.Stream(device), torch.cuda.graph_pool_handle()

    def warm_up(self, function, stream, device: torch.device):
        """function() on the capturing stream: lazy initialisation (kernel compilation, library handles and their
        workspaces) then stays out of the capture."""
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.device(device), torch.cuda.stream(stream):
            function()

    def capture(self, function, stream, pool, device: torch.device) -> tuple:
        """(graph, what function() returned: the static tensors its replays rewrite)."""
        graph = torch.cuda.CUDAGraph()
        # "thread_local": CUDA calls of other threads (a data loader's) may go on while the layer captures.
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool, stream=stream,
                                                         capture_error_mode="thread_local"):
            static_results = function()
        return graph, static_results


GRAPH_CAPTURE = GraphCapture()


class _CapturedSignature:
    """One input signature's two graphs: the forward, and the backward of a loss that holds both the output and the
    aux loss; the static tensors they read and write."""

    def __init__(self, x: Tensor, weights: tuple, host_arguments: tuple, stream, pool):
        self.static_x = x.detach().clone()  # x's shape
        self.static_grad_out = torch.zeros_like(self.static_x)  # the output's shape and dtype: x's
        self.static_grad_aux_loss = torch.ones((), dtype=torch.float32, device=x.device)
        self.saved = _SavedForBackward()

        def forward():  # (out, aux_loss, tokens_per_expert), and the saved tensors: what a replay rewrites
            outputs = MoELayerFunction.forward(self.saved, self.static_x, *weights, *host_arguments)
            return outputs, self.saved.saved_tensors

        def backward():  # (grad_x, grad_router_weight, grad_w1, grad_v1, grad_w2)
            return MoELayerFunction.backward(self.saved, self.static_grad_out, self.static_grad_aux_loss, None)[:5]

        # The capture runs the kernels as the eager node runs them under Function.apply, without autograd; autocast
        # is off for it, since the node takes its compute dtype as an argument and leaves autocast's ops aside.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            GRAPH_CAPTURE.warm_up(lambda: (forward(), backward()), stream, x.device)
            self.forward_graph, (self.static_outputs, _) = GRAPH_CAPTURE.capture(forward, stream, pool, x.device)
            self.backward_graph, self.static_grads = GRAPH_CAPTURE.capture(backward, stream, pool, x.device)
        # The weights the backward reads as they are, not through a copy the forward made: as the eager node's
        # saved tensors, an in-place change of one of them between a forward and its backward is an error.
        self.weights_read_by_backward = [index for index, weight in enumerate(weights)
                                         if weight is not None
                                         and any(saved is weight for saved in self.saved.saved_tensors)]


def storage_pointers(*tensors: Tensor | None) -> tuple[int, ...]:
    """Where the tensors' data lie (0 for None): what a graph reads them by."""
    return tuple(0 if tensor is None else tensor.data_ptr() for tensor in tensors)


WEIGHT_NAMES = ("router.weight", "w1", "v1", "w2")  # the weights in the order the graphs take them


class _Replay:
    """One forward replay, until its backward has run."""

    def __init__(self, number: int, weight_pointers: tuple, weight_versions: tuple):
        self.number = number
        self.weight_pointers = weight_pointers  # where the replay read the weights and the width offsets
        self.weight_versions = weight_versions  # the _version of each weight the backward reads as it is
        self.backward_done = False


class LayerGraphs:
    """One MoEMLP's captured graphs, by input signature, and what decides whether a forward replays them."""

    def __init__(self):
        self._captured = {}  # signature -> _CapturedSignature
        self._weight_pointers = None  # where the captured graphs read the weights and the width offsets
        self._stream = None  # the capturing stream
        self._pool = None  # the memory pool of this layer's graphs
        self._last_replay = None  # weakref to the last forward replay's _Replay
        self.replays = 0  # forward replays so far

    @property
    def signatures(self) -> int:
        """How many input signatures the layer holds graphs for."""
        return len(self._captured)

    def __call__(self, x: Tensor, router_weight: Tensor, w1: Tensor, v1: Tensor | None, w2: Tensor,
                 expert_width_offsets: Tensor, config: MoEConfig, compute_dtype: torch.dtype) -> tuple[Tensor, ...]:
        """layer_ops.moe_layer's (out, aux_loss, tokens_per_expert) of the same arguments: replayed where a replay
        can stand in for the eager node, else from the eager node."""
        host_arguments = layer_host_arguments(x, w1, v1, w2, expert_width_offsets, config, compute_dtype)
        weights = (router_weight, w1, v1, w2)
        captured = self._captured_for(x, weights, host_arguments)
        if captured is None:
            return MoELayerFunction.apply(x, *weights, *host_arguments)
        return _ReplayedLayer.apply(self, captured, x, *weights, host_arguments[0])

    def _captured_for(self, x: Tensor, weights: tuple, host_arguments: tuple) -> _CapturedSignature | None:
        """The graphs of x's signature, captured now if they are not yet; None where the eager node has to run."""
        if not (torch.is_grad_enabled()
                and (x.requires_grad or any(w is not None and w.requires_grad for w in weights))):
            return None
        if (self._waiting_for_backward() or torch._C._current_graph_task_id() != -1
                or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
                or not GRAPH_CAPTURE.can_replay(x)):
            return None
        expert_width_offsets, keep_sorted_x, compute_dtype = host_arguments[0], host_arguments[3], host_arguments[4]
        pointers = storage_pointers(*weights, expert_width_offsets)
        if pointers != self._weight_pointers:  # the graphs read the old storage
            self._captured.clear()
            self._weight_pointers = pointers
        router_weight, w1 = weights[:2]
        signature = (x.shape, x.dtype, x.device, router_weight.dtype, w1.dtype, keep_sorted_x, compute_dtype)
        captured = self._captured.get(signature)
        if captured is None and len(self._captured) < MAX_SIGNATURES:
            if self._pool is None:
                self._stream, self._pool = GRAPH_CAPTURE.stream_and_pool(x.device)
            captured = self._captured[signature] = _CapturedSignature(x, weights, host_arguments, self._stream,
                                                                      self._pool)
        return captured

    def _waiting_for_backward(self) -> bool:
        replay = None if self._last_replay is None else self._last_replay()
        return replay is not None and not replay.backward_done

    def start_replay(self, captured: _CapturedSignature, weights: tuple) -> _Replay:
        self.replays += 1
        versions = tuple(weights[index]._version for index in captured.weights_read_by_backward)
        replay = _Replay(self.replays, self._weight_pointers, versions)
        self._last_replay = weakref.ref(replay)
        return replay

    def check_backward_of(self, replay: _Replay, captured: _CapturedSignature, weights: tuple):
        """Raise where the replay's backward would read what is gone or changed: its activations, overwritten by a
        later replay, or a weight changed in place since its forward (an error in the eager node's backward too)."""
        if replay.number != self.replays:
            raise RuntimeError(
                "a backward through an MoEMLP layer replayed from CUDA graphs ran after a later forward of the layer "
                "had replayed: the activations it needs are gone (a second backward through a retained graph?). "
                "Run one backward per forward, or turn the layer's graphs off with "
                "triton_moe.enable_cuda_graphs(model, False)")
        for index, version in zip(captured.weights_read_by_backward, replay.weight_versions):
            if weights[index]._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: the MoEMLP layer's {WEIGHT_NAMES[index]} changed between its forward and its "
                    "backward (an optimizer step before the backward?)")


class _ReplayedLayer(torch.autograd.Function):
    """MoELayerFunction, replayed: copies of the forward graph's outputs, and of the backward graph's gradients
    where the loss holds both the output and the aux loss and the weights lie where the forward read them. Any other
    backward runs MoELayerFunction's backward on the replay's activations, as the eager node would on its own."""

    @staticmethod
    def forward(ctx, graphs, captured, x, router_weight, w1, v1, w2, expert_width_offsets):
        captured.static_x.copy_(x)
        captured.forward_graph.replay()
        ctx.weights = (router_weight, w1, v1, w2, expert_width_offsets)
        ctx.graphs, ctx.captured, ctx.replay = graphs, captured, graphs.start_replay(captured, ctx.weights)
        out, aux_loss, tokens_per_expert = (tensor.clone() for tensor in captured.static_outputs)
        ctx.mark_non_differentiable(tokens_per_expert)
        ctx.set_materialize_grads(False)
        return out, aux_loss, tokens_per_expert

    @staticmethod
    def backward(ctx, grad_out, grad_aux_loss, _):
        refuse_create_graph()
        captured = ctx.captured
        ctx.graphs.check_backward_of(ctx.replay, captured, ctx.weights)
        if (grad_out is not None and grad_aux_loss is not None
                and storage_pointers(*ctx.weights) == ctx.replay.weight_pointers):
            captured.static_grad_out.copy_(grad_out)
            captured.static_grad_aux_loss.copy_(grad_aux_loss)
            captured.backward_graph.replay()
            grads = tuple(grad.clone() if grad is not None and needed else None
                          for grad, needed in zip(captured.static_grads, ctx.needs_input_grad[2:]))
        else:
            grads = MoELayerFunction.backward(captured.saved, grad_out, grad_aux_loss, None)[:5]
        ctx.replay.backward_done = True
        return (None, None, *grads, None)
