"""Compile-only check of gather_up.py for sm_90 (no GPU, no torch). Run with Triton 3.6:
    /tmp/v36/bin/python .carry/gluon/compile_check.py [outdir]
Prints, per config: warps, shared memory, wgmma / cp.async / TMA counts, setmaxnreg, warp specialisation, spills
(ptxas -v where a ptxas is found), and writes ttgir/ptx to outdir (default /tmp/gluon_up_cc).
Exit status 1 when any config fails to compile or does not fit 227 KB of shared memory."""
import os
import re
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

import gather_up as gu  # noqa: E402

SMEM_LIMIT = 232448  # 227 KB, sm_90 opt-in maximum per block
TARGET = GPUTarget("cuda", 90, 32)


def kernel_signature(BN, BK, idx_dtype="i32"):
    desc = f"tensordesc<bf16[{BN},{BK}],{gu.b_smem_layout(BN, BK)!r}>"
    sig = dict(x_ptr="*bf16", row_to_token_ptr=f"*{idx_dtype}", b_desc=desc, h_pre_ptr="*bf16", h_act_ptr="*bf16",
               rw_ptr="*fp32", row_offsets_ptr="*i64", width_offsets_ptr="*i64", tile_table_ptr="*i32",
               num_tiles_ptr="*i32", H="i32", max_width="i32")
    for c in ("BM", "BN", "BK", "NUM_STAGES", "NUM_PROGRAMS", "EPI_BLOCKED", "ACT_FROM_ROUNDED", "P_WARPS", "P_REGS",
              "C_REGS", "WIDTH_MULTIPLE"):
        sig[c] = "constexpr"
    return sig


def compile_gluon(cfg, idx_dtype="i32"):
    BN, BK = cfg["BN"], cfg["BK"]
    sig = kernel_signature(BN, BK, idx_dtype)
    constexprs = dict(BM=cfg["BM"], BN=BN, BK=BK, NUM_STAGES=cfg["NUM_STAGES"], NUM_PROGRAMS=132,
                      EPI_BLOCKED=cfg["EPI_BLOCKED"], ACT_FROM_ROUNDED=cfg["ACT_FROM_ROUNDED"],
                      P_WARPS=gu.PRODUCER_WARPS, P_REGS=gu.PRODUCER_REGS, C_REGS=gu.CONSUMER_REGS,
                      WIDTH_MULTIPLE=cfg.get("WIDTH_MULTIPLE", 64))
    names = list(sig)
    # what the launcher's specialisation gives for 16-byte aligned pointers and H, max_width % 16 == 0
    div16 = [names.index(n) for n in ("x_ptr", "row_to_token_ptr", "h_pre_ptr", "h_act_ptr", "rw_ptr",
                                      "row_offsets_ptr", "width_offsets_ptr", "tile_table_ptr", "num_tiles_ptr",
                                      "H", "max_width")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in div16}
    src = GluonASTSource(gu.gluon_up_kernel, sig, constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=4))


def compile_tile_table():
    sig = dict(row_offsets_ptr="*i64", width_offsets_ptr="*i64", tile_table_ptr="*i32", num_tiles_ptr="*i32",
               num_experts="i32", max_tiles="i32", BM="constexpr", BN="constexpr", BLOCK="constexpr",
               EXPERTS_POW2="constexpr")
    src = ASTSource(gu._up_tile_table_kernel, sig, dict(BM=128, BN=256, BLOCK=256, EXPERTS_POW2=128))
    return triton.compile(src, target=TARGET, options=dict(num_warps=4))


