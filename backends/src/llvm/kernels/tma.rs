//! The tensor memory accelerator (sm_90a) for the `wgmma` matmul (`WgCopies::Tma`): tensor
//! maps made on the device, transaction barriers (`mbarrier`) and tiled tensor copies
//! (`cp.async.bulk.tensor`), as PTX or as the simulator's hooks.
//!
//! A tensor map (`CUtensorMap`, 128 opaque bytes) tells the copy engine where a tensor is,
//! its sizes and row pitch, the box one copy moves and the layout it leaves in shared
//! memory. The driver's `cuTensorMapEncodeTiled` makes them on the host, but the host does
//! not know a matmul operand's place or sizes (views, symbolic dims): the kernel computes
//! them. So each block makes its own (`tma_maps`): warp 0's lane 0 zeroes a map in shared
//! memory (on sm_90a a zeroed map is a valid start) and sets every field with
//! `tensormap.replace` (PTX ISA 8.3), and the warp copies it to global memory with
//! `tensormap.cp_fenceproxy` (a release in the tensor-map proxy); thread 0, the only one
//! that issues copies, acquires it there (`fence.proxy.tensormap::generic.acquire`). The
//! global copies are in `egret_tma_maps`, `TMA_SLOTS` slots of the module shared by its
//! kernels (a stream runs them one after another): block `b` uses slot `b`, there being no
//! more blocks in a launch than slots.
//!
//! The maps' row strides are bytes, as the PTX ISA says; `ptxas` before CUDA 12.5 (and by
//! Triton's reckoning 12.6) read them in 16-byte units, and the driver's own `ptxas`
//! assembles the module at load. So the module declares PTX 8.7 (CUDA 12.8) when it uses the
//! accelerator (`crate::ptx`): an older driver refuses it at load, with an error, rather
//! than running it wrong.
//!
//! A copy is issued by one thread and completes on an `mbarrier` in shared memory: the
//! issuing thread announces the bytes to come and arrives (`arrive.expect_tx`), each copy
//! counts its bytes off as they land, and the barrier's phase completes when both are done;
//! a thread waits for a phase by its parity (`try_wait.parity`). The copies write through
//! the async proxy, which `wgmma` reads through: no proxy fence between them.
//!
//! In the simulator there are no maps: a copy's hook gets the tensor's fields and makes the
//! copy, 128-byte swizzle included, when a thread's wait finds the phase's bytes all issued
//! (the latest the GPU may make it); until then its destination holds NaNs, and a `wgmma`
//! that reads it, or a copy over what a `wgmma` still reads, fails the launch.

use inkwell::module::Linkage;
use inkwell::types::{BasicMetadataTypeEnum, IntType};
use inkwell::values::{BasicMetadataValueEnum, IntValue, PointerValue};
use inkwell::{AddressSpace, IntPredicate};

use egret_runtime::plan::{GPU_BLOCK, GPU_MAX_THREADS};

use super::{be, shared_array_aligned, Fb, R, SIMT_HOOKS};

/// Slots of `egret_tma_maps`, each the maps of one block (`TMA_MAPS_PER_BLOCK`): as many as
/// a launch has blocks at most.
const TMA_SLOTS: i64 = GPU_MAX_THREADS / GPU_BLOCK as i64;
/// Bytes of a tensor map (1024 bits), and the alignment its copies keep.
const TMA_MAP_BYTES: i64 = 128;
/// Tensor maps a block makes (a matmul's two operands).
pub(super) const TMA_MAPS_PER_BLOCK: usize = 2;
/// The bytes of a box row that the 128-byte swizzle permutes (the `wgmma` layouts' rows).
pub(super) const TMA_BOX_ROW_BYTES: i64 = 128;

/// `tensormap.replace` field values (PTX ISA, "Tensormap new_val validity"): element type
/// bf16, no interleave, 128-byte swizzle, out-of-bounds elements zero-filled.
const TMAP_BF16: u32 = 10;
const TMAP_NO_INTERLEAVE: u32 = 0;
const TMAP_SWIZZLE_128B: u32 = 3;
const TMAP_ZERO_FILL: u32 = 0;

