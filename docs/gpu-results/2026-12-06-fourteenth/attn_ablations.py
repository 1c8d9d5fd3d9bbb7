#!/usr/bin/env python3
"""Writes diagnostic variants of the Hopper prefill attention kernel (call 23).

Each variant removes one part of the warp-specialized kernel, so timing it beside
main says what that part costs (a speed-of-light test, not a kernel to land: the
outputs are wrong). Usage: attn_ablations.py KERNELS_DIR OUT_DIR; writes
OUT_DIR/<variant>/ as copies of KERNELS_DIR with prefill_attn.cu edited:
  noload     the producer issues no TMA box (the stage is marked full at once);
             the tile holding the last key still comes by copies
  nosoftmax  the consumers skip the online softmax (no max, exp or rescale): the
             scores go to the P V product as they are
  noexp      the softmax keeps its max and sums but replaces each ex2 by its
             argument (no MUFU work)
  nopingpong the two consumer warpgroups do not take turns at the tensor cores
"""
import pathlib
import shutil
import sys

EXPECT_TX = "            mbar_expect_tx(&full[s], 2 * TILE_BYTES);\n"
BOX_IF = "            if (b < boxes) {\n                int kv = b / (nb * P), p = b % P;"
SOFTMAX_CALL = """        prefill_softmax_scores<WBK>(sc, m, l, corr, full_tile, kt, kv_end, len, r0, r1, qp0, qp1,
                                    tig, window, scale);"""
EXP = "            float p = fast_exp2(fmaf(sc[nt][e], c, -mc[e >> 1]));"
TURN_WAIT = """    auto turn_wait = [&]() { asm volatile("barrier.sync %0, 256;\\n" ::"r"(2 + wg) : "memory"); };"""
TURN_PASS = """        if (!(wg == 1 && round == ntiles))
            asm volatile("barrier.arrive %0, 256;\\n" ::"r"(3 - wg) : "memory");"""
FIRST_TURN = """    if (wg == 1) asm volatile("barrier.arrive 2, 256;\\n" ::: "memory");\n"""

VARIANTS = {
    "noload": [
        (EXPECT_TX, ""),
        (BOX_IF, "            if (false) {\n                int kv = b / (nb * P), p = b % P;"),
    ],
    "nosoftmax": [
        (SOFTMAX_CALL, "        corr[0] = corr[1] = 1.f;"),
    ],
    "noexp": [
        (EXP, "            float p = fmaf(sc[nt][e], c, -mc[e >> 1]);"),
    ],
    "nopingpong": [
        (TURN_WAIT, "    auto turn_wait = [&]() {};"),
        (TURN_PASS, "        (void)round;"),
        (FIRST_TURN, ""),
    ],
}


def main() -> None:
    src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    text = (src / "prefill_attn.cu").read_text()
    for name, edits in VARIANTS.items():
        t = text
        for old, new in edits:
            if t.count(old) != 1:
                sys.exit(f"{name}: expected one {old!r} in prefill_attn.cu")
            t = t.replace(old, new)
        dst = out / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        (dst / "prefill_attn.cu").write_text(t)
        print(f"{dst}")


if __name__ == "__main__":
    main()
