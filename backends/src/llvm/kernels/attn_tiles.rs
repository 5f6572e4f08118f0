//! Attention on the CPU in tiles: the forward (`Kernel::Attention` unsplit, with `nr > 0`)
//! and the backward (`Kernel::AttentionBackward`).
//!
//! The arithmetic is FlashAttention-2's, as in `super::attention` (the forward a row at a
//! time, which decode's split keys keep) and `super::gpu_attention_backward` (a warp a
//! (row, key) pair at a time). Here a unit of work is a block of rows of the result (query
//! rows for the forward, the log-sum-exp and `dq`; key rows of one KV head for `dk` and
//! `dv`), a multiple of the GEMM micro-kernel's `mr` rows, and the other side (keys, or the
//! query rows of every head reading that KV head) is taken `nr` at a time. For each such
//! block, with `A` the unit's rows and `B` the block's, packed in scratch as the
//! micro-kernel (`super::ukernel`) reads them:
//!
//! - scores: `S = A_s·B_sᵀ` over the head dim (`A_s, B_s` = `q, k` for query units, `k, q`
//!   for key units, so a key unit works on `Sᵀ`);
//! - probabilities: `P = exp(S·scale − lse)` where the query sees the key (`key ≤
//!   positions[b, t]` and `key < S`), 0 elsewhere;
//! - for `dq` and `dk`: `dP = A_p·B_pᵀ` over the value dim (`A_p, B_p` = `dout, v` for query
//!   units, `v, dout` for key units) and `dS = P ∘ (dP − delta)`;
//! - the update `acc += C·X` with `C` = `dS` (`dq`, `dk`) or `P` (`dv`) and `X` the block's
//!   rows of `k` (`dq`), `q` (`dk`) or `dout` (`dv`); the result is `acc`, times `scale`
//!   for `dq` and `dk`;
//! - for the log-sum-exp, a running max `m` and sum `l` per query row (`lse = m + ln l`);
//! - for the forward, the same running max and sum, the accumulators rescaled by
//!   `e^(m − m')` when a row's max moves, `P = e^(S·scale − m')` and `acc += P·v`; each row
//!   ends as `acc / l`.
//!
//! Each `mr`-row block of a unit skips the blocks none of its rows sees (under a causal
//! mask, the tiles above the diagonal), so masking costs at most one partial tile per row
//! block and diagonal.

use inkwell::attributes::AttributeLoc;
use inkwell::values::{FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};

use egret_ir::AttnGrad;
use egret_runtime::plan::ElemType;

use super::{attn_out_row, be, gemm_mr, ukernel, Av, Fb, R};
use crate::kernel::{Access, AttnDims, AttnGradIn, PanelType};

/// Most micro-kernel row blocks in a unit of work: the block's packed panels are shared by
/// this many `mr`-row products (96 rows at `mr` = 12), so packing them, one transposing
/// copy of `nr` rows each, stays small beside the products.
const MAX_ROW_BLOCKS: i64 = 8;

/// Units each thread should find to claim: units get fewer row blocks (down to one) where
/// `MAX_ROW_BLOCKS` would leave fewer, so that threads can balance causal work.
const UNITS_PER_THREAD: i64 = 4;

/// The operands only the gradients read.
struct GradOps<'ctx> {
    v: Av<'ctx>,
    dout: Av<'ctx>,
    lse: Av<'ctx>,
    delta: Av<'ctx>,
    wrt: AttnGrad,
}

/// Where the scratch arrays lie (float offsets from the thread's scratch).
struct Layout {
    /// The unit's rows of the scores' left operand (`U × D`), then of `dP`'s (`U × Dv`).
    a_s: i64,
    a_p: i64,
    /// Panels of the block: scores (`D × nr`), `dP` (`Dv × nr`), update (`wp / nr` panels of
    /// `nr × nr`).
    p_s: i64,
    p_p: i64,
    p_u: i64,
    /// Tiles `U × nr`: scores, then `P` or `dS` in place; `dP`.
    t_s: i64,
    t_p: i64,
    /// Accumulators `U × wp`.
    acc: i64,
    /// Per query (a row of a query unit, a column of a key unit): `lse` and `delta`; per
    /// query row of a log-sum-exp or forward unit: the running max and sum.
    lse: i64,
    delta: i64,
    m: i64,
    l: i64,
    total: i64,
}

impl Layout {
    fn new(d: &AttnDims, nr: i64, umax: i64, wp: i64, with_dp: bool) -> Layout {
        let mut at = 0;
        let mut take = |n: i64| {
            let o = at;
            at += n;
            o
        };
        let dp = |n: i64| if with_dp { n } else { 0 };
        let per_query = umax.max(nr);
        Layout {
            a_s: take(umax * d.d),
            a_p: take(dp(umax * d.dv)),
            p_s: take(d.d * nr),
            p_p: take(dp(d.dv * nr)),
            p_u: take(wp * nr),
            t_s: take(umax * nr),
            t_p: take(dp(umax * nr)),
            acc: take(umax * wp),
            lse: take(per_query),
            delta: take(per_query),
            m: take(umax),
            l: take(umax),
            total: at,
        }
    }
}

