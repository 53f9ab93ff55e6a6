"""Compile the portable row GEMM (`_expert_rows_gemm`) as the layer launches it at hidden 2048 (bf16, weights by
TMA, 128x256x64 tiles with 8 warps) for sm_90, without a GPU, and report shared memory, registers and spills from
ptxas, and where the spills fall (inside the K loop or after it) from the SASS:
- up: the act_forward epilogue (relu², routing weights by index), 3 stages;
- dA: the act_backward epilogue (dh_pre, the routing weight's partial sums), 4 stages;
each with and without the row copy, and on branch copy-prefetch with the copy loaded a step ahead (AHEAD=up,dA).

    AHEAD=up /path/to/triton-3.6-python benchmarks/results/h100-2026-12-05/scripts/compile_rows_gemm.py
"""
import os
import re
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.getcwd())
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from triton_moe.kernels.grouped_gemm import _expert_rows_gemm  # noqa: E402

OUT = os.environ.get("OUT_DIR", "/tmp/compile_rows_gemm")
AHEAD = os.environ.get("AHEAD", "").split(",")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TILE_M, TILE_N, TILE_K = 128, 256, 64


def compile_role(role, copy, stages):
    pointers = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", routing_weights_ptr="*fp32",
                    routing_weight_index_ptr="*i32", row_to_token_ptr="*i32", expert_row_offsets_ptr="*i32",
                    expert_width_offsets_ptr="*i64")
    if role == "up":
        pointers["out3_ptr"] = "*bf16"
    else:
        pointers.update(h_pre_ptr="*bf16", partials_ptr="*fp32")
    if copy:
        pointers["a_rows_ptr"] = "*bf16"
    signature, constants = {}, {}
    for name in _expert_rows_gemm.arg_names:
        if name in pointers:
            signature[name] = pointers[name]
        elif name == "b_desc":
            signature[name] = f"tensordesc<bf16[{TILE_N}, {TILE_K}]>"
        elif name in ("num_experts", "hidden", "max_width", "partial_tiles"):
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
            constants[name] = None
    constants.update(RAGGED_OUT=True, SECOND_PRODUCT="none", EPILOGUE="act_forward" if role == "up" else "act_backward",
                     ACTIVATION="relu_squared", GATED=False, HAS_ROUTING_WEIGHTS=True, INDEXED_ROUTING_WEIGHTS=True,
                     COPY_A_ROWS=copy, ZERO_PADDING=False, B_TMA=True, DOT_PRECISION="tf32", TILE_M=TILE_M,
                     TILE_N=TILE_N, TILE_K=TILE_K, EXPERTS_POW2=128, WIDTH_MULTIPLE=16, ROW_GROUP=1)
    if "COPY_AHEAD" in _expert_rows_gemm.arg_names:
        constants["COPY_AHEAD"] = role in AHEAD
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in ("hidden", "max_width")}
    kernel = triton.compile(ASTSource(_expert_rows_gemm, signature, constants, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=stages))
    path = f"{OUT}/{role}_copy{int(copy)}_ahead{int(constants.get('COPY_AHEAD', False))}"
    with open(path + ".ptx", "w") as f:
        f.write(kernel.asm["ptx"])
    report = subprocess.run([f"{BIN}/ptxas", "-v", "--gpu-name=sm_90a", path + ".ptx", "-o", path + ".cubin"],
                            capture_output=True, text=True)
    sass = subprocess.run([f"{BIN}/nvdisasm", "-c", path + ".cubin"], capture_output=True, text=True).stdout
    lines = sass.splitlines()
    # The K loop: from the label the branch after the last MMA jumps back to, to that branch; a spill between them
    # runs every K step.
    last_mma = max(i for i, line in enumerate(lines) if "HGMMA" in line)
    loop_end = next(i for i in range(last_mma, len(lines)) if "BRA" in lines[i])
    loop_label = re.search(r"\(([.\w]+)\)", lines[loop_end]).group(1)
    loop_start = lines.index(f"{loop_label}:")
    spills = [i for i, line in enumerate(lines) if re.search(r"\b(LDL|STL)\b", line)]
    in_loop = sum(loop_start < i < loop_end for i in spills)
    text = report.stdout + report.stderr
    registers = re.findall(r"Used (\d+) registers", text)
    spill_bytes = re.findall(r"(\d+) bytes spill stores", text)
    ahead = constants.get("COPY_AHEAD", False)
    print(f"{role:2s} copy {copy!s:5s} ahead {ahead!s:5s} stages {stages}: shared {kernel.metadata.shared} B, "
          f"registers {registers}, spill stores {spill_bytes} B; local loads/stores {len(spills)}, in the K loop "
          f"{in_loop}")


def main():
    os.makedirs(OUT, exist_ok=True)
    print("triton", triton.__version__, "sm_90, AHEAD", AHEAD)
    for role, stages in (("up", 3), ("dA", 4)):
        for copy in (False, True):
            compile_role(role, copy, stages)


if __name__ == "__main__":
    main()
