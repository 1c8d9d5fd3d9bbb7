//! Tests of the typed launches that need no GPU: every launch's parameters
//! against its kernel's signature in the program source, and the grids.

use super::*;
use crate::cuda::program;

/// A parameter's type as the kernel declares it (a pointer by its element type).
#[derive(Debug, PartialEq)]
enum Kind {
    Ptr(String),
    I32,
    U64,
    F32,
}

fn kind(p: &Param) -> Kind {
    match p {
        Param::Ptr(_, elem) => Kind::Ptr(elem.to_string()),
        Param::I32(_) => Kind::I32,
        Param::U64(_) => Kind::U64,
        Param::F32(_) => Kind::F32,
    }
}

/// `(name, kind)` of each parameter of the `extern "C"` kernel whose
/// declaration is `void {decl}(` in the program (macro-made kernels by their
/// pasted name, e.g. `decode_attn_##HD##_##G`).
fn signature(decl: &str) -> Vec<(String, Kind)> {
    let src = program::source().expect("the compiled-in kernels");
    let needle = format!("void {decl}(");
    let hits: Vec<usize> = src.match_indices(&needle).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "`{needle}` in the kernel source: {hits:?}");
    let start = hits[0] + needle.len();
    let end = start + src[start..].find(')').unwrap_or(0);
    src[start..end]
        .replace('\\', " ")
        .split(',')
        .map(|p| {
            let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
            let (ty, name) = p.rsplit_once(' ').unwrap_or(("", &p));
            let name = name.trim_start_matches('*').to_string();
            let k = if ty.contains('*') {
                let elem = ty.trim_start_matches("const ").trim_end_matches('*');
                Kind::Ptr(elem.trim().to_string())
            } else {
                match ty {
                    "int" => Kind::I32,
                    "u64" => Kind::U64,
                    "float" => Kind::F32,
                    other => panic!("parameter type {other:?} of {decl}"),
                }
            };
            (name, k)
        })
        .collect()
}

fn check<K: Kernel>(decl: &str, k: &K) {
    let ours: Vec<(String, Kind)> = k
        .params()
        .unwrap_or_default()
        .iter()
        .map(|(n, p)| (n.to_string(), kind(p)))
        .collect();
    assert_eq!(ours, signature(decl), "{} (`{decl}`)", K::NAME);
}

const P: Dev<bf16> = Dev::from_raw(0x1000);
const PF: Dev<f32> = Dev::from_raw(0x2000);
const PI: Dev<i32> = Dev::from_raw(0x3000);
const PU: Dev<u32> = Dev::from_raw(0x4000);
const FP8: KvRead = KvRead::Fp8 {
    cache: Dev::from_raw(0x5000),
    scales: Dev::from_raw(0x6000),
};

fn rope() -> RopeKv {
    RopeKv {
        tokens: 5,
        qkv: P,
        bias: Dev::NULL,
        pos: PI,
        slots: PI.add(5),
        inv_freq: PF,
        q_out: P,
        cache: P,
        kv_out: PF.add(64),
        hq: 32,
        hkv: 8,
        hd: 128,
        block_size: 16,
    }
}

fn decode() -> DecodeAttn {
    DecodeAttn {
        seqs: 3,
        smem: decode_smem(128, 4, false),
        q: P,
        cache: KvRead::Bf16(P),
        tables: PI,
        table_stride: PI,
        seq_lens: PI,
        part_o: PF,
        part_ml: PF,
        out: P,
        hq: 32,
        hkv: 8,
        block_size: 16,
        max_splits: 49,
        window: 0,
        scale: 0.125,
    }
}

fn prefill() -> PrefillAttn {
    PrefillAttn {
        chunks: 2,
        max_q: 300,
        q: P,
        cache: KvRead::Bf16(P),
        tmap: Dev::from_raw(0x7000),
        tables: PI,
        table_stride: 20,
        q_off: PI,
        q_pos: PI,
        q_len: PI,
        out: P,
        hq: 32,
        hkv: 8,
        block_size: 16,
        window: 0,
        scale: 0.125,
        shape: prefill_shape("sm_90a", 128, false),
    }
}

