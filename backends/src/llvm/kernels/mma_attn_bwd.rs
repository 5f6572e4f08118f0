//! Attention's backward on tensor cores (`Kernel::AttentionBackward` on the GPU with
//! `tensor_cores`, head sizes of `mma_attention_fits`): FlashAttention-2's arithmetic, as
//! `super::attn_tiles` lays it out for the CPU, in `mma.sync.m16n8k16` tiles (bf16
//! operands, f32 sums).
//!
//! A 256-thread block takes `MMA_ATTN_ROWS` (128) rows of the result, warp `w` rows
//! `16w..16w + 16`: query rows of one `(b, h)` for the log-sum-exp and `dq`, key rows of one
//! `(b, KV head)` for `dk` and `dv`. The warp's operands on those rows stay in registers as
//! `mma`'s left fragments (`A_s`: the query, or the keys; `A_p`: `dout`, or the values). The
//! other side goes through shared memory `MMA_ATTN_KEYS` (64) rows at a time, rounded to
//! bf16 and row-chunk-permuted (`stage_fetch`, `stage_put`): `B_s` (the keys, or the query
//! rows of each head that reads the KV head) and `B_p` (the values, or `dout`). The query is
//! pre-scaled by `scale·log2 e` before it is rounded, on either side, so scores are in the
//! log2 domain and every kernel (the forward's too) forms them from the same rounded
//! products. Per step, each warp:
//!
//! - `S = A_s·B_sᵀ` (`mma_tile`), so a key unit works on `Sᵀ`;
//! - the mask: key `j` is visible to query `t` where `j ≤ positions[b, t]` (and `j < S`,
//!   `t < T`);
//! - the log-sum-exp: a running max `m` and sum `l` per row, `lse = ln 2·m + ln l`;
//! - otherwise `P = 2^(S − lse·log2 e)` where visible, 0 elsewhere; for `dq` and `dk`,
//!   `dP = A_p·B_pᵀ` and `dS = P ∘ (dP − delta)` (0 where not visible, whatever `delta`);
//! - the update `acc += C·X` (`mma_tile`, `C` from the accumulators as a left operand,
//!   `acc_frag`): `C = dS`, `X = B_s` for `dq` and `dk`; `C = P`, `X = B_p` for `dv`.
//!
//! Rows end times `scale` for `dq`, and times `ln 2` for `dk` (whose update read the
//! pre-scaled query). Query units take the keys up to the last any of the block's rows
//! sees, each warp skipping the steps past its own rows' last; key units take the query
//! rows of each head in steps whose per-column statistics (`lse`, `delta`, the last key the
//! column's query sees) go through shared memory first, so that a step no column of which
//! sees the block's first key is skipped whole, and one that sees none of a warp's rows by
//! that warp.

use inkwell::values::{FloatValue, IntValue, PointerValue};
use inkwell::{FloatPredicate, IntPredicate};

use egret_ir::AttnGrad;
use egret_runtime::plan::ElemType;

use super::{
    acc_frag, barrier, be, block_grid, block_max, dynamic_shared, fast_exp2, mma_attn_stage_bytes,
    mma_tile, online_softmax, pack_bf16x2, shared_f32, shared_i32, smem_word, stage_fetch,
    stage_put, stage_vec_ok, tile_lane_words, warp_fold, warp_max, Av, BlockGrid, Fb,
    MMA_ATTN_KEYS, MMA_ATTN_ROWS, R,
};
use crate::kernel::AttnDims;

/// The operands only the gradients read: values, `dout`, `lse`, `delta`, and which
/// gradient.
pub(super) struct GradOps<'a, 'ctx> {
    pub v: &'a Av<'ctx>,
    pub dout: &'a Av<'ctx>,
    pub lse: &'a Av<'ctx>,
    pub delta: &'a Av<'ctx>,
    pub wrt: AttnGrad,
}

/// Per-column statistics a key unit keeps in shared memory for a step: `lse·log2 e` and
/// `delta` (and, in an i32 array, the column's last visible key), `MMA_ATTN_KEYS` each.
const COL_STATS: u32 = 2 * MMA_ATTN_KEYS as u32;

