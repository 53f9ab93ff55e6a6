"""What every launcher does on the host before it launches: the argument checks (a ValueError that names the
argument) and the integer arithmetic of grids and tiles.

The launchers run on every step, and on a small batch their host time, not the GPU's, is the layer's time: these
helpers are plain Python on purpose. (triton.cdiv and triton.next_power_of_2 are constexpr functions that cost a
few µs a call on the host; per expert and per launch that came to most of a millisecond per step with 64 experts.)
"""

import inspect
import os

import torch
from triton.runtime import driver

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
    """What launches `kernel` as `traceable(kernel)[grid](*args, **kwargs)`: inside a trace,
    torch.library.wrap_triton(kernel), so that Inductor sees the launch and makes it from its generated code; on a
    GPU, the kernel's DirectLaunch; under the interpreter, the kernel itself."""
    if tracing():
        return torch.library.wrap_triton(kernel)
    if _INTERPRETER:
        return kernel
    launch = _DIRECT_LAUNCHES.get(kernel)
    if launch is None:
        launch = _DIRECT_LAUNCHES[kernel] = DirectLaunch(kernel)
    return launch


class DirectLaunch:
    """`kernel[grid](*args, **kwargs)` for eager launches, with less host time per launch.

    Triton's JITFunction.run binds and specialises every argument, builds a cache key from the specialisation and
    the options, and reads its settings, before it calls the compiled kernel's launcher: on a small batch that
    Python is a large part of the layer's step. A DirectLaunch keys the compiled kernel by what Triton specialises
    on (each tensor's dtype and 16-byte alignment; each int's equality to 1, divisibility by 16 and width; the
    compile-time arguments and launch options), and launches it through CompiledKernel[grid]. The first launch of
    each key, and any launch with an argument it does not key (a TMA descriptor), goes through kernel[grid].
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._parameters = inspect.signature(kernel.fn).parameters
        self._selected = {}  # launch key -> (compiled kernel, the keyword arguments' names in signature order)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        key = self.key(args, kwargs)
        selected = None if key is None else self._selected.get(key)
        if selected is None:
            compiled = self.kernel[grid](*args, **kwargs)  # None where Triton compiles asynchronously
            if key is not None and compiled is not None:
                self._selected[key] = (compiled, self._keyword_names(len(args), kwargs))
            return
        compiled, keyword_names = selected
        compiled[(grid + (1, 1))[:3]](*args, *[kwargs[name] for name in keyword_names])

    @staticmethod
    def key(args, kwargs):
        """What selects the compiled kernel, or None for arguments that only Triton's own launch handles: the
        device, what Triton specialises each runtime argument on, and the keyword arguments (compile-time arguments
        and launch options). One loop without a call per argument: it runs for every launch."""
        parts = []
        append = parts.append
        for value in args:
            kind = value.__class__
            if kind is torch.Tensor or kind is torch.nn.Parameter:
                append(value.dtype)
                append(value.data_ptr() & 15)  # Triton specialises on 16-byte alignment
            elif kind is int:  # 1 becomes a constant; divisibility by 16; i32, i64 or u64 by its range
                append((value == 1, (value & 15) == 0, -2**31 <= value < 2**31, value < 2**63))
            elif kind is float:
                append(float)  # fp32 whatever its value
            elif value is None or kind is bool:
                append(value)
            elif isinstance(value, torch.Tensor):
                append(value.dtype)
                append(value.data_ptr() & 15)
            else:  # a TMA descriptor
                return None
        return driver.active.get_current_device(), tuple(parts), tuple(kwargs.items())

    def _keyword_names(self, num_positional, kwargs):
        names = list(self._parameters)[num_positional:]
        missing = [name for name in names if name not in kwargs]
        if missing:  # the launchers pass every argument: defaults would need their own handling
            raise ValueError(f"{self.kernel.fn.__name__} launched without {missing}")
        return names


_DIRECT_LAUNCHES = {}  # kernel -> its DirectLaunch


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
