"""MoEConfig: the one description of an MoE layer, shared by the Triton layer and the stk reference."""

import math
import numbers
from dataclasses import FrozenInstanceError, dataclass, field

from triton_moe.activations import check_activation, is_gated


@dataclass
class MoEConfig:
    """Shape and routing of one Mixture-of-Experts MLP layer.

    `expert_sizes` lists groups of experts as `(count, width)`: `[(4, 512), (4, 256)]` is eight experts,
    the first four of width 512, the last four of width 256, in that order. The text `"4x512,4x256"` says the same
    (what a configurator or a checkpoint's arguments carry; `expert_sizes_text` writes it). Expert `e` owns rows
    `expert_width_offsets[e]:expert_width_offsets[e + 1]` of the weights `w1`, `v1` and `w2`.

    A built config is read-only: its fields are checked and its derived fields computed once, and the layers built
    from it keep it. `dataclasses.replace(config, field=value)` makes another, checked again.
    """

    expert_sizes: list[tuple[int, int]]
    num_active_experts: int  # top-k
    hidden_size: int
    activation: str = "relu_squared"
    normalize_weights: bool = True  # renormalise the k routing weights of a token to sum to 1
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_std: float = 0.02  # std of the normal init of router, w1, v1 and w2 (nanoGPT's 0.02)
    # The Triton MoEMLP's forward keeps x's rows in expert-sorted order (top-k times x's size) for the backward's
    # dW1, which reads them by TMA: faster for large batches on Hopper (it skips this elsewhere). False trades that
    # speed for the memory: dW1 gathers x's rows again.
    keep_sorted_x: bool = True

    num_experts: int = field(init=False)
    expert_widths: list[int] = field(init=False)  # one per expert
    expert_width_offsets: list[int] = field(init=False)  # prefix sums of expert_widths, length E + 1
    total_width: int = field(init=False)

    def __post_init__(self):
        self.expert_sizes = _checked_expert_sizes(self.expert_sizes)
        require_int("hidden_size", self.hidden_size, minimum=1)

        self.expert_widths = [width for count, width in self.expert_sizes for _ in range(count)]
        self.num_experts = len(self.expert_widths)
        offsets = [0]
        for width in self.expert_widths:
            offsets.append(offsets[-1] + width)
        self.expert_width_offsets = offsets
        self.total_width = offsets[-1]

        require_int("num_active_experts", self.num_active_experts, minimum=1)
        if self.num_active_experts > self.num_experts:
            raise ValueError(
                f"num_active_experts (top-k) must be <= num_experts = {self.num_experts}, "
                f"got {self.num_active_experts}"
            )
        check_activation(self.activation)
        for name in ("load_balance_coef", "z_loss_coef", "init_std"):
            setattr(self, name, _fp32_number(name, getattr(self, name)))
        for name in ("load_balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.init_std < FP32_TINIEST:
            raise ValueError(f"init_std must be > 0 in fp32 (at least {FP32_TINIEST:.3g}), got {self.init_std}")
        for name in ("normalize_weights", "keep_sorted_x"):
            check_bool(name, getattr(self, name))
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name, value):
        if getattr(self, "_checked", False):
            raise FrozenInstanceError(
                f"cannot set MoEConfig.{name}: a built config is read-only (its fields are checked and its derived "
                "fields computed once, and layers keep it); dataclasses.replace(config, ...) makes another")
        super().__setattr__(name, value)

    @property
    def expert_sizes_text(self) -> str:
        """expert_sizes as text: [(4, 512), (4, 256)] -> '4x512,4x256'."""
        return format_expert_sizes(self.expert_sizes)

    @property
    def uniform_width(self) -> bool:
        return len(set(self.expert_widths)) == 1

    @property
    def is_gated(self) -> bool:
        """True when the activation gates a second up projection (`v1`)."""
        return is_gated(self.activation)



MAX_EXPERTS = 2**16  # the router's and the sort's tables hold an entry per expert
FP32_MAX = 3.4028234663852886e38  # the coefficients and init_std reach the aux loss and the weights in fp32
FP32_TINIEST = 1.401298464324817e-45  # the smallest positive fp32 value: an init_std below it draws zeros
MAX_TOTAL_WIDTH = 2**31 - 1  # weight rows are addressed with 32-bit offsets


def parse_expert_sizes(text: str) -> list[tuple[int, int]]:
    """'4x512,4x256' -> [(4, 512), (4, 256)]: groups of count x width, as MoEConfig.expert_sizes_text writes them."""
    groups = []
    for group in text.replace(" ", "").split(","):
        count, _, width = group.partition("x")
        if not (count.isdecimal() and width.isdecimal()):
            raise ValueError(f"expert_sizes must look like '4x512,4x256' (count x width, comma-separated), "
                             f"got {text!r}")
        groups.append((int(count), int(width)))
    return groups


def format_expert_sizes(groups) -> str:
    """[(4, 512), (4, 256)] -> '4x512,4x256', what parse_expert_sizes reads."""
    return ",".join(f"{count}x{width}" for count, width in groups)


def expert_sizes_of_widths(widths: list[int]) -> list[tuple[int, int]]:
    """[512, 512, 256] -> [(2, 512), (1, 256)]: consecutive equal widths as (count, width) groups."""
    groups = []
    for width in widths:
        if groups and groups[-1][1] == width:
            groups[-1] = (groups[-1][0] + 1, width)
        else:
            groups.append((1, width))
    return groups


def _checked_expert_sizes(expert_sizes) -> list[tuple[int, int]]:
    """expert_sizes as a list of (count, width) int tuples, or a ValueError/TypeError that names it."""
    if isinstance(expert_sizes, str):
        expert_sizes = parse_expert_sizes(expert_sizes)
    if isinstance(expert_sizes, (bytes, dict)) or not hasattr(expert_sizes, "__iter__"):
        raise TypeError(f"expert_sizes must be a list of (count, width) pairs such as [(4, 512), (4, 256)], "
                        f"got {expert_sizes!r}")
    groups = []
    for group in expert_sizes:
        if isinstance(group, (str, bytes)) or not hasattr(group, "__len__") or len(group) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in group):
            raise ValueError(f"expert_sizes entries must be (count, width) integer pairs, got {group!r} in "
                             f"{expert_sizes!r}")
        count, width = group
        if count < 1:
            raise ValueError(f"expert_sizes: expert count must be >= 1, got {count} in {tuple(group)}")
        if width < 1:
            raise ValueError(f"expert_sizes: expert width must be >= 1, got {width} in {tuple(group)}")
        groups.append((count, width))
    if not groups:
        raise ValueError("expert_sizes must list at least one (count, width) group, got []")
    num_experts = sum(count for count, _ in groups)
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"expert_sizes: at most {MAX_EXPERTS} experts, got {num_experts} in {groups}")
    total_width = sum(count * width for count, width in groups)
    if total_width > MAX_TOTAL_WIDTH:
        raise ValueError(f"expert_sizes: the widths must sum to at most {MAX_TOTAL_WIDTH}, got {total_width}")
    return groups


def _fp32_number(name, value) -> float:
    """value as a float, or a ValueError that names it: a real number (a Python or numpy int or float, not a bool)
    finite in fp32."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or abs(value) > FP32_MAX:
        raise ValueError(f"{name} must be finite in fp32 (at most {FP32_MAX:.4g} in size), got {value!r}")
    return value


def check_bool(name: str, value) -> None:
    """A ValueError unless `value` is True or False: a flag given another value is a mistake, not a truth value."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def require_int(name, value, minimum):
    """value is an int (not a bool) >= minimum, or a ValueError that names it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
