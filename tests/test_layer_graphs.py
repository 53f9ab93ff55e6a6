"""MoEMLP's eager layer replayed from CUDA graphs (triton_moe/layer_graphs.py, moe.enable_cuda_graphs): every
replay against the same layer run eagerly, bit for bit, and every case where a replay must not stand in for the
eager node. On a GPU the graphs are CUDA's; on the CPU an emulation stands in for them (EmulatedGraphCapture), which
checks the replay rules and the copies but not what only a GPU shows: the graphs' memory and addresses."""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import triton_moe
from conftest import ON_GPU, assert_bitwise_equal, gpu_only, make_input, make_layer, seed_config
from triton_moe import MoEConfig, layer_graphs
from triton_moe.layer_graphs import MAX_SIGNATURES

# bf16 and the seed configs on a GPU; fp32 and small layers through the CPU interpreter, whose time follows the
# number of kernel programs
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
NUM_TOKENS = 96 if ON_GPU else 24
HIDDEN = 256 if ON_GPU else 64
if ON_GPU:
    CONFIGS = {"uniform": seed_config("64exp_uniform"), "variable": seed_config("64exp_variable"),
               "variable_swiglu": seed_config("8exp_variable", activation="swiglu")}
else:
    CONFIGS = {"uniform": MoEConfig(expert_sizes=[(4, 64)], num_active_experts=2, hidden_size=HIDDEN),
               "variable": MoEConfig(expert_sizes=[(2, 96), (2, 32)], num_active_experts=2, hidden_size=HIDDEN),
               "variable_swiglu": MoEConfig(expert_sizes=[(2, 96), (2, 32)], num_active_experts=2,
                                            hidden_size=HIDDEN, activation="swiglu")}


def copy_into(static_results, results):
    """Copy what a run returned into what the capture returned, tensor by tensor (None and the same tensor: left)."""
    if isinstance(static_results, torch.Tensor):
        if static_results is not results:
            static_results.copy_(results)
    elif isinstance(static_results, (tuple, list)):
        for static, result in zip(static_results, results):
            copy_into(static, result)


class EmulatedGraph:
    """A captured function that a replay runs again, its results copied into the ones the capture returned."""

    def __init__(self, function, static_results):
        self.function, self.static_results = function, static_results

    def replay(self):
        with torch.no_grad():  # a graph's replay runs its kernels, none of autograd's work
            copy_into(self.static_results, self.function())


class EmulatedGraphCapture(layer_graphs.GraphCapture):
    """CUDA graphs emulated on the CPU: the layer replays CPU tensors, and its captures run eagerly."""

    def can_replay(self, x):
        return not x.is_cuda

    def stream_and_pool(self, device):
        return None, None

    def warm_up(self, function, stream, device):
        function()

    def capture(self, function, stream, pool, device):
        static_results = function()
        return EmulatedGraph(function, static_results), static_results


@pytest.fixture(autouse=True)
def graph_capture(monkeypatch):
    if not ON_GPU:
        monkeypatch.setattr(layer_graphs, "GRAPH_CAPTURE", EmulatedGraphCapture())


def eager_and_graphed(config, param_dtype=DTYPE):
    """Two layers with the same parameters: one eager, one replayed from CUDA graphs."""
    eager = make_layer(triton_moe.MoEMLP, config, param_dtype)
    graphed = copy.deepcopy(eager)
    assert triton_moe.enable_cuda_graphs(graphed) == 1
    return eager, graphed


def step(layer, x, grad_out, loss_terms="output and aux loss", autocast=False):
    """One forward + backward; (output, aux loss, counts, x's gradient, each parameter's gradient), cloned."""
    x = x.detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    output_loss = (out.float() * grad_out.float()).sum()
    loss = {"output and aux loss": output_loss + 100.0 * layer.aux_loss, "output": output_loss,
            "aux loss": layer.aux_loss}[loss_terms]
    loss.backward()
    return dict(out=out.detach().clone(), aux=layer.aux_loss.detach().clone(),
                counts=layer.tokens_per_expert.clone(), x=x.grad.clone(),
                **{name: param.grad.clone() for name, param in layer.named_parameters() if param.grad is not None})