/// The backward on tensor cores (see the module doc): result `optr` (element type `oe`),
/// `[q, k, positions]`, the gradient's operands (`None`: the log-sum-exp).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<'ctx>(
    fb: &Fb<'_, 'ctx>,
    optr: PointerValue<'ctx>,
    oe: ElemType,
    [qa, ka, pa]: [&Av<'ctx>; 3],
    grad: Option<&GradOps<'_, 'ctx>>,
    d: &AttnDims,
    scale: f64,
    [bv, tv, sv]: [IntValue<'ctx>; 3],
) -> R<()> {
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let cmp = |p, a, b| fb.b.build_int_compare(p, a, b, "cmp").map_err(be);
    let lt = |a, b| cmp(IntPredicate::SLT, a, b);
    let i32t = fb.ctx.i32_type();
    let log2e = std::f64::consts::LOG2_E;
    let keys = MMA_ATTN_KEYS;
    let wrt = grad.map(|g| g.wrt);
    let key_units = matches!(wrt, Some(AttnGrad::K | AttnGrad::V));
    let rep = d.h / d.hkv;
    // The two sides: the unit's rows (`A_s`, `A_p`: tensor, width) and the staged ones
    // (`B_s` of width `d`, `B_p` of width `dv`).
    let (a_s, a_p, b_s, b_p) = match grad {
        None => (qa, None, ka, None),
        Some(g) if key_units => (ka, Some(g.v), qa, Some(g.dout)),
        Some(g) => (qa, Some(g.dout), ka, Some(g.v)),
    };
    let wants_dp = matches!(wrt, Some(AttnGrad::Q | AttnGrad::K));
    let a_p = if wants_dp { a_p } else { None };
    // The query is the scores' pre-scaled operand on both sides, in registers (query units)
    // or as staged (key units), so that every kernel of the forward and the backward forms
    // its scores from the same rounded products (`round(q·scale·log2 e)·round(k)`).
    let (a_factor, b_factor) = if key_units {
        (1.0, scale * log2e)
    } else {
        (scale * log2e, 1.0)
    };
    // The update's staged rows, the result's width and the factor it is stored with (`dk`'s
    // update reads the staged, pre-scaled query).
    let (upd_b_p, width, out_scale) = match wrt {
        None => (false, 0, 1.0),
        Some(AttnGrad::V) => (true, d.dv, 1.0),
        Some(AttnGrad::K) => (false, d.d, 1.0 / log2e),
        Some(AttnGrad::Q) => (false, d.d, scale),
    };
    // Rows of the unit side and of the staged side.
    let (rows_len, other_len) = if key_units { (sv, tv) } else { (tv, sv) };
    let heads = if key_units { d.hkv } else { d.h };
    let tiles = fb.ceil_div(rows_len, c(MMA_ATTN_ROWS))?;
    let units = fb.mul(fb.mul(bv, c(heads))?, tiles)?;
    let BlockGrid {
        lane,
        blk,
        nblk,
        iters,
    } = block_grid(fb, units)?;
    let smem = dynamic_shared(fb, mma_attn_stage_bytes(d));
    let cols_s = shared_f32(fb, "cols", COL_STATS);
    let lims_s = shared_i32(fb, "lims", MMA_ATTN_KEYS as u32);
    let ends_s = shared_f32(fb, "ends", 8);
    let bp_word = c(keys * d.d / 2);
    let warp = sdiv(lane, c(32), "warp")?;
    let wl = srem(lane, c(32), "wl")?;
    let (g, q) = (sdiv(wl, c(4), "g")?, srem(wl, c(4), "q")?);
    let bs_t = tile_lane_words(fb, wl, d.d, false)?;
    let bs_n = tile_lane_words(fb, wl, d.d, true)?;
    let bp_t = tile_lane_words(fb, wl, d.dv, false)?;
    let bp_n = tile_lane_words(fb, wl, d.dv, true)?;
    let (bs_vec, bp_vec) = (
        stage_vec_ok(fb, b_s)?,
        match b_p {
            Some(b) => stage_vec_ok(fb, b)?,
            None => fb.ctx.bool_type().const_zero(),
        },
    );
    let islot = || fb.slot(i32t.into());
    let fslot = || fb.slot(fb.f32t.into());
    let afr_s: Vec<PointerValue> = (0..d.d / 16 * 4).map(|_| islot()).collect::<R<_>>()?;
    let afr_p: Vec<PointerValue> = match a_p {
        Some(_) => (0..d.dv / 16 * 4).map(|_| islot()).collect::<R<_>>()?,
        None => vec![],
    };
    let sacc: Vec<PointerValue> = (0..keys / 8 * 4).map(|_| fslot()).collect::<R<_>>()?;
    let pacc: Vec<PointerValue> = match a_p {
        Some(_) => (0..keys / 8 * 4).map(|_| fslot()).collect::<R<_>>()?,
        None => vec![],
    };
    let acc: Vec<PointerValue> = (0..width / 8 * 4).map(|_| fslot()).collect::<R<_>>()?;
    // Per row of the lane (g, g + 8), query units: the end of its visible keys, and its
    // `lse·log2 e` and `delta` (gradients) or running max and sum (log-sum-exp).
    let ends = [fb.slot(fb.i64t.into())?, fb.slot(fb.i64t.into())?];
    let (rs1, rs2) = ([fslot()?, fslot()?], [fslot()?, fslot()?]);
    let ninf = fb.f32c(f64::NEG_INFINITY);
    let geti = |p: PointerValue<'ctx>| -> R<IntValue<'ctx>> {
        Ok(fb.b.build_load(i32t, p, "iv").map_err(be)?.into_int_value())
    };
    let frag = |s: &[PointerValue<'ctx>], ks: i64| -> R<[IntValue<'ctx>; 4]> {
        let a = [0, 1, 2, 3].map(|x| s[(ks * 4) as usize + x]);
        Ok([geti(a[0])?, geti(a[1])?, geti(a[2])?, geti(a[3])?])
    };
    fb.for_range(c(0), iters, |fb, it| {
        let unit = fb.add(blk, fb.mul(it, nblk)?)?;
        let idx = fb.decompose(unit, &[tiles, bv, c(heads)])?;
        // Query units: the last tiles (the most keys) first; key units: the first.
        let tile = if key_units {
            idx[0]
        } else {
            fb.b.build_int_sub(
                fb.b.build_int_sub(tiles, c(1), "t1").map_err(be)?,
                idx[0],
                "tt",
            )
            .map_err(be)?
        };
        let (bi, hx) = (idx[1], idx[2]);
        let r0 = fb.mul(tile, c(MMA_ATTN_ROWS))?;
        let wr0 = fb.add(r0, fb.mul(warp, c(16))?)?;
        let rows = [fb.add(wr0, g)?, fb.add(wr0, fb.add(g, c(8))?)?];
        // The unit's operands as left fragments: rows `rows`, pairs of elements `2q`, `2q + 8`
        // of each 16-element k step, times `factor`, 0 past the rows' end.
        let load_frags = |av: &Av<'ctx>, n: i64, factor: f64, slots: &[PointerValue<'ctx>]| {
            for ks in 0..n / 16 {
                for (x, (rr, kofs)) in [(0, 0), (1, 0), (0, 8), (1, 8)].into_iter().enumerate() {
                    let mut pair = [fb.f32c(0.0); 2];
                    for (j, v) in pair.iter_mut().enumerate() {
                        let out = fb.slot(fb.f32t.into())?;
                        fb.set(out, fb.f32c(0.0))?;
                        let r = rows[rr];
                        fb.if_else(
                            lt(r, rows_len)?,
                            |fb| {
                                let at = fb.at(av, &[(0, bi), (1, hx), (2, r)])?;
                                let col = fb.add(fb.mul(q, c(2))?, c(16 * ks + kofs + j as i64))?;
                                let x =
                                    fb.load_float(av, fb.add(at, fb.mul(col, av.strides[3])?)?)?;
                                fb.set(out, fb.fmul(x, fb.f32c(factor))?)
                            },
                            |_| Ok(()),
                        )?;
                        *v = fb.get(out)?;
                    }
                    let w = pack_bf16x2(fb, pair[0], pair[1])?;
                    fb.b.build_store(slots[(ks * 4) as usize + x], w)
                        .map_err(be)?;
                }
            }
            R::Ok(())
        };
        load_frags(a_s, d.d, a_factor, &afr_s)?;
        if let Some(ap) = a_p {
            load_frags(ap, d.dv, 1.0, &afr_p)?;
        }
        for a in &acc {
            fb.set(*a, fb.f32c(0.0))?;
        }
        // Stage `B_s` (and `B_p` where read) rows `o0..` of head `hb`.
        let stage = |fb: &Fb<'_, 'ctx>, hb: IntValue<'ctx>, o0: IntValue<'ctx>| -> R<()> {
            let base_s = fb.at(b_s, &[(0, bi), (1, hb)])?;
            let vs = stage_fetch(fb, lane, b_s, base_s, bs_vec, d.d, o0, other_len)?;
            let vp = match b_p {
                Some(bp) if wrt.is_some() => {
                    let base_p = fb.at(bp, &[(0, bi), (1, hb)])?;
                    Some(stage_fetch(
                        fb, lane, bp, base_p, bp_vec, d.dv, o0, other_len,
                    )?)
                }
                _ => None,
            };
            if b_factor != 1.0 {
                for v in &vs {
                    fb.set(*v, fb.fmul(fb.get(*v)?, fb.f32c(b_factor))?)?;
                }
            }
            stage_put(fb, lane, smem, &vs, c(0), d.d)?;
            if let Some(vp) = vp {
                stage_put(fb, lane, smem, &vp, bp_word, d.dv)?;
            }
            Ok(())
        };
        // The products of a staged step into `sacc` (and `pacc`).
        let products = |fb: &Fb<'_, 'ctx>| -> R<()> {
            for a in sacc.iter().chain(&pacc) {
                fb.set(*a, fb.f32c(0.0))?;
            }
            mma_tile(
                fb,
                smem,
                c(0),
                &bs_t,
                d.d,
                false,
                &|ks| frag(&afr_s, ks),
                &sacc,
            )?;
            if a_p.is_some() {
                let a = |ks| frag(&afr_p, ks);
                mma_tile(fb, smem, bp_word, &bp_t, d.dv, false, &a, &pacc)?;
            }
            Ok(())
        };
        // Accumulator `x` of tile `nt` (row `g + 8(x/2)`, column `8nt + 2q + x%2`): with its
        // row's or column's `lse·log2 e` and `delta` and whether it is visible, `P` (and for
        // `dq`, `dk` then `dS`) in `sacc`; then the update.
        let update =
            |fb: &Fb<'_, 'ctx>,
             at: &dyn Fn(i64, usize) -> R<(IntValue<'ctx>, FloatValue<'ctx>, FloatValue<'ctx>)>|
             -> R<()> {
                for nt in 0..keys / 8 {
                    for x in 0..4usize {
                        let (seen, l2, delta) = at(nt, x)?;
                        let slot = sacc[(nt * 4) as usize + x];
                        let s = fb.get(slot)?;
                        let p = fast_exp2(fb, fb.b.build_float_sub(s, l2, "z").map_err(be)?)?;
                        let v = if a_p.is_some() {
                            let dp = fb.get(pacc[(nt * 4) as usize + x])?;
                            fb.fmul(p, fb.b.build_float_sub(dp, delta, "dd").map_err(be)?)?
                        } else {
                            p
                        };
                        fb.set(slot, fb.fsel(seen, v, fb.f32c(0.0))?)?;
                    }
                }
                let (words, n, base) = if upd_b_p {
                    (&bp_n, d.dv, bp_word)
                } else {
                    (&bs_n, d.d, c(0))
                };
                let a = |kk| acc_frag(fb, &sacc, kk);
                mma_tile(fb, smem, base, words, n, true, &a, &acc)
            };
        if key_units {
            // Column statistics of query rows `t0..t0 + keys` of head `hi`, by threads
            // `0..keys`.
            let cols = |fb: &Fb<'_, 'ctx>, hi: IntValue<'ctx>, t0: IntValue<'ctx>| -> R<()> {
                let Some(gr) = grad else { return Ok(()) };
                fb.if_else(
                    lt(lane, c(keys))?,
                    |fb| {
                        let t = fb.add(t0, lane)?;
                        let (l2, dl, lim) = (fslot()?, fslot()?, fb.slot(fb.i64t.into())?);
                        fb.set(l2, fb.f32c(0.0))?;
                        fb.set(dl, fb.f32c(0.0))?;
                        fb.b.build_store(lim, c(-1)).map_err(be)?;
                        fb.if_else(
                            lt(t, tv)?,
                            |fb| {
                                let row = [(0, bi), (1, hi), (2, t)];
                                let lse = fb.load_f32(gr.lse.ptr, fb.at(gr.lse, &row)?)?;
                                fb.set(l2, fb.fmul(lse, fb.f32c(log2e))?)?;
                                fb.set(dl, fb.load_f32(gr.delta.ptr, fb.at(gr.delta, &row)?)?)?;
                                let p = fb.load(pa, fb.at(pa, &[(0, bi), (1, t)])?)?;
                                let last = fb.b.build_int_sub(sv, c(1), "sl").map_err(be)?;
                                let p = fb.imin(fb.imax(p.into_int_value(), c(-1))?, last)?;
                                fb.b.build_store(lim, p).map_err(be)?;
                                Ok(())
                            },
                            |_| Ok(()),
                        )?;
                        fb.store_f32(cols_s, lane, fb.get(l2)?)?;
                        fb.store_f32(cols_s, fb.add(lane, c(keys))?, fb.get(dl)?)?;
                        let lim = fb.b.build_load(fb.i64t, lim, "lim").map_err(be)?;
                        let lim =
                            fb.b.build_int_truncate(lim.into_int_value(), i32t, "l32")
                                .map_err(be)?;
                        fb.b.build_store(smem_word(fb, lims_s, lane)?, lim)
                            .map_err(be)?;
                        Ok(())
                    },
                    |_| Ok(()),
                )
            };
            let col_lim = |fb: &Fb<'_, 'ctx>, col: IntValue<'ctx>| -> R<IntValue<'ctx>> {
                let p = smem_word(fb, lims_s, col)?;
                Ok(fb
                    .b
                    .build_load(i32t, p, "lim")
                    .map_err(be)?
                    .into_int_value())
            };
            let rows32 = [
                fb.b.build_int_truncate(rows[0], i32t, "r32").map_err(be)?,
                fb.b.build_int_truncate(rows[1], i32t, "r32").map_err(be)?,
            ];
            let steps = fb.ceil_div(tv, c(keys))?;
            fb.for_range(c(0), c(rep), |fb, r| {
                let hi = fb.add(fb.mul(hx, c(rep))?, r)?;
                fb.for_range(c(0), steps, |fb, st| {
                    let t0 = fb.mul(st, c(keys))?;
                    barrier(fb)?;
                    cols(fb, hi, t0)?;
                    barrier(fb)?;
                    // The last key any column sees (the same in every warp).
                    let mut m = fb.f32c(-1.0);
                    for half in 0..2 {
                        let l = col_lim(fb, fb.add(wl, c(32 * half))?)?;
                        let l =
                            fb.b.build_signed_int_to_float(l, fb.f32t, "lf")
                                .map_err(be)?;
                        m = fb.intrinsic("llvm.maxnum", &[m, l])?;
                    }
                    let last = warp_max(fb, m)?;
                    let sees_from = |fb: &Fb<'_, 'ctx>, j: IntValue<'ctx>| -> R<IntValue<'ctx>> {
                        let jf =
                            fb.b.build_signed_int_to_float(j, fb.f32t, "jf")
                                .map_err(be)?;
                        fb.fcmp(FloatPredicate::OGE, last, jf)
                    };
                    fb.if_else(
                        sees_from(fb, r0)?,
                        |fb| {
                            stage(fb, hi, t0)?;
                            barrier(fb)?;
                            fb.if_else(
                                sees_from(fb, wr0)?,
                                |fb| {
                                    products(fb)?;
                                    update(fb, &|nt, x| {
                                        let col = c(8 * nt + (x % 2) as i64);
                                        let col = fb.add(col, fb.mul(q, c(2))?)?;
                                        let lim = col_lim(fb, col)?;
                                        let row = rows32[x / 2];
                                        let seen = fb
                                            .b
                                            .build_int_compare(IntPredicate::SLE, row, lim, "seen")
                                            .map_err(be)?;
                                        Ok((
                                            seen,
                                            fb.load_f32(cols_s, col)?,
                                            fb.load_f32(cols_s, fb.add(col, c(keys))?)?,
                                        ))
                                    })
                                },
                                |_| Ok(()),
                            )
                        },
                        |_| Ok(()),
                    )
                })
            })?;
        } else {
            let gh = sdiv(hx, c(rep), "gh")?;
            // Each row's end of visible keys, its statistics; the warp's and the block's last
            // end.
            for (x, r) in rows.iter().enumerate() {
                let e = ends[x];
                fb.b.build_store(e, c(0)).map_err(be)?;
                fb.set(rs1[x], if grad.is_some() { fb.f32c(0.0) } else { ninf })?;
                fb.set(rs2[x], fb.f32c(0.0))?;
                fb.if_else(
                    lt(*r, tv)?,
                    |fb| {
                        let p = fb
                            .load(pa, fb.at(pa, &[(0, bi), (1, *r)])?)?
                            .into_int_value();
                        fb.b.build_store(e, fb.imin(fb.imax(fb.add(p, c(1))?, c(0))?, sv)?)
                            .map_err(be)?;
                        if let Some(gr) = grad {
                            let row = [(0, bi), (1, hx), (2, *r)];
                            let lse = fb.load_f32(gr.lse.ptr, fb.at(gr.lse, &row)?)?;
                            fb.set(rs1[x], fb.fmul(lse, fb.f32c(log2e))?)?;
                            fb.set(rs2[x], fb.load_f32(gr.delta.ptr, fb.at(gr.delta, &row)?)?)?;
                        }
                        Ok(())
                    },
                    |_| Ok(()),
                )?;
            }
            let end_of = |x: usize| -> R<IntValue<'ctx>> {
                Ok(fb
                    .b
                    .build_load(fb.i64t, ends[x], "end")
                    .map_err(be)?
                    .into_int_value())
            };
            let mine = fb.imax(end_of(0)?, end_of(1)?)?;
            let (wend, kend) = block_max(fb, ends_s, mine, [warp, wl])?;
            let steps = fb.ceil_div(kend, c(keys))?;
            // Whether key `s0 + 8nt + 2q + x%2` is visible to the row of accumulator `x`.
            let seen = |fb: &Fb<'_, 'ctx>, s0: IntValue<'ctx>, nt: i64, x: usize| {
                let j = fb.add(fb.add(s0, c(8 * nt + (x % 2) as i64))?, fb.mul(q, c(2))?)?;
                lt(j, end_of(x / 2)?)
            };
            fb.for_range(c(0), steps, |fb, st| {
                let s0 = fb.mul(st, c(keys))?;
                barrier(fb)?;
                stage(fb, gh, s0)?;
                barrier(fb)?;
                fb.if_else(
                    lt(s0, wend)?,
                    |fb| {
                        products(fb)?;
                        if grad.is_some() {
                            return update(fb, &|nt, x| {
                                Ok((
                                    seen(fb, s0, nt, x)?,
                                    fb.get(rs1[x / 2])?,
                                    fb.get(rs2[x / 2])?,
                                ))
                            });
                        }
                        // The log-sum-exp: each row's running max and this lane's part of
                        // its sum.
                        for nt in 0..keys / 8 {
                            for x in 0..4usize {
                                let slot = sacc[(nt * 4) as usize + x];
                                let v = fb.fsel(seen(fb, s0, nt, x)?, fb.get(slot)?, ninf)?;
                                fb.set(slot, v)?;
                            }
                        }
                        online_softmax(fb, &sacc, rs1, rs2)?;
                        Ok(())
                    },
                    |_| Ok(()),
                )
            })?;
        }
        // The rows out: the log-sum-exp from lane `q = 0` of each quad, or the accumulators.
        for (rr, r) in rows.iter().enumerate() {
            let l = if grad.is_none() {
                Some(warp_fold(fb, fb.get(rs2[rr])?, &[1, 2], |a, b| {
                    fb.fadd(a, b)
                })?)
            } else {
                None
            };
            fb.if_else(
                lt(*r, rows_len)?,
                |fb| {
                    let u = fb.add(fb.mul(fb.add(fb.mul(bi, c(heads))?, hx)?, rows_len)?, *r)?;
                    if let Some(l) = l {
                        let m = fb.fmul(fb.get(rs1[rr])?, fb.f32c(std::f64::consts::LN_2))?;
                        let lse = fb.fadd(m, fb.log(l)?)?;
                        return fb.if_else(
                            cmp(IntPredicate::EQ, q, c(0))?,
                            |fb| fb.store(optr, oe, u, lse.into()),
                            |_| Ok(()),
                        );
                    }
                    let ob = fb.mul(u, c(width))?;
                    for nt in 0..width / 8 {
                        for x in [2 * rr, 2 * rr + 1] {
                            let col = fb.add(c(8 * nt + (x % 2) as i64), fb.mul(q, c(2))?)?;
                            let v =
                                fb.fmul(fb.get(acc[(nt * 4) as usize + x])?, fb.f32c(out_scale))?;
                            fb.store(optr, oe, fb.add(ob, col)?, v.into())?;
                        }
                    }
                    Ok(())
                },
                |_| Ok(()),
            )?;
        }
        barrier(fb)
    })
}