/// What a tiled launch computes.
enum Mode<'a> {
    /// Each query row's log-sum-exp (`grad` None).
    Lse,
    /// The attention, from these values.
    Forward(&'a Access),
    /// A gradient.
    Grad(&'a AttnGradIn),
}

/// `Kernel::AttentionBackward` in tiles (see the module's comment); returns the scratch
/// floats a thread needs.
pub(super) fn backward<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    [q, k, pos]: [&Access; 3],
    grad: Option<&AttnGradIn>,
    d: &AttnDims,
    scale: f64,
    nr: i64,
) -> R<usize> {
    let mode = match grad {
        Some(g) => Mode::Grad(g),
        None => Mode::Lse,
    };
    let floats = tiles(fb, out, [q, k, pos], mode, d, scale, nr)?;
    fb.ret_ok()?;
    Ok(floats)
}

/// The attention (`Kernel::Attention`, unsplit) in tiles, where the caller's code is (it
/// returns nothing); returns the scratch floats a thread needs.
pub(super) fn forward<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    [q, k, v, pos]: [&Access; 4],
    d: &AttnDims,
    scale: f64,
    nr: i64,
) -> R<usize> {
    tiles(fb, out, [q, k, pos], Mode::Forward(v), d, scale, nr)
}

/// The micro-kernel's rows for panels of `nr` columns: the forward takes tiles only when
/// each head has at least this many query rows (`T`).
pub(super) fn min_rows(nr: i64) -> i64 {
    gemm_mr(nr)
}

