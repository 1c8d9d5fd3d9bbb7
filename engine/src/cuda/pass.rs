//! One forward pass on the GPU: its metadata (token ids, positions, cache
//! slots, chunk descriptors, draws, block tables) uploaded in one copy, and
//! the kernels it queues, each through its typed launch ([`super::launch`]).
//! Nothing here waits or allocates, so the same code is captured into the
//! decode-step CUDA graphs.

use half::bf16;

use super::CudaBackend;
use super::device::ptr;
use super::error::{CudaError, DriverContext};
use super::launch::{
    self, AddRmsnorm, AttnCombine, DecodeAttn, Dev, Embed, KvFp8Store, KvRead, PrefillAttn,
    ProductOut, RopeKv, SampleRows, fp8_store_runs,
};
use super::{decode_splits, splits_aiming_at};
use crate::backend::{LayerHook, SeqChunk};
use crate::block_manager::blocks_for;
use crate::error::{EngineError, Result};
use crate::sampling::TokenDraw;

/// Offsets (in i32 elements) of one pass's metadata sections.
pub(super) struct Meta {
    ids: usize,
    pos: usize,
    slots: usize,
    last_rows: usize,
    q_off: usize,
    q_pos: usize,
    q_len: usize,
    seq_lens: usize,
    /// Five 32-bit words per sequence: see `sample_rows` in kernels/sampling.cu.
    draws: usize,
    /// One word: the block tables' row stride.
    stride: usize,
    /// An fp8 cache: the `kv_fp8_store` runs (`Pass::runs + 1` starts; room for `n + 1`).
    runs: usize,
    tables: usize,
    table_stride: usize,
}

/// Shape of one pass, as the kernels are launched for it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pass {
    /// Token rows.
    n: usize,
    /// Sequences (chunks).
    s: usize,
    /// Every chunk is one token: paged decode attention.
    decode: bool,
    /// Longest chunk (prefill attention's grid).
    max_q: usize,
    /// An fp8 cache: runs of tokens `kv_fp8_store` writes (0 for bf16).
    runs: usize,
    /// Logits for every token row (`n` ≤ `max_seqs`), not each chunk's last.
    every_row: bool,
}

impl Pass {
    /// The same pass computing the logits of every token row, in order (the
    /// `last_h` and `logits` buffers hold `max_seqs` rows: the caller keeps
    /// `n` within that).
    pub(super) fn with_every_row(self) -> Pass {
        Pass {
            every_row: true,
            ..self
        }
    }
}

