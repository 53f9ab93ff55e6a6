"""What every launcher does on the host before it launches: the argument checks (a ValueError that names the
argument), the integer arithmetic of grids and tiles, the host-side TMA descriptors, and the launch itself
(DirectLaunch; under the interpreter, once, the check that its releases can run the kernels). Under the interpreter
its import also turns off the interpreter's overflow sanitizer, whose checks change nothing there.

The launchers run on every step, and on a small batch their host time, not the GPU's, is the layer's time: these
helpers are plain Python on purpose. (triton.cdiv and triton.next_power_of_2 are constexpr functions that cost a
few µs a call on the host; per expert and per launch that came to most of a millisecond per step with 64 experts.)
"""

import ctypes
import dataclasses
import functools
import inspect
import os
import re
import threading

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton reads TRITON_INTERPRET once, when it decorates the kernels at import; this module reads it once too.
_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def running_in_interpreter() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETER


def _drop_the_interpreters_dead_overflow_checks() -> None:
    """Turn off the integer-overflow sanitizer of Triton's CPU interpreter where its debug mode is off.

    For each 32-bit integer add, sub and mul a kernel runs, the interpreter computes the operation again in int64
    and compares it with the type's bounds, in numpy, and then hands the result to a device_assert that does
    nothing without debug, which the interpreter's options leave off. So the work changes no result and no error,
    and it is much of the interpreter's time in kernels heavy with index arithmetic (stk's among them). Compiled
    kernels are unaffected: the option is the interpreter's own. A Triton release that keeps its options
    otherwise is left as it is."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if getattr(options, "sanitize_overflow", False) and getattr(options, "debug", True) is False:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


if _INTERPRETER:
    _drop_the_interpreters_dead_overflow_checks()


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
        if not _INTERPRETER_CHECKED:
            _check_interpreter()
        return kernel
    launch = _DIRECT_LAUNCHES.get(kernel)
    if launch is None:
        launch = _DIRECT_LAUNCHES[kernel] = DirectLaunch(kernel)
    return launch


def row_major_descriptor(matrix: torch.Tensor, block_shape: list[int]) -> TensorDescriptor:
    """A host-side TMA descriptor of the row-major 2-D `matrix`, in boxes of `block_shape`: the one way the
    launchers make them. On a GPU it first makes a CUDA context current in the calling thread (_bind_context)."""
    if matrix.is_cuda:
        _bind_context(matrix.device)
    return TensorDescriptor(matrix, list(matrix.shape), [matrix.shape[1], 1], block_shape)


_THREAD_STATE = threading.local()  # .devices: the CUDA devices for which this thread has a current context


def _bind_context(device: torch.device) -> None:
    """Make the device's primary CUDA context current in this thread where none is: once per thread and device.

    Triton encodes a host-side TMA descriptor (cuTensorMapEncodeTiled) in the launching thread before its C launcher
    makes a context current, and the driver refuses the encoding in a thread without one ("invalid device
    context"). Autograd runs the backward in a device thread of its own, whose first CUDA work can be such a launch
    where another thread loaded the kernel first. Driver calls only: no stream work, so safe inside a CUDA-graph
    capture."""
    devices = getattr(_THREAD_STATE, "devices", None)
    if devices is None:
        devices = _THREAD_STATE.devices = set()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index in devices:
        return
    libcuda = _libcuda()
    context = ctypes.c_void_p()
    _driver_call(libcuda.cuCtxGetCurrent(ctypes.byref(context)), "cuCtxGetCurrent")
    if not context.value:
        handle = ctypes.c_int()
        _driver_call(libcuda.cuDeviceGet(ctypes.byref(handle), index), "cuDeviceGet")
        _driver_call(libcuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle), "cuDevicePrimaryCtxRetain")
        _driver_call(libcuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    devices.add(index)


@functools.lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    """The CUDA driver library, loaded on first use."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:  # not on the loader's path: where Triton found it
        from triton.backends.nvidia.driver import libcuda_dirs
        return ctypes.CDLL(os.path.join(libcuda_dirs()[0], "libcuda.so.1"))


def _driver_call(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"CUDA driver call {name} failed with CUresult {status}")


def interpreter_version_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with these releases of Triton and numpy, or None.

    Before Triton 3.7 the interpreter turns a kernel's runtime scalar into a Python int with int() of a one-element
    array, which numpy refuses from 2.4 on (triton-lang/triton#9171): every kernel that loops to a runtime bound then
    fails at its first launch with a TypeError from inside Triton."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1), which runs triton_moe's kernels on "
                f"this machine, cannot run them with numpy {numpy_version}: before Triton 3.7 it converts kernel "
                "scalars in a way numpy 2.4 refuses (triton-lang/triton#9171). Install numpy<2.4, or triton>=3.7 "
                "(torch>=2.12 brings it)")
    return None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


_INTERPRETER_CHECKED = []  # [True] once the interpreter's releases were found able to run the kernels


def _check_interpreter() -> None:
    import numpy  # the interpreter's own dependency

    problem = interpreter_version_problem(triton.__version__, numpy.__version__)
    if problem is not None:
        raise RuntimeError(problem)
    _INTERPRETER_CHECKED.append(True)


class DirectLaunch:
    """`kernel[grid](*args, **kwargs)` for eager launches, with less host time per launch.

    Triton's JITFunction.run binds and specialises every argument, builds a cache key from the specialisation and
    the options, and reads its settings, before it calls the compiled kernel's launcher: on a small batch that
    Python is a large part of the layer's step. A DirectLaunch keys the compiled kernel by what Triton specialises
    on (each tensor's dtype and 16-byte alignment, each host scalar's value, the compile-time arguments and launch
    options), and launches it through the compiled kernel's C launcher (_compiled_launcher), which turns host-side
    TMA descriptors into CUDA tensor maps itself. The first launch of each key, and any launch with an argument it
    does not key, goes through kernel[grid].
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._parameters = inspect.signature(kernel.fn).parameters
        self._selected = {}  # launch key -> (launcher of the compiled kernel, keyword arguments' names in order)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        device = driver.active.get_current_device()
        key = self.key(device, args, kwargs)
        selected = None if key is None else self._selected.get(key)
        if selected is None:
            compiled = self.kernel[grid](*args, **kwargs)  # None where Triton compiles asynchronously
            if key is not None and compiled is not None:
                if len(self._selected) >= MAX_LAUNCH_KEYS:  # host scalars of ever new values: keep the dict bounded
                    self._selected.clear()
                self._selected[key] = (_compiled_launcher(compiled), self._keyword_names(len(args), kwargs))
            return
        launcher, keyword_names = selected
        launcher(grid, device, (*args, *[kwargs[name] for name in keyword_names]))

    @staticmethod
    def key(device, args, kwargs):
        """What selects the compiled kernel, or None for arguments that only Triton's own launch handles: the
        device, what Triton specialises each runtime argument on, and the keyword arguments (compile-time arguments
        and launch options). One loop without a call per argument: it runs for every launch.

        Host scalars are keyed by their value, a finer key than Triton's (an int's equality to 1, divisibility by
        16 and width; fp32 for any float) and, for ints, a cheaper one: the launchers' scalars are sizes and
        coefficients, the same on every step of a run. A host-side TMA descriptor is keyed by what Triton
        specialises it on, its dtype and box (`tensordesc<bf16[128, 64]>`; its base is 16-byte aligned, which the
        descriptor checks), and its padding; its shape and strides are runtime arguments of the kernel.
        """
        parts = []
        append = parts.append
        for value in args:
            kind = value.__class__
            if kind is torch.Tensor or kind is torch.nn.Parameter:
                append(value.dtype)
                append(value.data_ptr() & 15)  # Triton specialises on 16-byte alignment
            elif kind is int:
                append(value)
            elif value is None or kind is bool or kind is float:
                append((kind, value))  # apart from the ints 0 and 1
            elif kind is TensorDescriptor:
                append((value.base.dtype, tuple(value.block_shape), value.padding))
            elif isinstance(value, torch.Tensor):
                append(value.dtype)
                append(value.data_ptr() & 15)
            else:
                return None
        return device, tuple(parts), tuple(kwargs.items())

    def _keyword_names(self, num_positional, kwargs):
        names = list(self._parameters)[num_positional:]
        missing = [name for name in names if name not in kwargs]
        if missing:  # the launchers pass every argument: defaults would need their own handling
            raise ValueError(f"{self.kernel.fn.__name__} launched without {missing}")
        return names


MAX_LAUNCH_KEYS = 4096  # compiled kernels a DirectLaunch remembers before it starts over

# The Triton releases whose CUDA launcher DirectLaunch calls itself: CudaLauncher.launch's positional arguments are
# Triton's internals, checked on a GPU for each release listed here. Other releases launch through CompiledKernel.
C_LAUNCH_TRITON_RELEASES = ("3.6.",)


def _compiled_launcher(compiled):
    """`launch(grid, device, arguments)`: the compiled kernel's launch with every argument in signature order.

    CompiledKernel[grid] builds a runner for each launch, which reads the current stream, builds the launch
    metadata for the launch hooks (profilers) and calls the CudaLauncher, which allocates the kernel's scratch
    memory and calls the C launcher. For a kernel without scratch memory, on a Triton release listed in
    C_LAUNCH_TRITON_RELEASES, this calls the C launcher directly, unless a launch hook is set; otherwise it takes
    CompiledKernel[grid].
    """
    def through_compiled_kernel(grid, device, arguments):
        compiled[(grid + (1, 1))[:3]](*arguments)

    runtime = knobs.runtime
    compiled._init_handles()  # loads the kernel, and makes its CudaLauncher `run`
    run = compiled.run
    if (not triton.__version__.startswith(C_LAUNCH_TRITON_RELEASES) or not hasattr(run, "launch")
            or getattr(run, "global_scratch_size", 1) != 0 or getattr(run, "profile_scratch_size", 1) != 0):
        return through_compiled_kernel
    c_launch, function, packed_metadata = run.launch, compiled.function, compiled.packed_metadata
    cooperative, pdl = run.launch_cooperative_grid, run.launch_pdl
    current_stream = driver.active.get_current_stream

    def through_c_launcher(grid, device, arguments):
        # Launch hooks (a profiler's) are chains of calls, which need the launch metadata once they hold any; an
        # object without `calls` is a hook set the older way.
        if getattr(runtime.launch_enter_hook, "calls", True) or getattr(runtime.launch_exit_hook, "calls", True):
            through_compiled_kernel(grid, device, arguments)
            return
        grid = grid + (1, 1)
        # (grid, stream, function, cooperative, pdl, global and profile scratch, packed metadata, launch metadata,
        # enter and exit hooks, the kernel's arguments), as CudaLauncher.__call__ passes them
        c_launch(grid[0], grid[1], grid[2], current_stream(device), function, cooperative, pdl, None, None,
                 packed_metadata, None, None, None, *arguments)

    return through_c_launcher


_DIRECT_LAUNCHES = {}  # kernel -> its DirectLaunch


INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor_shape(name, tensor, shape, dtypes):
    """`tensor` is contiguous, of exactly `shape`, with a dtype in `dtypes`."""
    if tensor.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    _check_dtype_and_layout(name, tensor, dtypes)


def check_int(name, value, minimum):
    """`value` is an int (not a bool; a torch.SymInt where torch.compile traces with dynamic shapes) >= minimum."""
    if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