/// One launch's units, claimed guided (causal rows cost what their visible keys do), where
/// the caller's code is; returns the scratch floats a thread needs.
fn tiles<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    [q, k, pos]: [&Access; 3],
    mode: Mode,
    d: &AttnDims,
    scale: f64,
    nr: i64,
) -> R<usize> {
    let grad = match mode {
        Mode::Grad(g) => Some(g),
        _ => None,
    };
    let mr = gemm_mr(nr);
    let attrs = fb.func.attributes(AttributeLoc::Function);
    let uk = ukernel(fb, mr, nr, PanelType::F32, &attrs)?;
    let c = |v: i64| fb.i64c(v);
    let elem = |x: &Access| fb.prog.buffers[x.buf as usize].elem;
    let (qa, ka) = (fb.access(q, elem(q))?, fb.access(k, elem(k))?);
    let pa = fb.access(pos, ElemType::I64)?;
    let optr = fb.buf(out)?;
    let oe = fb.prog.buffers[out as usize].elem;
    let g = match grad {
        Some(g) => Some(GradOps {
            v: fb.access(&g.v, elem(&g.v))?,
            dout: fb.access(&g.dout, elem(&g.dout))?,
            lse: fb.access(&g.lse, ElemType::F32)?,
            delta: fb.access(&g.delta, ElemType::F32)?,
            wrt: g.wrt,
        }),
        None => None,
    };
    let fv = match mode {
        Mode::Forward(v) => Some(fb.access(v, elem(v))?),
        _ => None,
    };
    let wrt = grad.map(|g| g.wrt);
    let key_units = matches!(wrt, Some(AttnGrad::K | AttnGrad::V));
    let with_dp = matches!(wrt, Some(AttnGrad::Q | AttnGrad::K));
    let (width, out_scale) = match (&mode, wrt) {
        (Mode::Lse, _) => (0, 1.0),
        (Mode::Forward(_), _) => (d.dv, 1.0),
        (_, Some(AttnGrad::Q | AttnGrad::K)) => (d.d, scale),
        _ => (d.dv, 1.0),
    };
    let wp = (width + nr - 1) / nr * nr;
    let umax = MAX_ROW_BLOCKS * mr;
    let lay = Layout::new(d, nr, umax, wp, with_dp);
    let sp = |o: i64| -> R<PointerValue<'ctx>> {
        unsafe { fb.b.build_in_bounds_gep(fb.f32t, fb.scratch, &[c(o)], "sp") }.map_err(be)
    };
    let (bv, tv, sv) = (fb.dim(&d.b)?, fb.dim(&d.t)?, fb.dim(&d.s)?);
    let rep = d.h / d.hkv;
    let (heads, len, other_len) = if key_units {
        (d.hkv, sv, tv)
    } else {
        (d.h, tv, sv)
    };
    // Row blocks per unit: as many as leave each thread `UNITS_PER_THREAD` units.
    let rows_total = fb.mul(fb.mul(bv, c(heads))?, len)?;
    let want =
        fb.b.build_int_signed_div(rows_total, fb.mul(fb.nth, c(UNITS_PER_THREAD * mr))?, "rb")
            .map_err(be)?;
    let rb = fb.imax(fb.imin(want, c(MAX_ROW_BLOCKS))?, c(1))?;
    let urows = fb.mul(rb, c(mr))?;
    let per_head = fb.ceil_div(len, urows)?;
    let units = fb.mul(fb.mul(bv, c(heads))?, per_head)?;
    // Per query (a row of a query unit, a column of a key unit) the end of its visible keys;
    // per row block of a query unit the largest of its rows'.
    let i64t = fb.i64t;
    let ends = fb.slot(i64t.array_type(umax.max(nr) as u32).into())?;
    let rb_ends = fb.slot(i64t.array_type(MAX_ROW_BLOCKS as u32).into())?;
    let max_end = fb.slot(i64t.into())?;
    let at_i64 = |arr: PointerValue<'ctx>, i: IntValue<'ctx>| -> R<PointerValue<'ctx>> {
        unsafe { fb.b.build_in_bounds_gep(i64t, arr, &[i], "ip") }.map_err(be)
    };
    let load_i64 = |p: PointerValue<'ctx>| -> R<IntValue<'ctx>> {
        Ok(fb.b.build_load(i64t, p, "iv").map_err(be)?.into_int_value())
    };
    let store_i64 = |p: PointerValue<'ctx>, v: IntValue<'ctx>| -> R<()> {
        fb.b.build_store(p, v).map_err(be)?;
        Ok(())
    };
    let lt = |a: IntValue<'ctx>, b: IntValue<'ctx>| {
        fb.b.build_int_compare(IntPredicate::SLT, a, b, "lt")
            .map_err(be)
    };
    // The end of query `t`'s visible keys: `min(positions[b, t] + 1, S)`.
    let query_end = |fb: &Fb<'_, 'ctx>, bi: IntValue<'ctx>, t: IntValue<'ctx>| {
        let limit = fb.load(&pa, fb.at(&pa, &[(0, bi), (1, t)])?)?;
        fb.imin(fb.add(limit.into_int_value(), c(1))?, sv)
    };
    // Query `t` (of head `h`)'s `lse` and `delta` into slot `i` of the per-query arrays
    // (zero where `ok` is false: a row or column past the end).
    let query_stats = |fb: &Fb<'_, 'ctx>,
                       gops: &GradOps<'ctx>,
                       [bi, h, t, i]: [IntValue<'ctx>; 4],
                       ok: IntValue<'ctx>|
     -> R<()> {
        let qrow = [(0, bi), (1, h), (2, t)];
        let lse = fb.load_f32(gops.lse.ptr, fb.at(&gops.lse, &qrow)?)?;
        let delta = fb.load_f32(gops.delta.ptr, fb.at(&gops.delta, &qrow)?)?;
        fb.store_f32(sp(lay.lse)?, i, fb.fsel(ok, lse, fb.f32c(0.0))?)?;
        fb.store_f32(sp(lay.delta)?, i, fb.fsel(ok, delta, fb.f32c(0.0))?)
    };
    // The rows the update multiplies: `k` (`dq`), `q` (`dk`), `dout` (`dv`), `v` (forward).
    let upd_src = match (&g, &fv) {
        (Some(gops), _) => Some(match gops.wrt {
            AttnGrad::Q => &ka,
            AttnGrad::K => &qa,
            AttnGrad::V => &gops.dout,
        }),
        (None, Some(va)) => Some(va),
        (None, None) => None,
    };
    let unit = |fb: &Fb<'_, 'ctx>, u: IntValue<'ctx>| -> R<()> {
        let idx = fb.decompose(u, &[bv, c(heads), per_head])?;
        let (bi, hx, ub) = (idx[0], idx[1], idx[2]);
        let r0 = fb.mul(ub, urows)?;
        let nrows = fb.imin(urows, fb.b.build_int_sub(len, r0, "left").map_err(be)?)?;
        let last = fb.b.build_int_sub(len, c(1), "last").map_err(be)?;
        // The unit's rows: `(row index clamped inside, whether it exists)`.
        let row = |fb: &Fb<'_, 'ctx>, r: IntValue<'ctx>| -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
            Ok((fb.imin(fb.add(r0, r)?, last)?, lt(r, nrows)?))
        };
        // Copies of the unit's rows of the left operands (zero past the end).
        let (a_s_src, a_p_src) = if key_units {
            (&ka, g.as_ref().map(|g| &g.v))
        } else {
            (&qa, g.as_ref().map(|g| &g.dout))
        };
        let mut lefts = vec![(lay.a_s, a_s_src, d.d)];
        if with_dp {
            lefts.push((lay.a_p, a_p_src.expect("gradient operands"), d.dv));
        }
        fb.for_range(c(0), urows, |fb, r| {
            let (ri, ok) = row(fb, r)?;
            let at = [(0, bi), (1, hx), (2, ri)];
            for &(dst, src, n) in &lefts {
                let row = (src, fb.at(src, &at)?);
                copy_row(fb, sp(dst)?, fb.mul(r, c(n))?, row, n, ok)?;
            }
            Ok(())
        })?;
        fill(fb, sp(lay.acc)?, fb.mul(urows, c(wp))?, 0.0)?;
        if key_units {
            let gops = g.as_ref().expect("key units are gradients'");
            let gi = hx;
            fb.for_range(c(0), c(rep), |fb, hr| {
                let h = fb.add(fb.mul(gi, c(rep))?, hr)?;
                fb.for_range(c(0), fb.ceil_div(other_len, c(nr))?, |fb, ob| {
                    let o0 = fb.mul(ob, c(nr))?;
                    let no =
                        fb.imin(c(nr), fb.b.build_int_sub(other_len, o0, "no").map_err(be)?)?;
                    let olast = fb.b.build_int_sub(other_len, c(1), "ol").map_err(be)?;
                    store_i64(max_end, c(0))?;
                    fb.for_range(c(0), c(nr), |fb, i| {
                        let ok = lt(i, no)?;
                        let t = fb.imin(fb.add(o0, i)?, olast)?;
                        let end = query_end(fb, bi, t)?;
                        let end = fb.isel(ok, end, c(0))?;
                        store_i64(at_i64(ends, i)?, end)?;
                        store_i64(max_end, fb.imax(load_i64(max_end)?, end)?)?;
                        query_stats(fb, gops, [bi, h, t, i], ok)
                    })?;
                    // Some query of the block sees the unit's first key.
                    let seen = lt(r0, load_i64(max_end)?)?;
                    fb.if_else(
                        seen,
                        |fb| {
                            let other_row =
                                |fb: &Fb<'_, 'ctx>, av: &Av<'ctx>, i: IntValue<'ctx>| {
                                    let t = fb.imin(fb.add(o0, i)?, olast)?;
                                    fb.at(av, &[(0, bi), (1, h), (2, t)])
                                };
                            pack_transposed(fb, sp(lay.p_s)?, nr, &qa, d.d, no, &|fb, i| {
                                other_row(fb, &qa, i)
                            })?;
                            if with_dp {
                                pack_transposed(
                                    fb,
                                    sp(lay.p_p)?,
                                    nr,
                                    &gops.dout,
                                    d.dv,
                                    no,
                                    &|fb, i| other_row(fb, &gops.dout, i),
                                )?;
                            }
                            let src = upd_src.expect("gradients update");
                            pack_panels(fb, sp(lay.p_u)?, nr, src, width, wp, no, &|fb, i| {
                                other_row(fb, src, i)
                            })?;
                            let me = load_i64(max_end)?;
                            fb.for_range(c(0), rb, |fb, blk| {
                                let first_key = fb.add(r0, fb.mul(blk, c(mr))?)?;
                                fb.if_else(
                                    lt(first_key, me)?,
                                    |fb| {
                                        let tile = Tile { blk, r0, o0 };
                                        block_products(fb, &lay, uk, mr, nr, d, &tile, with_dp)?;
                                        probabilities(
                                            fb, &lay, mr, nr, scale, &tile, true, ends, with_dp,
                                        )?;
                                        update(fb, &lay, uk, mr, nr, wp, &tile, no)
                                    },
                                    |_| Ok(()),
                                )
                            })
                        },
                        |_| Ok(()),
                    )
                })
            })?;
        } else {
            let h = hx;
            let gi = fb.b.build_int_signed_div(h, c(rep), "g").map_err(be)?;
            store_i64(max_end, c(0))?;
            fb.for_range(c(0), rb, |_, blk| store_i64(at_i64(rb_ends, blk)?, c(0)))?;
            fb.for_range(c(0), urows, |fb, r| {
                let (t, ok) = row(fb, r)?;
                let end = fb.isel(ok, query_end(fb, bi, t)?, c(0))?;
                store_i64(at_i64(ends, r)?, end)?;
                store_i64(max_end, fb.imax(load_i64(max_end)?, end)?)?;
                let blk = fb.b.build_int_signed_div(r, c(mr), "rblk").map_err(be)?;
                let be_ = at_i64(rb_ends, blk)?;
                store_i64(be_, fb.imax(load_i64(be_)?, end)?)?;
                match &g {
                    Some(gops) => query_stats(fb, gops, [bi, h, t, r], ok),
                    None => {
                        fb.store_f32(sp(lay.m)?, r, fb.f32c(f64::NEG_INFINITY))?;
                        fb.store_f32(sp(lay.l)?, r, fb.f32c(0.0))
                    }
                }
            })?;
            let klast = fb.b.build_int_sub(sv, c(1), "kl").map_err(be)?;
            let me = load_i64(max_end)?;
            fb.for_range(c(0), fb.ceil_div(me, c(nr))?, |fb, ob| {
                let o0 = fb.mul(ob, c(nr))?;
                let no = fb.imin(c(nr), fb.b.build_int_sub(sv, o0, "no").map_err(be)?)?;
                let key_row = |fb: &Fb<'_, 'ctx>, av: &Av<'ctx>, i: IntValue<'ctx>| {
                    let j = fb.imin(fb.add(o0, i)?, klast)?;
                    fb.at(av, &[(0, bi), (1, gi), (2, j)])
                };
                pack_transposed(fb, sp(lay.p_s)?, nr, &ka, d.d, no, &|fb, i| {
                    key_row(fb, &ka, i)
                })?;
                if let (Some(gops), true) = (&g, with_dp) {
                    pack_transposed(fb, sp(lay.p_p)?, nr, &gops.v, d.dv, no, &|fb, i| {
                        key_row(fb, &gops.v, i)
                    })?;
                }
                if let Some(src) = upd_src {
                    pack_panels(fb, sp(lay.p_u)?, nr, src, width, wp, no, &|fb, i| {
                        key_row(fb, src, i)
                    })?;
                }
                fb.for_range(c(0), rb, |fb, blk| {
                    let seen = lt(o0, load_i64(at_i64(rb_ends, blk)?)?)?;
                    fb.if_else(
                        seen,
                        |fb| {
                            let tile = Tile { blk, r0, o0 };
                            block_products(fb, &lay, uk, mr, nr, d, &tile, with_dp)?;
                            match mode {
                                Mode::Lse => {
                                    return running_max_sum(
                                        fb, &lay, mr, nr, scale, &tile, ends, None,
                                    )
                                }
                                Mode::Forward(_) => {
                                    running_max_sum(fb, &lay, mr, nr, scale, &tile, ends, Some(wp))?
                                }
                                Mode::Grad(_) => probabilities(
                                    fb, &lay, mr, nr, scale, &tile, false, ends, with_dp,
                                )?,
                            }
                            update(fb, &lay, uk, mr, nr, wp, &tile, no)
                        },
                        |_| Ok(()),
                    )
                })
            })?;
        }
        // The unit's rows of the result: `[B, heads, len]` (log-sum-exp), `[.., width]`
        // (gradients), or where `attn_out_row` puts the forward's.
        fb.for_range(c(0), nrows, |fb, r| {
            let orow = fb.add(
                fb.mul(fb.add(fb.mul(bi, c(heads))?, hx)?, len)?,
                fb.add(r0, r)?,
            )?;
            let ab = fb.mul(r, c(wp))?;
            let (ob, factor) = match mode {
                Mode::Lse => {
                    let m = fb.load_f32(sp(lay.m)?, r)?;
                    let l = fb.load_f32(sp(lay.l)?, r)?;
                    let lse = fb.fadd(m, fb.log(l)?)?;
                    return fb.store(optr, oe, orow, lse.into());
                }
                Mode::Forward(_) => {
                    let l = fb.load_f32(sp(lay.l)?, r)?;
                    let inv = fb.b.build_float_div(fb.f32c(1.0), l, "inv").map_err(be)?;
                    (attn_out_row(fb, orow, d)?, inv)
                }
                Mode::Grad(_) => (fb.mul(orow, c(width))?, fb.f32c(out_scale)),
            };
            fb.for_range(c(0), c(width), |fb, cc| {
                let v = fb.load_f32(sp(lay.acc)?, fb.add(ab, cc)?)?;
                fb.store(optr, oe, fb.add(ob, cc)?, fb.fmul(v, factor)?.into())
            })
        })
    };
    let guided = fb.ctx.bool_type().const_int(1, false);
    fb.claim_work(guided, units, c(1), c(1), |fb, [_, s, e]| {
        fb.for_range(s, e, |fb, u| unit(fb, u))
    })?;
    Ok(lay.total as usize)
}