/// A bf16 tensor of rows, or of matrices of rows (a batch), as the copy engine reads it, in
/// boxes of `TMA_BOX_ROW_BYTES` (64 elements) by `box_rows` rows of one matrix, each landing
/// in shared memory as rows of 128 bytes, the 16-byte chunk `c` of row `r` at chunk
/// `c ^ (r % 8)` (the `wgmma` layouts' swizzle, for a destination on a 1024-byte boundary);
/// elements outside the tensor land as zeros.
#[derive(Clone, Copy)]
pub(super) struct TmaTensor<'ctx> {
    /// Its first element, 16-byte aligned.
    pub base: PointerValue<'ctx>,
    /// Elements along its unit-stride axis (`dims[0]`), rows (`dims[1]`) and matrices
    /// (`dims[2]`), each under 2³¹.
    pub dims: [IntValue<'ctx>; 3],
    /// Bytes from a row to the next, and from a matrix to the next (unused with one): each a
    /// multiple of 16.
    pub strides: [IntValue<'ctx>; 2],
    /// Whether it has more than one matrix (a map of rank 3, not 2).
    pub batched: bool,
    /// Rows of a box (at most 256).
    pub box_rows: i64,
    /// On the GPU, its map in `egret_tma_maps` (a generic address, once `tma_maps` ran).
    pub map: Option<IntValue<'ctx>>,
}

/// Inline PTX `text` with `constraints` over `args` (each `r` or `l`), touching memory,
/// convergent (LLVM moves no call of it under new conditions: some are warp-collective);
/// `ret` the type of `$0` (`=r`) if it returns one.
fn ptx<'ctx>(
    fb: &Fb<'_, 'ctx>,
    text: &str,
    constraints: &str,
    args: &[IntValue<'ctx>],
    ret: Option<IntType<'ctx>>,
) -> R<Option<IntValue<'ctx>>> {
    let params: Vec<BasicMetadataTypeEnum> = args.iter().map(|a| a.get_type().into()).collect();
    let fn_ty = match ret {
        Some(t) => t.fn_type(&params, false),
        None => fb.ctx.void_type().fn_type(&params, false),
    };
    let clobbers = if constraints.is_empty() {
        "~{memory}".to_string()
    } else {
        format!("{constraints},~{{memory}}")
    };
    let asm = fb
        .ctx
        .create_inline_asm(fn_ty, text.into(), clobbers, true, false, None, false);
    let vals: Vec<BasicMetadataValueEnum> = args.iter().map(|a| (*a).into()).collect();
    let call =
        fb.b.build_indirect_call(fn_ty, asm, &vals, "")
            .map_err(be)?;
    let convergent = inkwell::attributes::Attribute::get_named_enum_kind_id("convergent");
    call.add_attribute(
        inkwell::attributes::AttributeLoc::Function,
        fb.ctx.create_enum_attribute(convergent, 0),
    );
    Ok(call
        .try_as_basic_value()
        .basic()
        .map(|v| v.into_int_value()))
}

/// The 32-bit shared-window address of shared-memory pointer `p` (PTX's `r` operands).
fn smem<'ctx>(fb: &Fb<'_, 'ctx>, p: PointerValue<'ctx>) -> R<IntValue<'ctx>> {
    fb.b.build_ptr_to_int(p, fb.ctx.i32_type(), "sa")
        .map_err(be)
}

/// `v` as an i32 operand.
fn i32v<'ctx>(fb: &Fb<'_, 'ctx>, v: IntValue<'ctx>) -> R<IntValue<'ctx>> {
    fb.b.build_int_truncate(v, fb.ctx.i32_type(), "i32")
        .map_err(be)
}

/// A call of simulator hook `SIMT_HOOKS[i]` with pointer and i64 arguments.
fn hook<'ctx>(fb: &Fb<'_, 'ctx>, i: usize, args: &[BasicMetadataValueEnum<'ctx>]) -> R<()> {
    let ptrt = fb.ctx.ptr_type(AddressSpace::default());
    let params: Vec<BasicMetadataTypeEnum> = args
        .iter()
        .map(|a| match a {
            BasicMetadataValueEnum::PointerValue(_) => ptrt.into(),
            _ => fb.i64t.into(),
        })
        .collect();
    let ty = fb.ctx.void_type().fn_type(&params, false);
    fb.hook(SIMT_HOOKS[i], ty, args)?;
    Ok(())
}

