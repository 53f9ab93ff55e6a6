"""The expert MLP's torch.library custom ops: their registration (schema, fake tensors, autograd) and
torch.compile of the whole MoEMLP with no graph break (aot_eager on the CPU, Inductor on a GPU)."""

import dataclasses

import pytest
import torch

import triton_moe
import triton_moe.ops  # noqa: F401  (registers the custom ops under torch.ops.triton_moe)
from conftest import DEVICE, DTYPES, ON_GPU, make_input, make_layer, use_problem_size_kernels
from triton_moe import MoEConfig
from triton_moe.kernels.host import running_in_interpreter
from triton_moe.testing.ground_truth import rel_l2_error
from triton_moe.routing import route, sort_by_expert

CONFIGS = {
    "uniform": MoEConfig(expert_sizes=[(4, 32)], num_active_experts=2, hidden_size=32),
    "variable": MoEConfig(expert_sizes=[(2, 48), (2, 16)], num_active_experts=2, hidden_size=32),
}


def op_arguments(config, activation, num_tokens=24, compute_dtype=torch.float32):
    """Arguments of triton_moe::expert_mlp for a random routing, as MoEMLP passes them (fp32, requiring grad; the
    GEMMs in compute_dtype)."""
    config = dataclasses.replace(config, activation=activation)
    layer = make_layer(triton_moe.MoEMLP, config, torch.float32)
    x = make_input((num_tokens, config.hidden_size), torch.float32)
    routing = route(x, layer.router.weight, config)
    sort = sort_by_expert(routing.expert_indices, config.num_experts)
    v1 = layer.v1.detach().clone().requires_grad_() if config.is_gated else None
    tensors = [x.requires_grad_(), routing.routing_weights.flatten().detach().requires_grad_(),
               layer.w1.detach().clone().requires_grad_(), v1, layer.w2.detach().clone().requires_grad_()]
    return (*tensors, sort.row_to_token, sort.row_to_flat, sort.flat_to_row, sort.expert_row_offsets,
            layer.expert_width_offsets, config.expert_widths, activation, True, compute_dtype)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["relu_squared", "swiglu"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_op_passes_opcheck(name, activation, compute_dtype):
    """Schema, fake-tensor shapes, autograd registration and AOT dispatch of the op and, through its autograd, of
    triton_moe::expert_mlp_backward; with fp32 inputs and fp16 GEMMs, also of the casts the forward makes and the
    copies it returns."""
    torch.library.opcheck(torch.ops.triton_moe.expert_mlp.default,
                          op_arguments(CONFIGS[name], activation, compute_dtype=compute_dtype))


@pytest.mark.parametrize("activation", ["relu_squared", "swiglu"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_inputs_of_another_dtype_are_cast_inside(name, activation):
    """fp32 x and weights with fp16 GEMMs (autocast's case) give what fp16 copies of them give: the output, dx and
    the weight gradients come back in fp32 from the same fp32 sums (not rounded to fp16 on the way), so that they
    equal the fp16 results once rounded to fp16, and the routing weights' gradient is the same."""
    args32 = op_arguments(CONFIGS[name], activation, compute_dtype=torch.float16)
    tensors16 = [None if tensor is None else tensor.detach().to(torch.float16).requires_grad_(tensor.requires_grad)
                 for tensor in args32[:5]]
    tensors16[1] = args32[1].detach().clone().requires_grad_()  # the routing weights stay fp32
    args16 = (*tensors16, *args32[5:])
    grad_out = make_input((args32[0].shape[0], args32[0].shape[1]), torch.float16, seed=3)
    results = []
    for args, grad in ((args32, grad_out.float()), (args16, grad_out)):
        out = triton_moe.ops._expert_mlp(*args)[0]
        out.backward(grad)
        results.append([out.detach()] + [tensor.grad for tensor in args[:5] if tensor is not None])
    for index, (got, want) in enumerate(zip(*results)):
        assert got.dtype == torch.float32
        assert torch.equal(got.to(want.dtype), want)
        if index != 2:  # the output, dx and the weight gradients: fp32 sums, not fp16 values cast back
            assert not torch.equal(got.to(want.dtype).float(), got)


def compile_block(config):
    """(eager block, the MoEMLP in it): a LayerNorm then the layer, fp32."""
    layer = make_layer(triton_moe.MoEMLP, config, torch.float32)
    return torch.nn.Sequential(torch.nn.LayerNorm(config.hidden_size), layer).to(DEVICE), layer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_layer_matches_eager(name):
    """torch.compile(fullgraph=True) of a block holding MoEMLP, with Dynamo's default config: no graph break, the
    eager output and gradients."""
    torch._dynamo.reset()
    config = CONFIGS[name]
    block, layer = compile_block(config)
    x = make_input((3, 8, config.hidden_size), torch.float32)
    compiled = torch.compile(block, backend="inductor" if ON_GPU else "aot_eager", fullgraph=True)
    _assert_compiled_matches_eager(block, layer, compiled, x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_layer_takes_new_batch_sizes(name):
    """Batches of other sizes make Dynamo recompile the layer with a dynamic token count, which the launchers then
    see as a symbolic size: each gives eager's output and gradients."""
    torch._dynamo.reset()
    config = CONFIGS[name]
    block, layer = compile_block(config)
    compiled = torch.compile(block, backend="inductor" if ON_GPU else "aot_eager", fullgraph=True)
    for num_tokens in (24, 40, 17):
        x = make_input((num_tokens, config.hidden_size), torch.float32, seed=num_tokens)
        _assert_compiled_matches_eager(block, layer, compiled, x)


def _assert_compiled_matches_eager(block, layer, compiled, x):
    """block and its compiled form give the same output, x's gradient and every parameter's gradient: bit for bit
    on the CPU, to 1e-5 on a GPU, where Inductor fuses the routing's elementwise ops and rounds them differently."""
    results = []
    for run in (block, compiled):
        block.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_()
        out = run(x_leaf)
        (out.square().sum() + layer.aux_loss).backward()
        results.append([out.detach(), x_leaf.grad] + [p.grad for p in block.parameters()])
    for eager, compiled_result in zip(*results):
        if ON_GPU:
            assert rel_l2_error(compiled_result, eager) < 1e-5
        else:
            assert torch.equal(compiled_result, eager)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_graphs_read_nothing_back_to_the_host(name):
    """The forward and backward graphs AOT autograd makes of the layer hold no host read of a device value
    (aten._local_scalar_dense, what .item(), int() or .tolist() of a tensor become): nothing in them waits on the
    device, so CUDA graphs can hold them. On a GPU the expert MLP's custom ops are decomposed into the Triton
    kernels they launch, which Inductor then launches itself; under the interpreter they stay opaque custom ops. And
    the forward hands the backward no empty tensor (the activations or row copies it did not keep)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    torch._dynamo.reset()
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    config = CONFIGS[name]
    block, layer = compile_block(config)
    backend = aot_autograd(fw_compiler=keep_graph, bw_compiler=keep_graph,
                           partition_fn=min_cut_rematerialization_partition)  # Inductor's partition
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    (compiled(make_input((3, 8, config.hidden_size), torch.float32)).square().sum() + layer.aux_loss).backward()
    assert len(graphs) == 2  # forward, backward
    targets = [{node.target for node in graph.graph.nodes} for graph in graphs]
    if running_in_interpreter():
        assert torch.ops.triton_moe.expert_mlp.default in targets[0]
        assert torch.ops.triton_moe.expert_mlp_backward.default in targets[1]
    else:
        from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

        for graph_targets in targets:
            assert triton_kernel_wrapper_functional in graph_targets
            assert not any("triton_moe.expert_mlp" in str(target) for target in graph_targets)
    for graph_targets in targets:
        assert torch.ops.aten._local_scalar_dense.default not in graph_targets
        # the kernels write only their outputs: no input of the graph is written back
        assert torch.ops.aten.copy_.default not in graph_targets
    # nothing empty goes from the forward to the backward: each tensor that does costs host work at both ends of
    # every CUDA-graph replay
    backward_inputs = [node.meta["val"] for node in graphs[1].graph.nodes if node.op == "placeholder"]
    assert all(value.numel() > 0 for value in backward_inputs if isinstance(value, torch.Tensor))


class _TwoBlocks(torch.nn.Module):
    """Two blocks of compile_block's kind whose forward returns a loss with the layers' aux losses in it, as a
    nanoGPT forward does."""

    def __init__(self, config, detach_layers):
        super().__init__()
        self.blocks = torch.nn.Sequential(compile_block(config)[0], compile_block(config)[0])
        self.detach_layers = detach_layers

    def forward(self, x):
        return self.blocks(x).square().sum() + triton_moe.aux_loss(self, detach_layers=self.detach_layers)


def test_compiled_backward_takes_no_gradient_of_detached_aux_losses():
    """A compiled forward that sums the aux losses with detach_layers=True hands its backward graph one gradient
    (the loss's) instead of one more per layer (each layer's aux_loss, which leaves the graph as module state: AOT
    autograd fills its missing gradient with zeros on every step). The gradients are the same either way."""
    from torch._dynamo.backends.common import aot_autograd

    config = CONFIGS["variable"]
    results = []
    for detach_layers in (False, True):
        torch._dynamo.reset()
        backward_graphs = []

        def as_is(graph_module, example_inputs):
            return graph_module

        def keep_backward(graph_module, example_inputs):
            backward_graphs.append(graph_module)
            return graph_module

        torch.manual_seed(0)
        model = _TwoBlocks(config, detach_layers).to(DEVICE)
        backend = aot_autograd(fw_compiler=as_is, bw_compiler=keep_backward)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        compiled(make_input((3, 8, config.hidden_size), torch.float32)).backward()
        [backward] = backward_graphs
        tangents = [node for node in backward.graph.nodes if node.op == "placeholder" and "tangents" in node.name]
        assert len(tangents) == (1 if detach_layers else 3)
        results.append([param.grad for param in model.parameters()])
    for grad, plain_grad in zip(*reversed(results)):
        assert torch.equal(grad, plain_grad)


@pytest.fixture
def weight_grad_reads(monkeypatch):
    """The token rows of each weight_grad call the expert MLP makes, in order: "gathered" or "sorted". Skips where
    the weight gradients always gather (a GPU without TMA)."""
    if not triton_moe.kernels.tuning.has_tma(torch.device(DEVICE)):
        pytest.skip("this GPU has no TMA: the weight gradients always gather")
    reads = []
    weight_grad = triton_moe.ops.weight_grad

    def recording_weight_grad(hidden_rows, hidden_rows2, token_rows, row_to_token, *rest, **options):
        reads.append("gathered" if row_to_token is not None else "sorted")
        return weight_grad(hidden_rows, hidden_rows2, token_rows, row_to_token, *rest, **options)

    monkeypatch.setattr(triton_moe.ops, "weight_grad", recording_weight_grad)
    return reads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu_squared", "swiglu"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sorted_token_rows_leave_every_gradient_as_it_was(name, activation, dtype, weight_grad_reads,
                                                          monkeypatch):
    """With the copies of x's and grad_out's rows in expert-sorted order (which tuning.sorted_rows_pay_off allows for
    large problems only, forced here) the layer's output and every gradient are those of the gathered path, bit for
    bit; keep_sorted_x=False leaves dW1 on gathered rows. The weight gradients' reads are recorded to show which
    path ran."""
    config = dataclasses.replace(CONFIGS[name], activation=activation)
    x = make_input((3, 8, config.hidden_size), dtype)
    results = {}
    for label, min_rows_x_hidden, keep_sorted_x in (("gathered", 2**62, True), ("sorted", 0, True),
                                                    ("dW2 sorted", 0, False)):
        monkeypatch.setattr(triton_moe.kernels.tuning, "SORTED_ROWS_MIN_ROWS_X_HIDDEN", min_rows_x_hidden)
        layer = make_layer(triton_moe.MoEMLP, dataclasses.replace(config, keep_sorted_x=keep_sorted_x), dtype)
        x_leaf = x.clone().requires_grad_()
        weight_grad_reads.clear()
        out = layer(x_leaf)
        (out.square().sum() + layer.aux_loss).backward()
        results[label] = [out.detach(), x_leaf.grad] + [param.grad for param in layer.parameters()]
        assert weight_grad_reads == {"gathered": ["gathered", "gathered"], "sorted": ["sorted", "sorted"],
                                     "dW2 sorted": ["sorted", "gathered"]}[label]  # dW2, then dW1
    for label in ("sorted", "dW2 sorted"):
        for got, want in zip(results[label], results["gathered"], strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu_squared", "gelu", "swiglu"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_large_problem_kernels_leave_the_layer_as_it_was(name, activation, dtype, monkeypatch):
    """The layer with the kernels of large problems forced at this size (tuning's thresholds at 0: token rows
    sorted for the weight gradients, weights read by TMA (16-bit), relu²'s and gelu's dA GEMM finishing dh_pre in
    its epilogue) against the small-problem kernels: the output and the experts' weight gradients bit for bit (dA
    is rounded the same way before either finishes it); the routing weights' gradient is summed per column tile
    first, so the router's gradient and x's (which it reaches through the router) only to rounding."""
    config = dataclasses.replace(CONFIGS[name], activation=activation)
    x = make_input((3, 8, config.hidden_size), dtype)
    results = []
    for size in ("small", "large"):
        use_problem_size_kernels(size, monkeypatch)
        layer = make_layer(triton_moe.MoEMLP, config, dtype)
        x_leaf = x.clone().requires_grad_()
        out = layer(x_leaf)
        (out.square().sum() + layer.aux_loss).backward()
        results.append(dict(output=out.detach(), x=x_leaf.grad,
                            **{param_name: param.grad for param_name, param in layer.named_parameters()}))
    small, large = results
    for key in small:
        if key in ("x", "router.weight"):
            tolerance = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            assert rel_l2_error(large[key], small[key]) < tolerance, key
        else:
            assert torch.equal(large[key], small[key]), key


def test_compiled_layer_takes_the_persistent_kernels(monkeypatch):
    """Under torch.compile a large 16-bit problem on Hopper takes the persistent kernels, as eagerly: Inductor's
    code launches them (down and dX; dW2 and dW1 over the sorted rows), with tuning's thresholds at 0 for this size.
    The output and every gradient agree with eager's within bf16 rounding (eagerly the gathering GEMMs read the
    weights by TMA, in a trace by pointers; Inductor fuses the routing's elementwise ops)."""
    from torch._inductor.utils import run_and_get_code

    if not ON_GPU or not triton_moe.kernels.tuning.has_warp_specialization(torch.device(DEVICE)):
        pytest.skip("Inductor launches the persistent kernels on Hopper only")
    torch._dynamo.reset()
    use_problem_size_kernels("large", monkeypatch)
    config = CONFIGS["uniform"]
    layer = make_layer(triton_moe.MoEMLP, config, torch.bfloat16)
    x = make_input((24, config.hidden_size), torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for run in (layer, compiled):
        def forward_backward(run=run):
            layer.zero_grad(set_to_none=True)
            x_leaf = x.clone().requires_grad_()
            out = run(x_leaf)
            (out.float().square().sum() + layer.aux_loss).backward()
            return [out.detach(), x_leaf.grad] + [param.grad for param in layer.parameters()]
        if run is compiled:
            result, codes = run_and_get_code(forward_backward)
            code = "\n".join(codes)
            assert code.count("_persistent_rows_gemm") and code.count("_persistent_weight_grad"), code[-3000:]
        else:
            result = forward_backward()
        results.append(result)
    for eager, compiled_result in zip(*results):
        assert rel_l2_error(compiled_result, eager) < 1e-2


def test_frozen_up_projection_keeps_no_sorted_rows(weight_grad_reads, monkeypatch):
    """With w1 frozen the forward keeps no copy of x's rows (dW1 is not needed), while dW2 still reads grad_out's
    sorted rows; the sorted path is forced at this size."""
    monkeypatch.setattr(triton_moe.kernels.tuning, "SORTED_ROWS_MIN_ROWS_X_HIDDEN", 0)
    layer = make_layer(triton_moe.MoEMLP, CONFIGS["variable"], torch.float32)
    layer.w1.requires_grad_(False)
    layer(make_input((3, 8, 32), torch.float32)).square().sum().backward()
    assert weight_grad_reads == ["sorted", "gathered"]  # dW2, then dW1 (computed, unused)
    assert layer.w1.grad is None and layer.w2.grad is not None