/// Where a tile lies: row block `blk` of the unit whose rows start at `r0`, against the
/// block of the other side starting at `o0`.
struct Tile<'ctx> {
    blk: IntValue<'ctx>,
    r0: IntValue<'ctx>,
    o0: IntValue<'ctx>,
}

fn fill<'ctx>(fb: &Fb<'_, 'ctx>, p: PointerValue<'ctx>, n: IntValue<'ctx>, v: f64) -> R<()> {
    fb.for_range(fb.i64c(0), n, |fb, i| fb.store_f32(p, i, fb.f32c(v)))
}

/// `dst[at + i] = ok ? src[row + i·stride] : 0` for `i < n` (along `src`'s last axis).
fn copy_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dst: PointerValue<'ctx>,
    at: IntValue<'ctx>,
    (src, row): (&Av<'ctx>, IntValue<'ctx>),
    n: i64,
    ok: IntValue<'ctx>,
) -> R<()> {
    let st = src.strides[src.strides.len() - 1];
    fb.for_range(fb.i64c(0), fb.i64c(n), |fb, i| {
        let x = fb.load_float(src, fb.add(row, fb.mul(i, st)?)?)?;
        fb.store_f32(dst, fb.add(at, i)?, fb.fsel(ok, x, fb.f32c(0.0))?)
    })
}