/// Makes this block's maps of `tensors` (at most `TMA_MAPS_PER_BLOCK`) and sets their
/// `map`s: warp 0 (`lane` < 32) builds and publishes them, thread 0 acquires them (the
/// module doc). Every thread of the block calls it; the caller's barrier after it is not
/// needed by the maps (thread 0 alone uses them). Nothing in the simulator.
pub(super) fn tma_maps<'ctx>(
    fb: &Fb<'_, 'ctx>,
    tensors: &mut [TmaTensor<'ctx>],
    lane: IntValue<'ctx>,
    blk: IntValue<'ctx>,
) -> R<()> {
    assert!(tensors.len() <= TMA_MAPS_PER_BLOCK);
    if fb.sim {
        return Ok(());
    }
    const NAME: &str = "egret_tma_maps";
    let per_block = TMA_MAP_BYTES * TMA_MAPS_PER_BLOCK as i64;
    let g = fb.module.get_global(NAME).unwrap_or_else(|| {
        let ty = fb.ctx.i8_type().array_type((TMA_SLOTS * per_block) as u32);
        let g = fb
            .module
            .add_global(ty, Some(AddressSpace::from(1u16)), NAME);
        g.set_linkage(Linkage::Internal);
        g.set_initializer(&ty.const_zero());
        g.set_alignment(TMA_MAP_BYTES as u32);
        g
    });
    let global =
        fb.b.build_ptr_to_int(g.as_pointer_value(), fb.i64t, "maps")
            .map_err(be)?;
    let generic_ptr =
        fb.b.build_address_space_cast(
            g.as_pointer_value(),
            fb.ctx.ptr_type(AddressSpace::default()),
            "gmaps",
        )
        .map_err(be)?;
    let generic =
        fb.b.build_ptr_to_int(generic_ptr, fb.i64t, "gmaps")
            .map_err(be)?;
    // (`blk` < `TMA_SLOTS`; the remainder keeps a larger grid inside the array all the same)
    let slot =
        fb.b.build_int_unsigned_rem(blk, fb.i64c(TMA_SLOTS), "slot")
            .map_err(be)?;
    let slot_at = fb.mul(slot, fb.i64c(per_block))?;
    let scratch_ty = fb.i64t.array_type((per_block / 8) as u32);
    let scratch = shared_array_aligned(fb, "tma_maps", scratch_ty, TMA_MAP_BYTES as u32);
    let i32t = fb.ctx.i32_type();
    let at = |i: usize| -> R<(IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>)> {
        let off = fb.add(slot_at, fb.i64c(TMA_MAP_BYTES * i as i64))?;
        let s =
            fb.b.build_int_add(
                smem(fb, scratch)?,
                i32t.const_int((TMA_MAP_BYTES * i as i64) as u64, false),
                "s",
            )
            .map_err(be)?;
        Ok((s, fb.add(global, off)?, fb.add(generic, off)?))
    };
    let cmp = |a, b| {
        fb.b.build_int_compare(IntPredicate::SLT, a, b, "c")
            .map_err(be)
    };
    let first =
        fb.b.build_int_compare(IntPredicate::EQ, lane, fb.i64c(0), "t0")
            .map_err(be)?;
    fb.if_else(
        cmp(lane, fb.i64c(32))?,
        |fb| {
            fb.if_else(
                first,
                |fb| {
                    for w in 0..per_block / 8 {
                        let p = unsafe {
                            fb.b.build_in_bounds_gep(fb.i64t, scratch, &[fb.i64c(w)], "z")
                        }
                        .map_err(be)?;
                        fb.b.build_store(p, fb.i64c(0)).map_err(be)?;
                    }
                    for (i, t) in tensors.iter().enumerate() {
                        let (s, ..) = at(i)?;
                        let base = fb.b.build_ptr_to_int(t.base, fb.i64t, "base").map_err(be)?;
                        ptx(
                            fb,
                            &replace_text(t),
                            "r,l,r,r,r,l,l",
                            &[
                                s,
                                base,
                                i32v(fb, t.dims[0])?,
                                i32v(fb, t.dims[1])?,
                                i32v(fb, t.dims[2])?,
                                t.strides[0],
                                t.strides[1],
                            ],
                            None,
                        )?;
                    }
                    Ok(())
                },
                |_| Ok(()),
            )?;
            let f = fb.declare("llvm.nvvm.bar.warp.sync", &[])?;
            fb.b.build_call(f, &[i32t.const_all_ones().into()], "")
                .map_err(be)?;
            for i in 0..tensors.len() {
                let (s, g, _) = at(i)?;
                let text = format!(
                    "tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu\
                     .sync.aligned [$0], [$1], {TMA_MAP_BYTES};"
                );
                ptx(fb, &text, "l,r", &[g, s], None)?;
            }
            Ok(())
        },
        |_| Ok(()),
    )?;
    for (i, t) in tensors.iter_mut().enumerate() {
        t.map = Some(at(i)?.2);
    }
    fb.if_else(
        first,
        |fb| {
            for t in tensors.iter() {
                let text =
                    format!("fence.proxy.tensormap::generic.acquire.gpu [$0], {TMA_MAP_BYTES};");
                ptx(fb, &text, "l", &[t.map.expect("just set")], None)?;
            }
            Ok(())
        },
        |_| Ok(()),
    )
}

