"""What every MoE layer shares: input checks before any kernel runs, the aux loss, the state_dict layout."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint

from triton_moe import reference
import triton_moe
from conftest import DEVICE, ON_GPU, make_input, make_layer, seed_config
from triton_moe import MoEConfig, routing
from triton_moe.testing.ground_truth import TOLERANCES, dense_loop_moe, fp64_params, rel_l2_error

IMPLEMENTATIONS = [reference.MoEMLP, triton_moe.MoEMLP]


@pytest.fixture(params=IMPLEMENTATIONS, ids=lambda cls: cls.__module__)
def layer(request):
    return make_layer(request.param, seed_config("8exp_variable"), torch.float32)


def test_wrong_hidden_size(layer):
    with pytest.raises(ValueError, match="hidden_size=256"):
        layer(make_input((4, 128), torch.float32))


def test_integer_input(layer):
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 256, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_float64_input_says_which_dtypes_the_kernels_take(autocast):
    """Under autocast too, where the GEMMs would run in fp16 but the output comes back in x's dtype."""
    layer = make_layer(triton_moe.MoEMLP, seed_config("8exp_variable"), torch.float32).double()
    with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
        with pytest.raises(ValueError, match=r"x's dtype .*torch.bfloat16, got torch.float64"):
            layer(make_input((4, 256), torch.float64))


@pytest.mark.parametrize("name, shape, device", [
    ("router.weight", (7, 256), DEVICE), ("router.weight", (8, 255), DEVICE), ("w1", (3071, 256), DEVICE),
    ("w2", (3072, 255), DEVICE), ("router.weight", (8, 256), "meta"), ("w2", (3072, 256), "meta")])
def test_a_replaced_parameter_of_another_shape_or_device_is_refused(layer, name, shape, device):
    """A parameter replaced after the layer was built is checked against the layout before the route runs: a
    ValueError that names it, not torch's router GEMM failing or a kernel reading another layout."""
    module = layer.router if name == "router.weight" else layer
    setattr(module, name.split(".")[-1], nn.Parameter(torch.zeros(shape, device=device)))
    with pytest.raises(ValueError, match=rf"layer's {name} (must have shape|is on meta)"):
        layer(make_input((4, 256), torch.float32))


def test_a_forward_on_the_meta_device_is_refused(layer):
    with torch.device("meta"):
        meta_layer = type(layer)(layer.config)
    with pytest.raises(ValueError, match="x is on the meta device"):
        meta_layer(torch.randn(4, 256, device="meta"))


@pytest.mark.parametrize("layout", ["sparse", "nested"])
def test_a_sparse_or_nested_input_is_refused(layer, layout):
    x = make_input((4, 256), torch.float32)
    x = x.to_sparse() if layout == "sparse" else torch.nested.nested_tensor([x, x[:2]], layout=torch.jagged)
    with pytest.raises(ValueError, match="x must be a dense tensor"):
        layer(x)


def test_one_dimensional_input(layer):
    with pytest.raises(ValueError, match="at least 2 dims"):
        layer(make_input((256,), torch.float32))


def test_non_contiguous_input_is_handled(layer):
    x = make_input((256, 10), torch.float32).T  # [10, 256], not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda cls: cls.__module__)
def test_cpu_tensors_without_the_interpreter_are_refused(cls, monkeypatch):
    """On a machine with a GPU, Triton runs no kernel on CPU tensors: a ValueError that says so, before any launch."""
    layer = cls(seed_config("8exp_variable"))  # on the CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="on the CPU.*TRITON_INTERPRET=1"):
        layer(torch.randn(4, 256))


def test_no_tokens_gives_empty_output_and_zero_grads(layer):
    x = make_input((0, 256), torch.float32).requires_grad_()
    out = layer(x)
    assert out.shape == (0, 256)
    (out.sum() + layer.aux_loss).backward()
    for param in layer.parameters():
        assert param.grad is not None and param.grad.abs().max() == 0


