//! One LLVM function per kernel. `Fb` wraps the builder with the few constructs the kernels
//! need: symbol and stride evaluation, thread ranges, counted loops, typed loads and stores,
//! and fast-math arithmetic for reductions.

use std::collections::HashMap;

use inkwell::attributes::AttributeLoc;
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicMetadataTypeEnum, BasicTypeEnum, FloatType, IntType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, BasicValueEnum, FloatValue, FunctionValue,
    InstructionOpcode, IntValue, PointerValue,
};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};

use egret_ir::{AttnGrad, BinaryOp, CompareOp, Dim, ReduceOp, UnaryOp};
use egret_runtime::plan::ElemType;

use crate::kernel::{
    Access, AttnDims, AttnGradIn, Expr, Kernel, PanelType, Poly, Program, Round, ATTN_SPLITS,
    ATTN_SPLIT_MIN_KEYS, ATTN_SPLIT_UNITS, Q8_BLOCK, SPLIT_K, SPLIT_K_MAX_TILES, SPLIT_K_TILE,
};
use crate::BackendError;

mod attn_tiles;
mod mma_attn_bwd;
mod tma;

type R<T> = Result<T, BackendError>;

fn be(e: impl std::fmt::Display) -> BackendError {
    BackendError::Llvm(e.to_string())
}

/// An access with its pointer, offset and strides evaluated at kernel entry.
#[derive(Clone)]
struct Av<'ctx> {
    ptr: PointerValue<'ctx>,
    off: IntValue<'ctx>,
    strides: Vec<IntValue<'ctx>>,
    elem: ElemType,
}

struct Fb<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: Builder<'ctx>,
    func: FunctionValue<'ctx>,
    prog: &'a Program,
    bufs: PointerValue<'ctx>,
    syms: PointerValue<'ctx>,
    tid: IntValue<'ctx>,
    nth: IntValue<'ctx>,
    scratch: PointerValue<'ctx>,
    /// The launch's work counter (an `i64` shared by its threads, zero when it starts), for
    /// kernels that hand out units of work as threads ask (`claim_work`); null on the GPU.
    work: PointerValue<'ctx>,
    args: HashMap<u32, u32>,
    i64t: IntType<'ctx>,
    f32t: FloatType<'ctx>,
    /// Generating for the GPU (NVPTX): no C library, different parallel splits.
    gpu: bool,
    /// GPU matmuls on tensor cores (bf16 operands, f32 sums).
    tensor_cores: bool,
    /// Those with bf16 operands in memory on `wgmma.mma_async` (sm_90a).
    wgmma: bool,
    /// `wgmma` matmuls fed by the tensor memory accelerator (`gpu_wgmma_matmul`'s
    /// `WgCopies::Tma`) rather than by `cp.async`.
    tma: bool,
    /// GPU kernels for this CPU, run by the SIMT simulator (`crate::simt`): barriers and
    /// warp operations call the simulator's hooks, shared memory is ordinary memory.
    sim: bool,
    /// The kernel's first path is generated (`gpu_light`): false in its light entry point,
    /// which the runtime launches where that path is not taken.
    heavy: bool,
}

impl<'a, 'ctx> Fb<'a, 'ctx> {
    fn i64c(&self, v: i64) -> IntValue<'ctx> {
        self.i64t.const_int(v as u64, true)
    }

    fn f32c(&self, v: f64) -> FloatValue<'ctx> {
        self.f32t.const_float(v as f32 as f64)
    }

    fn sym(&self, name: &str) -> R<IntValue<'ctx>> {
        let i = self
            .prog
            .symbols
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| BackendError::Unsupported(format!("unknown symbol {name}")))?;
        let p = unsafe {
            self.b
                .build_in_bounds_gep(self.i64t, self.syms, &[self.i64c(i as i64)], "symp")
        }
        .map_err(be)?;
        Ok(self
            .b
            .build_load(self.i64t, p, name)
            .map_err(be)?
            .into_int_value())
    }

    fn dim(&self, d: &Dim) -> R<IntValue<'ctx>> {
        let mut v = self.i64c(d.constant());
        for (s, coef) in d.terms() {
            let t = self.mul(self.sym(s)?, self.i64c(*coef))?;
            v = self.add(v, t)?;
        }
        Ok(v)
    }

    /// A kernel's batch dims as values, and their product (the batch entries).
    fn batch_dims(&self, batch: &[Dim]) -> R<(Vec<IntValue<'ctx>>, IntValue<'ctx>)> {
        let dims: Vec<IntValue> = batch.iter().map(|d| self.dim(d)).collect::<R<_>>()?;
        let mut n = self.i64c(1);
        for d in &dims {
            n = self.mul(n, *d)?;
        }
        Ok((dims, n))
    }

    fn poly(&self, p: &Poly) -> R<IntValue<'ctx>> {
        let mut v = self.i64c(0);
        for (c, fs) in &p.0 {
            let mut t = self.i64c(*c);
            for f in fs {
                t = self.mul(t, self.dim(f)?)?;
            }
            v = self.add(v, t)?;
        }
        Ok(v)
    }

    fn add(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        self.b.build_int_add(a, b, "").map_err(be)
    }

    fn mul(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        self.b.build_int_mul(a, b, "").map_err(be)
    }

    fn buf(&self, id: u32) -> R<PointerValue<'ctx>> {
        let i = self.args[&id];
        let ptrt = self.ctx.ptr_type(AddressSpace::default());
        let p = unsafe {
            self.b
                .build_in_bounds_gep(ptrt, self.bufs, &[self.i64c(i as i64)], "bufp")
        }
        .map_err(be)?;
        Ok(self
            .b
            .build_load(ptrt, p, "buf")
            .map_err(be)?
            .into_pointer_value())
    }

    fn access(&self, a: &Access, elem: ElemType) -> R<Av<'ctx>> {
        Ok(Av {
            ptr: self.buf(a.buf)?,
            off: self.poly(&a.offset)?,
            strides: a.strides.iter().map(|s| self.poly(s)).collect::<R<_>>()?,
            elem,
        })
    }

    fn elem_type(&self, e: ElemType) -> BasicTypeEnum<'ctx> {
        match e {
            ElemType::F32 => self.f32t.into(),
            ElemType::I64 => self.i64t.into(),
            ElemType::Bool | ElemType::Bytes => self.ctx.i8_type().into(),
            ElemType::Half | ElemType::BF16 => self.ctx.i16_type().into(),
        }
    }

    /// bf16 bits (an i16) as the f32 they stand for (exact).
    fn bf16_to_f32(&self, h: IntValue<'ctx>) -> R<FloatValue<'ctx>> {
        let i32t = self.ctx.i32_type();
        let w = self.b.build_int_z_extend(h, i32t, "bz").map_err(be)?;
        let w = self
            .b
            .build_left_shift(w, i32t.const_int(16, false), "bs")
            .map_err(be)?;
        Ok(self
            .b
            .build_bit_cast(w, self.f32t, "bf")
            .map_err(be)?
            .into_float_value())
    }

    /// A float element `idx` of `av`'s buffer (f32, or bf16 widened exactly).
    fn load_float(&self, av: &Av<'ctx>, idx: IntValue<'ctx>) -> R<FloatValue<'ctx>> {
        match av.elem {
            ElemType::F32 => self.load_f32(av.ptr, idx),
            ElemType::BF16 => Ok(self.load(av, idx)?.into_float_value()),
            other => Err(BackendError::Unsupported(format!(
                "a float operand stored as {other:?}"
            ))),
        }
    }

    /// Loads element `idx` of `av`'s buffer (bools as i1).
    fn load(&self, av: &Av<'ctx>, idx: IntValue<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let ty = self.elem_type(av.elem);
        let p = unsafe { self.b.build_in_bounds_gep(ty, av.ptr, &[idx], "p") }.map_err(be)?;
        let v = self.b.build_load(ty, p, "v").map_err(be)?;
        Ok(match av.elem {
            ElemType::BF16 => self.bf16_to_f32(v.into_int_value())?.into(),
            ElemType::Bool => self
                .b
                .build_int_compare(
                    IntPredicate::NE,
                    v.into_int_value(),
                    self.ctx.i8_type().const_zero(),
                    "b",
                )
                .map_err(be)?
                .into(),
            _ => v,
        })
    }

    fn store(
        &self,
        ptr: PointerValue<'ctx>,
        elem: ElemType,
        idx: IntValue<'ctx>,
        v: BasicValueEnum<'ctx>,
    ) -> R<()> {
        let ty = self.elem_type(elem);
        let p = unsafe { self.b.build_in_bounds_gep(ty, ptr, &[idx], "p") }.map_err(be)?;
        let v: BasicValueEnum = match elem {
            ElemType::Bool => self
                .b
                .build_int_z_extend(v.into_int_value(), self.ctx.i8_type(), "z")
                .map_err(be)?
                .into(),
            // Rounded to nearest even, the high half of its bits kept.
            ElemType::BF16 => {
                let r = round_bf16(self, v.into_float_value())?;
                let i32t = self.ctx.i32_type();
                let w = self.b.build_bit_cast(r, i32t, "rb").map_err(be)?;
                let hi = self
                    .b
                    .build_right_shift(w.into_int_value(), i32t.const_int(16, false), false, "hi")
                    .map_err(be)?;
                self.b
                    .build_int_truncate(hi, self.ctx.i16_type(), "h")
                    .map_err(be)?
                    .into()
            }
            _ => v,
        };
        self.b.build_store(p, v).map_err(be)?;
        Ok(())
    }

    fn load_f32(&self, ptr: PointerValue<'ctx>, idx: IntValue<'ctx>) -> R<FloatValue<'ctx>> {
        let p = unsafe { self.b.build_in_bounds_gep(self.f32t, ptr, &[idx], "p") }.map_err(be)?;
        Ok(self
            .b
            .build_load(self.f32t, p, "f")
            .map_err(be)?
            .into_float_value())
    }

    fn store_f32(
        &self,
        ptr: PointerValue<'ctx>,
        idx: IntValue<'ctx>,
        v: FloatValue<'ctx>,
    ) -> R<()> {
        let p = unsafe { self.b.build_in_bounds_gep(self.f32t, ptr, &[idx], "p") }.map_err(be)?;
        self.b.build_store(p, v).map_err(be)?;
        Ok(())
    }

    /// `[total·tid/n, total·(tid+1)/n)`: this thread's share of `total` work units.
    fn split(&self, total: IntValue<'ctx>) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
        let s = self
            .b
            .build_int_signed_div(self.mul(total, self.tid)?, self.nth, "s")
            .map_err(be)?;
        let t1 = self.add(self.tid, self.i64c(1))?;
        let e = self
            .b
            .build_int_signed_div(self.mul(total, t1)?, self.nth, "e")
            .map_err(be)?;
        Ok((s, e))
    }

    /// Runs `body(i)` for this thread's share of `0..total`: on the GPU every `nth`-th item
    /// from `tid` (a grid-stride loop, so neighbouring threads take neighbouring items and
    /// their accesses coalesce however many items each takes; a launch has at most
    /// `GPU_MAX_THREADS`), elsewhere one contiguous range (`split`).
    fn for_each_share(
        &self,
        total: IntValue<'ctx>,
        body: impl FnMut(&Self, IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        if self.gpu {
            self.for_stride(self.tid, total, self.nth, body)
        } else {
            let (s, e) = self.split(total)?;
            self.for_range(s, e, body)
        }
    }

    /// Runs `body(ch, start, end)` over work the launch's threads claim from its shared
    /// counter as they go, so a thread slowed down (a busy neighbour on a shared core, a page
    /// fault) takes less of it instead of holding up the others. Two ways of cutting it,
    /// chosen at run time by `guided`:
    /// - guided (`ch` = 0): `start..end` ranges of `0..items`, each a `1/(2·nthreads)` share
    ///   of what is left (at least one item), so early claims are long contiguous runs and
    ///   the last ones single items, which bounds the wait at the end by one item's time;
    /// - fixed units: unit `u` of `chunks × ranges` is range `u % ranges` of `ranges` equal
    ///   ranges of `0..items`, in chunk `u / ranges` (for work that costs something per unit
    ///   taken, like packing a chunk's rows).
    ///
    /// CPU only (`work` is null on the GPU).
    fn claim_work(
        &self,
        guided: IntValue<'ctx>,
        items: IntValue<'ctx>,
        chunks: IntValue<'ctx>,
        ranges: IntValue<'ctx>,
        mut body: impl FnMut(&Self, [IntValue<'ctx>; 3]) -> R<()>,
    ) -> R<()> {
        if self.gpu {
            return Err(BackendError::Unsupported(
                "work claimed from a counter is a CPU schedule".into(),
            ));
        }
        let bb = |n: &str| self.ctx.append_basic_block(self.func, n);
        let (head, gclaim, uclaim, got, exit) = (
            bb("claim"),
            bb("claim_guided"),
            bb("claim_unit"),
            bb("claimed"),
            bb("claimed_all"),
        );
        let b = &self.b;
        b.build_unconditional_branch(head).map_err(be)?;
        b.position_at_end(head);
        b.build_conditional_branch(guided, gclaim, uclaim)
            .map_err(be)?;
        // Guided: compare-and-swap the next free item forward by the share taken.
        b.position_at_end(gclaim);
        let cur = b
            .build_load(self.i64t, self.work, "cur")
            .map_err(be)?
            .into_int_value();
        cur.as_instruction_value()
            .expect("load")
            .set_atomic_ordering(inkwell::AtomicOrdering::Monotonic)
            .map_err(be)?;
        cur.as_instruction_value()
            .expect("load")
            .set_alignment(8)
            .map_err(be)?;
        let left = b.build_int_sub(items, cur, "left").map_err(be)?;
        let share = b
            .build_int_signed_div(left, self.mul(self.nth, self.i64c(2))?, "share")
            .map_err(be)?;
        let one = b
            .build_int_compare(IntPredicate::SLT, share, self.i64c(1), "one")
            .map_err(be)?;
        let share = b
            .build_select(one, self.i64c(1), share, "take")
            .map_err(be)?
            .into_int_value();
        let gend = self.add(cur, share)?;
        let none_left = b
            .build_int_compare(IntPredicate::SGE, cur, items, "none")
            .map_err(be)?;
        let try_bb = bb("claim_try");
        b.build_conditional_branch(none_left, exit, try_bb)
            .map_err(be)?;
        b.position_at_end(try_bb);
        let swapped = b
            .build_cmpxchg(
                self.work,
                cur,
                gend,
                inkwell::AtomicOrdering::Monotonic,
                inkwell::AtomicOrdering::Monotonic,
            )
            .map_err(be)?;
        let ok = b
            .build_extract_value(swapped, 1, "ok")
            .map_err(be)?
            .into_int_value();
        b.build_conditional_branch(ok, got, head).map_err(be)?;
        // Fixed units: one increment per unit.
        b.position_at_end(uclaim);
        let u = b
            .build_atomicrmw(
                inkwell::AtomicRMWBinOp::Add,
                self.work,
                self.i64c(1),
                inkwell::AtomicOrdering::Monotonic,
            )
            .map_err(be)?;
        let more = b
            .build_int_compare(IntPredicate::SLT, u, self.mul(chunks, ranges)?, "more")
            .map_err(be)?;
        let unit_bb = bb("claim_unit_range");
        b.build_conditional_branch(more, unit_bb, exit)
            .map_err(be)?;
        b.position_at_end(unit_bb);
        let ch = b.build_int_signed_div(u, ranges, "ch").map_err(be)?;
        let r = b.build_int_signed_rem(u, ranges, "r").map_err(be)?;
        let ustart = b
            .build_int_signed_div(self.mul(items, r)?, ranges, "us")
            .map_err(be)?;
        let uend = b
            .build_int_signed_div(self.mul(items, self.add(r, self.i64c(1))?)?, ranges, "ue")
            .map_err(be)?;
        b.build_unconditional_branch(got).map_err(be)?;
        b.position_at_end(got);
        let mut vals = [self.i64c(0); 3];
        for (i, (g, u_)) in [(self.i64c(0), ch), (cur, ustart), (gend, uend)]
            .into_iter()
            .enumerate()
        {
            let phi = b.build_phi(self.i64t, "claimed").map_err(be)?;
            phi.add_incoming(&[(&g, try_bb), (&u_, unit_bb)]);
            vals[i] = phi.as_basic_value().into_int_value();
        }
        body(self, vals)?;
        self.b.build_unconditional_branch(head).map_err(be)?;
        self.b.position_at_end(exit);
        Ok(())
    }

    /// `for i in start..end { body(i) }`.
    fn for_range(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        mut body: impl FnMut(&Self, IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        let pre = self.b.get_insert_block().expect("positioned");
        let head = self.ctx.append_basic_block(self.func, "loop");
        let bodyb = self.ctx.append_basic_block(self.func, "body");
        let exit = self.ctx.append_basic_block(self.func, "exit");
        self.b.build_unconditional_branch(head).map_err(be)?;
        self.b.position_at_end(head);
        let phi = self.b.build_phi(self.i64t, "i").map_err(be)?;
        phi.add_incoming(&[(&start, pre)]);
        let i = phi.as_basic_value().into_int_value();
        let c = self
            .b
            .build_int_compare(IntPredicate::SLT, i, end, "c")
            .map_err(be)?;
        self.b
            .build_conditional_branch(c, bodyb, exit)
            .map_err(be)?;
        self.b.position_at_end(bodyb);
        body(self, i)?;
        let next = self.add(i, self.i64c(1))?;
        let latch = self.b.get_insert_block().expect("positioned");
        self.b.build_unconditional_branch(head).map_err(be)?;
        phi.add_incoming(&[(&next, latch)]);
        self.b.position_at_end(exit);
        Ok(())
    }

    /// `for i in (start..end).step_by(step)` (`step` > 0; nothing when `start >= end`).
    fn for_stride(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        step: IntValue<'ctx>,
        mut body: impl FnMut(&Self, IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        let span = self.b.build_int_sub(end, start, "span").map_err(be)?;
        let span = self.add(
            span,
            self.b.build_int_sub(step, self.i64c(1), "s1").map_err(be)?,
        )?;
        let count = self
            .b
            .build_int_signed_div(span, step, "count")
            .map_err(be)?;
        self.for_range(self.i64c(0), count, |fb, i| {
            body(fb, fb.add(start, fb.mul(i, step)?)?)
        })
    }

    /// Whether `x` is a multiple of `m` (a power of two).
    fn multiple_of(&self, x: IntValue<'ctx>, m: i64) -> R<IntValue<'ctx>> {
        let low = self.b.build_and(x, self.i64c(m - 1), "low").map_err(be)?;
        self.b
            .build_int_compare(IntPredicate::EQ, low, self.i64c(0), "mult")
            .map_err(be)
    }

    /// Whether `p` is aligned to `bytes` (a power of two).
    fn ptr_aligned(&self, p: PointerValue<'ctx>, bytes: i64) -> R<IntValue<'ctx>> {
        let a = self.b.build_ptr_to_int(p, self.i64t, "pa").map_err(be)?;
        self.multiple_of(a, bytes)
    }

    /// `min(a, b)`, signed.
    fn imin(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        self.pick(IntPredicate::SLT, a, b)
    }

    /// `max(a, b)`, signed.
    fn imax(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        self.pick(IntPredicate::SGT, a, b)
    }

    /// `if a <pred> b { a } else { b }`.
    fn pick(&self, pred: IntPredicate, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let c = self.b.build_int_compare(pred, a, b, "c").map_err(be)?;
        Ok(self
            .b
            .build_select(c, a, b, "pick")
            .map_err(be)?
            .into_int_value())
    }

    /// `if cond { then(..) } else { other(..) }`.
    fn if_else(
        &self,
        cond: IntValue<'ctx>,
        then: impl FnOnce(&Self) -> R<()>,
        other: impl FnOnce(&Self) -> R<()>,
    ) -> R<()> {
        let (tb, eb, join) = (
            self.ctx.append_basic_block(self.func, "then"),
            self.ctx.append_basic_block(self.func, "else"),
            self.ctx.append_basic_block(self.func, "join"),
        );
        self.b.build_conditional_branch(cond, tb, eb).map_err(be)?;
        self.b.position_at_end(tb);
        then(self)?;
        self.b.build_unconditional_branch(join).map_err(be)?;
        self.b.position_at_end(eb);
        other(self)?;
        self.b.build_unconditional_branch(join).map_err(be)?;
        self.b.position_at_end(join);
        Ok(())
    }

    /// A stack slot in the entry block (promoted to a register by LLVM).
    fn slot(&self, ty: BasicTypeEnum<'ctx>) -> R<PointerValue<'ctx>> {
        let entry = self.func.get_first_basic_block().expect("entry");
        let tmp = self.ctx.create_builder();
        match entry.get_first_instruction() {
            Some(i) => tmp.position_before(&i),
            None => tmp.position_at_end(entry),
        }
        tmp.build_alloca(ty, "slot").map_err(be)
    }

    fn get(&self, slot: PointerValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self
            .b
            .build_load(self.f32t, slot, "g")
            .map_err(be)?
            .into_float_value())
    }

    fn set(&self, slot: PointerValue<'ctx>, v: FloatValue<'ctx>) -> R<()> {
        self.b.build_store(slot, v).map_err(be)?;
        Ok(())
    }

    fn fast(&self, v: FloatValue<'ctx>) -> FloatValue<'ctx> {
        if let Some(i) = v.as_instruction() {
            if matches!(
                i.get_opcode(),
                InstructionOpcode::FAdd | InstructionOpcode::FMul | InstructionOpcode::FSub
            ) {
                use inkwell::values::FastMathFlags as F;
                let _ = i.set_fast_math_flags(F::AllowReassoc | F::AllowContract);
            }
        }
        v
    }

    fn fadd(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        self.b.build_float_add(a, b, "").map_err(be)
    }

    fn fmul(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        self.b.build_float_mul(a, b, "").map_err(be)
    }

    /// `acc + a·b` with reassociation and contraction allowed (vectorisable dot products).
    fn fma_fast(
        &self,
        acc: FloatValue<'ctx>,
        a: FloatValue<'ctx>,
        b: FloatValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        let p = self.fast(self.fmul(a, b)?);
        Ok(self.fast(self.fadd(acc, p)?))
    }

    /// LLVM intrinsic `name` declared in the module, overloaded on `types`.
    fn declare(&self, name: &str, types: &[BasicTypeEnum<'ctx>]) -> R<FunctionValue<'ctx>> {
        Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.module, types))
            .ok_or_else(|| BackendError::Llvm(format!("no intrinsic {name}")))
    }

    fn intrinsic(&self, name: &str, args: &[FloatValue<'ctx>]) -> R<FloatValue<'ctx>> {
        let f = self.declare(name, &[self.f32t.into()])?;
        let a: Vec<BasicMetadataValueEnum> = args.iter().map(|v| (*v).into()).collect();
        let r = self.b.build_call(f, &a, name).map_err(be)?;
        Ok(r.try_as_basic_value()
            .basic()
            .expect("intrinsic returns a value")
            .into_float_value())
    }

    /// A three-operand f32 intrinsic (`llvm.fma`).
    fn intrinsic3(
        &self,
        name: &str,
        a: FloatValue<'ctx>,
        b: FloatValue<'ctx>,
        c: FloatValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        let f = self.declare(name, &[self.f32t.into()])?;
        let r = self
            .b
            .build_call(f, &[a.into(), b.into(), c.into()], name)
            .map_err(be)?;
        Ok(r.try_as_basic_value()
            .basic()
            .expect("intrinsic returns a value")
            .into_float_value())
    }

    /// `tanhf` from the C library (there is no LLVM intrinsic).
    fn libm(&self, name: &str, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let f = self.module.get_function(name).unwrap_or_else(|| {
            self.module.add_function(
                name,
                self.f32t.fn_type(&[self.f32t.into()], false),
                Some(Linkage::External),
            )
        });
        let r = self.b.build_call(f, &[x.into()], name).map_err(be)?;
        Ok(r.try_as_basic_value()
            .basic()
            .expect("returns f32")
            .into_float_value())
    }

    /// `e^x` in straight-line arithmetic (no libm call), so loops around it vectorise:
    /// `x = n·ln2 + r` with `n = round(x·log2 e)`, `|r| ≤ ln2/2`, `e^r` by a degree-6
    /// polynomial (Taylor coefficients; error below 2 ulp on that interval), and `2^n`
    /// assembled in the exponent bits. Below -87.3 the result is 0 (so `exp(-inf) = 0`),
    /// above 88.7 +inf, and NaN stays NaN.
    fn exp(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let f = |v: f64| self.f32c(v);
        let xc = self.intrinsic("llvm.maxnum", &[x, f(-87.3)])?;
        let xc = self.intrinsic("llvm.minnum", &[xc, f(88.7)])?;
        let n = self.intrinsic("llvm.rint", &[self.fmul(xc, f(std::f64::consts::LOG2_E))?])?;
        // r = x - n·ln2, with ln2 split in two for precision (Cody-Waite).
        let r = self
            .b
            .build_float_sub(xc, self.fmul(n, f(0.693_359_375))?, "r")
            .map_err(be)?;
        let r = self
            .b
            .build_float_sub(r, self.fmul(n, f(-2.121_944_400_546_905_8e-4))?, "r")
            .map_err(be)?;
        let mut p = f(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = self.fadd(self.fmul(p, r)?, f(c))?;
        }
        let i32t = self.ctx.i32_type();
        let ni = self
            .b
            .build_float_to_signed_int(n, i32t, "ni")
            .map_err(be)?;
        let bits = self
            .b
            .build_left_shift(
                self.b
                    .build_int_add(ni, i32t.const_int(127, false), "b")
                    .map_err(be)?,
                i32t.const_int(23, false),
                "e",
            )
            .map_err(be)?;
        let scale = self
            .b
            .build_bit_cast(bits, self.f32t, "pow2")
            .map_err(be)?
            .into_float_value();
        let y = self.fmul(p, scale)?;
        let tiny = self
            .b
            .build_float_compare(FloatPredicate::OLT, x, f(-87.3), "tiny")
            .map_err(be)?;
        let y = self
            .b
            .build_select(tiny, f(0.0), y, "y")
            .map_err(be)?
            .into_float_value();
        let huge = self
            .b
            .build_float_compare(FloatPredicate::OGT, x, f(88.7), "huge")
            .map_err(be)?;
        let y = self
            .b
            .build_select(huge, f(f64::INFINITY), y, "y")
            .map_err(be)?
            .into_float_value();
        let nan = self
            .b
            .build_float_compare(FloatPredicate::UNO, x, x, "nan")
            .map_err(be)?;
        Ok(self
            .b
            .build_select(nan, x, y, "exp")
            .map_err(be)?
            .into_float_value())
    }

    /// `if c { a } else { b }` of integers.
    fn isel(&self, c: IntValue<'ctx>, a: IntValue<'ctx>, b: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        Ok(self
            .b
            .build_select(c, a, b, "sel")
            .map_err(be)?
            .into_int_value())
    }

    /// `⌈x / d⌉` for `x ≥ 0`, `d > 0`.
    fn ceil_div(&self, x: IntValue<'ctx>, d: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let d1 = self.b.build_int_sub(d, self.i64c(1), "d1").map_err(be)?;
        self.b
            .build_int_signed_div(self.add(x, d1)?, d, "ceil")
            .map_err(be)
    }

    fn fsel(
        &self,
        c: IntValue<'ctx>,
        a: FloatValue<'ctx>,
        b: FloatValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        Ok(self
            .b
            .build_select(c, a, b, "sel")
            .map_err(be)?
            .into_float_value())
    }

    fn fcmp(
        &self,
        p: FloatPredicate,
        a: FloatValue<'ctx>,
        b: FloatValue<'ctx>,
    ) -> R<IntValue<'ctx>> {
        self.b.build_float_compare(p, a, b, "fc").map_err(be)
    }

    /// A call of simulator hook `name` (one of `SIMT_HOOKS`), declared on first use.
    fn hook(
        &self,
        name: &str,
        ty: inkwell::types::FunctionType<'ctx>,
        args: &[BasicMetadataValueEnum<'ctx>],
    ) -> R<Option<inkwell::values::BasicValueEnum<'ctx>>> {
        debug_assert!(SIMT_HOOKS.contains(&name));
        let f = self
            .module
            .get_function(name)
            .unwrap_or_else(|| self.module.add_function(name, ty, Some(Linkage::External)));
        let r = self.b.build_call(f, args, name).map_err(be)?;
        Ok(r.try_as_basic_value().basic())
    }

    /// In the simulator, a check that a vector access of `bytes` bytes at `p` is aligned as
    /// the GPU requires (`egret_simt_aligned`); nothing on the GPU itself.
    fn check_aligned(&self, p: PointerValue<'ctx>, bytes: u64) -> R<()> {
        if self.sim {
            let ptrt = self.ctx.ptr_type(AddressSpace::default());
            let ty = self
                .ctx
                .void_type()
                .fn_type(&[ptrt.into(), self.i64t.into()], false);
            let n = self.i64t.const_int(bytes, false);
            self.hook(SIMT_HOOKS[4], ty, &[p.into(), n.into()])?;
        }
        Ok(())
    }

    /// An NVVM intrinsic `f32 → f32` (`sin.approx.f`, ...); in the simulator, the C
    /// library's function of the same meaning.
    fn nvvm(&self, name: &str, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        if self.sim {
            let f = match name {
                "sin.approx.f" => "sinf",
                "cos.approx.f" => "cosf",
                _ => return Err(BackendError::Unsupported(format!("simulated nvvm.{name}"))),
            };
            return self.libm(f, x);
        }
        let full = format!("llvm.nvvm.{name}");
        let f = self.module.get_function(&full).unwrap_or_else(|| {
            self.module
                .add_function(&full, self.f32t.fn_type(&[self.f32t.into()], false), None)
        });
        let r = self.b.build_call(f, &[x.into()], name).map_err(be)?;
        Ok(r.try_as_basic_value()
            .basic()
            .expect("returns f32")
            .into_float_value())
    }

    /// Natural logarithm. CPU: `llvm.log`. GPU (no C library): `x = m·2^e`, `m ∈ [√½, √2)`,
    /// `ln m = 2·atanh(s)`, `s = (m−1)/(m+1)`, by its series to `s⁹/9` (`|s| < 0.172`, so the
    /// truncation is below 1e-9); subnormals are scaled by 2²³ first; `ln 0 = −∞`, `ln x<0`
    /// and `ln NaN` are NaN, `ln ∞ = ∞`.
    fn log(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        if !self.gpu {
            return self.intrinsic("llvm.log", &[x]);
        }
        let f = |v: f64| self.f32c(v);
        let i32t = self.ctx.i32_type();
        let c = |v: u64| i32t.const_int(v, false);
        let sub = self.fcmp(FloatPredicate::OLT, x, f(1.175_494_4e-38))?;
        let xs = self.fsel(sub, self.fmul(x, f(8_388_608.0))?, x)?;
        let bits = self
            .b
            .build_bit_cast(xs, i32t, "bits")
            .map_err(be)?
            .into_int_value();
        let e = self
            .b
            .build_right_shift(bits, c(23), false, "e")
            .map_err(be)?;
        let e = self.b.build_and(e, c(0xff), "e").map_err(be)?;
        let e = self.b.build_int_sub(e, c(127), "e").map_err(be)?;
        let mb = self.b.build_and(bits, c(0x7f_ffff), "m").map_err(be)?;
        let mb = self.b.build_or(mb, c(0x3f80_0000), "m").map_err(be)?;
        let m = self
            .b
            .build_bit_cast(mb, self.f32t, "m")
            .map_err(be)?
            .into_float_value();
        let big = self.fcmp(FloatPredicate::OGT, m, f(std::f64::consts::SQRT_2))?;
        let m = self.fsel(big, self.fmul(m, f(0.5))?, m)?;
        let ef = self
            .b
            .build_signed_int_to_float(e, self.f32t, "ef")
            .map_err(be)?;
        let ef = self.fsel(big, self.fadd(ef, f(1.0))?, ef)?;
        let ef = self.fsel(
            sub,
            self.b.build_float_sub(ef, f(23.0), "ef").map_err(be)?,
            ef,
        )?;
        let num = self.b.build_float_sub(m, f(1.0), "n").map_err(be)?;
        let s = self
            .b
            .build_float_div(num, self.fadd(m, f(1.0))?, "s")
            .map_err(be)?;
        let s2 = self.fmul(s, s)?;
        let mut p = f(1.0 / 9.0);
        for k in [1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
            p = self.fadd(self.fmul(p, s2)?, f(k))?;
        }
        let lnm = self.fmul(self.fmul(f(2.0), s)?, p)?;
        let y = self.fadd(self.fmul(ef, f(std::f64::consts::LN_2))?, lnm)?;
        let zero = self.fcmp(FloatPredicate::OEQ, x, f(0.0))?;
        let y = self.fsel(zero, f(f64::NEG_INFINITY), y)?;
        let inf = self.fcmp(FloatPredicate::OEQ, x, f(f64::INFINITY))?;
        let y = self.fsel(inf, x, y)?;
        let bad = self.fcmp(FloatPredicate::ULT, x, f(0.0))?;
        self.fsel(bad, f(f64::NAN), y)
    }

    /// `sin x` or `cos x`. GPU: reduced to `[−π, π]` by `x − 2π·rint(x/2π)` with 2π in three
    /// parts (Cody-Waite), then the hardware's `sin.approx`/`cos.approx` (absolute error
    /// about 2⁻²¹ there).
    fn sin_cos(&self, x: FloatValue<'ctx>, cos: bool) -> R<FloatValue<'ctx>> {
        if !self.gpu {
            return self.intrinsic(if cos { "llvm.cos" } else { "llvm.sin" }, &[x]);
        }
        let f = |v: f64| self.f32c(v);
        let k = self.intrinsic(
            "llvm.rint",
            &[self.fmul(x, f(1.0 / (2.0 * std::f64::consts::PI)))?],
        )?;
        let mut r = x;
        for part in [
            6.28125,
            1.935_482_025_146_484_4e-3,
            -1.748_455_531_469_517_2e-7,
        ] {
            r = self
                .b
                .build_float_sub(r, self.fmul(k, f(part))?, "r")
                .map_err(be)?;
        }
        self.nvvm(if cos { "cos.approx.f" } else { "sin.approx.f" }, r)
    }

    /// `tanh x`. GPU: `sign(x)·(1−t)/(1+t)`, `t = e^(−2|x|)`; below `|x| = 0.004`,
    /// `x − x³/3` (where `1−t` would cancel).
    fn tanh(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        if !self.gpu {
            return self.libm("tanhf", x);
        }
        let f = |v: f64| self.f32c(v);
        let ax = self.intrinsic("llvm.fabs", &[x])?;
        let t = self.exp(self.fmul(ax, f(-2.0))?)?;
        let y = self
            .b
            .build_float_div(
                self.b.build_float_sub(f(1.0), t, "n").map_err(be)?,
                self.fadd(f(1.0), t)?,
                "y",
            )
            .map_err(be)?;
        let neg = self.fcmp(FloatPredicate::OLT, x, f(0.0))?;
        let y = self.fsel(neg, self.b.build_float_neg(y, "ny").map_err(be)?, y)?;
        let x3 = self.fmul(self.fmul(x, x)?, x)?;
        let small = self
            .b
            .build_float_sub(x, self.fmul(x3, f(1.0 / 3.0))?, "s")
            .map_err(be)?;
        let tiny = self.fcmp(FloatPredicate::OLT, ax, f(0.004))?;
        self.fsel(tiny, small, y)
    }

    /// `x^y`. GPU: `e^(y·ln|x|)`, negative for `x < 0` and odd integer `y`, NaN for `x < 0`
    /// and non-integer `y`, and `x^0 = 1`.
    fn pow(&self, x: FloatValue<'ctx>, y: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        if !self.gpu {
            return self.intrinsic("llvm.pow", &[x, y]);
        }
        let f = |v: f64| self.f32c(v);
        let ax = self.intrinsic("llvm.fabs", &[x])?;
        let r = self.exp(self.fmul(y, self.log(ax)?)?)?;
        let yi = self.intrinsic("llvm.rint", &[y])?;
        let int = self.fcmp(FloatPredicate::OEQ, yi, y)?;
        let half = self.intrinsic("llvm.rint", &[self.fmul(y, f(0.5))?])?;
        let even = self.fcmp(FloatPredicate::OEQ, self.fmul(half, f(2.0))?, y)?;
        let neg = self.fcmp(FloatPredicate::OLT, x, f(0.0))?;
        let odd = self.b.build_not(even, "odd").map_err(be)?;
        let flip = self.b.build_and(neg, odd, "flip").map_err(be)?;
        let r = self.fsel(flip, self.b.build_float_neg(r, "nr").map_err(be)?, r)?;
        let nonint = self.b.build_not(int, "ni").map_err(be)?;
        let bad = self.b.build_and(neg, nonint, "bad").map_err(be)?;
        let r = self.fsel(bad, f(f64::NAN), r)?;
        let y0 = self.fcmp(FloatPredicate::OEQ, y, f(0.0))?;
        self.fsel(y0, f(1.0), r)
    }

    fn sigmoid(&self, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let n = self.b.build_float_neg(x, "n").map_err(be)?;
        let e = self.exp(n)?;
        let d = self.fadd(self.f32c(1.0), e)?;
        self.b.build_float_div(self.f32c(1.0), d, "sig").map_err(be)
    }

    /// Row-major multi-index of `lin` over `dims`.
    fn decompose(
        &self,
        mut lin: IntValue<'ctx>,
        dims: &[IntValue<'ctx>],
    ) -> R<Vec<IntValue<'ctx>>> {
        let mut idx = vec![self.i64c(0); dims.len()];
        for d in (0..dims.len()).rev() {
            if d == 0 {
                idx[0] = lin;
            } else {
                idx[d] = self.b.build_int_signed_rem(lin, dims[d], "r").map_err(be)?;
                lin = self.b.build_int_signed_div(lin, dims[d], "q").map_err(be)?;
            }
        }
        Ok(idx)
    }

    /// `off + Σ idx[d]·strides[d]` over the given dims of an access.
    fn at(&self, av: &Av<'ctx>, idx: &[(usize, IntValue<'ctx>)]) -> R<IntValue<'ctx>> {
        let mut o = av.off;
        for (d, i) in idx {
            o = self.add(o, self.mul(*i, av.strides[*d])?)?;
        }
        Ok(o)
    }

    fn ret_ok(&self) -> R<()> {
        self.b
            .build_return(Some(&self.ctx.i32_type().const_zero()))
            .map_err(be)?;
        Ok(())
    }
}

/// What the kernel functions are generated for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// A CPU (LLVM name and feature string): each function is an exported kernel.
    Cpu { cpu: String, features: String },
    /// NVPTX: each function is the private body of a GPU entry point; `tid`/`nthreads` are
    /// the global thread index and count, and the C library is not there. With
    /// `tensor_cores`, large matmuls round their operands to bf16 and run on `mma.sync`, or
    /// with `wgmma` (sm_90a) on `wgmma.mma_async` where their operands are bf16, and with
    /// `tma` too those fed by the tensor memory accelerator (`WgCopies::Tma`).
    Gpu {
        tensor_cores: bool,
        wgmma: bool,
        tma: bool,
    },
    /// The GPU's kernels compiled for this CPU, for the SIMT simulator (`crate::simt`):
    /// each function is an exported body with the CPU kernel ABI, called once per simulated
    /// GPU thread; barriers and warp operations call the simulator's hooks (`SIMT_HOOKS`).
    Simt {
        tensor_cores: bool,
        wgmma: bool,
        tma: bool,
    },
}

impl Flavor {
    /// Whether the kernels are the GPU's (for the device or its simulator).
    pub fn gpu(&self) -> bool {
        !matches!(self, Flavor::Cpu { .. })
    }
}

/// The functions simulated GPU code calls (defined by `crate::simt`, bound at JIT time):
/// - `egret_simt_barrier()`: `bar.sync 0`;
/// - `egret_simt_shfl_bfly(f32 x, i32 lanemask) -> f32`: `shfl.sync.bfly` over a full warp;
/// - `egret_simt_mma_bf16(i32 a0, a1, a2, a3, b0, b1, f32* c)`: `mma.sync.m16n8k16` with
///   bf16 operands, `c[0..4]` the accumulators in and out.
/// - `egret_simt_ldmatrix(ptr row, i32 trans, i32* out)`: `ldmatrix.sync.m8n8.x4.b16`
///   (`.trans` when `trans` is 1), `row` this lane's row address, `out[0..4]` its registers.
/// - `egret_simt_aligned(ptr p, i64 bytes)`: before a vector access of `bytes` bytes at `p`,
///   which the GPU requires to be aligned to its size (the simulator fails the launch if not).
/// - `egret_simt_cp_async(ptr dst, ptr src, i32 src_bytes)`,
///   `egret_simt_cp_async_commit()`, `egret_simt_cp_async_wait(i32 n)`: `cp.async.cg` of 16
///   bytes (zero-filled past `src_bytes`), `cp.async.commit_group`, `cp.async.wait_group n`.
/// - `egret_simt_wgmma(ptr a, i64 a_sbo, ptr b, i64 b_lbo, i64 b_sbo, i64 n, f32* d, i64 t)`:
///   this thread's part (`t` its index in its warpgroup) of `wgmma.m64nNk16`, N = `n`
///   (`wgmma_m64`);
/// - `egret_simt_wgmma_commit()`, `egret_simt_wgmma_wait(i32 n)`: `wgmma.commit_group`,
///   `wgmma.wait_group n` (the simulator's `wgmma` is done when issued; these track which
///   shared memory the GPU's may still be reading, which no copy may overwrite).
/// - `egret_simt_wgmma_rs(i32* a, ptr b, i64 b_lbo, i64 b_sbo, i64 b_n_major, i64 n, f32* d,
///   i64 t)`: the same with `A` in registers (this thread's four words at `a`) and `B`
///   n-major or k-major (`WgB`).
/// - `egret_simt_fence_proxy_async()`: `fence.proxy.async.shared::cta` (this thread's
///   writes to shared memory, `cp.async`s included, made visible to `wgmma`'s reads).
/// - `egret_simt_mbarrier_init(ptr bar, i64 count)`,
///   `egret_simt_mbarrier_arrive_expect_tx(ptr bar, i64 bytes)`,
///   `egret_simt_mbarrier_wait(ptr bar, i64 parity)`: `mbarrier.init`,
///   `mbarrier.arrive.expect_tx` and a `mbarrier.try_wait.parity` loop (`tma`).
/// - `egret_simt_tma_load(ptr dst, ptr base, i64 dim0, i64 dim1, i64 dim2, i64 row_bytes,
///   i64 matrix_bytes, i64 box0, i64 box1, i64 c0, i64 c1, i64 c2, ptr bar)`:
///   `cp.async.bulk.tensor` of a bf16 tensor's box at element `c0` of row `c1` of matrix
///   `c2`, 128-byte swizzle, completing on `bar` (`tma::tma_load`).
pub const SIMT_HOOKS: [&str; 17] = [
    "egret_simt_barrier",
    "egret_simt_shfl_bfly",
    "egret_simt_mma_bf16",
    "egret_simt_ldmatrix",
    "egret_simt_aligned",
    "egret_simt_cp_async",
    "egret_simt_cp_async_commit",
    "egret_simt_cp_async_wait",
    "egret_simt_wgmma",
    "egret_simt_wgmma_commit",
    "egret_simt_wgmma_wait",
    "egret_simt_wgmma_rs",
    "egret_simt_fence_proxy_async",
    "egret_simt_mbarrier_init",
    "egret_simt_mbarrier_arrive_expect_tx",
    "egret_simt_mbarrier_wait",
    "egret_simt_tma_load",
];

/// Emits kernel `k` as function `name`; returns its buffer arguments and scratch floats.
pub fn emit<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    prog: &Program,
    k: &Kernel,
    name: &str,
    flavor: &Flavor,
    light: bool,
) -> R<(Vec<u32>, usize)> {
    let ptrt = ctx.ptr_type(AddressSpace::default());
    let i64t = ctx.i64_type();
    let fnty = ctx.i32_type().fn_type(
        &[
            ptrt.into(),
            ptrt.into(),
            i64t.into(),
            i64t.into(),
            ptrt.into(),
            ptrt.into(),
        ],
        false,
    );
    let gpu = flavor.gpu();
    let sim = matches!(flavor, Flavor::Simt { .. });
    let (tensor_cores, wgmma, tma) = match flavor {
        Flavor::Gpu {
            tensor_cores,
            wgmma,
            tma,
        }
        | Flavor::Simt {
            tensor_cores,
            wgmma,
            tma,
        } => {
            let wgmma = *tensor_cores && *wgmma;
            (*tensor_cores, wgmma, wgmma && *tma)
        }
        Flavor::Cpu { .. } => (false, false, false),
    };
    let func = match flavor {
        Flavor::Cpu { cpu, features } => {
            let func = module.add_function(name, fnty, None);
            func.add_attribute(
                AttributeLoc::Function,
                ctx.create_string_attribute("target-cpu", cpu),
            );
            if !features.is_empty() {
                func.add_attribute(
                    AttributeLoc::Function,
                    ctx.create_string_attribute("target-features", features),
                );
            }
            func
        }
        Flavor::Simt { .. } => module.add_function(name, fnty, None),
        // The body of a GPU kernel: inlined into the entry point `crate::ptx` wraps it in.
        Flavor::Gpu { .. } => {
            let func = module.add_function(name, fnty, Some(Linkage::Private));
            func.add_attribute(
                AttributeLoc::Function,
                ctx.create_enum_attribute(
                    inkwell::attributes::Attribute::get_named_enum_kind_id("alwaysinline"),
                    0,
                ),
            );
            func
        }
    };
    let entry = ctx.append_basic_block(func, "entry");
    let b = ctx.create_builder();
    b.position_at_end(entry);
    let arg_list = kernel_buffers(k);
    let args: HashMap<u32, u32> = arg_list
        .iter()
        .enumerate()
        .map(|(i, b)| (*b, i as u32))
        .collect();
    let p = |i: u32| func.get_nth_param(i).expect("param");
    let fb = Fb {
        ctx,
        module,
        b,
        func,
        prog,
        bufs: p(0).into_pointer_value(),
        syms: p(1).into_pointer_value(),
        tid: p(2).into_int_value(),
        nth: p(3).into_int_value(),
        scratch: p(4).into_pointer_value(),
        work: p(5).into_pointer_value(),
        args,
        i64t,
        f32t: ctx.f32_type(),
        gpu,
        tensor_cores,
        wgmma,
        tma,
        sim,
        heavy: !light,
    };
    let scratch = match k {
        Kernel::Elementwise { shape, .. } => {
            elementwise(&fb, &k.elementwise_outputs(), shape)?;
            0
        }
        Kernel::Reduce {
            op,
            out,
            src,
            shape,
            axis,
        } => {
            reduce(&fb, *op, *out, src, shape, *axis)?;
            0
        }
        Kernel::Softmax {
            out,
            src,
            shape,
            axis,
        } => {
            softmax(&fb, *out, src, shape, *axis)?;
            0
        }
        Kernel::MatMul {
            out,
            a,
            w,
            batch,
            m,
            n,
            k,
            shared_w,
            nr,
            sum_batch,
            res,
            part,
        } => {
            if (res.is_some() || part.is_some()) && !gpu {
                return Err(BackendError::Unsupported(
                    "a matmul with a residual epilogue or split k is a GPU kernel".into(),
                ));
            }
            if *nr > 0 && !gpu {
                let mm = RuntimeGemm {
                    out: *out,
                    a,
                    w,
                    batch,
                    m,
                    n,
                    k,
                    shared_w: *shared_w,
                    nr: *nr,
                    sum_batch: *sum_batch,
                    norm: None,
                };
                packed_matmul(&fb, &mm)?;
                rt_gemm_scratch(*nr)
            } else if *sum_batch {
                return Err(BackendError::Unsupported(
                    "a batch-summed matmul needs the packed CPU kernel".into(),
                ));
            } else {
                matmul(
                    &fb,
                    *out,
                    a,
                    None,
                    w,
                    (res.as_ref(), *part),
                    batch,
                    m,
                    n,
                    k,
                    *shared_w,
                )?;
                0
            }
        }
        Kernel::MatMulCombine {
            out,
            part,
            batch,
            m,
            n,
            res,
        } => {
            if !gpu {
                return Err(BackendError::Unsupported(
                    "a split-k matmul's sum is a GPU kernel".into(),
                ));
            }
            matmul_combine(&fb, (*out, *part, res.as_ref()), batch, m, n)?;
            0
        }
        Kernel::RmsNormMatMul {
            out,
            x,
            g,
            w,
            batch,
            m,
            n,
            k,
            eps,
            nr,
            ..
        } if *nr > 0 && !gpu => {
            let mm = RuntimeGemm {
                out: *out,
                a: x,
                w,
                batch,
                m,
                n,
                k,
                shared_w: true,
                nr: *nr,
                sum_batch: false,
                norm: Some((g.as_ref(), *eps)),
            };
            packed_matmul(&fb, &mm)?;
            rt_gemm_scratch(*nr)
        }
        Kernel::RmsNormMatMul {
            out,
            x,
            g,
            w,
            batch,
            m,
            n,
            k,
            eps,
            part,
            ..
        } => {
            matmul(
                &fb,
                *out,
                x,
                Some((g.as_ref(), *eps)),
                w,
                (None, *part),
                batch,
                m,
                n,
                k,
                true,
            )?;
            0
        }
        Kernel::RmsNorm {
            out,
            x,
            w,
            shape,
            eps,
        } => {
            rms_norm(&fb, *out, x, w, shape, *eps)?;
            0
        }
        Kernel::Attention {
            out,
            part,
            q,
            k,
            v,
            pos,
            dims,
            scale,
            nr,
        } => {
            if gpu {
                gpu_attention(&fb, *out, q, k, v, pos, dims, *scale)?;
                0
            } else {
                attention(&fb, *out, *part, [q, k, v, pos], dims, *scale, *nr)?
            }
        }
        Kernel::AttentionCombine { out, part, dims } => {
            attention_combine(&fb, *out, *part, dims)?;
            ATTN_SPLITS as usize
        }
        Kernel::AttentionBackward {
            out,
            q,
            k,
            pos,
            grad,
            dims,
            scale,
            nr,
        } => {
            if gpu {
                gpu_attention_backward(&fb, *out, [q, k, pos], grad.as_ref(), dims, *scale)?;
                0
            } else if *nr > 0 {
                attn_tiles::backward(&fb, *out, [q, k, pos], grad.as_ref(), dims, *scale, *nr)?
            } else {
                return Err(BackendError::Unsupported(
                    "attention's backward on the CPU needs a panel width (nr)".into(),
                ));
            }
        }
        Kernel::Gather {
            out,
            table,
            idx,
            table_shape,
            idx_shape,
            axis,
            elem,
        } => {
            gather(&fb, *out, table, idx, table_shape, idx_shape, *axis, *elem)?;
            0
        }
        Kernel::ScatterAdd {
            out,
            idx,
            src,
            idx_shape,
            rows,
            inner,
        } => {
            scatter_add(&fb, *out, idx, src, idx_shape, rows, inner)?;
            0
        }
        Kernel::PackPanels {
            out,
            w,
            k,
            n,
            nr,
            store,
        } => {
            match store {
                PanelType::Q8 => pack_panels_q8(&fb, *out, w, *k, *n, *nr)?,
                _ => pack_panels(&fb, *out, w, *k, *n, *nr, *store)?,
            }
            0
        }
        Kernel::Gemm {
            out,
            a,
            bp,
            rows,
            k,
            n,
            nr,
            norm,
            panel,
        } => {
            gemm(&fb, *out, a, *bp, rows, *k, *n, *nr, *norm, *panel)?;
            gemm_scratch(*nr, *k, *panel)
        }
    };
    Ok((arg_list, scratch))
}

/// The kernel with its buffers renumbered `0..n` in argument order (kernels equal under
/// this renaming compile to the same function), and its argument list. Buffers with
/// different element types or dims stay distinct because the kernel records them.
pub fn canonical(k: &Kernel) -> (Kernel, Vec<u32>) {
    let args = kernel_buffers(k);
    let map = |b: u32| args.iter().position(|&x| x == b).expect("argument") as u32;
    let ren = |a: &Access| Access {
        buf: map(a.buf),
        ..a.clone()
    };
    fn ren_expr(e: &Expr, f: &dyn Fn(&Access) -> Access) -> Expr {
        match e {
            Expr::Load(a, t) => Expr::Load(f(a), *t),
            Expr::Const(..) | Expr::Iota(..) => e.clone(),
            Expr::Unary(u, a) => Expr::Unary(*u, Box::new(ren_expr(a, f))),
            Expr::Cast(t, a, r) => Expr::Cast(*t, Box::new(ren_expr(a, f)), *r),
            Expr::Binary(o, a, b) => {
                Expr::Binary(*o, Box::new(ren_expr(a, f)), Box::new(ren_expr(b, f)))
            }
            Expr::Compare(o, a, b) => {
                Expr::Compare(*o, Box::new(ren_expr(a, f)), Box::new(ren_expr(b, f)))
            }
            Expr::SwiGlu(a, b) => Expr::SwiGlu(Box::new(ren_expr(a, f)), Box::new(ren_expr(b, f))),
            Expr::Select(c, a, b) => Expr::Select(
                Box::new(ren_expr(c, f)),
                Box::new(ren_expr(a, f)),
                Box::new(ren_expr(b, f)),
            ),
            Expr::Concat(axis, pieces) => Expr::Concat(
                *axis,
                pieces
                    .iter()
                    .map(|(n, e)| (n.clone(), ren_expr(e, f)))
                    .collect(),
            ),
        }
    }
    let c = match k {
        Kernel::Elementwise {
            out,
            shape,
            expr,
            also,
        } => Kernel::Elementwise {
            out: ren(out),
            shape: shape.clone(),
            expr: ren_expr(expr, &ren),
            also: also
                .iter()
                .map(|(o, e)| (ren(o), ren_expr(e, &ren)))
                .collect(),
        },
        Kernel::Reduce {
            op,
            out,
            src,
            shape,
            axis,
        } => Kernel::Reduce {
            op: *op,
            out: map(*out),
            src: ren_expr(src, &ren),
            shape: shape.clone(),
            axis: *axis,
        },
        Kernel::Softmax {
            out,
            src,
            shape,
            axis,
        } => Kernel::Softmax {
            out: map(*out),
            src: ren(src),
            shape: shape.clone(),
            axis: *axis,
        },
        Kernel::MatMul {
            out,
            a,
            w,
            batch,
            m,
            n,
            k,
            shared_w,
            nr,
            sum_batch,
            res,
            part,
        } => Kernel::MatMul {
            out: map(*out),
            a: ren(a),
            w: ren(w),
            batch: batch.clone(),
            m: m.clone(),
            n: n.clone(),
            k: k.clone(),
            shared_w: *shared_w,
            nr: *nr,
            sum_batch: *sum_batch,
            res: res.as_ref().map(&ren),
            part: part.map(&map),
        },
        Kernel::MatMulCombine {
            out,
            part,
            batch,
            m,
            n,
            res,
        } => Kernel::MatMulCombine {
            out: map(*out),
            part: map(*part),
            batch: batch.clone(),
            m: m.clone(),
            n: n.clone(),
            res: res.as_ref().map(&ren),
        },
        Kernel::RmsNormMatMul {
            out,
            x,
            g,
            w,
            batch,
            m,
            n,
            k,
            eps,
            nr,
            part,
        } => Kernel::RmsNormMatMul {
            out: map(*out),
            x: ren(x),
            g: g.as_ref().map(ren),
            w: ren(w),
            batch: batch.clone(),
            m: m.clone(),
            n: n.clone(),
            k: k.clone(),
            eps: *eps,
            nr: *nr,
            part: part.map(&map),
        },
        Kernel::RmsNorm {
            out,
            x,
            w,
            shape,
            eps,
        } => Kernel::RmsNorm {
            out: map(*out),
            x: ren(x),
            w: ren(w),
            shape: shape.clone(),
            eps: *eps,
        },
        Kernel::Attention {
            out,
            part,
            q,
            k,
            v,
            pos,
            dims,
            scale,
            nr,
        } => Kernel::Attention {
            out: map(*out),
            part: map(*part),
            q: ren(q),
            k: ren(k),
            v: ren(v),
            pos: ren(pos),
            dims: dims.clone(),
            scale: *scale,
            nr: *nr,
        },
        Kernel::AttentionCombine { out, part, dims } => Kernel::AttentionCombine {
            out: map(*out),
            part: map(*part),
            dims: dims.clone(),
        },
        Kernel::AttentionBackward {
            out,
            q,
            k,
            pos,
            grad,
            dims,
            scale,
            nr,
        } => Kernel::AttentionBackward {
            out: map(*out),
            q: ren(q),
            k: ren(k),
            pos: ren(pos),
            grad: grad.as_ref().map(|g| AttnGradIn {
                v: ren(&g.v),
                dout: ren(&g.dout),
                lse: ren(&g.lse),
                delta: ren(&g.delta),
                wrt: g.wrt,
            }),
            dims: dims.clone(),
            scale: *scale,
            nr: *nr,
        },
        Kernel::Gather {
            out,
            table,
            idx,
            table_shape,
            idx_shape,
            axis,
            elem,
        } => Kernel::Gather {
            out: map(*out),
            table: ren(table),
            idx: ren(idx),
            table_shape: table_shape.clone(),
            idx_shape: idx_shape.clone(),
            axis: *axis,
            elem: *elem,
        },
        Kernel::ScatterAdd {
            out,
            idx,
            src,
            idx_shape,
            rows,
            inner,
        } => Kernel::ScatterAdd {
            out: map(*out),
            idx: ren(idx),
            src: ren(src),
            idx_shape: idx_shape.clone(),
            rows: rows.clone(),
            inner: inner.clone(),
        },
        Kernel::PackPanels {
            out,
            w,
            k,
            n,
            nr,
            store,
        } => Kernel::PackPanels {
            out: map(*out),
            w: ren(w),
            k: *k,
            n: *n,
            nr: *nr,
            store: *store,
        },
        Kernel::Gemm {
            out,
            a,
            bp,
            rows,
            k,
            n,
            nr,
            norm,
            panel,
        } => Kernel::Gemm {
            out: map(*out),
            a: ren(a),
            bp: map(*bp),
            rows: rows.clone(),
            k: *k,
            n: *n,
            nr: *nr,
            norm: *norm,
            panel: *panel,
        },
    };
    (c, args)
}

/// The distinct buffers a kernel touches, in a fixed order (its argument list).
/// Every buffer a kernel reads or writes, in argument order.
pub fn kernel_buffers(k: &Kernel) -> Vec<u32> {
    let mut v = vec![];
    let mut add = |b: u32| {
        if !v.contains(&b) {
            v.push(b)
        }
    };
    fn expr_bufs(e: &Expr, add: &mut dyn FnMut(u32)) {
        match e {
            Expr::Load(a, _) => add(a.buf),
            _ => e.children().into_iter().for_each(|c| expr_bufs(c, add)),
        }
    }
    match k {
        Kernel::Elementwise { .. } => {
            for (o, e) in k.elementwise_outputs() {
                add(o.buf);
                expr_bufs(e, &mut add);
            }
        }
        Kernel::Reduce { out, src, .. } => {
            add(*out);
            expr_bufs(src, &mut add);
        }
        Kernel::Softmax { out, src, .. } => {
            add(*out);
            add(src.buf);
        }
        Kernel::MatMul {
            out,
            a,
            w,
            res,
            part,
            ..
        } => {
            add(*out);
            add(a.buf);
            add(w.buf);
            if let Some(r) = res {
                add(r.buf);
            }
            if let Some(p) = part {
                add(*p);
            }
        }
        Kernel::MatMulCombine { out, part, res, .. } => {
            add(*out);
            add(*part);
            if let Some(r) = res {
                add(r.buf);
            }
        }
        Kernel::RmsNormMatMul {
            out, x, g, w, part, ..
        } => {
            add(*out);
            add(x.buf);
            if let Some(g) = g {
                add(g.buf);
            }
            add(w.buf);
            if let Some(p) = part {
                add(*p);
            }
        }
        Kernel::RmsNorm { out, x, w, .. } => {
            add(*out);
            add(x.buf);
            add(w.buf);
        }
        Kernel::Attention {
            out,
            part,
            q,
            k,
            v,
            pos,
            ..
        } => {
            for b in [*out, *part, q.buf, k.buf, v.buf, pos.buf] {
                add(b);
            }
        }
        Kernel::AttentionCombine { out, part, .. } => {
            add(*out);
            add(*part);
        }
        Kernel::AttentionBackward {
            out,
            q,
            k,
            pos,
            grad,
            ..
        } => {
            for b in [*out, q.buf, k.buf, pos.buf] {
                add(b);
            }
            if let Some(g) = grad {
                for b in [g.v.buf, g.dout.buf, g.lse.buf, g.delta.buf] {
                    add(b);
                }
            }
        }
        Kernel::Gather {
            out, table, idx, ..
        } => {
            add(*out);
            add(table.buf);
            add(idx.buf);
        }
        Kernel::ScatterAdd { out, idx, src, .. } => {
            add(*out);
            add(idx.buf);
            add(src.buf);
        }
        Kernel::PackPanels { out, w, .. } => {
            add(*out);
            add(w.buf);
        }
        Kernel::Gemm { out, a, bp, .. } => {
            add(*out);
            add(a.buf);
            add(*bp);
        }
    }
    v
}

fn collect_loads<'e>(e: &'e Expr, out: &mut Vec<(&'e Access, ElemType)>) {
    match e {
        Expr::Load(a, t) => out.push((a, *t)),
        _ => e.children().into_iter().for_each(|c| collect_loads(c, out)),
    }
}

/// Evaluates `e` at one element; `bases[i]` is the element offset of the i-th load and
/// `index` the iteration multi-index (for `iota`).
fn eval<'ctx>(
    fb: &Fb<'_, 'ctx>,
    e: &Expr,
    avs: &[Av<'ctx>],
    bases: &[IntValue<'ctx>],
    next: &mut usize,
    index: &[IntValue<'ctx>],
) -> R<BasicValueEnum<'ctx>> {
    Ok(match e {
        Expr::Load(..) => {
            let i = *next;
            *next += 1;
            fb.load(&avs[i], bases[i])?
        }
        Expr::Const(v, t) => match t {
            ElemType::F32 => fb.f32c(*v).into(),
            ElemType::I64 => fb.i64c(*v as i64).into(),
            ElemType::Bool => fb
                .ctx
                .bool_type()
                .const_int((*v != 0.0) as u64, false)
                .into(),
            ElemType::Half | ElemType::BF16 | ElemType::Bytes => {
                return Err(BackendError::Unsupported(format!("{t:?} constants")))
            }
        },
        Expr::Iota(axis, t) => {
            let i = index[*axis];
            match t {
                ElemType::F32 => {
                    fb.b.build_signed_int_to_float(i, fb.f32t, "iota")
                        .map_err(be)?
                        .into()
                }
                _ => i.into(),
            }
        }
        Expr::Unary(u, a) => {
            let x = eval(fb, a, avs, bases, next, index)?;
            if x.is_int_value() {
                let x = x.into_int_value();
                match u {
                    UnaryOp::Neg => fb.b.build_int_neg(x, "neg").map_err(be)?.into(),
                    _ => {
                        let n = fb.b.build_int_neg(x, "neg").map_err(be)?;
                        let c =
                            fb.b.build_int_compare(IntPredicate::SLT, x, fb.i64c(0), "c")
                                .map_err(be)?;
                        fb.b.build_select(c, n, x, "abs").map_err(be)?
                    }
                }
            } else {
                let x = x.into_float_value();
                let one = fb.f32c(1.0);
                let v = match u {
                    UnaryOp::Neg => fb.b.build_float_neg(x, "neg").map_err(be)?,
                    UnaryOp::Exp => fb.exp(x)?,
                    UnaryOp::Log => fb.log(x)?,
                    UnaryOp::Sqrt => fb.intrinsic("llvm.sqrt", &[x])?,
                    UnaryOp::Rsqrt => {
                        let s = fb.intrinsic("llvm.sqrt", &[x])?;
                        fb.b.build_float_div(one, s, "rsqrt").map_err(be)?
                    }
                    UnaryOp::Recip => fb.b.build_float_div(one, x, "recip").map_err(be)?,
                    UnaryOp::Sigmoid => fb.sigmoid(x)?,
                    UnaryOp::Silu => {
                        let s = fb.sigmoid(x)?;
                        fb.fmul(x, s)?
                    }
                    UnaryOp::Tanh => fb.tanh(x)?,
                    UnaryOp::Sin => fb.sin_cos(x, false)?,
                    UnaryOp::Cos => fb.sin_cos(x, true)?,
                    UnaryOp::Abs => fb.intrinsic("llvm.fabs", &[x])?,
                };
                v.into()
            }
        }
        Expr::Binary(op, a, c) => {
            let x = eval(fb, a, avs, bases, next, index)?;
            let y = eval(fb, c, avs, bases, next, index)?;
            if x.is_int_value() {
                let (x, y) = (x.into_int_value(), y.into_int_value());
                match op {
                    BinaryOp::Add => fb.add(x, y)?.into(),
                    BinaryOp::Sub => fb.b.build_int_sub(x, y, "").map_err(be)?.into(),
                    BinaryOp::Mul => fb.mul(x, y)?.into(),
                    BinaryOp::Div => {
                        let z =
                            fb.b.build_int_compare(IntPredicate::EQ, y, fb.i64c(0), "z")
                                .map_err(be)?;
                        let safe =
                            fb.b.build_select(z, fb.i64c(1), y, "d")
                                .map_err(be)?
                                .into_int_value();
                        fb.b.build_int_signed_div(x, safe, "div")
                            .map_err(be)?
                            .into()
                    }
                    BinaryOp::Max | BinaryOp::Min => {
                        let p = if *op == BinaryOp::Max {
                            IntPredicate::SGT
                        } else {
                            IntPredicate::SLT
                        };
                        let c = fb.b.build_int_compare(p, x, y, "c").map_err(be)?;
                        fb.b.build_select(c, x, y, "m").map_err(be)?
                    }
                    BinaryOp::Pow => return Err(BackendError::Unsupported("integer pow".into())),
                }
            } else {
                let (x, y) = (x.into_float_value(), y.into_float_value());
                let v = match op {
                    BinaryOp::Add => fb.fadd(x, y)?,
                    BinaryOp::Sub => fb.b.build_float_sub(x, y, "").map_err(be)?,
                    BinaryOp::Mul => fb.fmul(x, y)?,
                    BinaryOp::Div => fb.b.build_float_div(x, y, "").map_err(be)?,
                    BinaryOp::Max => fb.intrinsic("llvm.maximum", &[x, y])?,
                    BinaryOp::Min => fb.intrinsic("llvm.minimum", &[x, y])?,
                    BinaryOp::Pow => fb.pow(x, y)?,
                };
                v.into()
            }
        }
        Expr::Compare(op, a, c) => {
            let x = eval(fb, a, avs, bases, next, index)?;
            let y = eval(fb, c, avs, bases, next, index)?;
            if x.is_float_value() {
                let p = match op {
                    CompareOp::Lt => FloatPredicate::OLT,
                    CompareOp::Le => FloatPredicate::OLE,
                    CompareOp::Gt => FloatPredicate::OGT,
                    CompareOp::Ge => FloatPredicate::OGE,
                    CompareOp::Eq => FloatPredicate::OEQ,
                    CompareOp::Ne => FloatPredicate::UNE,
                };
                fb.b.build_float_compare(p, x.into_float_value(), y.into_float_value(), "cmp")
                    .map_err(be)?
                    .into()
            } else {
                let p = match op {
                    CompareOp::Lt => IntPredicate::SLT,
                    CompareOp::Le => IntPredicate::SLE,
                    CompareOp::Gt => IntPredicate::SGT,
                    CompareOp::Ge => IntPredicate::SGE,
                    CompareOp::Eq => IntPredicate::EQ,
                    CompareOp::Ne => IntPredicate::NE,
                };
                fb.b.build_int_compare(p, x.into_int_value(), y.into_int_value(), "cmp")
                    .map_err(be)?
                    .into()
            }
        }
        Expr::Select(c, a, d) => {
            let c = eval(fb, c, avs, bases, next, index)?.into_int_value();
            let x = eval(fb, a, avs, bases, next, index)?;
            let y = eval(fb, d, avs, bases, next, index)?;
            fb.b.build_select(c, x, y, "sel").map_err(be)?
        }
        Expr::Concat(axis, pieces) => {
            // Each piece at its index clamped into range (its loads' offsets moved by the
            // clamped distance along `axis`); then the piece `i` falls in is selected.
            let i = index[*axis];
            let mut start = fb.i64c(0);
            let mut vals = vec![];
            for (len, p) in pieces {
                let len = fb.dim(len)?;
                let last = fb.b.build_int_sub(len, fb.i64c(1), "last").map_err(be)?;
                let from = fb.b.build_int_sub(i, start, "from").map_err(be)?;
                let at = fb.imax(fb.imin(from, last)?, fb.i64c(0))?;
                let shift = fb.b.build_int_sub(at, i, "shift").map_err(be)?;
                let mut own = vec![];
                collect_loads(p, &mut own);
                let mut moved = bases.to_vec();
                for (j, m) in moved.iter_mut().enumerate().skip(*next).take(own.len()) {
                    *m = fb.add(*m, fb.mul(shift, avs[j].strides[*axis])?)?;
                }
                let mut idx = index.to_vec();
                idx[*axis] = at;
                start = fb.add(start, len)?;
                // (`start` is now this piece's end)
                vals.push((start, eval(fb, p, avs, &moved, next, &idx)?));
            }
            let (_, mut v) = vals.pop().expect("a concat has pieces");
            for (end, x) in vals.into_iter().rev() {
                let inside =
                    fb.b.build_int_compare(IntPredicate::SLT, i, end, "in")
                        .map_err(be)?;
                v = fb.b.build_select(inside, x, v, "piece").map_err(be)?;
            }
            v
        }
        Expr::Cast(to, a, round) => {
            let x = eval(fb, a, avs, bases, next, index)?;
            let v: BasicValueEnum = match (x, to) {
                // (a bf16 value is held as the f32 it stands for: rounded by `round`, and
                // by the store into a bf16 buffer)
                (BasicValueEnum::FloatValue(f), ElemType::F32 | ElemType::BF16) => f.into(),
                (BasicValueEnum::FloatValue(f), ElemType::I64) => {
                    fb.b.build_float_to_signed_int(f, fb.i64t, "fi")
                        .map_err(be)?
                        .into()
                }
                (BasicValueEnum::FloatValue(f), ElemType::Bool) => {
                    fb.b.build_float_compare(FloatPredicate::UNE, f, fb.f32c(0.0), "fb")
                        .map_err(be)?
                        .into()
                }
                (BasicValueEnum::IntValue(i), ElemType::F32)
                    if i.get_type().get_bit_width() == 1 =>
                {
                    fb.b.build_unsigned_int_to_float(i, fb.f32t, "bf")
                        .map_err(be)?
                        .into()
                }
                (BasicValueEnum::IntValue(i), ElemType::F32) => {
                    fb.b.build_signed_int_to_float(i, fb.f32t, "if")
                        .map_err(be)?
                        .into()
                }
                (BasicValueEnum::IntValue(i), ElemType::I64)
                    if i.get_type().get_bit_width() == 1 =>
                {
                    fb.b.build_int_z_extend(i, fb.i64t, "bi")
                        .map_err(be)?
                        .into()
                }
                (BasicValueEnum::IntValue(i), ElemType::I64) => i.into(),
                (BasicValueEnum::IntValue(i), ElemType::Bool)
                    if i.get_type().get_bit_width() == 1 =>
                {
                    i.into()
                }
                (BasicValueEnum::IntValue(i), ElemType::Bool) => {
                    fb.b.build_int_compare(IntPredicate::NE, i, fb.i64c(0), "ib")
                        .map_err(be)?
                        .into()
                }
                _ => return Err(BackendError::Unsupported("cast".into())),
            };
            match (round, v) {
                (Round::F16, BasicValueEnum::FloatValue(f)) => {
                    let h =
                        fb.b.build_float_trunc(f, fb.ctx.f16_type(), "h")
                            .map_err(be)?;
                    fb.b.build_float_ext(h, fb.f32t, "f").map_err(be)?.into()
                }
                (Round::BF16, BasicValueEnum::FloatValue(f)) => round_bf16(fb, f)?.into(),
                (_, v) => v,
            }
        }
        Expr::SwiGlu(a, c) => {
            let g = eval(fb, a, avs, bases, next, index)?.into_float_value();
            let u = eval(fb, c, avs, bases, next, index)?.into_float_value();
            let s = fb.sigmoid(g)?;
            let silu = fb.fmul(g, s)?;
            fb.fmul(silu, u)?.into()
        }
    })
}

/// Round-to-nearest-even to bfloat16 precision, NaN kept: `(bits + 0x7fff + lsb) & ~0xffff`;
/// on the GPU one `cvt.rn.bf16.f32` and back (two instructions for seven: tensor-core matmul
/// paths that round their operands as they load them are bound by it).
fn round_bf16<'ctx>(fb: &Fb<'_, 'ctx>, f: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
    if fb.gpu && !fb.sim {
        let h =
            fb.b.build_float_trunc(f, fb.ctx.bf16_type(), "bf")
                .map_err(be)?;
        return fb.b.build_float_ext(h, fb.f32t, "f").map_err(be);
    }
    let i32t = fb.ctx.i32_type();
    let bits =
        fb.b.build_bit_cast(f, i32t, "bits")
            .map_err(be)?
            .into_int_value();
    let lsb =
        fb.b.build_and(
            fb.b.build_right_shift(bits, i32t.const_int(16, false), false, "s")
                .map_err(be)?,
            i32t.const_int(1, false),
            "l",
        )
        .map_err(be)?;
    let r =
        fb.b.build_int_add(
            fb.b.build_int_add(bits, i32t.const_int(0x7fff, false), "a")
                .map_err(be)?,
            lsb,
            "b",
        )
        .map_err(be)?;
    let r =
        fb.b.build_and(r, i32t.const_int(0xffff_0000, false), "m")
            .map_err(be)?;
    let rounded =
        fb.b.build_bit_cast(r, fb.f32t, "r")
            .map_err(be)?
            .into_float_value();
    let nan =
        fb.b.build_float_compare(FloatPredicate::UNO, f, f, "nan")
            .map_err(be)?;
    Ok(fb
        .b
        .build_select(nan, f, rounded, "bf")
        .map_err(be)?
        .into_float_value())
}

fn elementwise<'ctx>(fb: &Fb<'_, 'ctx>, outs: &[(&Access, &Expr)], shape: &[Dim]) -> R<()> {
    let mut loads = vec![];
    for (_, e) in outs {
        collect_loads(e, &mut loads);
    }
    let avs: Vec<Av> = loads
        .iter()
        .map(|(a, t)| fb.access(a, *t))
        .collect::<R<_>>()?;
    let oavs: Vec<Av> = outs
        .iter()
        .map(|(o, e)| fb.access(o, e.elem()))
        .collect::<R<_>>()?;
    let dims: Vec<IntValue> = shape.iter().map(|d| fb.dim(d)).collect::<R<_>>()?;
    let r = dims.len();
    let (outer, inner) = if r == 0 {
        (vec![], fb.i64c(1))
    } else {
        (dims[..r - 1].to_vec(), dims[r - 1])
    };
    let mut rows = fb.i64c(1);
    for d in &outer {
        rows = fb.mul(rows, *d)?;
    }
    let transposing = elementwise_transposes(outs, r);
    if fb.gpu && transposing {
        gpu_tiled_order(fb, &dims, |fb, index| {
            let pairs: Vec<(usize, IntValue)> = index.iter().copied().enumerate().collect();
            let el: Vec<IntValue> = avs.iter().map(|a| fb.at(a, &pairs)).collect::<R<_>>()?;
            let ats: Vec<IntValue> = oavs.iter().map(|o| fb.at(o, &pairs)).collect::<R<_>>()?;
            eval_store(fb, outs, &avs, &el, &oavs, &ats, index)
        })?;
        return fb.ret_ok();
    }
    if fb.gpu {
        // Neighbouring threads touch neighbouring elements.
        fb.for_each_share(fb.mul(rows, inner)?, |fb, lin| {
            let index = fb.decompose(lin, &dims)?;
            let pairs: Vec<(usize, IntValue)> = index.iter().copied().enumerate().collect();
            let el: Vec<IntValue> = avs.iter().map(|a| fb.at(a, &pairs)).collect::<R<_>>()?;
            let ats: Vec<IntValue> = oavs.iter().map(|o| fb.at(o, &pairs)).collect::<R<_>>()?;
            eval_store(fb, outs, &avs, &el, &oavs, &ats, &index)
        })?;
        return fb.ret_ok();
    }
    if transposing {
        return elementwise_tiled(fb, outs, &avs, &oavs, &dims);
    }
    let (s, e) = fb.split(rows)?;
    fb.for_range(s, e, |fb, row| {
        let idx = fb.decompose(row, &outer)?;
        let pairs: Vec<(usize, IntValue)> = idx.iter().copied().enumerate().collect();
        let bases: Vec<IntValue> = avs.iter().map(|a| fb.at(a, &pairs)).collect::<R<_>>()?;
        let obases: Vec<IntValue> = oavs.iter().map(|o| fb.at(o, &pairs)).collect::<R<_>>()?;
        fb.for_range(fb.i64c(0), inner, |fb, j| {
            // (the element along the last axis: `base + j·stride`)
            let step = |a: &Av<'ctx>, b: &IntValue<'ctx>| -> R<IntValue<'ctx>> {
                if r == 0 {
                    Ok(*b)
                } else {
                    fb.add(*b, fb.mul(j, a.strides[r - 1])?)
                }
            };
            let el: Vec<IntValue> = avs
                .iter()
                .zip(&bases)
                .map(|(a, b)| step(a, b))
                .collect::<R<_>>()?;
            let ats: Vec<IntValue> = oavs
                .iter()
                .zip(&obases)
                .map(|(o, b)| step(o, b))
                .collect::<R<_>>()?;
            let mut index = idx.clone();
            if r > 0 {
                index.push(j);
            }
            eval_store(fb, outs, &avs, &el, &oavs, &ats, &index)
        })
    })?;
    fb.ret_ok()
}

/// At one element (`el`: where each load reads; `ats`: where each output goes; `index`: its
/// position), each output's expression evaluated and stored in turn, so that a later one may
/// load an earlier one's value there.
fn eval_store<'ctx>(
    fb: &Fb<'_, 'ctx>,
    outs: &[(&Access, &Expr)],
    avs: &[Av<'ctx>],
    el: &[IntValue<'ctx>],
    oavs: &[Av<'ctx>],
    ats: &[IntValue<'ctx>],
    index: &[IntValue<'ctx>],
) -> R<()> {
    let mut next = 0;
    for (((_, e), o), at) in outs.iter().zip(oavs).zip(ats) {
        let v = eval(fb, e, avs, el, &mut next, index)?;
        fb.store(o.ptr, o.elem, *at, v)?;
    }
    Ok(())
}

/// Whether an elementwise kernel over `r` dims (at least two) with outputs `outs`
/// transposes: one of its operands or outputs runs along the second-to-last axis in
/// memory, not the last.
fn elementwise_transposes(outs: &[(&Access, &Expr)], r: usize) -> bool {
    let mut loads = vec![];
    for (_, e) in outs {
        collect_loads(e, &mut loads);
    }
    r >= 2
        && loads
            .iter()
            .map(|(a, _)| *a)
            .chain(outs.iter().map(|(o, _)| *o))
            .any(|a| {
                a.strides[r - 2] == Poly::c(1)
                    && a.strides[r - 1] != Poly::c(1)
                    && a.strides[r - 1] != Poly::zero()
            })
}

/// Side of the square tiles of the last two axes in which a transposing GPU elementwise
/// kernel takes its elements (`gpu_tiled_order`): a warp's lanes span one, and the
/// block's 8 warps its rows.
const GPU_TRANSPOSE_TILE: i64 = 32;
const _: () = assert!(GPU_TRANSPOSE_TILE == 32 && GPU_TRANSPOSE_TILE % COLUMN_WARPS == 0);

/// The elements of `dims` (two axes or more) in `GPU_TRANSPOSE_TILE`-square tiles of the
/// last two axes, blocks striding over the tiles (the launch has a block per tile:
/// `gpu_tiles`): lane `l` of warp `w` takes column `l` of the tile and its rows `w, w + 8,
/// …`, and `body(fb, index)` runs at each. A warp's accesses along the last axis are
/// neighbours, as with a thread per element in order; an operand that runs down the
/// columns in memory has each 32-byte sector of a column (8 rows) read by the block's 8
/// warps at about the same time, so L1 serves 7 of the 8 reads, where a thread per element
/// in row order would read the sector from L2 once per element, rows apart.
fn gpu_tiled_order<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dims: &[IntValue<'ctx>],
    body: impl Fn(&Fb<'_, 'ctx>, &[IntValue<'ctx>]) -> R<()>,
) -> R<()> {
    let r = dims.len();
    let (mid, inner) = (dims[r - 2], dims[r - 1]);
    let outer = &dims[..r - 2];
    let c = |v: i64| fb.i64c(v);
    let mut tiles = fb.ceil_div(inner, c(GPU_TRANSPOSE_TILE))?;
    let tj = tiles;
    let ti = fb.ceil_div(mid, c(GPU_TRANSPOSE_TILE))?;
    tiles = fb.mul(tiles, ti)?;
    for d in outer {
        tiles = fb.mul(tiles, *d)?;
    }
    let BlockGrid {
        lane: t,
        blk,
        nblk,
        iters,
    } = block_grid(fb, tiles)?;
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let (w, l) = (sdiv(t, c(32), "w")?, srem(t, c(32), "l")?);
    fb.for_range(c(0), iters, |fb, it| {
        let u = fb.add(blk, fb.mul(it, nblk)?)?;
        let (jt, rest) = (srem(u, tj, "jt")?, sdiv(u, tj, "rest")?);
        let (itile, o) = (srem(rest, ti, "it")?, sdiv(rest, ti, "o")?);
        let mut index = fb.decompose(o, outer)?;
        let j = fb.add(fb.mul(jt, c(GPU_TRANSPOSE_TILE))?, l)?;
        let i0 = fb.add(fb.mul(itile, c(GPU_TRANSPOSE_TILE))?, w)?;
        let cmp = |a, b| {
            fb.b.build_int_compare(IntPredicate::SLT, a, b, "in")
                .map_err(be)
        };
        fb.if_else(
            cmp(j, inner)?,
            |fb| {
                index.extend([i0, j]);
                for k in 0..GPU_TRANSPOSE_TILE / COLUMN_WARPS {
                    let i = fb.add(i0, c(COLUMN_WARPS * k))?;
                    index[r - 2] = i;
                    fb.if_else(cmp(i, mid)?, |fb| body(fb, &index), |_| Ok(()))?;
                }
                Ok(())
            },
            |_| Ok(()),
        )
    })
}

/// Rows of the second-to-last axis that a transposing elementwise kernel walks together.
const TRANSPOSE_TILE: i64 = 16;

/// An elementwise kernel in which some operand (or the output) runs along the
/// second-to-last axis in memory, not the last (a transpose): in tiles of `TRANSPOSE_TILE`
/// rows, each column walked down the tile, so each cache line such an operand touches
/// serves a whole tile instead of one element per sweep over the row.
fn elementwise_tiled<'ctx>(
    fb: &Fb<'_, 'ctx>,
    outs: &[(&Access, &Expr)],
    avs: &[Av<'ctx>],
    oavs: &[Av<'ctx>],
    dims: &[IntValue<'ctx>],
) -> R<()> {
    let r = dims.len();
    let (mid, inner) = (dims[r - 2], dims[r - 1]);
    let outer = &dims[..r - 2];
    let mut orows = fb.i64c(1);
    for d in outer {
        orows = fb.mul(orows, *d)?;
    }
    let tile = fb.i64c(TRANSPOSE_TILE);
    let nblk =
        fb.b.build_int_signed_div(fb.add(mid, fb.i64c(TRANSPOSE_TILE - 1))?, tile, "nb")
            .map_err(be)?;
    let (s, e) = fb.split(fb.mul(orows, nblk)?)?;
    fb.for_range(s, e, |fb, u| {
        let o = fb.b.build_int_signed_div(u, nblk, "o").map_err(be)?;
        let blk = fb.b.build_int_signed_rem(u, nblk, "blk").map_err(be)?;
        let oidx = fb.decompose(o, outer)?;
        let i0 = fb.mul(blk, tile)?;
        let i1 = fb.add(i0, tile)?;
        let short =
            fb.b.build_int_compare(IntPredicate::SLT, mid, i1, "short")
                .map_err(be)?;
        let i1 =
            fb.b.build_select(short, mid, i1, "i1")
                .map_err(be)?
                .into_int_value();
        fb.for_range(fb.i64c(0), inner, |fb, j| {
            fb.for_range(i0, i1, |fb, i| {
                let mut index = oidx.clone();
                index.extend([i, j]);
                let pairs: Vec<(usize, IntValue)> = index.iter().copied().enumerate().collect();
                let el: Vec<IntValue> = avs.iter().map(|a| fb.at(a, &pairs)).collect::<R<_>>()?;
                let ats: Vec<IntValue> = oavs.iter().map(|o| fb.at(o, &pairs)).collect::<R<_>>()?;
                eval_store(fb, outs, avs, &el, oavs, &ats, &index)
            })
        })
    })?;
    fb.ret_ok()
}

/// Output elements: all dims but `axis` (row-major); returns (dims without axis, their
/// original positions).
fn without_axis<'ctx>(
    fb: &Fb<'_, 'ctx>,
    shape: &[Dim],
    axis: usize,
) -> R<(Vec<IntValue<'ctx>>, Vec<usize>, IntValue<'ctx>)> {
    let mut dims = vec![];
    let mut pos = vec![];
    let mut total = fb.i64c(1);
    for (i, d) in shape.iter().enumerate() {
        if i != axis {
            let v = fb.dim(d)?;
            total = fb.mul(total, v)?;
            dims.push(v);
            pos.push(i);
        }
    }
    Ok((dims, pos, total))
}

/// Sums accumulate in f64, with reassociation allowed so a unit-stride axis vectorises
/// (partial sums in vector lanes, then combined: a fixed order, so results repeat exactly).
fn reduce<'ctx>(
    fb: &Fb<'_, 'ctx>,
    op: ReduceOp,
    out: u32,
    src: &Expr,
    shape: &[Dim],
    axis: usize,
) -> R<()> {
    if src.elem() != ElemType::F32 {
        return Err(BackendError::Unsupported(
            "integer reductions on the CPU backend".into(),
        ));
    }
    let mut loads = vec![];
    collect_loads(src, &mut loads);
    let avs: Vec<Av> = loads
        .iter()
        .map(|(a, t)| fb.access(a, *t))
        .collect::<R<_>>()?;
    let optr = fb.buf(out)?;
    let (dims, pos, total) = without_axis(fb, shape, axis)?;
    let len = fb.dim(&shape[axis])?;
    let f64t = fb.ctx.f64_type();
    let acc = fb.slot(f64t.into())?;
    // `a` and `x` (f64) folded by the reduction's operator.
    let fold =
        |fb: &Fb<'_, 'ctx>, a: FloatValue<'ctx>, x: FloatValue<'ctx>| -> R<FloatValue<'ctx>> {
            Ok(match op {
                ReduceOp::Max => {
                    let i = Intrinsic::find("llvm.maximum").expect("intrinsic");
                    let f = i.get_declaration(fb.module, &[f64t.into()]).expect("decl");
                    fb.b.build_call(f, &[a.into(), x.into()], "m")
                        .map_err(be)?
                        .try_as_basic_value()
                        .basic()
                        .expect("value")
                        .into_float_value()
                }
                _ => fb.fast(fb.b.build_float_add(a, x, "s").map_err(be)?),
            })
        };
    // Row `o`'s elements `j0, j0 + step, …` folded into `acc` (f64).
    let partial =
        |fb: &Fb<'_, 'ctx>, o: IntValue<'ctx>, j0: IntValue<'ctx>, step: IntValue<'ctx>| -> R<()> {
            let idx = fb.decompose(o, &dims)?;
            let pairs: Vec<(usize, IntValue)> =
                pos.iter().copied().zip(idx.iter().copied()).collect();
            let bases: Vec<IntValue> = avs.iter().map(|a| fb.at(a, &pairs)).collect::<R<_>>()?;
            let init = if op == ReduceOp::Max {
                f64::NEG_INFINITY
            } else {
                0.0
            };
            fb.b.build_store(acc, f64t.const_float(init)).map_err(be)?;
            fb.for_stride(j0, len, step, |fb, j| {
                let el: Vec<IntValue> = avs
                    .iter()
                    .zip(&bases)
                    .map(|(a, b)| fb.add(*b, fb.mul(j, a.strides[axis])?))
                    .collect::<R<_>>()?;
                let mut index = vec![fb.i64c(0); shape.len()];
                for (&p, &i) in pos.iter().zip(&idx) {
                    index[p] = i;
                }
                index[axis] = j;
                let x = eval(fb, src, &avs, &el, &mut 0, &index)?.into_float_value();
                let x = fb.b.build_float_ext(x, f64t, "x").map_err(be)?;
                let a =
                    fb.b.build_load(f64t, acc, "a")
                        .map_err(be)?
                        .into_float_value();
                fb.b.build_store(acc, fold(fb, a, x)?).map_err(be)?;
                Ok(())
            })
        };
    let finish = |fb: &Fb<'_, 'ctx>, a: FloatValue<'ctx>| -> R<FloatValue<'ctx>> {
        if op == ReduceOp::Mean {
            let n =
                fb.b.build_signed_int_to_float(len, a.get_type(), "n")
                    .map_err(be)?;
            return fb.b.build_float_div(a, n, "mean").map_err(be);
        }
        Ok(a)
    };
    let by_thread = |fb: &Fb<'_, 'ctx>| -> R<()> {
        fb.for_each_share(total, |fb, o| {
            partial(fb, o, fb.i64c(0), fb.i64c(1))?;
            let a =
                fb.b.build_load(f64t, acc, "a")
                    .map_err(be)?
                    .into_float_value();
            let v =
                fb.b.build_float_trunc(finish(fb, a)?, fb.f32t, "v")
                    .map_err(be)?;
            fb.store_f32(optr, o, v)
        })
    };
    if fb.gpu && reduce_warp_rows(src, axis) {
        gpu_by_warp(fb, total, len, by_thread, |fb, o, lane| {
            partial(fb, o, lane, fb.i64c(32))?;
            let a =
                fb.b.build_load(f64t, acc, "a")
                    .map_err(be)?
                    .into_float_value();
            let a = fb.b.build_float_trunc(a, fb.f32t, "a").map_err(be)?;
            let a = if op == ReduceOp::Max {
                warp_max(fb, a)?
            } else {
                warp_sum(fb, a)?
            };
            let v = finish(fb, a)?;
            fb.if_else(
                fb.b.build_int_compare(IntPredicate::EQ, lane, fb.i64c(0), "l0")
                    .map_err(be)?,
                |fb| fb.store_f32(optr, o, v),
                |_| Ok(()),
            )
        })?;
    } else if fb.gpu {
        // (`gpu_by_columns`: lanes take neighbouring outputs, warps the axis in turn)
        let warps = fb.i64c(COLUMN_WARPS);
        let parts = shared_array(
            fb,
            "column_partials",
            f64t.array_type(GPU_BLOCK_THREADS as u32),
        );
        let part = |fb: &Fb<'_, 'ctx>, i: IntValue<'ctx>| {
            unsafe { fb.b.build_in_bounds_gep(f64t, parts, &[i], "part") }.map_err(be)
        };
        gpu_by_columns(fb, total, len, by_thread, |fb, o, live, t| {
            let (warp, lane) = (
                fb.b.build_int_signed_div(t, fb.i64c(32), "warp")
                    .map_err(be)?,
                fb.b.build_int_signed_rem(t, fb.i64c(32), "lane")
                    .map_err(be)?,
            );
            fb.if_else(
                live,
                |fb| {
                    partial(fb, o, warp, warps)?;
                    let a = fb.b.build_load(f64t, acc, "a").map_err(be)?;
                    fb.b.build_store(part(fb, t)?, a).map_err(be)?;
                    Ok(())
                },
                |_| Ok(()),
            )?;
            barrier(fb)?;
            // Warp 0 folds its lane's output's partials in warp order, so that runs agree.
            let first =
                fb.b.build_int_compare(IntPredicate::EQ, warp, fb.i64c(0), "w0")
                    .map_err(be)?;
            let go = fb.b.build_and(first, live, "go").map_err(be)?;
            fb.if_else(
                go,
                |fb| {
                    let load = |fb: &Fb<'_, 'ctx>, w: i64| -> R<FloatValue<'ctx>> {
                        let at = fb.add(lane, fb.i64c(32 * w))?;
                        Ok(fb
                            .b
                            .build_load(f64t, part(fb, at)?, "p")
                            .map_err(be)?
                            .into_float_value())
                    };
                    let mut a = load(fb, 0)?;
                    for w in 1..COLUMN_WARPS {
                        a = fold(fb, a, load(fb, w)?)?;
                    }
                    let v =
                        fb.b.build_float_trunc(finish(fb, a)?, fb.f32t, "v")
                            .map_err(be)?;
                    fb.store_f32(optr, o, v)
                },
                |_| Ok(()),
            )?;
            // (the next group's partials go where these were read)
            barrier(fb)
        })?;
    } else {
        by_thread(fb)?;
    }
    fb.ret_ok()
}

/// Fewest elements along the axis for which a GPU reduction, softmax or RMSNorm gives each
/// row a warp (lanes striding along the axis, then a butterfly fold) rather than a thread:
/// a long row on one thread is a chain of dependent loads, and the rows' threads too few
/// to fill the GPU (attention's 64-wide rows of a training step: 2304 threads).
const GPU_WARP_ROW_MIN: i64 = 32;

/// Fewest elements along the axis for which a GPU reduction whose rows cannot take a warp
/// (the axis is not the operands' unit stride: a sum over a matrix's rows, as a weight's
/// gradient sums over tokens) splits each output's elements over a block's warps
/// (`gpu_by_columns`).
const GPU_COLUMN_MIN: i64 = 32;

/// Warps of a block in `gpu_by_columns`: warp `w` folds elements `w, w + COLUMN_WARPS, …` of
/// its lane's output.
const COLUMN_WARPS: i64 = GPU_BLOCK_THREADS / 32;

/// The GPU column split: with at least `GPU_COLUMN_MIN` elements an output, each block takes
/// groups of 32 neighbouring outputs (`⌈rows / 32⌉` groups, blocks striding over them; the
/// launch has a block per group, `gpu_tiles`), lane `l` of every warp the group's output
/// `l`, and `group(fb, o, live, t)` runs on every thread `t` of the block (`live`: output
/// `o` exists; every thread runs it, so that it may hold barriers). Each output's elements
/// are then read by eight threads at once, and a warp's loads of one element of 32
/// neighbouring outputs are neighbours where the outputs' innermost axis is the operands'
/// (a column sum's). Fewer elements run `by_thread`.
fn gpu_by_columns<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: IntValue<'ctx>,
    len: IntValue<'ctx>,
    by_thread: impl FnOnce(&Fb<'_, 'ctx>) -> R<()>,
    group: impl Fn(&Fb<'_, 'ctx>, IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>) -> R<()>,
) -> R<()> {
    by_length(
        fb,
        len,
        GPU_COLUMN_MIN,
        |fb| {
            let groups = fb.ceil_div(rows, fb.i64c(32))?;
            let BlockGrid {
                lane: t,
                blk,
                nblk,
                iters,
            } = block_grid(fb, groups)?;
            let l = fb.b.build_int_signed_rem(t, fb.i64c(32), "l").map_err(be)?;
            fb.for_range(fb.i64c(0), iters, |fb, it| {
                let g = fb.add(blk, fb.mul(it, nblk)?)?;
                let o = fb.add(fb.mul(g, fb.i64c(32))?, l)?;
                let live =
                    fb.b.build_int_compare(IntPredicate::SLT, o, rows, "live")
                        .map_err(be)?;
                group(fb, o, live, t)
            })
        },
        by_thread,
    )
}

/// `long` where each row has at least `min` elements (`len`), else `short`: a GPU kernel's
/// way of sharing rows among threads, chosen at run time (`gpu_by_warp`, `gpu_by_columns`).
fn by_length<'ctx>(
    fb: &Fb<'_, 'ctx>,
    len: IntValue<'ctx>,
    min: i64,
    long: impl FnOnce(&Fb<'_, 'ctx>) -> R<()>,
    short: impl FnOnce(&Fb<'_, 'ctx>) -> R<()>,
) -> R<()> {
    let is_long =
        fb.b.build_int_compare(IntPredicate::SGE, len, fb.i64c(min), "long")
            .map_err(be)?;
    fb.if_else(is_long, long, short)
}

/// Whether a GPU reduction or softmax over `axis` takes a warp per row when rows are long:
/// every operand walks the axis with unit stride (or stays put), so lanes read neighbouring
/// elements. (Along other axes a thread per row already reads neighbouring elements.)
fn gpu_warp_rows(loads: &[&Access], axis: usize) -> bool {
    !loads.is_empty()
        && loads.iter().all(|a| {
            a.strides
                .get(axis)
                .is_some_and(|s| s.same(&Poly::c(1)) || s.same(&Poly::zero()))
        })
}

/// Whether a GPU reduction of `src` over `axis` takes a warp per long row
/// (`gpu_warp_rows` of its operands), rather than `gpu_by_columns`.
fn reduce_warp_rows(src: &Expr, axis: usize) -> bool {
    let mut loads = vec![];
    collect_loads(src, &mut loads);
    let loads: Vec<&Access> = loads.iter().map(|(a, _)| *a).collect();
    gpu_warp_rows(&loads, axis)
}

/// The GPU row split: with at least `GPU_WARP_ROW_MIN` elements a row, warp `tid / 32` of
/// `nthreads / 32` takes rows `warp, warp + warps, …` and `row(fb, o, lane)` runs on all 32
/// lanes of it (the launch has 32 threads a row, `gpu_threads`); shorter rows run
/// `by_thread`.
fn gpu_by_warp<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: IntValue<'ctx>,
    len: IntValue<'ctx>,
    by_thread: impl FnOnce(&Fb<'_, 'ctx>) -> R<()>,
    row: impl Fn(&Fb<'_, 'ctx>, IntValue<'ctx>, IntValue<'ctx>) -> R<()>,
) -> R<()> {
    by_length(
        fb,
        len,
        GPU_WARP_ROW_MIN,
        |fb| {
            let c32 = fb.i64c(32);
            let lane = fb.b.build_int_signed_rem(fb.tid, c32, "lane").map_err(be)?;
            let warp = fb.b.build_int_signed_div(fb.tid, c32, "warp").map_err(be)?;
            let warps =
                fb.b.build_int_signed_div(fb.nth, c32, "warps")
                    .map_err(be)?;
            fb.for_stride(warp, rows, warps, |fb, o| row(fb, o, lane))
        },
        by_thread,
    )
}

fn softmax<'ctx>(fb: &Fb<'_, 'ctx>, out: u32, src: &Access, shape: &[Dim], axis: usize) -> R<()> {
    let sav = fb.access(src, ElemType::F32)?;
    let optr = fb.buf(out)?;
    let ostr = crate::kernel::contiguous_strides(shape)
        .iter()
        .map(|p| fb.poly(p))
        .collect::<R<Vec<_>>>()?;
    let (dims, pos, total) = without_axis(fb, shape, axis)?;
    let len = fb.dim(&shape[axis])?;
    let f64t = fb.ctx.f64_type();
    let mx = fb.slot(fb.f32t.into())?;
    let sum = fb.slot(f64t.into())?;
    // Row `o` over elements `j0, j0 + step, …`; `max` and `add` combine the partial max and
    // sum with the other threads of the row (none, or the warp's lanes).
    let row = |fb: &Fb<'_, 'ctx>,
               o: IntValue<'ctx>,
               j0: IntValue<'ctx>,
               step: IntValue<'ctx>,
               max: &dyn Fn(FloatValue<'ctx>) -> R<FloatValue<'ctx>>,
               add: &dyn Fn(FloatValue<'ctx>) -> R<FloatValue<'ctx>>|
     -> R<()> {
        let idx = fb.decompose(o, &dims)?;
        let pairs: Vec<(usize, IntValue)> = pos.iter().copied().zip(idx.iter().copied()).collect();
        let base = fb.at(&sav, &pairs)?;
        let mut obase = fb.i64c(0);
        for (p, i) in &pairs {
            obase = fb.add(obase, fb.mul(*i, ostr[*p])?)?;
        }
        fb.set(mx, fb.f32c(f64::NEG_INFINITY))?;
        fb.for_stride(j0, len, step, |fb, j| {
            let x = fb.load_f32(sav.ptr, fb.add(base, fb.mul(j, sav.strides[axis])?)?)?;
            let m = fb.intrinsic("llvm.maximum", &[fb.get(mx)?, x])?;
            fb.set(mx, m)
        })?;
        fb.b.build_store(sum, f64t.const_float(0.0)).map_err(be)?;
        let m = max(fb.get(mx)?)?;
        fb.for_stride(j0, len, step, |fb, j| {
            let x = fb.load_f32(sav.ptr, fb.add(base, fb.mul(j, sav.strides[axis])?)?)?;
            let z = fb.b.build_float_sub(x, m, "z").map_err(be)?;
            let ez = fb.exp(z)?;
            fb.store_f32(optr, fb.add(obase, fb.mul(j, ostr[axis])?)?, ez)?;
            let a =
                fb.b.build_load(f64t, sum, "a")
                    .map_err(be)?
                    .into_float_value();
            let ez64 = fb.b.build_float_ext(ez, f64t, "e").map_err(be)?;
            fb.b.build_store(sum, fb.b.build_float_add(a, ez64, "s").map_err(be)?)
                .map_err(be)?;
            Ok(())
        })?;
        let tot =
            fb.b.build_load(f64t, sum, "t")
                .map_err(be)?
                .into_float_value();
        let tot = add(fb.b.build_float_trunc(tot, fb.f32t, "t").map_err(be)?)?;
        fb.for_stride(j0, len, step, |fb, j| {
            let at = fb.add(obase, fb.mul(j, ostr[axis])?)?;
            let v = fb.load_f32(optr, at)?;
            fb.store_f32(optr, at, fb.b.build_float_div(v, tot, "p").map_err(be)?)
        })
    };
    let by_thread = |fb: &Fb<'_, 'ctx>| -> R<()> {
        fb.for_each_share(total, |fb, o| row(fb, o, fb.i64c(0), fb.i64c(1), &Ok, &Ok))
    };
    if fb.gpu && gpu_warp_rows(&[src], axis) {
        gpu_by_warp(fb, total, len, by_thread, |fb, o, lane| {
            let (max, add) = (|m| warp_max(fb, m), |t| warp_sum(fb, t));
            row(fb, o, lane, fb.i64c(32), &max, &add)
        })?;
    } else {
        by_thread(fb)?;
    }
    fb.ret_ok()
}

/// Rows handled together by the matmul kernel: each weight element loaded feeds this many
/// multiply-adds (register blocking), and the weight column stays in L1 across the block.
const ROW_BLOCK: usize = 4;

/// `out = a·w`, or with `norm = Some((g, eps))` `rms_norm(a, g)·w` (`g: None` when folded into
/// `w`). Threads split the columns; rows go in blocks of `ROW_BLOCK`, each output element a
/// dot product over `k` with reassociation allowed, so LLVM vectorises it.
#[allow(clippy::too_many_arguments)]
fn matmul<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    a: &Access,
    norm: Option<(Option<&Access>, f64)>,
    w: &Access,
    (res, part): (Option<&Access>, Option<u32>),
    batch: &[Dim],
    m: &Dim,
    n: &Dim,
    k: &Dim,
    shared_w: bool,
) -> R<()> {
    // (operands may be stored bf16: tensor-core operands in global memory)
    let elem = |x: &Access| fb.prog.buffers[x.buf as usize].elem;
    let aav = fb.access(a, elem(a))?;
    let wav = fb.access(w, elem(w))?;
    let rav = res.map(|r| fb.access(r, ElemType::F32)).transpose()?;
    let gav = match norm {
        Some((Some(g), _)) => Some(fb.access(g, ElemType::F32)?),
        _ => None,
    };
    let eps = norm.map(|(_, e)| e).unwrap_or(0.0);
    let obuf = OutBuf::of(fb, out)?;
    let (bdims, nbatch) = fb.batch_dims(batch)?;
    let (mv, nv, kv) = (fb.dim(m)?, fb.dim(n)?, fb.dim(k)?);
    let (cs, ce) = fb.split(nv)?;
    let accs: Vec<PointerValue> = (0..ROW_BLOCK)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    let invs: Vec<PointerValue> = (0..ROW_BLOCK)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    let (ra, ka) = (aav.strides.len() - 2, aav.strides.len() - 1);
    let (kw, nw) = (wav.strides.len() - 2, wav.strides.len() - 1);
    let blocks =
        fb.b.build_int_signed_div(mv, fb.i64c(ROW_BLOCK as i64), "blocks")
            .map_err(be)?;
    let tail_start = fb.mul(blocks, fb.i64c(ROW_BLOCK as i64))?;
    // One batch entry.
    let run_batch = |fb: &Fb<'_, 'ctx>, bi: IntValue<'ctx>| -> R<()> {
        let bidx = fb.decompose(bi, &bdims)?;
        let bpairs: Vec<(usize, IntValue)> = bidx.iter().copied().enumerate().collect();
        let abase0 = fb.at(&aav, &bpairs)?;
        let wbase0 = if shared_w {
            wav.off
        } else {
            fb.at(&wav, &bpairs)?
        };
        // A block of `rows` rows starting at `m0`, columns `cs..ce`.
        let block = |fb: &Fb<'_, 'ctx>,
                     m0: IntValue<'ctx>,
                     rows: usize,
                     cs: IntValue<'ctx>,
                     ce: IntValue<'ctx>|
         -> R<()> {
            let abases: Vec<IntValue> = (0..rows)
                .map(|r| {
                    fb.add(
                        abase0,
                        fb.mul(fb.add(m0, fb.i64c(r as i64))?, aav.strides[ra])?,
                    )
                })
                .collect::<R<_>>()?;
            if norm.is_some() {
                for r in 0..rows {
                    fb.set(accs[r], fb.f32c(0.0))?;
                    fb.for_range(fb.i64c(0), kv, |fb, kk| {
                        let x =
                            fb.load_f32(aav.ptr, fb.add(abases[r], fb.mul(kk, aav.strides[ka])?)?)?;
                        fb.set(accs[r], fb.fma_fast(fb.get(accs[r])?, x, x)?)
                    })?;
                    let kf =
                        fb.b.build_signed_int_to_float(kv, fb.f32t, "k")
                            .map_err(be)?;
                    let mean =
                        fb.b.build_float_div(fb.get(accs[r])?, kf, "mean")
                            .map_err(be)?;
                    let sq = fb.intrinsic("llvm.sqrt", &[fb.fadd(mean, fb.f32c(eps))?])?;
                    fb.set(
                        invs[r],
                        fb.b.build_float_div(fb.f32c(1.0), sq, "inv").map_err(be)?,
                    )?;
                }
            }
            fb.for_range(cs, ce, |fb, ni| {
                let wbase = fb.add(wbase0, fb.mul(ni, wav.strides[nw])?)?;
                for acc in accs.iter().take(rows) {
                    fb.set(*acc, fb.f32c(0.0))?;
                }
                fb.for_range(fb.i64c(0), kv, |fb, kk| {
                    let mut y =
                        fb.load_f32(wav.ptr, fb.add(wbase, fb.mul(kk, wav.strides[kw])?)?)?;
                    if let Some(gav) = &gav {
                        let gv =
                            fb.load_f32(gav.ptr, fb.add(gav.off, fb.mul(kk, gav.strides[0])?)?)?;
                        y = fb.fast(fb.fmul(y, gv)?);
                    }
                    for r in 0..rows {
                        let x =
                            fb.load_f32(aav.ptr, fb.add(abases[r], fb.mul(kk, aav.strides[ka])?)?)?;
                        fb.set(accs[r], fb.fma_fast(fb.get(accs[r])?, x, y)?)?;
                    }
                    Ok(())
                })?;
                for r in 0..rows {
                    let mut v = fb.get(accs[r])?;
                    if norm.is_some() {
                        v = fb.fmul(v, fb.get(invs[r])?)?;
                    }
                    let row = fb.add(fb.mul(bi, mv)?, fb.add(m0, fb.i64c(r as i64))?)?;
                    fb.store_f32(obuf.f32_ptr()?, fb.add(fb.mul(row, nv)?, ni)?, v)?;
                }
                Ok(())
            })
        };
        fb.for_range(fb.i64c(0), blocks, |fb, blk| {
            block(
                fb,
                fb.mul(blk, fb.i64c(ROW_BLOCK as i64))?,
                ROW_BLOCK,
                cs,
                ce,
            )
        })?;
        fb.for_range(tail_start, mv, |fb, mi| block(fb, mi, 1, cs, ce))
    };
    if fb.gpu {
        // Which kernel (see `GPU_GEMV_MAX_M`): large tiles, small tiles, or row blocks (or
        // split k).
        let shared = tiled_shared(fb)?;
        let [rows, large_ok, small_ok] = gpu_matmul_paths(fb, (mv, nv), nbatch)?;
        let large = fb.ctx.append_basic_block(fb.func, "large");
        let not_large = fb.ctx.append_basic_block(fb.func, "not_large");
        let mid = fb.ctx.append_basic_block(fb.func, "mid");
        let gemv = fb.ctx.append_basic_block(fb.func, "gemv");
        let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
        if fb.heavy {
            fb.b.build_conditional_branch(and(rows, large_ok)?, large, not_large)
                .map_err(be)?;
        } else {
            // (the light entry: the runtime launches it where the large tiles are not taken)
            fb.b.build_unconditional_branch(not_large).map_err(be)?;
        }
        fb.b.position_at_end(not_large);
        fb.b.build_conditional_branch(and(rows, small_ok)?, mid, gemv)
            .map_err(be)?;
        fb.b.position_at_end(large);
        let mm = GpuMatmul {
            optr: obuf,
            aav: &aav,
            gav: gav.as_ref(),
            norm: norm.is_some(),
            eps,
            wav: &wav,
            rav: rav.as_ref(),
            bdims: &bdims,
            nbatch,
            dims: (mv, nv, kv),
            shared_w,
        };
        if !fb.heavy {
            // (nothing branches here)
            fb.b.build_unreachable().map_err(be)?;
        } else {
            if fb.tensor_cores {
                match fb.wgmma.then(|| wgmma_fits(fb, &mm)).transpose()?.flatten() {
                    Some(fits) => fb.if_else(
                        fits,
                        |fb| match fb.tma.then(|| tma_fits(fb, &mm)).transpose()?.flatten() {
                            Some(tma) => fb.if_else(
                                tma,
                                |fb| gpu_wgmma_matmul(fb, &mm, WgCopies::Tma),
                                |fb| gpu_wgmma_matmul(fb, &mm, WgCopies::CpAsync),
                            ),
                            None => gpu_wgmma_matmul(fb, &mm, WgCopies::CpAsync),
                        },
                        |fb| gpu_mma_matmul(fb, &mm),
                    )?,
                    None => gpu_mma_matmul(fb, &mm)?,
                }
            } else {
                gpu_tiled_matmul(fb, &mm, GPU_TILE, shared, None)?;
            }
            fb.ret_ok()?;
        }
        fb.b.position_at_end(mid);
        gpu_tiled_matmul(fb, &mm, GPU_TILE_SMALL, shared, None)?;
        fb.ret_ok()?;
        fb.b.position_at_end(gemv);
        match part {
            // (too few tiles for the tiled kernels: with more than `GPU_GEMV_MAX_M` rows,
            // split k, as `split_k_taken` says)
            Some(p) => fb.if_else(
                rows,
                |fb| gpu_tiled_matmul(fb, &mm, SPLIT_K_TILE, shared, Some(fb.buf(p)?)),
                |fb| gpu_gemv(fb, &mm),
            )?,
            None => gpu_gemv(fb, &mm)?,
        }
    } else {
        fb.for_range(fb.i64c(0), nbatch, |fb, bi| run_batch(fb, bi))?;
    }
    fb.ret_ok()
}

/// `out[.., j] = w[j]·x[.., j] / sqrt(mean_j(x[.., j]²) + eps)`, the sum of squares in f64: a
/// thread per row, or on the GPU a warp per long unit-stride row (`gpu_by_warp`; a thread
/// per row walking 576-wide rows left most of the GPU idle and read across rows).
fn rms_norm<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    x: &Access,
    w: &Access,
    shape: &[Dim],
    eps: f64,
) -> R<()> {
    let xav = fb.access(x, ElemType::F32)?;
    let wav = fb.access(w, ElemType::F32)?;
    let optr = fb.buf(out)?;
    let r = shape.len();
    let dims: Vec<IntValue> = shape[..r - 1].iter().map(|d| fb.dim(d)).collect::<R<_>>()?;
    let n = fb.dim(&shape[r - 1])?;
    let mut rows = fb.i64c(1);
    for d in &dims {
        rows = fb.mul(rows, *d)?;
    }
    let f64t = fb.ctx.f64_type();
    let acc = fb.slot(f64t.into())?;
    // Row `row`'s elements `j0, j0 + step, …`; `sum` adds up the (f64) partial sums of
    // squares of the threads sharing the row (none, or the warp's lanes).
    let norm_row = |fb: &Fb<'_, 'ctx>,
                    row: IntValue<'ctx>,
                    j0: IntValue<'ctx>,
                    step: IntValue<'ctx>,
                    sum: &dyn Fn(FloatValue<'ctx>) -> R<FloatValue<'ctx>>|
     -> R<()> {
        let idx = fb.decompose(row, &dims)?;
        let pairs: Vec<(usize, IntValue)> = idx.iter().copied().enumerate().collect();
        let base = fb.at(&xav, &pairs)?;
        fb.b.build_store(acc, f64t.const_float(0.0)).map_err(be)?;
        fb.for_stride(j0, n, step, |fb, j| {
            let v = fb.load_f32(xav.ptr, fb.add(base, fb.mul(j, xav.strides[r - 1])?)?)?;
            let sq =
                fb.b.build_float_ext(fb.fmul(v, v)?, f64t, "sq")
                    .map_err(be)?;
            let a =
                fb.b.build_load(f64t, acc, "a")
                    .map_err(be)?
                    .into_float_value();
            fb.b.build_store(acc, fb.b.build_float_add(a, sq, "s").map_err(be)?)
                .map_err(be)?;
            Ok(())
        })?;
        let a =
            fb.b.build_load(f64t, acc, "a")
                .map_err(be)?
                .into_float_value();
        let a = sum(a)?;
        let nf = fb.b.build_signed_int_to_float(n, f64t, "n").map_err(be)?;
        let mean =
            fb.b.build_float_trunc(fb.b.build_float_div(a, nf, "m").map_err(be)?, fb.f32t, "m")
                .map_err(be)?;
        let sq = fb.intrinsic("llvm.sqrt", &[fb.fadd(mean, fb.f32c(eps))?])?;
        let inv = fb.b.build_float_div(fb.f32c(1.0), sq, "inv").map_err(be)?;
        let obase = fb.mul(row, n)?;
        fb.for_stride(j0, n, step, |fb, j| {
            let v = fb.load_f32(xav.ptr, fb.add(base, fb.mul(j, xav.strides[r - 1])?)?)?;
            let wv = fb.load_f32(wav.ptr, fb.add(wav.off, fb.mul(j, wav.strides[0])?)?)?;
            let y = fb.fmul(wv, fb.fmul(v, inv)?)?;
            fb.store_f32(optr, fb.add(obase, j)?, y)
        })
    };
    let by_thread = |fb: &Fb<'_, 'ctx>| -> R<()> {
        fb.for_each_share(rows, |fb, row| {
            norm_row(fb, row, fb.i64c(0), fb.i64c(1), &|a| Ok(a))
        })
    };
    if fb.gpu && gpu_warp_rows(&[x], r - 1) {
        gpu_by_warp(fb, rows, n, by_thread, |fb, row, lane| {
            norm_row(fb, row, lane, fb.i64c(32), &|a| {
                let a = fb.b.build_float_trunc(a, fb.f32t, "a").map_err(be)?;
                fb.b.build_float_ext(warp_sum(fb, a)?, f64t, "a")
                    .map_err(be)
            })
        })?;
    } else {
        by_thread(fb)?;
    }
    fb.ret_ok()
}

/// Which GPU matmul kernel dims `(m, n)` (`nbatch` batch entries) take (see
/// `GPU_GEMV_MAX_M`): whether they have more than `GPU_GEMV_MAX_M` rows, at least
/// `GPU_TILED_MIN_TILES` tiles of `GPU_TILE` square, and at least `GPU_SMALL_MIN_TILES` of
/// `GPU_TILE_SMALL`.
fn gpu_matmul_paths<'ctx>(
    fb: &Fb<'_, 'ctx>,
    (mv, nv): (IntValue<'ctx>, IntValue<'ctx>),
    nbatch: IntValue<'ctx>,
) -> R<[IntValue<'ctx>; 3]> {
    let tiles = |t: i64| -> R<IntValue<'ctx>> {
        let ceil = |x| fb.ceil_div(x, fb.i64c(t));
        fb.mul(fb.mul(ceil(mv)?, ceil(nv)?)?, nbatch)
    };
    let at_least = |x, bound: i64| {
        fb.b.build_int_compare(IntPredicate::SGE, x, fb.i64c(bound), "ge")
            .map_err(be)
    };
    Ok([
        at_least(mv, GPU_GEMV_MAX_M + 1)?,
        at_least(tiles(GPU_TILE)?, GPU_TILED_MIN_TILES)?,
        at_least(tiles(GPU_TILE_SMALL)?, GPU_SMALL_MIN_TILES)?,
    ])
}

/// Whether a GPU matmul that may split k (`Kernel::MatMul::part`) does: more than
/// `GPU_GEMV_MAX_M` rows but too few tiles for either tiled kernel (`gpu_matmul_paths`),
/// hence at most `SPLIT_K_MAX_TILES` of `SPLIT_K_TILE` square.
fn split_k_taken<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dims: (IntValue<'ctx>, IntValue<'ctx>),
    nbatch: IntValue<'ctx>,
) -> R<IntValue<'ctx>> {
    let [rows, large_ok, small_ok] = gpu_matmul_paths(fb, dims, nbatch)?;
    let tiled = fb.b.build_or(large_ok, small_ok, "tiled").map_err(be)?;
    let untiled = fb.b.build_not(tiled, "untiled").map_err(be)?;
    fb.b.build_and(rows, untiled, "split").map_err(be)
}

/// `v` plus the residual `r` at `(row, col)` of the batch entry at `rbase` in it (a matmul's
/// residual epilogue, `Kernel::MatMul::res`).
fn plus_residual<'ctx>(
    fb: &Fb<'_, 'ctx>,
    r: &Av<'ctx>,
    rbase: IntValue<'ctx>,
    (row, col): (IntValue<'ctx>, IntValue<'ctx>),
    v: FloatValue<'ctx>,
) -> R<FloatValue<'ctx>> {
    let n = r.strides.len();
    let at = fb.add(
        rbase,
        fb.add(
            fb.mul(row, r.strides[n - 2])?,
            fb.mul(col, r.strides[n - 1])?,
        )?,
    )?;
    fb.fadd(v, fb.load_f32(r.ptr, at)?)
}

/// Sums a split matmul's partial tiles (`Kernel::MatMulCombine`): output `(b, row, col)` of
/// tile `tile` (numbered as `GpuMatmul::tile_at` does, `SPLIT_K_TILE` square) is
/// `Σ_s part[(s·tiles + tile)·T² + (row % T)·T + col % T]`, `s` in order, plus the residual
/// `res[b, row, col]` if any, stored in the output's element type; nothing when the matmul
/// did not split (`split_k_taken`).
fn matmul_combine(
    fb: &Fb,
    (out, part, res): (u32, u32, Option<&Access>),
    batch: &[Dim],
    m: &Dim,
    n: &Dim,
) -> R<()> {
    let t = SPLIT_K_TILE;
    let c = |v: i64| fb.i64c(v);
    let optr = OutBuf::of(fb, out)?;
    let pptr = fb.buf(part)?;
    let rav = res.map(|r| fb.access(r, ElemType::F32)).transpose()?;
    let (mv, nv) = (fb.dim(m)?, fb.dim(n)?);
    let (bdims, nbatch) = fb.batch_dims(batch)?;
    let taken = split_k_taken(fb, (mv, nv), nbatch)?;
    let acc = fb.slot(fb.f32t.into())?;
    fb.if_else(
        taken,
        |fb| {
            let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
            let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
            let tiles_n = fb.ceil_div(nv, c(t))?;
            let per_batch = fb.mul(fb.ceil_div(mv, c(t))?, tiles_n)?;
            let tiles = fb.mul(per_batch, nbatch)?;
            let per_entry = fb.mul(mv, nv)?;
            fb.for_each_share(fb.mul(nbatch, per_entry)?, |fb, o| {
                let bi = sdiv(o, per_entry, "bi")?;
                let rc = srem(o, per_entry, "rc")?;
                let (row, col) = (sdiv(rc, nv, "row")?, srem(rc, nv, "col")?);
                let tile = fb.add(
                    fb.mul(bi, per_batch)?,
                    fb.add(
                        fb.mul(sdiv(row, c(t), "tr")?, tiles_n)?,
                        sdiv(col, c(t), "tc")?,
                    )?,
                )?;
                let local = fb.add(
                    fb.mul(srem(row, c(t), "lr")?, c(t))?,
                    srem(col, c(t), "lc")?,
                )?;
                fb.set(acc, fb.f32c(0.0))?;
                for s in 0..SPLIT_K {
                    let at = fb.add(
                        fb.mul(fb.add(fb.mul(c(s), tiles)?, tile)?, c(t * t))?,
                        local,
                    )?;
                    fb.set(acc, fb.fadd(fb.get(acc)?, fb.load_f32(pptr, at)?)?)?;
                }
                let mut v = fb.get(acc)?;
                if let Some(r) = &rav {
                    // (the batch entry's offset in the residual, as `GpuMatmul::tile_at`)
                    let bidx = fb.decompose(bi, &bdims)?;
                    let pairs: Vec<(usize, IntValue)> = bidx.iter().copied().enumerate().collect();
                    v = plus_residual(fb, r, fb.at(r, &pairs)?, (row, col), v)?;
                }
                optr.store(fb, o, v)
            })
        },
        |_| Ok(()),
    )?;
    fb.ret_ok()
}

/// GPU matmuls with at most `GPU_GEMV_MAX_M` rows run on `gpu_gemv`, bound by reading the
/// weights (once per `ROW_BLOCK` rows). The others take the large-tile kernels
/// (`gpu_tiled_matmul`, or with tensor cores `gpu_mma_matmul` and `gpu_wgmma_matmul`) where
/// they have at least `GPU_TILED_MIN_TILES` output tiles of `GPU_TILE` square, one an SM of
/// an H100; else `gpu_tiled_matmul`'s `GPU_TILE_SMALL` tiles where they have at least
/// `GPU_SMALL_MIN_TILES` of those (a training step's `[256 × 576]·[576 × 3072]` has 48 large
/// tiles, 192 small ones, and on `gpu_gemv` would read its weights 64 times); else, too small
/// to keep half the SMs busy with small tiles either (a 64-token prompt's `[64 × 576]·[576 ×
/// 1536]`, 24), `gpu_gemv`. By a rough bill (a small tile takes about `64·k` cycles of one
/// SM; `gpu_gemv` reads `k·n·4` bytes of L2 per 4 rows) the two are about even near 36
/// small tiles, and `gpu_gemv` is ahead below; 64 leaves a margin until a device measures.
/// That bill is wrong where rows are many: G19 timed a training step's `[256 × 1536]·[1536
/// × 576]` (36 small tiles) at 190-320 µs on `gpu_gemv`, its 64 passes over the weights
/// bound by latency. A matmul with a constant k of `SPLIT_K_MIN_K` or more
/// (`Kernel::MatMul::part`) and more than `GPU_GEMV_MAX_M` rows splits k there instead
/// (`split_k_taken`), 8 blocks a tile; the LM head's input gradient, `[256 × 49152]·[49152
/// × 576]`, would read its 113 MB of weights 64 times on `gpu_gemv`.
const GPU_GEMV_MAX_M: i64 = 32;
const GPU_TILED_MIN_TILES: i64 = 132;
const GPU_SMALL_MIN_TILES: i64 = 64;
const _: () =
    assert!(SPLIT_K_MAX_TILES == GPU_SMALL_MIN_TILES - 1 && SPLIT_K_TILE == GPU_TILE_SMALL);
/// The large-tile matmul kernels' output tile rows (and columns, but `gpu_wgmma_matmul`'s)
/// per 256-thread block.
pub const GPU_TILE: i64 = 128;
/// Threads per GPU block (every launch is in blocks of the plan's `GPU_BLOCK`):
/// `gpu_tiled_matmul` is written for 256.
const GPU_BLOCK_THREADS: i64 = egret_runtime::plan::GPU_BLOCK as i64;
const _: () = assert!(GPU_BLOCK_THREADS == 256);

/// A shared-memory array of `len` floats private to the kernel being generated.
fn shared_f32<'ctx>(fb: &Fb<'_, 'ctx>, name: &str, len: u32) -> PointerValue<'ctx> {
    shared_array(fb, name, fb.f32t.array_type(len))
}

/// `shared_f32`, or the kernel's array of that name and length if it has one already: for
/// code generated twice in one kernel on paths that never both run (`gpu_wgmma_matmul`'s
/// two ways of copying).
fn shared_f32_once<'ctx>(fb: &Fb<'_, 'ctx>, name: &str, len: u32) -> PointerValue<'ctx> {
    let kernel = fb.func.get_name().to_string_lossy();
    let full = if fb.sim {
        format!("{kernel}{SIM_SHARED}{name}")
    } else {
        format!("{kernel}_{name}")
    };
    match fb.module.get_global(&full) {
        Some(g) if g.get_value_type() == fb.f32t.array_type(len).into() => g.as_pointer_value(),
        _ => shared_f32(fb, name, len),
    }
}

/// What separates a kernel's name from an array's in the names of the simulator's shared
/// arrays (`{kernel}.shared.{array}`), by which it finds each kernel's arrays (to fill them
/// as a block starts: `crate::simt`).
pub const SIM_SHARED: &str = ".shared.";

/// A shared-memory array of type `ty` private to the kernel being generated: address space
/// 3 on the GPU; in the simulator an ordinary global (named with `SIM_SHARED`), visible
/// outside the module so that LLVM assumes the barrier hook may change it (the other
/// threads of the block write it).
fn shared_array<'ctx>(
    fb: &Fb<'_, 'ctx>,
    name: &str,
    ty: inkwell::types::ArrayType<'ctx>,
) -> PointerValue<'ctx> {
    shared_array_aligned(fb, name, ty, 16)
}

/// `shared_array` on a boundary of `align` bytes (16 or more).
fn shared_array_aligned<'ctx>(
    fb: &Fb<'_, 'ctx>,
    name: &str,
    ty: inkwell::types::ArrayType<'ctx>,
    align: u32,
) -> PointerValue<'ctx> {
    let space = if fb.sim { 0u16 } else { 3 };
    let kernel = fb.func.get_name().to_string_lossy();
    let g = fb.module.add_global(
        ty,
        Some(AddressSpace::from(space)),
        &if fb.sim {
            format!("{kernel}{SIM_SHARED}{name}")
        } else {
            format!("{kernel}_{name}")
        },
    );
    if fb.sim {
        g.set_linkage(Linkage::External);
        g.set_initializer(&ty.const_zero());
    } else {
        g.set_linkage(Linkage::Internal);
        g.set_initializer(&ty.get_undef());
    }
    g.set_alignment(align.max(16));
    g.as_pointer_value()
}

/// `barrier.sync.aligned 0`: every thread of the block reaches it before any goes on.
fn barrier(fb: &Fb) -> R<()> {
    if fb.sim {
        fb.hook(SIMT_HOOKS[0], fb.ctx.void_type().fn_type(&[], false), &[])?;
        return Ok(());
    }
    let name = "llvm.nvvm.barrier.cta.sync.aligned.all";
    let f = fb.declare(name, &[])?;
    let bar0 = fb.ctx.i32_type().const_zero();
    fb.b.build_call(f, &[bar0.into()], "").map_err(be)?;
    Ok(())
}

/// A GPU kernel's output buffer: where it is and how its elements are stored (f32; bf16 for
/// a bf16 graph output that a tensor-core matmul or attention writes, `schedule`'s
/// `stored_bf16`).
#[derive(Clone, Copy)]
struct OutBuf<'ctx> {
    ptr: PointerValue<'ctx>,
    elem: ElemType,
}

impl<'ctx> OutBuf<'ctx> {
    fn of(fb: &Fb<'_, 'ctx>, out: u32) -> R<Self> {
        let elem = fb.prog.buffers[out as usize].elem;
        match elem {
            ElemType::F32 | ElemType::BF16 => Ok(OutBuf {
                ptr: fb.buf(out)?,
                elem,
            }),
            e => Err(BackendError::Unsupported(format!(
                "a matmul or attention output stored as {e:?}"
            ))),
        }
    }

    /// The f32 buffer, for the paths that store no other (the CPU's).
    fn f32_ptr(&self) -> R<PointerValue<'ctx>> {
        match self.elem {
            ElemType::F32 => Ok(self.ptr),
            e => Err(BackendError::Unsupported(format!(
                "an output stored as {e:?} on the CPU"
            ))),
        }
    }

    /// Stores `v` at element `idx`: as it is, or rounded to the nearest bf16 (ties to even,
    /// `pack_bf16x2`).
    fn store(&self, fb: &Fb<'_, 'ctx>, idx: IntValue<'ctx>, v: FloatValue<'ctx>) -> R<()> {
        if self.elem == ElemType::F32 {
            return fb.store_f32(self.ptr, idx, v);
        }
        let i16t = fb.ctx.i16_type();
        let w = pack_bf16x2(fb, v, fb.f32c(0.0))?;
        let h = fb.b.build_int_truncate(w, i16t, "h").map_err(be)?;
        let p = unsafe { fb.b.build_in_bounds_gep(i16t, self.ptr, &[idx], "p") }.map_err(be)?;
        fb.b.build_store(p, h).map_err(be)?;
        Ok(())
    }

    /// Stores `v0` and `v1` at elements `idx` (even; the buffer aligned to a pair's bytes)
    /// and `idx + 1` as one store: 8 bytes of f32, or 4 of bf16.
    fn store_pair(
        &self,
        fb: &Fb<'_, 'ctx>,
        idx: IntValue<'ctx>,
        [v0, v1]: [FloatValue<'ctx>; 2],
    ) -> R<()> {
        if self.elem == ElemType::F32 {
            return store_vector(fb, self.ptr, idx, &[v0.into(), v1.into()]);
        }
        // (addressed as bf16 elements, so that the offsets of a tile's pairs from its first
        // stay constants folded into the stores)
        let i16t = fb.ctx.i16_type();
        let p = unsafe { fb.b.build_in_bounds_gep(i16t, self.ptr, &[idx], "p") }.map_err(be)?;
        fb.check_aligned(p, 4)?;
        fb.b.build_store(p, pack_bf16x2(fb, v0, v1)?)
            .map_err(be)?
            .set_alignment(4)
            .map_err(|e| BackendError::Llvm(e.to_string()))
    }
}

/// A GPU matmul's operands: `out = a·w` (`[batch, m, k]·[batch?, k, n]`), with `norm` the
/// rows of `a` RMS-normalised (`eps`) and scaled by `g` first.
#[derive(Clone, Copy)]
struct GpuMatmul<'a, 'ctx> {
    optr: OutBuf<'ctx>,
    aav: &'a Av<'ctx>,
    gav: Option<&'a Av<'ctx>>,
    norm: bool,
    eps: f64,
    wav: &'a Av<'ctx>,
    /// The residual added as outputs are stored (`Kernel::MatMul::res`).
    rav: Option<&'a Av<'ctx>>,
    bdims: &'a [IntValue<'ctx>],
    nbatch: IntValue<'ctx>,
    dims: (IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>),
    shared_w: bool,
}

/// Shared memory in which `GpuMatmul::store_tile` may stage a tile's outputs, and the work
/// that follows once the tile no longer needs it.
#[derive(Clone, Copy)]
struct Staging<'a, 'ctx> {
    /// Free for the outputs, 16-byte aligned.
    smem: PointerValue<'ctx>,
    /// This thread's index in the block.
    lane: IntValue<'ctx>,
    /// Bytes from `smem` that `then` leaves alone: it may write past them.
    keep: i64,
    /// Runs once, on every path of `store_tile`, after a barrier that follows every
    /// thread's last read of the shared memory it may write (the caller's, before
    /// `store_tile`, among them) and this thread's last use of its accumulators.
    then: &'a dyn Fn(&Fb<'_, 'ctx>) -> R<()>,
}

/// Where a tile of a GPU matmul starts: its batch entry, first row and column, and the
/// offsets of that batch entry in `a` and `w`.
#[derive(Clone, Copy)]
struct TileAt<'ctx> {
    bi: IntValue<'ctx>,
    m0: IntValue<'ctx>,
    n0: IntValue<'ctx>,
    /// The tile's rows and width.
    size: (i64, i64),
    abase: IntValue<'ctx>,
    wbase: IntValue<'ctx>,
    /// That batch entry's offset in the residual (0 without one).
    rbase: IntValue<'ctx>,
}

impl<'ctx> GpuMatmul<'_, 'ctx> {
    /// Tile `tile` of `per_batch` per batch entry, `tiles_n` across, `rows × width`.
    fn tile_at(
        &self,
        fb: &Fb<'_, 'ctx>,
        tile: IntValue<'ctx>,
        (per_batch, tiles_n): (IntValue<'ctx>, IntValue<'ctx>),
        (rows, width): (i64, i64),
    ) -> R<TileAt<'ctx>> {
        let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
        let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
        let bi = sdiv(tile, per_batch, "bi")?;
        let rest = srem(tile, per_batch, "rest")?;
        let m0 = fb.mul(sdiv(rest, tiles_n, "tmi")?, fb.i64c(rows))?;
        let n0 = fb.mul(srem(rest, tiles_n, "tni")?, fb.i64c(width))?;
        let bidx = fb.decompose(bi, self.bdims)?;
        let bpairs: Vec<(usize, IntValue)> = bidx.iter().copied().enumerate().collect();
        let abase = fb.at(self.aav, &bpairs)?;
        let wbase = if self.shared_w {
            self.wav.off
        } else {
            fb.at(self.wav, &bpairs)?
        };
        let rbase = match self.rav {
            Some(r) => fb.at(r, &bpairs)?,
            None => fb.i64c(0),
        };
        Ok(TileAt {
            bi,
            m0,
            n0,
            size: (rows, width),
            abase,
            wbase,
            rbase,
        })
    }

    /// Whether `a`'s rows (along k) and `w`'s rows (along n) can be read in chunks of
    /// `elems` elements, each one aligned access of its size: unit stride along them, every
    /// row start a multiple of `elems` elements, the base aligned to a chunk's bytes.
    fn rows_in_chunks(&self, fb: &Fb<'_, 'ctx>, elems: i64) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
        let rows = |av: &Av<'ctx>| -> R<IntValue<'ctx>> {
            let n = av.strides.len();
            let unit =
                fb.b.build_int_compare(IntPredicate::EQ, av.strides[n - 1], fb.i64c(1), "u")
                    .map_err(be)?;
            let starts = fb.multiple_of(av.strides[n - 2], elems)?;
            let both = fb.b.build_and(unit, starts, "v").map_err(be)?;
            let bytes = elems * av.elem.size() as i64;
            fb.b.build_and(both, fb.ptr_aligned(av.ptr, bytes)?, "v")
                .map_err(be)
        };
        Ok((rows(self.aav)?, rows(self.wav)?))
    }

    /// Whether the rows allow loads of four elements (`load_x4`).
    fn vector_rows(&self, fb: &Fb<'_, 'ctx>) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
        self.rows_in_chunks(fb, 4)
    }

    /// Whether a `t`-square tile at rows `m0` (batch offset `abase` in `a`) and columns
    /// `n0` (`wbase` in `w`) takes each operand's 16-byte path (`vecs` from `vector_rows`):
    /// the rows allow it, the batch offset keeps them aligned, and the tile lies inside the
    /// matrix.
    fn vector_tile(
        &self,
        fb: &Fb<'_, 'ctx>,
        t: i64,
        (a_vec, w_vec): (IntValue<'ctx>, IntValue<'ctx>),
        (m0, abase): (IntValue<'ctx>, IntValue<'ctx>),
        (n0, wbase): (IntValue<'ctx>, IntValue<'ctx>),
    ) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
        let (mv, nv, _) = self.dims;
        let fast = |vec, base, o: IntValue<'ctx>, n| -> R<IntValue<'ctx>> {
            let inside =
                fb.b.build_int_compare(IntPredicate::SLE, fb.add(o, fb.i64c(t))?, n, "in")
                    .map_err(be)?;
            let v =
                fb.b.build_and(vec, fb.multiple_of(base, 4)?, "f")
                    .map_err(be)?;
            fb.b.build_and(v, inside, "f").map_err(be)
        };
        Ok((fast(a_vec, abase, m0, mv)?, fast(w_vec, wbase, n0, nv)?))
    }

    /// The output tiles, `rows × width` in every batch entry: how many a batch entry has,
    /// how many across, and this block's share of them (`block_grid`).
    fn tiles(
        &self,
        fb: &Fb<'_, 'ctx>,
        (rows, width): (i64, i64),
    ) -> R<(IntValue<'ctx>, IntValue<'ctx>, BlockGrid<'ctx>)> {
        let (mv, nv, _) = self.dims;
        let tiles_n = fb.ceil_div(nv, fb.i64c(width))?;
        let per_batch = fb.mul(fb.ceil_div(mv, fb.i64c(rows))?, tiles_n)?;
        let grid = block_grid(fb, fb.mul(per_batch, self.nbatch)?)?;
        Ok((per_batch, tiles_n, grid))
    }

    /// Stores this thread's accumulators of the tile at `at`: accumulator `x` at `place(x)`
    /// in the tile, scaled by its row's norm (with `norm`: the tile's row scales in shared
    /// memory at `inv`, `row_scales`), plus the residual, where inside the matrix.
    ///
    /// `place` puts accumulators `2i` and `2i + 1` side by side in one row (the layout of
    /// `mma` and `wgmma` fragments). A tile wholly inside the matrix, with an even row length
    /// (and the output on 8 bytes), stores each such pair as one store (8 bytes of f32, 4 of
    /// bf16) at a constant offset from the thread's first output, with no bounds tests; the
    /// other tiles test and store each output.
    ///
    /// With `stage` (`Staging`), a whole tile with no residual, rows of 16-byte multiples
    /// and the output on 16 bytes goes through its shared memory instead (`store_staged`);
    /// the caller then needs a barrier before that shared memory is written again. Its
    /// `then` runs once on every path, after a barrier (see there).
    fn store_tile(
        &self,
        fb: &Fb<'_, 'ctx>,
        accs: &[PointerValue<'ctx>],
        place: &TilePlace<'_, 'ctx>,
        at: TileAt<'ctx>,
        (inv_s, inv_at): (PointerValue<'ctx>, i64),
        stage: Option<Staging<'_, 'ctx>>,
    ) -> R<()> {
        let (mv, nv, _) = self.dims;
        let c = |v: i64| fb.i64c(v);
        let cmp = |p, a, b| fb.b.build_int_compare(p, a, b, "cmp").map_err(be);
        let lt = |a, b| cmp(IntPredicate::SLT, a, b);
        let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
        let sub = |a, b| fb.b.build_int_sub(a, b, "d").map_err(be);
        // Accumulator `x`, at row `r` of the tile, scaled by the row's norm.
        let scaled = |fb: &Fb<'_, 'ctx>, x: usize, r| -> R<FloatValue<'ctx>> {
            let v = fb.get(accs[x])?;
            if !self.norm {
                return Ok(v);
            }
            fb.fmul(v, fb.load_f32(inv_s, fb.add(r, c(inv_at))?)?)
        };
        // Output `(row, col)` of the tile, accumulator `x`: scaled, with its residual.
        let value = |fb: &Fb<'_, 'ctx>, x: usize, r, row, col| -> R<_> {
            self.with_residual(fb, at.rbase, row, col, scaled(fb, x, r)?)
        };
        let (tm, tn) = at.size;
        let whole = and(
            and(
                cmp(IntPredicate::SLE, fb.add(at.m0, c(tm))?, mv)?,
                cmp(IntPredicate::SLE, fb.add(at.n0, c(tn))?, nv)?,
            )?,
            and(fb.multiple_of(nv, 2)?, fb.ptr_aligned(self.optr.ptr, 8)?)?,
        )?;
        let pairs_each = |fb: &Fb<'_, 'ctx>| -> R<()> {
            let (r0, c0) = place(fb, 0)?;
            let first = fb.add(
                fb.mul(fb.add(fb.mul(at.bi, mv)?, fb.add(at.m0, r0)?)?, nv)?,
                fb.add(at.n0, c0)?,
            )?;
            for x in (0..accs.len()).step_by(2) {
                let (r, cl) = place(fb, x)?;
                let (row, col) = (fb.add(at.m0, r)?, fb.add(at.n0, cl)?);
                let v0 = value(fb, x, r, row, col)?;
                let v1 = value(fb, x + 1, r, row, fb.add(col, c(1))?)?;
                // (the offsets from the first output fold to constants times the row length)
                let o = fb.add(first, fb.add(fb.mul(sub(r, r0)?, nv)?, sub(cl, c0)?)?)?;
                self.optr.store_pair(fb, o, [v0, v1])?;
            }
            Ok(())
        };
        // (a path that does not stage: its stores, a barrier, `then`)
        let unstaged = |fb: &Fb<'_, 'ctx>, path: &dyn Fn(&Fb<'_, 'ctx>) -> R<()>| -> R<()> {
            path(fb)?;
            match stage {
                Some(st) => {
                    barrier(fb)?;
                    (st.then)(fb)
                }
                None => Ok(()),
            }
        };
        let pairs = |fb: &Fb<'_, 'ctx>| -> R<()> {
            let Some(st) = stage.filter(|_| self.rav.is_none()) else {
                return unstaged(fb, &pairs_each);
            };
            let esz = self.optr.elem.size() as i64;
            let rows16 = and(
                fb.multiple_of(nv, 16 / esz)?,
                fb.ptr_aligned(self.optr.ptr, 16)?,
            )?;
            fb.if_else(
                rows16,
                |fb| self.store_staged(fb, accs.len(), place, &scaled, at, st),
                |fb| unstaged(fb, &pairs_each),
            )
        };
        let each = |fb: &Fb<'_, 'ctx>| -> R<()> {
            for x in 0..accs.len() {
                let (r, cl) = place(fb, x)?;
                let (row, col) = (fb.add(at.m0, r)?, fb.add(at.n0, cl)?);
                fb.if_else(
                    and(lt(row, mv)?, lt(col, nv)?)?,
                    |fb| {
                        let v = value(fb, x, r, row, col)?;
                        let o = fb.add(fb.mul(fb.add(fb.mul(at.bi, mv)?, row)?, nv)?, col)?;
                        self.optr.store(fb, o, v)
                    },
                    |_| Ok(()),
                )?;
            }
            Ok(())
        };
        fb.if_else(whole, pairs, |fb| unstaged(fb, &each))
    }

    /// A whole tile's outputs through shared memory at `smem`: each thread writes its
    /// accumulators' pairs (`scaled(x, row)`, in the output's element type) into a
    /// row-major copy of the tile whose rows are `STAGED_PAD_ELEMS` elements longer than the
    /// tile's (so the 16 or 32 bytes a quad stores on each of a warp's rows fall in banks
    /// apart from the neighbouring rows'); after a barrier, the block copies it out in
    /// 16-byte chunks, each warp 512 contiguous bytes of a row. The fragments' own layout
    /// gives a warp 16 or 32 bytes a row per store: half a 32-byte sector in bf16. A barrier
    /// first (every warpgroup's `wgmma`s have read the ring that `smem` lies in); the caller
    /// puts one after, before the ring is written again. `stage.then` runs after the barrier
    /// between the two halves if the staged tile lies within `stage.keep` bytes, else after
    /// the copy and one more barrier.
    fn store_staged(
        &self,
        fb: &Fb<'_, 'ctx>,
        n_accs: usize,
        place: &TilePlace<'_, 'ctx>,
        scaled: &dyn Fn(&Fb<'_, 'ctx>, usize, IntValue<'ctx>) -> R<FloatValue<'ctx>>,
        at: TileAt<'ctx>,
        stage: Staging<'_, 'ctx>,
    ) -> R<()> {
        let Staging { smem, lane, .. } = stage;
        let (mv, nv, _) = self.dims;
        let c = |v: i64| fb.i64c(v);
        let sub = |a, b| fb.b.build_int_sub(a, b, "d").map_err(be);
        let (tm, tn) = at.size;
        let esz = self.optr.elem.size() as i64;
        let pitch = (tn + STAGED_PAD_ELEMS) * esz;
        assert!(tm * pitch <= WG_RING_BYTES - 1024 && (tn * esz) % (16 * 32) == 0);
        let byte = |off: IntValue<'ctx>| {
            unsafe {
                fb.b.build_in_bounds_gep(fb.ctx.i8_type(), smem, &[off], "sb")
            }
            .map_err(be)
        };
        barrier(fb)?;
        // (the copy, in elements: a row is `tn + STAGED_PAD_ELEMS` long)
        let copy = OutBuf {
            ptr: smem,
            elem: self.optr.elem,
        };
        let (r0, c0) = place(fb, 0)?;
        let first = fb.add(fb.mul(r0, c(pitch / esz))?, c0)?;
        for x in (0..n_accs).step_by(2) {
            let (r, cl) = place(fb, x)?;
            let (v0, v1) = (scaled(fb, x, r)?, scaled(fb, x + 1, r)?);
            let off = fb.add(
                first,
                fb.add(fb.mul(sub(r, r0)?, c(pitch / esz))?, sub(cl, c0)?)?,
            )?;
            copy.store_pair(fb, off, [v0, v1])?;
        }
        // (these stores, of every thread, reach the async proxy before the ring's next
        // copies over them are fenced by their copiers alone and read by `wgmma`s)
        fence_proxy_async(fb)?;
        barrier(fb)?;
        let then_early = tm * pitch <= stage.keep;
        if then_early {
            (stage.then)(fb)?;
        }
        // Chunk `lane + 256i`: row `chunk / per_row`, 16 bytes `chunk % per_row` into it.
        let per_row = tn * esz / 16;
        let gp = |fb: &Fb<'_, 'ctx>, row: IntValue<'ctx>| -> R<IntValue<'ctx>> {
            let e = fb.add(
                fb.mul(fb.add(fb.mul(at.bi, mv)?, fb.add(at.m0, row)?)?, nv)?,
                at.n0,
            )?;
            fb.mul(e, c(esz))
        };
        let (row0, ch0) = (
            fb.b.build_int_signed_div(lane, c(per_row), "sr")
                .map_err(be)?,
            fb.b.build_int_signed_rem(lane, c(per_row), "sc")
                .map_err(be)?,
        );
        let src0 = fb.add(fb.mul(row0, c(pitch))?, fb.mul(ch0, c(16))?)?;
        let dst0 = fb.add(gp(fb, row0)?, fb.mul(ch0, c(16))?)?;
        let row_bytes = fb.mul(nv, c(esz))?;
        let rows_per_pass = GPU_BLOCK_THREADS / per_row;
        let v4 = fb.ctx.i32_type().vec_type(4);
        for i in 0..tm * per_row / GPU_BLOCK_THREADS {
            let src = byte(fb.add(src0, c(i * rows_per_pass * pitch))?)?;
            fb.check_aligned(src, 16)?;
            let v = fb.b.build_load(v4, src, "st16").map_err(be)?;
            v.as_instruction_value()
                .expect("a load")
                .set_alignment(if fb.sim { 1 } else { 16 })
                .map_err(|e| BackendError::Llvm(e.to_string()))?;
            let dst = fb.add(dst0, fb.mul(c(i * rows_per_pass), row_bytes)?)?;
            let dst = unsafe {
                fb.b.build_in_bounds_gep(fb.ctx.i8_type(), self.optr.ptr, &[dst], "gb")
            }
            .map_err(be)?;
            fb.check_aligned(dst, 16)?;
            fb.b.build_store(dst, v)
                .map_err(be)?
                .set_alignment(if fb.sim { 1 } else { 16 })
                .map_err(|e| BackendError::Llvm(e.to_string()))?;
        }
        if !then_early {
            barrier(fb)?;
            (stage.then)(fb)?;
        }
        Ok(())
    }

    /// Output `v` at `(row, col)` plus the residual there, if any (`rbase`: the batch
    /// entry's offset in it).
    fn with_residual(
        &self,
        fb: &Fb<'_, 'ctx>,
        rbase: IntValue<'ctx>,
        row: IntValue<'ctx>,
        col: IntValue<'ctx>,
        v: FloatValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        match self.rav {
            Some(r) => plus_residual(fb, r, rbase, (row, col), v),
            None => Ok(v),
        }
    }

    /// `a[gm, gk]·g[gk]` (g only with a norm weight), 0 outside `m × k`.
    fn a_elem(
        &self,
        fb: &Fb<'_, 'ctx>,
        abase: IntValue<'ctx>,
        gm: IntValue<'ctx>,
        gk: IntValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        let (mv, _, kv) = self.dims;
        let aav = self.aav;
        let (ra, ka) = (aav.strides.len() - 2, aav.strides.len() - 1);
        let gav = self.gav;
        guarded_load(fb, (gm, mv), (gk, kv), |fb| {
            let at = fb.add(
                abase,
                fb.add(fb.mul(gm, aav.strides[ra])?, fb.mul(gk, aav.strides[ka])?)?,
            )?;
            let mut x = fb.load_float(aav, at)?;
            if let Some(g) = gav {
                let gv = fb.load_f32(g.ptr, fb.add(g.off, fb.mul(gk, g.strides[0])?)?)?;
                x = fb.fmul(x, gv)?;
            }
            Ok(x)
        })
    }

    /// `w[gk, gn]`, 0 outside `k × n`.
    fn w_elem(
        &self,
        fb: &Fb<'_, 'ctx>,
        wbase: IntValue<'ctx>,
        gk: IntValue<'ctx>,
        gn: IntValue<'ctx>,
    ) -> R<FloatValue<'ctx>> {
        let (_, nv, kv) = self.dims;
        let wav = self.wav;
        let (kw, nw) = (wav.strides.len() - 2, wav.strides.len() - 1);
        guarded_load(fb, (gk, kv), (gn, nv), |fb| {
            let at = fb.add(
                wbase,
                fb.add(fb.mul(gk, wav.strides[kw])?, fb.mul(gn, wav.strides[nw])?)?,
            )?;
            fb.load_float(wav, at)
        })
    }
}

/// `load()` when `i < ni` and `j < nj`, else 0 (the load is not made).
fn guarded_load<'ctx>(
    fb: &Fb<'_, 'ctx>,
    (i, ni): (IntValue<'ctx>, IntValue<'ctx>),
    (j, nj): (IntValue<'ctx>, IntValue<'ctx>),
    load: impl FnOnce(&Fb<'_, 'ctx>) -> R<FloatValue<'ctx>>,
) -> R<FloatValue<'ctx>> {
    let lt = |a, b| {
        fb.b.build_int_compare(IntPredicate::SLT, a, b, "lt")
            .map_err(be)
    };
    let inb = fb.b.build_and(lt(i, ni)?, lt(j, nj)?, "in").map_err(be)?;
    let v = fb.slot(fb.f32t.into())?;
    fb.set(v, fb.f32c(0.0))?;
    fb.if_else(inb, |fb| fb.set(v, load(fb)?), |_| Ok(()))?;
    fb.get(v)
}

/// A block-structured GPU kernel's place: this thread's index in its block, the block's
/// index, the number of blocks, and how many of `units` (taken `blk, blk + nblk, …`) this
/// block does.
struct BlockGrid<'ctx> {
    lane: IntValue<'ctx>,
    blk: IntValue<'ctx>,
    nblk: IntValue<'ctx>,
    iters: IntValue<'ctx>,
}

fn block_grid<'ctx>(fb: &Fb<'_, 'ctx>, units: IntValue<'ctx>) -> R<BlockGrid<'ctx>> {
    let c = fb.i64c(GPU_BLOCK_THREADS);
    let lane = fb.b.build_int_signed_rem(fb.tid, c, "lane").map_err(be)?;
    let blk = fb.b.build_int_signed_div(fb.tid, c, "blk").map_err(be)?;
    let nblk = fb.b.build_int_signed_div(fb.nth, c, "nblk").map_err(be)?;
    let rest = fb.b.build_int_sub(units, blk, "rest").map_err(be)?;
    let up = fb.add(
        rest,
        fb.b.build_int_sub(nblk, fb.i64c(1), "n1").map_err(be)?,
    )?;
    let iters = fb.b.build_int_signed_div(up, nblk, "iters").map_err(be)?;
    Ok(BlockGrid {
        lane,
        blk,
        nblk,
        iters,
    })
}

/// Column groups of `gpu_gemv`: a warp reads `GEMV_COLS` neighbouring weight columns.
const GEMV_COLS: i64 = 32;

/// A GPU matmul operand as the products see it: rounded to bf16 when matmuls run with bf16
/// operands (`tensor_cores`), so that every GPU matmul of a program computes alike whichever
/// kernel its size picks.
fn operand<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
    if fb.tensor_cores {
        round_bf16(fb, x)
    } else {
        Ok(x)
    }
}

/// A matmul of few rows (decode) on the GPU, bound by reading the weights once: each
/// 256-thread block takes `GEMV_COLS` columns (blocks stride over the column groups of every
/// batch entry) and cuts `k` into 8 chunks, one warp each (lanes on neighbouring columns, so
/// every weight row is one coalesced read), for one block of four rows: blocks stride over
/// (batch entry, column group, row block) units. Each warp's partial sums meet in shared
/// memory and 128 threads add them up and store. With `norm`, the partial sums of squares of
/// the rows travel the same way and scale the outputs.
fn gpu_gemv<'ctx>(fb: &Fb<'_, 'ctx>, mm: &GpuMatmul<'_, 'ctx>) -> R<()> {
    let GpuMatmul {
        optr,
        aav,
        gav,
        norm,
        eps,
        wav,
        bdims,
        nbatch,
        dims: (mv, nv, kv),
        shared_w,
        ..
    } = *mm;
    let chunks = GPU_BLOCK_THREADS / GEMV_COLS;
    let rb = ROW_BLOCK as i64;
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let lt = |a, b| {
        fb.b.build_int_compare(IntPredicate::SLT, a, b, "lt")
            .map_err(be)
    };
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let sub1 = |a| fb.b.build_int_sub(a, c(1), "m1").map_err(be);
    // Partials: [chunk][row][column], then the rows' sums of squares [chunk][row].
    let part = shared_f32(fb, "part", (chunks * rb * GEMV_COLS + chunks * rb) as u32);
    let sq_at = chunks * rb * GEMV_COLS;
    let groups = sdiv(fb.add(nv, c(GEMV_COLS - 1))?, c(GEMV_COLS), "groups")?;
    let nrb = sdiv(fb.add(mv, c(rb - 1))?, c(rb), "nrb")?;
    // A unit: one row block of one column group of one batch entry.
    let units = fb.mul(fb.mul(groups, nrb)?, nbatch)?;
    let BlockGrid {
        lane,
        blk,
        nblk,
        iters,
    } = block_grid(fb, units)?;
    let (h, col) = (
        sdiv(lane, c(GEMV_COLS), "h")?,
        srem(lane, c(GEMV_COLS), "col")?,
    );
    let kc = sdiv(fb.add(kv, c(chunks - 1))?, c(chunks), "kc")?;
    let k0 = fb.mul(h, kc)?;
    let k1 = fb.imin(fb.add(k0, kc)?, kv)?;
    let accs: Vec<PointerValue> = (0..2 * rb)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    let (ra, ka) = (aav.strides.len() - 2, aav.strides.len() - 1);
    let (kw, nw) = (wav.strides.len() - 2, wav.strides.len() - 1);
    fb.for_range(c(0), iters, |fb, it| {
        let unit = fb.add(blk, fb.mul(it, nblk)?)?;
        let rbi = srem(unit, nrb, "rbi")?;
        let unit = sdiv(unit, nrb, "u")?;
        let bi = sdiv(unit, groups, "bi")?;
        let n = fb.add(fb.mul(srem(unit, groups, "g")?, c(GEMV_COLS))?, col)?;
        // Columns past the end read the last one (harmless) and are never stored.
        let ncl = fb.imin(n, sub1(nv)?)?;
        let bidx = fb.decompose(bi, bdims)?;
        let bpairs: Vec<(usize, IntValue)> = bidx.iter().copied().enumerate().collect();
        let abase = fb.at(aav, &bpairs)?;
        let wbase = if shared_w {
            wav.off
        } else {
            fb.at(wav, &bpairs)?
        };
        let rbase = match mm.rav {
            Some(r) => fb.at(r, &bpairs)?,
            None => c(0),
        };
        let wcol = fb.add(wbase, fb.mul(ncl, wav.strides[nw])?)?;
        {
            let m0 = fb.mul(rbi, c(rb))?;
            // Rows past the end read the last row again and are never stored.
            let abases: Vec<IntValue> = (0..rb)
                .map(|r| {
                    let row = fb.imin(fb.add(m0, c(r))?, sub1(mv)?)?;
                    fb.add(abase, fb.mul(row, aav.strides[ra])?)
                })
                .collect::<R<_>>()?;
            for a in &accs {
                fb.set(*a, fb.f32c(0.0))?;
            }
            fb.for_range(k0, k1, |fb, kk| {
                let mut y = fb.load_float(wav, fb.add(wcol, fb.mul(kk, wav.strides[kw])?)?)?;
                if let Some(g) = gav {
                    let gv = fb.load_f32(g.ptr, fb.add(g.off, fb.mul(kk, g.strides[0])?)?)?;
                    y = fb.fmul(y, gv)?;
                }
                let yp = operand(fb, y)?;
                for (r, ab) in abases.iter().enumerate() {
                    let x = fb.load_float(aav, fb.add(*ab, fb.mul(kk, aav.strides[ka])?)?)?;
                    let xp = operand(fb, x)?;
                    fb.set(
                        accs[r],
                        fb.intrinsic3("llvm.fma", xp, yp, fb.get(accs[r])?)?,
                    )?;
                    if norm {
                        let q = accs[rb as usize + r];
                        fb.set(q, fb.intrinsic3("llvm.fma", x, x, fb.get(q)?)?)?;
                    }
                }
                Ok(())
            })?;
            for r in 0..rb {
                let slot = fb.add(fb.mul(h, c(rb))?, c(r))?;
                let at = fb.add(fb.mul(slot, c(GEMV_COLS))?, col)?;
                fb.store_f32(part, at, fb.get(accs[r as usize])?)?;
                if norm {
                    fb.store_f32(
                        part,
                        fb.add(c(sq_at), slot)?,
                        fb.get(accs[(rb + r) as usize])?,
                    )?;
                }
            }
            barrier(fb)?;
            fb.if_else(
                lt(lane, c(rb * GEMV_COLS))?,
                |fb| {
                    let r = sdiv(lane, c(GEMV_COLS), "r")?;
                    let row = fb.add(m0, r)?;
                    fb.if_else(
                        and(lt(row, mv)?, lt(n, nv)?)?,
                        |fb| {
                            let (sum, sq) = (accs[0], accs[1]);
                            fb.set(sum, fb.f32c(0.0))?;
                            fb.set(sq, fb.f32c(0.0))?;
                            for hh in 0..chunks {
                                let at = fb.add(
                                    c(hh * rb * GEMV_COLS),
                                    fb.add(fb.mul(r, c(GEMV_COLS))?, col)?,
                                )?;
                                fb.set(sum, fb.fadd(fb.get(sum)?, fb.load_f32(part, at)?)?)?;
                                if norm {
                                    let at = fb.add(c(sq_at + hh * rb), r)?;
                                    fb.set(sq, fb.fadd(fb.get(sq)?, fb.load_f32(part, at)?)?)?;
                                }
                            }
                            let mut v = fb.get(sum)?;
                            if norm {
                                let kf =
                                    fb.b.build_signed_int_to_float(kv, fb.f32t, "kf")
                                        .map_err(be)?;
                                let mean =
                                    fb.b.build_float_div(fb.get(sq)?, kf, "mean").map_err(be)?;
                                let sd =
                                    fb.intrinsic("llvm.sqrt", &[fb.fadd(mean, fb.f32c(eps))?])?;
                                v = fb.b.build_float_div(v, sd, "v").map_err(be)?;
                            }
                            let v = mm.with_residual(fb, rbase, row, n, v)?;
                            let o = fb.add(fb.mul(fb.add(fb.mul(bi, mv)?, row)?, nv)?, n)?;
                            optr.store(fb, o, v)
                        },
                        |_| Ok(()),
                    )
                },
                |_| Ok(()),
            )?;
            barrier(fb)
        }
    })
}

/// The RMSNorm row scales of a tile's `t` rows of `a` (from `m0`; `t` divides the block's
/// threads), into `inv_s[inv_at..]`: `256 / t` threads a row sum the squares of interleaved
/// columns, their partials (at `inv_s[lane]`) are added by the first `t` threads,
/// `rsqrt(mean + eps)`. Ends with the scales written by threads that have not passed a
/// barrier since: the caller's next barrier publishes them.
#[allow(clippy::too_many_arguments)]
fn row_scales<'ctx>(
    fb: &Fb<'_, 'ctx>,
    aav: &Av<'ctx>,
    abase: IntValue<'ctx>,
    lane: IntValue<'ctx>,
    (m0, t): (IntValue<'ctx>, i64),
    (mv, kv): (IntValue<'ctx>, IntValue<'ctx>),
    eps: f64,
    inv_s: PointerValue<'ctx>,
    inv_at: i64,
) -> R<()> {
    assert!(GPU_BLOCK_THREADS % t == 0 && inv_at >= GPU_BLOCK_THREADS);
    let parts = GPU_BLOCK_THREADS / t;
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let lt = |a, b| {
        fb.b.build_int_compare(IntPredicate::SLT, a, b, "lt")
            .map_err(be)
    };
    let (ra, ka) = (aav.strides.len() - 2, aav.strides.len() - 1);
    let acc = fb.slot(fb.f32t.into())?;
    // Row r = lane / parts of the tile, part h = lane % parts of its k range (interleaved).
    let r = sdiv(lane, c(parts), "r")?;
    let h = srem(lane, c(parts), "h")?;
    let row = fb.add(m0, r)?;
    fb.set(acc, fb.f32c(0.0))?;
    fb.if_else(
        lt(row, mv)?,
        |fb| {
            let rb = fb.add(abase, fb.mul(row, aav.strides[ra])?)?;
            let mine = sdiv(
                fb.add(fb.b.build_int_sub(kv, h, "kh").map_err(be)?, c(parts - 1))?,
                c(parts),
                "nk",
            )?;
            fb.for_range(c(0), mine, |fb, j| {
                let kk = fb.add(fb.mul(j, c(parts))?, h)?;
                let x = fb.load_float(aav, fb.add(rb, fb.mul(kk, aav.strides[ka])?)?)?;
                fb.set(acc, fb.fma_fast(fb.get(acc)?, x, x)?)
            })
        },
        |_| Ok(()),
    )?;
    let p = unsafe { fb.b.build_in_bounds_gep(fb.f32t, inv_s, &[lane], "ip") }.map_err(be)?;
    fb.b.build_store(p, fb.get(acc)?).map_err(be)?;
    barrier(fb)?;
    fb.if_else(
        lt(lane, c(t))?,
        |fb| {
            let first = fb.mul(lane, c(parts))?;
            let mut sum = fb.load_f32(inv_s, first)?;
            for p in 1..parts {
                sum = fb.fadd(sum, fb.load_f32(inv_s, fb.add(first, c(p))?)?)?;
            }
            let kf =
                fb.b.build_signed_int_to_float(kv, fb.f32t, "kf")
                    .map_err(be)?;
            let mean = fb.b.build_float_div(sum, kf, "mean").map_err(be)?;
            let sq = fb.intrinsic("llvm.sqrt", &[fb.fadd(mean, fb.f32c(eps))?])?;
            let inv = fb.b.build_float_div(fb.f32c(1.0), sq, "inv").map_err(be)?;
            fb.store_f32(inv_s, fb.add(lane, c(inv_at))?, inv)
        },
        |_| Ok(()),
    )?;
    Ok(())
}

/// `gpu_mma_matmul`'s k-step: a `128 × 32` slice of `A` and a `32 × 128` slice of `W` per
/// stage, two `m16n8k16` steps.
const MMA_TILE_K: i64 = 32;
/// Words (bf16 pairs) of one stage of one staged operand (`128 × 32` bf16, 8 KiB).
const MMA_STAGE_WORDS: i64 = GPU_TILE * MMA_TILE_K / 2;
/// Passes in which a 256-thread block stages one operand's slice, four floats a thread each
/// (32 rows of `A`, or 8 k rows of `W`, a pass).
const MMA_PASSES: i64 = 4;

/// Stages of `gpu_mma_matmul`'s shared-memory ring: with bf16 operands in global memory,
/// `MMA_STAGES - 1` slices are in flight (`cp.async`) while one is multiplied.
const MMA_STAGES: i64 = 4;
const _: () = assert!((MMA_STAGES as u64).is_power_of_two() && MMA_STAGES >= 2);

/// Bytes of that ring (`A`'s stages, then `W`'s): dynamic shared memory, as it is over the
/// 48 KiB a kernel may hold statically.
pub const MMA_RING_BYTES: i64 = MMA_STAGES * 2 * MMA_STAGE_WORDS * 4;

/// An i32 shared-memory array of `len` words private to the kernel being generated.
fn shared_i32<'ctx>(fb: &Fb<'_, 'ctx>, name: &str, len: u32) -> PointerValue<'ctx> {
    shared_array(fb, name, fb.ctx.i32_type().array_type(len))
}

/// The kernel's dynamic shared memory as i32 words, `bytes` of it (the launch gives that
/// many: `gpu_shared_bytes`). On the GPU, the module's one `extern .shared` array; in the
/// simulator, an array of the kernel's own.
fn dynamic_shared<'ctx>(fb: &Fb<'_, 'ctx>, bytes: i64) -> PointerValue<'ctx> {
    if fb.sim {
        return shared_i32(fb, "dynamic", (bytes / 4) as u32);
    }
    const NAME: &str = "egret_dynamic_shared";
    let g = fb.module.get_global(NAME).unwrap_or_else(|| {
        let ty = fb.ctx.i32_type().array_type(0);
        let g = fb
            .module
            .add_global(ty, Some(AddressSpace::from(3u16)), NAME);
        g.set_linkage(Linkage::External);
        g.set_alignment(16);
        g
    });
    g.as_pointer_value()
}

/// `cp.async.cg.shared.global [dst], [src], 16, src_bytes` (sm_80 and later): 16 bytes from
/// global memory to shared memory without passing through registers, the bytes past
/// `src_bytes` (0 or 16 here) zero-filled; done by the next `cp_async_wait` that covers it.
fn cp_async<'ctx>(
    fb: &Fb<'_, 'ctx>,
    dst: PointerValue<'ctx>,
    src: PointerValue<'ctx>,
    src_bytes: IntValue<'ctx>,
) -> R<()> {
    let i32t = fb.ctx.i32_type();
    let n = fb.b.build_int_truncate(src_bytes, i32t, "n").map_err(be)?;
    if fb.sim {
        let ptrt = fb.ctx.ptr_type(AddressSpace::default());
        let ty = fb
            .ctx
            .void_type()
            .fn_type(&[ptrt.into(), ptrt.into(), i32t.into()], false);
        fb.hook(SIMT_HOOKS[5], ty, &[dst.into(), src.into(), n.into()])?;
        return Ok(());
    }
    let g =
        fb.b.build_address_space_cast(src, fb.ctx.ptr_type(AddressSpace::from(1u16)), "g")
            .map_err(be)?;
    let name = "llvm.nvvm.cp.async.cg.shared.global.16.s";
    let f = fb.declare(name, &[])?;
    fb.b.build_call(f, &[dst.into(), g.into(), n.into()], "")
        .map_err(be)?;
    Ok(())
}

/// `cp.async.commit_group`: this thread's `cp_async`s since the last commit form a group.
fn cp_async_commit(fb: &Fb) -> R<()> {
    if fb.sim {
        fb.hook(SIMT_HOOKS[6], fb.ctx.void_type().fn_type(&[], false), &[])?;
        return Ok(());
    }
    let name = "llvm.nvvm.cp.async.commit.group";
    let f = fb.declare(name, &[])?;
    fb.b.build_call(f, &[], "").map_err(be)?;
    Ok(())
}

/// One 16-byte `cp.async` of the bf16 elements `at..at + 8` of `av` to `dst` where `inside`;
/// where not, `dst` is zero-filled and nothing is read (the address is kept inside the
/// buffer all the same).
fn cp_async_chunk<'ctx>(
    fb: &Fb<'_, 'ctx>,
    av: &Av<'ctx>,
    inside: IntValue<'ctx>,
    at: IntValue<'ctx>,
    dst: PointerValue<'ctx>,
) -> R<()> {
    let c = |v: i64| fb.i64c(v);
    let at = fb.b.build_select(inside, at, c(0), "at").map_err(be)?;
    let src = unsafe {
        fb.b.build_in_bounds_gep(fb.ctx.i16_type(), av.ptr, &[at.into_int_value()], "src")
    }
    .map_err(be)?;
    let n = fb.b.build_select(inside, c(16), c(0), "n").map_err(be)?;
    cp_async(fb, dst, src, n.into_int_value())
}

/// One thread's 16-byte chunk of a matmul operand in a `cp.async` ring: its element in the
/// tile's first slice (`at`), its k there (`k`), and whether it lies inside the matrix
/// across k (its row of `A`, its columns of `W`).
struct RingChunk<'ctx> {
    at: IntValue<'ctx>,
    k: IntValue<'ctx>,
    across: IntValue<'ctx>,
}

/// Copies operand `av`'s `chunks` of a ring slice (`cp.async`, not waited for): each the
/// chunk of the first slice moved `step` elements on (`k0` along `A`'s rows, `k0` rows of
/// `W`), to `dst(p)` for chunk `p`. With `bounds` `None` the slice lies wholly inside the
/// matrix; with `Some((k0, kv))` chunks outside it (across, or at `k + k0` past `kv`) are
/// zero-filled.
fn copy_ring_chunks<'ctx>(
    fb: &Fb<'_, 'ctx>,
    av: &Av<'ctx>,
    chunks: &[RingChunk<'ctx>],
    step: IntValue<'ctx>,
    bounds: Option<(IntValue<'ctx>, IntValue<'ctx>)>,
    dst: &dyn Fn(i64) -> R<PointerValue<'ctx>>,
) -> R<()> {
    for (p, ch) in chunks.iter().enumerate() {
        let at = fb.add(ch.at, step)?;
        match bounds {
            None => {
                let src = unsafe {
                    fb.b.build_in_bounds_gep(fb.ctx.i16_type(), av.ptr, &[at], "src")
                }
                .map_err(be)?;
                cp_async(fb, dst(p as i64)?, src, fb.i64c(16))?;
            }
            Some((k0, kv)) => {
                let in_k =
                    fb.b.build_int_compare(IntPredicate::SLT, fb.add(ch.k, k0)?, kv, "ink")
                        .map_err(be)?;
                let inside = fb.b.build_and(ch.across, in_k, "in").map_err(be)?;
                cp_async_chunk(fb, av, inside, at, dst(p as i64)?)?;
            }
        }
    }
    Ok(())
}

/// `cp.async.wait_group n`: every group of this thread but the `n` newest is done (a
/// barrier after it makes them visible to the block).
fn cp_async_wait(fb: &Fb, n: i64) -> R<()> {
    let i32t = fb.ctx.i32_type();
    let nv = i32t.const_int(n as u64, false);
    if fb.sim {
        let ty = fb.ctx.void_type().fn_type(&[i32t.into()], false);
        fb.hook(SIMT_HOOKS[7], ty, &[nv.into()])?;
        return Ok(());
    }
    let name = "llvm.nvvm.cp.async.wait.group";
    let f = fb.declare(name, &[])?;
    fb.b.build_call(f, &[nv.into()], "").map_err(be)?;
    Ok(())
}

/// `fence.proxy.async.shared::cta`: this thread's writes to shared memory so far (its
/// finished `cp.async`s included) become visible to the async proxy, which `wgmma` reads
/// through (`RingReaders::Wgmma`).
fn fence_proxy_async(fb: &Fb) -> R<()> {
    let ty = fb.ctx.void_type().fn_type(&[], false);
    if fb.sim {
        fb.hook(SIMT_HOOKS[12], ty, &[])?;
        return Ok(());
    }
    let asm = fb.ctx.create_inline_asm(
        ty,
        "fence.proxy.async.shared::cta;".into(),
        String::new(),
        true,
        false,
        None,
        false,
    );
    fb.b.build_indirect_call(ty, asm, &[], "").map_err(be)?;
    Ok(())
}

/// Two f32s rounded to bf16 (nearest even) and packed, `lo` in the low half: an `mma`
/// operand register.
fn pack_bf16x2<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lo: FloatValue<'ctx>,
    hi: FloatValue<'ctx>,
) -> R<IntValue<'ctx>> {
    let i32t = fb.ctx.i32_type();
    if !fb.sim {
        // One `cvt.rn.bf16x2.f32` (the simulator's C library may lack the conversion, so it
        // rounds in integer arithmetic, to the same bits for every number but NaN).
        let v2 = fb.f32t.vec_type(2);
        let mut v = v2.get_undef();
        for (i, x) in [lo, hi].into_iter().enumerate() {
            v =
                fb.b.build_insert_element(v, x, i32t.const_int(i as u64, false), "v")
                    .map_err(be)?;
        }
        let t =
            fb.b.build_cast(
                inkwell::values::InstructionOpcode::FPTrunc,
                v,
                fb.ctx.bf16_type().vec_type(2),
                "bf",
            )
            .map_err(be)?;
        return Ok(fb
            .b
            .build_bit_cast(t, i32t, "pk")
            .map_err(be)?
            .into_int_value());
    }
    let bits = |f: FloatValue<'ctx>| -> R<IntValue<'ctx>> {
        let r = round_bf16(fb, f)?;
        let b =
            fb.b.build_bit_cast(r, i32t, "b")
                .map_err(be)?
                .into_int_value();
        fb.b.build_right_shift(b, i32t.const_int(16, false), false, "h")
            .map_err(be)
    };
    let (l, h) = (bits(lo)?, bits(hi)?);
    let h =
        fb.b.build_left_shift(h, i32t.const_int(16, false), "hs")
            .map_err(be)?;
    fb.b.build_or(l, h, "pk").map_err(be)
}

/// Four f32s at `ptr[idx..idx+4]` in one 16-byte load (`idx` a multiple of 4 and `ptr`
/// 16-byte aligned: the caller checks): from global memory, or with `shared` from a
/// shared-memory array.
fn load_f32x4<'ctx>(
    fb: &Fb<'_, 'ctx>,
    ptr: PointerValue<'ctx>,
    idx: IntValue<'ctx>,
    shared: bool,
) -> R<[FloatValue<'ctx>; 4]> {
    let mut p = unsafe { fb.b.build_in_bounds_gep(fb.f32t, ptr, &[idx], "p4") }.map_err(be)?;
    fb.check_aligned(p, 16)?;
    if !fb.sim && !shared {
        // A global-memory load (`ld.global.v4.f32`), not a generic one: it cannot alias
        // the shared-memory stores around it.
        p =
            fb.b.build_address_space_cast(p, fb.ctx.ptr_type(AddressSpace::from(1u16)), "g")
                .map_err(be)?;
    }
    let v = fb.b.build_load(fb.f32t.vec_type(4), p, "v4").map_err(be)?;
    // (the simulator checks the alignment itself and reports it rather than fault)
    v.as_instruction_value()
        .expect("a load")
        .set_alignment(if fb.sim { 4 } else { 16 })
        .map_err(|e| BackendError::Llvm(e.to_string()))?;
    let v = v.into_vector_value();
    let i32t = fb.ctx.i32_type();
    let mut out = [fb.f32c(0.0); 4];
    for (i, o) in out.iter_mut().enumerate() {
        *o =
            fb.b.build_extract_element(v, i32t.const_int(i as u64, false), "e")
                .map_err(be)?
                .into_float_value();
    }
    Ok(out)
}

/// `gpu_wgmma_matmul`'s tile: `GPU_TILE` rows (a warpgroup's 64 each) by `WG_TILE_N`
/// columns, each warpgroup's part one `m64n256k16` per k step of 16, so that a slice of
/// `W` staged in shared memory feeds twice the products of a 128-column tile.
const WG_TILE_N: i64 = 256;
/// `wgmma`'s k-step (sm_90a): a `128 × 64` slice of `A` (16 KiB) and a `64 × 256` slice of
/// `W` (32 KiB) per ring stage, four `m64n256k16` steps per warpgroup.
const WG_TILE_K: i64 = 64;
/// Stages of the `wgmma` ring: `WG_STAGES - 2` slices in flight (`cp.async`) while one is
/// multiplied and the one before may still be read by the tensor cores; two slices ahead
/// cover about two slices' multiplies (some 2000 cycles) of load latency. The ring takes
/// 193 KiB of the 227 KiB a block may have.
const WG_STAGES: i64 = 4;
const _: () = assert!(WG_STAGES >= 3);
/// Bytes of `A`'s part of a `wgmma` ring stage; `W`'s part follows it.
const WG_A_BYTES: i64 = GPU_TILE * WG_TILE_K * 2;
/// Bytes of a `wgmma` ring stage.
const WG_STAGE_BYTES: i64 = WG_A_BYTES + WG_TILE_K * WG_TILE_N * 2;
/// Bytes of the `wgmma` ring (dynamic shared memory), with room to align it to 1024 bytes
/// (the 128-byte swizzle repeats every 1024 bytes of address, and the ring's stages must
/// start on that period).
pub const WG_RING_BYTES: i64 = WG_STAGES * WG_STAGE_BYTES + 1024;
const _: () = assert!(WG_RING_BYTES <= 227 * 1024 - 2048 && MMA_RING_BYTES <= WG_RING_BYTES);
/// The `wgmma` operands' shared-memory layout: 128-byte swizzle, which spreads the rows the
/// tensor cores read together over all banks. Rows of 64 bf16 (128 bytes) in atoms of 8
/// rows (1024 bytes), the 16-byte chunk `c` of row `r` stored at chunk `c ^ (r % 8)` (the
/// swizzle: address bits 4-6 XOR bits 7-9). `A` (`[128 rows][64 k]`, k-major): row `r` at
/// `128r`, the stride (8-row) offset 1024 and the leading offset unused (16). `W` (`[64 k]
/// [256 n]`, n-major, `imm-trans-b` 1): four blocks of 64 columns, 8192 bytes apart (the
/// leading offset), each 64 k rows of 128 bytes, atoms of 8 k rows 1024 apart (the
/// stride offset).
const WG_A_LBO: i64 = 16;
const WG_A_SBO: i64 = 1024;
const WG_B_LBO: i64 = 8192;
const WG_B_SBO: i64 = 1024;

/// Bytes from shared-memory array `p` to its first 1024-byte boundary, where a
/// 128-byte-swizzled layout's atoms start (the swizzle is of address bits, so a ring laid
/// out for it starts there; its allocation has 1024 bytes to spare).
fn to_swizzle_atom<'ctx>(fb: &Fb<'_, 'ctx>, p: PointerValue<'ctx>) -> R<IntValue<'ctx>> {
    let at = fb.b.build_ptr_to_int(p, fb.i64t, "sa").map_err(be)?;
    let up =
        fb.b.build_and(fb.add(at, fb.i64c(1023))?, fb.i64c(!1023), "al")
            .map_err(be)?;
    fb.b.build_int_sub(up, at, "pad").map_err(be)
}

/// A `wgmma` shared-memory matrix descriptor: start address (its shared-window offset) and
/// the leading and stride byte offsets, each in 16-byte units in 14 bits (bits 0-13, 16-29,
/// 32-45), 128-byte swizzle (bits 62-63: 1), base offset 0 (the start lies in the first
/// 128 bytes of a 1024-byte period).
fn wgmma_desc<'ctx>(
    fb: &Fb<'_, 'ctx>,
    p: PointerValue<'ctx>,
    lbo: i64,
    sbo: i64,
) -> R<IntValue<'ctx>> {
    let addr = fb.b.build_ptr_to_int(p, fb.i64t, "sa").map_err(be)?;
    let start =
        fb.b.build_right_shift(
            fb.b.build_and(addr, fb.i64c(0x3ffff), "sm").map_err(be)?,
            fb.i64c(4),
            false,
            "st",
        )
        .map_err(be)?;
    let fixed = ((lbo >> 4) & 0x3fff) << 16 | ((sbo >> 4) & 0x3fff) << 32 | 1 << 62;
    fb.b.build_or(start, fb.i64c(fixed), "desc").map_err(be)
}

/// A `wgmma` fence, commit or wait (`llvm.nvvm.wgmma.*.sync.aligned`). In the simulator,
/// whose `wgmma` is done when it is issued, the fence is nothing and the commit and wait
/// are hooks that track what the GPU's may still read.
fn wgmma_sync(fb: &Fb, what: &str, wait: Option<i64>) -> R<()> {
    if fb.sim {
        let i32t = fb.ctx.i32_type();
        match (what, wait) {
            ("commit_group", _) => {
                fb.hook(SIMT_HOOKS[9], fb.ctx.void_type().fn_type(&[], false), &[])?;
            }
            ("wait_group", Some(n)) => {
                let ty = fb.ctx.void_type().fn_type(&[i32t.into()], false);
                let n = i32t.const_int(n as u64, false);
                fb.hook(SIMT_HOOKS[10], ty, &[n.into()])?;
            }
            _ => {}
        }
        return Ok(());
    }
    let name = format!("llvm.nvvm.wgmma.{what}.sync.aligned");
    let f = fb.declare(&name, &[])?;
    let args: Vec<BasicMetadataValueEnum> = wait.map(|n| fb.i64c(n).into()).into_iter().collect();
    fb.b.build_call(f, &args, "").map_err(be)?;
    Ok(())
}

/// A `wgmma`'s left operand (`64 × 16`): in shared memory, k-major with stride offset
/// `WG_A_SBO` (its address and descriptor), or in this thread's four registers, laid out per
/// warp as `mma_bf16`'s `A` (warp `w` of the warpgroup holding rows `16w..16w+16`).
enum WgA<'ctx> {
    Shared(PointerValue<'ctx>, IntValue<'ctx>),
    Regs([IntValue<'ctx>; 4]),
}

/// A `wgmma`'s right operand (`16 × N`) in shared memory, 128-byte swizzle: its address,
/// descriptor (`wgmma_desc` with `lbo` and `sbo`) and whether it is n-major (`imm-trans-b`
/// 1: element `(k, col)` at `(col/64)·lbo + (k/8)·sbo + (k%8)·128 + 2(col%64)`) or k-major
/// (`(col/8)·sbo + (col%8)·128 + 2k`), before the swizzle.
struct WgB<'ctx> {
    at: PointerValue<'ctx>,
    desc: IntValue<'ctx>,
    lbo: i64,
    sbo: i64,
    n_major: bool,
}

/// `d += a·b` for a warpgroup: `wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16` with
/// `N` twice the accumulators, `accs` this thread's `N/2` accumulators: thread `t` of the
/// warpgroup holds, for column group `j` (0..N/8), rows `16(t/32) + (t%32)/4` (`d[4j]`,
/// `d[4j+1]`) and 8 below (`d[4j+2]`, `d[4j+3]`), columns `8j + 2(t%4)` and the next (per
/// warp the layout of `mma_bf16`'s accumulators). Asynchronous: the values are there after a
/// `wgmma_sync("wait_group")` covering it. The GPU reads shared operands through their
/// descriptors; in the simulator, the hooks `egret_simt_wgmma` (`A` shared, `B` n-major)
/// and `egret_simt_wgmma_rs` (`A` in registers) compute the same at once from the
/// addresses and offsets.
fn wgmma_m64<'ctx>(
    fb: &Fb<'_, 'ctx>,
    a: &WgA<'ctx>,
    b: &WgB<'ctx>,
    t128: IntValue<'ctx>,
    accs: &[PointerValue<'ctx>],
) -> R<()> {
    let f32t = fb.f32t;
    let i32t = fb.ctx.i32_type();
    let (na, n) = (accs.len(), 2 * accs.len() as i64);
    if fb.sim {
        let arr = fb.slot(f32t.array_type(na as u32).into())?;
        let at = |i: usize| {
            unsafe {
                fb.b.build_in_bounds_gep(f32t, arr, &[fb.i64c(i as i64)], "d")
            }
            .map_err(be)
        };
        for (i, acc) in accs.iter().enumerate() {
            fb.b.build_store(at(i)?, fb.get(*acc)?).map_err(be)?;
        }
        let ptrt = fb.ctx.ptr_type(AddressSpace::default());
        let i64t = fb.i64t;
        let c = |v: i64| fb.i64c(v).into();
        let tail = [c(n), arr.into(), t128.into()];
        let (hook, mut args): (usize, Vec<BasicMetadataValueEnum>) = match a {
            WgA::Shared(a, _) => {
                assert!(b.n_major, "the shared-A hook takes an n-major B");
                (
                    8,
                    vec![(*a).into(), c(WG_A_SBO), b.at.into(), c(b.lbo), c(b.sbo)],
                )
            }
            WgA::Regs(words) => {
                let w = fb.slot(i32t.array_type(4).into())?;
                for (i, x) in words.iter().enumerate() {
                    let p = unsafe { fb.b.build_in_bounds_gep(i32t, w, &[fb.i64c(i as i64)], "a") }
                        .map_err(be)?;
                    fb.b.build_store(p, *x).map_err(be)?;
                }
                let nm = i64::from(b.n_major);
                (11, vec![w.into(), b.at.into(), c(b.lbo), c(b.sbo), c(nm)])
            }
        };
        args.extend(tail);
        let mut params: Vec<BasicMetadataTypeEnum> = vec![ptrt.into(); args.len()];
        for (p, x) in params.iter_mut().zip(&args) {
            if x.is_int_value() {
                *p = i64t.into();
            }
        }
        let ty = fb.ctx.void_type().fn_type(&params, false);
        fb.hook(SIMT_HOOKS[hook], ty, &args)?;
        for (i, acc) in accs.iter().enumerate() {
            let v = fb.b.build_load(f32t, at(i)?, "d").map_err(be)?;
            fb.b.build_store(*acc, v).map_err(be)?;
        }
        return Ok(());
    }
    let regs: Vec<String> = (0..na).map(|i| format!("${i}")).collect();
    let mut args: Vec<BasicMetadataValueEnum> = vec![];
    for acc in accs {
        args.push(fb.get(*acc)?.into());
    }
    let mut params: Vec<BasicMetadataTypeEnum> = vec![f32t.into(); na];
    let mut constraints: Vec<String> = (0..na)
        .map(|_| "=f".to_string())
        .chain((0..na).map(|i| i.to_string()))
        .collect();
    let a_text = match a {
        WgA::Shared(_, da) => {
            args.push((*da).into());
            params.push(fb.i64t.into());
            constraints.push("l".into());
            format!("${}", 2 * na)
        }
        WgA::Regs(words) => {
            for w in words {
                args.push((*w).into());
                params.push(i32t.into());
                constraints.push("r".into());
            }
            let r: Vec<String> = (0..4).map(|i| format!("${}", 2 * na + i)).collect();
            format!("{{{}}}", r.join(", "))
        }
    };
    let next = 2 * na + if matches!(a, WgA::Shared(..)) { 1 } else { 4 };
    args.push(b.desc.into());
    params.push(fb.i64t.into());
    args.push(i32t.const_int(1, false).into());
    params.push(i32t.into());
    constraints.extend(["l".to_string(), "r".to_string()]);
    // (scale-d `p`, `A` and `B` unscaled; `imm-trans-a` 0 for a shared `A`)
    let trans = format!(
        "{}{}",
        if matches!(a, WgA::Shared(..)) {
            "0, "
        } else {
            ""
        },
        u8::from(b.n_major)
    );
    let asm = format!(
        "{{\n.reg .pred p;\nsetp.ne.b32 p, ${}, 0;\n\
         wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{}}}, {a_text}, ${next}, p, 1, 1, {trans};\n}}",
        next + 1,
        regs.join(", "),
    );
    let out_ty = fb.ctx.struct_type(&vec![f32t.into(); na], false);
    let fn_ty = out_ty.fn_type(&params, false);
    let asm_ptr =
        fb.ctx
            .create_inline_asm(fn_ty, asm, constraints.join(","), true, false, None, false);
    let r =
        fb.b.build_indirect_call(fn_ty, asm_ptr, &args, "wg")
            .map_err(be)?
            .try_as_basic_value()
            .basic()
            .expect("returns a struct")
            .into_struct_value();
    for (i, acc) in accs.iter().enumerate() {
        let v = fb.b.build_extract_value(r, i as u32, "d").map_err(be)?;
        fb.b.build_store(*acc, v).map_err(be)?;
    }
    Ok(())
}

/// Where accumulator `x` of this thread lies in a matmul tile: `(row, column)` in it.
type TilePlace<'a, 'ctx> = dyn Fn(&Fb<'_, 'ctx>, usize) -> R<(IntValue<'ctx>, IntValue<'ctx>)> + 'a;

/// A `cp.async` ring's pipeline over `slices` slices, `ahead` of them in flight: slices
/// `0..ahead` are issued first; then, for each slice `kt`, its copiers wait for their
/// copies of it, a barrier publishes them (and tells that every thread is done with what it
/// read before), slice `kt + ahead` is issued, and `consume(kt)` runs (`RingCopiers` says
/// who copies which slice and how the waits count). `issue(kt)` copies the slice with the
/// threads of `copiers` and must write a stage that no thread can still be reading after
/// that barrier.
fn ring_pipeline<'ctx>(
    fb: &Fb<'_, 'ctx>,
    slices: IntValue<'ctx>,
    ahead: i64,
    copiers: RingCopiers<'ctx>,
    issue: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
    consume: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
) -> R<()> {
    ring_prologue(fb, slices, ahead, copiers, issue)?;
    ring_steps(fb, slices, ahead, copiers, issue, consume)
}

/// `ring_pipeline` after its prologue (issued already, perhaps earlier): for each slice
/// `kt`, `ring_arrive` then `consume(kt)`.
fn ring_steps<'ctx>(
    fb: &Fb<'_, 'ctx>,
    slices: IntValue<'ctx>,
    ahead: i64,
    copiers: RingCopiers<'ctx>,
    issue: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
    consume: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
) -> R<()> {
    fb.for_range(fb.i64c(0), slices, |fb, kt| {
        ring_arrive(fb, kt, slices, ahead, copiers, issue)?;
        consume(fb, kt)
    })
}

/// Who reads a `cp.async` ring's stages. A `cp.async` writes shared memory through the
/// generic proxy, as a store does; `wgmma` reads it through the async proxy, which sees a
/// write only after the writing thread's `fence.proxy.async` (PTX ISA, "Async Proxy"), so
/// for `wgmma` each copier fences its copies once they are done, before the barrier that
/// publishes them.
#[derive(Clone, Copy)]
enum RingReaders {
    /// `ldmatrix` or `ld.shared`: the barrier alone publishes the copies.
    Threads,
    /// `wgmma.mma_async` (shared-memory operands through descriptors).
    Wgmma,
}

/// Which threads copy a ring's slices, and who reads them.
///
/// For `RingReaders::Threads`, every thread copies part of every slice (`groups` 1) and
/// commits one group a step (empty past the end), so that waiting for slice `kt` leaves the
/// `ahead - 1` newer groups in flight.
///
/// For `RingReaders::Wgmma`, the block's threads form `groups = ahead` warp-aligned groups
/// that take the slices in turn: slice `s` is copied wholly by group `s % groups`, which
/// waits for it (all its copies: it has no others in flight), fences and reaches the barrier,
/// while the other groups only reach the barrier. The reason is the fence: ptxas makes
/// `fence.proxy.async.shared::cta` a `MEMBAR.ALL.CTA` (then `FENCE.VIEW.ASYNC.S`), a memory
/// barrier over all of the thread's earlier memory operations, which may wait for its
/// copies still in flight. Had every thread copied every slice, its copies of the newer
/// slices would be in flight at that fence, and if it waits for them the ring hides one step
/// of load latency however far ahead it is issued; taking turns, a group's copies issued at
/// step `kt` meet a fence of that group first at step `kt + ahead`, when they are due.
#[derive(Clone, Copy)]
struct RingCopiers<'ctx> {
    readers: RingReaders,
    /// Groups taking slices in turn.
    groups: i64,
    /// This thread's group.
    group: IntValue<'ctx>,
    /// This thread's index in its group, of `threads()`.
    t: IntValue<'ctx>,
}

impl<'ctx> RingCopiers<'ctx> {
    /// The copiers of a ring `ahead` slices deep read by `readers` (thread `lane` of the
    /// block).
    fn new(fb: &Fb<'_, 'ctx>, lane: IntValue<'ctx>, readers: RingReaders, ahead: i64) -> R<Self> {
        let groups = match readers {
            RingReaders::Threads => 1,
            RingReaders::Wgmma => ahead,
        };
        assert!(
            groups >= 1 && GPU_BLOCK_THREADS % (32 * groups) == 0,
            "a ring's copier groups are whole warps"
        );
        let threads = fb.i64c(GPU_BLOCK_THREADS / groups);
        Ok(RingCopiers {
            readers,
            groups,
            group: fb.b.build_int_signed_div(lane, threads, "cg").map_err(be)?,
            t: fb.b.build_int_signed_rem(lane, threads, "ct").map_err(be)?,
        })
    }

    /// Threads in each group: an `issue` copies a whole slice with this many.
    fn threads(&self) -> i64 {
        GPU_BLOCK_THREADS / self.groups
    }

    /// Whether this thread copies slice `s` (at every thread when `groups` is 1).
    fn copies(&self, fb: &Fb<'_, 'ctx>, s: IntValue<'ctx>) -> R<Option<IntValue<'ctx>>> {
        if self.groups == 1 {
            return Ok(None);
        }
        let turn =
            fb.b.build_int_unsigned_rem(s, fb.i64c(self.groups), "turn")
                .map_err(be)?;
        let mine =
            fb.b.build_int_compare(IntPredicate::EQ, turn, self.group, "mine")
                .map_err(be)?;
        Ok(Some(mine))
    }

    /// Slice `s` issued where `some` holds and this thread copies it; with one group, a
    /// group committed whether or not (empty), with more, only after a copy.
    fn issue_if(
        &self,
        fb: &Fb<'_, 'ctx>,
        some: IntValue<'ctx>,
        s: IntValue<'ctx>,
        issue: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        match self.copies(fb, s)? {
            None => {
                fb.if_else(some, |fb| issue(fb, s), |_| Ok(()))?;
                cp_async_commit(fb)
            }
            Some(mine) => {
                let go = fb.b.build_and(some, mine, "go").map_err(be)?;
                fb.if_else(
                    go,
                    |fb| {
                        issue(fb, s)?;
                        cp_async_commit(fb)
                    },
                    |_| Ok(()),
                )
            }
        }
    }
}

/// `ring_pipeline`'s start: slices `0..ahead` issued, each its own commit group.
fn ring_prologue<'ctx>(
    fb: &Fb<'_, 'ctx>,
    slices: IntValue<'ctx>,
    ahead: i64,
    copiers: RingCopiers<'ctx>,
    issue: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
) -> R<()> {
    for st in 0..ahead {
        let some =
            fb.b.build_int_compare(IntPredicate::SLT, fb.i64c(st), slices, "some")
                .map_err(be)?;
        copiers.issue_if(fb, some, fb.i64c(st), issue)?;
    }
    Ok(())
}

/// `ring_pipeline`'s step `kt` up to its `consume`: slice `kt` waited for by its copiers
/// (and fenced for `wgmma`), a barrier, slice `kt + ahead` issued.
fn ring_arrive<'ctx>(
    fb: &Fb<'_, 'ctx>,
    kt: IntValue<'ctx>,
    slices: IntValue<'ctx>,
    ahead: i64,
    copiers: RingCopiers<'ctx>,
    issue: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
) -> R<()> {
    ring_ready(fb, kt, ahead, copiers)?;
    ring_issue_next(fb, kt, slices, ahead, copiers, issue)
}

/// `ring_arrive`'s first half: slice `kt`'s copies waited for by their threads (and fenced
/// for `wgmma`), then a barrier, after which the slice is in every thread's view. Which
/// earlier stage may then be refilled is the caller's reckoning: the one whose readers
/// (threads, or `wgmma`s each warpgroup has waited for) are done before it.
fn ring_ready<'ctx>(
    fb: &Fb<'_, 'ctx>,
    kt: IntValue<'ctx>,
    ahead: i64,
    copiers: RingCopiers<'ctx>,
) -> R<()> {
    let settle = |fb: &Fb<'_, 'ctx>, pending: i64| -> R<()> {
        cp_async_wait(fb, pending)?;
        match copiers.readers {
            RingReaders::Wgmma => fence_proxy_async(fb),
            RingReaders::Threads => Ok(()),
        }
    };
    match copiers.copies(fb, kt)? {
        None => settle(fb, ahead - 1)?,
        Some(mine) => fb.if_else(mine, |fb| settle(fb, 0), |_| Ok(()))?,
    }
    barrier(fb)
}

/// `ring_arrive`'s second half, anywhere between the barrier and the next step's: slice
/// `kt + ahead` issued by its copiers.
fn ring_issue_next<'ctx>(
    fb: &Fb<'_, 'ctx>,
    kt: IntValue<'ctx>,
    slices: IntValue<'ctx>,
    ahead: i64,
    copiers: RingCopiers<'ctx>,
    issue: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
) -> R<()> {
    let next = fb.add(kt, fb.i64c(ahead))?;
    let more =
        fb.b.build_int_compare(IntPredicate::SLT, next, slices, "more")
            .map_err(be)?;
    copiers.issue_if(fb, more, next, issue)
}

/// Four float operands at `av`'s `idx..idx+4` in one load of their total size (16 bytes of
/// f32, 8 of bf16; `idx` a multiple of 4 and the base aligned to that size: `vector_rows`).
fn load_x4<'ctx>(
    fb: &Fb<'_, 'ctx>,
    av: &Av<'ctx>,
    idx: IntValue<'ctx>,
) -> R<[FloatValue<'ctx>; 4]> {
    if av.elem == ElemType::F32 {
        return load_f32x4(fb, av.ptr, idx, false);
    }
    let i16t = fb.ctx.i16_type();
    let mut p = unsafe { fb.b.build_in_bounds_gep(i16t, av.ptr, &[idx], "p4") }.map_err(be)?;
    fb.check_aligned(p, 8)?;
    if !fb.sim {
        p =
            fb.b.build_address_space_cast(p, fb.ctx.ptr_type(AddressSpace::from(1u16)), "g")
                .map_err(be)?;
    }
    let v = fb.b.build_load(i16t.vec_type(4), p, "h4").map_err(be)?;
    v.as_instruction_value()
        .expect("a load")
        .set_alignment(if fb.sim { 2 } else { 8 })
        .map_err(|e| BackendError::Llvm(e.to_string()))?;
    let v = v.into_vector_value();
    let i32t = fb.ctx.i32_type();
    let mut out = [fb.f32c(0.0); 4];
    for (i, o) in out.iter_mut().enumerate() {
        let h =
            fb.b.build_extract_element(v, i32t.const_int(i as u64, false), "e")
                .map_err(be)?
                .into_int_value();
        *o = fb.bf16_to_f32(h)?;
    }
    Ok(out)
}

/// Stores `xs` (32-bit values, all of one type) at `arr[idx..idx + xs.len()]` in one store
/// of their total size (`idx` a multiple of their count, `xs` 2 or 4 long).
fn store_vector<'ctx>(
    fb: &Fb<'_, 'ctx>,
    arr: PointerValue<'ctx>,
    idx: IntValue<'ctx>,
    xs: &[BasicValueEnum<'ctx>],
) -> R<()> {
    let n = xs.len() as u32;
    let (elem, vt): (BasicTypeEnum, _) = match xs[0] {
        BasicValueEnum::IntValue(x) => (x.get_type().into(), x.get_type().vec_type(n)),
        BasicValueEnum::FloatValue(x) => (x.get_type().into(), x.get_type().vec_type(n)),
        other => {
            return Err(BackendError::Llvm(format!(
                "no vector store of {:?}",
                other.get_type()
            )))
        }
    };
    let p = unsafe { fb.b.build_in_bounds_gep(elem, arr, &[idx], "sv") }.map_err(be)?;
    fb.check_aligned(p, 4 * n as u64)?;
    let i32t = fb.ctx.i32_type();
    let mut v = vt.get_undef();
    for (i, x) in xs.iter().enumerate() {
        v =
            fb.b.build_insert_element(v, *x, i32t.const_int(i as u64, false), "w")
                .map_err(be)?;
    }
    fb.b.build_store(p, v)
        .map_err(be)?
        .set_alignment(if fb.sim { 4 } else { 4 * n })
        .map_err(|e| BackendError::Llvm(e.to_string()))?;
    Ok(())
}

/// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16` (sm_75 and later): four 8 × 8 matrices
/// of 16-bit elements from shared memory, lane `l` giving the address of row `l % 8` of
/// matrix `l / 8` (16 contiguous bytes). Register `q` of lane `l` receives, of matrix `q`,
/// row `l/4`, elements `2(l%4)` and `2(l%4)+1` (low half first); transposed, elements
/// `(2(l%4), l/4)` and `(2(l%4)+1, l/4)`. In the simulator, the hook `egret_simt_ldmatrix`.
fn ldmatrix_x4<'ctx>(
    fb: &Fb<'_, 'ctx>,
    row: PointerValue<'ctx>,
    trans: bool,
) -> R<[IntValue<'ctx>; 4]> {
    let i32t = fb.ctx.i32_type();
    let mut out = [i32t.const_zero(); 4];
    if fb.sim {
        fb.check_aligned(row, 16)?;
        let o = fb.slot(i32t.array_type(4).into())?;
        let ptrt = fb.ctx.ptr_type(AddressSpace::default());
        let ty = fb
            .ctx
            .void_type()
            .fn_type(&[ptrt.into(), i32t.into(), ptrt.into()], false);
        let t = i32t.const_int(u64::from(trans), false);
        fb.hook(SIMT_HOOKS[3], ty, &[row.into(), t.into(), o.into()])?;
        for (i, v) in out.iter_mut().enumerate() {
            let p = unsafe { fb.b.build_in_bounds_gep(i32t, o, &[fb.i64c(i as i64)], "o") }
                .map_err(be)?;
            *v = fb.b.build_load(i32t, p, "m").map_err(be)?.into_int_value();
        }
        return Ok(out);
    }
    let name = if trans {
        "llvm.nvvm.ldmatrix.sync.aligned.m8n8.x4.trans.b16"
    } else {
        "llvm.nvvm.ldmatrix.sync.aligned.m8n8.x4.b16"
    };
    let f = fb.declare(name, &[row.get_type().into()])?;
    for (v, x) in out.iter_mut().zip(call_fields(fb, f, &[row.into()])?) {
        *v = x.into_int_value();
    }
    Ok(out)
}

/// Calls `f`, an intrinsic that returns a struct of four values, and returns its fields.
fn call_fields<'ctx>(
    fb: &Fb<'_, 'ctx>,
    f: FunctionValue<'ctx>,
    args: &[BasicMetadataValueEnum<'ctx>],
) -> R<[BasicValueEnum<'ctx>; 4]> {
    let r =
        fb.b.build_call(f, args, "r")
            .map_err(be)?
            .try_as_basic_value()
            .basic()
            .expect("returns a struct")
            .into_struct_value();
    let field = |i: u32| fb.b.build_extract_value(r, i, "f").map_err(be);
    Ok([field(0)?, field(1)?, field(2)?, field(3)?])
}

/// `d = a·b + c` on a warp's tensor cores: `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`
/// (sm_80 and later). Per lane (`g = lane/4`, `t = lane%4`), the operands are bf16 pairs:
/// `a` rows `g`, `g+8`, `g`, `g+8` at k pairs `t`, `t`, `t+4`, `t+4`; `b` column `g` at k
/// pairs `t`, `t+4`; `c` and `d` rows `g`, `g`, `g+8`, `g+8`, columns `2t`, `2t+1`, `2t`,
/// `2t+1`. In the simulator, the hook `egret_simt_mma_bf16` computes the same.
fn mma_bf16<'ctx>(
    fb: &Fb<'_, 'ctx>,
    a: [IntValue<'ctx>; 4],
    b: [IntValue<'ctx>; 2],
    c: [FloatValue<'ctx>; 4],
) -> R<[FloatValue<'ctx>; 4]> {
    let mut args: Vec<BasicMetadataValueEnum> = vec![];
    args.extend(a.iter().map(|v| BasicMetadataValueEnum::from(*v)));
    args.extend(b.iter().map(|v| BasicMetadataValueEnum::from(*v)));
    if fb.sim {
        let cs = fb.slot(fb.f32t.array_type(4).into())?;
        let at = |x: usize| -> R<PointerValue<'ctx>> {
            unsafe {
                fb.b.build_in_bounds_gep(fb.f32t, cs, &[fb.i64c(x as i64)], "c")
            }
            .map_err(be)
        };
        for (x, v) in c.iter().enumerate() {
            fb.b.build_store(at(x)?, *v).map_err(be)?;
        }
        args.push(cs.into());
        let i32t = fb.ctx.i32_type();
        let ptrt = fb.ctx.ptr_type(AddressSpace::default());
        let ty = fb.ctx.void_type().fn_type(
            &[
                i32t.into(),
                i32t.into(),
                i32t.into(),
                i32t.into(),
                i32t.into(),
                i32t.into(),
                ptrt.into(),
            ],
            false,
        );
        fb.hook(SIMT_HOOKS[2], ty, &args)?;
        let mut d = c;
        for (x, v) in d.iter_mut().enumerate() {
            *v =
                fb.b.build_load(fb.f32t, at(x)?, "d")
                    .map_err(be)?
                    .into_float_value();
        }
        return Ok(d);
    }
    let mma = Intrinsic::find("llvm.nvvm.mma.m16n8k16.row.col.bf16")
        .and_then(|i| i.get_declaration(fb.module, &[]))
        .ok_or_else(|| BackendError::Llvm("no intrinsic for mma.m16n8k16 bf16".into()))?;
    args.extend(c.iter().map(|v| BasicMetadataValueEnum::from(*v)));
    let mut d = c;
    for (v, x) in d.iter_mut().zip(call_fields(fb, mma, &args)?) {
        *v = x.into_float_value();
    }
    Ok(d)
}

/// Two `n8` tiles of one `A` fragment: `ldmatrix.x4` at this lane's `p` (`trans` for a
/// row-major `B`) gives the `B` fragments of two adjacent 8-column tiles, whose products
/// go to `acc[..4]` and `acc[4..8]` (`mma_into`).
fn mma_x4_pair<'ctx>(
    fb: &Fb<'_, 'ctx>,
    p: PointerValue<'ctx>,
    trans: bool,
    a: [IntValue<'ctx>; 4],
    acc: &[PointerValue<'ctx>],
) -> R<()> {
    let m = ldmatrix_x4(fb, p, trans)?;
    mma_into(fb, &acc[..4], a, [m[0], m[1]])?;
    mma_into(fb, &acc[4..8], a, [m[2], m[3]])
}

/// `acc += a·b` on the tensor cores (`mma_bf16`), `acc` the four accumulator slots of this
/// lane's fragment.
fn mma_into<'ctx>(
    fb: &Fb<'_, 'ctx>,
    acc: &[PointerValue<'ctx>],
    a: [IntValue<'ctx>; 4],
    b: [IntValue<'ctx>; 2],
) -> R<()> {
    let cur = [
        fb.get(acc[0])?,
        fb.get(acc[1])?,
        fb.get(acc[2])?,
        fb.get(acc[3])?,
    ];
    for (s, v) in acc.iter().zip(mma_bf16(fb, a, b, cur)?) {
        fb.set(*s, v)?;
    }
    Ok(())
}

/// The matmul on tensor cores: operands rounded to bf16 as they are staged, products summed
/// in f32 by `mma.sync.m16n8k16` (`mma_bf16`, sm_80 and later). Each 256-thread block
/// computes a 128 × 128 tile (blocks stride over the tiles of every batch entry); warp
/// `(wm, wn)` of a 2 × 4 grid holds a 64 × 32 sub-tile as 4 × 4 fragments of 16 × 8.
///
/// k advances in steps of 32 through two shared-memory stages: while the warps multiply
/// one stage, each thread's loads of the next slice are in flight into registers; after the
/// multiplies they are rounded to bf16 and stored into the other stage, so one barrier per
/// step suffices. That takes more than 128 registers a thread (64 sums, 32 staged floats,
/// the fragments), so kernels with this path ask for one resident block per SM
/// (`gpu_min_blocks`). `A`'s slice is staged row-major (`[128][32]`), `W`'s k-major
/// (`[32][128]`), with the 16-byte chunks of each row permuted by XOR (`swizzled_word`)
/// so that the eight rows of every `ldmatrix` phase fall in different banks; fragments are
/// read with `ldmatrix` (`.trans` for `W`). Slices inside the matrices, with unit stride along
/// the staged rows and 16-byte alignment, load four floats at a time; the others (edges,
/// other layouts) element by element with bounds checks. With `norm`, rows are scaled as
/// in `gpu_tiled_matmul`.
///
/// When both operands are stored bf16 with rows that start on 16 bytes (and no norm weight
/// to apply as they load), the slices skip the registers: `cp.async` copies them into a
/// ring of `MMA_STAGES` stages in dynamic shared memory, three slices in flight
/// (`ring_pipeline`), multiplied as above. (On sm_90a such operands take
/// `gpu_wgmma_matmul` where every batch entry's rows do.)
fn gpu_mma_matmul<'ctx>(fb: &Fb<'_, 'ctx>, mm: &GpuMatmul<'_, 'ctx>) -> R<()> {
    let GpuMatmul {
        aav,
        gav,
        wav,
        norm,
        eps,
        dims: (mv, nv, kv),
        ..
    } = *mm;
    let (t, tk, stage) = (GPU_TILE, MMA_TILE_K, MMA_STAGE_WORDS);
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let cmp = |p, a, b| fb.b.build_int_compare(p, a, b, "cmp").map_err(be);
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let bits = |a: IntValue<'ctx>, m: i64| fb.b.build_and(a, c(m), "bits").map_err(be);
    let xor = |a, b| fb.b.build_xor(a, b, "xor").map_err(be);
    // Staged `A` is `[128][32]` bf16, staged `W` `[32][128]` (words in `swizzled_word`).
    let a_word = |r, k| swizzled_word(fb, r, k, tk);
    let w_word = |k, n| swizzled_word(fb, k, n, t);
    let i32t = fb.ctx.i32_type();
    let word_ptr = |arr: PointerValue<'ctx>, at: IntValue<'ctx>| {
        unsafe { fb.b.build_in_bounds_gep(i32t, arr, &[at], "wp") }.map_err(be)
    };
    // The ring: `MMA_STAGES` stages of `A`, then as many of `W` (the staged path uses two).
    let a_s = dynamic_shared(fb, MMA_RING_BYTES);
    let w_s = word_ptr(a_s, c(MMA_STAGES * stage))?;
    let inv_s = shared_f32(fb, "inv", (3 * t) as u32);
    let inv_at = 2 * t;
    let (
        per_batch,
        tiles_n,
        BlockGrid {
            lane,
            blk,
            nblk,
            iters,
        },
    ) = mm.tiles(fb, (t, t))?;
    let warp = sdiv(lane, c(32), "warp")?;
    let wl = srem(lane, c(32), "wl")?;
    let (wm, wn) = (sdiv(warp, c(4), "wm")?, srem(warp, c(4), "wn")?);
    let (g, q) = (sdiv(wl, c(4), "g")?, srem(wl, c(4), "q")?);
    let accs: Vec<PointerValue> = (0..64).map(|_| fb.slot(fb.f32t.into())).collect::<R<_>>()?;
    // The next slice, in flight: `A` rows `lane/8 + 32p`, k `4(lane%8)..+4`; `W` k rows
    // `warp + 8p`, columns `4·wl..+4`.
    let staged: Vec<PointerValue> = (0..2 * 4 * MMA_PASSES)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    let (a_row0, a_k) = (
        sdiv(lane, c(8), "ar")?,
        fb.mul(srem(lane, c(8), "ak")?, c(4))?,
    );
    let w_n = fb.mul(wl, c(4))?;
    // This thread's store words (first pass) and `ldmatrix` row words (first row tile of `A`
    // per k step; per column pair of `W`, first k step). Lane `wl` addresses row `wl % 8` of
    // matrix `wl / 8`: matrices 1 and 3 are 8 rows (of `A`) or k rows (of `W`) on, matrices
    // 2 and 3 the next 8 k (of `A`) or columns (of `W`).
    let a_at = a_word(a_row0, a_k)?;
    let w_at = w_word(warp, w_n)?;
    let r8 = fb.add(
        srem(wl, c(8), "r8")?,
        fb.mul(srem(sdiv(wl, c(8), "m")?, c(2), "m2")?, c(8))?,
    )?;
    let half = fb.mul(sdiv(wl, c(16), "h")?, c(8))?;
    let a_ld: Vec<IntValue> = (0..tk / 16)
        .map(|ks| a_word(fb.add(fb.mul(wm, c(64))?, r8)?, fb.add(c(16 * ks), half)?))
        .collect::<R<_>>()?;
    let w_ld: Vec<IntValue> = (0..2)
        .map(|jj| w_word(r8, fb.add(fb.add(fb.mul(wn, c(32))?, c(16 * jj))?, half)?))
        .collect::<R<_>>()?;
    let ktiles = fb.ceil_div(kv, c(tk))?;
    let (ra, kw) = (aav.strides.len() - 2, wav.strides.len() - 2);
    let vecs = mm.vector_rows(fb)?;
    // Whether both operands can take the ring (`cp.async` of 16-byte chunks of 8 bf16 each,
    // zero-filled outside the matrices): stored bf16 with no norm weight to apply, unit
    // stride along the staged rows (`A` along k, `W` along n), rows starting on 16-byte
    // boundaries, and the row length a multiple of 8 (a chunk is all inside or all outside).
    let ring_ok = if aav.elem == ElemType::BF16 && wav.elem == ElemType::BF16 && gav.is_none() {
        let (a_rows, w_rows) = mm.rows_in_chunks(fb, 8)?;
        let lens = and(fb.multiple_of(kv, 8)?, fb.multiple_of(nv, 8)?)?;
        Some(and(and(a_rows, w_rows)?, lens)?)
    } else {
        None
    };
    // This thread's chunks of a ring stage: of `A`, rows `lane/4 + 64p`, k `8(lane%4)`; of
    // `W`, k rows `lane/16 + 16p`, columns `8(lane%16)` (p = 0, 1). Rows 64 apart of `A`
    // and k rows 16 apart of `W` keep their chunk permutation.
    let (ca_row, ca_k) = (
        sdiv(lane, c(4), "cr")?,
        fb.mul(srem(lane, c(4), "ck")?, c(8))?,
    );
    let (cw_k, cw_n) = (
        sdiv(lane, c(16), "wk")?,
        fb.mul(srem(lane, c(16), "wn")?, c(8))?,
    );
    let ca_at = a_word(ca_row, ca_k)?;
    let cw_at = w_word(cw_k, cw_n)?;
    fb.for_range(c(0), iters, |fb, it| {
        let tile = fb.add(blk, fb.mul(it, nblk)?)?;
        let at = mm.tile_at(fb, tile, (per_batch, tiles_n), (t, t))?;
        let TileAt {
            m0,
            n0,
            abase,
            wbase,
            ..
        } = at;
        if norm {
            row_scales(fb, aav, abase, lane, (m0, t), (mv, kv), eps, inv_s, inv_at)?;
        }
        for a in &accs {
            fb.set(*a, fb.f32c(0.0))?;
        }
        let (a_fast, w_fast) = mm.vector_tile(fb, t, vecs, (m0, abase), (n0, wbase))?;
        // Loads `A`'s part of the slice at `k0` into `staged[..16]`.
        // (`k0` the slice's first k, `kfull` whether all its 32 k are inside the matrices)
        let load_a = |fb: &Fb<'_, 'ctx>, k0: IntValue<'ctx>, kfull: IntValue<'ctx>| -> R<()> {
            fb.if_else(
                and(a_fast, kfull)?,
                |fb| {
                    for p in 0..MMA_PASSES {
                        let gm = fb.add(m0, fb.add(a_row0, c(32 * p))?)?;
                        let gk = fb.add(k0, a_k)?;
                        let at = fb.add(abase, fb.add(fb.mul(gm, aav.strides[ra])?, gk)?)?;
                        let v = load_x4(fb, aav, at)?;
                        for (e, mut x) in v.into_iter().enumerate() {
                            if let Some(gv) = gav {
                                let k = fb.add(gk, c(e as i64))?;
                                let gx = fb
                                    .load_f32(gv.ptr, fb.add(gv.off, fb.mul(k, gv.strides[0])?)?)?;
                                x = fb.fmul(x, gx)?;
                            }
                            fb.set(staged[(4 * p) as usize + e], x)?;
                        }
                    }
                    Ok(())
                },
                |fb| {
                    for p in 0..MMA_PASSES {
                        let gm = fb.add(m0, fb.add(a_row0, c(32 * p))?)?;
                        for e in 0..4 {
                            let gk = fb.add(k0, fb.add(a_k, c(e))?)?;
                            let x = mm.a_elem(fb, abase, gm, gk)?;
                            fb.set(staged[(4 * p + e) as usize], x)?;
                        }
                    }
                    Ok(())
                },
            )
        };
        // Loads `W`'s part of the slice at `k0` into `staged[16..]`.
        let load_w = |fb: &Fb<'_, 'ctx>, k0: IntValue<'ctx>, kfull: IntValue<'ctx>| -> R<()> {
            let wb = (4 * MMA_PASSES) as usize;
            fb.if_else(
                and(w_fast, kfull)?,
                |fb| {
                    for p in 0..MMA_PASSES {
                        let gk = fb.add(k0, fb.add(warp, c(8 * p))?)?;
                        let at = fb.add(
                            wbase,
                            fb.add(fb.mul(gk, wav.strides[kw])?, fb.add(n0, w_n)?)?,
                        )?;
                        let v = load_x4(fb, wav, at)?;
                        for (e, x) in v.into_iter().enumerate() {
                            fb.set(staged[wb + (4 * p) as usize + e], x)?;
                        }
                    }
                    Ok(())
                },
                |fb| {
                    for p in 0..MMA_PASSES {
                        let gk = fb.add(k0, fb.add(warp, c(8 * p))?)?;
                        for e in 0..4 {
                            let gn = fb.add(n0, fb.add(w_n, c(e))?)?;
                            let x = mm.w_elem(fb, wbase, gk, gn)?;
                            fb.set(staged[wb + (4 * p + e) as usize], x)?;
                        }
                    }
                    Ok(())
                },
            )
        };
        // One operand's staged part (`from`: 0 for `A`, 16 for `W`), rounded to bf16 pairs,
        // to its words `first` (pass 0) of array `arr`, passes `pass` words apart (rows 32
        // apart, and k rows 8 apart, keep their chunk permutation).
        let put = |fb: &Fb<'_, 'ctx>, from: usize, arr, first, pass: i64| -> R<()> {
            for p in 0..MMA_PASSES {
                let s = |i: usize| fb.get(staged[from + (4 * p) as usize + i]);
                let lo = pack_bf16x2(fb, s(0)?, s(1)?)?;
                let hi = pack_bf16x2(fb, s(2)?, s(3)?)?;
                store_vector(
                    fb,
                    arr,
                    fb.add(first, c(p * pass))?,
                    &[lo.into(), hi.into()],
                )?;
            }
            Ok(())
        };
        // Slice `kt` into `staged`; `staged` into stage `buf`.
        let fetch = |fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>| -> R<()> {
            let k0 = fb.mul(kt, c(tk))?;
            let kfull = cmp(IntPredicate::SLE, fb.add(k0, c(tk))?, kv)?;
            load_a(fb, k0, kfull)?;
            load_w(fb, k0, kfull)
        };
        let stage_staged = |fb: &Fb<'_, 'ctx>, buf: IntValue<'ctx>| -> R<()> {
            let base = fb.mul(buf, c(stage))?;
            put(fb, 0, a_s, fb.add(base, a_at)?, 32 * tk / 2)?;
            put(
                fb,
                (4 * MMA_PASSES) as usize,
                w_s,
                fb.add(base, w_at)?,
                8 * t / 2,
            )
        };
        // The warp's 64 × 32 products over stage `buf`.
        // (Rows 16 apart keep their chunk permutation, and so do k rows 16 apart: the four
        // row tiles of `A` and the two k steps of `W` are their first one's word plus a
        // constant.)
        let multiply = |fb: &Fb<'_, 'ctx>, buf: IntValue<'ctx>| -> R<()> {
            let base = fb.mul(buf, c(stage))?;
            for ks in 0..(tk / 16) {
                let mut bfr = vec![];
                for wj in &w_ld {
                    let at = fb.add(base, fb.add(*wj, c(16 * ks * t / 2))?)?;
                    let m = ldmatrix_x4(fb, word_ptr(w_s, at)?, true)?;
                    bfr.push([m[0], m[1]]);
                    bfr.push([m[2], m[3]]);
                }
                for i in 0..4usize {
                    let at = fb.add(base, fb.add(a_ld[ks as usize], c(16 * i as i64 * tk / 2))?)?;
                    let afr = ldmatrix_x4(fb, word_ptr(a_s, at)?, false)?;
                    for (j, b) in bfr.iter().enumerate() {
                        mma_into(fb, &accs[(i * 4 + j) * 4..(i * 4 + j) * 4 + 4], afr, *b)?;
                    }
                }
            }
            Ok(())
        };
        // Through registers: two stages, the next slice loaded while one is multiplied.
        let staged_path = |fb: &Fb<'_, 'ctx>| -> R<()> {
            fetch(fb, c(0))?;
            stage_staged(fb, c(0))?;
            fb.for_range(c(0), ktiles, |fb, kt| {
                barrier(fb)?;
                let buf = bits(kt, 1)?;
                let next = fb.add(kt, c(1))?;
                let more = cmp(IntPredicate::SLT, next, ktiles)?;
                fb.if_else(more, |fb| fetch(fb, next), |_| Ok(()))?;
                multiply(fb, buf)?;
                fb.if_else(more, |fb| stage_staged(fb, xor(buf, c(1))?), |_| Ok(()))
            })
        };
        // Slice `kt` copied into ring stage `kt % MMA_STAGES` (`copy_ring_chunks`): this
        // thread's chunks of `A` are rows `ca_row + 64p` at k `ca_k`, of `W` k rows
        // `cw_k + 16p` at columns `cw_n` (p = 0, 1); without bounds where the tile lies
        // inside the matrices in m and n and the slice in k.
        let (lda, ldw) = (
            aav.strides[aav.strides.len() - 2],
            wav.strides[wav.strides.len() - 2],
        );
        let a_chunks: Vec<RingChunk> = (0..2)
            .map(|p| {
                let gm = fb.add(m0, fb.add(ca_row, c(64 * p))?)?;
                Ok(RingChunk {
                    at: fb.add(abase, fb.add(fb.mul(gm, lda)?, ca_k)?)?,
                    k: ca_k,
                    across: cmp(IntPredicate::SLT, gm, mv)?,
                })
            })
            .collect::<R<_>>()?;
        let gn = fb.add(n0, cw_n)?;
        let w_in_n = cmp(IntPredicate::SLT, gn, nv)?;
        let w_chunks: Vec<RingChunk> = (0..2)
            .map(|p| {
                let gk = fb.add(cw_k, c(16 * p))?;
                Ok(RingChunk {
                    at: fb.add(wbase, fb.add(fb.mul(gk, ldw)?, gn)?)?,
                    k: gk,
                    across: w_in_n,
                })
            })
            .collect::<R<_>>()?;
        let tile_inside = and(
            cmp(IntPredicate::SLE, fb.add(m0, c(t))?, mv)?,
            cmp(IntPredicate::SLE, fb.add(n0, c(t))?, nv)?,
        )?;
        let issue = |fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>| -> R<()> {
            let base = fb.mul(bits(kt, MMA_STAGES - 1)?, c(stage))?;
            let k0 = fb.mul(kt, c(tk))?;
            let k_inside = cmp(IntPredicate::SLE, fb.add(k0, c(tk))?, kv)?;
            let copy = |fb: &Fb<'_, 'ctx>, bounds| -> R<()> {
                let a_dst = |p| word_ptr(a_s, fb.add(base, fb.add(ca_at, c(p * 64 * tk / 2))?)?);
                copy_ring_chunks(fb, aav, &a_chunks, k0, bounds, &a_dst)?;
                let w_dst = |p| word_ptr(w_s, fb.add(base, fb.add(cw_at, c(p * 16 * t / 2))?)?);
                copy_ring_chunks(fb, wav, &w_chunks, fb.mul(k0, ldw)?, bounds, &w_dst)
            };
            fb.if_else(
                and(tile_inside, k_inside)?,
                |fb| copy(fb, None),
                |fb| copy(fb, Some((k0, kv))),
            )
        };
        // Through the ring: `MMA_STAGES - 1` slices in flight; before slice `kt` is
        // multiplied, this thread's copies of it are waited for and a barrier publishes
        // everyone's, after which stage `(kt - 1) % MMA_STAGES`, read by then, is refilled.
        // Every step commits a group (empty past the end) so the count stays uniform.
        let ring_path = |fb: &Fb<'_, 'ctx>| -> R<()> {
            ring_pipeline(
                fb,
                ktiles,
                MMA_STAGES - 1,
                RingCopiers::new(fb, lane, RingReaders::Threads, MMA_STAGES - 1)?,
                &issue,
                &|fb, kt| multiply(fb, bits(kt, MMA_STAGES - 1)?),
            )?;
            cp_async_wait(fb, 0)
        };
        // The outputs (`GpuMatmul::store_tile`).
        let store = |fb: &Fb<'_, 'ctx>, place: &TilePlace<'_, 'ctx>| -> R<()> {
            mm.store_tile(fb, &accs, place, at, (inv_s, inv_at), None)
        };
        // `mma.sync` fragments: accumulator `(i·4 + j)·4 + x` of warp `(wm, wn)` at row
        // `64wm + 16i + g` (`+ 8` for x = 2, 3), column `32wn + 8j + 2q` (`+ 1` for odd x).
        let mma_place = |fb: &Fb<'_, 'ctx>, a: usize| -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
            let (i, j, x) = ((a / 16) as i64, ((a / 4) % 4) as i64, (a % 4) as i64);
            let r = fb.add(fb.mul(wm, c(64))?, fb.add(c(16 * i + 8 * (x / 2)), g)?)?;
            let cl = fb.add(
                fb.mul(wn, c(32))?,
                fb.add(c(8 * j + x % 2), fb.mul(q, c(2))?)?,
            )?;
            Ok((r, cl))
        };
        let staged = |fb: &Fb<'_, 'ctx>| -> R<()> {
            staged_path(fb)?;
            store(fb, &mma_place)
        };
        match ring_ok {
            Some(ok) => {
                let aligned = and(fb.multiple_of(abase, 8)?, fb.multiple_of(wbase, 8)?)?;
                let ring = |fb: &Fb<'_, 'ctx>| -> R<()> {
                    ring_path(fb)?;
                    store(fb, &mma_place)
                };
                fb.if_else(and(ok, aligned)?, ring, staged)?;
            }
            None => staged(fb)?,
        }
        barrier(fb)
    })
}

/// Whether `gpu_wgmma_matmul` can take this matmul: both operands stored bf16 with no norm
/// weight to apply as they load, unit stride along the staged rows (`A` along k, `W` along
/// n), every row of every batch entry on 16 bytes (strides and offsets multiples of 8
/// elements, buffers aligned), and the row lengths multiples of 8 (a 16-byte chunk is all
/// inside the matrix or all outside).
fn wgmma_fits<'ctx>(fb: &Fb<'_, 'ctx>, mm: &GpuMatmul<'_, 'ctx>) -> R<Option<IntValue<'ctx>>> {
    let (aav, wav) = (mm.aav, mm.wav);
    if aav.elem != ElemType::BF16 || wav.elem != ElemType::BF16 || mm.gav.is_some() {
        return Ok(None);
    }
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let (_, nv, kv) = mm.dims;
    let (a_rows, w_rows) = mm.rows_in_chunks(fb, 8)?;
    let mut ok = and(and(a_rows, w_rows)?, fb.multiple_of(kv, 8)?)?;
    ok = and(ok, fb.multiple_of(nv, 8)?)?;
    for av in [aav, wav] {
        let n = av.strides.len();
        for x in av.strides[..n - 2].iter().chain([&av.off]) {
            ok = and(ok, fb.multiple_of(*x, 8)?)?;
        }
    }
    Ok(Some(ok))
}

/// The matmul on sm_90a's `wgmma.mma_async` (both operands bf16 in memory: `wgmma_fits`).
/// Each 256-thread block computes `GPU_TILE × WG_TILE_N` tiles (blocks stride over the tiles
/// of every batch entry); warpgroup `wg` holds rows `64wg..64wg+64` of the tile, all its
/// columns, in 128 accumulators a thread (`wgmma_m64`).
///
/// k advances in slices of `WG_TILE_K`: `cp.async` copies them into a ring of `WG_STAGES`
/// stages in dynamic shared memory, in the 128-byte-swizzled layouts of `WG_A_LBO`..,
/// `WG_STAGES - 2` slices ahead, the two warpgroups copying slices in turn (`ring_pipeline`'s
/// steps, `RingCopiers`; slices wholly inside the matrices without bounds, the others with
/// chunks outside zero-filled). Before slice `kt` is multiplied, its copies are waited for
/// and a barrier publishes them; that barrier also tells that every warpgroup's `wgmma`s of
/// slice `kt - 2` are done (each keeps one group in flight), so the stage of slice `kt - 2`
/// is the one refilled. The outputs are staged in the ring's first stages and copied out
/// (`GpuMatmul::store_tile`); meanwhile the block's next tile has its first slices issued
/// into the others. With `norm`, rows are scaled as in `gpu_tiled_matmul`; a residual is
/// added as the outputs are stored.
///
/// With `WgCopies::Tma` the copy engine fills the ring instead (`tma_fits`): thread 0
/// issues each slice as five tensor copies (`A`'s `128 × 64` box, `W`'s four `64 × 64`), in
/// the same layouts, their bytes counted on the stage's `mbarrier`, and every thread waits
/// on that barrier before the slice's `wgmma`s; the step's block barrier still tells that
/// the stage refilled is free. Tiles reaching past the matrices need no bounds: the engine
/// fills what lies outside with zeros.
fn gpu_wgmma_matmul<'ctx>(fb: &Fb<'_, 'ctx>, mm: &GpuMatmul<'_, 'ctx>, copies: WgCopies) -> R<()> {
    let GpuMatmul {
        aav,
        wav,
        norm,
        eps,
        dims: (mv, nv, kv),
        ..
    } = *mm;
    let (tm, tn) = (GPU_TILE, WG_TILE_N);
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let cmp = |p, a, b| fb.b.build_int_compare(p, a, b, "cmp").map_err(be);
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let bits = |a: IntValue<'ctx>, m: i64| fb.b.build_and(a, c(m), "bits").map_err(be);
    let xor = |a, b| fb.b.build_xor(a, b, "xor").map_err(be);
    let urem = |a, n: i64| fb.b.build_int_unsigned_rem(a, c(n), "stage").map_err(be);
    let ring = dynamic_shared(fb, WG_RING_BYTES);
    let byte_ptr = |at: IntValue<'ctx>| {
        unsafe {
            fb.b.build_in_bounds_gep(fb.ctx.i8_type(), ring, &[at], "bp")
        }
        .map_err(be)
    };
    let inv_s = shared_f32_once(fb, "inv", (3 * tm) as u32);
    let inv_at = 2 * tm;
    let (
        per_batch,
        tiles_n,
        BlockGrid {
            lane,
            blk,
            nblk,
            iters,
        },
    ) = mm.tiles(fb, (tm, tn))?;
    let tma = match copies {
        WgCopies::CpAsync => None,
        WgCopies::Tma => Some(WgTma::new(fb, mm, ring, lane, blk)?),
    };
    let wl = srem(lane, c(32), "wl")?;
    let (g, q) = (sdiv(wl, c(4), "g")?, srem(wl, c(4), "q")?);
    let accs: Vec<PointerValue> = (0..tn / 2)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    // The ring's copiers (`RingCopiers`: warpgroups taking slices in turn), `ct` this
    // thread's index among its group's `threads`.
    let ahead = WG_STAGES - 2;
    let copiers = RingCopiers::new(fb, lane, RingReaders::Wgmma, ahead)?;
    let (ct, threads) = (copiers.t, copiers.threads());
    // This thread's warpgroup `wg`, its index `t128` there and warp `wg_warp` of it; its
    // chunks of a stage (byte offsets from the stage): of `A`, row `ct/8` (+ `a_rows·p`), k
    // `8(ct%8)`; of `W`, k row `ct/16` (+ `w_rows·p`), columns `8(ct%16)` and 128 on (column
    // blocks two apart). Passes move by whole atoms (multiples of 8 rows of `A`, of k rows
    // of `W`: `128·a_rows` and `128·w_rows` bytes on), with the same swizzle. A warp's 16-byte
    // stores fill four 128-byte rows, every bank four times.
    let (a_rows, w_rows) = (threads / 8, threads / 16);
    assert!(
        a_rows % 8 == 0 && w_rows % 8 == 0 && tm % a_rows == 0 && WG_TILE_K % w_rows == 0,
        "copier passes of whole atoms"
    );
    let (wg, t128) = (sdiv(lane, c(128), "wg")?, srem(lane, c(128), "t128")?);
    let wg_warp = sdiv(t128, c(32), "wgw")?;
    let ring0 = to_swizzle_atom(fb, ring)?;
    let swz = |chunk: IntValue<'ctx>, row: IntValue<'ctx>| -> R<IntValue<'ctx>> {
        fb.mul(xor(chunk, bits(row, 7)?)?, c(16))
    };
    let (wa_row, wa_c) = (sdiv(ct, c(8), "ar")?, bits(ct, 7)?);
    let wa_k = fb.mul(wa_c, c(8))?;
    let wa_at = fb.add(fb.mul(wa_row, c(128))?, swz(wa_c, wa_row)?)?;
    const _: () = assert!(WG_TILE_N == 256);
    let (ww_k, ww_c) = (sdiv(ct, c(16), "wk")?, srem(ct, c(16), "wc")?);
    let ww_n = fb.mul(ww_c, c(8))?;
    let ww_at = fb.add(
        fb.add(
            fb.mul(sdiv(ww_c, c(8), "nb")?, c(WG_B_LBO))?,
            fb.mul(ww_k, c(128))?,
        )?,
        fb.add(c(WG_A_BYTES), swz(bits(ww_c, 7)?, ww_k)?)?,
    )?;
    let (lda, ldw) = (
        aav.strides[aav.strides.len() - 2],
        wav.strides[wav.strides.len() - 2],
    );
    let ktw = fb.ceil_div(kv, c(WG_TILE_K))?;
    // Slice `kt` of every tile lies in stage `(kt + ahead) % WG_STAGES`: a tile's first
    // `ahead` slices in the stages past the first `ahead`, which stage the outputs of the
    // tile before (`keep` bytes), so they are issued while those are copied out
    // (`Staging::then`) rather than after.
    const _: () = assert!(WG_STAGES >= 2 * (WG_STAGES - 2));
    let keep = ahead * WG_STAGE_BYTES;
    let stage_at = |fb: &Fb<'_, 'ctx>, kt| -> R<IntValue<'ctx>> {
        let s = urem(fb.add(kt, c(ahead))?, WG_STAGES)?;
        fb.add(ring0, fb.mul(s, c(WG_STAGE_BYTES))?)
    };
    // Tile `tile`'s place, this thread's chunks of its slices (`copy_ring_chunks`) and whether
    // it lies inside the matrices in m and n (its slices inside in k are then copied
    // without bounds).
    type WgTileCopies<'ctx> = (TileAt<'ctx>, [Vec<RingChunk<'ctx>>; 2], IntValue<'ctx>);
    let tile_copies = |fb: &Fb<'_, 'ctx>, tile| -> R<WgTileCopies<'ctx>> {
        let at = mm.tile_at(fb, tile, (per_batch, tiles_n), (tm, tn))?;
        let TileAt {
            m0,
            n0,
            abase,
            wbase,
            ..
        } = at;
        let a_chunks: Vec<RingChunk> = (0..tm / a_rows)
            .map(|p| {
                let gm = fb.add(m0, fb.add(wa_row, c(a_rows * p))?)?;
                Ok(RingChunk {
                    at: fb.add(abase, fb.add(fb.mul(gm, lda)?, wa_k)?)?,
                    k: wa_k,
                    across: cmp(IntPredicate::SLT, gm, mv)?,
                })
            })
            .collect::<R<_>>()?;
        // (`W`'s chunk `2p + h`: pass `p`, columns `128h` on)
        let gn = [fb.add(n0, ww_n)?, fb.add(n0, fb.add(ww_n, c(128))?)?];
        let w_in_n = [
            cmp(IntPredicate::SLT, gn[0], nv)?,
            cmp(IntPredicate::SLT, gn[1], nv)?,
        ];
        let w_chunks: Vec<RingChunk> = (0..2 * WG_TILE_K / w_rows)
            .map(|i| {
                let (p, h) = (i / 2, (i % 2) as usize);
                let gk = fb.add(ww_k, c(w_rows * p))?;
                Ok(RingChunk {
                    at: fb.add(wbase, fb.add(fb.mul(gk, ldw)?, gn[h])?)?,
                    k: gk,
                    across: w_in_n[h],
                })
            })
            .collect::<R<_>>()?;
        let inside = and(
            cmp(IntPredicate::SLE, fb.add(m0, c(tm))?, mv)?,
            cmp(IntPredicate::SLE, fb.add(n0, c(tn))?, nv)?,
        )?;
        Ok((at, [a_chunks, w_chunks], inside))
    };
    // Slice `kt` of the tile at `at` copied into its stage by this thread's chunks.
    let issue = |fb: &Fb<'_, 'ctx>,
                 (_, [a_chunks, w_chunks], tile_inside): &WgTileCopies<'ctx>,
                 kt: IntValue<'ctx>|
     -> R<()> {
        let base = stage_at(fb, kt)?;
        let k0 = fb.mul(kt, c(WG_TILE_K))?;
        let inside = and(
            *tile_inside,
            cmp(IntPredicate::SLE, fb.add(k0, c(WG_TILE_K))?, kv)?,
        )?;
        let copy = |fb: &Fb<'_, 'ctx>, bounds| -> R<()> {
            let a_dst = |p| byte_ptr(fb.add(base, fb.add(wa_at, c(128 * a_rows * p))?)?);
            copy_ring_chunks(fb, aav, a_chunks, k0, bounds, &a_dst)?;
            let w_dst = |i: i64| {
                let off = 128 * w_rows * (i / 2) + 2 * WG_B_LBO * (i % 2);
                byte_ptr(fb.add(base, fb.add(ww_at, c(off))?)?)
            };
            copy_ring_chunks(fb, wav, w_chunks, fb.mul(k0, ldw)?, bounds, &w_dst)
        };
        fb.if_else(inside, |fb| copy(fb, None), |fb| copy(fb, Some((k0, kv))))
    };
    // The first `ahead` slices of tile `tile` issued (`ring_prologue`).
    let prologue = |fb: &Fb<'_, 'ctx>, tile| -> R<()> {
        if let Some(t) = &tma {
            let at = mm.tile_at(fb, tile, (per_batch, tiles_n), (tm, tn))?;
            return t.prologue(fb, &at, ktw, ahead, &stage_at);
        }
        let tc = tile_copies(fb, tile)?;
        ring_prologue(fb, ktw, ahead, copiers, &|fb, kt| issue(fb, &tc, kt))
    };
    let some = cmp(IntPredicate::SGT, iters, c(0))?;
    fb.if_else(some, |fb| prologue(fb, blk), |_| Ok(()))?;
    fb.for_range(c(0), iters, |fb, it| {
        let tile = fb.add(blk, fb.mul(it, nblk)?)?;
        let tc = tile_copies(fb, tile)?;
        let at = tc.0;
        if norm {
            let (m0, abase) = (at.m0, at.abase);
            row_scales(fb, aav, abase, lane, (m0, tm), (mv, kv), eps, inv_s, inv_at)?;
        }
        for a in &accs {
            fb.set(*a, fb.f32c(0.0))?;
        }
        // (the prologue was issued before: `ring_steps`, or `WgTma::steps`)
        let issue_tile = |fb: &Fb<'_, 'ctx>, s| issue(fb, &tc, s);
        let consume = |fb: &Fb<'_, 'ctx>, kt| -> R<()> {
            let base = stage_at(fb, kt)?;
            wgmma_sync(fb, "fence", None)?;
            // (a k16 step: 32 bytes into `A`'s rows, two k atoms into `W`'s; a step's
            // descriptors are the first's plus its offset in 16-byte units, which stays in
            // the 14-bit address field since shared memory is under 256 KiB)
            let a0 = fb.add(base, fb.mul(wg, c(8192))?)?;
            let b0 = fb.add(base, c(WG_A_BYTES))?;
            let da0 = wgmma_desc(fb, byte_ptr(a0)?, WG_A_LBO, WG_A_SBO)?;
            let db0 = wgmma_desc(fb, byte_ptr(b0)?, WG_B_LBO, WG_B_SBO)?;
            for ks in 0..WG_TILE_K / 16 {
                let (a_off, b_off) = (32 * ks, 2 * WG_B_SBO * ks);
                let a = byte_ptr(fb.add(a0, c(a_off))?)?;
                let b = byte_ptr(fb.add(b0, c(b_off))?)?;
                let a = WgA::Shared(a, fb.add(da0, c(a_off >> 4))?);
                let b = WgB {
                    at: b,
                    desc: fb.add(db0, c(b_off >> 4))?,
                    lbo: WG_B_LBO,
                    sbo: WG_B_SBO,
                    n_major: true,
                };
                wgmma_m64(fb, &a, &b, t128, &accs)?;
            }
            wgmma_sync(fb, "commit_group", None)?;
            wgmma_sync(fb, "wait_group", Some(1))
        };
        match &tma {
            Some(t) => t.steps(fb, &at, ktw, ahead, &stage_at, &consume)?,
            None => ring_steps(fb, ktw, ahead, copiers, &issue_tile, &consume)?,
        }
        // (no copies in flight: a tile's slices past its end are not issued)
        wgmma_sync(fb, "wait_group", Some(0))?;
        // The outputs: accumulator `x` at row `64wg + 16·wg_warp + g` (+ 8 for `x%4` ≥ 2),
        // column `8(x/4) + 2q` (+ 1 for odd `x`) of the tile (`GpuMatmul::store_tile`).
        let place = |fb: &Fb<'_, 'ctx>, x: usize| -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
            let (j, e) = ((x / 4) as i64, (x % 4) as i64);
            let r = fb.add(
                fb.add(fb.mul(wg, c(64))?, fb.mul(wg_warp, c(16))?)?,
                fb.add(g, c(8 * (e / 2)))?,
            )?;
            Ok((r, fb.add(c(8 * j + e % 2), fb.mul(q, c(2))?)?))
        };
        // The next tile's first slices, once the ring past `keep` is free.
        let next = |fb: &Fb<'_, 'ctx>| -> R<()> {
            let more = cmp(IntPredicate::SLT, fb.add(it, c(1))?, iters)?;
            fb.if_else(more, |fb| prologue(fb, fb.add(tile, nblk)?), |_| Ok(()))
        };
        // (the ring, free once every warpgroup's last `wgmma` is done, stages the tile)
        let stage = Staging {
            smem: byte_ptr(ring0)?,
            lane,
            keep,
            then: &next,
        };
        mm.store_tile(fb, &accs, &place, at, (inv_s, inv_at), Some(stage))?;
        barrier(fb)
    })?;
    match tma {
        Some(_) => Ok(()),
        None => cp_async_wait(fb, 0),
    }
}

/// How `gpu_wgmma_matmul`'s ring is filled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WgCopies {
    /// Every thread's `cp.async`s, the warpgroups taking slices in turn (`RingCopiers`).
    CpAsync,
    /// The tensor memory accelerator (`WgTma`).
    Tma,
}

/// Whether `gpu_wgmma_matmul` may take `WgCopies::Tma` (given `wgmma_fits`, which puts rows
/// and matrices on 16 bytes): at most one batch dim (a map has one stride past the rows),
/// sizes that fit the maps' 32-bit fields, and rows and matrices that do not overlap (rows
/// at least their length apart, matrices at least their rows; a shared `W` has none).
fn tma_fits<'ctx>(fb: &Fb<'_, 'ctx>, mm: &GpuMatmul<'_, 'ctx>) -> R<Option<IntValue<'ctx>>> {
    if mm.bdims.len() > 1 {
        return Ok(None);
    }
    let (mv, nv, kv) = mm.dims;
    let cmp = |p, a, b| fb.b.build_int_compare(p, a, b, "cmp").map_err(be);
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let mut ok = fb.ctx.bool_type().const_all_ones();
    for d in [mv, nv, kv, mm.nbatch] {
        ok = and(ok, cmp(IntPredicate::SLT, d, fb.i64c(i32::MAX as i64))?)?;
    }
    for (av, cols, rows, shared) in [(mm.aav, kv, mv, false), (mm.wav, nv, kv, mm.shared_w)] {
        let n = av.strides.len();
        ok = and(ok, cmp(IntPredicate::SGE, av.strides[n - 2], cols)?)?;
        if !mm.bdims.is_empty() && !shared {
            let matrix = fb.mul(av.strides[n - 2], rows)?;
            let apart = cmp(IntPredicate::SGE, av.strides[0], matrix)?;
            let one = cmp(IntPredicate::EQ, mm.nbatch, fb.i64c(1))?;
            ok = and(ok, fb.b.build_or(apart, one, "apart").map_err(be)?)?;
        }
    }
    Ok(Some(ok))
}

/// `gpu_wgmma_matmul`'s ring filled by the tensor memory accelerator (`tma`): the operands'
/// tensors (`A`: k along its rows, `m` rows, boxes of `GPU_TILE` rows; `W`: n along its
/// rows, k rows, boxes of 64 k rows; each a batch of such matrices if the matmul has a
/// batch dim and the operand is not shared), a transaction barrier per stage, and the
/// parity each stage's next phase will have (bit `s` of `phases`, the same in every thread:
/// each waits once for every slice).
struct WgTma<'ctx> {
    a: tma::TmaTensor<'ctx>,
    w: tma::TmaTensor<'ctx>,
    bars: PointerValue<'ctx>,
    phases: PointerValue<'ctx>,
    /// The ring (`stage_at` offsets are from it).
    ring: PointerValue<'ctx>,
    /// Whether this thread is the block's first, which issues every copy.
    first: IntValue<'ctx>,
}

impl<'ctx> WgTma<'ctx> {
    /// The maps made (`tma::tma_maps`), the barriers initialised, then a block barrier.
    fn new(
        fb: &Fb<'_, 'ctx>,
        mm: &GpuMatmul<'_, 'ctx>,
        ring: PointerValue<'ctx>,
        lane: IntValue<'ctx>,
        blk: IntValue<'ctx>,
    ) -> R<Self> {
        let (mv, nv, kv) = mm.dims;
        let bytes = |x| fb.mul(x, fb.i64c(2));
        let tensor = |av: &Av<'ctx>,
                      [cols, rows]: [IntValue<'ctx>; 2],
                      box_rows: i64,
                      shared: bool|
         -> R<tma::TmaTensor<'ctx>> {
            let base = unsafe {
                fb.b.build_in_bounds_gep(fb.ctx.i16_type(), av.ptr, &[av.off], "tbase")
            }
            .map_err(be)?;
            let batched = !mm.bdims.is_empty() && !shared;
            let ld = av.strides[av.strides.len() - 2];
            Ok(tma::TmaTensor {
                base,
                dims: [cols, rows, mm.nbatch],
                strides: [bytes(ld)?, bytes(av.strides[0])?],
                batched,
                box_rows,
                map: None,
            })
        };
        const _: () = assert!(WG_TILE_K * 2 == tma::TMA_BOX_ROW_BYTES && WG_TILE_N % 64 == 0);
        let mut ts = [
            tensor(mm.aav, [kv, mv], GPU_TILE, false)?,
            tensor(mm.wav, [nv, kv], WG_TILE_K, mm.shared_w)?,
        ];
        tma::tma_maps(fb, &mut ts, lane, blk)?;
        let bars = shared_array(fb, "tma_bars", fb.i64t.array_type(WG_STAGES as u32));
        let first =
            fb.b.build_int_compare(IntPredicate::EQ, lane, fb.i64c(0), "first")
                .map_err(be)?;
        let t = WgTma {
            a: ts[0],
            w: ts[1],
            bars,
            phases: fb.slot(fb.i64t.into())?,
            ring,
            first,
        };
        fb.b.build_store(t.phases, fb.i64c(0)).map_err(be)?;
        fb.if_else(
            first,
            |fb| {
                for s in 0..WG_STAGES {
                    tma::mbarrier_init(fb, t.bar(fb, fb.i64c(s))?, 1)?;
                }
                tma::mbarrier_init_fence(fb)
            },
            |_| Ok(()),
        )?;
        barrier(fb)?;
        Ok(t)
    }

    /// Stage `s`'s barrier.
    fn bar(&self, fb: &Fb<'_, 'ctx>, s: IntValue<'ctx>) -> R<PointerValue<'ctx>> {
        unsafe { fb.b.build_in_bounds_gep(fb.i64t, self.bars, &[s], "bar") }.map_err(be)
    }

    /// The stage (index) of slice `kt` (as `stage_at` places it).
    fn stage_of(&self, fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>, ahead: i64) -> R<IntValue<'ctx>> {
        fb.b.build_int_unsigned_rem(fb.add(kt, fb.i64c(ahead))?, fb.i64c(WG_STAGES), "st")
            .map_err(be)
    }

    /// Slice `kt` of the tile at `at` issued into its stage (at `stage_at(kt)`), by the
    /// calling thread (the first): its bytes announced on the stage's barrier, then the five
    /// copies.
    fn issue(
        &self,
        fb: &Fb<'_, 'ctx>,
        at: &TileAt<'ctx>,
        kt: IntValue<'ctx>,
        ahead: i64,
        stage_at: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<IntValue<'ctx>>,
    ) -> R<()> {
        let bar = self.bar(fb, self.stage_of(fb, kt, ahead)?)?;
        tma::mbarrier_arrive_expect(fb, bar, WG_STAGE_BYTES)?;
        let base = stage_at(fb, kt)?;
        let k0 = fb.mul(kt, fb.i64c(WG_TILE_K))?;
        let ring = |off: IntValue<'ctx>| -> R<PointerValue<'ctx>> {
            unsafe {
                fb.b.build_in_bounds_gep(fb.ctx.i8_type(), self.ring, &[off], "dst")
            }
            .map_err(be)
        };
        tma::tma_load(fb, ring(base)?, &self.a, [k0, at.m0, at.bi], bar)?;
        for nb in 0..WG_TILE_N / 64 {
            let dst = ring(fb.add(base, fb.i64c(WG_A_BYTES + nb * WG_B_LBO))?)?;
            let n = fb.add(at.n0, fb.i64c(64 * nb))?;
            tma::tma_load(fb, dst, &self.w, [n, k0, at.bi], bar)?;
        }
        Ok(())
    }

    /// The tile's first `ahead` slices issued (those it has), by the first thread.
    fn prologue(
        &self,
        fb: &Fb<'_, 'ctx>,
        at: &TileAt<'ctx>,
        slices: IntValue<'ctx>,
        ahead: i64,
        stage_at: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<IntValue<'ctx>>,
    ) -> R<()> {
        fb.if_else(
            self.first,
            |fb| {
                for st in 0..ahead {
                    let some =
                        fb.b.build_int_compare(IntPredicate::SLT, fb.i64c(st), slices, "some")
                            .map_err(be)?;
                    fb.if_else(
                        some,
                        |fb| self.issue(fb, at, fb.i64c(st), ahead, stage_at),
                        |_| Ok(()),
                    )?;
                }
                Ok(())
            },
            |_| Ok(()),
        )
    }

    /// The tile's k steps after its prologue: for each slice `kt`, a block barrier (every
    /// warpgroup's `wgmma`s of slice `kt - 2` are done, so its stage is free), slice
    /// `kt + ahead` issued there by the first thread, slice `kt`'s phase waited for, and
    /// `consume(kt)`.
    fn steps(
        &self,
        fb: &Fb<'_, 'ctx>,
        at: &TileAt<'ctx>,
        slices: IntValue<'ctx>,
        ahead: i64,
        stage_at: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<IntValue<'ctx>>,
        consume: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        fb.for_range(fb.i64c(0), slices, |fb, kt| {
            barrier(fb)?;
            let next = fb.add(kt, fb.i64c(ahead))?;
            let more =
                fb.b.build_int_compare(IntPredicate::SLT, next, slices, "more")
                    .map_err(be)?;
            let go = fb.b.build_and(self.first, more, "go").map_err(be)?;
            fb.if_else(
                go,
                |fb| self.issue(fb, at, next, ahead, stage_at),
                |_| Ok(()),
            )?;
            let s = self.stage_of(fb, kt, ahead)?;
            let phases =
                fb.b.build_load(fb.i64t, self.phases, "ph")
                    .map_err(be)?
                    .into_int_value();
            let parity =
                fb.b.build_and(
                    fb.b.build_right_shift(phases, s, false, "p").map_err(be)?,
                    fb.i64c(1),
                    "par",
                )
                .map_err(be)?;
            let bit = fb.b.build_left_shift(fb.i64c(1), s, "bit").map_err(be)?;
            let flipped = fb.b.build_xor(phases, bit, "ph").map_err(be)?;
            fb.b.build_store(self.phases, flipped).map_err(be)?;
            tma::mbarrier_wait(fb, self.bar(fb, s)?, parity)?;
            consume(fb, kt)
        })
    }
}

/// Elements added to each row of a tile staged in shared memory for its stores
/// (`GpuMatmul::store_staged`): eight shift each row by as many banks as a quad's pairs on
/// it cover (four for bf16, eight for f32), so a warp's stores, eight rows of them, meet
/// no bank twice more than their size requires.
const STAGED_PAD_ELEMS: i64 = 8;

/// Rows of `A` (and columns of `W`) per k-step of `gpu_tiled_matmul` times its tile: a
/// slice of each operand is `1024` floats, four a thread, whatever the tile.
const SIMT_SLICE: i64 = 1024;
/// `gpu_tiled_matmul`'s smaller tile, for matmuls of more than `GPU_GEMV_MAX_M` rows but
/// fewer than `GPU_TILED_MIN_TILES` 128 × 128 tiles (a training step's `[256 × 576]·[576 ×
/// 3072]` has 48 of 128 × 128 but 192 of 64 × 64; `gpu_gemv` would read the weights once
/// per 4 rows, 64 times).
const GPU_TILE_SMALL: i64 = 64;

/// `gpu_tiled_matmul`'s shared memory: two stages of each operand's slice, the row scales.
#[derive(Clone, Copy)]
struct TiledShared<'ctx> {
    a_s: PointerValue<'ctx>,
    w_s: PointerValue<'ctx>,
    inv_s: PointerValue<'ctx>,
}

/// Where row scales start in `TiledShared::inv_s`, after the block's partial sums.
const TILED_INV_AT: i64 = GPU_BLOCK_THREADS;
const TILED_SHARED_FLOATS: i64 = 4 * SIMT_SLICE + TILED_INV_AT + GPU_TILE;

/// `TiledShared` for a matmul kernel: static arrays, or with tensor cores (whose kernels are
/// launched with `MMA_RING_BYTES` or more of dynamic shared memory, and may hold no more
/// static arrays beside the `wgmma` ring) the start of the dynamic ring, which the tensor-core
/// paths that would use it do not run beside this one.
fn tiled_shared<'ctx>(fb: &Fb<'_, 'ctx>) -> R<TiledShared<'ctx>> {
    let base = if fb.tensor_cores && fb.heavy {
        const _: () = assert!(TILED_SHARED_FLOATS * 4 <= MMA_RING_BYTES);
        dynamic_shared(fb, MMA_RING_BYTES)
    } else {
        shared_f32(fb, "tiled", TILED_SHARED_FLOATS as u32)
    };
    let at = |floats: i64| {
        unsafe {
            fb.b.build_in_bounds_gep(fb.f32t, base, &[fb.i64c(floats)], "ts")
        }
        .map_err(be)
    };
    Ok(TiledShared {
        a_s: at(0)?,
        w_s: at(2 * SIMT_SLICE)?,
        inv_s: at(4 * SIMT_SLICE)?,
    })
}

/// The classic shared-memory SGEMM on the GPU: each 256-thread block computes `t × t` outputs
/// (`t` is `GPU_TILE` or `GPU_TILE_SMALL`; blocks stride over the tiles of every batch entry),
/// k in steps of `tk = SIMT_SLICE / t`, through two shared-memory stages: while the block
/// multiplies one slice, each thread's part of the next (four elements of `A`, four of `W`)
/// is in flight to registers, then stored to the other stage, with one barrier a step. `A`
/// slices are stored k-major (`[k][row]`), `W` slices `[k][column]`. Thread `(ty, tx)` of a
/// 16 × 16 grid accumulates the outputs at rows `4ty..4ty+4` (and `64+4ty..` for `t` = 128),
/// columns `4tx..4tx+4` (and `64+4tx..`): 16-byte shared loads, broadcast over the 16 threads
/// of a row for `A`, 256 contiguous bytes over 16 threads for `W`, feed 16 multiply-adds each
/// per k. Loads from global memory are 16 bytes wide where the operand's layout allows (`A`
/// with unit stride along k, `W` along n, 16-byte aligned, the slice inside the matrices),
/// element by element otherwise. With `norm`, `A`'s rows are first reduced to
/// `rsqrt(mean(a²)+eps)` (`row_scales`) and the outputs scaled by it; `g` scales `A`'s columns
/// as they load. With tensor cores the staged operands are rounded to bf16, as every matmul of
/// such a program computes (`operand`), the sums f32.
///
/// With `part` (split k, `Kernel::MatMul::part`; `t` is `SPLIT_K_TILE`), the blocks stride
/// over (tile, slice) pairs instead, slice `s` of `SPLIT_K` taking k-steps
/// `s·span..(s+1)·span` (`span = ⌈steps / SPLIT_K⌉`), and each writes its tile's partial
/// sums (scaled by the row's norm, which each block finds over the whole row), all `t × t`
/// of them, to `part` at tile `s·tiles + tile` (`matmul_combine` sums them and adds the
/// residual, if any).
fn gpu_tiled_matmul<'ctx>(
    fb: &Fb<'_, 'ctx>,
    mm: &GpuMatmul<'_, 'ctx>,
    t: i64,
    sh: TiledShared<'ctx>,
    part: Option<PointerValue<'ctx>>,
) -> R<()> {
    let GpuMatmul {
        optr,
        aav,
        gav,
        wav,
        norm,
        eps,
        dims: (mv, nv, kv),
        ..
    } = *mm;
    assert!(t == GPU_TILE || t == GPU_TILE_SMALL);
    assert!(part.is_none() || t == SPLIT_K_TILE);
    let (tk, stage, quads) = (SIMT_SLICE / t, SIMT_SLICE, t / 64);
    let TiledShared { a_s, w_s, inv_s } = sh;
    let inv_at = TILED_INV_AT;
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let cmp = |p, a, b| fb.b.build_int_compare(p, a, b, "cmp").map_err(be);
    let lt = |a, b| cmp(IntPredicate::SLT, a, b);
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let bits = |a: IntValue<'ctx>, m: i64| fb.b.build_and(a, c(m), "bits").map_err(be);
    let xor = |a, b| fb.b.build_xor(a, b, "xor").map_err(be);
    let (per_batch, tiles_n, grid) = mm.tiles(fb, (t, t))?;
    // (with `part`: blocks over (tile, slice) pairs, slice-major)
    let tiles = fb.mul(per_batch, mm.nbatch)?;
    let BlockGrid {
        lane,
        blk,
        nblk,
        iters,
    } = match part {
        Some(_) => block_grid(fb, fb.mul(tiles, c(SPLIT_K))?)?,
        None => grid,
    };
    let (ty, tx) = (sdiv(lane, c(16), "ty")?, srem(lane, c(16), "tx")?);
    let (r4, c4) = (fb.mul(ty, c(4))?, fb.mul(tx, c(4))?);
    let side = 4 * quads;
    let accs: Vec<PointerValue> = (0..side * side)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    // This thread's part of a slice: `A` row `lane / (tk/4)`, k `4(lane % (tk/4))..+4`;
    // `W` k row `lane / (t/4)`, columns `4(lane % (t/4))..+4`.
    let staged: Vec<PointerValue> = (0..8).map(|_| fb.slot(fb.f32t.into())).collect::<R<_>>()?;
    let (a_row, a_k) = (
        sdiv(lane, c(tk / 4), "ar")?,
        fb.mul(srem(lane, c(tk / 4), "ak")?, c(4))?,
    );
    let (w_k, w_n) = (
        sdiv(lane, c(t / 4), "wk")?,
        fb.mul(srem(lane, c(t / 4), "wn")?, c(4))?,
    );
    let ktiles = fb.ceil_div(kv, c(tk))?;
    let span = fb.ceil_div(ktiles, c(SPLIT_K))?;
    let (ra, kw) = (aav.strides.len() - 2, wav.strides.len() - 2);
    let vecs = mm.vector_rows(fb)?;
    fb.for_range(c(0), iters, |fb, it| {
        let unit = fb.add(blk, fb.mul(it, nblk)?)?;
        // The tile, its slice and the slice's k-steps `k_lo..k_lo + steps`.
        let (tile, slice, k_lo, steps) = match part {
            Some(_) => {
                let slice = sdiv(unit, tiles, "slice")?;
                let k_lo = fb.mul(slice, span)?;
                let left = fb.b.build_int_sub(ktiles, k_lo, "left").map_err(be)?;
                let steps = fb.imax(fb.imin(span, left)?, c(0))?;
                (srem(unit, tiles, "tile")?, slice, k_lo, steps)
            }
            None => (unit, c(0), c(0), ktiles),
        };
        let TileAt {
            bi,
            m0,
            n0,
            abase,
            wbase,
            rbase,
            ..
        } = mm.tile_at(fb, tile, (per_batch, tiles_n), (t, t))?;
        if norm {
            row_scales(fb, aav, abase, lane, (m0, t), (mv, kv), eps, inv_s, inv_at)?;
        }
        for a in &accs {
            fb.set(*a, fb.f32c(0.0))?;
        }
        let (a_fast, w_fast) = mm.vector_tile(fb, t, vecs, (m0, abase), (n0, wbase))?;
        // Slice `kt` into `staged`.
        let fetch = |fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>| -> R<()> {
            let k0 = fb.mul(kt, c(tk))?;
            let kfull = cmp(IntPredicate::SLE, fb.add(k0, c(tk))?, kv)?;
            let (gm, gk) = (fb.add(m0, a_row)?, fb.add(k0, a_k)?);
            fb.if_else(
                and(a_fast, kfull)?,
                |fb| {
                    let at = fb.add(abase, fb.add(fb.mul(gm, aav.strides[ra])?, gk)?)?;
                    let v = load_x4(fb, aav, at)?;
                    for (e, mut x) in v.into_iter().enumerate() {
                        if let Some(g) = gav {
                            let k = fb.add(gk, c(e as i64))?;
                            let gx =
                                fb.load_f32(g.ptr, fb.add(g.off, fb.mul(k, g.strides[0])?)?)?;
                            x = fb.fmul(x, gx)?;
                        }
                        fb.set(staged[e], x)?;
                    }
                    Ok(())
                },
                |fb| {
                    for e in 0..4 {
                        let x = mm.a_elem(fb, abase, gm, fb.add(gk, c(e))?)?;
                        fb.set(staged[e as usize], x)?;
                    }
                    Ok(())
                },
            )?;
            let (gk, gn) = (fb.add(k0, w_k)?, fb.add(n0, w_n)?);
            fb.if_else(
                and(w_fast, kfull)?,
                |fb| {
                    let at = fb.add(wbase, fb.add(fb.mul(gk, wav.strides[kw])?, gn)?)?;
                    for (e, x) in load_x4(fb, wav, at)?.into_iter().enumerate() {
                        fb.set(staged[4 + e], x)?;
                    }
                    Ok(())
                },
                |fb| {
                    for e in 0..4 {
                        let x = mm.w_elem(fb, wbase, gk, fb.add(gn, c(e))?)?;
                        fb.set(staged[4 + e as usize], x)?;
                    }
                    Ok(())
                },
            )
        };
        // `staged` into stage `buf`, rounded as the program's matmuls round their operands.
        let put = |fb: &Fb<'_, 'ctx>, buf: IntValue<'ctx>| -> R<()> {
            let base = fb.mul(buf, c(stage))?;
            let get = |e: usize| operand(fb, fb.get(staged[e])?);
            for e in 0..4 {
                let at = fb.add(base, fb.add(fb.mul(fb.add(a_k, c(e))?, c(t))?, a_row)?)?;
                fb.store_f32(a_s, at, get(e as usize)?)?;
            }
            let at = fb.add(base, fb.add(fb.mul(w_k, c(t))?, w_n)?)?;
            let w: Vec<BasicValueEnum> =
                (4..8).map(|e| get(e).map(Into::into)).collect::<R<_>>()?;
            store_vector(fb, w_s, at, &w)
        };
        let multiply = |fb: &Fb<'_, 'ctx>, buf: IntValue<'ctx>| -> R<()> {
            let base = fb.mul(buf, c(stage))?;
            for kk in 0..tk {
                let row = fb.add(base, c(kk * t))?;
                let quad = |arr, at: IntValue<'ctx>| -> R<[FloatValue<'ctx>; 4]> {
                    load_f32x4(fb, arr, fb.add(row, at)?, true)
                };
                let (mut av, mut wv) = (Vec::new(), Vec::new());
                for h in 0..quads {
                    av.extend(quad(a_s, fb.add(r4, c(64 * h))?)?);
                    wv.extend(quad(w_s, fb.add(c4, c(64 * h))?)?);
                }
                for i in 0..side as usize {
                    for j in 0..side as usize {
                        let a = accs[i * side as usize + j];
                        let fma = fb.intrinsic3("llvm.fma", av[i], wv[j], fb.get(a)?)?;
                        fb.set(a, fma)?;
                    }
                }
            }
            Ok(())
        };
        fetch(fb, k_lo)?;
        put(fb, c(0))?;
        fb.for_range(c(0), steps, |fb, j| {
            barrier(fb)?;
            let buf = bits(j, 1)?;
            let next = fb.add(j, c(1))?;
            let more = lt(next, steps)?;
            fb.if_else(more, |fb| fetch(fb, fb.add(k_lo, next)?), |_| Ok(()))?;
            multiply(fb, buf)?;
            fb.if_else(more, |fb| put(fb, xor(buf, c(1))?), |_| Ok(()))
        })?;
        // Row `i` of this thread's outputs: its row in the tile, and with a norm its scale.
        let row_of = |i: i64| -> R<(IntValue<'ctx>, Option<FloatValue<'ctx>>)> {
            let r = fb.add(r4, c(64 * (i / 4) + i % 4))?;
            let scale = if norm {
                Some(fb.load_f32(inv_s, fb.add(r, c(inv_at))?)?)
            } else {
                None
            };
            Ok((r, scale))
        };
        let scaled = |v: FloatValue<'ctx>, scale: Option<FloatValue<'ctx>>| match scale {
            Some(s) => fb.fmul(v, s),
            None => Ok(v),
        };
        if let Some(pp) = part {
            // (partial sums, bounds and all: the sum reads those inside; each scaled by its
            // row's norm, as the sum of the scaled slices is the scaled sum)
            if norm {
                // (`row_scales`' stores are seen after a barrier, and an empty slice has
                // none in its k-loop)
                barrier(fb)?;
            }
            let base = fb.mul(fb.add(fb.mul(slice, tiles)?, tile)?, c(t * t))?;
            for i in 0..side {
                let (r, scale) = row_of(i)?;
                let at = fb.add(base, fb.add(fb.mul(r, c(t))?, c4)?)?;
                for j in 0..side {
                    let a = accs[(i * side + j) as usize];
                    fb.store_f32(pp, fb.add(at, c(j))?, scaled(fb.get(a)?, scale)?)?;
                }
            }
            return barrier(fb);
        }
        for i in 0..side {
            let (r, scale) = row_of(i)?;
            let row = fb.add(m0, r)?;
            for j in 0..side {
                let col = fb.add(n0, fb.add(c4, c(64 * (j / 4) + j % 4))?)?;
                let a = accs[(i * side + j) as usize];
                fb.if_else(
                    and(lt(row, mv)?, lt(col, nv)?)?,
                    |fb| {
                        let v = scaled(fb.get(a)?, scale)?;
                        let v = mm.with_residual(fb, rbase, row, col, v)?;
                        let o = fb.add(fb.mul(fb.add(fb.mul(bi, mv)?, row)?, nv)?, col)?;
                        optr.store(fb, o, v)
                    },
                    |_| Ok(()),
                )?;
            }
        }
        // (the next tile stages into stage 0, which threads may still be reading)
        barrier(fb)
    })
}

/// Keys per block of the attention kernel: scores of a block are computed together so the
/// max, the exponentials and their sum vectorise across keys.
const ATTN_BLOCK: i64 = 64;

/// Split-KV decision, the same in `attention` and `attention_combine`: `nsplit` (see
/// `ATTN_SPLIT_UNITS`) from the query rows `units` and key count `s`.
fn attn_splits<'ctx>(
    fb: &Fb<'_, 'ctx>,
    units: IntValue<'ctx>,
    s: IntValue<'ctx>,
) -> R<IntValue<'ctx>> {
    let by_keys =
        fb.b.build_int_signed_div(s, fb.i64c(ATTN_SPLIT_MIN_KEYS), "bk")
            .map_err(be)?;
    let clamp = |v: IntValue<'ctx>, pred: IntPredicate, lim: i64| -> R<IntValue<'ctx>> {
        let c =
            fb.b.build_int_compare(pred, v, fb.i64c(lim), "c")
                .map_err(be)?;
        Ok(fb
            .b
            .build_select(c, v, fb.i64c(lim), "cl")
            .map_err(be)?
            .into_int_value())
    };
    let n = clamp(
        clamp(by_keys, IntPredicate::SGT, 1)?,
        IntPredicate::SLT,
        ATTN_SPLITS,
    )?;
    let few =
        fb.b.build_int_compare(IntPredicate::SLE, units, fb.i64c(ATTN_SPLIT_UNITS), "few")
            .map_err(be)?;
    Ok(fb
        .b
        .build_select(few, n, fb.i64c(1), "nsplit")
        .map_err(be)?
        .into_int_value())
}

/// Where query row `u` (over `[B, H, T]`) of an attention reads: its query, the first key and
/// value of its group (head `h` reads kv head `h / (H / Hkv)`), and the end of its visible
/// keys (`j <= positions[b, t]`, `j < S`).
fn attn_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    [qa, ka, va, pa]: [&Av<'ctx>; 4],
    [bv, h, tv, sv]: [IntValue<'ctx>; 4],
    rep: i64,
    u: IntValue<'ctx>,
) -> R<[IntValue<'ctx>; 4]> {
    let idx = fb.decompose(u, &[bv, h, tv])?;
    let (bi, hi, ti) = (idx[0], idx[1], idx[2]);
    let g =
        fb.b.build_int_signed_div(hi, fb.i64c(rep), "g")
            .map_err(be)?;
    let qb = fb.at(qa, &[(0, bi), (1, hi), (2, ti)])?;
    let kb = fb.at(ka, &[(0, bi), (1, g)])?;
    let vb = fb.at(va, &[(0, bi), (1, g)])?;
    let limit = fb
        .load(pa, fb.at(pa, &[(0, bi), (1, ti)])?)?
        .into_int_value();
    Ok([qb, kb, vb, fb.imin(fb.add(limit, fb.i64c(1))?, sv)?])
}

/// Flash-style attention: per (b, h, t) — and per split of the keys when `attn_splits` says
/// so — the visible keys in blocks of `ATTN_BLOCK`. For each block: scores (one dot product
/// per key), the block max, `p = exp(s - m)` and its sum, then the running output row (in
/// scratch) is rescaled by `exp(m_old - m_new)` and accumulates `Σ p·v`. Unsplit, the row is
/// divided by the sum and stored; split, `(acc, m, l)` go to `part` for the merge.
/// Scratch: `dv` floats of output row, then `ATTN_BLOCK` scores.
///
/// Unsplit, with panels (`nr > 0`) and at least `attn_tiles::min_rows` query rows, the
/// launch takes `attn_tiles::forward` instead. Returns the scratch floats a thread needs.
fn attention<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    part: u32,
    [q, k, v, pos]: [&Access; 4],
    d: &crate::kernel::AttnDims,
    scale: f64,
    nr: i64,
) -> R<usize> {
    let (qa, ka, va) = (
        fb.access(q, ElemType::F32)?,
        fb.access(k, ElemType::F32)?,
        fb.access(v, ElemType::F32)?,
    );
    let pa = fb.access(pos, ElemType::I64)?;
    let optr = OutBuf::of(fb, out)?.f32_ptr()?;
    let pptr = fb.buf(part)?;
    let (bv, tv, sv) = (fb.dim(&d.b)?, fb.dim(&d.t)?, fb.dim(&d.s)?);
    let (h, dd, dv) = (fb.i64c(d.h), fb.i64c(d.d), fb.i64c(d.dv));
    let units = fb.mul(fb.mul(bv, h)?, tv)?;
    let nsplit = attn_splits(fb, units, sv)?;
    let chunk =
        fb.b.build_int_signed_div(
            fb.add(
                sv,
                fb.b.build_int_sub(nsplit, fb.i64c(1), "n1").map_err(be)?,
            )?,
            nsplit,
            "chunk",
        )
        .map_err(be)?;
    let single =
        fb.b.build_int_compare(IntPredicate::EQ, nsplit, fb.i64c(1), "single")
            .map_err(be)?;
    let items = fb.mul(units, nsplit)?;
    let (mx, l, dot, bmax, psum) = (
        fb.slot(fb.f32t.into())?,
        fb.slot(fb.f32t.into())?,
        fb.slot(fb.f32t.into())?,
        fb.slot(fb.f32t.into())?,
        fb.slot(fb.f32t.into())?,
    );
    let acc = fb.scratch;
    let sc = unsafe {
        fb.b.build_in_bounds_gep(fb.f32t, fb.scratch, &[dv], "scores")
    }
    .map_err(be)?;
    // Rows (and splits) cost what their visible keys do: claimed guided, not split evenly.
    let by_rows = |fb: &Fb<'_, 'ctx>| {
        let guided = fb.ctx.bool_type().const_int(1, false);
        fb.claim_work(guided, items, fb.i64c(1), fb.i64c(1), |fb, [_, s, e]| {
            fb.for_range(s, e, |fb, item| {
                let u = fb.b.build_int_signed_div(item, nsplit, "u").map_err(be)?;
                let c =
                    fb.b.build_int_signed_rem(item, nsplit, "split")
                        .map_err(be)?;
                let [qb, kb, vb, end] =
                    attn_row(fb, [&qa, &ka, &va, &pa], [bv, h, tv, sv], d.h / d.hkv, u)?;
                // This split's share [lo, hi) of the visible keys.
                let min = |a, b| fb.imin(a, b);
                let lo = fb.mul(c, chunk)?;
                let hi = min(fb.add(lo, chunk)?, end)?;
                let n = fb.b.build_int_sub(hi, lo, "n").map_err(be)?;
                fb.set(mx, fb.f32c(f64::NEG_INFINITY))?;
                fb.set(l, fb.f32c(0.0))?;
                fb.for_range(fb.i64c(0), dv, |fb, c| fb.store_f32(acc, c, fb.f32c(0.0)))?;
                let nblocks =
                    fb.b.build_int_signed_div(
                        fb.add(n, fb.i64c(ATTN_BLOCK - 1))?,
                        fb.i64c(ATTN_BLOCK),
                        "nb",
                    )
                    .map_err(be)?;
                fb.for_range(fb.i64c(0), nblocks, |fb, blk| {
                    let j0 = fb.add(lo, fb.mul(blk, fb.i64c(ATTN_BLOCK))?)?;
                    let jl = min(
                        fb.b.build_int_sub(hi, j0, "rest").map_err(be)?,
                        fb.i64c(ATTN_BLOCK),
                    )?;
                    // Scores of the block, and their max.
                    fb.set(bmax, fb.f32c(f64::NEG_INFINITY))?;
                    fb.for_range(fb.i64c(0), jl, |fb, j| {
                        let kr = fb.add(kb, fb.mul(fb.add(j0, j)?, ka.strides[2])?)?;
                        fb.set(dot, fb.f32c(0.0))?;
                        fb.for_range(fb.i64c(0), dd, |fb, c| {
                            let x = fb.load_f32(qa.ptr, fb.add(qb, fb.mul(c, qa.strides[3])?)?)?;
                            let y = fb.load_f32(ka.ptr, fb.add(kr, fb.mul(c, ka.strides[3])?)?)?;
                            fb.set(dot, fb.fma_fast(fb.get(dot)?, x, y)?)
                        })?;
                        let score = fb.fmul(fb.get(dot)?, fb.f32c(scale))?;
                        fb.store_f32(sc, j, score)?;
                        fb.set(bmax, fb.intrinsic("llvm.maxnum", &[fb.get(bmax)?, score])?)
                    })?;
                    let m_old = fb.get(mx)?;
                    let m_new = fb.intrinsic("llvm.maxnum", &[m_old, fb.get(bmax)?])?;
                    let alpha = fb.exp(fb.b.build_float_sub(m_old, m_new, "d").map_err(be)?)?;
                    // p = exp(s - m_new), in place, and their sum.
                    fb.set(psum, fb.f32c(0.0))?;
                    fb.for_range(fb.i64c(0), jl, |fb, j| {
                        let z =
                            fb.b.build_float_sub(fb.load_f32(sc, j)?, m_new, "z")
                                .map_err(be)?;
                        let p = fb.exp(z)?;
                        fb.store_f32(sc, j, p)?;
                        let t = fb.fast(fb.fadd(fb.get(psum)?, p)?);
                        fb.set(psum, t)
                    })?;
                    fb.set(l, fb.fadd(fb.fmul(fb.get(l)?, alpha)?, fb.get(psum)?)?)?;
                    fb.set(mx, m_new)?;
                    fb.for_range(fb.i64c(0), dv, |fb, c| {
                        let a = fb.load_f32(acc, c)?;
                        fb.store_f32(acc, c, fb.fmul(a, alpha)?)
                    })?;
                    fb.for_range(fb.i64c(0), jl, |fb, j| {
                        let p = fb.load_f32(sc, j)?;
                        let vr = fb.add(vb, fb.mul(fb.add(j0, j)?, va.strides[2])?)?;
                        fb.for_range(fb.i64c(0), dv, |fb, c| {
                            let a = fb.load_f32(acc, c)?;
                            let y = fb.load_f32(va.ptr, fb.add(vr, fb.mul(c, va.strides[3])?)?)?;
                            fb.store_f32(acc, c, fb.fadd(a, fb.fmul(p, y)?)?)
                        })
                    })
                })?;
                fb.if_else(
                    single,
                    |fb| {
                        let obase = attn_out_row(fb, u, d)?;
                        let lv = fb.get(l)?;
                        fb.for_range(fb.i64c(0), dv, |fb, c| {
                            let a = fb.load_f32(acc, c)?;
                            fb.store_f32(
                                optr,
                                fb.add(obase, c)?,
                                fb.b.build_float_div(a, lv, "o").map_err(be)?,
                            )
                        })
                    },
                    |fb| {
                        let pbase = fb.mul(item, fb.i64c(d.dv + 2))?;
                        fb.for_range(fb.i64c(0), dv, |fb, c| {
                            fb.store_f32(pptr, fb.add(pbase, c)?, fb.load_f32(acc, c)?)
                        })?;
                        fb.store_f32(pptr, fb.add(pbase, dv)?, fb.get(mx)?)?;
                        fb.store_f32(pptr, fb.add(pbase, fb.i64c(d.dv + 1))?, fb.get(l)?)
                    },
                )
            })
        })
    };
    let mut floats = (d.dv + ATTN_BLOCK) as usize;
    if nr > 0 {
        let rows =
            fb.b.build_int_compare(
                IntPredicate::SGE,
                tv,
                fb.i64c(attn_tiles::min_rows(nr)),
                "rows",
            )
            .map_err(be)?;
        let tiled = fb.b.build_and(single, rows, "tiled").map_err(be)?;
        let mut tile_floats = 0;
        fb.if_else(
            tiled,
            |fb| {
                tile_floats = attn_tiles::forward(fb, out, [q, k, v, pos], d, scale, nr)?;
                Ok(())
            },
            |fb| by_rows(fb),
        )?;
        floats = floats.max(tile_floats);
    } else {
        by_rows(fb)?;
    }
    fb.ret_ok()?;
    Ok(floats)
}

/// Keys per step of `gpu_attention`'s loop.
const GPU_ATTN_UNROLL: i64 = 4;

/// `shfl.sync.bfly.b32` over a full warp: `x` of lane `lane ^ mask`.
fn shfl_bfly<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>, mask: u64) -> R<FloatValue<'ctx>> {
    let i32t = fb.ctx.i32_type();
    if fb.sim {
        let ty = fb.f32t.fn_type(&[fb.f32t.into(), i32t.into()], false);
        let args = [x.into(), i32t.const_int(mask, false).into()];
        let y = fb.hook(SIMT_HOOKS[1], ty, &args)?.expect("returns f32");
        return Ok(y.into_float_value());
    }
    let name = "llvm.nvvm.shfl.sync.bfly.f32";
    let f = fb.declare(name, &[])?;
    Ok(fb
        .b
        .build_call(
            f,
            &[
                i32t.const_int(0xffff_ffff, false).into(),
                x.into(),
                i32t.const_int(mask, false).into(),
                i32t.const_int(0x1f, false).into(),
            ],
            "shfl",
        )
        .map_err(be)?
        .try_as_basic_value()
        .basic()
        .expect("returns f32")
        .into_float_value())
}

/// `x` folded by `combine` over the lanes that differ from this one only in the bits of
/// `masks` (all 32 lanes for `[16, 8, 4, 2, 1]`, an `mma` quad for `[1, 2]`), in each of them.
fn warp_fold<'ctx>(
    fb: &Fb<'_, 'ctx>,
    mut x: FloatValue<'ctx>,
    masks: &[u64],
    combine: impl Fn(FloatValue<'ctx>, FloatValue<'ctx>) -> R<FloatValue<'ctx>>,
) -> R<FloatValue<'ctx>> {
    for m in masks {
        let y = shfl_bfly(fb, x, *m)?;
        x = combine(x, y)?;
    }
    Ok(x)
}

/// Butterfly masks that reach all 32 lanes of a warp.
const WARP_MASKS: [u64; 5] = [16, 8, 4, 2, 1];

/// The sum of `x` over the 32 lanes of a warp, in every lane (butterfly shuffles).
fn warp_sum<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
    warp_fold(fb, x, &WARP_MASKS, |a, b| fb.fadd(a, b))
}

/// The max of `x` over the 32 lanes of a warp, in every lane (NaN wins, as `maximum`).
fn warp_max<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
    warp_fold(fb, x, &WARP_MASKS, |a, b| {
        fb.intrinsic("llvm.maximum", &[a, b])
    })
}

/// Query rows per block of `gpu_mma_attention`: 16 per warp.
const MMA_ATTN_ROWS: i64 = 128;
/// Keys staged per step of `gpu_mma_attention`.
const MMA_ATTN_KEYS: i64 = 64;
/// Stages of `gpu_mma_attention`'s ring of keys and values: two steps' copies in flight
/// while one is multiplied (96 KiB of shared memory at head size 128, under the 99 KiB a
/// block may have on sm_86/sm_89).
const MMA_ATTN_STAGES: i64 = 3;
/// Stages of the ring when attention runs on `wgmma`, software-pipelined: one more, for the
/// step whose values the tensor cores may still read while two steps' copies are in flight
/// (129 KiB at head size 128, of sm_90's 227).
const WG_ATTN_STAGES: i64 = 4;
/// Steps of the `wgmma` ring's copies in flight: two, as on `mma.sync`, the warpgroups
/// taking steps in turn (`RingCopiers`).
const WG_ATTN_AHEAD: i64 = 2;
const _: () = assert!(WG_ATTN_STAGES >= WG_ATTN_AHEAD + 2);

/// Whether `gpu_mma_attention` copies keys and values through its `cp.async` ring (both
/// stored bf16), not through registers; it may where `mma_attn_ring_ok`.
fn mma_attn_ring(ka: &Av, va: &Av) -> bool {
    ka.elem == ElemType::BF16 && va.elem == ElemType::BF16
}

/// Whether keys and values have the rows the ring copies (`cp.async` of 8-element chunks):
/// unit stride along the head, every row on 16 bytes (offset and other strides multiples of
/// 8 elements, the buffer aligned).
fn mma_attn_ring_ok<'ctx>(fb: &Fb<'_, 'ctx>, [k, v]: [&Av<'ctx>; 2]) -> R<IntValue<'ctx>> {
    fb.b.build_and(rows_on(fb, k, 8, true)?, rows_on(fb, v, 8, true)?, "ring")
        .map_err(be)
}

/// Whether a `[B, H, N, D]` operand's rows start on 16 bytes, in steps of `elems` elements:
/// unit stride along `D`, the other strides (and with `offset_too` the view's offset)
/// multiples of `elems`, the buffer aligned.
fn rows_on<'ctx>(
    fb: &Fb<'_, 'ctx>,
    av: &Av<'ctx>,
    elems: i64,
    offset_too: bool,
) -> R<IntValue<'ctx>> {
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let mut ok =
        fb.b.build_int_compare(IntPredicate::EQ, av.strides[3], fb.i64c(1), "unit")
            .map_err(be)?;
    ok = and(ok, fb.ptr_aligned(av.ptr, 16)?)?;
    let off = offset_too.then_some(&av.off);
    for s in av.strides[..3].iter().chain(off) {
        ok = and(ok, fb.multiple_of(*s, elems)?)?;
    }
    Ok(ok)
}

/// Thread `lane`'s first 16-byte chunk of a staged `[rows][n]` bf16 tile (`n` a power of two,
/// 16 to 128) copied by `threads` threads (`lane` below that): row `r0`, element `e`; its
/// next chunks are `rows` rows on (the threads cover `rows` rows a pass).
fn chunks_of<'ctx>(
    fb: &Fb<'_, 'ctx>,
    (lane, threads): (IntValue<'ctx>, i64),
    n: i64,
) -> R<(IntValue<'ctx>, IntValue<'ctx>, i64)> {
    let per_row = n / 8;
    let r0 =
        fb.b.build_int_signed_div(lane, fb.i64c(per_row), "r0")
            .map_err(be)?;
    let e = fb.mul(
        fb.b.build_int_signed_rem(lane, fb.i64c(per_row), "e")
            .map_err(be)?,
        fb.i64c(8),
    )?;
    Ok((r0, e, threads / per_row))
}

/// Bytes of one stage of `gpu_mma_attention`'s ring: `MMA_ATTN_KEYS` keys and as many
/// values, bf16.
fn mma_attn_stage_bytes(d: &crate::kernel::AttnDims) -> i64 {
    MMA_ATTN_KEYS * (d.d + d.dv) * 2
}

/// Whether `gpu_mma_attention`'s products may run on `wgmma` (with `wgmma`, and keys and
/// values through the ring): head sizes whole 128-byte rows of the swizzled layouts.
fn wg_attention_heads(d: &crate::kernel::AttnDims) -> bool {
    d.d % 64 == 0 && d.dv % 64 == 0
}

/// Dynamic shared memory of `gpu_mma_attention`: its ring, and where it may run on `wgmma`
/// its `WG_ATTN_STAGES` and 1024 bytes more, to start on a 1024-byte boundary (a swizzle
/// atom).
fn mma_attn_shared_bytes(d: &crate::kernel::AttnDims, wgmma: bool) -> i64 {
    if wgmma && wg_attention_heads(d) {
        WG_ATTN_STAGES * mma_attn_stage_bytes(d) + 1024
    } else {
        MMA_ATTN_STAGES * mma_attn_stage_bytes(d)
    }
}

/// Word offset, in a `wgmma` stage of `[rows][n]` bf16 (`n` a multiple of 64), of element
/// `(r, e)` (`e` a multiple of 8): the 128-byte-swizzled layout of `WgB`, the same for keys
/// (k-major) and values (n-major): 64-element column blocks `rows·128` bytes apart, a row's
/// 128 bytes at `128r`, chunk `(e%64)/8` stored at chunk `((e%64)/8) ^ (r%8)`.
fn wg_stage_word<'ctx>(
    fb: &Fb<'_, 'ctx>,
    r: IntValue<'ctx>,
    e: IntValue<'ctx>,
    rows: i64,
) -> R<IntValue<'ctx>> {
    let c = |v: i64| fb.i64c(v);
    let blk = fb.b.build_right_shift(e, c(6), false, "eb").map_err(be)?;
    let chunk =
        fb.b.build_and(
            fb.b.build_right_shift(e, c(3), false, "ec").map_err(be)?,
            c(7),
            "c7",
        )
        .map_err(be)?;
    let sw =
        fb.b.build_xor(chunk, fb.b.build_and(r, c(7), "r7").map_err(be)?, "sw")
            .map_err(be)?;
    fb.add(
        fb.add(fb.mul(blk, c(rows * 32))?, fb.mul(r, c(32))?)?,
        fb.mul(sw, c(4))?,
    )
}
/// Prompts of at least this many query rows take `gpu_mma_attention`; fewer (decode) keep
/// the warp-per-row kernel, which wastes no rows of a 16-row fragment.
const MMA_ATTN_MIN_T: i64 = 64;
/// Head sizes `gpu_mma_attention` handles (query/key and value): whole `m16n8k16` steps, and
/// staged rows of a power of two of 16-byte chunks, 32 KiB of keys and values at most.
const MMA_ATTN_HEADS: [i64; 4] = [16, 32, 64, 128];

/// Whether attention of these sizes runs on tensor cores (with `tensor_cores`).
fn mma_attention_fits(d: &crate::kernel::AttnDims) -> bool {
    MMA_ATTN_HEADS.contains(&d.d) && MMA_ATTN_HEADS.contains(&d.dv)
}

/// Word offset in a staged `[rows][n]` bf16 tile (`n` a power of two, at least 16) of
/// element `(r, e)` (`e` even). A row is `n/8` 16-byte chunks; the 128 bytes of the banks
/// hold `per = max(1, 8/(n/8))` rows, and chunk `e/8` is XORed with `(r / per) % min(8,
/// n/8)`, so the eight rows an `ldmatrix` phase reads at one chunk fall in eight different
/// 16-byte bank groups. Rows `8·per` apart share a permutation: their words differ by a
/// constant.
fn swizzled_word<'ctx>(
    fb: &Fb<'_, 'ctx>,
    r: IntValue<'ctx>,
    e: IntValue<'ctx>,
    n: i64,
) -> R<IntValue<'ctx>> {
    let c = |v: i64| fb.i64c(v);
    let chunks = n / 8;
    let per = (8 / chunks).max(1);
    let line =
        fb.b.build_right_shift(r, c(per.trailing_zeros() as i64), false, "ln")
            .map_err(be)?;
    let chunk =
        fb.b.build_xor(
            fb.b.build_right_shift(e, c(3), false, "ch").map_err(be)?,
            fb.b.build_and(line, c(chunks.min(8) - 1), "rm")
                .map_err(be)?,
            "sw",
        )
        .map_err(be)?;
    let within =
        fb.b.build_right_shift(fb.b.build_and(e, c(7), "e7").map_err(be)?, c(1), false, "w")
            .map_err(be)?;
    fb.add(fb.add(fb.mul(r, c(n / 2))?, fb.mul(chunk, c(4))?)?, within)
}

/// Where attention output row `u` (`(b·H + h)·T + t`) starts in `out`: `u·Dv`, or tokens
/// first (`AttnDims::tokens_first`) `((b·T + t)·H + h)·Dv`.
fn attn_out_row<'ctx>(
    fb: &Fb<'_, 'ctx>,
    u: IntValue<'ctx>,
    d: &crate::kernel::AttnDims,
) -> R<IntValue<'ctx>> {
    if !d.tokens_first {
        return fb.mul(u, fb.i64c(d.dv));
    }
    let tv = fb.dim(&d.t)?;
    let t = fb.b.build_int_signed_rem(u, tv, "t").map_err(be)?;
    let bh = fb.b.build_int_signed_div(u, tv, "bh").map_err(be)?;
    let h =
        fb.b.build_int_signed_rem(bh, fb.i64c(d.h), "h")
            .map_err(be)?;
    let b =
        fb.b.build_int_signed_div(bh, fb.i64c(d.h), "b")
            .map_err(be)?;
    let row = fb.add(fb.mul(fb.add(fb.mul(b, tv)?, t)?, fb.i64c(d.h))?, h)?;
    fb.mul(row, fb.i64c(d.dv))
}

/// The max of `x` (an index) over the warp and over the block, in every thread: a warp max,
/// then each warp's through `scratch` (8 floats of shared memory, which the block's threads
/// must not be reading) and one barrier. (Indices are exact as floats below 2^24.)
fn block_max<'ctx>(
    fb: &Fb<'_, 'ctx>,
    scratch: PointerValue<'ctx>,
    x: IntValue<'ctx>,
    [warp, wl]: [IntValue<'ctx>; 2],
) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
    let x =
        fb.b.build_signed_int_to_float(x, fb.f32t, "xf")
            .map_err(be)?;
    let wmax = warp_max(fb, x)?;
    let first =
        fb.b.build_int_compare(IntPredicate::EQ, wl, fb.i64c(0), "first")
            .map_err(be)?;
    fb.if_else(first, |fb| fb.store_f32(scratch, warp, wmax), |_| Ok(()))?;
    barrier(fb)?;
    let mut bmax = fb.load_f32(scratch, fb.i64c(0))?;
    for w in 1..GPU_BLOCK_THREADS / 32 {
        bmax = fb.intrinsic("llvm.maxnum", &[bmax, fb.load_f32(scratch, fb.i64c(w))?])?;
    }
    let int = |v: FloatValue<'ctx>| fb.b.build_float_to_signed_int(v, fb.i64t, "mi").map_err(be);
    Ok((int(wmax)?, int(bmax)?))
}

/// `2^x` on the GPU in one `ex2.approx.ftz.f32` (about 2 ulp, where the straight-line `exp`
/// takes 35 instructions; `llvm.exp2`'s `ex2.approx.f32` would keep subnormal results with
/// two fix-up instructions, and probabilities lose nothing that counts next to a row's
/// largest, 1). The simulator's is the C library's `exp2f`.
fn fast_exp2<'ctx>(fb: &Fb<'_, 'ctx>, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
    if fb.sim {
        fb.intrinsic("llvm.exp2", &[x])
    } else {
        fb.intrinsic("llvm.nvvm.ex2.approx.ftz", &[x])
    }
}

/// One step of the online softmax of a thread's two rows (`g`, `g + 8`) over the scores
/// `s` (log2 domain, `MMA_ATTN_KEYS / 8` accumulator tiles of four, `−∞` where not
/// visible): each row's running max `m` over the quad that holds it moves to `m'`, its
/// partial sum `l` (this lane's part) becomes `l·2^(m − m') + Σ 2^(s − m')`, and `s` holds
/// the probabilities `2^(s − m')`. Returns each row's factor `2^(m − m')`.
fn online_softmax<'ctx>(
    fb: &Fb<'_, 'ctx>,
    s: &[PointerValue<'ctx>],
    m: [PointerValue<'ctx>; 2],
    l: [PointerValue<'ctx>; 2],
) -> R<[FloatValue<'ctx>; 2]> {
    let ninf = fb.f32c(f64::NEG_INFINITY);
    let mut corr = [ninf; 2];
    for rr in 0..2usize {
        let mut m_loc = ninf;
        for nt in 0..MMA_ATTN_KEYS / 8 {
            for x in [2 * rr, 2 * rr + 1] {
                let v = fb.get(s[(nt * 4) as usize + x])?;
                m_loc = fb.intrinsic("llvm.maxnum", &[m_loc, v])?;
            }
        }
        let m_loc = warp_fold(fb, m_loc, &[1, 2], |a, b| {
            fb.intrinsic("llvm.maxnum", &[a, b])
        })?;
        let m_old = fb.get(m[rr])?;
        let m_new = fb.intrinsic("llvm.maxnum", &[m_old, m_loc])?;
        // (no visible key yet: subtract 0, so that 2^(−∞) gives 0, not NaN)
        let none = fb.fcmp(FloatPredicate::OEQ, m_new, ninf)?;
        let base = fb.fsel(none, fb.f32c(0.0), m_new)?;
        let cr = fast_exp2(fb, fb.b.build_float_sub(m_old, base, "d").map_err(be)?)?;
        let mut lsum = fb.fmul(fb.get(l[rr])?, cr)?;
        for nt in 0..MMA_ATTN_KEYS / 8 {
            for x in [2 * rr, 2 * rr + 1] {
                let slot = s[(nt * 4) as usize + x];
                let z = fb.b.build_float_sub(fb.get(slot)?, base, "z").map_err(be)?;
                let p = fast_exp2(fb, z)?;
                fb.set(slot, p)?;
                lsum = fb.fadd(lsum, p)?;
            }
        }
        fb.set(l[rr], lsum)?;
        fb.set(m[rr], m_new)?;
        corr[rr] = cr;
    }
    Ok(corr)
}

/// Word `at` of shared memory `arr` (i32 words) as a pointer.
fn smem_word<'ctx>(
    fb: &Fb<'_, 'ctx>,
    arr: PointerValue<'ctx>,
    at: IntValue<'ctx>,
) -> R<PointerValue<'ctx>> {
    unsafe {
        fb.b.build_in_bounds_gep(fb.ctx.i32_type(), arr, &[at], "wp")
    }
    .map_err(be)
}

/// This lane's `ldmatrix` row words in a staged `[MMA_ATTN_KEYS][n]` bf16 tile
/// (`swizzled_word`), read as `mma`'s `B` along `n` (`trans` false: tile row `16pp + m8 +
/// 8·mhalf`, elements `16ks + 8·m_odd`, for `S = A·tileᵀ`) or along the tile's rows (`trans`:
/// row `16kk + m8 + 8·m_odd`, elements `16jj + 8·mhalf`, for `O = P·tile`), where lane `wl`
/// serves row `m8 = wl % 8` of matrix `wl / 8` (`mhalf = wl / 16`, `m_odd = (wl / 8) % 2`).
/// Rows 16 apart and elements 64 apart keep their chunk permutation, so the words for steps
/// 0..4 serve them all, plus a constant (`tile_word`): four registers a tile, not one a
/// fragment.
fn tile_lane_words<'ctx>(
    fb: &Fb<'_, 'ctx>,
    wl: IntValue<'ctx>,
    n: i64,
    trans: bool,
) -> R<Vec<IntValue<'ctx>>> {
    let c = |v: i64| fb.i64c(v);
    let m8 = fb.b.build_int_signed_rem(wl, c(8), "m8").map_err(be)?;
    let mhalf = fb.b.build_int_signed_div(wl, c(16), "mh").map_err(be)?;
    let m_odd =
        fb.b.build_int_signed_rem(
            fb.b.build_int_signed_div(wl, c(8), "mq").map_err(be)?,
            c(2),
            "mo",
        )
        .map_err(be)?;
    let (row8, half) = if trans {
        (m_odd, mhalf)
    } else {
        (mhalf, m_odd)
    };
    let row = fb.add(m8, fb.mul(row8, c(8))?)?;
    (0..(n / 16).min(4))
        .map(|j| swizzled_word(fb, row, fb.add(c(16 * j), fb.mul(half, c(8))?)?, n))
        .collect()
}

/// The constant a fragment's `ldmatrix` word adds to its lane word (`tile_lane_words`):
/// 16-row group `rows16`, 16-element step `step` of a tile `n` wide.
fn tile_word(rows16: i64, step: i64, n: i64) -> i64 {
    16 * rows16 * n / 2 + (step / 4) * 32
}

/// A product with the staged `[MMA_ATTN_KEYS][n]` tile at word `base` of `smem` into `acc`:
/// `acc += A·tileᵀ` (`trans` false: `a(ks)` the left fragment of k step `ks`, 16 of the
/// `n`; `acc` the `MMA_ATTN_KEYS / 8` accumulator tiles of four) or `acc += P·tile`
/// (`trans`: `a(kk)` that of k step `kk`, 16 of the tile's rows; `acc` the `n / 8` tiles).
/// `words`: `tile_lane_words(.., n, trans)`.
#[allow(clippy::too_many_arguments)]
fn mma_tile<'ctx>(
    fb: &Fb<'_, 'ctx>,
    smem: PointerValue<'ctx>,
    base: IntValue<'ctx>,
    words: &[IntValue<'ctx>],
    n: i64,
    trans: bool,
    a: &dyn Fn(i64) -> R<[IntValue<'ctx>; 4]>,
    acc: &[PointerValue<'ctx>],
) -> R<()> {
    // (pointers, each fragment's a constant offset from one: `ldmatrix [p + imm]`)
    let at: Vec<PointerValue> = words
        .iter()
        .map(|w| smem_word(fb, smem, fb.add(base, *w)?))
        .collect::<R<_>>()?;
    let (outer, inner) = if trans {
        (MMA_ATTN_KEYS / 16, n / 16)
    } else {
        (n / 16, MMA_ATTN_KEYS / 16)
    };
    for o in 0..outer {
        let a = a(o)?;
        for i in 0..inner {
            // (16-row group and 16-element step of the tile)
            let (rows16, step) = if trans { (o, i) } else { (i, o) };
            let p = smem_word(
                fb,
                at[(step % 4) as usize],
                fb.i64c(tile_word(rows16, step, n)),
            )?;
            let nt = (8 * i) as usize;
            mma_x4_pair(fb, p, trans, a, &acc[nt..nt + 8])?;
        }
    }
    Ok(())
}

/// The left fragment of a product's k step `kk` from accumulators `s` (`MMA_ATTN_KEYS / 8`
/// tiles of four, as `mma` leaves them): those of tiles `2kk`, `2kk + 1`, packed to bf16
/// (an accumulator tile's layout is half an `A` fragment's).
fn acc_frag<'ctx>(fb: &Fb<'_, 'ctx>, s: &[PointerValue<'ctx>], kk: i64) -> R<[IntValue<'ctx>; 4]> {
    let pv = |nt: i64, x: usize| fb.get(s[(nt * 4) as usize + x]);
    Ok([
        pack_bf16x2(fb, pv(2 * kk, 0)?, pv(2 * kk, 1)?)?,
        pack_bf16x2(fb, pv(2 * kk, 2)?, pv(2 * kk, 3)?)?,
        pack_bf16x2(fb, pv(2 * kk + 1, 0)?, pv(2 * kk + 1, 1)?)?,
        pack_bf16x2(fb, pv(2 * kk + 1, 2)?, pv(2 * kk + 1, 3)?)?,
    ])
}

/// Rows `s0..s0 + MMA_ATTN_KEYS` of `src` (`n` elements a row from word `base`, `len` rows
/// in all: those past it read as 0), the block's thread `lane`'s part: four elements a pass,
/// every pass's loads issued before any is used (one wait for them all). `vec`: the rows
/// have unit stride along `n` and 16-byte alignment, so whole tiles load four at a time.
/// `stage_put` then stores them.
#[allow(clippy::too_many_arguments)]
fn stage_fetch<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lane: IntValue<'ctx>,
    src: &Av<'ctx>,
    base: IntValue<'ctx>,
    vec: IntValue<'ctx>,
    n: i64,
    s0: IntValue<'ctx>,
    len: IntValue<'ctx>,
) -> R<Vec<PointerValue<'ctx>>> {
    let c = |v: i64| fb.i64c(v);
    let passes = MMA_ATTN_KEYS * n / 4 / GPU_BLOCK_THREADS;
    let vals: Vec<PointerValue> = (0..4 * passes)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    // (`base` holds the view's offset: it must keep the rows 16-byte aligned too)
    let aligned = fb.multiple_of(base, 4)?;
    let inside =
        fb.b.build_int_compare(IntPredicate::SLE, fb.add(s0, c(MMA_ATTN_KEYS))?, len, "in")
            .map_err(be)?;
    let fast =
        fb.b.build_and(
            fb.b.build_and(vec, aligned, "va").map_err(be)?,
            inside,
            "fast",
        )
        .map_err(be)?;
    let place = |fb: &Fb<'_, 'ctx>, p: i64| -> R<[IntValue<'ctx>; 3]> {
        let (r, e) = stage_part(fb, lane, p, n)?;
        let s = fb.add(s0, r)?;
        Ok([s, fb.add(base, fb.mul(s, src.strides[2])?)?, e])
    };
    fb.if_else(
        fast,
        |fb| {
            for p in 0..passes {
                let [_, row, e] = place(fb, p)?;
                let v = load_x4(fb, src, fb.add(row, e)?)?;
                for (j, x) in v.into_iter().enumerate() {
                    fb.set(vals[(4 * p) as usize + j], x)?;
                }
            }
            Ok(())
        },
        |fb| {
            for p in 0..passes {
                let [s, row, e] = place(fb, p)?;
                let seen =
                    fb.b.build_int_compare(IntPredicate::SLT, s, len, "seen")
                        .map_err(be)?;
                for j in 0..4 {
                    let slot = vals[(4 * p + j) as usize];
                    fb.set(slot, fb.f32c(0.0))?;
                    fb.if_else(
                        seen,
                        |fb| {
                            let col = fb.add(e, c(j))?;
                            let at = fb.add(row, fb.mul(col, src.strides[3])?)?;
                            fb.set(slot, fb.load_float(src, at)?)
                        },
                        |_| Ok(()),
                    )?;
                }
            }
            Ok(())
        },
    )?;
    Ok(vals)
}

/// Thread `lane`'s pass `p` over a staged tile of `n` per row: row `r`, elements `e..e+4`.
fn stage_part<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lane: IntValue<'ctx>,
    p: i64,
    n: i64,
) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
    let i = fb.add(lane, fb.i64c(p * GPU_BLOCK_THREADS))?;
    Ok((
        fb.b.build_int_signed_div(i, fb.i64c(n / 4), "r")
            .map_err(be)?,
        fb.mul(
            fb.b.build_int_signed_rem(i, fb.i64c(n / 4), "e")
                .map_err(be)?,
            fb.i64c(4),
        )?,
    ))
}

/// `stage_fetch`'s values rounded to bf16 into the `[MMA_ATTN_KEYS][n]` tile at word `dst`
/// of `smem` (`swizzled_word`).
fn stage_put<'ctx>(
    fb: &Fb<'_, 'ctx>,
    lane: IntValue<'ctx>,
    smem: PointerValue<'ctx>,
    vals: &[PointerValue<'ctx>],
    dst: IntValue<'ctx>,
    n: i64,
) -> R<()> {
    for (p, v) in vals.chunks(4).enumerate() {
        let (r, e) = stage_part(fb, lane, p as i64, n)?;
        let lo = pack_bf16x2(fb, fb.get(v[0])?, fb.get(v[1])?)?;
        let hi = pack_bf16x2(fb, fb.get(v[2])?, fb.get(v[3])?)?;
        store_vector(
            fb,
            smem,
            fb.add(dst, swizzled_word(fb, r, e, n)?)?,
            &[lo.into(), hi.into()],
        )?;
    }
    Ok(())
}

/// Whether a staged operand's rows may load four elements at a time (`stage_fetch`): unit
/// stride along the head, other strides multiples of 4, the buffer on 16 bytes.
fn stage_vec_ok<'ctx>(fb: &Fb<'_, 'ctx>, av: &Av<'ctx>) -> R<IntValue<'ctx>> {
    // (the offset: `stage_fetch` checks each tile's base)
    rows_on(fb, av, 4, false)
}

/// Causal attention on tensor cores, flash-style (bf16 operands, f32 softmax and sums): a
/// 256-thread block takes 128 query rows of one `(b, h)`, warp `w` rows `16w..16w+16`, whose
/// query fragments (pre-scaled, rounded to bf16) stay in registers. Keys and values go
/// through shared memory `MMA_ATTN_KEYS` at a time, rounded to bf16 and row-chunk-permuted
/// (`swizzled_word`); up to the last key any of the block's rows sees. Per step, each warp:
/// `S = Q·Kᵀ` with `mma.sync.m16n8k16` (key fragments by `ldmatrix`), masks keys past each
/// row's end (`j <= positions[b, t]`, `j < S`), updates the rows' running max (over the
/// four lanes that share a row) and rescales its output accumulators and partial sums, then
/// `O += P·V` with the probabilities taken straight from the score accumulators as the
/// left operand (their layouts coincide) and value fragments by `ldmatrix.trans`. Each row
/// ends divided by its sum.
///
/// Keys and values stored bf16 with rows on 16 bytes go through a ring of
/// `MMA_ATTN_STAGES` stages in dynamic shared memory, copied by `cp.async` two steps ahead
/// of the one multiplied (`ring_pipeline`: one barrier a step); others are loaded into
/// registers, rounded and stored, between two barriers a step. Blocks take the last query
/// tiles (the most keys) first, so the short ones fill the end of the launch.
///
/// On sm_90a, with the ring and head sizes multiples of 64 (`wg_attention_heads`), both
/// products run on `wgmma` (`wgmma_m64`, `A` in registers): warpgroup `w/4` holds rows
/// `64(w/4)..` of the tile, whose per-warp register layouts are `mma.sync`'s, so the query
/// fragments are `QKᵀ`'s left operand, the probabilities `PV`'s and the softmax between is
/// the same code. The stages are then in `wg_stage_word`'s swizzled layout, from a 1024-byte
/// boundary; keys are read k-major, values n-major; a step's softmax runs while the tensor
/// cores do the last step's `PV` (the pipeline is described at `ring`).
#[allow(clippy::too_many_arguments)]
fn gpu_mma_attention<'ctx>(
    fb: &Fb<'_, 'ctx>,
    optr: OutBuf<'ctx>,
    [qa, ka, va, pa]: [&Av<'ctx>; 4],
    d: &crate::kernel::AttnDims,
    scale: f64,
    [bv, tv, sv]: [IntValue<'ctx>; 3],
) -> R<()> {
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let cmp = |p, a, b| fb.b.build_int_compare(p, a, b, "cmp").map_err(be);
    let lt = |a, b| cmp(IntPredicate::SLT, a, b);
    let and = |a, b| fb.b.build_and(a, b, "and").map_err(be);
    let i32t = fb.ctx.i32_type();
    let (dq, dv, keys) = (d.d, d.dv, MMA_ATTN_KEYS);
    // (bf16 keys and values: the ring; the caller has checked their rows, `mma_attn_ring_ok`)
    let ring_path = mma_attn_ring(ka, va);
    // On sm_90a, with the ring, both products on `wgmma` (`wg_attention_heads`).
    let wg = fb.wgmma && ring_path && wg_attention_heads(d);
    // The ring: stage `i` holds keys at word `kv0 + i·stage_words`, values `k_words` after
    // them; `kv0` is 0, or with `wg` the words to the first 1024-byte boundary.
    let kv_s = dynamic_shared(fb, mma_attn_shared_bytes(d, fb.wgmma));
    let (k_words, stage_words) = (keys * dq / 2, keys * (dq + dv) / 2);
    let stages = if wg { WG_ATTN_STAGES } else { MMA_ATTN_STAGES };
    let kv0 = if wg {
        sdiv(to_swizzle_atom(fb, kv_s)?, c(4), "kv0")?
    } else {
        c(0)
    };
    let ends_s = shared_f32(fb, "ends", 8);
    let ttiles = fb.ceil_div(tv, c(MMA_ATTN_ROWS))?;
    let units = fb.mul(fb.mul(bv, c(d.h))?, ttiles)?;
    let BlockGrid {
        lane,
        blk,
        nblk,
        iters,
    } = block_grid(fb, units)?;
    let warp = sdiv(lane, c(32), "warp")?;
    let wl = srem(lane, c(32), "wl")?;
    let (g, q) = (sdiv(wl, c(4), "g")?, srem(wl, c(4), "q")?);
    let q2 =
        fb.b.build_int_truncate(fb.mul(q, c(2))?, i32t, "q2")
            .map_err(be)?;
    let islot = || fb.slot(i32t.into());
    let fslot = || fb.slot(fb.f32t.into());
    let qfr: Vec<PointerValue> = (0..dq / 16 * 4).map(|_| islot()).collect::<R<_>>()?;
    let sacc: Vec<PointerValue> = (0..keys / 8 * 4).map(|_| fslot()).collect::<R<_>>()?;
    // (on `wgmma`, the last step's probabilities, packed, and its rows' rescale factors,
    // kept for the next step: `ring`)
    let (pfr, corr_s): (Vec<PointerValue>, Vec<PointerValue>) = if wg {
        (
            (0..keys / 16 * 4).map(|_| islot()).collect::<R<_>>()?,
            vec![fslot()?, fslot()?],
        )
    } else {
        (vec![], vec![])
    };
    let oacc: Vec<PointerValue> = (0..dv / 8 * 4).map(|_| fslot()).collect::<R<_>>()?;
    // Per row of the lane (g, g+8): running max, partial sum, end of visible keys.
    let (mrow, lrow) = ([fslot()?, fslot()?], [fslot()?, fslot()?]);
    let ends = [fb.slot(fb.i64t.into())?, fb.slot(fb.i64t.into())?];
    let geti = |p: PointerValue<'ctx>, ty: inkwell::types::IntType<'ctx>| -> R<IntValue<'ctx>> {
        Ok(fb.b.build_load(ty, p, "iv").map_err(be)?.into_int_value())
    };
    let seti = |p: PointerValue<'ctx>, v: IntValue<'ctx>| -> R<()> {
        fb.b.build_store(p, v).map_err(be)?;
        Ok(())
    };
    let rep = d.h / d.hkv;
    // (Scores are in the log2 domain: the query is scaled by `scale·log2(e)`, so `e^(s−m)` is
    // `2^(s'−m')`, `fast_exp2`, in `online_softmax`.)
    let k_ld = tile_lane_words(fb, wl, dq, false)?;
    let v_ld = tile_lane_words(fb, wl, dv, true)?;
    let (k_vec, v_vec) = (stage_vec_ok(fb, ka)?, stage_vec_ok(fb, va)?);
    let t128 = srem(lane, c(128), "t128")?;
    fb.for_range(c(0), iters, |fb, it| {
        // The longest units first (the last query tiles, which see the most keys), so that
        // the short ones fill the end of the launch.
        let unit = fb.add(blk, fb.mul(it, nblk)?)?;
        let idx = fb.decompose(unit, &[ttiles, bv, c(d.h)])?;
        let tt =
            fb.b.build_int_sub(
                fb.b.build_int_sub(ttiles, c(1), "t1").map_err(be)?,
                idx[0],
                "tt",
            )
            .map_err(be)?;
        let (bi, hi) = (idx[1], idx[2]);
        let gh = sdiv(hi, c(rep), "gh")?;
        let t0 = fb.mul(tt, c(MMA_ATTN_ROWS))?;
        let kb = fb.at(ka, &[(0, bi), (1, gh)])?;
        let vb = fb.at(va, &[(0, bi), (1, gh)])?;
        let row_end = |t: IntValue<'ctx>| -> R<IntValue<'ctx>> {
            let e = fb.slot(fb.i64t.into())?;
            seti(e, c(0))?;
            fb.if_else(
                lt(t, tv)?,
                |fb| {
                    let p = fb
                        .load(pa, fb.at(pa, &[(0, bi), (1, t)])?)?
                        .into_int_value();
                    seti(e, fb.imin(fb.add(p, c(1))?, sv)?)
                },
                |_| Ok(()),
            )?;
            geti(e, fb.i64t)
        };
        // The block's last visible key: over rows `lane % 128`.
        let mine = row_end(fb.add(t0, srem(lane, c(MMA_ATTN_ROWS), "lr")?)?)?;
        let (_, kend) = block_max(fb, ends_s, mine, [warp, wl])?;
        // This lane's rows, their ends and query fragments.
        let r0 = fb.add(t0, fb.add(fb.mul(warp, c(16))?, g)?)?;
        let rows = [r0, fb.add(r0, c(8))?];
        for (x, r) in rows.iter().enumerate() {
            seti(ends[x], row_end(*r)?)?;
            fb.set(mrow[x], fb.f32c(f64::NEG_INFINITY))?;
            fb.set(lrow[x], fb.f32c(0.0))?;
        }
        let qelem = |r: IntValue<'ctx>, e: i64| -> R<FloatValue<'ctx>> {
            let out = fb.slot(fb.f32t.into())?;
            fb.set(out, fb.f32c(0.0))?;
            fb.if_else(
                lt(r, tv)?,
                |fb| {
                    let at = fb.at(qa, &[(0, bi), (1, hi), (2, r)])?;
                    let col = fb.add(fb.mul(q, c(2))?, c(e))?;
                    let x = fb.load_float(qa, fb.add(at, fb.mul(col, qa.strides[3])?)?)?;
                    fb.set(out, fb.fmul(x, fb.f32c(scale * std::f64::consts::LOG2_E))?)
                },
                |_| Ok(()),
            )?;
            fb.get(out)
        };
        for ks in 0..dq / 16 {
            // a0: row g, k 2q; a1: row g+8; a2: row g, k 2q+8; a3: row g+8, k 2q+8.
            for (x, (rr, kofs)) in [(0, 0), (1, 0), (0, 8), (1, 8)].into_iter().enumerate() {
                let e = 16 * ks + kofs;
                let lo = qelem(rows[rr], e)?;
                let hi = qelem(rows[rr], e + 1)?;
                seti(qfr[(ks * 4) as usize + x], pack_bf16x2(fb, lo, hi)?)?;
            }
        }
        for o in &oacc {
            fb.set(*o, fb.f32c(0.0))?;
        }
        let steps = fb.ceil_div(kend, c(keys))?;
        // `wgmma`'s operand at byte `off` of the keys (`values`: the values) at word `word`
        // and its descriptor: keys k-major (key rows of the 64-element block `16ks/64`, 32
        // bytes a k step into them), values n-major (16 key rows a k step, 64-column blocks
        // `keys·128` bytes apart).
        let wg_b = |fb: &Fb<'_, 'ctx>, word: IntValue<'ctx>, off: i64, values: bool| {
            let p = smem_word(fb, kv_s, fb.add(word, c(off / 4))?)?;
            let (lbo, n_major) = if values {
                (keys * 128, true)
            } else {
                (WG_A_LBO, false)
            };
            R::Ok(WgB {
                at: p,
                desc: wgmma_desc(fb, p, lbo, WG_A_SBO)?,
                lbo,
                sbo: WG_A_SBO,
                n_major,
            })
        };
        let q_frag = |ks: i64| -> R<[IntValue<'ctx>; 4]> {
            let a = [0, 1, 2, 3].map(|x| qfr[(ks * 4) as usize + x]);
            Ok([
                geti(a[0], i32t)?,
                geti(a[1], i32t)?,
                geti(a[2], i32t)?,
                geti(a[3], i32t)?,
            ])
        };
        // S = Q·Kᵀ into `s` from the keys at word `base`. On `wgmma` (the query fragments are
        // its `A` as they are `mma`'s): issued and committed, not waited for.
        let scores = |fb: &Fb<'_, 'ctx>, base: IntValue<'ctx>, s: &[PointerValue<'ctx>]| {
            for a in s {
                fb.set(*a, fb.f32c(0.0))?;
            }
            if wg {
                wgmma_sync(fb, "fence", None)?;
                for ks in 0..dq / 16 {
                    let off = (ks / 4) * keys * 128 + (ks % 4) * 32;
                    let b = wg_b(fb, base, off, false)?;
                    wgmma_m64(fb, &WgA::Regs(q_frag(ks)?), &b, t128, s)?;
                }
                return wgmma_sync(fb, "commit_group", None);
            }
            mma_tile(fb, kv_s, base, &k_ld, dq, false, &q_frag, s)
        };
        // The scores `s` of keys `s0..`: mask, running max, probabilities (in `s`); returns
        // the factor each of the thread's rows' output accumulators are to be rescaled by
        // (`rescale`). Accumulator x of key tile nt: row g + 8(x/2), key s0 + 8nt + 2q + x%2.
        let probabilities = |fb: &Fb<'_, 'ctx>, s0: IntValue<'ctx>, s: &[PointerValue<'ctx>]| {
            // Masks: a key is visible where its offset in the step, `8nt + 2q + x%2`, is under
            // the row's keys left, `end - s0` clamped to `0..=keys` (32-bit compares of a
            // constant against one limit a row, `left - 2q`). Steps whose keys every row of
            // the thread sees (all but the diagonal's and the last) skip them.
            let ninf = fb.f32c(f64::NEG_INFINITY);
            let mut lims = vec![];
            let mut all_seen = fb.ctx.bool_type().const_int(1, false);
            for end in ends {
                let left =
                    fb.b.build_int_sub(geti(end, fb.i64t)?, s0, "left")
                        .map_err(be)?;
                let left = fb.imin(fb.imax(left, c(0))?, c(keys))?;
                let sees = cmp(IntPredicate::EQ, left, c(keys))?;
                all_seen = and(all_seen, sees)?;
                let left = fb.b.build_int_truncate(left, i32t, "l32").map_err(be)?;
                lims.push(fb.b.build_int_sub(left, q2, "lim").map_err(be)?);
            }
            fb.if_else(
                all_seen,
                |_| Ok(()),
                |fb| {
                    for (rr, lim) in lims.iter().enumerate() {
                        for nt in 0..(keys / 8) {
                            for x in [2 * rr, 2 * rr + 1] {
                                let off = i32t.const_int((8 * nt + (x % 2) as i64) as u64, false);
                                let seen =
                                    fb.b.build_int_compare(IntPredicate::SGT, *lim, off, "seen")
                                        .map_err(be)?;
                                let slot = s[(nt * 4) as usize + x];
                                fb.set(slot, fb.fsel(seen, fb.get(slot)?, ninf)?)?;
                            }
                        }
                    }
                    Ok(())
                },
            )?;
            online_softmax(fb, s, mrow, lrow)
        };
        // The output accumulators of the thread's two rows times `corr`, skipped where
        // neither row's max moved (a factor of 1 changes nothing, and after the first steps
        // most rows' maxima stay).
        let rescale = |fb: &Fb<'_, 'ctx>, corr: [FloatValue<'ctx>; 2]| {
            let one = fb.f32c(1.0);
            let kept = and(
                fb.fcmp(FloatPredicate::OEQ, corr[0], one)?,
                fb.fcmp(FloatPredicate::OEQ, corr[1], one)?,
            )?;
            fb.if_else(
                kept,
                |_| Ok(()),
                |fb| {
                    for (i, o) in oacc.iter().enumerate() {
                        fb.set(*o, fb.fmul(fb.get(*o)?, corr[(i % 4) / 2])?)?;
                    }
                    Ok(())
                },
            )
        };
        // O += P·V from the values at word `vbase`, the left fragments by `p_frag(kk)`;
        // values by `ldmatrix.trans`, matrices (keys +0/+8) × (columns +0/+8), or on `wgmma`
        // from the stage as its n-major `B` (issued and committed, not waited for).
        let values = |fb: &Fb<'_, 'ctx>,
                      vbase: IntValue<'ctx>,
                      p_frag: &dyn Fn(i64) -> R<[IntValue<'ctx>; 4]>| {
            if wg {
                // (every fragment packed before the fence: registers written between two
                // `wgmma`s make ptxas fence each)
                let frags: Vec<[IntValue<'ctx>; 4]> =
                    (0..keys / 16).map(p_frag).collect::<R<_>>()?;
                wgmma_sync(fb, "fence", None)?;
                for (kk, a) in frags.into_iter().enumerate() {
                    let b = wg_b(fb, vbase, kk as i64 * 16 * 128, true)?;
                    wgmma_m64(fb, &WgA::Regs(a), &b, t128, &oacc)?;
                }
                return wgmma_sync(fb, "commit_group", None);
            }
            mma_tile(fb, kv_s, vbase, &v_ld, dv, true, p_frag, &oacc)
        };
        // Keys `s0..` in the stage at word `base`, one step at a time (`mma.sync`).
        let compute = |fb: &Fb<'_, 'ctx>, s0: IntValue<'ctx>, base: IntValue<'ctx>| -> R<()> {
            scores(fb, base, &sacc)?;
            let corr = probabilities(fb, s0, &sacc)?;
            rescale(fb, corr)?;
            values(fb, fb.add(base, c(k_words))?, &|kk| acc_frag(fb, &sacc, kk))
        };
        // Through registers: each step's keys and values loaded, rounded to bf16 and stored
        // in stage 0, between two barriers.
        let staged = |fb: &Fb<'_, 'ctx>| -> R<()> {
            fb.for_range(c(0), steps, |fb, st| {
                let s0 = fb.mul(st, c(keys))?;
                barrier(fb)?;
                let kv = stage_fetch(fb, lane, ka, kb, k_vec, dq, s0, sv)?;
                let vv = stage_fetch(fb, lane, va, vb, v_vec, dv, s0, sv)?;
                stage_put(fb, lane, kv_s, &kv, c(0), dq)?;
                stage_put(fb, lane, kv_s, &vv, c(k_words), dv)?;
                barrier(fb)?;
                compute(fb, s0, c(0))
            })
        };
        // Step `kt`'s keys and values copied into stage `kt % stages` (`cp.async`,
        // not waited for), keys past `S` as zeros: per pass `p`, row `r0 + p·rows` of the
        // tile, chunk `e/8` (`chunks_of`). Rows `rows` apart keep their chunk permutation
        // (`swizzled_word`: `rows` is a multiple of 8 per-rows), so a pass's words are the
        // first pass's plus a constant.
        // With `wg`, in `wg_stage_word`'s layout, whose rows `rows` apart (a multiple of 8)
        // also keep their permutation, `rows·128` bytes on.
        let stage_at = |fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>| -> R<IntValue<'ctx>> {
            fb.add(kv0, fb.mul(srem(kt, c(stages), "stg")?, c(stage_words))?)
        };
        // (`mma.sync` reads the stages with threads; `wgmma`, as its operands)
        let (ahead, readers) = if wg {
            (WG_ATTN_AHEAD, RingReaders::Wgmma)
        } else {
            (MMA_ATTN_STAGES - 1, RingReaders::Threads)
        };
        let copiers = RingCopiers::new(fb, lane, readers, ahead)?;
        let issue = |fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>| -> R<()> {
            let base = stage_at(fb, kt)?;
            let s0 = fb.mul(kt, c(keys))?;
            for (av, src, n, at_word) in [(ka, kb, dq, 0), (va, vb, dv, k_words)] {
                let (r0, e, rows) = chunks_of(fb, (copiers.t, copiers.threads()), n)?;
                let (word, row_words) = if wg {
                    (wg_stage_word(fb, r0, e, keys)?, 32)
                } else {
                    (swizzled_word(fb, r0, e, n)?, n / 2)
                };
                let first = fb.add(base, fb.add(c(at_word), word)?)?;
                let at0 = fb.add(src, fb.add(fb.mul(fb.add(s0, r0)?, av.strides[2])?, e)?)?;
                for p in 0..(keys + rows - 1) / rows {
                    let r = fb.add(r0, c(p * rows))?;
                    let s = fb.add(s0, r)?;
                    let at = fb.add(at0, fb.mul(c(p * rows), av.strides[2])?)?;
                    let dst = smem_word(fb, kv_s, fb.add(first, c(p * rows * row_words))?)?;
                    let copy = |fb: &Fb<'_, 'ctx>| cp_async_chunk(fb, av, lt(s, sv)?, at, dst);
                    if (p + 1) * rows > keys {
                        fb.if_else(lt(r, c(keys))?, copy, |_| Ok(()))?;
                    } else {
                        copy(fb)?;
                    }
                }
            }
            Ok(())
        };
        // Through the ring: `ahead` steps in flight (`ring_pipeline`, `RingCopiers`).
        //
        // On `wgmma`, software-pipelined so that the softmax of a step runs while the
        // tensor cores multiply the last step's probabilities by its values: step `kt`
        // rescales the output accumulators by step `kt - 1`'s factors, issues `QKᵀ` of its
        // keys and `PV` of step `kt - 1` (its probabilities packed in `pfr`), waits for the
        // scores only (groups complete in order) and turns them into probabilities and
        // factors, then waits for `PV` and packs the new probabilities over the old (a
        // `wgmma` reads its register operand until it completes). The last step's `PV`
        // follows the loop. Nothing is in flight across the loop's back edge;
        // step `kt - 1`'s values are read until step `kt`'s last wait, after the copies step
        // `kt` issues into stage `(kt + 2) % stages`: hence `WG_ATTN_STAGES`.
        let ring = |fb: &Fb<'_, 'ctx>| -> R<()> {
            if !wg {
                ring_pipeline(fb, steps, ahead, copiers, &issue, &|fb, kt| {
                    compute(fb, fb.mul(kt, c(keys))?, stage_at(fb, kt)?)
                })?;
                return cp_async_wait(fb, 0);
            }
            let packed = |kk: i64| -> R<[IntValue<'ctx>; 4]> {
                let w = |x: usize| geti(pfr[(kk * 4) as usize + x], i32t);
                Ok([w(0)?, w(1)?, w(2)?, w(3)?])
            };
            // Step `kt`'s scores into probabilities, its factors kept, after a wait that
            // leaves `pending` groups in flight; then every group waited for and the
            // probabilities packed.
            let softmax = |fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>, pending: i64| -> R<()> {
                wgmma_sync(fb, "wait_group", Some(pending))?;
                let corr = probabilities(fb, fb.mul(kt, c(keys))?, &sacc)?;
                for (slot, v) in corr_s.iter().zip(corr) {
                    fb.set(*slot, v)?;
                }
                wgmma_sync(fb, "wait_group", Some(0))?;
                for kk in 0..keys / 16 {
                    for (x, w) in acc_frag(fb, &sacc, kk)?.into_iter().enumerate() {
                        seti(pfr[(kk * 4) as usize + x], w)?;
                    }
                }
                Ok(())
            };
            // The accumulators rescaled by the last step's factors (before anything is
            // issued: they are not in flight then).
            let rescale_kept = |fb: &Fb<'_, 'ctx>| -> R<()> {
                rescale(fb, [fb.get(corr_s[0])?, fb.get(corr_s[1])?])
            };
            // `PV` of step `kt`, from its packed probabilities.
            let last_values = |fb: &Fb<'_, 'ctx>, kt: IntValue<'ctx>| -> R<()> {
                values(fb, fb.add(stage_at(fb, kt)?, c(k_words))?, &packed)
            };
            // (`ring_pipeline`'s steps, the first peeled: no wait and no accumulator read in a
            // branch between a `wgmma` and its wait, which makes ptxas serialize them all;
            // the copies' branches there leave them be, ptxas warns of nothing)
            // A step's copies (of the keys and values `ahead` steps on) are issued after its
            // `wgmma`s, while the tensor cores work, not between the barrier and them: the
            // stage they fill was last read by `PV` of step `kt - 2`, waited for in step
            // `kt - 1`.
            ring_prologue(fb, steps, ahead, copiers, &issue)?;
            let ready = |fb: &Fb<'_, 'ctx>, kt| ring_ready(fb, kt, ahead, copiers);
            let issue_next =
                |fb: &Fb<'_, 'ctx>, kt| ring_issue_next(fb, kt, steps, ahead, copiers, &issue);
            fb.if_else(
                cmp(IntPredicate::SGT, steps, c(0))?,
                |fb| {
                    ready(fb, c(0))?;
                    scores(fb, stage_at(fb, c(0))?, &sacc)?;
                    issue_next(fb, c(0))?;
                    softmax(fb, c(0), 0)?;
                    fb.for_range(c(1), steps, |fb, kt| {
                        ready(fb, kt)?;
                        rescale_kept(fb)?;
                        scores(fb, stage_at(fb, kt)?, &sacc)?;
                        last_values(fb, fb.b.build_int_sub(kt, c(1), "kp").map_err(be)?)?;
                        issue_next(fb, kt)?;
                        softmax(fb, kt, 1)
                    })?;
                    rescale_kept(fb)?;
                    last_values(fb, fb.b.build_int_sub(steps, c(1), "last").map_err(be)?)?;
                    wgmma_sync(fb, "wait_group", Some(0))
                },
                |_| Ok(()),
            )?;
            cp_async_wait(fb, 0)
        };
        if ring_path {
            ring(fb)?;
        } else {
            staged(fb)?;
        }
        // Each row's sum over its quad, then the rows out, times the sum's reciprocal: the
        // thread's two columns `8nt + 2q`, `+ 1` as one 8-byte store (the row starts at a
        // multiple of the head size, a power of two, in a buffer on 256 bytes).
        for (rr, r) in rows.iter().enumerate() {
            let l = warp_fold(fb, fb.get(lrow[rr])?, &[1, 2], |a, b| fb.fadd(a, b))?;
            let inv = fb.b.build_float_div(fb.f32c(1.0), l, "inv").map_err(be)?;
            fb.if_else(
                lt(*r, tv)?,
                |fb| {
                    let u = fb.add(fb.mul(fb.add(fb.mul(bi, c(d.h))?, hi)?, tv)?, *r)?;
                    let first = fb.add(attn_out_row(fb, u, d)?, fb.mul(q, c(2))?)?;
                    for nt in 0..dv / 8 {
                        let x = (nt * 4) as usize + 2 * rr;
                        let o0 = fb.fmul(fb.get(oacc[x])?, inv)?;
                        let o1 = fb.fmul(fb.get(oacc[x + 1])?, inv)?;
                        optr.store_pair(fb, fb.add(first, c(8 * nt))?, [o0, o1])?;
                    }
                    Ok(())
                },
                |_| Ok(()),
            )?;
        }
        barrier(fb)
    })
}

/// Causal attention on the GPU off the tensor-core tiles, one warp per query row `(b, h, t)`
/// (eight rows a block), or with fewer than `GPU_ATTN_BLOCK_ROWS` rows a block per row,
/// its warps taking the row's keys in turn and their results merged (not in the tensor-core
/// kernel's full entry, whose ring leaves no room for the merge's shared memory): lane `j` holds
/// elements `j, j+32, …` of the (pre-scaled) query and of the output accumulator; for each
/// visible key the warp forms the score with a butterfly sum and updates the running max,
/// the sum of `e^(s−m)` and the accumulator online (flash-style), reading each key and
/// value row once, coalesced. (The CPU's split-KV `AttentionCombine` is not emitted: a
/// block per row splits the keys within the kernel.)
#[allow(clippy::too_many_arguments)]
fn gpu_attention<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    q: &Access,
    k: &Access,
    v: &Access,
    pos: &Access,
    d: &crate::kernel::AttnDims,
    scale: f64,
) -> R<()> {
    // (query, keys and values stored f32, or bf16: `ScheduleOptions::bf16_operands`)
    let elem = |x: &Access| fb.prog.buffers[x.buf as usize].elem;
    let (qa, ka, va) = (
        fb.access(q, elem(q))?,
        fb.access(k, elem(k))?,
        fb.access(v, elem(v))?,
    );
    let pa = fb.access(pos, ElemType::I64)?;
    let optr = OutBuf::of(fb, out)?;
    let c = |v: i64| fb.i64c(v);
    let sdiv = |a, b, n| fb.b.build_int_signed_div(a, b, n).map_err(be);
    let srem = |a, b, n| fb.b.build_int_signed_rem(a, b, n).map_err(be);
    let lt = |a, b| {
        fb.b.build_int_compare(IntPredicate::SLT, a, b, "lt")
            .map_err(be)
    };
    let (bv, tv, sv) = (fb.dim(&d.b)?, fb.dim(&d.t)?, fb.dim(&d.s)?);
    if fb.tensor_cores && fb.heavy && mma_attention_fits(d) {
        // Prompts on tensor cores; decode (few query rows) goes on below, and so do bf16
        // keys and values whose rows the ring cannot copy (so that the tensor-core kernel
        // has one way to stage them, and the registers of one).
        let mut long =
            fb.b.build_int_compare(IntPredicate::SGE, tv, c(MMA_ATTN_MIN_T), "long")
                .map_err(be)?;
        if mma_attn_ring(&ka, &va) {
            long =
                fb.b.build_and(long, mma_attn_ring_ok(fb, [&ka, &va])?, "ring")
                    .map_err(be)?;
        }
        let (mma, rows) = (
            fb.ctx.append_basic_block(fb.func, "mma"),
            fb.ctx.append_basic_block(fb.func, "rows"),
        );
        fb.b.build_conditional_branch(long, mma, rows).map_err(be)?;
        fb.b.position_at_end(mma);
        gpu_mma_attention(fb, optr, [&qa, &ka, &va, &pa], d, scale, [bv, tv, sv])?;
        fb.ret_ok()?;
        fb.b.position_at_end(rows);
    }
    let warps = GPU_BLOCK_THREADS / 32;
    let units = fb.mul(fb.mul(bv, c(d.h))?, tv)?;
    let lane = srem(fb.tid, c(GPU_BLOCK_THREADS), "lane")?;
    let (warp, wl) = (sdiv(lane, c(32), "warp")?, srem(lane, c(32), "wl")?);
    let nd = ((d.d + 31) / 32) as usize;
    let ndv = ((d.dv + 31) / 32) as usize;
    let qr: Vec<PointerValue> = (0..nd).map(|_| fb.slot(fb.f32t.into())).collect::<R<_>>()?;
    let acc: Vec<PointerValue> = (0..ndv)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    let (mx, l) = (fb.slot(fb.f32t.into())?, fb.slot(fb.f32t.into())?);
    // Lane j's elements j + 32i that exist.
    let dims_of = |n: i64, count: usize| -> R<Vec<(IntValue, IntValue)>> {
        (0..count)
            .map(|i| {
                let e = fb.add(wl, c(32 * i as i64))?;
                Ok((e, lt(e, c(n))?))
            })
            .collect()
    };
    let qd = dims_of(d.d, nd)?;
    let vd = dims_of(d.dv, ndv)?;
    // Query row `u` over its groups of `GPU_ATTN_UNROLL` visible keys `g0, g0 + gstep, …`
    // (all of them for `g0` 0 and `gstep` 1): this warp's running max, sum of `e^(s−m)` and
    // output row (lane `wl`'s elements of it) left in `mx`, `l` and `acc`.
    let row_part = |fb: &Fb<'_, 'ctx>,
                    u: IntValue<'ctx>,
                    g0: IntValue<'ctx>,
                    gstep: IntValue<'ctx>|
     -> R<()> {
        let [qb, kb, vb, end] = attn_row(
            fb,
            [&qa, &ka, &va, &pa],
            [bv, c(d.h), tv, sv],
            d.h / d.hkv,
            u,
        )?;
        for (i, (e, ok)) in qd.iter().enumerate() {
            fb.set(qr[i], fb.f32c(0.0))?;
            fb.if_else(
                *ok,
                |fb| {
                    let x = fb.load_float(&qa, fb.add(qb, fb.mul(*e, qa.strides[3])?)?)?;
                    fb.set(qr[i], fb.fmul(x, fb.f32c(scale))?)
                },
                |_| Ok(()),
            )?;
        }
        for a in &acc {
            fb.set(*a, fb.f32c(0.0))?;
        }
        fb.set(mx, fb.f32c(f64::NEG_INFINITY))?;
        fb.set(l, fb.f32c(0.0))?;
        // Keys `GPU_ATTN_UNROLL` at a time, so their loads are in flight together.
        let u_n = GPU_ATTN_UNROLL;
        let groups = sdiv(fb.add(end, c(u_n - 1))?, c(u_n), "kg")?;
        let last = fb.b.build_int_sub(end, c(1), "last").map_err(be)?;
        fb.for_stride(g0, groups, gstep, |fb, gi| {
            let s0 = fb.mul(gi, c(u_n))?;
            let keys: Vec<(IntValue, IntValue)> = (0..u_n)
                .map(|j| {
                    let s = fb.add(s0, c(j))?;
                    Ok((fb.imin(s, last)?, lt(s, end)?))
                })
                .collect::<R<_>>()?;
            let mut scores = vec![];
            for (s, valid) in &keys {
                let kr = fb.add(kb, fb.mul(*s, ka.strides[2])?)?;
                let mut part = fb.f32c(0.0);
                for (i, (e, ok)) in qd.iter().enumerate() {
                    let at = fb.add(kr, fb.mul(fb.imin(*e, c(d.d - 1))?, ka.strides[3])?)?;
                    let y = fb.load_float(&ka, at)?;
                    let y = fb.fsel(*ok, y, fb.f32c(0.0))?;
                    part = fb.intrinsic3("llvm.fma", fb.get(qr[i])?, y, part)?;
                }
                let score = warp_sum(fb, part)?;
                scores.push(fb.fsel(*valid, score, fb.f32c(f64::NEG_INFINITY))?);
            }
            let m_old = fb.get(mx)?;
            let mut m_new = m_old;
            for sc in &scores {
                m_new = fb.intrinsic("llvm.maxnum", &[m_new, *sc])?;
            }
            let corr = fb.exp(fb.b.build_float_sub(m_old, m_new, "d").map_err(be)?)?;
            let ps: Vec<FloatValue> = scores
                .iter()
                .map(|sc| fb.exp(fb.b.build_float_sub(*sc, m_new, "z").map_err(be)?))
                .collect::<R<_>>()?;
            let mut lv = fb.fmul(fb.get(l)?, corr)?;
            for p in &ps {
                lv = fb.fadd(lv, *p)?;
            }
            fb.set(l, lv)?;
            fb.set(mx, m_new)?;
            for (i, (e, _)) in vd.iter().enumerate() {
                let mut a = fb.fmul(fb.get(acc[i])?, corr)?;
                for ((s, _), p) in keys.iter().zip(&ps) {
                    let vr = fb.add(vb, fb.mul(*s, va.strides[2])?)?;
                    let at = fb.add(vr, fb.mul(fb.imin(*e, c(d.dv - 1))?, va.strides[3])?)?;
                    let y = fb.load_float(&va, at)?;
                    a = fb.intrinsic3("llvm.fma", *p, y, a)?;
                }
                fb.set(acc[i], a)?;
            }
            Ok(())
        })
    };
    // Row `u`'s output: lane `wl`'s elements of `row(i)` (its `i`-th), divided by `sum`.
    let store_row = |fb: &Fb<'_, 'ctx>,
                     u: IntValue<'ctx>,
                     row: &dyn Fn(&Fb<'_, 'ctx>, usize) -> R<FloatValue<'ctx>>,
                     sum: FloatValue<'ctx>|
     -> R<()> {
        let obase = attn_out_row(fb, u, d)?;
        for (i, (e, ok)) in vd.iter().enumerate() {
            fb.if_else(
                *ok,
                |fb| {
                    let o = fb.b.build_float_div(row(fb, i)?, sum, "o").map_err(be)?;
                    optr.store(fb, fb.add(obase, *e)?, o)
                },
                |_| Ok(()),
            )?;
        }
        Ok(())
    };
    // A warp per query row.
    let by_warp = |fb: &Fb<'_, 'ctx>| -> R<()> {
        let groups = sdiv(fb.add(units, c(warps - 1))?, c(warps), "groups")?;
        let BlockGrid {
            blk, nblk, iters, ..
        } = block_grid(fb, groups)?;
        fb.for_range(c(0), iters, |fb, it| {
            let u = fb.add(fb.mul(fb.add(blk, fb.mul(it, nblk)?)?, c(warps))?, warp)?;
            fb.if_else(
                lt(u, units)?,
                |fb| {
                    row_part(fb, u, c(0), c(1))?;
                    store_row(fb, u, &|fb, i| fb.get(acc[i]), fb.get(l)?)
                },
                |_| Ok(()),
            )
        })
    };
    // A block per query row: its warps take the row's key groups in turn, then warp 0
    // merges their maxima, sums and rows in warp order (`e^(m_w − M)` rescaling each), so
    // that runs agree.
    let shared_at = |fb: &Fb<'_, 'ctx>, a: PointerValue<'ctx>, i: IntValue<'ctx>| {
        unsafe { fb.b.build_in_bounds_gep(fb.f32t, a, &[i], "sh") }.map_err(be)
    };
    let load_shared =
        |fb: &Fb<'_, 'ctx>, a: PointerValue<'ctx>, i: IntValue<'ctx>| -> R<FloatValue<'ctx>> {
            Ok(fb
                .b
                .build_load(fb.f32t, shared_at(fb, a, i)?, "shv")
                .map_err(be)?
                .into_float_value())
        };
    let by_block = |fb: &Fb<'_, 'ctx>| -> R<()> {
        let (part_m, part_l, part_acc) = (
            shared_f32(fb, "row_max", warps as u32),
            shared_f32(fb, "row_sum", warps as u32),
            shared_f32(fb, "row_acc", (warps * d.dv) as u32),
        );
        let BlockGrid {
            blk, nblk, iters, ..
        } = block_grid(fb, units)?;
        fb.for_range(c(0), iters, |fb, it| {
            let u = fb.add(blk, fb.mul(it, nblk)?)?;
            row_part(fb, u, warp, c(warps))?;
            let first = |fb: &Fb<'_, 'ctx>, x: IntValue<'ctx>| {
                fb.b.build_int_compare(IntPredicate::EQ, x, c(0), "first")
                    .map_err(be)
            };
            fb.if_else(
                first(fb, wl)?,
                |fb| {
                    fb.b.build_store(shared_at(fb, part_m, warp)?, fb.get(mx)?)
                        .map_err(be)?;
                    fb.b.build_store(shared_at(fb, part_l, warp)?, fb.get(l)?)
                        .map_err(be)?;
                    Ok(())
                },
                |_| Ok(()),
            )?;
            for (i, (e, ok)) in vd.iter().enumerate() {
                fb.if_else(
                    *ok,
                    |fb| {
                        let at = fb.add(fb.mul(warp, c(d.dv))?, *e)?;
                        fb.b.build_store(shared_at(fb, part_acc, at)?, fb.get(acc[i])?)
                            .map_err(be)?;
                        Ok(())
                    },
                    |_| Ok(()),
                )?;
            }
            barrier(fb)?;
            fb.if_else(
                first(fb, warp)?,
                |fb| {
                    let ms: Vec<FloatValue> = (0..warps)
                        .map(|w| load_shared(fb, part_m, c(w)))
                        .collect::<R<_>>()?;
                    let mut m_all = ms[0];
                    for m in &ms[1..] {
                        m_all = fb.intrinsic("llvm.maxnum", &[m_all, *m])?;
                    }
                    let mut sum = fb.f32c(0.0);
                    let mut scales = vec![];
                    for (w, m) in ms.iter().enumerate() {
                        let sc = fb.exp(fb.b.build_float_sub(*m, m_all, "dm").map_err(be)?)?;
                        let lw = load_shared(fb, part_l, c(w as i64))?;
                        sum = fb.intrinsic3("llvm.fma", lw, sc, sum)?;
                        scales.push(sc);
                    }
                    let merged = |fb: &Fb<'_, 'ctx>, i: usize| -> R<FloatValue<'ctx>> {
                        let e = fb.imin(vd[i].0, c(d.dv - 1))?;
                        let mut a = fb.f32c(0.0);
                        for (w, sc) in scales.iter().enumerate() {
                            let at = fb.add(c(w as i64 * d.dv), e)?;
                            a =
                                fb.intrinsic3("llvm.fma", load_shared(fb, part_acc, at)?, *sc, a)?;
                        }
                        Ok(a)
                    };
                    store_row(fb, u, &merged, sum)
                },
                |_| Ok(()),
            )?;
            // (the next row's partials go where these were read)
            barrier(fb)
        })
    };
    if fb.tensor_cores && fb.heavy && mma_attention_fits(d) {
        // (the full entry of tensor-core attention comes here only off its ring, with the
        // tiles' grid: a warp per row, and no static shared memory beside the ring's
        // dynamic memory, which at head size 128 fills sm_86's 99 KiB)
        by_warp(fb)?;
    } else {
        fb.if_else(lt(units, c(GPU_ATTN_BLOCK_ROWS))?, by_block, by_warp)?;
    }
    fb.ret_ok()
}

/// Query rows (`B·H·T`) from which GPU attention off its tensor-core tiles takes a warp per
/// row; fewer (decode, short prompts) take a block per row (`gpu_attention`), whose 8
/// warps split the row's keys: decode's few rows (9 a token for SmolLM2) would otherwise
/// keep as many warps busy, each walking every key.
const GPU_ATTN_BLOCK_ROWS: i64 = 2048;

/// Pairs of `attention_backward`'s GPU loops taken at a time (independent shuffle chains).
const GPU_ATTN_BWD_UNROLL: i64 = 4;

/// Attention's backward (`Kernel::AttentionBackward`, FlashAttention-2's arithmetic): for
/// each unit (a row of the result), each (query row, key) pair it covers: the score
/// `scale·q·k` recomputed, then for the log-sum-exp the running max and sum; for a gradient
/// `p = exp(score − lse)`, `ds = p·(dout·v − delta)` and the unit's accumulator row gains
/// `ds·k` (`dq`), `ds·q` (`dk`) or `p·dout` (`dv`), scaled by `scale` for `dq` and `dk` as it
/// is stored. Query units (log-sum-exp, `dq`) go over their visible keys; key units (`dk`,
/// `dv`) over every query row of the heads that read their KV head, those that see them.
///
/// A warp a log-sum-exp unit (eight a block), a block a gradient's unit (its warps take the
/// unit's groups of pairs in turn, and their partial rows are summed in warp order through
/// shared memory: the first keys are seen by every query row and the last query rows see
/// every key, so a warp a unit left the rest of the GPU idle behind those): lane `l` holds
/// elements `l, l+32, …` of the accumulator row and forms its share of each dot product,
/// summed over the warp with butterfly shuffles, so every row read is 32 lanes wide; the
/// accumulators are in registers; a warp takes `GPU_ATTN_BWD_UNROLL` pairs at a time
/// (those past the end or not visible add nothing; a group of key-unit pairs none of which
/// is visible is skipped). With tensor
/// cores, head sizes of `mma_attention_fits` and at least `MMA_ATTN_MIN_T` rows of the
/// result, it runs in `mma.sync` tiles instead (`mma_attn_bwd`). The CPU's kernel works in
/// tiles (`attn_tiles`).
fn gpu_attention_backward<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    [q, k, pos]: [&Access; 3],
    grad: Option<&AttnGradIn>,
    d: &AttnDims,
    scale: f64,
) -> R<()> {
    let elem = |x: &Access| fb.prog.buffers[x.buf as usize].elem;
    let (qa, ka) = (fb.access(q, elem(q))?, fb.access(k, elem(k))?);
    let pa = fb.access(pos, ElemType::I64)?;
    let optr = fb.buf(out)?;
    let oe = fb.prog.buffers[out as usize].elem;
    let c = |v: i64| fb.i64c(v);
    let lt = |a, b| {
        fb.b.build_int_compare(IntPredicate::SLT, a, b, "lt")
            .map_err(be)
    };
    let (bv, tv, sv) = (fb.dim(&d.b)?, fb.dim(&d.t)?, fb.dim(&d.s)?);
    let rep = d.h / d.hkv;
    let gops = match grad {
        Some(g) => Some((
            fb.access(&g.v, elem(&g.v))?,
            fb.access(&g.dout, elem(&g.dout))?,
            fb.access(&g.lse, ElemType::F32)?,
            fb.access(&g.delta, ElemType::F32)?,
            g.wrt,
        )),
        None => None,
    };
    let wrt = grad.map(|g| g.wrt);
    // The accumulator row's width, and the factor it is stored with.
    let (width, out_scale) = match wrt {
        None => (0, 1.0),
        Some(AttnGrad::Q) | Some(AttnGrad::K) => (d.d, scale),
        Some(AttnGrad::V) => (d.dv, 1.0),
    };
    let key_units = matches!(wrt, Some(AttnGrad::K | AttnGrad::V));
    let units = if key_units {
        fb.mul(fb.mul(bv, c(d.hkv))?, sv)?
    } else {
        fb.mul(fb.mul(bv, c(d.h))?, tv)?
    };
    if fb.tensor_cores && fb.heavy && mma_attention_fits(d) {
        // Enough rows of the result for tiles on tensor cores (`gpu_tiles` takes the same
        // test).
        let rows = if key_units { sv } else { tv };
        let long =
            fb.b.build_int_compare(IntPredicate::SGE, rows, c(MMA_ATTN_MIN_T), "long")
                .map_err(be)?;
        let (mma, warps) = (
            fb.ctx.append_basic_block(fb.func, "mma"),
            fb.ctx.append_basic_block(fb.func, "warps"),
        );
        fb.b.build_conditional_branch(long, mma, warps)
            .map_err(be)?;
        fb.b.position_at_end(mma);
        let ops = gops
            .as_ref()
            .map(|(v, dout, lse, delta, wrt)| mma_attn_bwd::GradOps {
                v,
                dout,
                lse,
                delta,
                wrt: *wrt,
            });
        mma_attn_bwd::backward(
            fb,
            optr,
            oe,
            [&qa, &ka, &pa],
            ops.as_ref(),
            d,
            scale,
            [bv, tv, sv],
        )?;
        fb.ret_ok()?;
        fb.b.position_at_end(warps);
    }
    // This thread's lane and the elements `(index, exists)` it holds of a row of `n`:
    // `lane + 32i`.
    let lane = fb.b.build_int_signed_rem(fb.tid, c(32), "wl").map_err(be)?;
    let lanes = |n: i64| -> R<Vec<(IntValue<'ctx>, IntValue<'ctx>)>> {
        (0..(n + 31) / 32)
            .map(|i| {
                let e = fb.add(lane, c(32 * i))?;
                Ok((fb.imin(e, c(n - 1))?, lt(e, c(n))?))
            })
            .collect()
    };
    // `Σ a[ab + i·sa]·b[bb + i·sb]` over `i < n` (along the operands' last axes), summed
    // over the warp.
    let dot = |fb: &Fb<'_, 'ctx>,
               (a, ab): (&Av<'ctx>, IntValue<'ctx>),
               (b, bb): (&Av<'ctx>, IntValue<'ctx>),
               n: i64|
     -> R<FloatValue<'ctx>> {
        let (sa, sb) = (
            a.strides[a.strides.len() - 1],
            b.strides[b.strides.len() - 1],
        );
        let mut part = fb.f32c(0.0);
        for (e, ok) in lanes(n)? {
            let x = fb.load_float(a, fb.add(ab, fb.mul(e, sa)?)?)?;
            let y = fb.load_float(b, fb.add(bb, fb.mul(e, sb)?)?)?;
            let y = fb.fsel(ok, y, fb.f32c(0.0))?;
            part = fb.intrinsic3("llvm.fma", x, y, part)?;
        }
        warp_sum(fb, part)
    };
    // This lane's elements of the accumulator row, in registers.
    let regs: Vec<PointerValue> = (0..(width + 31) / 32)
        .map(|_| fb.slot(fb.f32t.into()))
        .collect::<R<_>>()?;
    let (mx, l) = (fb.slot(fb.f32t.into())?, fb.slot(fb.f32t.into())?);
    // `acc += coef·src[sb + i]` along `src`'s last axis.
    let axpy = |fb: &Fb<'_, 'ctx>,
                coef: FloatValue<'ctx>,
                (src, sb): (&Av<'ctx>, IntValue<'ctx>)|
     -> R<()> {
        let ss = src.strides[src.strides.len() - 1];
        for ((e, _), r) in lanes(width)?.into_iter().zip(&regs) {
            let x = fb.load_float(src, fb.add(sb, fb.mul(e, ss)?)?)?;
            fb.set(*r, fb.intrinsic3("llvm.fma", coef, x, fb.get(*r)?)?)?;
        }
        Ok(())
    };
    // (Query row `(bi, hi, ti)`, key `j`) pairs of a unit, each with whether it counts:
    // their scores, then their probabilities, then (for `dq`, `dk`) their `dout·v`, then
    // the accumulator updates, so that the pairs' chains of shuffles are independent and
    // interleave. A pair that does not count reads rows inside the tensors and adds nothing.
    type Pair<'ctx> = (
        IntValue<'ctx>,
        IntValue<'ctx>,
        IntValue<'ctx>,
        IntValue<'ctx>,
    );
    let pairs = |fb: &Fb<'_, 'ctx>, bi: IntValue<'ctx>, ps: &[Pair<'ctx>]| -> R<()> {
        let counts =
            |ok: IntValue<'ctx>, x: FloatValue<'ctx>, none: f64| fb.fsel(ok, x, fb.f32c(none));
        let mut at = vec![];
        let mut scores = vec![];
        for &(hi, ti, j, ok) in ps {
            let gi = fb.b.build_int_signed_div(hi, c(rep), "g").map_err(be)?;
            let qb = fb.at(&qa, &[(0, bi), (1, hi), (2, ti)])?;
            let kb = fb.at(&ka, &[(0, bi), (1, gi), (2, j)])?;
            let score = fb.fmul(dot(fb, (&qa, qb), (&ka, kb), d.d)?, fb.f32c(scale))?;
            scores.push(counts(ok, score, f64::NEG_INFINITY)?);
            at.push((gi, hi, ti, j, qb, kb, ok));
        }
        let Some((va, da, la, ea, wrt)) = &gops else {
            let m_old = fb.get(mx)?;
            let mut m_new = m_old;
            for sc in &scores {
                m_new = fb.intrinsic("llvm.maxnum", &[m_new, *sc])?;
            }
            let corr = fb.exp(fb.b.build_float_sub(m_old, m_new, "d").map_err(be)?)?;
            let mut lv = fb.fmul(fb.get(l)?, corr)?;
            for (sc, a) in scores.iter().zip(&at) {
                let e = fb.exp(fb.b.build_float_sub(*sc, m_new, "z").map_err(be)?)?;
                lv = fb.fadd(lv, counts(a.6, e, 0.0)?)?;
            }
            fb.set(l, lv)?;
            return fb.set(mx, m_new);
        };
        let mut ps_ = vec![];
        for (sc, &(_, hi, ti, _, _, _, ok)) in scores.iter().zip(&at) {
            let row = [(0, bi), (1, hi), (2, ti)];
            let lse = fb.load_f32(la.ptr, fb.at(la, &row)?)?;
            let p = fb.exp(fb.b.build_float_sub(*sc, lse, "z").map_err(be)?)?;
            ps_.push((counts(ok, p, 0.0)?, fb.at(da, &row)?, row));
        }
        if *wrt == AttnGrad::V {
            for (p, db, _) in &ps_ {
                axpy(fb, *p, (da, *db))?;
            }
            return Ok(());
        }
        let mut ds = vec![];
        for ((p, db, row), &(gi, _, _, j, _, _, ok)) in ps_.iter().zip(&at) {
            let vb = fb.at(va, &[(0, bi), (1, gi), (2, j)])?;
            let dp = dot(fb, (da, *db), (va, vb), d.dv)?;
            let delta = fb.load_f32(ea.ptr, fb.at(ea, row)?)?;
            let x = fb.fmul(*p, fb.b.build_float_sub(dp, delta, "dd").map_err(be)?)?;
            // (0 where the pair does not count, whatever `delta` is: a query row that sees
            // no key has an output of 0/0, so its `delta` may be NaN)
            ds.push(counts(ok, x, 0.0)?);
        }
        for (x, &(_, _, _, _, qb, kb, _)) in ds.into_iter().zip(&at) {
            match wrt {
                AttnGrad::Q => axpy(fb, x, (&ka, kb))?,
                _ => axpy(fb, x, (&qa, qb))?,
            }
        }
        Ok(())
    };
    // `GPU_ATTN_BWD_UNROLL` pairs at a time: the `n` items from `i0` of a loop,
    // `(item clamped to the last, whether it exists)`.
    let group = |fb: &Fb<'_, 'ctx>, i0: IntValue<'ctx>, n: IntValue<'ctx>| {
        let last = fb.b.build_int_sub(n, c(1), "last").map_err(be)?;
        (0..GPU_ATTN_BWD_UNROLL)
            .map(|x| {
                let i = fb.add(i0, c(x))?;
                Ok((fb.imin(i, last)?, lt(i, n)?))
            })
            .collect::<R<Vec<_>>>()
    };
    let groups = |fb: &Fb<'_, 'ctx>, n: IntValue<'ctx>| {
        fb.b.build_int_signed_div(
            fb.add(n, c(GPU_ATTN_BWD_UNROLL - 1))?,
            c(GPU_ATTN_BWD_UNROLL),
            "groups",
        )
        .map_err(be)
    };
    // Query row `u`'s pairs with the keys it sees, in groups of `GPU_ATTN_BWD_UNROLL` keys
    // `g0, g0 + gstep, …` (a log-sum-exp's unit, or `dq`'s).
    let query_keys = |fb: &Fb<'_, 'ctx>,
                      u: IntValue<'ctx>,
                      g0: IntValue<'ctx>,
                      gstep: IntValue<'ctx>|
     -> R<()> {
        let idx = fb.decompose(u, &[bv, c(d.h), tv])?;
        let (bi, hi, ti) = (idx[0], idx[1], idx[2]);
        let limit = fb.load(&pa, fb.at(&pa, &[(0, bi), (1, ti)])?)?;
        let end = fb.imin(fb.add(limit.into_int_value(), c(1))?, sv)?;
        fb.for_stride(g0, groups(fb, end)?, gstep, |fb, g| {
            let ps: Vec<Pair<'ctx>> = group(fb, fb.mul(g, c(GPU_ATTN_BWD_UNROLL))?, end)?
                .into_iter()
                .map(|(j, ok)| (hi, ti, j, ok))
                .collect();
            pairs(fb, bi, &ps)
        })
    };
    let warps = GPU_BLOCK_THREADS / 32;
    // A gradient's unit on a block (`block_units`): warp `warp` takes the unit's groups of
    // pairs `warp, warp + warps, …` (the first keys are seen by every query row and the
    // last query rows see every key: a warp a unit left most warps idle behind those),
    // then the warps' partial rows meet in shared memory (`partials`) and the block's
    // threads sum them, in warp order, into the unit's row of the result.
    let block_units = grad.is_some();
    let partials = block_units.then(|| shared_f32(fb, "partial_rows", (warps * width) as u32));
    let block_unit = |fb: &Fb<'_, 'ctx>, u: IntValue<'ctx>, bl: IntValue<'ctx>| -> R<()> {
        let partials = partials.expect("gradient units");
        let warp = fb.b.build_int_signed_div(bl, c(32), "warp").map_err(be)?;
        for r in &regs {
            fb.set(*r, fb.f32c(0.0))?;
        }
        if key_units {
            // (`dk`, `dv`: the (query head, group of query rows) pairs of key `j`)
            let idx = fb.decompose(u, &[bv, c(d.hkv), sv])?;
            let (bi, gi, j) = (idx[0], idx[1], idx[2]);
            // Whether query row `ti` sees key `j`.
            let sees = |fb: &Fb<'_, 'ctx>, ti| -> R<IntValue<'ctx>> {
                let limit = fb.load(&pa, fb.at(&pa, &[(0, bi), (1, ti)])?)?;
                fb.b.build_not(lt(limit.into_int_value(), j)?, "sees")
                    .map_err(be)
            };
            let per_head = groups(fb, tv)?;
            fb.for_stride(warp, fb.mul(per_head, c(rep))?, c(warps), |fb, x| {
                let r = fb.b.build_int_signed_div(x, per_head, "r").map_err(be)?;
                let g = fb.b.build_int_signed_rem(x, per_head, "g").map_err(be)?;
                let hi = fb.add(fb.mul(gi, c(rep))?, r)?;
                let mut ps = vec![];
                let mut any = fb.ctx.bool_type().const_zero();
                for (ti, exists) in group(fb, fb.mul(g, c(GPU_ATTN_BWD_UNROLL))?, tv)? {
                    let ok = fb.b.build_and(exists, sees(fb, ti)?, "ok").map_err(be)?;
                    any = fb.b.build_or(any, ok, "any").map_err(be)?;
                    ps.push((hi, ti, j, ok));
                }
                fb.if_else(any, |fb| pairs(fb, bi, &ps), |_| Ok(()))
            })?;
        } else {
            // (`dq`: the groups of keys query row `ti` sees)
            query_keys(fb, u, warp, c(warps))?;
        }
        let mine = fb.mul(warp, c(width))?;
        for ((e, ok), r) in lanes(width)?.into_iter().zip(&regs) {
            let v = fb.get(*r)?;
            fb.if_else(
                ok,
                |fb| fb.store_f32(partials, fb.add(mine, e)?, v),
                |_| Ok(()),
            )?;
        }
        barrier(fb)?;
        let ob = fb.mul(u, c(width))?;
        fb.for_stride(bl, c(width), c(GPU_BLOCK_THREADS), |fb, e| {
            let mut sum = fb.f32c(0.0);
            for w in 0..warps {
                sum = fb.fadd(sum, fb.load_f32(partials, fb.add(c(w * width), e)?)?)?;
            }
            let v = fb.fmul(sum, fb.f32c(out_scale))?;
            fb.store(optr, oe, fb.add(ob, e)?, v.into())
        })?;
        // (the next unit's partial rows overwrite these)
        barrier(fb)
    };
    // A log-sum-exp's unit (a query row), on a warp.
    let unit = |fb: &Fb<'_, 'ctx>, u: IntValue<'ctx>| -> R<()> {
        fb.set(mx, fb.f32c(f64::NEG_INFINITY))?;
        fb.set(l, fb.f32c(0.0))?;
        query_keys(fb, u, c(0), c(1))?;
        let lse = fb.fadd(fb.get(mx)?, fb.log(fb.get(l)?)?)?;
        let first =
            fb.b.build_int_compare(IntPredicate::EQ, lane, c(0), "first")
                .map_err(be)?;
        fb.if_else(first, |fb| fb.store(optr, oe, u, lse.into()), |_| Ok(()))
    };
    if block_units {
        // (a unit a block: every thread of a block takes the same units, so the barriers
        // are the whole block's)
        let BlockGrid {
            lane: bl,
            blk,
            nblk,
            iters,
        } = block_grid(fb, units)?;
        fb.for_range(c(0), iters, |fb, it| {
            block_unit(fb, fb.add(blk, fb.mul(it, nblk)?)?, bl)
        })?;
        return fb.ret_ok();
    }
    let groups =
        fb.b.build_int_signed_div(fb.add(units, c(warps - 1))?, c(warps), "groups")
            .map_err(be)?;
    let BlockGrid {
        lane: bl,
        blk,
        nblk,
        iters,
    } = block_grid(fb, groups)?;
    let warp = fb.b.build_int_signed_div(bl, c(32), "warp").map_err(be)?;
    fb.for_range(c(0), iters, |fb, it| {
        let u = fb.add(fb.mul(fb.add(blk, fb.mul(it, nblk)?)?, c(warps))?, warp)?;
        fb.if_else(lt(u, units)?, |fb| unit(fb, u), |_| Ok(()))
    })?;
    fb.ret_ok()
}

/// The split-KV merge (see `Kernel::AttentionCombine`), per query row. Scratch: the
/// `ATTN_SPLITS` weights `e^(m_c−M) / L`.
fn attention_combine(fb: &Fb, out: u32, part: u32, d: &crate::kernel::AttnDims) -> R<()> {
    let optr = fb.buf(out)?;
    let pptr = fb.buf(part)?;
    let (bv, tv, sv) = (fb.dim(&d.b)?, fb.dim(&d.t)?, fb.dim(&d.s)?);
    let dv = fb.i64c(d.dv);
    let units = fb.mul(fb.mul(bv, fb.i64c(d.h))?, tv)?;
    let nsplit = attn_splits(fb, units, sv)?;
    let split =
        fb.b.build_int_compare(IntPredicate::SGT, nsplit, fb.i64c(1), "split")
            .map_err(be)?;
    let (mx, lsum) = (fb.slot(fb.f32t.into())?, fb.slot(fb.f32t.into())?);
    let w = fb.scratch;
    fb.if_else(
        split,
        |fb| {
            fb.for_each_share(units, |fb, u| {
                let base = fb.mul(fb.mul(u, nsplit)?, fb.i64c(d.dv + 2))?;
                let at = |c, off| fb.add(base, fb.add(fb.mul(c, fb.i64c(d.dv + 2))?, off)?);
                fb.set(mx, fb.f32c(f64::NEG_INFINITY))?;
                fb.for_range(fb.i64c(0), nsplit, |fb, c| {
                    let m = fb.load_f32(pptr, at(c, dv)?)?;
                    fb.set(mx, fb.intrinsic("llvm.maxnum", &[fb.get(mx)?, m])?)
                })?;
                let big = fb.get(mx)?;
                fb.set(lsum, fb.f32c(0.0))?;
                fb.for_range(fb.i64c(0), nsplit, |fb, c| {
                    let m = fb.load_f32(pptr, at(c, dv)?)?;
                    let wc = fb.exp(fb.b.build_float_sub(m, big, "z").map_err(be)?)?;
                    fb.store_f32(w, c, wc)?;
                    let lc = fb.load_f32(pptr, at(c, fb.i64c(d.dv + 1))?)?;
                    fb.set(lsum, fb.fadd(fb.get(lsum)?, fb.fmul(lc, wc)?)?)
                })?;
                let inv =
                    fb.b.build_float_div(fb.f32c(1.0), fb.get(lsum)?, "inv")
                        .map_err(be)?;
                fb.for_range(fb.i64c(0), nsplit, |fb, c| {
                    fb.store_f32(w, c, fb.fmul(fb.load_f32(w, c)?, inv)?)
                })?;
                let obase = attn_out_row(fb, u, d)?;
                fb.for_range(fb.i64c(0), dv, |fb, j| {
                    fb.set(mx, fb.f32c(0.0))?;
                    fb.for_range(fb.i64c(0), nsplit, |fb, c| {
                        let a = fb.load_f32(pptr, at(c, j)?)?;
                        fb.set(mx, fb.fma_fast(fb.get(mx)?, a, fb.load_f32(w, c)?)?)
                    })?;
                    fb.store_f32(optr, fb.add(obase, j)?, fb.get(mx)?)
                })
            })
        },
        |_| Ok(()),
    )?;
    fb.ret_ok()
}

#[allow(clippy::too_many_arguments)]
/// The index at `pairs` of `ia`, continuing only when it lies in `0..len` (else to `bad`,
/// which returns the out-of-range error).
fn checked_index<'ctx>(
    fb: &Fb<'_, 'ctx>,
    ia: &Av<'ctx>,
    pairs: &[(usize, IntValue<'ctx>)],
    len: IntValue<'ctx>,
    bad: inkwell::basic_block::BasicBlock<'ctx>,
) -> R<IntValue<'ctx>> {
    let id = fb.load(ia, fb.at(ia, pairs)?)?.into_int_value();
    let neg =
        fb.b.build_int_compare(IntPredicate::SLT, id, fb.i64c(0), "neg")
            .map_err(be)?;
    let big =
        fb.b.build_int_compare(IntPredicate::SGE, id, len, "big")
            .map_err(be)?;
    let oob = fb.b.build_or(neg, big, "oob").map_err(be)?;
    let ok = fb.ctx.append_basic_block(fb.func, "ok");
    fb.b.build_conditional_branch(oob, bad, ok).map_err(be)?;
    fb.b.position_at_end(ok);
    Ok(id)
}

fn gather(
    fb: &Fb,
    out: u32,
    table: &Access,
    idx: &Access,
    tshape: &[Dim],
    ishape: &[Dim],
    axis: usize,
    elem: ElemType,
) -> R<()> {
    let ta = fb.access(table, elem)?;
    let ia = fb.access(idx, ElemType::I64)?;
    let optr = fb.buf(out)?;
    let outer: Vec<IntValue> = tshape[..axis].iter().map(|d| fb.dim(d)).collect::<R<_>>()?;
    let inner: Vec<IntValue> = tshape[axis + 1..]
        .iter()
        .map(|d| fb.dim(d))
        .collect::<R<_>>()?;
    let idims: Vec<IntValue> = ishape.iter().map(|d| fb.dim(d)).collect::<R<_>>()?;
    let len = fb.dim(&tshape[axis])?;
    let mut no = fb.i64c(1);
    for d in &outer {
        no = fb.mul(no, *d)?;
    }
    let mut ni = fb.i64c(1);
    for d in &idims {
        ni = fb.mul(ni, *d)?;
    }
    let mut ninner = fb.i64c(1);
    for d in &inner {
        ninner = fb.mul(ninner, *d)?;
    }
    let units = fb.mul(no, ni)?;
    let bad = fb.ctx.append_basic_block(fb.func, "bad");
    fb.for_each_share(units, |fb, u| {
        let o = fb.b.build_int_signed_div(u, ni, "o").map_err(be)?;
        let ii = fb.b.build_int_signed_rem(u, ni, "ii").map_err(be)?;
        let iidx = fb.decompose(ii, &idims)?;
        let ipairs: Vec<(usize, IntValue)> = iidx.iter().copied().enumerate().collect();
        let id = checked_index(fb, &ia, &ipairs, len, bad)?;
        let oidx = fb.decompose(o, &outer)?;
        let mut pairs: Vec<(usize, IntValue)> = oidx.iter().copied().enumerate().collect();
        pairs.push((axis, id));
        let base = fb.at(&ta, &pairs)?;
        let obase = fb.mul(u, ninner)?;
        fb.for_range(fb.i64c(0), ninner, |fb, c| {
            let iidx = fb.decompose(c, &inner)?;
            let mut at = base;
            for (i, v) in iidx.iter().enumerate() {
                at = fb.add(at, fb.mul(*v, ta.strides[axis + 1 + i])?)?;
            }
            let v = fb.load(&ta, at)?;
            fb.store(optr, elem, fb.add(obase, c)?, v)
        })
    })?;
    fb.ret_ok()?;
    fb.b.position_at_end(bad);
    fb.b.build_return(Some(&fb.ctx.i32_type().const_int(1, false)))
        .map_err(be)?;
    Ok(())
}

/// `scatter_add` (see `Kernel::ScatterAdd`): each thread zeroes its range of output rows,
/// then walks every index in order and adds the source rows that land in its range, so the
/// sums are deterministic and no two threads write the same row. Every thread checks every
/// index (an index outside `0..rows` returns 1).
fn scatter_add(
    fb: &Fb,
    out: u32,
    idx: &Access,
    src: &Access,
    ishape: &[Dim],
    rows: &Dim,
    inner: &[Dim],
) -> R<()> {
    let ia = fb.access(idx, ElemType::I64)?;
    let sa = fb.access(src, ElemType::F32)?;
    let optr = fb.buf(out)?;
    let idims: Vec<IntValue> = ishape.iter().map(|d| fb.dim(d)).collect::<R<_>>()?;
    let cdims: Vec<IntValue> = inner.iter().map(|d| fb.dim(d)).collect::<R<_>>()?;
    let nrows = fb.dim(rows)?;
    let mut ni = fb.i64c(1);
    for d in &idims {
        ni = fb.mul(ni, *d)?;
    }
    let mut nc = fb.i64c(1);
    for d in &cdims {
        nc = fb.mul(nc, *d)?;
    }
    let (s, e) = fb.split(nrows)?;
    fb.for_range(fb.mul(s, nc)?, fb.mul(e, nc)?, |fb, o| {
        fb.store_f32(optr, o, fb.f32c(0.0))
    })?;
    let bad = fb.ctx.append_basic_block(fb.func, "bad");
    fb.for_range(fb.i64c(0), ni, |fb, j| {
        let jidx = fb.decompose(j, &idims)?;
        let jpairs: Vec<(usize, IntValue)> = jidx.iter().copied().enumerate().collect();
        let id = checked_index(fb, &ia, &jpairs, nrows, bad)?;
        let lo =
            fb.b.build_int_compare(IntPredicate::SGE, id, s, "lo")
                .map_err(be)?;
        let hi =
            fb.b.build_int_compare(IntPredicate::SLT, id, e, "hi")
                .map_err(be)?;
        let mine = fb.b.build_and(lo, hi, "mine").map_err(be)?;
        let add_bb = fb.ctx.append_basic_block(fb.func, "add");
        let next = fb.ctx.append_basic_block(fb.func, "next");
        fb.b.build_conditional_branch(mine, add_bb, next)
            .map_err(be)?;
        fb.b.position_at_end(add_bb);
        let base = fb.at(&sa, &jpairs)?;
        let obase = fb.mul(id, nc)?;
        let r = idims.len();
        fb.for_range(fb.i64c(0), nc, |fb, c| {
            let cidx = fb.decompose(c, &cdims)?;
            let mut at = base;
            for (i, v) in cidx.iter().enumerate() {
                at = fb.add(at, fb.mul(*v, sa.strides[r + i])?)?;
            }
            let o = fb.add(obase, c)?;
            let sum = fb.fadd(fb.load_f32(optr, o)?, fb.load(&sa, at)?.into_float_value())?;
            fb.store_f32(optr, o, sum)
        })?;
        fb.b.build_unconditional_branch(next).map_err(be)?;
        fb.b.position_at_end(next);
        Ok(())
    })?;
    fb.ret_ok()?;
    fb.b.position_at_end(bad);
    fb.b.build_return(Some(&fb.ctx.i32_type().const_int(1, false)))
        .map_err(be)?;
    Ok(())
}

/// GEMM blocking. `gemm_mr(nr)` rows × `nr` columns (two vectors) of accumulators live in
/// registers: 12 × 2 = 24 of AVX-512's 32 registers, 6 × 2 = 12 of AVX2's 16, leaving room
/// for the two weight vectors and the broadcast row value. A weight panel's slice of `KC`
/// rows (`KC·nr` floats, 64 KiB at nr = 32) is read from L2 (the next panel's slice is
/// prefetched there while this one runs: 128 bytes per 24 FMAs, well within L2's bandwidth),
/// and each output tile is loaded and stored once per `KC` (a `KC` of 512 against 256:
/// sgemm 2048³ 229 → 256 GFLOP/s on 2 threads, 138 → 142 on one, prefill 655 → 701 tok/s,
/// in alternating runs); `gemm_mc(nr)` rows of `a` (`MC·KC` floats, 144 KiB at MR 12) stay
/// in L2 while every panel of the thread passes over them.
const GEMM_KC: i64 = 512;
// (`Q8` panels: a GEMM's k blocks start on a scale block)
const _: () = assert!(GEMM_KC % Q8_BLOCK == 0);

/// `KC` of the run-time GEMM (`packed_matmul`), whose threads pack `KC × nr` slices of `w`
/// as they go into scratch (32 KiB at nr = 32, so a slice stays in L1 across the rows).
const RT_GEMM_KC: i64 = 256;

fn gemm_mr(nr: i64) -> i64 {
    if nr >= 32 {
        12
    } else {
        6
    }
}

/// Scratch floats of a GEMM with `k`-long rows: one output tile, the chunk's row scales, its
/// rows of `a` packed for every k block, and for `Q8` panels one k block of a panel widened
/// to f32 (`gemm_dequant_at`).
fn gemm_scratch(nr: i64, k: i64, panel: PanelType) -> usize {
    let widened = match panel {
        PanelType::Q8 => GEMM_KC * nr,
        _ => 0,
    };
    (gemm_dequant_at(nr, k) + widened) as usize
}

/// Where in a GEMM's scratch (in floats) a `Q8` panel's k block widened to f32 goes: after
/// the tile, the row scales and the packed rows of `a`.
fn gemm_dequant_at(nr: i64, k: i64) -> i64 {
    let kblocks = (k + GEMM_KC - 1) / GEMM_KC;
    gemm_mr(nr) * nr + gemm_mc(nr) + gemm_mc(nr) * GEMM_KC * kblocks.max(1)
}

/// Units of work per thread a blocked GEMM cuts its chunks into when they are few (one
/// chunk: this many ranges of panels per thread), so threads can balance.
const GEMM_UNITS_PER_THREAD: i64 = 8;

/// Rows of `a` per L2 block: six register blocks.
fn gemm_mc(nr: i64) -> i64 {
    6 * gemm_mr(nr)
}
/// Panels a thread packs together: each row of the weights is then read up to
/// `PACK_BLOCK · nr` columns at a time (2 KiB at nr = 32), not one panel's width per page.
const PACK_BLOCK: i64 = 16;

/// Panel rows (k steps) ahead that the micro-kernel prefetches: 4 KiB of bf16 panels, 8 KiB
/// of f32 (decode streams one panel after another; 16 rows ahead measured 9% slower, in
/// alternating runs, for both f32 and bf16 decode).
const PREFETCH_ROWS: i64 = 64;

/// Bytes per cache line (x86).
const CACHE_LINE: i64 = 64;

fn pack_panels(fb: &Fb, out: u32, w: &Access, k: i64, n: i64, nr: i64, store: PanelType) -> R<()> {
    let wav = fb.access(w, ElemType::F32)?;
    let optr = fb.buf(out)?;
    let panels = (n + nr - 1) / nr;
    let (s, e) = fb.split(fb.i64c(panels))?;
    let blocks =
        fb.b.build_int_signed_div(
            fb.add(
                fb.b.build_int_sub(e, s, "np").map_err(be)?,
                fb.i64c(PACK_BLOCK - 1),
            )?,
            fb.i64c(PACK_BLOCK),
            "nb",
        )
        .map_err(be)?;
    fb.for_range(fb.i64c(0), blocks, |fb, blk| {
        let p0 = fb.add(s, fb.mul(blk, fb.i64c(PACK_BLOCK))?)?;
        let p1 = fb.add(p0, fb.i64c(PACK_BLOCK))?;
        let short =
            fb.b.build_int_compare(IntPredicate::SLT, e, p1, "short")
                .map_err(be)?;
        let p1 =
            fb.b.build_select(short, e, p1, "p1")
                .map_err(be)?
                .into_int_value();
        fb.for_range(fb.i64c(0), fb.i64c(k), |fb, kk| {
            fb.for_range(p0, p1, |fb, p| {
                fb.for_range(fb.i64c(0), fb.i64c(nr), |fb, j| {
                    let v = panel_column(fb, &wav, p, j, nr, n)?(fb, kk)?;
                    let o = fb.add(fb.mul(fb.add(fb.mul(p, fb.i64c(k))?, kk)?, fb.i64c(nr))?, j)?;
                    match store {
                        PanelType::Q8 => Err(BackendError::Unsupported(
                            "int8 panels are packed by pack_panels_q8".into(),
                        )),
                        PanelType::F32 => fb.store_f32(optr, o, v),
                        PanelType::BF16 | PanelType::F16 => {
                            let bits = if store == PanelType::BF16 {
                                let r = round_bf16(fb, v)?;
                                let i =
                                    fb.b.build_bit_cast(r, fb.ctx.i32_type(), "bits")
                                        .map_err(be)?
                                        .into_int_value();
                                let hi =
                                    fb.b.build_right_shift(
                                        i,
                                        fb.ctx.i32_type().const_int(16, false),
                                        false,
                                        "hi",
                                    )
                                    .map_err(be)?;
                                fb.b.build_int_truncate(hi, fb.ctx.i16_type(), "h")
                                    .map_err(be)?
                            } else {
                                let h =
                                    fb.b.build_float_trunc(v, fb.ctx.f16_type(), "h")
                                        .map_err(be)?;
                                fb.b.build_bit_cast(h, fb.ctx.i16_type(), "hb")
                                    .map_err(be)?
                                    .into_int_value()
                            };
                            let pp = unsafe {
                                fb.b.build_in_bounds_gep(fb.ctx.i16_type(), optr, &[o], "p")
                            }
                            .map_err(be)?;
                            fb.b.build_store(pp, bits).map_err(be)?;
                            Ok(())
                        }
                    }
                })
            })
        })
    })?;
    fb.ret_ok()
}

/// A reader of the weights `w[kk, col]` of column `j` of panel `p` (`col = p·nr + j`) by
/// row `kk`: zero past the last column `n`, where a panel has fewer.
#[allow(clippy::type_complexity)]
fn panel_column<'a, 'ctx>(
    fb: &Fb<'a, 'ctx>,
    wav: &'a Av<'ctx>,
    p: IntValue<'ctx>,
    j: IntValue<'ctx>,
    nr: i64,
    n: i64,
) -> R<impl Fn(&Fb<'a, 'ctx>, IntValue<'ctx>) -> R<FloatValue<'ctx>> + 'a> {
    let col = fb.add(fb.mul(p, fb.i64c(nr))?, j)?;
    let inside =
        fb.b.build_int_compare(IntPredicate::SLT, col, fb.i64c(n), "in")
            .map_err(be)?;
    let safe =
        fb.b.build_select(inside, col, fb.i64c(0), "c")
            .map_err(be)?
            .into_int_value();
    Ok(move |fb: &Fb<'a, 'ctx>, kk: IntValue<'ctx>| {
        let at = fb.add(
            fb.add(wav.off, fb.mul(kk, wav.strides[0])?)?,
            fb.mul(safe, wav.strides[1])?,
        )?;
        let v = fb.load_f32(wav.ptr, at)?;
        fb.fsel(inside, v, fb.f32c(0.0))
    })
}

/// Packs a `k × n` weight into `PanelType::Q8` panels (layout: `PanelType::panel_bytes`).
/// Rule q8-block: for each panel column `j` and block `b` of `Q8_BLOCK` rows of k,
/// `s = max_k |w[k, j]| / 127` and `q[k, j] = round(w[k, j] / s)` (to nearest even; 0 where
/// `s = 0`), so `|w − s·q| ≤ s / 2`; columns past `n` are zero with scale 0. A NaN weight
/// becomes 0. Threads take whole panels.
fn pack_panels_q8<'ctx>(fb: &Fb<'_, 'ctx>, out: u32, w: &Access, k: i64, n: i64, nr: i64) -> R<()> {
    let wav = fb.access(w, ElemType::F32)?;
    let optr = fb.buf(out)?;
    let panels = (n + nr - 1) / nr;
    let kb = (k + Q8_BLOCK - 1) / Q8_BLOCK;
    if nr % 4 != 0 {
        return Err(BackendError::Unsupported(format!(
            "int8 panels of {nr} columns: their f32 scales would not be 4-byte aligned"
        )));
    }
    let i8t = fb.ctx.i8_type();
    // The scales follow the values.
    let sptr = unsafe {
        fb.b.build_in_bounds_gep(i8t, optr, &[fb.i64c(panels * k * nr)], "sp")
    }
    .map_err(be)?;
    let (s, e) = fb.split(fb.i64c(panels))?;
    let absmax = fb.slot(fb.f32t.into())?;
    fb.for_range(s, e, |fb, p| {
        fb.for_range(fb.i64c(0), fb.i64c(kb), |fb, b| {
            let k0 = fb.mul(b, fb.i64c(Q8_BLOCK))?;
            let k1 = fb.imin(fb.add(k0, fb.i64c(Q8_BLOCK))?, fb.i64c(k))?;
            fb.for_range(fb.i64c(0), fb.i64c(nr), |fb, j| {
                let at = panel_column(fb, &wav, p, j, nr, n)?;
                fb.set(absmax, fb.f32c(0.0))?;
                fb.for_range(k0, k1, |fb, kk| {
                    let a = fb.intrinsic("llvm.fabs", &[at(fb, kk)?])?;
                    fb.set(absmax, fb.intrinsic("llvm.maxnum", &[fb.get(absmax)?, a])?)
                })?;
                let m = fb.get(absmax)?;
                let scale = fb.b.build_float_div(m, fb.f32c(127.0), "s").map_err(be)?;
                let some = fb.fcmp(FloatPredicate::OGT, m, fb.f32c(0.0))?;
                let inv = fb.b.build_float_div(fb.f32c(127.0), m, "inv").map_err(be)?;
                let inv = fb.fsel(some, inv, fb.f32c(0.0))?;
                let si = fb.add(fb.mul(fb.add(fb.mul(p, fb.i64c(kb))?, b)?, fb.i64c(nr))?, j)?;
                fb.store_f32(sptr, si, scale)?;
                fb.for_range(k0, k1, |fb, kk| {
                    let x = fb.b.build_float_mul(at(fb, kk)?, inv, "x").map_err(be)?;
                    // (clamped, NaN to 0: a NaN or infinite weight, or a block too small
                    // for 127 / max, must not reach the conversion, where it is undefined)
                    let r = fb.intrinsic("llvm.roundeven", &[x])?;
                    let r = fb.intrinsic("llvm.minnum", &[r, fb.f32c(127.0)])?;
                    let r = fb.intrinsic("llvm.maxnum", &[r, fb.f32c(-127.0)])?;
                    let nan = fb.fcmp(FloatPredicate::UNO, x, x)?;
                    let r = fb.fsel(nan, fb.f32c(0.0), r)?;
                    let q = fb.b.build_float_to_signed_int(r, i8t, "q").map_err(be)?;
                    let o = fb.add(fb.mul(fb.add(fb.mul(p, fb.i64c(k))?, kk)?, fb.i64c(nr))?, j)?;
                    let pp =
                        unsafe { fb.b.build_in_bounds_gep(i8t, optr, &[o], "p") }.map_err(be)?;
                    fb.b.build_store(pp, q).map_err(be)?;
                    Ok(())
                })
            })
        })
    })?;
    fb.ret_ok()
}

/// The `mr × nr` micro-kernel: `c[r, 0..nr] (+)= Σ_{k<kl} a[r·lda + k·ka] · bp[k·nr .. k·nr+nr]`
/// (`ka = 1` for rows of `a` in place, `lda = 1, ka = mr` for a packed block), then, if
/// `scale` is not null, `c[r, :] *= scale[r]`. One function per (mr, nr) per module.
fn ukernel<'ctx>(
    fb: &Fb<'_, 'ctx>,
    mr: i64,
    nr: i64,
    panel: PanelType,
    cpu_attrs: &[inkwell::attributes::Attribute],
) -> R<FunctionValue<'ctx>> {
    let name = format!("egret_ukernel_{mr}x{nr}_{panel:?}");
    if let Some(f) = fb.module.get_function(&name) {
        return Ok(f);
    }
    let ctx = fb.ctx;
    let (ptrt, i64t, f32t) = (
        ctx.ptr_type(AddressSpace::default()),
        ctx.i64_type(),
        ctx.f32_type(),
    );
    let vw = (nr / 2) as u32;
    let vt = f32t.vec_type(vw);
    let nv = (nr as u32) / vw;
    let fty = ctx.void_type().fn_type(
        &[
            ptrt.into(),
            i64t.into(),
            ptrt.into(),
            ptrt.into(),
            i64t.into(),
            i64t.into(),
            ctx.bool_type().into(),
            ptrt.into(),
            i64t.into(),
            ptrt.into(),
            ptrt.into(),
        ],
        false,
    );
    let f = fb.module.add_function(&name, fty, Some(Linkage::Internal));
    for a in cpu_attrs {
        f.add_attribute(AttributeLoc::Function, *a);
    }
    let b = ctx.create_builder();
    let entry = ctx.append_basic_block(f, "entry");
    b.position_at_end(entry);
    let p = |i: u32| f.get_nth_param(i).expect("param");
    let (a, lda, bp, c, ldc, kl, first, scale, ka, next) = (
        p(0).into_pointer_value(),
        p(1).into_int_value(),
        p(2).into_pointer_value(),
        p(3).into_pointer_value(),
        p(4).into_int_value(),
        p(5).into_int_value(),
        p(6).into_int_value(),
        p(7).into_pointer_value(),
        p(8).into_int_value(),
        p(9).into_pointer_value(),
    );
    // Q8 panels: the scales of this slice's first k block (`[k block][nr]`), else null.
    let qs = p(10).into_pointer_value();
    let fma = Intrinsic::find("llvm.fma")
        .expect("fma")
        .get_declaration(fb.module, &[vt.into()])
        .expect("fma decl");
    let i64c = |v: i64| i64t.const_int(v as u64, true);
    let gep = |ty: BasicTypeEnum<'ctx>, base: PointerValue<'ctx>, idx: IntValue<'ctx>| {
        unsafe { b.build_in_bounds_gep(ty, base, &[idx], "p") }.map_err(be)
    };
    let vload = |ptr: PointerValue<'ctx>| -> R<inkwell::values::VectorValue<'ctx>> {
        let v = b.build_load(vt, ptr, "vl").map_err(be)?;
        v.as_instruction_value()
            .expect("load")
            .set_alignment(4)
            .map_err(be)?;
        Ok(v.into_vector_value())
    };
    let splat = |x: FloatValue<'ctx>| -> R<inkwell::values::VectorValue<'ctx>> {
        let undef = vt.get_undef();
        let v = b
            .build_insert_element(undef, x, i64c(0), "ins")
            .map_err(be)?;
        let mask = ctx.i32_type().vec_type(vw).const_zero();
        b.build_shuffle_vector(v, undef, mask, "splat").map_err(be)
    };
    // Accumulators start at zero or at c.
    let mut acc: Vec<Vec<inkwell::values::VectorValue<'ctx>>> = vec![];
    let zero_bb = ctx.append_basic_block(f, "zero");
    let load_bb = ctx.append_basic_block(f, "load");
    let loop_pre = ctx.append_basic_block(f, "pre");
    b.build_conditional_branch(first, zero_bb, load_bb)
        .map_err(be)?;
    b.position_at_end(load_bb);
    let mut loaded = vec![];
    for r in 0..mr {
        for v in 0..nv as i64 {
            let idx = b
                .build_int_add(
                    b.build_int_mul(i64c(r), ldc, "").map_err(be)?,
                    i64c(v * vw as i64),
                    "",
                )
                .map_err(be)?;
            loaded.push(vload(gep(f32t.into(), c, idx)?)?);
        }
    }
    b.build_unconditional_branch(loop_pre).map_err(be)?;
    b.position_at_end(zero_bb);
    b.build_unconditional_branch(loop_pre).map_err(be)?;
    b.position_at_end(loop_pre);
    for (i, lv) in loaded.iter().enumerate() {
        let phi = b.build_phi(vt, "acc0").map_err(be)?;
        phi.add_incoming(&[(lv, load_bb), (&vt.const_zero(), zero_bb)]);
        if i % nv as usize == 0 {
            acc.push(vec![]);
        }
        acc.last_mut()
            .expect("row")
            .push(phi.as_basic_value().into_vector_value());
    }
    // k loop with the accumulators as phis.
    let head = ctx.append_basic_block(f, "k");
    let body = ctx.append_basic_block(f, "kbody");
    let exit = ctx.append_basic_block(f, "kexit");
    b.build_unconditional_branch(head).map_err(be)?;
    b.position_at_end(head);
    let kphi = b.build_phi(i64t, "kk").map_err(be)?;
    kphi.add_incoming(&[(&i64c(0), loop_pre)]);
    let mut aphis = vec![];
    for row in &acc {
        let mut rp = vec![];
        for v in row {
            let ph = b.build_phi(vt, "acc").map_err(be)?;
            ph.add_incoming(&[(v, loop_pre)]);
            rp.push(ph);
        }
        aphis.push(rp);
    }
    let kk = kphi.as_basic_value().into_int_value();
    let cond = b
        .build_int_compare(IntPredicate::SLT, kk, kl, "c")
        .map_err(be)?;
    b.build_conditional_branch(cond, body, exit).map_err(be)?;
    b.position_at_end(body);
    let boff = b.build_int_mul(kk, i64c(nr), "bo").map_err(be)?;
    // Prefetch the weights a few rows ahead: with one row (decode) the kernel is a pure
    // stream over the packed panels and the hardware prefetcher alone falls behind.
    {
        let pf = Intrinsic::find("llvm.prefetch")
            .expect("prefetch")
            .get_declaration(fb.module, &[ptrt.into()])
            .expect("prefetch decl");
        let ety: BasicTypeEnum = match panel {
            PanelType::F32 => f32t.into(),
            PanelType::BF16 | PanelType::F16 => ctx.i16_type().into(),
            PanelType::Q8 => ctx.i8_type().into(),
        };
        // One prefetch per cache line of a panel row (two for f32 rows of 32).
        let elem_bytes = panel.value_bytes();
        let lines = ((nr * elem_bytes + CACHE_LINE - 1) / CACHE_LINE).max(1);
        let i32t = ctx.i32_type();
        // `llvm.prefetch(base + at, read, locality)`: 3 keeps the line in L1, 2 in L2.
        let prefetch = |base: PointerValue<'ctx>, at: i64, locality: u64| -> R<()> {
            let idx = b.build_int_add(boff, i64c(at), "pf").map_err(be)?;
            let addr = unsafe { b.build_gep(ety, base, &[idx], "pfa") }.map_err(be)?;
            b.build_call(
                pf,
                &[
                    addr.into(),
                    i32t.const_zero().into(),
                    i32t.const_int(locality, false).into(),
                    i32t.const_int(1, false).into(),
                ],
                "",
            )
            .map_err(be)?;
            Ok(())
        };
        for line in 0..lines {
            let in_row = line * CACHE_LINE / elem_bytes;
            prefetch(bp, PREFETCH_ROWS * nr + in_row, 3)?;
            // The same row of the panel the caller goes on to next, into L2 only.
            prefetch(next, in_row, 2)?;
        }
    }
    let bvs: Vec<inkwell::values::VectorValue<'ctx>> = (0..nv as i64)
        .map(|v| -> R<inkwell::values::VectorValue<'ctx>> {
            let idx = b.build_int_add(boff, i64c(v * vw as i64), "").map_err(be)?;
            match panel {
                PanelType::F32 => vload(gep(f32t.into(), bp, idx)?),
                PanelType::Q8 => {
                    let blk = b
                        .build_right_shift(kk, i64c(Q8_BLOCK.trailing_zeros() as i64), false, "kb")
                        .map_err(be)?;
                    let sidx = b
                        .build_int_add(
                            b.build_int_mul(blk, i64c(nr), "").map_err(be)?,
                            i64c(v * vw as i64),
                            "si",
                        )
                        .map_err(be)?;
                    let q = gep(ctx.i8_type().into(), bp, idx)?;
                    q8_vector(&b, vt, q, gep(f32t.into(), qs, sidx)?)
                }
                PanelType::BF16 | PanelType::F16 => {
                    let ht = ctx.i16_type().vec_type(vw);
                    let hv = b
                        .build_load(ht, gep(ctx.i16_type().into(), bp, idx)?, "hl")
                        .map_err(be)?;
                    hv.as_instruction_value()
                        .expect("load")
                        .set_alignment(2)
                        .map_err(be)?;
                    let hv = hv.into_vector_value();
                    if panel == PanelType::BF16 {
                        // bf16 -> f32: the bits become the high half of the f32.
                        let wide = b
                            .build_int_z_extend(hv, ctx.i32_type().vec_type(vw), "z")
                            .map_err(be)?;
                        let sh = b
                            .build_left_shift(
                                wide,
                                inkwell::types::VectorType::const_vector(&vec![
                                    ctx.i32_type()
                                        .const_int(
                                            16, false
                                        );
                                    vw as usize
                                ]),
                                "s",
                            )
                            .map_err(be)?;
                        Ok(b.build_bit_cast(sh, vt, "f")
                            .map_err(be)?
                            .into_vector_value())
                    } else {
                        let h = b
                            .build_bit_cast(hv, ctx.f16_type().vec_type(vw), "h")
                            .map_err(be)?
                            .into_vector_value();
                        Ok(b.build_float_ext(h, vt, "f").map_err(be)?)
                    }
                }
            }
        })
        .collect::<R<_>>()?;
    let mut new_acc = vec![];
    for (r, row) in aphis.iter().enumerate() {
        let aidx = b
            .build_int_add(
                b.build_int_mul(i64c(r as i64), lda, "").map_err(be)?,
                b.build_int_mul(kk, ka, "").map_err(be)?,
                "",
            )
            .map_err(be)?;
        let av = b
            .build_load(f32t, gep(f32t.into(), a, aidx)?, "a")
            .map_err(be)?
            .into_float_value();
        let asp = splat(av)?;
        let mut nrow = vec![];
        for (v, ph) in row.iter().enumerate() {
            let cur = ph.as_basic_value().into_vector_value();
            let r = b
                .build_call(fma, &[asp.into(), bvs[v].into(), cur.into()], "fma")
                .map_err(be)?;
            nrow.push(
                r.try_as_basic_value()
                    .basic()
                    .expect("fma value")
                    .into_vector_value(),
            );
        }
        new_acc.push(nrow);
    }
    let knext = b.build_int_add(kk, i64c(1), "kn").map_err(be)?;
    let latch = b.get_insert_block().expect("block");
    kphi.add_incoming(&[(&knext, latch)]);
    for (row, nrow) in aphis.iter().zip(&new_acc) {
        for (ph, nv_) in row.iter().zip(nrow) {
            ph.add_incoming(&[(nv_, latch)]);
        }
    }
    b.build_unconditional_branch(head).map_err(be)?;
    b.position_at_end(exit);
    // Optional row scale, then store.
    let has_scale = b.build_is_not_null(scale, "hs").map_err(be)?;
    let scale_bb = ctx.append_basic_block(f, "scale");
    let store_bb = ctx.append_basic_block(f, "store");
    let exit_bb = b.get_insert_block().expect("block");
    b.build_conditional_branch(has_scale, scale_bb, store_bb)
        .map_err(be)?;
    b.position_at_end(scale_bb);
    let mut scaled = vec![];
    for (r, row) in aphis.iter().enumerate() {
        let sv = b
            .build_load(f32t, gep(f32t.into(), scale, i64c(r as i64))?, "s")
            .map_err(be)?
            .into_float_value();
        let ssp = splat(sv)?;
        for ph in row {
            scaled.push(
                b.build_float_mul(ph.as_basic_value().into_vector_value(), ssp, "sc")
                    .map_err(be)?,
            );
        }
    }
    b.build_unconditional_branch(store_bb).map_err(be)?;
    b.position_at_end(store_bb);
    let mut fins = vec![];
    let mut i = 0;
    for row in aphis.iter() {
        for ph in row.iter() {
            let fin = b.build_phi(vt, "fin").map_err(be)?;
            fin.add_incoming(&[
                (&ph.as_basic_value().into_vector_value(), exit_bb),
                (&scaled[i], scale_bb),
            ]);
            i += 1;
            fins.push(fin);
        }
    }
    let mut fins = fins.into_iter();
    for (r, row) in aphis.iter().enumerate() {
        for (v, _) in row.iter().enumerate() {
            let fin = fins.next().expect("one per accumulator");
            let idx = b
                .build_int_add(
                    b.build_int_mul(i64c(r as i64), ldc, "").map_err(be)?,
                    i64c(v as i64 * vw as i64),
                    "",
                )
                .map_err(be)?;
            let st = b
                .build_store(gep(f32t.into(), c, idx)?, fin.as_basic_value())
                .map_err(be)?;
            st.set_alignment(4).map_err(be)?;
        }
    }
    b.build_return(None).map_err(be)?;
    Ok(f)
}

/// Rows left after the full register blocks go in blocks of this many, then one at a time.
const TAIL_MR: i64 = 4;

/// Calls `call(fb, r0, mr, f)` over `rows` rows: blocks of the first size while they fit,
/// then of the next, down to single rows.
fn row_blocks<'ctx>(
    fb: &Fb<'_, 'ctx>,
    rows: IntValue<'ctx>,
    sizes: [(i64, FunctionValue<'ctx>); 3],
    call: &dyn Fn(&Fb<'_, 'ctx>, IntValue<'ctx>, i64, FunctionValue<'ctx>) -> R<()>,
) -> R<()> {
    let mut start = fb.i64c(0);
    for (mr, f) in sizes {
        let left = fb.b.build_int_sub(rows, start, "left").map_err(be)?;
        let n =
            fb.b.build_int_signed_div(left, fb.i64c(mr), "nb")
                .map_err(be)?;
        let s0 = start;
        fb.for_range(fb.i64c(0), n, |fb, i| {
            call(fb, fb.add(s0, fb.mul(i, fb.i64c(mr))?)?, mr, f)
        })?;
        start = fb.add(start, fb.mul(n, fb.i64c(mr))?)?;
    }
    Ok(())
}

/// `inv[r] = 1 / sqrt(mean(a[base + r·lda .. + k]²) + eps)` for `r < rows`: the row scales
/// of `rms_norm` that the GEMMs apply to their sums.
fn inv_rms_rows<'ctx>(
    fb: &Fb<'_, 'ctx>,
    a: PointerValue<'ctx>,
    [base, lda, rows, k]: [IntValue<'ctx>; 4],
    eps: f64,
    inv: PointerValue<'ctx>,
) -> R<()> {
    let acc = fb.slot(fb.f32t.into())?;
    let kf =
        fb.b.build_signed_int_to_float(k, fb.f32t, "k")
            .map_err(be)?;
    fb.for_range(fb.i64c(0), rows, |fb, r| {
        let row = fb.add(base, fb.mul(r, lda)?)?;
        fb.set(acc, fb.f32c(0.0))?;
        fb.for_range(fb.i64c(0), k, |fb, kk| {
            let x = fb.load_f32(a, fb.add(row, kk)?)?;
            fb.set(acc, fb.fma_fast(fb.get(acc)?, x, x)?)
        })?;
        let mean = fb.b.build_float_div(fb.get(acc)?, kf, "mean").map_err(be)?;
        let sq = fb.intrinsic("llvm.sqrt", &[fb.fadd(mean, fb.f32c(eps))?])?;
        fb.store_f32(
            inv,
            r,
            fb.b.build_float_div(fb.f32c(1.0), sq, "inv").map_err(be)?,
        )
    })
}

/// One micro-kernel call `f` (`mr × nr`) on the rows at `a` (row stride `lda`) against the
/// packed slice `bp` (with `qs` its Q8 scales, else null), into `c` (row stride `ldc`), `kl`
/// steps: straight into `c` when the
/// panel has all `nr` columns, else through the scratch `tile` (its `cols` columns copied
/// in, computed, copied out). With `row_scale = (inv, r, last)`, when `last` (the sums are
/// complete) the rows are scaled by `inv[r..r + mr]` (rms_norm).
#[allow(clippy::too_many_arguments)]
fn ukernel_call<'ctx>(
    fb: &Fb<'_, 'ctx>,
    f: FunctionValue<'ctx>,
    mr: i64,
    nr: i64,
    [a, bp, c, tile, next, qs]: [PointerValue<'ctx>; 6],
    [lda, ka, ldc, cols, kl]: [IntValue<'ctx>; 5],
    first: IntValue<'ctx>,
    row_scale: Option<(PointerValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>)>,
) -> R<()> {
    let null = fb.ctx.ptr_type(AddressSpace::default()).const_null();
    let scale = match row_scale {
        Some((inv, r, last)) => {
            let s = unsafe { fb.b.build_in_bounds_gep(fb.f32t, inv, &[r], "sp") }.map_err(be)?;
            fb.b.build_select(last, s, null, "sc")
                .map_err(be)?
                .into_pointer_value()
        }
        None => null,
    };
    let full =
        fb.b.build_int_compare(IntPredicate::EQ, cols, fb.i64c(nr), "full")
            .map_err(be)?;
    let full_bb = fb.ctx.append_basic_block(fb.func, "full");
    let part_bb = fb.ctx.append_basic_block(fb.func, "part");
    let done_bb = fb.ctx.append_basic_block(fb.func, "done");
    fb.b.build_conditional_branch(full, full_bb, part_bb)
        .map_err(be)?;
    fb.b.position_at_end(full_bb);
    let args = |c: PointerValue<'ctx>, ldc: IntValue<'ctx>| {
        [
            a.into(),
            lda.into(),
            bp.into(),
            c.into(),
            ldc.into(),
            kl.into(),
            first.into(),
            scale.into(),
            ka.into(),
            next.into(),
            qs.into(),
        ]
    };
    fb.b.build_call(f, &args(c, ldc), "").map_err(be)?;
    fb.b.build_unconditional_branch(done_bb).map_err(be)?;
    fb.b.position_at_end(part_bb);
    fb.for_range(fb.i64c(0), fb.i64c(mr), |fb, r| {
        fb.for_range(fb.i64c(0), cols, |fb, j| {
            let v = fb.load_f32(c, fb.add(fb.mul(r, ldc)?, j)?)?;
            fb.store_f32(tile, fb.add(fb.mul(r, fb.i64c(nr))?, j)?, v)
        })
    })?;
    fb.b.build_call(f, &args(tile, fb.i64c(nr)), "")
        .map_err(be)?;
    fb.for_range(fb.i64c(0), fb.i64c(mr), |fb, r| {
        fb.for_range(fb.i64c(0), cols, |fb, j| {
            let v = fb.load_f32(tile, fb.add(fb.mul(r, fb.i64c(nr))?, j)?)?;
            fb.store_f32(c, fb.add(fb.mul(r, ldc)?, j)?, v)
        })
    })?;
    fb.b.build_unconditional_branch(done_bb).map_err(be)?;
    fb.b.position_at_end(done_bb);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn gemm<'ctx>(
    fb: &Fb<'_, 'ctx>,
    out: u32,
    a: &Access,
    bp: u32,
    rows: &[Dim],
    k: i64,
    n: i64,
    nr: i64,
    norm: Option<f64>,
    panel: PanelType,
) -> R<()> {
    let attrs: Vec<_> = fb.func.attributes(AttributeLoc::Function);
    let uk = ukernel(fb, gemm_mr(nr), nr, panel, &attrs)?;
    let uk4 = ukernel(fb, TAIL_MR, nr, panel, &attrs)?;
    let uk1 = ukernel(fb, 1, nr, panel, &attrs)?;
    // Q8 with rows to block for: each k block of a panel is widened to f32 once per chunk of
    // rows (into `deq`) and run by the f32 micro-kernels, instead of widened again by every
    // row block; decode (few rows) streams the int8 panels through the Q8 micro-kernels.
    let widen = match panel {
        PanelType::Q8 => {
            let uks = [
                (
                    gemm_mr(nr),
                    ukernel(fb, gemm_mr(nr), nr, PanelType::F32, &attrs)?,
                ),
                (TAIL_MR, ukernel(fb, TAIL_MR, nr, PanelType::F32, &attrs)?),
                (1, ukernel(fb, 1, nr, PanelType::F32, &attrs)?),
            ];
            let at = fb.i64c(gemm_dequant_at(nr, k));
            let deq = unsafe { fb.b.build_in_bounds_gep(fb.f32t, fb.scratch, &[at], "deq") }
                .map_err(be)?;
            Some((uks, deq))
        }
        _ => None,
    };
    let pty: BasicTypeEnum = match panel {
        PanelType::F32 => fb.f32t.into(),
        PanelType::BF16 | PanelType::F16 => fb.ctx.i16_type().into(),
        PanelType::Q8 => fb.ctx.i8_type().into(),
    };
    let aav = fb.access(a, ElemType::F32)?;
    let (optr, bptr) = (fb.buf(out)?, fb.buf(bp)?);
    let mut total = fb.i64c(1);
    for d in rows {
        total = fb.mul(total, fb.dim(d)?)?;
    }
    let lda = aav.strides[0];
    let panels = (n + nr - 1) / nr;
    let tile = fb.scratch;
    let inv = unsafe {
        fb.b.build_in_bounds_gep(fb.f32t, fb.scratch, &[fb.i64c(gemm_mr(nr) * nr)], "inv")
    }
    .map_err(be)?;
    let nchunks =
        fb.b.build_int_signed_div(
            fb.add(total, fb.i64c(gemm_mc(nr) - 1))?,
            fb.i64c(gemm_mc(nr)),
            "nch",
        )
        .map_err(be)?;
    // With few rows (decode) there is no reuse to block for: stream each panel whole.
    let few =
        fb.b.build_int_compare(IntPredicate::SLE, total, fb.i64c(gemm_mr(nr)), "few")
            .map_err(be)?;
    let kcs =
        fb.b.build_select(few, fb.i64c(k), fb.i64c(GEMM_KC.min(k)), "kcs")
            .map_err(be)?
            .into_int_value();
    let kblocks =
        fb.b.build_int_signed_div(fb.add(fb.i64c(k - 1), kcs)?, kcs, "kblocks")
            .map_err(be)?;
    let last_kb =
        fb.b.build_int_sub(kblocks, fb.i64c(1), "lastkb")
            .map_err(be)?;
    // The chunk's full register blocks of `a`, packed k-major per block (`KC × MR`) for each
    // k block, so the micro-kernel's broadcasts read consecutive floats, not MR rows `lda`
    // apart (which share cache sets when `lda` is a multiple of 1 KiB).
    let mr_full = gemm_mr(nr);
    let apack = unsafe {
        fb.b.build_in_bounds_gep(
            fb.f32t,
            fb.scratch,
            &[fb.i64c(mr_full * nr + gemm_mc(nr))],
            "apack",
        )
    }
    .map_err(be)?;
    let pack_a = fb.b.build_not(few, "packa").map_err(be)?;
    // Work is claimed by threads as they go: decode (a single block of rows, nothing
    // packed) takes guided ranges of panels; blocked GEMMs take fixed units, a chunk of rows
    // × a range of panels (chunk-major; at least 8 units per thread when chunks are few), so
    // each thread packs a chunk's rows once for all the units of it that it takes.
    let per_chunk = fb.add(
        fb.i64c(1),
        fb.b.build_int_signed_div(fb.i64c(GEMM_UNITS_PER_THREAD - 1), nchunks, "pc")
            .map_err(be)?,
    )?;
    // Where the packed block of `a` starting at chunk row `r0` (a multiple of MR) of k block
    // `kb` lies in the scratch: `kb·MC·KC + r0·KC`, k-major within (`KC × MR`).
    let block_at = |fb: &Fb<'_, 'ctx>, kb: IntValue<'ctx>, r0: IntValue<'ctx>| {
        fb.add(
            fb.mul(kb, fb.i64c(gemm_mc(nr) * GEMM_KC))?,
            fb.mul(r0, fb.i64c(GEMM_KC))?,
        )
    };
    let ranges = fb.imin(fb.mul(fb.nth, per_chunk)?, fb.i64c(panels))?;
    // The chunk this thread's packed rows (and row scales) are of; none yet.
    let have = fb.slot(fb.i64t.into())?;
    fb.b.build_store(have, fb.i64c(-1)).map_err(be)?;
    fb.claim_work(few, fb.i64c(panels), nchunks, ranges, |fb, [ch, ps, pe]| {
        let mc = fb.mul(ch, fb.i64c(gemm_mc(nr)))?;
        let mrows = fb.imin(
            fb.i64c(gemm_mc(nr)),
            fb.b.build_int_sub(total, mc, "").map_err(be)?,
        )?;
        let full_blocks =
            fb.b.build_int_signed_div(mrows, fb.i64c(mr_full), "fb")
                .map_err(be)?;
        let had =
            fb.b.build_load(fb.i64t, have, "had")
                .map_err(be)?
                .into_int_value();
        let new_chunk =
            fb.b.build_int_compare(IntPredicate::NE, had, ch, "newch")
                .map_err(be)?;
        let prep = fb.ctx.append_basic_block(fb.func, "chunk_prep");
        let ready = fb.ctx.append_basic_block(fb.func, "chunk_ready");
        fb.b.build_conditional_branch(new_chunk, prep, ready)
            .map_err(be)?;
        fb.b.position_at_end(prep);
        if let Some(eps) = norm {
            let base = fb.add(aav.off, fb.mul(mc, lda)?)?;
            inv_rms_rows(fb, aav.ptr, [base, lda, mrows, fb.i64c(k)], eps, inv)?;
        }
        let do_pack = fb.ctx.append_basic_block(fb.func, "packa");
        let packed = fb.ctx.append_basic_block(fb.func, "packed");
        fb.b.build_conditional_branch(pack_a, do_pack, packed)
            .map_err(be)?;
        fb.b.position_at_end(do_pack);
        fb.for_range(fb.i64c(0), kblocks, |fb, kb| {
            let kc = fb.mul(kb, kcs)?;
            let kl = fb.imin(kcs, fb.b.build_int_sub(fb.i64c(k), kc, "").map_err(be)?)?;
            fb.for_range(
                fb.i64c(0),
                fb.mul(full_blocks, fb.i64c(mr_full))?,
                |fb, r| {
                    let src = fb.add(fb.add(aav.off, fb.mul(fb.add(mc, r)?, lda)?)?, kc)?;
                    let lane =
                        fb.b.build_int_signed_rem(r, fb.i64c(mr_full), "lane")
                            .map_err(be)?;
                    let r0 = fb.b.build_int_sub(r, lane, "r0").map_err(be)?;
                    let dst = fb.add(block_at(fb, kb, r0)?, lane)?;
                    fb.for_range(fb.i64c(0), kl, |fb, kk| {
                        let v = fb.load_f32(aav.ptr, fb.add(src, kk)?)?;
                        fb.store_f32(apack, fb.add(dst, fb.mul(kk, fb.i64c(mr_full))?)?, v)
                    })
                },
            )
        })?;
        fb.b.build_unconditional_branch(packed).map_err(be)?;
        fb.b.position_at_end(packed);
        fb.b.build_store(have, ch).map_err(be)?;
        fb.b.build_unconditional_branch(ready).map_err(be)?;
        fb.b.position_at_end(ready);
        fb.for_range(fb.i64c(0), kblocks, |fb, kb| {
            let kc = fb.mul(kb, kcs)?;
            let kl = fb.imin(kcs, fb.b.build_int_sub(fb.i64c(k), kc, "").map_err(be)?)?;
            let first =
                fb.b.build_int_compare(IntPredicate::EQ, kb, fb.i64c(0), "first")
                    .map_err(be)?;
            let last =
                fb.b.build_int_compare(IntPredicate::EQ, kb, last_kb, "last")
                    .map_err(be)?;
            fb.for_range(ps, pe, |fb, p| {
                let cols = fb.imin(
                    fb.i64c(nr),
                    fb.b.build_int_sub(fb.i64c(n), fb.mul(p, fb.i64c(nr))?, "")
                        .map_err(be)?,
                )?;
                let bpp = unsafe {
                    fb.b.build_in_bounds_gep(
                        pty,
                        bptr,
                        &[fb.mul(fb.add(fb.mul(p, fb.i64c(k))?, kc)?, fb.i64c(nr))?],
                        "bpp",
                    )
                }
                .map_err(be)?;
                // Blocked, the same k block of the next panel is prefetched into L2 while
                // this one's row blocks run (it would otherwise come from L3 during the
                // first); decode streams ahead in its own panel instead.
                let bnext =
                    unsafe { fb.b.build_gep(pty, bpp, &[fb.i64c(k * nr)], "bnext") }.map_err(be)?;
                let bnext =
                    fb.b.build_select(few, bpp, bnext, "bn")
                        .map_err(be)?
                        .into_pointer_value();
                // Q8: the scales of this panel's k blocks from `kc` on (which is 0 or a
                // multiple of `GEMM_KC`, itself a multiple of `Q8_BLOCK`).
                let qs = match panel {
                    PanelType::Q8 => {
                        let kb = (k + Q8_BLOCK - 1) / Q8_BLOCK;
                        let kq =
                            fb.b.build_int_signed_div(kc, fb.i64c(Q8_BLOCK), "kq")
                                .map_err(be)?;
                        let at = fb.mul(fb.add(fb.mul(p, fb.i64c(kb))?, kq)?, fb.i64c(nr))?;
                        let scales = unsafe {
                            fb.b.build_in_bounds_gep(pty, bptr, &[fb.i64c(panels * k * nr)], "qb")
                        }
                        .map_err(be)?;
                        unsafe { fb.b.build_in_bounds_gep(fb.f32t, scales, &[at], "qs") }
                            .map_err(be)?
                    }
                    _ => fb.ctx.ptr_type(AddressSpace::default()).const_null(),
                };
                // The chunk's row blocks against the panel slice `bp` (`next`: what to
                // prefetch; `qs`: its Q8 scales or null) with the micro-kernels `uks`.
                let run = |fb: &Fb<'_, 'ctx>,
                           uks: [(i64, FunctionValue<'ctx>); 3],
                           bpp: PointerValue<'ctx>,
                           bnext: PointerValue<'ctx>,
                           qs: PointerValue<'ctx>|
                 -> R<()> {
                    // One row block of `mr` rows starting at chunk row `r0`.
                    let call = |fb: &Fb<'_, 'ctx>,
                                r0: IntValue<'ctx>,
                                mr: i64,
                                f: FunctionValue<'ctx>|
                     -> R<()> {
                        let row = fb.add(mc, r0)?;
                        let mut aptr = unsafe {
                            fb.b.build_in_bounds_gep(
                                fb.f32t,
                                aav.ptr,
                                &[fb.add(fb.add(aav.off, fb.mul(row, lda)?)?, kc)?],
                                "ap",
                            )
                        }
                        .map_err(be)?;
                        let (mut lda_, mut ka) = (lda, fb.i64c(1));
                        if mr == mr_full {
                            // Full blocks read the packed copy (unless rows were too few to pack).
                            let pa = unsafe {
                                fb.b.build_in_bounds_gep(
                                    fb.f32t,
                                    apack,
                                    &[block_at(fb, kb, r0)?],
                                    "pa",
                                )
                            }
                            .map_err(be)?;
                            let sel = |x: BasicValueEnum<'ctx>, y: BasicValueEnum<'ctx>| {
                                fb.b.build_select(pack_a, x, y, "s").map_err(be)
                            };
                            aptr = sel(pa.into(), aptr.into())?.into_pointer_value();
                            lda_ = sel(fb.i64c(1).into(), lda.into())?.into_int_value();
                            ka = sel(fb.i64c(mr_full).into(), fb.i64c(1).into())?.into_int_value();
                        }
                        let cidx = fb.add(fb.mul(row, fb.i64c(n))?, fb.mul(p, fb.i64c(nr))?)?;
                        let cptr =
                            unsafe { fb.b.build_in_bounds_gep(fb.f32t, optr, &[cidx], "cp") }
                                .map_err(be)?;
                        ukernel_call(
                            fb,
                            f,
                            mr,
                            nr,
                            [aptr, bpp, cptr, tile, bnext, qs],
                            [lda_, ka, fb.i64c(n), cols, kl],
                            first,
                            norm.map(|_| (inv, r0, last)),
                        )
                    };
                    row_blocks(fb, mrows, uks, &call)
                };
                let uks = [(gemm_mr(nr), uk), (TAIL_MR, uk4), (1, uk1)];
                match widen {
                    Some((f32_uks, deq)) => fb.if_else(
                        few,
                        |fb| run(fb, uks, bpp, bnext, qs),
                        |fb| {
                            // q8-block, once per chunk: deq[kk, j] = s[kk / Q8_BLOCK, j]·q[kk, j].
                            widen_q8(fb, bpp, qs, deq, kl, nr)?;
                            let null = fb.ctx.ptr_type(AddressSpace::default()).const_null();
                            run(fb, f32_uks, deq, deq, null)
                        },
                    ),
                    None => run(fb, uks, bpp, bnext, qs),
                }
            })
        })
    })?;
    fb.ret_ok()
}

/// Rule q8-block on one vector: the `vt`-wide int8 values at `q` (any alignment) widened to
/// f32 exactly and times their scales at `s`: `w = s · q`.
fn q8_vector<'ctx>(
    b: &Builder<'ctx>,
    vt: inkwell::types::VectorType<'ctx>,
    q: PointerValue<'ctx>,
    s: PointerValue<'ctx>,
) -> R<inkwell::values::VectorValue<'ctx>> {
    let ctx = vt.get_context();
    let vw = vt.get_size();
    let load = |ty: BasicTypeEnum<'ctx>, p: PointerValue<'ctx>, align: u32| {
        let v = b.build_load(ty, p, "q8l").map_err(be)?;
        v.as_instruction_value()
            .expect("load")
            .set_alignment(align)
            .map_err(be)?;
        Ok::<_, BackendError>(v.into_vector_value())
    };
    let qv = load(ctx.i8_type().vec_type(vw).into(), q, 1)?;
    let wide = b
        .build_int_s_extend(qv, ctx.i32_type().vec_type(vw), "x")
        .map_err(be)?;
    let qf = b.build_signed_int_to_float(wide, vt, "qf").map_err(be)?;
    let sv = load(vt.into(), s, 4)?;
    b.build_float_mul(qf, sv, "w").map_err(be)
}

/// Widens `kl` rows of a `Q8` panel slice (`q` with its scales `qs`, from a k block start)
/// to f32 at `out`, `nr` per row (rule q8-block): a row at a time in vectors of `nr / 2`.
fn widen_q8<'ctx>(
    fb: &Fb<'_, 'ctx>,
    q: PointerValue<'ctx>,
    qs: PointerValue<'ctx>,
    out: PointerValue<'ctx>,
    kl: IntValue<'ctx>,
    nr: i64,
) -> R<()> {
    let vw = (nr / 2) as u32;
    let (i8t, vt) = (fb.ctx.i8_type(), fb.f32t.vec_type(vw));
    fb.for_range(fb.i64c(0), kl, |fb, kk| {
        let row = fb.mul(kk, fb.i64c(nr))?;
        let blk =
            fb.b.build_right_shift(kk, fb.i64c(Q8_BLOCK.trailing_zeros() as i64), false, "kb")
                .map_err(be)?;
        let srow = fb.mul(blk, fb.i64c(nr))?;
        for v in 0..(nr / vw as i64) {
            let at = fb.add(row, fb.i64c(v * vw as i64))?;
            let qp = unsafe { fb.b.build_in_bounds_gep(i8t, q, &[at], "qp") }.map_err(be)?;
            let sat = fb.add(srow, fb.i64c(v * vw as i64))?;
            let sp = unsafe { fb.b.build_in_bounds_gep(fb.f32t, qs, &[sat], "sp") }.map_err(be)?;
            let w = q8_vector(&fb.b, vt, qp, sp)?;
            let op = unsafe { fb.b.build_in_bounds_gep(fb.f32t, out, &[at], "op") }.map_err(be)?;
            fb.b.build_store(op, w)
                .map_err(be)?
                .set_alignment(4)
                .map_err(be)?;
        }
        Ok(())
    })
}

/// Rows of `a` a packed run-time matmul walks per slice of `w` it packs: 24 register blocks
/// (288 rows; `288 · RT_GEMM_KC` floats, 288 KiB, stay in L2 while the thread's panels pass over
/// them), so a training sequence of up to 288 tokens packs each slice of `w` once.
const RT_GEMM_MC_BLOCKS: i64 = 24;

/// Operands of a matmul of two run-time values on the CPU (`Kernel::MatMul` with `nr > 0`).
struct RuntimeGemm<'a> {
    out: u32,
    a: &'a Access,
    w: &'a Access,
    batch: &'a [Dim],
    m: &'a Dim,
    n: &'a Dim,
    k: &'a Dim,
    shared_w: bool,
    nr: i64,
    sum_batch: bool,
    /// `rms_norm(a, g)·w`: each row scaled by `rsqrt(mean(a²) + eps)`, `g` (when given)
    /// folded into the packed slices of `w`.
    norm: Option<(Option<&'a Access>, f64)>,
}

/// Scratch floats per thread of `packed_matmul`: the packed slice, the partial-panel tile and
/// a chunk's inverse RMS values.
fn rt_gemm_scratch(nr: i64) -> usize {
    (RT_GEMM_KC * nr + gemm_mr(nr) * nr + RT_GEMM_MC_BLOCKS * gemm_mr(nr)) as usize
}

/// `out = a·w` for two run-time operands on the CPU (see `Kernel::MatMul`). Work units are
/// (row chunk of `RT_GEMM_MC_BLOCKS` register blocks, column panel of `nr`), split between
/// threads. For each of its chunks, each `KC` slice of `k` and each of its panels there, a
/// thread packs `w[kc.., panel]` (any strides; zero past `n`; times the norm weight) into
/// its scratch and runs the micro-kernel down the chunk's rows. Batch entries go one after
/// another; with `sum_batch` they accumulate into one result.
fn packed_matmul<'ctx>(fb: &Fb<'_, 'ctx>, mm: &RuntimeGemm) -> R<()> {
    let null = fb.ctx.ptr_type(AddressSpace::default()).const_null();
    let nr = mm.nr;
    let mr = gemm_mr(nr);
    let attrs: Vec<_> = fb.func.attributes(AttributeLoc::Function);
    let uk = ukernel(fb, mr, nr, PanelType::F32, &attrs)?;
    let uk4 = ukernel(fb, TAIL_MR, nr, PanelType::F32, &attrs)?;
    let uk1 = ukernel(fb, 1, nr, PanelType::F32, &attrs)?;
    let aav = fb.access(mm.a, ElemType::F32)?;
    let wav = fb.access(mm.w, ElemType::F32)?;
    let optr = fb.buf(mm.out)?;
    let (bdims, nbatch) = fb.batch_dims(mm.batch)?;
    let (mv, nv, kv) = (fb.dim(mm.m)?, fb.dim(mm.n)?, fb.dim(mm.k)?);
    let ceil = |x: IntValue<'ctx>, d: i64| -> R<IntValue<'ctx>> {
        fb.b.build_int_signed_div(fb.add(x, fb.i64c(d - 1))?, fb.i64c(d), "ceil")
            .map_err(be)
    };
    let mc = RT_GEMM_MC_BLOCKS * mr;
    let panels = ceil(nv, nr)?;
    let chunks = ceil(mv, mc)?;
    let kblocks = ceil(kv, RT_GEMM_KC)?;
    let (us, ue) = fb.split(fb.mul(chunks, panels)?)?;
    let bp = fb.scratch;
    let tile = unsafe {
        fb.b.build_in_bounds_gep(fb.f32t, fb.scratch, &[fb.i64c(RT_GEMM_KC * nr)], "tile")
    }
    .map_err(be)?;
    let r = aav.strides.len();
    let lda = aav.strides[r - 2];
    let (ks, ns) = (
        wav.strides[wav.strides.len() - 2],
        wav.strides[wav.strides.len() - 1],
    );
    let gav = match mm.norm {
        Some((Some(g), _)) => Some(fb.access(g, ElemType::F32)?),
        _ => None,
    };
    // With the norm: the inverse RMS of the current chunk's rows (after the tile in the
    // scratch).
    let inv = unsafe {
        fb.b.build_in_bounds_gep(fb.f32t, tile, &[fb.i64c(mr * nr)], "inv")
    }
    .map_err(be)?;
    // The thread's chunks: those its units [us, ue) touch.
    let ch_s = fb.b.build_int_signed_div(us, panels, "chs").map_err(be)?;
    let last = fb.add(ue, fb.b.build_int_sub(panels, fb.i64c(1), "").map_err(be)?)?;
    let ch_e = fb.b.build_int_signed_div(last, panels, "che").map_err(be)?;
    fb.for_range(fb.i64c(0), nbatch, |fb, bi| {
        let bidx = fb.decompose(bi, &bdims)?;
        let bpairs: Vec<(usize, IntValue)> = bidx.iter().copied().enumerate().collect();
        let abase = fb.at(&aav, &bpairs)?;
        let wbase = if mm.shared_w {
            wav.off
        } else {
            fb.at(&wav, &bpairs)?
        };
        let obase = if mm.sum_batch {
            fb.i64c(0)
        } else {
            fb.mul(bi, fb.mul(mv, nv)?)?
        };
        let bfirst = if mm.sum_batch {
            fb.b.build_int_compare(IntPredicate::EQ, bi, fb.i64c(0), "b0")
                .map_err(be)?
        } else {
            fb.ctx.bool_type().const_int(1, false)
        };
        fb.for_range(ch_s, ch_e, |fb, ch| {
            // This thread's panels of the chunk: its units within [ch·panels, (ch+1)·panels).
            let u0 = fb.mul(ch, panels)?;
            let p_lo =
                fb.b.build_int_sub(fb.imax(us, u0)?, u0, "plo")
                    .map_err(be)?;
            let p_hi =
                fb.b.build_int_sub(fb.imin(ue, fb.add(u0, panels)?)?, u0, "phi")
                    .map_err(be)?;
            let r0 = fb.mul(ch, fb.i64c(mc))?;
            let rows = fb.imin(fb.i64c(mc), fb.b.build_int_sub(mv, r0, "").map_err(be)?)?;
            if let Some((_, eps)) = mm.norm {
                let base = fb.add(abase, fb.mul(r0, lda)?)?;
                inv_rms_rows(fb, aav.ptr, [base, lda, rows, kv], eps, inv)?;
            }
            // k blocks outside the panels: the chunk's `rows × KC` block of `a` stays in cache
            // while the thread's panels pass over it.
            fb.for_range(fb.i64c(0), kblocks, |fb, kb| {
                let kc = fb.mul(kb, fb.i64c(RT_GEMM_KC))?;
                let kl = fb.imin(
                    fb.i64c(RT_GEMM_KC),
                    fb.b.build_int_sub(kv, kc, "").map_err(be)?,
                )?;
                fb.for_range(p_lo, p_hi, |fb, p| {
                    let c0 = fb.mul(p, fb.i64c(nr))?;
                    let cols = fb.imin(fb.i64c(nr), fb.b.build_int_sub(nv, c0, "").map_err(be)?)?;
                    // Pack w[kc..kc+kl, c0..c0+nr] k-major, zero past the last column.
                    fb.for_range(fb.i64c(0), kl, |fb, kk| {
                        let wrow = fb.add(wbase, fb.mul(fb.add(kc, kk)?, ks)?)?;
                        let gk = match &gav {
                            Some(gav) => Some(fb.load_f32(
                                gav.ptr,
                                fb.add(gav.off, fb.mul(fb.add(kc, kk)?, gav.strides[0])?)?,
                            )?),
                            None => None,
                        };
                        fb.for_range(fb.i64c(0), fb.i64c(nr), |fb, j| {
                            let inside =
                                fb.b.build_int_compare(IntPredicate::SLT, j, cols, "in")
                                    .map_err(be)?;
                            let safe =
                                fb.b.build_select(inside, j, fb.i64c(0), "j")
                                    .map_err(be)?
                                    .into_int_value();
                            let mut v = fb
                                .load_f32(wav.ptr, fb.add(wrow, fb.mul(fb.add(c0, safe)?, ns)?)?)?;
                            if let Some(gk) = gk {
                                // fold-norm-weight: w'[k, n] = g[k]·w[k, n]
                                v = fb.fmul(v, gk)?;
                            }
                            let v =
                                fb.b.build_select(inside, v, fb.f32c(0.0), "v")
                                    .map_err(be)?
                                    .into_float_value();
                            fb.store_f32(bp, fb.add(fb.mul(kk, fb.i64c(nr))?, j)?, v)
                        })
                    })?;
                    let kfirst =
                        fb.b.build_int_compare(IntPredicate::EQ, kb, fb.i64c(0), "k0")
                            .map_err(be)?;
                    let first = fb.b.build_and(kfirst, bfirst, "first").map_err(be)?;
                    let last_kb = fb.b.build_int_sub(kblocks, fb.i64c(1), "").map_err(be)?;
                    let klast =
                        fb.b.build_int_compare(IntPredicate::EQ, kb, last_kb, "klast")
                            .map_err(be)?;
                    let call = |fb: &Fb<'_, 'ctx>, rr: IntValue<'ctx>, mr: i64, f| -> R<()> {
                        let row = fb.add(r0, rr)?;
                        let aptr = unsafe {
                            fb.b.build_in_bounds_gep(
                                fb.f32t,
                                aav.ptr,
                                &[fb.add(fb.add(abase, fb.mul(row, lda)?)?, kc)?],
                                "ap",
                            )
                        }
                        .map_err(be)?;
                        let cidx = fb.add(obase, fb.add(fb.mul(row, nv)?, c0)?)?;
                        let cptr =
                            unsafe { fb.b.build_in_bounds_gep(fb.f32t, optr, &[cidx], "cp") }
                                .map_err(be)?;
                        ukernel_call(
                            fb,
                            f,
                            mr,
                            nr,
                            [aptr, bp, cptr, tile, bp, null],
                            [lda, fb.i64c(1), nv, cols, kl],
                            first,
                            mm.norm.map(|_| (inv, rr, klast)),
                        )
                    };
                    row_blocks(fb, rows, [(mr, uk), (TAIL_MR, uk4), (1, uk1)], &call)
                })
            })
        })
    })?;
    fb.ret_ok()
}

/// The GPU entry point `name` around kernel body `body` (the CPU kernel ABI):
/// `void name(u8** bufs, const i64* syms, f32* scratch, i32* status)`, launched on a 1-D grid.
/// Each thread runs the body with `tid` its global index and `nthreads` the grid's thread
/// count, and its own `scratch_floats` floats of `scratch`; a non-zero return is stored in
/// `*status` (the executor reads it after the run).
pub fn gpu_entry<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    body: FunctionValue<'ctx>,
    name: &str,
    scratch_floats: usize,
    min_blocks: u32,
) -> R<()> {
    let ptrt = ctx.ptr_type(AddressSpace::default());
    let i32t = ctx.i32_type();
    let i64t = ctx.i64_type();
    let fnty = ctx
        .void_type()
        .fn_type(&[ptrt.into(), ptrt.into(), ptrt.into(), ptrt.into()], false);
    let func = module.add_function(name, fnty, None);
    /// LLVM's calling convention number of `ptx_kernel` (a grid entry point).
    const PTX_KERNEL_CC: u32 = 71;
    func.set_call_conventions(PTX_KERNEL_CC);
    // Blocks are always `GPU_BLOCK` threads; asking for `min_blocks` resident blocks per SM
    // caps registers (two: 128 a thread, which the f32 tiled matmul would exceed and leave
    // one block; see `gpu_min_blocks`).
    for (k, v) in [
        ("nvvm.maxntid", GPU_BLOCK_THREADS.to_string()),
        ("nvvm.minctasm", min_blocks.to_string()),
    ] {
        func.add_attribute(AttributeLoc::Function, ctx.create_string_attribute(k, &v));
    }
    let b = ctx.create_builder();
    b.position_at_end(ctx.append_basic_block(func, "entry"));
    let sreg = |reg: &str| -> R<IntValue<'ctx>> {
        let n = format!("llvm.nvvm.read.ptx.sreg.{reg}");
        let f = module
            .get_function(&n)
            .unwrap_or_else(|| module.add_function(&n, i32t.fn_type(&[], false), None));
        let v = b
            .build_call(f, &[], reg)
            .map_err(be)?
            .try_as_basic_value()
            .basic()
            .expect("returns i32")
            .into_int_value();
        b.build_int_z_extend(v, i64t, reg).map_err(be)
    };
    let (tidx, ctaid, ntid, nctaid) = (
        sreg("tid.x")?,
        sreg("ctaid.x")?,
        sreg("ntid.x")?,
        sreg("nctaid.x")?,
    );
    let tid = b
        .build_int_add(b.build_int_mul(ctaid, ntid, "").map_err(be)?, tidx, "tid")
        .map_err(be)?;
    let nth = b.build_int_mul(nctaid, ntid, "nth").map_err(be)?;
    let p = |i: u32| func.get_nth_param(i).expect("param").into_pointer_value();
    let off = b
        .build_int_mul(tid, i64t.const_int(scratch_floats as u64, false), "so")
        .map_err(be)?;
    let scratch =
        unsafe { b.build_in_bounds_gep(ctx.f32_type(), p(2), &[off], "scratch") }.map_err(be)?;
    let rc = b
        .build_call(
            body,
            &[
                p(0).into(),
                p(1).into(),
                tid.into(),
                nth.into(),
                scratch.into(),
                ptrt.const_null().into(),
            ],
            "rc",
        )
        .map_err(be)?
        .try_as_basic_value()
        .basic()
        .expect("returns i32")
        .into_int_value();
    let bad_b = ctx.append_basic_block(func, "bad");
    let done = ctx.append_basic_block(func, "done");
    let bad = b
        .build_int_compare(IntPredicate::NE, rc, i32t.const_zero(), "bad")
        .map_err(be)?;
    b.build_conditional_branch(bad, bad_b, done).map_err(be)?;
    b.position_at_end(bad_b);
    b.build_store(p(3), rc).map_err(be)?;
    b.build_unconditional_branch(done).map_err(be)?;
    b.position_at_end(done);
    b.build_return(None).map_err(be)?;
    Ok(())
}

/// Bytes of dynamic shared memory a GPU kernel is launched with: the tensor-core matmul's
/// ring (`MMA_RING_BYTES`, or `WG_RING_BYTES` with `wgmma`), tensor-core attention's
/// (`mma_attn_shared_bytes`), none otherwise.
pub fn gpu_shared_bytes(k: &Kernel, tensor_cores: bool, wgmma: bool) -> u32 {
    match k {
        Kernel::MatMul { .. } | Kernel::RmsNormMatMul { .. } if tensor_cores => {
            if wgmma {
                WG_RING_BYTES as u32
            } else {
                MMA_RING_BYTES as u32
            }
        }
        Kernel::Attention { dims, .. } if tensor_cores && mma_attention_fits(dims) => {
            mma_attn_shared_bytes(dims, wgmma) as u32
        }
        Kernel::AttentionBackward { dims, .. } if tensor_cores && mma_attention_fits(dims) => {
            mma_attn_stage_bytes(dims) as u32
        }
        _ => 0,
    }
}

/// Whether GPU kernel `k` has a light entry point (`runtime::plan::KernelCall::light`): the
/// kernel without its first path (`gpu_tiles`), which needs far more registers and shared
/// memory than its others (matmuls' and attention's tiles on tensor cores: `gpu_mma_matmul`,
/// `gpu_wgmma_matmul`, `gpu_mma_attention`, with some 230-255 registers and the ring, which
/// would hold the small tiles, row blocks and warp-per-row attention at one block an SM
/// too). The light entry asks for `GPU_LIGHT_MIN_BLOCKS` and has no dynamic shared memory.
pub fn gpu_light(k: &Kernel, tensor_cores: bool) -> bool {
    match k {
        Kernel::MatMul { .. } | Kernel::RmsNormMatMul { .. } => tensor_cores,
        Kernel::Attention { dims, .. } | Kernel::AttentionBackward { dims, .. } => {
            tensor_cores && mma_attention_fits(dims)
        }
        _ => false,
    }
}

/// Resident blocks per SM every GPU kernel but the heavy ones asks for (`nvvm.minctasm`,
/// which caps its registers at `65536 / (256 · blocks)`, here 128: the f32 tiled matmul would
/// take more and leave one block).
pub const GPU_LIGHT_MIN_BLOCKS: u32 = 2;

/// Resident blocks per SM a GPU kernel's entry point asks for: `GPU_LIGHT_MIN_BLOCKS`,
/// except one for the kernels with a light entry point (`gpu_light`), whose first path's
/// tiles need more registers.
pub fn gpu_min_blocks(k: &Kernel, tensor_cores: bool) -> u32 {
    if gpu_light(k, tensor_cores) {
        1
    } else {
        GPU_LIGHT_MIN_BLOCKS
    }
}

/// Tiles along dims: `(extent, tile)` pairs, `⌈extent / tile⌉` each, multiplied.
pub type DimTiles = Vec<(Dim, i64)>;

/// One path of a GPU kernel as its launch sees it (`runtime::plan::TileGrid` in dims): one
/// block per tile of `blocks`, where each `(tiles, bound)` of `when` has at least `bound`
/// tiles.
pub struct GpuTiles {
    pub blocks: DimTiles,
    pub when: Vec<(DimTiles, i64)>,
}

/// The paths of GPU kernel `k` (operand buffers' element types by `elem`) that work in
/// blocks, in the order it tests for them: the matmuls' 128-row tiles (`gpu_tiled_matmul`,
/// `gpu_mma_matmul`, and 128 × 256 where `gpu_wgmma_matmul` may run), taken with more than
/// `GPU_GEMV_MAX_M` rows and at least `GPU_TILED_MIN_TILES` 128 × 128 tiles (as `matmul`
/// decides), else with more than `GPU_GEMV_MAX_M` rows and at least `GPU_SMALL_MIN_TILES` of
/// them `GPU_TILE_SMALL` square tiles, else (a matmul that may split k, with more than
/// `GPU_GEMV_MAX_M` rows) a block per tile and k-slice (`SPLIT_K`), else `gpu_gemv`'s blocks
/// of `ROW_BLOCK` rows × `GEMV_COLS` columns; the split-k sum after such a matmul the same
/// tests, with a thread per output where the matmul splits and no blocks (no launch: decode
/// would pay for hundreds of empty ones a token) on its other paths; tensor-core attention's
/// `MMA_ATTN_ROWS` query rows per `(b, h)`, taken from `MMA_ATTN_MIN_T` rows, then (and
/// alone off tensor cores) attention's eight query rows a block from `GPU_ATTN_BLOCK_ROWS`
/// rows (fewer take a block per row: `gpu_threads`); a reduction
/// whose rows cannot take a warp, a block per 32 outputs (`gpu_by_columns`), taken where
/// the axis has at least `GPU_COLUMN_MIN` elements.
/// Launching one block per tile leaves no empty blocks to dispatch after the work (the
/// kernels stride over their tiles by the grid, so any grid computes the same; attention's
/// warp-per-row fallback for bf16 keys and values the ring cannot copy then runs on fewer
/// warps). Kernels with none launch `gpu_threads`.
pub fn gpu_tiles(
    k: &Kernel,
    elem: &dyn Fn(u32) -> ElemType,
    tensor_cores: bool,
    wgmma: bool,
) -> Vec<GpuTiles> {
    let (batch, m, n, wide, splits) = match k {
        Kernel::MatMul {
            a,
            w,
            batch,
            m,
            n,
            part,
            ..
        } => (
            batch,
            m,
            n,
            [a, w].iter().all(|x| elem(x.buf) == ElemType::BF16),
            part.is_some(),
        ),
        Kernel::RmsNormMatMul {
            x,
            g,
            w,
            batch,
            m,
            n,
            part,
            ..
        } => (
            batch,
            m,
            n,
            g.is_none() && [x, w].iter().all(|a| elem(a.buf) == ElemType::BF16),
            part.is_some(),
        ),
        Kernel::Attention { dims: d, .. } => {
            let mut paths = vec![];
            if tensor_cores && mma_attention_fits(d) {
                paths.push(GpuTiles {
                    blocks: vec![
                        (d.b.clone(), 1),
                        (Dim::c(d.h), 1),
                        (d.t.clone(), MMA_ATTN_ROWS),
                    ],
                    when: vec![(vec![(d.t.clone(), 1)], MMA_ATTN_MIN_T)],
                });
            }
            // (a warp per query row from `GPU_ATTN_BLOCK_ROWS` rows; fewer take a block
            // each, as `gpu_threads` launches)
            paths.push(GpuTiles {
                blocks: vec![
                    (d.b.clone(), 1),
                    (Dim::c(d.h), 1),
                    (d.t.clone(), GPU_BLOCK_THREADS / 32),
                ],
                when: vec![(
                    vec![(d.b.clone(), 1), (Dim::c(d.h), 1), (d.t.clone(), 1)],
                    GPU_ATTN_BLOCK_ROWS,
                )],
            });
            return paths;
        }
        Kernel::AttentionBackward { dims: d, grad, .. }
            if tensor_cores && mma_attention_fits(d) =>
        {
            let (heads, rows) = match grad.as_ref().map(|g| g.wrt) {
                Some(AttnGrad::K | AttnGrad::V) => (d.hkv, &d.s),
                _ => (d.h, &d.t),
            };
            return vec![GpuTiles {
                blocks: vec![
                    (d.b.clone(), 1),
                    (Dim::c(heads), 1),
                    (rows.clone(), MMA_ATTN_ROWS),
                ],
                when: vec![(vec![(rows.clone(), 1)], MMA_ATTN_MIN_T)],
            }];
        }
        // (a launch only where its matmul split, `split_k_taken`: the matmul's tests, with
        // no blocks on every path but the split one, and there a thread per output)
        Kernel::MatMulCombine { batch, m, n, .. } => {
            return matmul_paths(batch, m, n, GPU_TILE, true)
                .into_iter()
                .map(|(path, t)| GpuTiles {
                    blocks: match path {
                        MatMulPath::Split => batch
                            .iter()
                            .map(|b| (b.clone(), 1))
                            .chain([(m.clone(), 1), (n.clone(), GPU_BLOCK_THREADS)])
                            .collect(),
                        _ => vec![(Dim::c(0), 1)],
                    },
                    when: t.when,
                })
                .collect();
        }
        // (`gpu_tiled_order`: a block per tile)
        Kernel::Elementwise { shape, .. }
            if elementwise_transposes(&k.elementwise_outputs(), shape.len()) =>
        {
            let r = shape.len();
            return vec![GpuTiles {
                blocks: shape[..r - 2]
                    .iter()
                    .map(|d| (d.clone(), 1))
                    .chain(
                        shape[r - 2..]
                            .iter()
                            .map(|d| (d.clone(), GPU_TRANSPOSE_TILE)),
                    )
                    .collect(),
                when: vec![],
            }];
        }
        // (`gpu_by_columns`: a block per 32 outputs, where the axis is long enough: the
        // outputs counted as one axis where their count is linear in the symbols (at most
        // one of their axes is not a constant); otherwise their last axis tiled by 32, so
        // that where it is short some blocks find no outputs)
        Kernel::Reduce {
            shape, axis, src, ..
        } if !reduce_warp_rows(src, *axis) => {
            let outs = (0..shape.len()).filter(|i| i != axis);
            let count = outs.clone().try_fold(Dim::c(1), |n, i| {
                match (n.as_const(), shape[i].as_const()) {
                    (Some(a), _) => Some(shape[i].scale(a)),
                    (_, Some(b)) => Some(n.scale(b)),
                    _ => None,
                }
            });
            let blocks: DimTiles = match count {
                Some(n) => vec![(n, 32)],
                None => {
                    let mut tiles: DimTiles = outs.map(|i| (shape[i].clone(), 1)).collect();
                    if let Some(last) = tiles.last_mut() {
                        last.1 = 32;
                    }
                    tiles
                }
            };
            return vec![GpuTiles {
                blocks,
                when: vec![(vec![(shape[*axis].clone(), 1)], GPU_COLUMN_MIN)],
            }];
        }
        _ => return vec![],
    };
    let tile_n = if tensor_cores && wgmma && wide {
        WG_TILE_N
    } else {
        GPU_TILE
    };
    matmul_paths(batch, m, n, tile_n, splits)
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}

/// The paths of a GPU matmul (`matmul`'s dispatch), in the order it tests for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MatMulPath {
    /// `GPU_TILE`-row tiles: `gpu_tiled_matmul`, or on tensor cores `gpu_mma_matmul` and
    /// `gpu_wgmma_matmul`.
    Large,
    /// `GPU_TILE_SMALL` square tiles.
    Small,
    /// Split k (`Kernel::MatMul::part`).
    Split,
    /// `gpu_gemv`'s row blocks.
    Rows,
}

/// The paths of a GPU matmul over `batch` entries of `[m, n]` (`gpu_tiles`), its large tiles
/// `GPU_TILE × tile_n`, with a split path where it may split k.
fn matmul_paths(
    batch: &[Dim],
    m: &Dim,
    n: &Dim,
    tile_n: i64,
    splits: bool,
) -> Vec<(MatMulPath, GpuTiles)> {
    let per_batch = |tm: i64, tn: i64| -> DimTiles {
        batch
            .iter()
            .map(|b| (b.clone(), 1))
            .chain([(m.clone(), tm), (n.clone(), tn)])
            .collect()
    };
    let rows = (vec![(m.clone(), 1)], GPU_GEMV_MAX_M + 1);
    let path = |p, blocks, when| (p, GpuTiles { blocks, when });
    let mut paths = vec![
        path(
            MatMulPath::Large,
            per_batch(GPU_TILE, tile_n),
            vec![
                rows.clone(),
                (per_batch(GPU_TILE, GPU_TILE), GPU_TILED_MIN_TILES),
            ],
        ),
        path(
            MatMulPath::Small,
            per_batch(GPU_TILE_SMALL, GPU_TILE_SMALL),
            vec![
                rows.clone(),
                (
                    per_batch(GPU_TILE_SMALL, GPU_TILE_SMALL),
                    GPU_SMALL_MIN_TILES,
                ),
            ],
        ),
    ];
    if splits {
        // (split k: a block per tile and slice)
        let mut blocks = per_batch(SPLIT_K_TILE, SPLIT_K_TILE);
        blocks.push((Dim::c(SPLIT_K), 1));
        paths.push(path(MatMulPath::Split, blocks, vec![rows]));
    }
    paths.push(path(
        MatMulPath::Rows,
        per_batch(ROW_BLOCK as i64, GEMV_COLS),
        vec![],
    ));
    paths
}

/// How many GPU threads a kernel's parallel loop has work for (what its body splits), as a
/// product of dims. Attention may split each query row's keys into up to `ATTN_SPLITS`.
pub fn gpu_threads(k: &Kernel) -> Vec<Dim> {
    let without = |shape: &[Dim], axis: usize| -> Vec<Dim> {
        shape
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != axis)
            .map(|(_, d)| d.clone())
            .collect()
    };
    match k {
        Kernel::Elementwise { shape, .. } => shape.clone(),
        // A thread per row, or a warp per row where rows may take one (`gpu_warp_rows`).
        Kernel::Reduce {
            shape, axis, src, ..
        } => without(shape, *axis)
            .into_iter()
            .chain(reduce_warp_rows(src, *axis).then(|| Dim::c(32)))
            .collect(),
        Kernel::Softmax {
            shape, axis, src, ..
        } => without(shape, *axis)
            .into_iter()
            .chain(gpu_warp_rows(&[src], *axis).then(|| Dim::c(32)))
            .collect(),
        Kernel::RmsNorm { shape, x, .. } => shape[..shape.len() - 1]
            .iter()
            .cloned()
            .chain(gpu_warp_rows(&[x], shape.len() - 1).then(|| Dim::c(32)))
            .collect(),
        Kernel::MatMul { batch, m, n, .. } | Kernel::RmsNormMatMul { batch, m, n, .. } => {
            // (a symbolic `m` over-counts: the extra threads find no work)
            let r = ROW_BLOCK as i64;
            let blocks = m
                .as_const()
                .map_or_else(|| m.clone(), |v| Dim::c((v + r - 1) / r));
            // Enough for any GPU matmul (launches use `gpu_tiles`; this is the fallback of a
            // runtime that ignores them): `gpu_gemv` wants 256 threads per 32 columns, the
            // tiled kernels 256 per tile of 64 × 64 or more.
            batch
                .iter()
                .cloned()
                .chain([blocks, n.clone(), Dim::c(GPU_BLOCK_THREADS / GEMV_COLS)])
                .collect()
        }
        // A block per query row (with many rows, `gpu_tiles` launches a warp per row).
        Kernel::Attention { dims: d, .. } => {
            vec![
                d.b.clone(),
                Dim::c(d.h),
                d.t.clone(),
                Dim::c(GPU_BLOCK_THREADS),
            ]
        }
        Kernel::AttentionCombine { dims: d, .. } => vec![d.b.clone(), Dim::c(d.h), d.t.clone()],
        // A thread per output.
        Kernel::MatMulCombine { batch, m, n, .. } => batch
            .iter()
            .cloned()
            .chain([m.clone(), n.clone()])
            .collect(),
        // A warp per query row for the log-sum-exp; a block per row of a gradient (a query
        // row for `dq`, a key row for `dk` and `dv`).
        Kernel::AttentionBackward { dims: d, grad, .. } => match grad.as_ref().map(|g| g.wrt) {
            Some(AttnGrad::K | AttnGrad::V) => {
                vec![
                    d.b.clone(),
                    Dim::c(d.hkv),
                    d.s.clone(),
                    Dim::c(GPU_BLOCK_THREADS),
                ]
            }
            Some(AttnGrad::Q) => vec![
                d.b.clone(),
                Dim::c(d.h),
                d.t.clone(),
                Dim::c(GPU_BLOCK_THREADS),
            ],
            None => vec![d.b.clone(), Dim::c(d.h), d.t.clone(), Dim::c(32)],
        },
        Kernel::Gather {
            table_shape,
            idx_shape,
            axis,
            ..
        } => table_shape[..*axis]
            .iter()
            .chain(idx_shape)
            .cloned()
            .collect(),
        // A thread per output row.
        Kernel::ScatterAdd { rows, .. } => vec![rows.clone()],
        Kernel::PackPanels { n, nr, .. } => vec![Dim::c((n + nr - 1) / nr)],
        Kernel::Gemm { n, nr, .. } => vec![Dim::c((n + nr - 1) / nr)],
    }
}