/// The `tensormap.replace`s that make a zeroed map `t`'s (operands: `$0` the map in shared
/// memory, `$1` the address, `$2`-`$4` the dims, `$5`-`$6` the strides in bytes).
fn replace_text(t: &TmaTensor) -> String {
    let rank = if t.batched { 3 } else { 2 };
    let mut lines = vec![
        "global_address.shared::cta.b1024.b64 [$0], $1".to_string(),
        format!("rank.shared::cta.b1024.b32 [$0], {}", rank - 1),
        format!(
            "box_dim.shared::cta.b1024.b32 [$0], 0, {}",
            TMA_BOX_ROW_BYTES / 2
        ),
        format!("box_dim.shared::cta.b1024.b32 [$0], 1, {}", t.box_rows),
    ];
    for d in 0..rank {
        lines.push(format!(
            "global_dim.shared::cta.b1024.b32 [$0], {d}, ${}",
            2 + d
        ));
        lines.push(format!("element_stride.shared::cta.b1024.b32 [$0], {d}, 1"));
    }
    for d in 0..rank - 1 {
        lines.push(format!(
            "global_stride.shared::cta.b1024.b64 [$0], {d}, ${}",
            5 + d
        ));
    }
    if t.batched {
        lines.push("box_dim.shared::cta.b1024.b32 [$0], 2, 1".into());
    }
    lines.extend([
        format!("elemtype.shared::cta.b1024.b32 [$0], {TMAP_BF16}"),
        format!("interleave_layout.shared::cta.b1024.b32 [$0], {TMAP_NO_INTERLEAVE}"),
        format!("swizzle_mode.shared::cta.b1024.b32 [$0], {TMAP_SWIZZLE_128B}"),
        format!("fill_mode.shared::cta.b1024.b32 [$0], {TMAP_ZERO_FILL}"),
    ]);
    lines
        .iter()
        .map(|l| format!("tensormap.replace.tile.{l};"))
        .collect::<Vec<_>>()
        .join("\n\t")
}

/// `mbarrier.init.shared::cta.b64 [bar], count`: a barrier whose phases complete after
/// `count` arrivals (and the transactions they announce).
pub(super) fn mbarrier_init<'ctx>(fb: &Fb<'_, 'ctx>, bar: PointerValue<'ctx>, count: i64) -> R<()> {
    if fb.sim {
        return hook(fb, 13, &[bar.into(), fb.i64c(count).into()]);
    }
    let n = fb.ctx.i32_type().const_int(count as u64, false);
    ptx(
        fb,
        "mbarrier.init.shared::cta.b64 [$0], $1;",
        "r,r",
        &[smem(fb, bar)?, n],
        None,
    )?;
    Ok(())
}

/// `fence.mbarrier_init.release.cluster`: this thread's barrier inits made visible to the
/// copy engine (and, after a block barrier, to the block's threads).
pub(super) fn mbarrier_init_fence(fb: &Fb) -> R<()> {
    if !fb.sim {
        ptx(fb, "fence.mbarrier_init.release.cluster;", "", &[], None)?;
    }
    Ok(())
}