#[test]
fn every_launch_passes_its_kernels_parameters_in_order() {
    check(
        "embed",
        &Embed {
            rows: 3,
            ids: PU,
            table: P,
            x: PF,
            hidden: 64,
        },
    );
    // Few rows launch `add_rmsnorm`, many `add_rmsnorm_rows`: one signature.
    for (decl, rows) in [("add_rmsnorm", 3), ("add_rmsnorm_rows", NORM_MANY_ROWS)] {
        check(
            decl,
            &AddRmsnorm {
                rows,
                x: PF,
                delta: Dev::NULL,
                rows_map: Dev::NULL,
                w: P,
                out: P,
                hidden: 64,
                eps: 1e-5,
            },
        );
    }
    check("rope_kv", &rope());
    check(
        "kv_fp8_store",
        &KvFp8Store {
            runs: 3,
            kv: PF,
            run_starts: PI,
            slots: PI.add(4),
            cache: Dev::from_raw(0x5000),
            scales: PF,
            hkv: 8,
            hd: 128,
            block_size: 16,
        },
    );
    check(
        "silu_mul",
        &SiluMul {
            gu: P,
            act: P,
            n: 2,
            inter: 8,
        },
    );
    check(
        "fill_uniform",
        &FillUniform {
            p: P,
            n: 10,
            seed: 1,
            lo: -1.0,
            hi: 1.0,
        },
    );
    check(
        "gemv",
        &Gemv {
            x: P,
            w: P,
            y: ProductOut::F32(PF),
            n: 1,
            k: 64,
            out: 10,
            prefetch: 1024,
        },
    );
    check(
        "gemv_silu",
        &GemvSilu {
            x: P,
            w: P,
            act: P,
            k: 64,
            inter: 10,
            prefetch: 0,
        },
    );

    check("decode_attn_##HD##_##G", &decode());
    check(
        "decode_attn_fp8_##HD##_##G",
        &DecodeAttn {
            cache: FP8,
            ..decode()
        },
    );
    check(
        "attn_combine",
        &AttnCombine {
            seqs: 3,
            part_o: PF,
            part_ml: PF,
            seq_lens: PI,
            out: P,
            hq: 32,
            hd: 128,
            max_splits: 49,
        },
    );
    check("prefill_attn_##HD", &prefill());
    check(
        "prefill_attn_fp8_##HD",
        &PrefillAttn {
            cache: FP8,
            ..prefill()
        },
    );
    check(
        "sample_rows",
        &SampleRows {
            rows: 4,
            logits: PF,
            draws: PI,
            ids: PU,
            vocab: 1000,
        },
    );
    check(
        "mask_logits",
        &MaskLogits {
            rows: 4,
            logits: PF,
            bits: PU,
            masks: PI,
            vocab: 1000,
        },
    );
    check(
        "row_logprobs",
        &RowLogprobs {
            rows: 4,
            logits: PF,
            draws: PI,
            ids: PU,
            lps: PF,
            top_ids: PU,
            vocab: 1000,
            top_n: 20,
        },
    );
}

#[test]
fn parameters_carry_the_values_given() {
    let p = rope().params().unwrap_or_default();
    assert_eq!(p[3], ("slots", Param::Ptr(0x3000 + 5 * 4, "int")));
    assert_eq!(p[1], ("bias", Param::Ptr(0, "bf16")));
    assert_eq!(
        &p[7..],
        &[
            ("kv_out", Param::Ptr(0x2000 + 64 * 4, "float")),
            ("hq", Param::I32(32)),
            ("hkv", Param::I32(8)),
            ("hd", Param::I32(128)),
            ("bs", Param::I32(16)),
        ]
    );
    let g = |y| Gemv {
        x: P,
        w: P,
        y,
        n: 1,
        k: 64,
        out: 10,
        prefetch: 0,
    };
    // An fp8 cache is two parameters where bf16 is one.
    let d8 = DecodeAttn {
        cache: FP8,
        ..decode()
    }
    .params()
    .unwrap_or_default();
    assert_eq!(d8[1], ("cache", Param::Ptr(0x5000, "unsigned char")));
    assert_eq!(d8[2], ("scales", Param::Ptr(0x6000, "float")));
    let f32_out = g(ProductOut::F32(PF)).params().unwrap_or_default();
    assert_eq!(f32_out[2], ("y", Param::Ptr(0x2000, "void")));
    assert_eq!(f32_out[6], ("y_f32", Param::I32(1)));
    let bf16_out = g(ProductOut::Bf16(P)).params().unwrap_or_default();
    assert_eq!(bf16_out[2], ("y", Param::Ptr(0x1000, "void")));
    assert_eq!(bf16_out[6], ("y_f32", Param::I32(0)));
    // Sizes past a 32-bit int are refused, not wrapped.
    let mut big = rope();
    big.hd = 1 << 31;
    assert!(big.params().is_err());
}