def new_batch(seed):
    return make_input((NUM_TOKENS, HIDDEN), DTYPE, seed=seed), make_input((NUM_TOKENS, HIDDEN), DTYPE, seed=seed + 1000)


@pytest.mark.parametrize("param_dtype, autocast", [
    pytest.param(DTYPE, False, id="bf16" if ON_GPU else "fp32"),
    pytest.param(torch.float32, True, marks=gpu_only, id="fp32_params_bf16_autocast")])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_replays_train_as_eager_bit_for_bit(name, param_dtype, autocast):
    """Four SGD steps on new batches: each replay (captured at the first) gives the eager layer's output, aux loss,
    counts and every gradient bit for bit, and reads the parameters the optimizer updated in place."""
    eager, graphed = eager_and_graphed(CONFIGS[name], param_dtype)
    optimizers = [torch.optim.SGD(layer.parameters(), lr=0.5) for layer in (eager, graphed)]
    for seed in range(4):
        x, grad_out = new_batch(seed)
        if autocast:
            x = x.float()
        results = []
        for layer, optimizer in zip((eager, graphed), optimizers):
            optimizer.zero_grad(set_to_none=True)
            results.append(step(layer, x, grad_out, autocast=autocast))
            optimizer.step()
        assert_bitwise_equal(*results)
    assert graphed.cuda_graphs.replays == 4 and graphed.cuda_graphs.signatures == 1


@pytest.mark.parametrize("loss_terms", ["output", "aux loss"])
def test_a_loss_without_the_output_or_the_aux_loss(loss_terms):
    """The backward graph serves a loss holding both; one that holds one of the two runs the eager node's backward
    on the replay's activations, with eager's results."""
    eager, graphed = eager_and_graphed(CONFIGS["variable"])
    for seed in range(2):
        x, grad_out = new_batch(seed)
        results = []
        for layer in (eager, graphed):
            layer.zero_grad(set_to_none=True)
            results.append(step(layer, x, grad_out, loss_terms))
        assert_bitwise_equal(*results)
    assert graphed.cuda_graphs.replays == 2


def test_results_outlive_the_next_replay():
    """Outputs, aux losses, counts and gradients are copies: the next replay leaves those of the last step as they
    were, and gradients accumulated over two steps are eager's."""
    eager, graphed = eager_and_graphed(CONFIGS["uniform"])
    kept = []
    for layer in (eager, graphed):
        outputs = []
        for seed in range(2):  # gradients accumulate over both
            x, grad_out = new_batch(seed)
            x.requires_grad_()
            out = layer(x)
            outputs.append((out, layer.aux_loss, layer.tokens_per_expert))
            ((out.float() * grad_out.float()).sum() + 100.0 * layer.aux_loss).backward()
        kept.append([tensor.detach() for tensors in outputs for tensor in tensors]
                    + [param.grad for param in layer.parameters()])
    for eager_tensor, graphed_tensor in zip(*kept):
        assert torch.equal(eager_tensor, graphed_tensor)
    assert graphed.cuda_graphs.replays == 2


def test_a_backward_with_create_graph_raises_as_in_eager():
    """A replayed layer's backward refuses create_graph=True as the eager node's does: its gradients could not be
    differentiated again. The loss holds the output and the aux loss, so that the backward would replay."""
    _, graphed = eager_and_graphed(CONFIGS["variable"])
    x = new_batch(0)[0].requires_grad_()
    out = graphed(x)
    assert graphed.cuda_graphs.replays == 1
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(out.float().square().sum() + graphed.aux_loss, x, create_graph=True)