def test_parameter_layout(layer):
    config = layer.config
    state = layer.state_dict()
    assert state.pop("expert_widths").tolist() == [512] * 4 + [256] * 4
    shapes = {name: tuple(p.shape) for name, p in state.items()}
    assert shapes == {
        "router.weight": (config.num_experts, 256), "w1": (config.total_width, 256), "w2": (config.total_width, 256),
    }
    assert layer.config is config


def test_aux_loss_sums_layers_of_a_model():
    config = seed_config("8exp_variable")
    model = nn.Sequential(*[make_layer(cls, config, torch.float32, seed=i) for i, cls in
                            enumerate(IMPLEMENTATIONS * 2)])
    x = make_input((12, 256), torch.float32)
    model(x)
    expected = sum(layer.aux_loss for layer in model)
    assert torch.equal(triton_moe.aux_loss(model), expected)
    assert triton_moe.aux_loss(model).requires_grad
    assert triton_moe.aux_loss(nn.Linear(2, 2)).item() == 0


def test_aux_loss_detaching_the_layers_keeps_the_gradient_in_the_sum():
    """aux_loss(model, detach_layers=True): the same sum, through which the routers get the same gradients; each
    layer keeps its aux loss's value without gradient, and a later call returns the sum without gradient."""
    config = seed_config("8exp_variable")
    model = nn.Sequential(*[make_layer(cls, config, torch.float32, seed=i) for i, cls in enumerate(IMPLEMENTATIONS)])
    x = make_input((12, 256), torch.float32)
    results = []
    for detach_layers in (False, True):
        model.zero_grad(set_to_none=True)
        model(x)
        values = [layer.aux_loss.detach().clone() for layer in model]
        total = triton_moe.aux_loss(model, detach_layers=detach_layers)
        assert all(layer.aux_loss.requires_grad != detach_layers for layer in model)
        assert all(torch.equal(layer.aux_loss, value) for layer, value in zip(model, values))
        total.backward()
        results.append((total.detach(), [layer.router.weight.grad.clone() for layer in model]))
    (plain_total, plain_grads), (total, grads) = results
    assert torch.equal(total, plain_total)
    for grad, plain_grad in zip(grads, plain_grads):
        assert torch.equal(grad, plain_grad) and grad.abs().sum() > 0
    later = triton_moe.aux_loss(model)
    assert torch.equal(later, total) and not later.requires_grad


def test_deepcopy_after_a_training_forward(layer):
    """An EMA model or a best-model snapshot: the copy has the same weights and output, and no aux loss of its own
    until it runs."""
    x = make_input((12, 256), torch.float32)
    (layer(x).sum() + layer.aux_loss).backward()
    copied = copy.deepcopy(layer)
    assert copied.aux_loss is None and layer.aux_loss is not None
    for (name, param), copied_param in zip(layer.named_parameters(), copied.parameters()):
        assert torch.equal(param, copied_param) and param.data_ptr() != copied_param.data_ptr(), name
    torch.testing.assert_close(copied(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda cls: cls.__module__)
def test_tied_router_logits_pick_the_lower_expert_index(cls):
    """A zero router: every logit ties, and every implementation picks experts 0 .. k-1, in that order."""
    config = seed_config("8exp_variable")
    layer = make_layer(cls, config, torch.float32)
    with torch.no_grad():
        layer.router.weight.zero_()
    indices = layer.forward_with_intermediates(make_input((10, 256), torch.float32))["expert_indices"]
    assert torch.equal(indices.cpu(), torch.arange(config.num_active_experts).expand(10, -1))


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda cls: cls.__module__)
def test_state_dict_of_another_expert_layout_is_refused(cls):
    """Same total width, other order of widths: loading names both layouts instead of handing rows to the wrong
    experts, also across implementations and after a torch.save round trip."""
    saved = make_layer(triton_moe.MoEMLP, MoEConfig(expert_sizes=[(4, 256), (2, 128)], num_active_experts=2,
                                                    hidden_size=256), torch.float32)
    other = make_layer(cls, MoEConfig(expert_sizes=[(2, 128), (4, 256)], num_active_experts=2, hidden_size=256),
                       torch.float32)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    with pytest.raises(ValueError, match=r"expert_sizes '4x256,2x128'.*expert_sizes '2x128,4x256'"):
        other.load_state_dict(state)
    same_config = MoEConfig(expert_sizes=[(2, 256), (2, 256), (2, 128)], num_active_experts=2, hidden_size=256)
    same_layout = cls(same_config).to(DEVICE)
    same_layout.load_state_dict(state)  # the same widths in the same order, grouped otherwise
    assert torch.equal(same_layout.w1, saved.w1)


