"""ExpertLayout: where each expert's rows, weight rows and hidden activations lie for one batch's routing.

R = N * k expert-sorted rows (rows sorted by expert), E experts of widths W_e, TW = Σ_e W_e, H hidden:
    expert_row_offsets [E+1]: expert e's rows are expert_row_offsets[e] : expert_row_offsets[e+1] (on the device:
        they depend on the routing)
    expert_width_offsets [E+1]: expert e owns rows expert_width_offsets[e] : expert_width_offsets[e+1] of each
        [TW, H] weight (prefix sums of the widths)
    expert_widths: the E widths as host ints (they size the launch grids without reading the device)
    num_rows: R
Hidden activations (h_pre, h_up, h_act, dh_pre, dh_up) are [R, max_width] matrices: row r of expert e holds its
W_e values in columns 0 : W_e; the columns past W_e are never read (the up projection writes zeros there, so that
its outputs do not depend on what the memory held). Their shape follows from R and
the widths alone, both known on the host, so no size is ever read back from the device: the layer never
synchronises, and a CUDA graph or torch.compile holds it whatever the widths. With one width there is no padding.

The launchers check what the host knows (shapes, dtypes, contiguity, the widths), never the values a device tensor
holds, since reading them would synchronise: the offsets must be non-decreasing, from 0 to R and to TW, the width
offsets the prefix sums of the widths, and every index the launchers take (row_to_token, flat_to_row,
routing_weight_index) in range. Other values read and write out of bounds. The layer's come from its config, its
route and its sort.
"""

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from triton_moe.kernels.host import INDEX_DTYPES, ceil_div, check_tensor_shape, next_power_of_2

# The largest common factor of the expert widths worth telling the compiler (WIDTH_MULTIPLE): 16 elements hold
# a whole 16-byte vector in every dtype, and Triton marks integer arguments divisible by 16 the same way.
WIDTH_ALIGNMENT = 16


class WidthFacts(NamedTuple):
    """What follows from the expert widths alone, computed once per set of widths."""

    total_width: int  # TW
    max_width: int  # the hidden activations' row length
    uniform: bool  # all experts one width (no padding)
    kernel_constants: dict  # the compile-time facts every grouped-GEMM kernel takes: EXPERTS_POW2, WIDTH_MULTIPLE


@functools.lru_cache(maxsize=64)
def width_facts(expert_widths: tuple[int, ...]) -> WidthFacts:
    if not expert_widths or not all(isinstance(width, int) and not isinstance(width, bool) and width >= 1
                                    for width in expert_widths):
        raise ValueError(f"expert_widths must list at least one expert, each an int >= 1, got {list(expert_widths)}")
    return WidthFacts(
        total_width=sum(expert_widths), max_width=max(expert_widths), uniform=len(set(expert_widths)) == 1,
        kernel_constants=dict(EXPERTS_POW2=next_power_of_2(len(expert_widths)),
                              WIDTH_MULTIPLE=math.gcd(WIDTH_ALIGNMENT, *expert_widths)))


@functools.lru_cache(maxsize=256)
def _tiles_per_row_tile(expert_widths: tuple[int, ...], tile: int) -> tuple[int, int]:
    counts = [ceil_div(width, tile) for width in expert_widths]
    return max(counts), sum(counts)


@dataclass(frozen=True, eq=False)
class ExpertLayout:
    """The layout every grouped-GEMM launcher takes; checked once, when it is made (see the module docstring)."""

    expert_row_offsets: torch.Tensor  # [E+1] int32/int64
    expert_width_offsets: torch.Tensor  # [E+1] int32/int64
    expert_widths: tuple[int, ...]  # [E] host ints
    num_rows: int  # R (a torch.SymInt in a trace with dynamic shapes)
    facts: WidthFacts = field(init=False, repr=False)

    def __post_init__(self):
        widths = tuple(self.expert_widths)
        object.__setattr__(self, "expert_widths", widths)
        object.__setattr__(self, "facts", width_facts(widths))
        # a torch.SymInt where torch.compile traces the launchers with dynamic shapes
        if not isinstance(self.num_rows, (int, torch.SymInt)) or self.num_rows < 0:
            raise ValueError(f"num_rows must be an int >= 0, got {self.num_rows!r}")
        check_tensor_shape("expert_row_offsets", self.expert_row_offsets, (len(widths) + 1,), INDEX_DTYPES)
        check_tensor_shape("expert_width_offsets", self.expert_width_offsets, (len(widths) + 1,), INDEX_DTYPES)
        if self.expert_width_offsets.device != self.expert_row_offsets.device:
            raise ValueError("expert_row_offsets and expert_width_offsets must be on one device")

    @property
    def num_experts(self) -> int:
        return len(self.expert_widths)

    @property
    def total_width(self) -> int:
        return self.facts.total_width

    @property
    def max_width(self) -> int:
        return self.facts.max_width

    @property
    def uniform(self) -> bool:
        return self.facts.uniform

    @property
    def hidden_shape(self) -> tuple[int, int]:
        """(R, max_width): the shape of every hidden-activation matrix."""
        return self.num_rows, self.facts.max_width

    def tiles_per_row_tile(self, tile: int) -> tuple[int, int]:
        """(largest, sum) over the experts of cdiv(W_e, tile): the tiles one row tile spans across the experts'
        widths."""
        return _tiles_per_row_tile(self.expert_widths, tile)

    def check_weight(self, name: str, weight: torch.Tensor, hidden: int, dtype: torch.dtype) -> None:
        """`weight` is a contiguous [TW, hidden] matrix of `dtype`."""
        check_tensor_shape(name, weight, (self.total_width, hidden), (dtype,))

    def check_hidden(self, name: str, tensor: torch.Tensor, dtypes) -> None:
        """`tensor` is a contiguous [R, max_width] hidden-activation matrix with a dtype in `dtypes`."""
        check_tensor_shape(name, tensor, self.hidden_shape, dtypes)

    def valid_columns(self) -> torch.Tensor:
        """[R, max_width] bool: which entries of a hidden-activation matrix hold values (for tests and debugging;
        this reads the row offsets back to the host)."""
        device = self.expert_row_offsets.device
        counts = self.expert_row_offsets.diff().cpu()
        widths = torch.repeat_interleave(torch.tensor(self.expert_widths), counts)  # (R,)
        return (torch.arange(self.max_width)[None, :] < widths[:, None]).to(device)
