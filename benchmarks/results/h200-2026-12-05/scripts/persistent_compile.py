"""Session 27, on a machine without a GPU: the persistent down GEMM (kernels/persistent.py) and the persistent up
prototype over sorted rows (persistent_gathered.py, plain and activation epilogues) compiled for sm_90 by Triton 3.6,
128x256x64 tiles, 4 warps, 3 and 4 stages, to compare what the compiler makes of each: shared memory, warps,
registers and spills (ptxas), the wgmma shape, the TMA copies, the warp-specialised partitions, and how the dot
reads B. The TTGIR and PTX land in /tmp/persistent_compile/.

    TRITON_INTERPRET=0 /tmp/v36/bin/python benchmarks/results/h200-2026-12-05/scripts/persistent_compile.py
    (a venv with triton 3.6.0, torch 2.11.0 and numpy<2.4)
"""
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"  # compile, not interpret, on a machine without a GPU
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, HERE)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from persistent_gathered import _persistent_token_rows_gemm  # noqa: E402
from triton_moe.kernels.persistent import _persistent_rows_gemm  # noqa: E402

OUT = "/tmp/persistent_compile"
TILES = dict(TILE_M=128, TILE_N=256, TILE_K=64, NUM_PROGRAMS=132)
OFFSETS = dict(expert_row_offsets_ptr="*i32", expert_width_offsets_ptr="*i64", tile_table_ptr="*i32",
               num_tiles_ptr="*i32")
SIZES = dict(num_rows="i32", total_width="i32", hidden="i32", max_width="i32")


def compile_sm90(fn, signature, constexprs, aligned, num_stages, tag):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, num_stages=num_stages))
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    path = os.path.join(OUT, tag)
    open(path + ".ttgir", "w").write(ttgir)
    open(path + ".ptx", "w").write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    result = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path + ".ptx", "-o", path + ".cubin"],
                            capture_output=True, text=True)
    report = result.stdout + result.stderr
    shapes = sorted(set(re.findall(r"wgmma.mma_async.sync.aligned.(m\d+n\d+k\d+)", ptx)))
    dots = [" * ".join(pair) for pair in
            re.findall(r"ttng.warp_group_dot [^\n]*?: !ttg.memdesc<(\w+), [^\n]*?\* !ttg.memdesc<(\w+),", ttgir)]
    registers = ",".join(re.findall(r"Used (\d+) registers", report))
    spills = ",".join(re.findall(r"(\d+) bytes spill stores", report))
    partitions = len(re.findall(r"partition\d+\(", ttgir))
    transposed = "ttg.memdesc_trans" in ttgir
    print(f"{tag:22s} smem {kernel.metadata.shared:6d}  warps {kernel.metadata.num_warps:2d}  registers {registers}  "
          f"spill bytes {spills}  wgmma {shapes}  TMA loads {ttgir.count('ttng.async_tma_copy_global_to_local')}  "
          f"partitions {partitions}  dot operands {sorted(set(dots))}  B transposed in shared memory {transposed}",
          flush=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    print(f"triton {triton.__version__}, target sm_90, {TILES}", flush=True)
    for stages in (3, 4):
        compile_sm90(_persistent_rows_gemm, dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", **OFFSETS, **SIZES),
                     TILES, ["a_ptr", "b_ptr", "out_ptr", *OFFSETS, *SIZES], stages, f"down_s{stages}")
        signature = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", out3_ptr="*bf16", h_pre_ptr="*bf16",
                         partials_ptr="*fp32", routing_weights_ptr="*fp32", routing_weight_index_ptr="*i32",
                         **OFFSETS, **SIZES, partial_tiles="i32")
        aligned = ["a_ptr", "b_ptr", "out_ptr", "out3_ptr", "routing_weights_ptr", "routing_weight_index_ptr",
                   *OFFSETS, *SIZES]
        for epilogue in ("plain", "act_forward"):
            constexprs = dict(EPILOGUE=epilogue, ACTIVATION="relu_squared", HAS_ROUTING_WEIGHTS=True,
                              INDEXED_ROUTING_WEIGHTS=True, WARP_SPECIALIZE=True, **TILES)
            compile_sm90(_persistent_token_rows_gemm, signature, constexprs, aligned, stages,
                         f"up_{epilogue}_s{stages}")


if __name__ == "__main__":
    main()
