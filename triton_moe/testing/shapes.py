"""The MoE layer shapes the tests and benchmarks sweep, as MoEConfig arguments."""

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