/// The scores' or `dP`'s panel of a block: `dst[c·nr + i] = src row i [c]` for `c < n`,
/// `i < no`; zero for `no ≤ i < nr`. `row(i)` is row `i`'s offset (clamped inside).
fn pack_transposed<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dst: PointerValue<'ctx>,
    nr: i64,
    src: &Av<'ctx>,
    n: i64,
    no: IntValue<'ctx>,
    row: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<IntValue<'ctx>>,
) -> R<()> {
    let st = src.strides[src.strides.len() - 1];
    fb.for_range(fb.i64c(0), fb.i64c(nr), |fb, i| {
        let ok =
            fb.b.build_int_compare(IntPredicate::SLT, i, no, "ok")
                .map_err(be)?;
        let base = row(fb, i)?;
        fb.for_range(fb.i64c(0), fb.i64c(n), |fb, cc| {
            let x = fb.load_float(src, fb.add(base, fb.mul(cc, st)?)?)?;
            let x = fb.fsel(ok, x, fb.f32c(0.0))?;
            fb.store_f32(dst, fb.add(fb.mul(cc, fb.i64c(nr))?, i)?, x)
        })
    })
}

/// The update's panels of a block: panel `p` of `wp / nr` holds columns `p·nr ..` of the
/// block's rows, `dst[p·nr·nr + i·nr + j] = src row i [p·nr + j]`, zero past `width` (rows
/// past `no` are not read: the update's `k` runs to `no`).
#[allow(clippy::too_many_arguments)]
fn pack_panels<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dst: PointerValue<'ctx>,
    nr: i64,
    src: &Av<'ctx>,
    width: i64,
    wp: i64,
    no: IntValue<'ctx>,
    row: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<IntValue<'ctx>>,
) -> R<()> {
    let st = src.strides[src.strides.len() - 1];
    let c = |v: i64| fb.i64c(v);
    fb.for_range(c(0), no, |fb, i| {
        let base = row(fb, i)?;
        for p in 0..wp / nr {
            let cols = (width - p * nr).min(nr);
            let at = fb.add(fb.mul(i, c(nr))?, c(p * nr * nr))?;
            fb.for_range(c(0), c(cols), |fb, j| {
                let x = fb.load_float(src, fb.add(base, fb.mul(fb.add(j, c(p * nr))?, st)?)?)?;
                fb.store_f32(dst, fb.add(at, j)?, x)
            })?;
            if cols < nr {
                fb.for_range(c(cols), c(nr), |fb, j| {
                    fb.store_f32(dst, fb.add(at, j)?, fb.f32c(0.0))
                })?;
            }
        }
        Ok(())
    })
}

