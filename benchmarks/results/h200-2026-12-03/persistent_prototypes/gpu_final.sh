#!/bin/bash
# Issue 24 final: GPU tests of the tree (persistent kernels; ops, moe, layer: also #20's post-GPU changes), the layer
# before (aaaee76) and after, with the baselines, per-kernel device time, and Dynamo's lru_cache warning.
export PYTHONUNBUFFERED=1
ROOT=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
export PYTHONPATH=$ROOT:$ROOT/.carry/site
timeout -s INT 250 python3 -m pytest -p no:cacheprovider -n 6 tests/test_grouped_gemm.py tests/test_ops.py tests/test_moe.py tests/test_layer.py 2>&1 | tee $OUT/tests.log | grep -E "^FAILED|^ERROR|passed|failed" | head -20
CONFIGS="h2048_64x1024_top8 h2048_128x768_top8 h2048_var_32x1536_64x768_32x384_top8 h4096_8x14336_top2"
(cd $ROOT/.carry/base_aaaee76/benchmarks && PYTHONPATH=$ROOT/.carry/base_aaaee76:$ROOT/.carry/site timeout 100 python3 bench_fwd_bwd.py \
  --configs $CONFIGS --impls triton --graph --warmup 3 --repeats 10 --out $OUT/fwd_bwd_before.json 2>&1 | grep -E "^\| |peak" | tee $OUT/fwd_bwd_before.md)
(cd benchmarks && timeout 150 python3 bench_fwd_bwd.py --configs $CONFIGS --impls triton scattermoe grouped_mm --graph --warmup 3 --repeats 10 \
  --out $OUT/fwd_bwd_after.json 2>&1 | grep -E "^\| |peak" | tee $OUT/fwd_bwd_after.md)
(cd benchmarks && timeout 60 python3 bench_fwd_bwd.py --configs h2048_64x1024_top8 --activation swiglu --impls triton --graph --warmup 3 --repeats 10 \
  --out $OUT/fwd_bwd_after_swiglu.json 2>&1 | grep -E "^\| |peak" | tee $OUT/fwd_bwd_after_swiglu.md)
(cd benchmarks && timeout 80 python3 bench_moe.py --configs h2048_64x1024_top8 h2048_128x768_top8 --kernels --impls triton 2>&1 | grep -v Warn > $OUT/kernels_h2048.md; grep -E "^## |launches per|_gemm|_combine" $OUT/kernels_h2048.md)
timeout 60 python3 - <<'PY' 2>&1 | grep -iE "lru|compiled ok|error" | head -5
import torch, triton_moe
cfg = triton_moe.MoEConfig(expert_sizes="4x512,4x256", num_active_experts=2, hidden_size=256)
layer = triton_moe.MoEMLP(cfg).cuda()
x = torch.randn(4096, 256, device="cuda", requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = torch.compile(layer, fullgraph=True)(x)
(out.float().sum() + layer.aux_loss).backward()
print("compiled ok")
PY