/// `mbarrier.arrive.expect_tx.shared::cta.b64 _, [bar], bytes`: the current phase awaits
/// `bytes` more of copies, and this thread arrives.
pub(super) fn mbarrier_arrive_expect<'ctx>(
    fb: &Fb<'_, 'ctx>,
    bar: PointerValue<'ctx>,
    bytes: i64,
) -> R<()> {
    if fb.sim {
        return hook(fb, 14, &[bar.into(), fb.i64c(bytes).into()]);
    }
    let n = fb.ctx.i32_type().const_int(bytes as u64, false);
    let text = "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;";
    ptx(fb, text, "r,r", &[smem(fb, bar)?, n], None)?;
    Ok(())
}

/// Waits until the phase of `bar` with parity `parity` (0 or 1) has completed:
/// `mbarrier.try_wait.parity` until it says so.
pub(super) fn mbarrier_wait<'ctx>(
    fb: &Fb<'_, 'ctx>,
    bar: PointerValue<'ctx>,
    parity: IntValue<'ctx>,
) -> R<()> {
    if fb.sim {
        return hook(fb, 15, &[bar.into(), parity.into()]);
    }
    let (addr, p) = (smem(fb, bar)?, i32v(fb, parity)?);
    let i32t = fb.ctx.i32_type();
    let head = fb.ctx.append_basic_block(fb.func, "mbar_wait");
    let done = fb.ctx.append_basic_block(fb.func, "mbar_done");
    fb.b.build_unconditional_branch(head).map_err(be)?;
    fb.b.position_at_end(head);
    let text = "{\n\t.reg .pred p;\n\t\
                mbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2;\n\t\
                selp.u32 $0, 1, 0, p;\n\t}";
    let ok = ptx(fb, text, "=r,r,r", &[addr, p], Some(i32t))?.expect("returns");
    let ready =
        fb.b.build_int_compare(IntPredicate::NE, ok, i32t.const_zero(), "ready")
            .map_err(be)?;
    fb.b.build_conditional_branch(ready, done, head)
        .map_err(be)?;
    fb.b.position_at_end(done);
    Ok(())
}

/// `cp.async.bulk.tensor.{2,3}d.shared::cluster.global.mbarrier::complete_tx::bytes`: the box
/// of `t` at element `coords[0]` of row `coords[1]` of matrix `coords[2]` copied to `dst`
/// (shared memory, on a 1024-byte boundary), its bytes counted off `bar`'s current phase as
/// they land.
pub(super) fn tma_load<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dst: PointerValue<'ctx>,
    t: &TmaTensor<'ctx>,
    coords: [IntValue<'ctx>; 3],
    bar: PointerValue<'ctx>,
) -> R<()> {
    let one = fb.i64c(1);
    let (d2, c2) = match t.batched {
        true => (t.dims[2], coords[2]),
        false => (one, fb.i64c(0)),
    };
    if fb.sim {
        let c = |v: i64| fb.i64c(v).into();
        let args = [
            dst.into(),
            t.base.into(),
            t.dims[0].into(),
            t.dims[1].into(),
            d2.into(),
            t.strides[0].into(),
            t.strides[1].into(),
            c(TMA_BOX_ROW_BYTES / 2),
            c(t.box_rows),
            coords[0].into(),
            coords[1].into(),
            c2.into(),
            bar.into(),
        ];
        return hook(fb, 16, &args);
    }
    let map = t.map.expect("tma_maps made the map");
    let (dims, at) = match t.batched {
        true => ("3d", "{$2, $3, $4}], [$5]"),
        false => ("2d", "{$2, $3}], [$4]"),
    };
    let text = format!(
        "cp.async.bulk.tensor.{dims}.shared::cluster.global.mbarrier::complete_tx::bytes \
         [$0], [$1, {at};"
    );
    let mut args = vec![
        smem(fb, dst)?,
        map,
        i32v(fb, coords[0])?,
        i32v(fb, coords[1])?,
    ];
    if t.batched {
        args.push(i32v(fb, coords[2])?);
    }
    args.push(smem(fb, bar)?);
    let constraints = vec!["r", "l"]
        .into_iter()
        .chain(std::iter::repeat_n("r", args.len() - 2))
        .collect::<Vec<_>>()
        .join(",");
    ptx(fb, &text, &constraints, &args, None)?;
    Ok(())
}