/// Calls the micro-kernel: `c[r, 0..nr] (+)= Σ_{k < kl} a[r·lda + k]·bp[k·nr ..]`.
#[allow(clippy::too_many_arguments)]
fn call_uk<'ctx>(
    fb: &Fb<'_, 'ctx>,
    uk: FunctionValue<'ctx>,
    a: PointerValue<'ctx>,
    lda: IntValue<'ctx>,
    bp: PointerValue<'ctx>,
    cp: PointerValue<'ctx>,
    ldc: IntValue<'ctx>,
    kl: IntValue<'ctx>,
    first: bool,
) -> R<()> {
    let null = fb.ctx.ptr_type(AddressSpace::default()).const_null();
    let first = fb.ctx.bool_type().const_int(first as u64, false);
    fb.b.build_call(
        uk,
        &[
            a.into(),
            lda.into(),
            bp.into(),
            cp.into(),
            ldc.into(),
            kl.into(),
            first.into(),
            null.into(),
            fb.i64c(1).into(),
            bp.into(),
            // (f32 panels: no Q8 scales)
            null.into(),
        ],
        "",
    )
    .map_err(be)?;
    Ok(())
}

fn gep<'ctx>(fb: &Fb<'_, 'ctx>, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> R<PointerValue<'ctx>> {
    unsafe { fb.b.build_in_bounds_gep(fb.f32t, p, &[i], "tp") }.map_err(be)
}

