"""What every launcher does on the host before it launches: the argument checks (a ValueError that names the
argument) and the integer arithmetic of grids and tiles.

The launchers run on every step, and on a small batch their host time, not the GPU's, is the layer's time: these
helpers are plain Python on purpose. (triton.cdiv and triton.next_power_of_2 are constexpr functions that cost a
few µs a call on the host; per expert and per launch that came to most of a millisecond per step with 64 experts.)
"""

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton reads TRITON_INTERPRET once, when it decorates the kernels at import; this module reads it once too.
_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def running_in_interpreter() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETER


_TRACING_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.FUNCTIONAL,
                  torch._C._TorchDispatchModeKey.PROXY)


def tracing() -> bool:
    """Whether a launcher runs inside a trace (torch.compile decomposing the triton_op custom ops, make_fx): its
    tensors are then fake or functional, without memory."""
    return any(torch._C._get_dispatch_mode(mode) is not None for mode in _TRACING_MODES)


def traceable(kernel):
    """`kernel`, or torch.library.wrap_triton(kernel) inside a trace, so that Inductor sees the launch and makes it
    from its generated code. Eager calls take the kernel as it is: the wrapper's dispatch costs host time on every
    launch."""
    return torch.library.wrap_triton(kernel) if tracing() else kernel


INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor_shape(name, tensor, shape, dtypes):
    """`tensor` is contiguous, of exactly `shape`, with a dtype in `dtypes`."""
    if tensor.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    _check_dtype_and_layout(name, tensor, dtypes)


def check_tensor_dim(name, tensor, dim, dtypes):
    """`tensor` is a contiguous torch.Tensor of `dim` dimensions, with a dtype in `dtypes`."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(tensor.shape)}")
    _check_dtype_and_layout(name, tensor, dtypes)


def _check_dtype_and_layout(name, tensor, dtypes):
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have a dtype in {dtypes}, got {tensor.dtype}")
    if tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu" and _INTERPRETER:
        raise ValueError(f"{name} is bf16 on the CPU, which Triton's interpreter computes wrongly: use fp32 or fp16 "
                         "there (MoEMLP computes bf16 in fp32 on the CPU)")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def ceil_div(numerator: int, denominator: int) -> int:
    """Ceiling division of host ints."""
    return -(-numerator // denominator)


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value >= 1, of host ints."""
    return 1 << (value - 1).bit_length()
