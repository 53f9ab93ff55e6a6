"""The Triton MoEMLP against the fp64 per-expert loop and against the stk reference: every intermediate, the
output, the aux loss and every gradient; widths the reference cannot do; determinism; state_dict exchange."""

import subprocess
import sys

import pytest
import torch
import triton

from triton_moe import reference
import triton_moe
from conftest import (DEVICE, DTYPES, HALF_DTYPES, ON_GPU, SEED_CONFIGS, assert_bitwise_equal, assert_close,
                      assert_grads_match, assert_intermediates_match, gpu_only, make_input, make_layer,
                      run_against_loop, seed_config, use_problem_size_kernels)
from triton_moe import MoEConfig
from triton_moe.kernels import tuning
from triton_moe.testing.ground_truth import cosine, rel_l2_error

NUM_TOKENS = 96


def check_against_loop(layer, x, dtype):
    got, want, got_grads, want_grads = run_against_loop(layer, x)
    assert_intermediates_match(got, want, dtype)
    assert_grads_match(got_grads, want_grads, dtype)
    return got, got_grads


@pytest.mark.parametrize("name", list(SEED_CONFIGS))
def test_seed_configs_fp32(name):
    layer = make_layer(triton_moe.MoEMLP, seed_config(name), torch.float32)
    check_against_loop(layer, make_input((NUM_TOKENS, 256), torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("activation", ["relu_squared", "swiglu", "gelu"])
def test_half_precision(activation, dtype):
    config = seed_config("16exp_variable", activation=activation)
    layer = make_layer(triton_moe.MoEMLP, config, dtype)
    check_against_loop(layer, make_input((NUM_TOKENS, 256), dtype), dtype)


# Widths and hidden sizes that are not multiples of any tile: only the Triton layer takes them.
ODD_CONFIGS = {
    "widths_16_48_200": dict(expert_sizes=[(2, 16), (2, 48), (2, 200)], num_active_experts=2, hidden_size=96),
    "width_1_hidden_20": dict(expert_sizes=[(3, 1), (1, 33)], num_active_experts=3, hidden_size=20),
    "single_expert": dict(expert_sizes=[(1, 48)], num_active_experts=1, hidden_size=32),
}


@pytest.mark.parametrize("activation", ["relu_squared", "swiglu", "gelu"])
@pytest.mark.parametrize("name", list(ODD_CONFIGS))
def test_odd_widths(name, activation):
    config = MoEConfig(**ODD_CONFIGS[name], activation=activation)
    layer = make_layer(triton_moe.MoEMLP, config, torch.float32)
    check_against_loop(layer, make_input((29, config.hidden_size), torch.float32), torch.float32)


@pytest.mark.parametrize("num_tokens", [1, 2, 33])
def test_token_counts(num_tokens):
    layer = make_layer(triton_moe.MoEMLP, seed_config("8exp_variable"), torch.float32)
    check_against_loop(layer, make_input((num_tokens, 256), torch.float32), torch.float32)


def test_3d_input_keeps_shape():
    layer = make_layer(triton_moe.MoEMLP, seed_config("8exp_variable", activation="swiglu"), torch.float32)
    x = make_input((3, 13, 256), torch.float32)
    got, _ = check_against_loop(layer, x, torch.float32)
    assert got["output"].shape == (3, 13, 256)


def test_empty_expert_and_all_tokens_to_one():
    config = MoEConfig(expert_sizes=[(3, 48), (2, 16)], num_active_experts=1, hidden_size=64)
    layer = make_layer(triton_moe.MoEMLP, config, torch.float32)
    with torch.no_grad():  # positive inputs and a positive router row: every token goes to expert 3
        layer.router.weight[3] = 1.0
    x = make_input((25, 64), torch.float32).abs()
    got, grads = check_against_loop(layer, x, torch.float32)
    assert got["tokens_per_expert"].tolist() == [0, 0, 0, 25, 0]
    offsets = config.expert_width_offsets
    assert grads["w1"][:offsets[3]].abs().max() == 0 and grads["w2"][offsets[4]:].abs().max() == 0


@pytest.mark.parametrize("kernels", ["small-problem", "large-problem"])
@pytest.mark.parametrize("activation", ["relu_squared", "swiglu", "gelu"])
def test_a_nan_weight_reaches_the_output_and_gradients_as_in_the_loop(activation, kernels, monkeypatch):
    """One NaN in an expert's up projection: NaN in the output and in every gradient exactly where the fp64 loop has
    it (the tokens routed to that expert, and what they reach), as through a dense MLP, and the rest matching; with
    the small and the large problems' kernels (the activation's backward in dA's epilogue or in the row pass)."""
    use_problem_size_kernels(kernels.split("-")[0], monkeypatch)
    config = MoEConfig(expert_sizes=[(2, 48), (2, 16)], num_active_experts=2, hidden_size=64, activation=activation)
    layer = make_layer(triton_moe.MoEMLP, config, torch.float32)
    with torch.no_grad():
        layer.w1[5, 7] = float("nan")  # a hidden unit of expert 0
    got, want, got_grads, want_grads = run_against_loop(layer, make_input((29, 64), torch.float32))
    pairs = [("output", got["output"], want["output"])] + [(name, got_grads[name], want_grads[name])
                                                            for name in want_grads]
    for name, got_value, want_value in pairs:
        want_nan = want_value.isnan().cpu()
        assert torch.equal(got_value.isnan().cpu(), want_nan), name
        if not want_nan.all():
            assert_close(name, got_value[~want_nan], want_value[~want_nan], torch.float32)
    routed_to_0 = (got["expert_indices"] == 0).any(-1).cpu()  # [N]
    assert 0 < routed_to_0.sum() < routed_to_0.numel()
    assert torch.equal(got["output"].isnan().any(-1).cpu(), routed_to_0)


def test_tied_and_non_finite_logits_pick_the_experts_the_loop_picks():
    """Tied router logits (two equal router rows) and non-finite ones (NaN and ±inf in a token's x): the layer and
    the fp64 loop pick the same experts, by the one rule (the k largest logits, ties to the lower index, NaN first)."""
    config = MoEConfig(expert_sizes=[(2, 48), (2, 16)], num_active_experts=2, hidden_size=64)
    layer = make_layer(triton_moe.MoEMLP, config, torch.float32)
    with torch.no_grad():
        layer.router.weight[1] = layer.router.weight[2]  # experts 1 and 2 tie for every token
    x = make_input((29, 64), torch.float32)
    x[3, 5], x[4, 6], x[5, 7] = float("nan"), float("inf"), float("-inf")
    got, want, _, _ = run_against_loop(layer, x)
    assert torch.equal(got["expert_indices"].cpu(), want["expert_indices"].cpu())
    assert got["expert_indices"][3].tolist() == [0, 1]  # an all-NaN row: NaN first, the lower index among ties


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["8exp_variable", "16exp_variable"])
def test_matches_reference(name, dtype):
    """Same weights and input: every intermediate and gradient of the two implementations, one to one."""
    config = seed_config(name)
    ours = make_layer(triton_moe.MoEMLP, config, dtype)
    ref = reference.MoEMLP(config).to(DEVICE, dtype)
    ref.load_state_dict(ours.state_dict())
    results = []
    for layer in (ours, ref):
        x = make_input((NUM_TOKENS, 256), dtype).requires_grad_()
        got = layer.forward_with_intermediates(x)
        (got["output"].float() * make_input(x.shape, dtype, seed=1).float()).sum().backward()
        results.append((got, {"x": x.grad, "w1": layer.w1.grad, "w2": layer.w2.grad,
                              "router": layer.router.weight.grad}))
    (ours_out, ours_grads), (ref_out, ref_grads) = results
    assert_intermediates_match(ours_out, ref_out, dtype)
    for name in ref_grads:
        assert_close(f"grad {name}", ours_grads[name], ref_grads[name], dtype)


def test_reference_state_dict_loads_and_gives_same_output():
    config = seed_config("16exp_variable", activation="swiglu")
    ref = make_layer(reference.MoEMLP, config, torch.float32, seed=3)
    ours = triton_moe.MoEMLP(config).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = make_input((40, 256), torch.float32)
    assert_close("output", ours(x), ref(x), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_bitwise_deterministic(dtype):
    config = MoEConfig(expert_sizes=[(4, 64), (4, 48)], num_active_experts=2, hidden_size=64,
                       activation="swiglu")
    layer = make_layer(triton_moe.MoEMLP, config, dtype)
    runs = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        x = make_input((50, 64), dtype).requires_grad_()
        out = layer(x)
        (out.float() * make_input(x.shape, dtype, seed=1).float()).sum().backward()
        runs.append([out, x.grad] + [p.grad for p in layer.parameters()])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@gpu_only
@pytest.mark.parametrize("name", ["8exp_variable", "64exp_variable"])
def test_bf16_error_not_larger_than_reference(name):
    """bf16 on a GPU: cosine >= 0.999 against fp64 for the output and every gradient, and gradients whose
    relative L2 error is no larger than the stk reference's in bf16.

    The forward output is held to the cosine bound only: both implementations round it to bf16 at the same
    points (the expert rows, then the sum of a token's rows), so their errors are equal in expectation and
    which one is smaller is a coin toss of rounding (measured: within 1% of each other).
    """
    config = seed_config(name)
    ours = make_layer(triton_moe.MoEMLP, config, torch.bfloat16)
    ref = reference.MoEMLP(config).to(DEVICE, torch.bfloat16)
    ref.load_state_dict(ours.state_dict())
    x = make_input((NUM_TOKENS * 4, 256), torch.bfloat16)
    (ours_out, truth, ours_grads, truth_grads), (ref_out, _, ref_grads, _) = [
        run_against_loop(layer, x) for layer in (ours, ref)]
    assert cosine(ours_out["output"], truth["output"]) >= 0.999
    print(f"output: relative L2 error vs fp64, triton {rel_l2_error(ours_out['output'], truth['output']):.3e}, "
          f"reference {rel_l2_error(ref_out['output'], truth['output']):.3e}")
    for key in ("x", "router", "w1", "w2"):
        ours_err, ref_err = rel_l2_error(ours_grads[key], truth_grads[key]), rel_l2_error(ref_grads[key],
                                                                                         truth_grads[key])
        print(f"grad {key}: relative L2 error vs fp64, triton {ours_err:.3e}, reference {ref_err:.3e}")
        assert cosine(ours_grads[key], truth_grads[key]) >= 0.999, key
        assert ours_err <= ref_err, f"grad {key}: triton bf16 error {ours_err:.3g} > reference {ref_err:.3g}"


GRAPH_CONFIGS = ["64exp_uniform", "64exp_variable"]


def step_results(forward, layer, x, grad_out):
    """Output, aux loss and every gradient of one forward + backward of `forward` (the layer or a compiled or
    graphed form of it), with the aux loss in the loss."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out = forward(x)
    aux = layer.aux_loss
    ((out.float() * grad_out.float()).sum() + 100.0 * aux).backward()
    return dict(out=out.detach().clone(), aux=aux.detach().clone(), x=x.grad.clone(),
                **{name: param.grad.clone() for name, param in layer.named_parameters()})


@pytest.mark.parametrize("case, loss_terms, kernels", [
    ("variable relu_squared", "output and aux loss", "small-problem"),
    ("variable relu_squared", "output and aux loss", "large-problem"),
    ("uniform swiglu", "output and aux loss", "large-problem"),
    ("variable relu_squared autocast", "output and aux loss", "small-problem"),
    ("uniform swiglu frozen up-projections", "output", "small-problem"),
    ("variable relu_squared", "output", "small-problem"),
    ("variable relu_squared", "aux loss", "small-problem"),
])
def test_one_node_eager_path_matches_the_two_node_path_bit_for_bit(case, loss_terms, kernels, monkeypatch):
    """The eager forward runs route, sort and experts as one autograd node (layer_ops.moe_layer);
    forward_with_intermediates runs the route's and the expert MLP's nodes (the custom ops' eager paths, which
    torch.compile takes). Output, aux loss, counts and every gradient bit for bit, whichever terms reach the loss;
    under autocast too (x and the weights cast inside, x kept in both dtypes), and with w1 and v1 frozen."""
    if kernels == "large-problem":
        use_problem_size_kernels("large", monkeypatch)
    widths, activation = case.split()[:2]
    config = seed_config("8exp_variable" if widths == "variable" else "8exp_uniform", activation=activation,
                         load_balance_coef=0.3, z_loss_coef=0.01)
    layer = make_layer(triton_moe.MoEMLP, config, torch.float32)
    if "frozen" in case:
        for weight in (layer.w1, layer.v1):
            weight.requires_grad_(False)
    autocast_dtype = torch.bfloat16 if ON_GPU else torch.float16  # the interpreter computes bf16 in fp32
    grad_out = make_input((5, 8, 256), torch.float32, seed=1)
    results = []
    for forward in (layer, lambda x: layer.forward_with_intermediates(x)["output"]):
        layer.zero_grad(set_to_none=True)
        x = make_input((5, 8, 256), torch.float32).requires_grad_()  # 40 tokens
        with torch.autocast(DEVICE, dtype=autocast_dtype, enabled="autocast" in case):
            out = forward(x)
        loss = {"output and aux loss": (out * grad_out).sum() + layer.aux_loss,
                "output": (out * grad_out).sum(), "aux loss": layer.aux_loss}[loss_terms]
        loss.backward()
        results.append([out, layer.aux_loss, layer.tokens_per_expert, x.grad, layer.router.weight.grad]
                       + [p.grad for p in (layer.w1, layer.v1, layer.w2) if p is not None])
    assert results[0][3] is not None and results[0][4] is not None  # x and the router have gradients
    for index, (one_node, two_nodes) in enumerate(zip(*results)):
        assert (one_node is None) == (two_nodes is None), index
        assert one_node is None or torch.equal(one_node, two_nodes), index


@gpu_only
@pytest.mark.parametrize("kernels", ["small-problem", "large-problem"])
@pytest.mark.parametrize("name", GRAPH_CONFIGS)
def test_capture_in_cuda_graphs(name, kernels, monkeypatch):
    """Forward and backward replay from CUDA graphs and give the eager results bit for bit, with equal and with
    variable widths; also with the kernels of large problems forced at this size (the weight gradients reading
    sorted token rows by TMA, the row GEMMs reading the weights by TMA, whose descriptors the graph captures; dA's
    fused epilogue and the sum of its partials; on Hopper the persistent kernels, whose descriptors' scratch memory
    the graph's pool holds)."""
    if kernels == "large-problem":
        use_problem_size_kernels("large", monkeypatch)
    layer = make_layer(triton_moe.MoEMLP, seed_config(name), torch.bfloat16)
    x = make_input((NUM_TOKENS, 256), torch.bfloat16).requires_grad_()
    grad_out = make_input((NUM_TOKENS, 256), torch.bfloat16)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    results = []
    for forward in (layer, graphed):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = forward(x)
        out.backward(grad_out)
        results.append([out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for eager, replayed in zip(*results):
        assert torch.equal(eager, replayed)


class OutputAndAuxLoss(torch.nn.Module):
    """A layer's output and its aux loss, both returned: what make_graphed_callables needs to graph the aux loss."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x), self.layer.aux_loss


@gpu_only
@pytest.mark.parametrize("name", GRAPH_CONFIGS)
def test_graphed_layer_with_its_aux_loss_in_the_loss(name):
    """The README's advice for make_graphed_callables with the aux loss in the loss: graph a module that returns
    both; the replay then gives eager's output, aux loss and gradients, bit for bit."""
    layer = make_layer(triton_moe.MoEMLP, seed_config(name), torch.bfloat16)
    x = make_input((NUM_TOKENS, 256), torch.bfloat16).requires_grad_()
    grad_out = make_input((NUM_TOKENS, 256), torch.bfloat16)
    graphed = torch.cuda.make_graphed_callables(OutputAndAuxLoss(layer), (x,))
    results = []
    for forward in (OutputAndAuxLoss(layer), graphed):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, aux = forward(x)
        ((out.float() * grad_out.float()).sum() + 100.0 * aux).backward()
        results.append(dict(out=out.detach().clone(), aux=aux.detach().clone(), x=x.grad.clone(),
                            **{param_name: p.grad.clone() for param_name, p in layer.named_parameters()}))
    assert_bitwise_equal(*results)


@gpu_only
@pytest.mark.parametrize("name", GRAPH_CONFIGS)
def test_reduce_overhead_replays_eager_bit_for_bit(name):
    """torch.compile(mode="reduce-overhead", fullgraph=True) with Dynamo's default config: after the warm-up and
    recording calls, the CUDA-graph replays give eager's output, aux loss and every gradient bit for bit, on new
    inputs each call."""
    torch._dynamo.reset()
    layer = make_layer(triton_moe.MoEMLP, seed_config(name), torch.bfloat16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # warm-up, recording, then replays
        x = make_input((NUM_TOKENS, 256), torch.bfloat16, seed=10 + seed).requires_grad_()
        grad_out = make_input((NUM_TOKENS, 256), torch.bfloat16, seed=20 + seed)
        eager = step_results(layer, layer, x, grad_out)
        assert_bitwise_equal(eager, step_results(compiled, layer, x, grad_out))


@gpu_only
@pytest.mark.parametrize("name", GRAPH_CONFIGS)
def test_never_synchronises(name):
    """Forward and backward run without a host-device synchronisation, with equal and with variable widths."""
    layer = make_layer(triton_moe.MoEMLP, seed_config(name), torch.bfloat16)
    x = make_input((NUM_TOKENS, 256), torch.bfloat16).requires_grad_()
    layer(x).sum().backward()  # warm-up: compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.float().sum() + layer.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu_only
@pytest.mark.parametrize("kernels", ["small-problem", "large-problem"])
@pytest.mark.parametrize("name", GRAPH_CONFIGS)
def test_direct_launches_give_kernel_grid_results_bit_for_bit(name, kernels, monkeypatch):
    """The eager launches of kernels.host.DirectLaunch, through the C launcher where the installed Triton is one it
    knows, give what Triton's own kernel[grid] launches give, bit for bit; a launch hook (a profiler's) still sees
    every launch. With the large problems' kernels, the row GEMMs that read the weights through host-side TMA
    descriptors launch directly too."""
    from triton import knobs
    from triton.runtime.jit import JITFunction
    from triton.tools.tensor_descriptor import TensorDescriptor

    from triton_moe.kernels import grouped_gemm, host, permute, persistent, route, sort

    if kernels == "large-problem":
        use_problem_size_kernels("large", monkeypatch)
    layer = make_layer(triton_moe.MoEMLP, seed_config(name), torch.bfloat16)
    x = make_input((NUM_TOKENS, 256), torch.bfloat16).requires_grad_()
    grad_out = make_input((NUM_TOKENS, 256), torch.bfloat16)

    def results():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        (out.float() * grad_out.float()).sum().add(layer.aux_loss).backward()
        return [out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    jit_runs = []  # (kernel, whether a host-side TMA descriptor was among its arguments) of each kernel[grid]
    jit_run = JITFunction.run

    def recorded_run(self, *args, **kwargs):
        jit_runs.append((self.fn.__name__, any(isinstance(value, TensorDescriptor) for value in args)))
        return jit_run(self, *args, **kwargs)

    monkeypatch.setattr(host, "_DIRECT_LAUNCHES", {})  # no launch selected by an earlier test
    monkeypatch.setattr(JITFunction, "run", recorded_run)
    first = results()  # the first launch of each key goes through kernel[grid]
    launched_first, jit_runs[:] = list(jit_runs), []
    direct = results()
    monkeypatch.setattr(JITFunction, "run", jit_run)
    assert launched_first and not jit_runs, jit_runs  # after the first step, every launch is direct
    if kernels == "large-problem" and tuning.tma_readable(layer.w1):
        assert ("_expert_rows_gemm", True) in launched_first  # the weights by TMA: keyed and launched directly too
    launchers = [launcher for launch in host._DIRECT_LAUNCHES.values() for launcher, _ in launch._selected.values()]
    if triton.__version__.startswith(host.C_LAUNCH_TRITON_RELEASES):
        assert any(launcher.__name__ == "through_c_launcher" for launcher in launchers)
    hooked = []
    knobs.runtime.launch_enter_hook.add(hooked.append)
    try:
        with_hook = results()
    finally:
        knobs.runtime.launch_enter_hook.remove(hooked.append)
    assert len(hooked) >= 10  # the route, the sort and the expert MLP's kernels, forward and backward
    for module in (grouped_gemm, permute, persistent, route, sort):
        monkeypatch.setattr(module, "traceable", lambda kernel: kernel)
    for got in (first, direct, with_hook):
        for want_tensor, got_tensor in zip(results(), got):
            assert torch.equal(want_tensor, got_tensor)


@pytest.mark.skipif(not ON_GPU, reason="autograd's device thread and TMA descriptors: a CUDA device")
def test_a_backward_in_autograds_device_thread_after_the_kernels_loaded_elsewhere():
    """A large 16-bit layer (its gathering GEMMs read the weights through host-side TMA descriptors) trains once with
    the backward in the calling thread, which loads every kernel, then with the backward in autograd's device
    thread, new in this process: its first CUDA work is the dA GEMM's launch, whose descriptors the driver encodes
    only with a current CUDA context. The gradients are the same bit for bit."""
    script = """
import torch, triton_moe
from triton_moe import MoEConfig
from triton_moe.kernels import tuning
torch.manual_seed(0)
layer = triton_moe.MoEMLP(MoEConfig(expert_sizes="8x256", num_active_experts=8, hidden_size=1024))
layer = layer.cuda().to(torch.bfloat16)
x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
grad_out = torch.randn_like(x)
if not tuning.weights_by_tma(layer.w2, 2048 * 8):
    raise SystemExit("skip: the GEMMs read no weights by TMA on this GPU")

def gradients():
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(grad_out)
    return [t.grad.clone() for t in (x, *layer.parameters())]

with torch.autograd.set_multithreading_enabled(False):
    in_this_thread = gradients()
in_the_device_thread = gradients()
assert all(torch.equal(a, b) for a, b in zip(in_this_thread, in_the_device_thread, strict=True))
print("same gradients")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    if result.stderr.startswith("skip:"):  # SystemExit's message
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same gradients" in result.stdout
