"""MoEConfig: the one description of an MoE layer, shared by the Triton layer and the stk reference."""

import math
from dataclasses import dataclass, field

ACTIVATIONS = ("relu_squared", "swiglu", "gelu")

# The seed design's table (batch 8, seq 512 in its benchmarks): 8/16/64/128 experts, uniform and variable widths.
SEED_CONFIGS = {
    "8exp_uniform": dict(expert_sizes=[(8, 512)], num_active_experts=2, hidden_size=256),
    "8exp_variable": dict(expert_sizes=[(4, 512), (4, 256)], num_active_experts=2, hidden_size=256),
    "16exp_uniform": dict(expert_sizes=[(16, 256)], num_active_experts=2, hidden_size=256),
    "16exp_variable": dict(expert_sizes=[(4, 512), (8, 256), (4, 128)], num_active_experts=2, hidden_size=256),
    "64exp_uniform": dict(expert_sizes=[(64, 256)], num_active_experts=8, hidden_size=256),
    "64exp_variable": dict(expert_sizes=[(16, 512), (32, 256), (16, 128)], num_active_experts=8, hidden_size=256),
    "128exp_uniform": dict(expert_sizes=[(128, 256)], num_active_experts=8, hidden_size=256),
    "128exp_variable": dict(expert_sizes=[(32, 512), (64, 256), (32, 128)], num_active_experts=8, hidden_size=256),
}

# The realistic shapes of the benchmark table (16384 tokens in its benchmarks).
REALISTIC_CONFIGS = {
    "h2048_64x1024_top8": dict(expert_sizes=[(64, 1024)], num_active_experts=8, hidden_size=2048),
    "h2048_128x768_top8": dict(expert_sizes=[(128, 768)], num_active_experts=8, hidden_size=2048),
    "h2048_var_32x1536_64x768_32x384_top8": dict(expert_sizes=[(32, 1536), (64, 768), (32, 384)],
                                                 num_active_experts=8, hidden_size=2048),
    "h4096_8x14336_top2": dict(expert_sizes=[(8, 14336)], num_active_experts=2, hidden_size=4096),
}


@dataclass
class MoEConfig:
    """Shape and routing of one Mixture-of-Experts MLP layer.

    `expert_sizes` lists groups of experts as `(count, width)`: `[(4, 512), (4, 256)]` is eight experts,
    the first four of width 512, the last four of width 256, in that order. The text `"4x512,4x256"` says the same
    (what a configurator or a checkpoint's arguments carry; `expert_sizes_text` writes it). Expert `e` owns rows
    `expert_width_offsets[e]:expert_width_offsets[e + 1]` of the weights `w1`, `v1` and `w2`.
    """

    expert_sizes: list[tuple[int, int]]
    num_active_experts: int  # top-k
    hidden_size: int
    block_size: int = 128  # stk block; the reference needs widths and hidden_size that are multiples of it
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
        _require_int("hidden_size", self.hidden_size, minimum=1)
        _require_int("block_size", self.block_size, minimum=1)

        self.expert_widths = [width for count, width in self.expert_sizes for _ in range(count)]
        self.num_experts = len(self.expert_widths)
        offsets = [0]
        for width in self.expert_widths:
            offsets.append(offsets[-1] + width)
        self.expert_width_offsets = offsets
        self.total_width = offsets[-1]

        _require_int("num_active_experts", self.num_active_experts, minimum=1)
        if self.num_active_experts > self.num_experts:
            raise ValueError(
                f"num_active_experts (top-k) must be <= num_experts = {self.num_experts}, "
                f"got {self.num_active_experts}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("load_balance_coef", "z_loss_coef", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("load_balance_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        for name in ("normalize_weights", "keep_sorted_x"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def expert_sizes_text(self) -> str:
        """expert_sizes as text: [(4, 512), (4, 256)] -> '4x512,4x256'."""
        return ",".join(f"{count}x{width}" for count, width in self.expert_sizes)

    @property
    def uniform_width(self) -> bool:
        return len(set(self.expert_widths)) == 1

    @property
    def is_glu(self) -> bool:
        """True when the activation gates a second up projection (`v1`)."""
        return self.activation == "swiglu"

    def check_block_aligned(self) -> None:
        """Raise a ValueError unless every width and hidden_size is a multiple of block_size (stk's need)."""
        for width in sorted(set(self.expert_widths)):
            if width % self.block_size:
                raise ValueError(
                    f"expert_sizes: width {width} is not a multiple of block_size={self.block_size}; "
                    "the stk reference needs block-aligned widths (the Triton MoEMLP does not)"
                )
        if self.hidden_size % self.block_size:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of block_size={self.block_size}, "
                "which the stk reference needs"
            )


MAX_EXPERTS = 2**16  # the router's and the sort's tables hold an entry per expert
MAX_TOTAL_WIDTH = 2**31 - 1  # weight rows are addressed with 32-bit offsets


def parse_expert_sizes(text: str) -> list[tuple[int, int]]:
    """'4x512,4x256' -> [(4, 512), (4, 256)]: groups of count x width, as MoEConfig.expert_sizes_text writes them."""
    groups = []
    for group in text.replace(" ", "").split(","):
        count, _, width = group.partition("x")
        if not (count.isdigit() and width.isdigit()):
            raise ValueError(f"expert_sizes must look like '4x512,4x256' (count x width, comma-separated), "
                             f"got {text!r}")
        groups.append((int(count), int(width)))
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


def _require_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
