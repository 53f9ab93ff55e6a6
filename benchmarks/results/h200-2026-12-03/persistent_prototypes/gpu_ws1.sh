#!/bin/bash
# Issue 24: the persistent warp-specialised down/dX kernel on the GPU: its tests, then the whole layer before
# (aaaee76, .carry/base_aaaee76) and after (working tree), alternating, with ScatterMoE and grouped_mm in the run.
export PYTHONUNBUFFERED=1
ROOT=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
export PYTHONPATH=$ROOT:$ROOT/.carry/site
timeout -s INT 150 python3 -m pytest -p no:cacheprovider -n 4 tests/test_grouped_gemm.py -k "persistent or tma or launchers" 2>&1 | tee $OUT/tests_persistent.log | grep -E "^FAILED|^ERROR|passed|failed" | head
CONFIGS="h2048_64x1024_top8 h2048_128x768_top8 h2048_var_32x1536_64x768_32x384_top8 h4096_8x14336_top2"
for round in 1 2; do
  for tree in .carry/base_aaaee76 .; do
    name=$( [ "$tree" = "." ] && echo after || echo before )
    echo "=== round $round $name"
    impls="triton"; [ $round = 1 ] && [ $name = after ] && impls="triton scattermoe grouped_mm"
    (cd $ROOT/$tree/benchmarks && PYTHONPATH=$ROOT/$tree:$ROOT/.carry/site timeout 150 python3 bench_fwd_bwd.py \
      --configs $CONFIGS --impls $impls --graph --warmup 3 --repeats 10 --out $OUT/fwd_bwd_${name}_${round}.json 2>&1 \
      | grep -E "^\| h|peak" | tee -a $OUT/fwd_bwd_${name}.md)
  done
done
(cd benchmarks && timeout 100 python3 bench_moe.py --configs h2048_64x1024_top8 h2048_128x768_top8 --profile --impls triton --warmup 3 --repeats 8 2>&1 | grep -v Warn | tee $OUT/profile_h2048.md | grep -E "^## |down GEMM|dX rows|sum of")