def ptxas_info(ptx, name, outdir):
    """Registers / spills per the ptxas Triton bundles (sm_90a)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "ptxas: not found"
    import subprocess
    path = os.path.join(outdir, name + ".ptx")
    r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(outdir, name + ".cubin")],
                       capture_output=True, text=True)
    txt = r.stdout + r.stderr
    regs = re.findall(r"Used (\d+) registers", txt)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    if r.returncode != 0:
        return "ptxas FAILED: " + txt.strip()[-400:]
    return f"ptxas regs={regs} spills(st,ld)={spill}"


def summarise(k, name, outdir):
    p = k.asm["ptx"]
    ttgir = k.asm["ttgir"]
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, name + ".ptx"), "w") as f:
        f.write(p)
    with open(os.path.join(outdir, name + ".ttgir"), "w") as f:
        f.write(ttgir)
    smem = k.metadata.shared
    info = dict(
        warps=k.metadata.num_warps,
        smem=smem,
        smem_ok=smem <= SMEM_LIMIT,
        ws="ttg.warp_specialize" in ttgir,
        wgmma=p.count("wgmma.mma_async"),
        wgmma_shape=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", p))),
        setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", p))),
        cp_async=len(re.findall(r"cp\.async\.c[ga]\.shared", p)),
        cp_async_mbar_noinc=p.count("cp.async.mbarrier.arrive.noinc"),
        cp_async_mbar_inc=len(re.findall(r"cp\.async\.mbarrier\.arrive\.shared", p)),
        tma=p.count("cp.async.bulk.tensor"),
        expect_tx=sorted(set(re.findall(r"mbarrier\.arrive\.expect_tx\.shared\S*\s+_, \[[^\]]+\], (\d+)", p))),
        fence_proxy_async=p.count("fence.proxy.async"),
        mbar_init_counts=sorted(set(re.findall(r"mbarrier\.init\.shared\S*\s+\[[^\]]+\], (\d+)", p))),
        bar_sync=len(re.findall(r"bar\.sync", p)),
        st_global=len(re.findall(r"st\.global", p)),
        st_global_kinds=sorted(set(re.findall(r"st\.global((?:\.[a-z0-9:]+)+)", p))),
    )
    reqregs = re.findall(r"requestedRegisters\s*=\s*array<i32:\s*([\d, ]+)>", ttgir)
    info["requestedRegisters"] = reqregs
    info["ptxas"] = ptxas_info(p, name, outdir)
    return info


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gluon_up_cc"
    print("triton", triton.__version__, "target", TARGET)
    ok = True
    try:
        tk = compile_tile_table()
        print(f"tile_table_kernel: ok warps={tk.metadata.num_warps} smem={tk.metadata.shared}")
    except Exception:
        traceback.print_exc()
        print("tile_table_kernel: FAILED")
        ok = False
    configs = []
    for BN, STAGES in ((256, 3), (256, 4), (128, 4), (128, 5)):
        for EPI in (False, True):
            configs.append(dict(gu.DEFAULT_CONFIG, BN=BN, NUM_STAGES=STAGES, EPI_BLOCKED=EPI))
    configs.append(dict(gu.DEFAULT_CONFIG, ACT_FROM_ROUNDED=True))
    for cfg in configs:
        name = (f"gluon_up_{cfg['BM']}x{cfg['BN']}x{cfg['BK']}_s{cfg['NUM_STAGES']}"
                f"_epi{'B' if cfg['EPI_BLOCKED'] else 'M'}{'_rnd' if cfg['ACT_FROM_ROUNDED'] else ''}")
        try:
            k = compile_gluon(cfg)
        except Exception:
            traceback.print_exc()
            print(f"{name}: FAILED to compile")
            ok = False
            continue
        info = summarise(k, name, outdir)
        fits = info["smem_ok"]
        default = cfg == gu.DEFAULT_CONFIG
        print(f"{name}{' (default)' if default else ''}: ok " + " ".join(f"{k_}={v}" for k_, v in info.items()))
        if default and not fits:
            ok = False
    # row_to_token int64
    try:
        k = compile_gluon(gu.DEFAULT_CONFIG, idx_dtype="i64")
        print(f"default config with int64 row_to_token: ok smem={k.metadata.shared}")
    except Exception:
        traceback.print_exc()
        print("default config with int64 row_to_token: FAILED")
        ok = False
    print("COMPILE CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