#[test]
fn grids_match_the_kernels_indexing() {
    let c = rope().config();
    assert_eq!((c.grid_dim, c.block_dim.0), ((5, 1, 1), 512));
    let c = decode().config();
    assert_eq!((c.grid_dim, c.block_dim.0), ((49, 8, 3), 128));
    assert_eq!(c.shared_mem_bytes as usize, decode_smem(128, 4, false));
    let c = prefill().config();
    assert_eq!((c.grid_dim, c.block_dim.0), ((3, 32, 2), 384));
    assert_eq!(c.shared_mem_bytes as usize, prefill_ws_smem(128, false));
    let portable = PrefillAttn {
        shape: prefill_shape("sm_90", 128, false),
        ..prefill()
    };
    let c = portable.config();
    assert_eq!((c.grid_dim, c.block_dim.0), ((3, 32, 2), 256));
    assert_eq!(c.shared_mem_bytes, 139_264);
    let c = AttnCombine {
        seqs: 3,
        part_o: PF,
        part_ml: PF,
        seq_lens: PI,
        out: P,
        hq: 32,
        hd: 128,
        max_splits: 49,
    }
    .config();
    assert_eq!((c.grid_dim, c.block_dim.0), ((32, 3, 1), 128));
    let norm = |rows, hidden| AddRmsnorm {
        rows,
        x: PF,
        delta: PF,
        rows_map: PI,
        w: P,
        out: P,
        hidden,
        eps: 1e-5,
    };
    // A decode step's rows: blocks of 1024, one 16-byte load a thread.
    let c = norm(7, 4096).config();
    assert_eq!((c.grid_dim, c.block_dim.0), ((7, 1, 1), 1024));
    assert_eq!(norm(NORM_MANY_ROWS - 1, 4096).config().block_dim.0, 1024);
    // A prefill pass's: four loads a thread. 4096 values take 256 threads,
    // 8192 take 512; a narrow model's rows (SmolLM2-135M: 576) the fewest, 128.
    let c = norm(8192, 4096).config();
    assert_eq!((c.grid_dim, c.block_dim.0), ((8192, 1, 1), 256));
    assert_eq!(norm(NORM_MANY_ROWS, 8192).config().block_dim.0, 512);
    assert_eq!(norm(NORM_MANY_ROWS, 576).config().block_dim.0, 128);
    assert_eq!(norm(NORM_MANY_ROWS, 65536).config().block_dim.0, 1024);
    // An empty pass still launches one block (the kernels need a grid).
    assert_eq!(norm(0, 4096).config().grid_dim.0, 1);
    let silu = |n, inter| {
        SiluMul {
            gu: P,
            act: P,
            n,
            inter,
        }
        .config()
        .grid_dim
    };
    // 14336 values a row, 8 a thread: 7 blocks of 256; rows along y (the kernel strides past 65535); other widths one value a thread.
    assert_eq!(silu(8192, 14336), (7, 8192, 1));
    assert_eq!(silu(70_000, 100), (1, 65535, 1));
    assert_eq!(silu(1, 100), (1, 1, 1));
    let c = GemvSilu {
        x: P,
        w: P,
        act: P,
        k: 4096,
        inter: 14336,
        prefetch: 0,
    }
    .config();
    assert_eq!((c.grid_dim.0, c.block_dim.0), (1792, 256));
    let c = Embed {
        rows: 9,
        ids: PU,
        table: P,
        x: PF,
        hidden: 4096,
    }
    .config();
    assert_eq!(
        (c.grid_dim, c.block_dim.0, c.shared_mem_bytes),
        ((9, 1, 1), 256, 0)
    );
    let c = Gemv {
        x: P,
        w: P,
        y: ProductOut::Bf16(P),
        n: 1,
        k: 4096,
        out: 6144,
        prefetch: 0,
    }
    .config();
    assert_eq!((c.grid_dim.0, c.block_dim.0), (768, 256));
    let c = FillUniform {
        p: P,
        n: 1 << 30,
        seed: 3,
        lo: -1.0,
        hi: 1.0,
    }
    .config();
    assert_eq!((c.grid_dim.0, c.block_dim.0), (1024, 256));
    let c = SampleRows {
        rows: 4,
        logits: PF,
        draws: PI,
        ids: PU,
        vocab: 1000,
    }
    .config();
    assert_eq!((c.grid_dim.0, c.block_dim.0), (4, 1024));
}