/// The tile's scores (`t_s`) and, for `dq`/`dk`, its `dP` (`t_p`).
#[allow(clippy::too_many_arguments)]
fn block_products<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lay: &Layout,
    uk: FunctionValue<'ctx>,
    mr: i64,
    nr: i64,
    d: &AttnDims,
    t: &Tile<'ctx>,
    with_dp: bool,
) -> R<()> {
    let c = |v: i64| fb.i64c(v);
    let s = |o: i64| gep(fb, fb.scratch, c(o));
    let r = fb.mul(t.blk, c(mr))?;
    let tile = fb.mul(r, c(nr))?;
    // (left rows, their length, panel, tile) of the scores, then of `dP`.
    let mut products = vec![(lay.a_s, d.d, lay.p_s, lay.t_s)];
    if with_dp {
        products.push((lay.a_p, d.dv, lay.p_p, lay.t_p));
    }
    for (a, k, panel, out) in products {
        let a = gep(fb, s(a)?, fb.mul(r, c(k))?)?;
        let out = gep(fb, s(out)?, tile)?;
        call_uk(fb, uk, a, c(k), s(panel)?, out, c(nr), c(k), true)?;
    }
    Ok(())
}

/// `P` (or `dS`) in place of the tile's scores. Query `t` of pair (row `r`, column `i`) is
/// the row (`by_column` false: a query unit) or the column (a key unit), and so is the key.
#[allow(clippy::too_many_arguments)]
fn probabilities<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lay: &Layout,
    mr: i64,
    nr: i64,
    scale: f64,
    t: &Tile<'ctx>,
    by_column: bool,
    ends: PointerValue<'ctx>,
    with_dp: bool,
) -> R<()> {
    let c = |v: i64| fb.i64c(v);
    let s = |o: i64| gep(fb, fb.scratch, c(o));
    let r_first = fb.mul(t.blk, c(mr))?;
    fb.for_range(c(0), c(mr), |fb, rr| {
        let r = fb.add(r_first, rr)?;
        let row = fb.mul(r, c(nr))?;
        let (row_end, row_lse, row_delta) = if by_column {
            (None, None, None)
        } else {
            (
                Some(load_end(fb, ends, r)?),
                Some(fb.load_f32(s(lay.lse)?, r)?),
                Some(fb.load_f32(s(lay.delta)?, r)?),
            )
        };
        fb.for_range(c(0), c(nr), |fb, i| {
            let (key, end, lse, delta) = if by_column {
                (
                    fb.add(t.r0, r)?,
                    load_end(fb, ends, i)?,
                    fb.load_f32(s(lay.lse)?, i)?,
                    fb.load_f32(s(lay.delta)?, i)?,
                )
            } else {
                (
                    fb.add(t.o0, i)?,
                    row_end.expect("row"),
                    row_lse.expect("row"),
                    row_delta.expect("row"),
                )
            };
            let seen =
                fb.b.build_int_compare(IntPredicate::SLT, key, end, "seen")
                    .map_err(be)?;
            let at = fb.add(row, i)?;
            let sc = fb.load_f32(s(lay.t_s)?, at)?;
            let z =
                fb.b.build_float_sub(fb.fmul(sc, fb.f32c(scale))?, lse, "z")
                    .map_err(be)?;
            let p = fb.fsel(seen, fb.exp(z)?, fb.f32c(0.0))?;
            // A pair not seen adds exactly nothing, even where `delta` is not finite (a
            // query that sees no key has a NaN output, so a NaN `delta`).
            let v = if with_dp {
                let dp = fb.load_f32(s(lay.t_p)?, at)?;
                let ds = fb.fmul(p, fb.b.build_float_sub(dp, delta, "dd").map_err(be)?)?;
                fb.fsel(seen, ds, fb.f32c(0.0))?
            } else {
                p
            };
            fb.store_f32(s(lay.t_s)?, at, v)
        })
    })
}

fn load_end<'ctx>(
    fb: &Fb<'_, 'ctx>,
    ends: PointerValue<'ctx>,
    i: IntValue<'ctx>,
) -> R<IntValue<'ctx>> {
    let p = unsafe { fb.b.build_in_bounds_gep(fb.i64t, ends, &[i], "ep") }.map_err(be)?;
    Ok(fb
        .b
        .build_load(fb.i64t, p, "end")
        .map_err(be)?
        .into_int_value())
}