@pytest.mark.parametrize("config", [None, "4x512,4x256", {"expert_sizes": "4x512"}])
def test_a_config_of_another_type_is_refused(config):
    with pytest.raises(TypeError, match="config must be a MoEConfig"):
        triton_moe.MoEMLP(config)


@pytest.mark.parametrize("saved_widths", [[512] * 4 + [256] * 4, torch.tensor([[512] * 4 + [256] * 4])])
def test_a_malformed_layout_in_a_state_dict_is_refused(layer, saved_widths):
    state = layer.state_dict()
    state["expert_widths"] = saved_widths
    with pytest.raises(ValueError, match="expert_widths must be a 1-D tensor"):
        layer.load_state_dict(state)


def test_state_dict_without_the_layout_still_loads(layer):
    """A checkpoint from before the layout was saved loads into a layer of the same shapes."""
    state = layer.state_dict()
    del state["expert_widths"]
    twin = make_layer(type(layer), layer.config, torch.float32, seed=1)
    twin.load_state_dict(state)
    assert torch.equal(twin.w2, layer.w2)


def test_reentrant_checkpointing_warns_that_the_aux_loss_gradient_is_lost(layer):
    """use_reentrant=True runs the forward without autograd, so the aux loss in the training loss has no gradient:
    the recomputation in the backward warns. use_reentrant=False keeps the gradient, as without checkpointing."""
    x = make_input((12, 256), torch.float32).requires_grad_()
    router_grads = {}
    for mode in ("none", "non-reentrant", "reentrant"):
        layer.zero_grad(set_to_none=True)
        if mode == "none":
            out = layer(x)
        else:
            out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=mode == "reentrant")
        loss = 0.0 * out.sum() + layer.aux_loss  # the router's gradient is the aux loss's
        if mode == "reentrant":
            with pytest.warns(UserWarning, match="use_reentrant=False"):
                loss.backward()
        else:
            loss.backward()
        router_grads[mode] = layer.router.weight.grad.clone()
    assert rel_l2_error(router_grads["non-reentrant"], router_grads["none"]) < 1e-6
    assert router_grads["none"].abs().max() > 0
    assert router_grads["reentrant"].abs().max() == 0  # what the warning is about


@pytest.mark.parametrize("then", ["to_empty, load_state_dict", "to_empty, reset_parameters",
                                  "load_state_dict(assign=True)"])
@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda cls: cls.__module__)
def test_a_layer_built_on_the_meta_device_runs_once_loaded(cls, then, poisoned_outputs):
    """A large model is built on the meta device, then moved by Module.to_empty (uninitialised memory for every
    tensor, here NaN and -7) and loaded from a checkpoint or initialised, or handed the checkpoint's tensors by
    load_state_dict(assign=True): the layout buffers hold the config's values on the weights' device, the
    non-persistent ones (the width offsets the kernels read), which load_state_dict does not write, included; the
    layer then gives the output of a layer built on the device."""
    twin = make_layer(cls, seed_config("8exp_variable"), torch.float32)
    with torch.device("meta"):
        layer = cls(twin.config)
    if then.startswith("to_empty"):
        layer.to_empty(device=DEVICE)
    if then.endswith("reset_parameters"):
        layer.reset_parameters()
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.copy_(twin.get_parameter(name))
    else:
        layer.load_state_dict({name: value.clone() for name, value in twin.state_dict().items()},
                              assign=then.endswith("(assign=True)"))
    buffers = dict(layer.named_buffers())
    assert buffers.keys() == dict(twin.named_buffers()).keys()
    for name, want in twin.named_buffers():
        assert torch.equal(buffers[name], want), name
    x = make_input((16, 256), torch.float32)
    assert torch.equal(layer(x), twin(x))