#[test]
fn shared_memory_sizes_are_the_kernels_layouts() {
    // Llama-3-8B (head_dim 128, 4 query heads per KV head, bound 4):
    // K/V tiles 2·2·64·128·2 + scores 4·4·64 + reduction 4·512·4.
    assert_eq!(decode_smem(128, 4, false), 65_536 + 1_024 + 8_192);
    assert_eq!(decode_smem(128, 8, false), 83_968);
    assert_eq!(decode_smem(32, 1, false), 16_384 + 256 + 2_048);
    // fp8: each of the 4 warps' two stages of 16 K and 16 V scales on top.
    assert_eq!(
        decode_smem(128, 4, true),
        decode_smem(128, 4, false) + 4 * 2 * 32 * 4
    );
    assert_eq!(prefill_smem(128), (3 * 2 * 64 + 128) * 136 * 2);
    assert_eq!(prefill_smem(64), 73_728);
    // The prefill block is one warp per 16 query rows.
    assert_eq!(PREFILL_THREADS as usize, PREFILL_BQ / 16 * 32);
    // The warp-specialized one (sm_90a, head sizes 64 and 128): a producer and
    // two consumer warpgroups; 1 KiB for alignment, 3 stages of 128-key K and V
    // tiles (2 · 32 KiB at head_dim 128) with 2 · 128 scales each and two 8-byte
    // barriers; fp8 has 2 stages and two staging buffers of e4m3 K and V tiles
    // and scales.
    assert_eq!(PREFILL_WS_THREADS, 384);
    let ws = prefill_shape("sm_90a", 128, false);
    assert_eq!(ws.threads, 384);
    assert_eq!(ws.smem, 1024 + 3 * (65_536 + 1024 + 16));
    assert_eq!(
        prefill_shape("sm_90a", 128, true).smem,
        1024 + 2 * (65_536 + 1024 + 16) + 2 * (32_768 + 1024)
    );
    assert_eq!(
        prefill_shape("sm_90a", 64, false).smem,
        1024 + 3 * (32_768 + 1024 + 16)
    );
    // Within the 227 KiB a block may have on Hopper.
    for fp8 in [false, true] {
        assert!(prefill_shape("sm_90a", 128, fp8).smem <= 227 * 1024);
    }
    // Elsewhere (other head sizes, the portable target) the mma.sync kernel.
    for (arch, hd) in [("sm_90", 128), ("sm_90a", 32), ("sm_100", 64)] {
        let p = prefill_shape(arch, hd, false);
        assert_eq!((p.threads, p.smem), (PREFILL_THREADS, prefill_smem(hd)));
    }
}

#[test]
fn fp8_store_grid_is_runs_by_k_and_v_heads_with_a_thread_per_dim() {
    let c = KvFp8Store {
        runs: 3,
        kv: PF,
        run_starts: PI,
        slots: PI,
        cache: Dev::from_raw(0x5000),
        scales: PF,
        hkv: 8,
        hd: 128,
        block_size: 16,
    }
    .config();
    assert_eq!((c.grid_dim.0, c.grid_dim.1, c.block_dim.0), (3, 16, 128));
}

#[test]
fn fp8_store_runs_cut_where_the_block_changes() {
    // A prefill chunk from position 13 of a sequence on blocks 7, 2, 9 (bs 16):
    // slots 7*16+13.. then block 2 whole, then block 9's first 3.
    let mut slots: Vec<i32> = (13..16).map(|s| 7 * 16 + s).collect();
    slots.extend((0..16).map(|s| 2 * 16 + s));
    slots.extend((0..3).map(|s| 9 * 16 + s));
    assert_eq!(fp8_store_runs(&slots, 16), vec![0, 3, 19, 22]);
    // A decode step: one token per sequence, each its own run.
    assert_eq!(fp8_store_runs(&[5, 40, 17], 16), vec![0, 1, 2, 3]);
    // Two sequences in one block number order still cut between them (block 1, then 0).
    assert_eq!(fp8_store_runs(&[16, 17, 3], 16), vec![0, 2, 3]);
    // Nothing to store: no runs.
    assert_eq!(fp8_store_runs(&[], 16), vec![0]);
}