/// The running max and sum over a tile of a query unit: per row, the max of its seen
/// scores `bm`; if it saw any, `m' = max(m, bm)`, `l' = l·e^(m − m') + Σ e^(s − m')`. For
/// the forward (`probs`: the accumulators' row length), the tile becomes `P = e^(s − m')`
/// (0 where unseen, a whole row where the row saw none) and the row's accumulators are
/// rescaled by `e^(m − m')`.
#[allow(clippy::too_many_arguments)]
fn running_max_sum<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lay: &Layout,
    mr: i64,
    nr: i64,
    scale: f64,
    t: &Tile<'ctx>,
    ends: PointerValue<'ctx>,
    probs: Option<i64>,
) -> R<()> {
    let c = |v: i64| fb.i64c(v);
    let s = |o: i64| gep(fb, fb.scratch, c(o));
    let r_first = fb.mul(t.blk, c(mr))?;
    let (bm, sum) = (fb.slot(fb.f32t.into())?, fb.slot(fb.f32t.into())?);
    fb.for_range(c(0), c(mr), |fb, rr| {
        let r = fb.add(r_first, rr)?;
        let row = fb.mul(r, c(nr))?;
        let end = load_end(fb, ends, r)?;
        fb.set(bm, fb.f32c(f64::NEG_INFINITY))?;
        fb.for_range(c(0), c(nr), |fb, i| {
            let seen =
                fb.b.build_int_compare(IntPredicate::SLT, fb.add(t.o0, i)?, end, "seen")
                    .map_err(be)?;
            let at = fb.add(row, i)?;
            let sc = fb.fmul(fb.load_f32(s(lay.t_s)?, at)?, fb.f32c(scale))?;
            let sc = fb.fsel(seen, sc, fb.f32c(f64::NEG_INFINITY))?;
            fb.store_f32(s(lay.t_s)?, at, sc)?;
            fb.set(bm, fb.intrinsic("llvm.maxnum", &[fb.get(bm)?, sc])?)
        })?;
        let any =
            fb.b.build_float_compare(
                FloatPredicate::OGT,
                fb.get(bm)?,
                fb.f32c(f64::NEG_INFINITY),
                "any",
            )
            .map_err(be)?;
        fb.if_else(
            any,
            |fb| {
                let m = fb.load_f32(s(lay.m)?, r)?;
                let m_new = fb.intrinsic("llvm.maxnum", &[m, fb.get(bm)?])?;
                fb.set(sum, fb.f32c(0.0))?;
                fb.for_range(c(0), c(nr), |fb, i| {
                    let at = fb.add(row, i)?;
                    let sc = fb.load_f32(s(lay.t_s)?, at)?;
                    let e = fb.exp(fb.b.build_float_sub(sc, m_new, "z").map_err(be)?)?;
                    if probs.is_some() {
                        fb.store_f32(s(lay.t_s)?, at, e)?;
                    }
                    fb.set(sum, fb.fast(fb.fadd(fb.get(sum)?, e)?))
                })?;
                let corr = fb.exp(fb.b.build_float_sub(m, m_new, "d").map_err(be)?)?;
                if let Some(wp) = probs {
                    let ar = fb.mul(r, c(wp))?;
                    fb.for_range(c(0), c(wp), |fb, cc| {
                        let at = fb.add(ar, cc)?;
                        let a = fb.load_f32(s(lay.acc)?, at)?;
                        fb.store_f32(s(lay.acc)?, at, fb.fmul(a, corr)?)
                    })?;
                }
                let l = fb.load_f32(s(lay.l)?, r)?;
                fb.store_f32(s(lay.l)?, r, fb.fadd(fb.fmul(l, corr)?, fb.get(sum)?)?)?;
                fb.store_f32(s(lay.m)?, r, m_new)
            },
            |fb| match probs {
                Some(_) => fill(fb, gep(fb, s(lay.t_s)?, row)?, c(nr), 0.0),
                None => Ok(()),
            },
        )
    })
}

/// `acc[rows of the tile] += C·X`: `C` the tile (`P` or `dS`, `no` columns), `X` the
/// update's panels.
#[allow(clippy::too_many_arguments)]
fn update<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lay: &Layout,
    uk: FunctionValue<'ctx>,
    mr: i64,
    nr: i64,
    wp: i64,
    t: &Tile<'ctx>,
    no: IntValue<'ctx>,
) -> R<()> {
    let c = |v: i64| fb.i64c(v);
    let s = |o: i64| gep(fb, fb.scratch, c(o));
    let r = fb.mul(t.blk, c(mr))?;
    let a = gep(fb, s(lay.t_s)?, fb.mul(r, c(nr))?)?;
    let acc = gep(fb, s(lay.acc)?, fb.mul(r, c(wp))?)?;
    for p in 0..wp / nr {
        call_uk(
            fb,
            uk,
            a,
            c(nr),
            gep(fb, s(lay.p_u)?, c(p * nr * nr))?,
            gep(fb, acc, c(p * nr))?,
            c(wp),
            no,
            false,
        )?;
    }
    Ok(())
}