impl CudaBackend {
    /// Writes the pass's metadata into pinned memory and copies it to the GPU;
    /// with `pad_to`, one-token rows for the scratch block fill the batch up to
    /// that many sequences (a graph bucket).
    pub(super) fn upload_meta(
        &mut self,
        chunks: &[SeqChunk<'_>],
        draws: &[TokenDraw],
        pad_to: Option<usize>,
    ) -> Result<(Meta, Pass)> {
        // The KV imported so far is in before this pass reads the cache.
        self.kv.order_after_imports()?;
        let real_n: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let s = pad_to.unwrap_or(chunks.len()).max(chunks.len());
        let n = real_n + (s - chunks.len());
        let bs = self.kv.layout().block_size;
        let table_stride = chunks
            .iter()
            .map(|c| blocks_for(c.start + c.tokens.len(), bs))
            .max()
            .unwrap_or(1)
            .max(1);
        if n > self.limits.max_tokens || s > self.limits.max_seqs {
            return Err(CudaError::Unsupported(format!(
                "a pass of {n} tokens in {s} sequences exceeds the backend's limits ({} tokens, {} sequences)",
                self.limits.max_tokens, self.limits.max_seqs
            ))
            .into());
        }
        if table_stride > self.max_table {
            return Err(EngineError::InvalidInput(format!(
                "block table of {table_stride} blocks is longer than any sequence can need"
            )));
        }
        let m = Meta {
            ids: 0,
            pos: n,
            slots: 2 * n,
            last_rows: 3 * n,
            q_off: 3 * n + s,
            q_pos: 3 * n + 2 * s,
            q_len: 3 * n + 3 * s,
            seq_lens: 3 * n + 4 * s,
            draws: 3 * n + 5 * s,
            stride: 3 * n + 10 * s,
            // Before the tables, whose length varies from step to step: a captured
            // graph's launches keep the offsets they were captured with.
            runs: 3 * n + 10 * s + 1,
            tables: 4 * n + 10 * s + 2,
            table_stride,
        };
        let total = m.tables + s * table_stride;
        debug_assert!(total <= self.meta_cap);
        let scratch = self.kv.scratch_block();
        let host = self.meta_host.as_mut_slice().op("pinned buffer")?;
        let mut row = 0usize;
        for i in 0..s {
            let (len, start) = match chunks.get(i) {
                Some(c) => {
                    for (j, &t) in c.tokens.iter().enumerate() {
                        let p = c.start + j;
                        host[m.ids + row] = t as i32;
                        host[m.pos + row] = p as i32;
                        host[m.slots + row] = (c.block_table[p / bs] as usize * bs + p % bs) as i32;
                        row += 1;
                    }
                    let dst = &mut host[m.tables + i * table_stride..][..table_stride];
                    let used = blocks_for(c.start + c.tokens.len(), bs);
                    for (d, &b) in dst.iter_mut().zip(c.block_table.iter().take(used)) {
                        *d = b as i32;
                    }
                    (c.tokens.len(), c.start)
                }
                None => {
                    // Padding: token 0 at position 0, its K/V into the scratch block.
                    host[m.ids + row] = 0;
                    host[m.pos + row] = 0;
                    host[m.slots + row] = (scratch as usize * bs) as i32;
                    row += 1;
                    host[m.tables + i * table_stride..][..table_stride].fill(scratch as i32);
                    (1, 0)
                }
            };
            host[m.last_rows + i] = (row - 1) as i32;
            host[m.q_off + i] = (row - len) as i32;
            host[m.q_pos + i] = start as i32;
            host[m.q_len + i] = len as i32;
            host[m.seq_lens + i] = (start + len) as i32;
            let d = draws.get(i).copied().unwrap_or(TokenDraw::GREEDY);
            let w = &mut host[m.draws + 5 * i..][..5];
            w[0] = d.temperature.to_bits() as i32;
            w[1] = d.top_k.min(i32::MAX as u32) as i32;
            w[2] = d.top_p.to_bits() as i32;
            w[3] = d.min_p.to_bits() as i32;
            w[4] = d.u01.to_bits() as i32;
        }
        host[m.stride] = table_stride as i32;
        let decode = chunks.iter().all(|c| c.tokens.len() == 1);
        let runs = if self.bufs.kv_f32.is_none() {
            0
        } else {
            // A decode step's rows are one run each, padding rows too (their scratch
            // block is garbage anyway), so a captured graph's grid fits every step.
            let starts = if decode {
                (0..=n as i32).collect()
            } else {
                fp8_store_runs(&host[m.slots..m.slots + n], bs)
            };
            host[m.runs..m.runs + starts.len()].copy_from_slice(&starts);
            starts.len() - 1
        };
        let dev = ptr(&self.bufs.meta, &self.gpu.compute);
        // SAFETY: `meta` holds `meta_cap >= total` elements; the pinned source is not
        // written again before this pass synchronizes at its end.
        unsafe { self.gpu.upload_to(&host[..total], dev) }?;
        let pass = Pass {
            n,
            s,
            decode,
            max_q: chunks.iter().map(|c| c.tokens.len()).max().unwrap_or(1),
            runs,
            every_row: false,
        };
        Ok((m, pass))
    }

    /// Queues every kernel of one pass on the compute stream (also while a graph
    /// is being captured: nothing here waits or allocates device memory).
    pub(super) fn enqueue(
        &self,
        m: &Meta,
        p: Pass,
        mut on_layer: Option<LayerHook<'_>>,
    ) -> Result<()> {
        let c = &self.model.config;
        let g = &self.gpu;
        let st = &g.compute;
        let b = &self.bufs;
        let (n, s) = (p.n, p.s);
        let (h, hd, hq, hkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (qd, inter) = (hq * hd, c.intermediate_size);
        let qkvw = (hq + 2 * hkv) * hd;
        let block_size = self.kv.layout().block_size;
        let meta = Dev::<i32>::of(&b.meta, st);
        let (x, delta) = (Dev::<f32>::of(&b.x, st), Dev::<f32>::of(&b.delta, st));
        let (hb, qkv, q, attn) = (
            Dev::<bf16>::of(&b.h, st),
            Dev::<bf16>::of(&b.qkv, st),
            Dev::<bf16>::of(&b.q, st),
            Dev::<bf16>::of(&b.attn, st),
        );
        let (gu, act) = (Dev::<bf16>::of(&b.gu, st), Dev::<bf16>::of(&b.act, st));
        let eps = c.rms_norm_eps as f32;
        let window = c.sliding_window.unwrap_or(0);
        let scale = 1.0 / (hd as f32).sqrt();
        let inv_freq = Dev::of(&b.inv_freq, st);
        let splits = match self.decode_blocks {
            Some(blocks) => splits_aiming_at(blocks, s, hkv),
            None => decode_splits(s, hkv, self.gpu.decode_wave),
        };
        // Programmatic dependent launches, except around the export hook's events.
        let pdl = g.pdl && on_layer.is_none();

        // SAFETY (every launch below): the pointers are the backend's own buffers, sized
        // at construction for `max_tokens`/`max_seqs` (checked in `upload_meta`), the
        // cache layers (one scratch block beyond the layout), the weights of the
        // model's shape, and the metadata just uploaded, whose sections hold what each
        // launch's documentation asks for `n` tokens in `s` sequences.
        let embed = Embed {
            rows: n,
            ids: meta.add(m.ids).cast(),
            table: Dev::of(&self.model.embed, st),
            x,
            hidden: h,
        };
        unsafe { launch::launch(g, &embed, false) }?;
        self.mark("embed")?;

        let (pos, slots) = (meta.add(m.pos), meta.add(m.slots));
        // Above one row the o and down products add into the residual stream `x`
        // in cuBLAS's epilogue, so the norm after each only reads it; one row's
        // `gemv` writes `delta`, which the norm adds.
        let o_adds = g.adds_to_output(n, qd);
        let down_adds = g.adds_to_output(n, inter);
        let into_residual = |adds| residual_out(adds, x, delta);
        for (li, layer) in self.model.layers.iter().enumerate() {
            let norm = AddRmsnorm {
                rows: n,
                x,
                delta: if li == 0 || down_adds {
                    Dev::NULL
                } else {
                    delta
                },
                rows_map: Dev::NULL,
                w: Dev::of(&layer.input_norm, st),
                out: hb,
                hidden: h,
                eps,
            };
            unsafe { launch::launch(g, &norm, pdl) }?;
            self.mark("input norm")?;
            let w = Dev::of(&layer.qkv, st);
            g.gemm_with(hb, w, ProductOut::Bf16(qkv), n, h, qkvw, pdl)?;
            self.mark("qkv product")?;

            let (cache, cache8, scales) = self.kv.write_target(li);
            let kv_out = b.kv_f32.as_ref().map_or(Dev::NULL, |k| Dev::of(k, st));
            let rope = RopeKv {
                tokens: n,
                qkv,
                bias: layer
                    .qkv_bias
                    .as_ref()
                    .map_or(Dev::NULL, |bb| Dev::of(bb, st)),
                pos,
                slots,
                inv_freq,
                q_out: q,
                cache,
                kv_out,
                hq,
                hkv,
                hd,
                block_size,
            };
            unsafe { launch::launch(g, &rope, pdl) }?;
            self.mark("rope_kv")?;
            if p.runs > 0 {
                let store = KvFp8Store {
                    runs: p.runs,
                    kv: kv_out,
                    run_starts: meta.add(m.runs),
                    slots,
                    cache: cache8,
                    scales,
                    hkv,
                    hd,
                    block_size,
                };
                unsafe { launch::launch(g, &store, pdl) }?;
                self.mark("kv_fp8_store")?;
            }
            let cache = self.kv.read(li);
            if let Some(hook) = on_layer.as_mut() {
                hook(li, &self.kv)?;
            }

            let tables = meta.add(m.tables);
            if p.decode {
                let seq_lens = meta.add(m.seq_lens);
                let (part_o, part_ml) = (Dev::of(&b.part_o, st), Dev::of(&b.part_ml, st));
                let attend = DecodeAttn {
                    seqs: s,
                    smem: match cache {
                        KvRead::Bf16(_) => g.decode_smem,
                        KvRead::Fp8 { .. } => g.decode_smem_fp8,
                    },
                    q,
                    cache,
                    tables,
                    table_stride: meta.add(m.stride),
                    seq_lens,
                    part_o,
                    part_ml,
                    out: attn,
                    hq,
                    hkv,
                    block_size,
                    max_splits: splits,
                    window,
                    scale,
                };
                unsafe { launch::launch(g, &attend, pdl) }?;
                self.mark("decode_attn")?;
                // One split a sequence: decode_attn wrote `attn` itself.
                if splits > 1 {
                    let combine = AttnCombine {
                        seqs: s,
                        part_o,
                        part_ml,
                        seq_lens,
                        out: attn,
                        hq,
                        hd,
                        max_splits: splits,
                    };
                    unsafe { launch::launch(g, &combine, pdl) }?;
                    self.mark("attn_combine")?;
                }
            } else {
                let attend = PrefillAttn {
                    chunks: s,
                    max_q: p.max_q,
                    q,
                    cache,
                    tmap: self.kv.tensor_map(li),
                    tables,
                    table_stride: m.table_stride,
                    q_off: meta.add(m.q_off),
                    q_pos: meta.add(m.q_pos),
                    q_len: meta.add(m.q_len),
                    out: attn,
                    hq,
                    hkv,
                    block_size,
                    window,
                    scale,
                    shape: match cache {
                        KvRead::Bf16(_) => g.prefill,
                        KvRead::Fp8 { .. } => g.prefill_fp8,
                    },
                };
                unsafe { launch::launch(g, &attend, pdl) }?;
                self.mark("prefill_attn")?;
            }

            let w = Dev::of(&layer.o, st);
            g.gemm_with(attn, w, into_residual(o_adds), n, qd, h, pdl)?;
            self.mark("o product")?;
            let norm = AddRmsnorm {
                rows: n,
                x,
                delta: if o_adds { Dev::NULL } else { delta },
                rows_map: Dev::NULL,
                w: Dev::of(&layer.post_norm, st),
                out: hb,
                hidden: h,
                eps,
            };
            unsafe { launch::launch(g, &norm, pdl) }?;
            self.mark("post-attention norm")?;
            let w = Dev::of(&layer.gate_up, st);
            if g.fuses_silu(n, h) {
                g.gemv_silu(hb, w, act, h, inter, pdl)?;
                self.mark("gate_up product, SiLU")?;
            } else {
                g.gemm_with(hb, w, ProductOut::Bf16(gu), n, h, 2 * inter, pdl)?;
                self.mark("gate_up product")?;
                g.silu_mul(gu, act, n, inter, pdl)?;
                self.mark("SiLU")?;
            }
            let w = Dev::of(&layer.down, st);
            g.gemm_with(act, w, into_residual(down_adds), n, inter, h, pdl)?;
            self.mark("down product")?;
        }

        let last_h = Dev::<bf16>::of(&b.last_h, st);
        // Each chunk's last row, or every row.
        let (rows, rows_map) = if p.every_row {
            (n, Dev::NULL)
        } else {
            (s, meta.add(m.last_rows))
        };
        // The last layer's output is in `delta`, still to be added (unless no layer
        // ran, or it was added in the down product's epilogue).
        let final_norm = AddRmsnorm {
            rows,
            x,
            delta: if self.model.layers.is_empty() || down_adds {
                Dev::NULL
            } else {
                delta
            },
            rows_map,
            w: Dev::of(&self.model.norm, st),
            out: last_h,
            hidden: h,
            eps,
        };
        unsafe { launch::launch(g, &final_norm, pdl) }?;
        self.mark("final norm")?;
        let head = self.model.lm_head.as_ref().unwrap_or(&self.model.embed);
        let logits = ProductOut::F32(Dev::of(&b.logits, st));
        g.gemm_with(
            last_h,
            Dev::of(head, st),
            logits,
            rows,
            h,
            c.vocab_size,
            pdl,
        )?;
        self.mark("lm_head product")?;
        Ok(())
    }

    /// Runs each of a layer's products, and the lm_head's, once at every row
    /// count whose algorithm is tuned (`gemm_tune`: the decode buckets and a
    /// full pass), so that their candidates are timed now and not in the first
    /// request whose pass has that many rows (a 24-row local prefill on a
    /// decode node waited 324 ms for it on an H100, and 5.8 ms once tuned at
    /// start on an H200: docs/GPU_BENCH.md, fifteenth session). Every
    /// layer's products have the first's shapes. Only the pass's buffers are
    /// written, and every pass writes them before it reads them.
    pub(super) fn tune_products(&self) -> Result<()> {
        let g = &self.gpu;
        let Some(layer) = self.model.layers.first() else {
            return Ok(());
        };
        if !g.gemm_tune() {
            return Ok(());
        }
        let c = &self.model.config;
        let st = &g.compute;
        let b = &self.bufs;
        let (h, hd, hq, hkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (qd, inter) = (hq * hd, c.intermediate_size);
        let qkvw = (hq + 2 * hkv) * hd;
        let (x, delta) = (Dev::<f32>::of(&b.x, st), Dev::<f32>::of(&b.delta, st));
        let (hb, qkv, attn) = (
            Dev::<bf16>::of(&b.h, st),
            Dev::<bf16>::of(&b.qkv, st),
            Dev::<bf16>::of(&b.attn, st),
        );
        let (gu, act) = (Dev::<bf16>::of(&b.gu, st), Dev::<bf16>::of(&b.act, st));
        let last_h = Dev::<bf16>::of(&b.last_h, st);
        let logits = Dev::<f32>::of(&b.logits, st);
        let head = self.model.lm_head.as_ref().unwrap_or(&self.model.embed);
        let (max_tokens, max_seqs) = (self.limits.max_tokens, self.limits.max_seqs);
        let started = std::time::Instant::now();
        let rows = super::GRAPH_BUCKETS.iter().copied().chain([max_tokens]);
        for n in rows.filter(|&n| n <= max_tokens) {
            // As `enqueue`: the o and down products add into `x` where the pass's do.
            let into_residual = |k| residual_out(g.adds_to_output(n, k), x, delta);
            let w = Dev::of(&layer.qkv, st);
            g.gemm_with(hb, w, ProductOut::Bf16(qkv), n, h, qkvw, false)?;
            let w = Dev::of(&layer.o, st);
            g.gemm_with(attn, w, into_residual(qd), n, qd, h, false)?;
            if !g.fuses_silu(n, h) {
                let w = Dev::of(&layer.gate_up, st);
                g.gemm_with(hb, w, ProductOut::Bf16(gu), n, h, 2 * inter, false)?;
            }
            let w = Dev::of(&layer.down, st);
            g.gemm_with(act, w, into_residual(inter), n, inter, h, false)?;
            if n <= max_seqs {
                let w = Dev::of(head, st);
                g.gemm_with(
                    last_h,
                    w,
                    ProductOut::F32(logits),
                    n,
                    h,
                    c.vocab_size,
                    false,
                )?;
            }
        }
        g.sync()?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "timed cuBLASLt's candidates for the products of tuned row counts"
        );
        Ok(())
    }

    /// Queues the sampling of each of the pass's `s` rows of logits into `ids_out`.
    pub(super) fn enqueue_sample(&self, m: &Meta, p: Pass) -> Result<()> {
        let st = &self.gpu.compute;
        let sample = SampleRows {
            rows: p.s,
            logits: Dev::of(&self.bufs.logits, st),
            draws: Dev::<i32>::of(&self.bufs.meta, st).add(m.draws),
            ids: Dev::of(&self.bufs.ids_out, st),
            vocab: self.model.config.vocab_size,
        };
        // SAFETY: `logits` holds `s` rows of `vocab` f32, `draws` 5 words per row
        // (uploaded with the metadata), `ids` room for `s` ids.
        unsafe { launch::launch(&self.gpu, &sample, self.gpu.pdl) }?;
        self.mark("sample")?;
        Ok(())
    }
}

/// Where the o and down products of a pass go: added into the residual stream
/// `x` (cuBLAS's epilogue), or written to `delta` for the norm after them to add.
fn residual_out(adds: bool, x: Dev<f32>, delta: Dev<f32>) -> ProductOut {
    if adds {
        ProductOut::AddF32(x)
    } else {
        ProductOut::F32(delta)
    }
}