def test_a_second_forward_before_the_backward_runs_eagerly():
    """Two forwards, then one backward of their summed losses: the second forward cannot replay (the first one's
    activations are the graph's), so it runs the eager node; the results are eager's, and replays resume after."""
    eager, graphed = eager_and_graphed(CONFIGS["variable"])
    (x1, grad1), (x2, grad2) = new_batch(0), new_batch(1)
    results = []
    for layer in (eager, graphed):
        loss = 0.0
        outputs = []
        for x, grad_out in ((x1, grad1), (x2, grad2)):
            out = layer(x.detach().requires_grad_())
            outputs.append(out.detach().clone())
            loss = loss + (out.float() * grad_out.float()).sum() + 100.0 * layer.aux_loss
        if layer is graphed:
            assert layer.cuda_graphs.replays == 1
        loss.backward()
        results.append(outputs + [param.grad.clone() for param in layer.parameters()])
    for eager_tensor, graphed_tensor in zip(*results):
        assert torch.equal(eager_tensor, graphed_tensor)
    x, grad_out = new_batch(2)
    assert_bitwise_equal(step(eager, x, grad_out), step(graphed, x, grad_out))
    assert graphed.cuda_graphs.replays == 2


def test_forwards_that_do_not_replay():
    """Without gradients, and under non-reentrant checkpointing's saved-tensor hooks, the layer runs eagerly; a new
    token count captures a signature of its own."""
    eager, graphed = eager_and_graphed(CONFIGS["uniform"])
    x, grad_out = new_batch(0)
    with torch.no_grad():
        assert torch.equal(eager(x), graphed(x))
    results = []
    for layer in (eager, graphed):
        x_grad = x.detach().requires_grad_()
        out = checkpoint(layer, x_grad, use_reentrant=False)
        (out.float() * grad_out.float()).sum().backward()
        results.append([out.detach(), x_grad.grad] + [param.grad for param in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    for eager_tensor, graphed_tensor in zip(*results):
        assert torch.equal(eager_tensor, graphed_tensor)
    assert graphed.cuda_graphs.replays == 0 and graphed.cuda_graphs.signatures == 0
    for num_tokens in (NUM_TOKENS, NUM_TOKENS // 2, NUM_TOKENS):
        assert_bitwise_equal(step(eager, x[:num_tokens], grad_out[:num_tokens]),
                             step(graphed, x[:num_tokens], grad_out[:num_tokens]))
        for layer in (eager, graphed):
            layer.zero_grad(set_to_none=True)
    assert graphed.cuda_graphs.replays == 3 and graphed.cuda_graphs.signatures == 2


def test_signatures_past_the_limit_run_eagerly():
    """A layer captures MAX_SIGNATURES token counts; the next one runs the eager node, with eager's results, and the
    captured ones still replay."""
    eager, graphed = eager_and_graphed(CONFIGS["uniform"])
    limit = MAX_SIGNATURES
    x, grad_out = new_batch(0)
    token_counts = [NUM_TOKENS - 4 * index for index in range(limit + 1)] + [NUM_TOKENS]
    for num_tokens in token_counts:
        assert_bitwise_equal(step(eager, x[:num_tokens], grad_out[:num_tokens]),
                             step(graphed, x[:num_tokens], grad_out[:num_tokens]))
        for layer in (eager, graphed):
            layer.zero_grad(set_to_none=True)
    assert graphed.cuda_graphs.signatures == limit and graphed.cuda_graphs.replays == limit + 1


def test_parameters_in_new_storage_are_captured_anew():
    """A parameter given new storage (`.data =`) drops the graphs, which read the old one: the next step captures
    again and reads the new values."""
    eager, graphed = eager_and_graphed(CONFIGS["variable"])
    for seed in range(3):
        if seed == 2:
            for layer in (eager, graphed):
                layer.w1.data = layer.w1.data * 1.5
        x, grad_out = new_batch(seed)
        results = []
        for layer in (eager, graphed):
            layer.zero_grad(set_to_none=True)
            results.append(step(layer, x, grad_out))
        assert_bitwise_equal(*results)
    assert graphed.cuda_graphs.replays == 3 and graphed.cuda_graphs.signatures == 1


def test_weights_moved_between_forward_and_backward():
    """A weight given new storage and values between a forward and its backward (as a sharded parameter gathered
    again): the backward graph would read the old storage; the layer runs the eager backward instead, with eager's
    results."""
    eager, graphed = eager_and_graphed(CONFIGS["uniform"])
    for seed in range(2):
        x, grad_out = new_batch(seed)
        results = []
        for layer in (eager, graphed):
            x_grad = x.detach().requires_grad_()
            out = layer(x_grad)
            if seed == 1:
                layer.w2.data = layer.w2.data * 2
            ((out.float() * grad_out.float()).sum() + 100.0 * layer.aux_loss).backward()
            results.append([out.detach(), x_grad.grad] + [param.grad for param in layer.parameters()])
            layer.zero_grad(set_to_none=True)
        for eager_tensor, graphed_tensor in zip(*results):
            assert torch.equal(eager_tensor, graphed_tensor)
    assert graphed.cuda_graphs.replays == 2


@pytest.mark.parametrize("weight", ["w1", "router.weight"])
def test_a_weight_changed_in_place_before_the_backward_raises_as_in_eager(weight):
    """A weight that the backward reads changed in place between the forward and the backward (an optimizer step
    taken too early): autograd raises for the eager node's saved tensor, and the replayed layer raises too, where it
    would otherwise read the new values."""
    for layer in eager_and_graphed(CONFIGS["uniform"]):
        x, grad_out = new_batch(0)
        out = layer(x.requires_grad_())
        with torch.no_grad():
            layer.get_parameter(weight).mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            ((out.float() * grad_out.float()).sum() + layer.aux_loss).backward()


def test_a_backward_after_a_later_replay_raises():
    """A retained graph's second backward, after a later forward has replayed over its activations, raises instead
    of reading them."""
    _, graphed = eager_and_graphed(CONFIGS["uniform"])
    (x1, grad1), (x2, grad2) = new_batch(0), new_batch(1)
    out = graphed(x1.requires_grad_())
    first_loss = (out.float() * grad1.float()).sum() + graphed.aux_loss
    first_loss.backward(retain_graph=True)
    first_loss.backward(retain_graph=True)  # no replay in between: its activations are still there
    out = graphed(x2.requires_grad_())
    ((out.float() * grad2.float()).sum() + graphed.aux_loss).backward()
    with pytest.raises(RuntimeError, match="later forward"):
        first_loss.backward()


@gpu_only
def test_make_graphed_callables_over_a_layer_with_graphs():
    """Inside another graph's capture the layer runs its eager node, which that graph then holds."""
    eager, graphed = eager_and_graphed(CONFIGS["uniform"])
    x, grad_out = new_batch(0)
    x.requires_grad_()
    outer = torch.cuda.make_graphed_callables(graphed, (x,))
    results = []
    for layer, forward in ((eager, eager), (graphed, outer)):
        x.grad = None
        out = forward(x)
        out.backward(grad_out)
        results.append([out.detach().clone(), x.grad.clone()] + [param.grad.clone() for param in layer.parameters()])
    for eager_tensor, graphed_tensor in zip(*results):
        assert torch.equal(eager_tensor, graphed_tensor)


def test_enable_cuda_graphs_sets_each_layer(monkeypatch):
    """enable_cuda_graphs switches each Triton MoEMLP of a model (not the stk reference's), on and off, and names a
    bad argument; a copy keeps the setting without the captures. With CUDA's graphs (no emulation) the layer replays
    on a GPU and never on the CPU; on either, it gives the eager results."""
    monkeypatch.setattr(layer_graphs, "GRAPH_CAPTURE", layer_graphs.GraphCapture())
    config = seed_config("8exp_variable")
    model = torch.nn.Sequential(make_layer(triton_moe.MoEMLP, config, torch.float32),
                                make_layer(triton_moe.MoEMLP, config, torch.float32))
    eager = copy.deepcopy(model)
    assert triton_moe.enable_cuda_graphs(model) == 2
    assert all(layer.cuda_graphs is not None for layer in model)
    copied = copy.deepcopy(model)
    assert all(layer.cuda_graphs is not None and layer.cuda_graphs.signatures == 0 for layer in copied)
    with pytest.raises(ValueError, match="enabled"):
        triton_moe.enable_cuda_graphs(model, enabled="yes")
    x = make_input((8, 256), torch.float32)
    assert torch.equal(model(x), eager(x))
    assert all(layer.cuda_graphs.replays == (1 if ON_GPU else 0) for layer in model)
    assert triton_moe.enable_cuda_graphs(model, enabled=False) == 2
    assert all(layer.cuda_graphs is None for layer in model)
