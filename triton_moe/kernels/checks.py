"""The argument checks every launcher makes before it launches anything: a ValueError that names the argument."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor_shape(name, tensor, shape, dtypes):
    """`tensor` is contiguous, of exactly `shape`, with a dtype in `dtypes`."""
    if tuple(tensor.shape) != tuple(shape):
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
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