# numpy's warnings about the bad token's values, from the interpreter's kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:All-NaN slice encountered")
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_token_reaches_only_its_own_output(layer, bad_value):
    """A NaN or Inf in one token's input reaches that token's output and no other: the router still picks in-range
    experts for it, the ones torch's routing picks from the same logits, the sort places every row, and every other
    token's output is, bit for bit, the one it has beside a finite token."""
    x = make_input((16, 256), torch.float32)
    with torch.no_grad():
        clean_output = layer(x)
        x[3, 5] = bad_value
        got = layer.forward_with_intermediates(x)
    indices, num_experts = got["expert_indices"], layer.config.num_experts
    assert ((indices >= 0) & (indices < num_experts)).all()
    assert torch.equal(indices, routing.route(x, layer.router.weight, layer.config).expert_indices)
    assert torch.equal(got["tokens_per_expert"], torch.bincount(indices.flatten(), minlength=num_experts))
    others = torch.arange(16, device=DEVICE) != 3
    assert torch.equal(got["output"][others], clean_output[others])
    assert not got["output"][3].isfinite().all()


def second_order_grads(layer, params, x):
    """The gradients in `params` of a gradient penalty: |d(|layer(x)|²)/dx|², through create_graph=True."""
    x = x.detach().requires_grad_()
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(grad_x.square().sum(), params)


def test_a_second_derivative_is_exact_or_refused(layer):
    """A gradient penalty differentiates the layer's gradient again. The stk reference's autograd is torch's, and
    gives the fp64 loop's second-order gradients; the Triton layer's backward runs kernels autograd cannot see, so
    its backward with create_graph=True raises rather than leave the experts' weights out and the router's
    gradient wrong."""
    x = make_input((16, 256), torch.float32)
    if isinstance(layer, triton_moe.MoEMLP):
        with pytest.raises(RuntimeError, match="create_graph=True"):
            second_order_grads(layer, [layer.w1, layer.router.weight], x)
        return
    params = fp64_params(layer)
    x64 = x.double().requires_grad_()
    (grad_x,) = torch.autograd.grad(dense_loop_moe(layer.config, params, x64)["output"].square().sum(), x64,
                                    create_graph=True)
    want = torch.autograd.grad(grad_x.square().sum(), [params["w1"], params["w2"], params["router"]])
    got = second_order_grads(layer, [layer.w1, layer.w2, layer.router.weight], x)
    for name, got_grad, want_grad in zip(("w1", "w2", "router"), got, want):
        err = rel_l2_error(got_grad.double(), want_grad)
        assert err <= TOLERANCES[torch.float32]["rel_l2"], f"{name}: rel L2 error {err:.3g}"


def test_evaluation_without_grad_does_not_warn(layer, recwarn):
    with torch.no_grad():
        layer(make_input((12, 256), torch.float32))
    (layer(make_input((12, 256), torch.float32)).sum() + layer.aux_loss).backward()
    assert not [w for w in recwarn if "reentrant" in str(w.message)]


@pytest.mark.skipif(ON_GPU, reason="the CPU interpreter's bf16; on a GPU bf16 runs as bf16")
@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda cls: cls.__module__)
def test_bf16_on_the_cpu_computes_in_fp32(cls):
    """Triton's interpreter cannot compute in bf16: a bf16 layer, or an fp32 layer under bf16 autocast, computes
    its experts in fp32, close to the fp32 layer's output (the bf16 layer rounds its input, weights and output),
    not garbage."""
    config = seed_config("8exp_variable")
    layer = make_layer(cls, config, torch.float32)
    x = make_input((12, 256), torch.float32)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = layer(x)
    bf16_out = copy.deepcopy(layer).bfloat16()(x.bfloat16())
    assert autocast_out.dtype == torch.float32 and bf16_out.dtype == torch.bfloat16
    assert rel_l2_error(autocast_out, want) < 1e-6
    assert rel_l2_error(bf16_out.float(), want) < 2e-2
