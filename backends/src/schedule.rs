//! Scheduling: a verified graph becomes a `Program`. Inputs and parameters become buffers;
//! views become strided `Access`es over their source; elementwise ops used once are inlined
//! into their consumer's expression; every other value gets a buffer and a kernel. Kernels
//! that read only parameters (merged or transposed weights) are marked `init`: the runtime
//! runs them once when weights are bound.

use std::collections::BTreeSet;

use egret_ir::{BinaryOp, DType, Dim, Graph, Op, ValueId};
use egret_runtime::plan::{BufferRole, BufferSpec, ElemType, StateSpec};

use crate::kernel::{
    contiguous_strides, one_block, reshape_strides, split_k_part_len, symdim, Access, AttnDims,
    AttnGradIn, Expr, Kernel, PanelType, Poly, Program, Round, SPLIT_K_MIN_K,
};
use crate::BackendError;

fn elem(d: DType) -> ElemType {
    match d {
        DType::F32 | DType::F16 | DType::BF16 => ElemType::F32,
        DType::I32 | DType::I64 => ElemType::I64,
        DType::Bool => ElemType::Bool,
    }
}

fn round_of(d: DType) -> Round {
    match d {
        DType::F16 => Round::F16,
        DType::BF16 => Round::BF16,
        _ => Round::None,
    }
}

/// What a graph value is during scheduling.
#[derive(Clone, Debug)]
enum Val {
    /// Stored in a buffer, seen through this view.
    View(Access),
    /// Not stored: an expression over the consumer's index (same shape).
    Inline(Expr),
}

struct Sched {
    symbols: Vec<String>,
    buffers: Vec<BufferSpec>,
    /// Per buffer: holds only values computed from parameters.
    weight_only: Vec<bool>,
    kernels: Vec<Kernel>,
    init: Vec<bool>,
    uses: Vec<usize>,
}

impl Sched {
    fn new_buffer(
        &mut self,
        role: BufferRole,
        e: ElemType,
        shape: &[Dim],
        weight_only: bool,
    ) -> u32 {
        let dims = shape.iter().map(|d| symdim(&self.symbols, d)).collect();
        self.buffers.push(BufferSpec {
            role,
            elem: e,
            dims,
            streamed: false,
        });
        self.weight_only.push(weight_only);
        (self.buffers.len() - 1) as u32
    }

    fn push(&mut self, k: Kernel, reads: &[u32], out: u32) {
        let init = !reads.is_empty()
            && reads.iter().all(|b| self.weight_only[*b as usize])
            && self.buffers[out as usize]
                .dims
                .iter()
                .all(|d| d.terms.is_empty());
        if init {
            self.buffers[out as usize].role = BufferRole::Init;
            self.weight_only[out as usize] = true;
        }
        self.kernels.push(k);
        self.init.push(init);
    }

    /// Makes `r` the residual of the matmul that just wrote `product` (contiguous, `shape`):
    /// only when that matmul is the last kernel so far (or followed only by its split-k sum)
    /// (so `r` is final when it runs), plain (`nr = 0`, not summed, not run at load) and
    /// without a residual yet.
    fn add_residual(&mut self, product: &Access, shape: &[Dim], r: Access) -> bool {
        let fits = product.is_contiguous(shape) && self.init.last() == Some(&false);
        // (a matmul that may split k is followed by its sum, which adds the residual too,
        // on the paths that split)
        let (sum, at) = match self.kernels.split_last_mut() {
            Some((Kernel::MatMulCombine { res, .. }, rest)) => (Some(res), rest.last_mut()),
            Some((last, _)) => (None, Some(last)),
            None => (None, None),
        };
        match at {
            Some(Kernel::MatMul {
                out,
                nr: 0,
                sum_batch: false,
                res: res @ None,
                ..
            }) if fits && *out == product.buf && r.buf != product.buf => {
                if let Some(sum_res) = sum {
                    *sum_res = Some(r.clone());
                }
                *res = Some(r);
                true
            }
            _ => false,
        }
    }

    /// Split-K (with `ScheduleOptions::split_k`): a partial-tiles buffer for a matmul of `k`
    /// over operand buffers `ops` (with packed panels `nr`, summed over its batch or not)
    /// whose GPU kernel may split k: a plain product with a constant k of at least
    /// `SPLIT_K_MIN_K`, not of weights alone (made once at load).
    fn split_k_part(
        &mut self,
        split_k: bool,
        k: &Dim,
        ops: [u32; 2],
        nr: i64,
        summed: bool,
    ) -> Option<u32> {
        let at_load = ops.iter().all(|b| self.weight_only[*b as usize]);
        let splits = split_k
            && nr == 0
            && !summed
            && !at_load
            && k.as_const().is_some_and(|k| k >= SPLIT_K_MIN_K);
        splits.then(|| {
            self.new_buffer(
                BufferRole::Temp,
                ElemType::F32,
                &[Dim::c(split_k_part_len())],
                false,
            )
        })
    }

    /// The sum of a split matmul's partial tiles (`part`, from `split_k_part`) into `out`,
    /// after it.
    fn push_split_k_sum(&mut self, part: Option<u32>, out: u32, batch: Vec<Dim>, m: Dim, n: Dim) {
        if let Some(part) = part {
            self.push(
                Kernel::MatMulCombine {
                    out,
                    part,
                    batch,
                    m,
                    n,
                    res: None,
                },
                &[part],
                out,
            );
        }
    }

    /// Stores an inline value in a fresh contiguous buffer.
    fn materialize(&mut self, e: Expr, shape: &[Dim]) -> Access {
        let mut reads = vec![];
        loads(&e, &mut reads);
        let weight_only = !reads.is_empty() && reads.iter().all(|b| self.weight_only[*b as usize]);
        let const_only = reads.is_empty();
        let out = self.new_buffer(BufferRole::Temp, e.elem(), shape, weight_only || const_only);
        let acc = Access::contiguous(out, shape);
        let k = Kernel::Elementwise {
            out: acc.clone(),
            shape: shape.to_vec(),
            expr: e,
            also: vec![],
        };
        if const_only && shape.iter().all(|d| d.as_const().is_some()) {
            self.buffers[out as usize].role = BufferRole::Init;
            self.kernels.push(k);
            self.init.push(true);
        } else {
            self.push(k, &reads, out);
        }
        acc
    }

    /// A view of a matmul's right operand (`[.., K, N]`) in which `K` is the contiguous axis,
    /// so every output element is one contiguous dot product. Weights already transposed
    /// (`permute(param)`) qualify as they are; otherwise a copy in that layout is made —
    /// once at load when the operand depends only on parameters.
    fn k_contiguous(&mut self, acc: Access, shape: &[Dim], e: ElemType) -> Access {
        let r = shape.len();
        if acc.strides[r - 2] == Poly::c(1) {
            return acc;
        }
        // Buffer [.., N, K] contiguous; viewed as [.., K, N] with the last two strides swapped.
        let mut tshape = shape.to_vec();
        tshape.swap(r - 1, r - 2);
        let weight_only = self.weight_only[acc.buf as usize];
        let out = self.new_buffer(BufferRole::Temp, e, &tshape, weight_only);
        let mut strides = contiguous_strides(&tshape);
        strides.swap(r - 1, r - 2);
        let view = Access {
            buf: out,
            offset: Poly::zero(),
            strides,
        };
        self.push(
            Kernel::Elementwise {
                out: view.clone(),
                shape: shape.to_vec(),
                expr: Expr::Load(acc.clone(), e),
                also: vec![],
            },
            &[acc.buf],
            out,
        );
        view
    }

    /// A tensor-core matmul operand (`ScheduleOptions::bf16_operands`) as the kernel reads
    /// it: an inline value is stored in bf16 by the kernel that computes it (the rounding
    /// the matmul applies anyway), a weight-only f32 value gets a contiguous bf16 copy made
    /// once at load; a bf16 buffer is read as it is, and any other stored value stays f32
    /// (the kernel rounds it as it loads).
    fn bf16_operand(&mut self, v: &Val, shape: &[Dim]) -> Access {
        let to_bf16 = |x: Expr| Expr::Cast(ElemType::BF16, Box::new(x), Round::BF16);
        match v {
            Val::Inline(x) => self.materialize(to_bf16(x.clone()), shape),
            Val::View(a) if self.elem_of(a) == ElemType::BF16 => a.clone(),
            Val::View(a) if self.weight_only[a.buf as usize] => {
                self.materialize(to_bf16(Expr::Load(a.clone(), ElemType::F32)), shape)
            }
            Val::View(a) => a.clone(),
        }
    }

    /// The element type of the buffer `acc` views.
    fn elem_of(&self, acc: &Access) -> ElemType {
        self.buffers[acc.buf as usize].elem
    }

    /// A view whose last axis is contiguous (copying if needed).
    fn row_contiguous(&mut self, acc: Access, shape: &[Dim], e: ElemType) -> Access {
        if acc.strides.last() == Some(&Poly::c(1)) {
            return acc;
        }
        self.materialize(Expr::Load(acc, e), shape)
    }

    fn view(&mut self, v: &Val, shape: &[Dim]) -> Access {
        match v {
            Val::View(a) => a.clone(),
            Val::Inline(e) => self.materialize(e.clone(), shape),
        }
    }

    fn expr(&self, v: &Val, e: ElemType) -> Expr {
        match v {
            Val::View(a) => Expr::Load(a.clone(), e),
            Val::Inline(x) => x.clone(),
        }
    }
}

fn loads(e: &Expr, out: &mut Vec<u32>) {
    expr_accesses(e, false, &mut |a, _| out.push(a.buf));
}

/// Values recomputed by each consumer rather than stored: constants, and one load combined
/// with a constant or a broadcast scalar (a gradient times its clipping factor) — each
/// consumer reads what it would have read from a stored copy, and the store is saved.
fn is_cheap(e: &Expr) -> bool {
    let scalar = |x: &Expr| match x {
        Expr::Const(..) => true,
        Expr::Load(a, _) => a.strides.iter().all(|s| *s == Poly::zero()),
        _ => false,
    };
    match e {
        Expr::Const(..) | Expr::Iota(..) => true,
        Expr::Binary(_, a, b) => {
            (scalar(a) && matches!(**b, Expr::Load(..)))
                || (scalar(b) && matches!(**a, Expr::Load(..)))
        }
        _ => false,
    }
}

/// Target facts scheduling needs.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleOptions {
    /// Columns per packed weight panel for `Gemm` (a multiple of the vector width), or 0 to
    /// keep plain matmul kernels.
    pub panel: i64,
    /// Storage of packed weights.
    pub weights: PanelType,
    /// Keep outputs spelled `concat(input, new, axis)` in place between runs (`StateSpec`)
    /// instead of returning them: for callers that run the plan step after step (decode).
    pub states: bool,
    /// Order kernels deepest operand first (`Graph::deep_first_topo_order`): for training
    /// graphs, so recomputed activations are made just before the gradients that read them.
    pub deep_first: bool,
    /// Pack weights into panels once, when they are bound (`Init`), for the GEMM. Off for
    /// programs whose parameters change every run (a training step): their matmuls pack
    /// slices as they go, with no whole packed copy written and read back each run.
    pub pack_weights: bool,
    /// Give matmuls their right operand `[.., K, N]` with `N` contiguous rather than `K`: the
    /// GPU's kernels read a weight row across neighbouring lanes (coalesced) and stage it for
    /// the tensor cores as it lies, where the CPU's dot products want `K` contiguous. A copy
    /// in the wanted layout is made where the operand lies otherwise, once at load when it
    /// depends only on parameters.
    pub n_major: bool,
    /// Fold `add(matmul(a, w), r)`, where the product has no other use, into the matmul as
    /// its residual (`Kernel::MatMul::res`): one kernel instead of two (GPU kernels only).
    pub matmul_residual: bool,
    /// Tensor-core matmuls read bf16 operands from global memory where they can
    /// (`Sched::bf16_operand`; with `n_major`): half the bytes, and the GPU's kernel copies
    /// them into shared memory as they lie. Graph inputs declared `bf16` whose every use is
    /// a matmul operand or attention's query, keys or values are stored bf16 too (the
    /// runtime rounds the values given for them).
    pub bf16_operands: bool,
    /// Attention whose every use is a permute back to `[B, T, H, Dv]` (a transformer's)
    /// writes its output tokens first (`AttnDims::tokens_first`), so that the permute needs
    /// no copy (a kernel launch saved per layer where launches are what decode costs).
    pub attn_tokens_first: bool,
    /// Plain matmuls with a constant k of at least `SPLIT_K_MIN_K` get a partial-tiles buffer and
    /// a `MatMulCombine` after them, so that the GPU's kernel may split k where the output
    /// has too few tiles to fill the GPU (`Kernel::MatMul::part`; GPU kernels only).
    pub split_k: bool,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions {
            panel: 32,
            weights: PanelType::F32,
            states: false,
            deep_first: false,
            pack_weights: true,
            n_major: false,
            matmul_residual: false,
            bf16_operands: false,
            attn_tokens_first: false,
            split_k: false,
        }
    }
}

/// A state found in the graph: the input, the concat that grows it, and the output's name.
struct StateCand {
    input: ValueId,
    concat: ValueId,
    output: String,
    axis: usize,
    /// Name of the capacity symbol (`<len>.capacity`).
    capacity: String,
}

/// Outputs `concat[axis](x, ..)` of an input `x` used by nothing else, whose extent along
/// `axis` is a lone symbol: values that can grow in place between runs.
fn find_states(g: &Graph) -> Vec<StateCand> {
    let uses = g.use_counts();
    let mut out: Vec<StateCand> = vec![];
    for (name, v) in &g.outputs {
        let n = g.node(*v);
        let Op::Concat { axis } = n.op else {
            continue;
        };
        let Some(&x) = n.inputs.first() else {
            continue;
        };
        let once = g.outputs.iter().filter(|(_, w)| w == v).count() == 1;
        let xs = g.shape(x);
        let Some(len) = xs[axis].as_sym() else {
            continue;
        };
        let len_elsewhere = xs
            .iter()
            .enumerate()
            .any(|(i, d)| i != axis && d.symbols().any(|s| s == len));
        if matches!(g.node(x).op, Op::Input { .. })
            && uses[x.index()] == 1
            && once
            && n.inputs.len() >= 2
            && !len_elsewhere
            && out.iter().all(|c| c.concat != *v)
        {
            out.push(StateCand {
                input: x,
                concat: *v,
                output: name.clone(),
                axis,
                capacity: format!("{len}.capacity"),
            });
        }
    }
    out
}

/// Schedules `g` (verified) into a program with default options.
pub fn schedule(g: &Graph) -> Result<Program, BackendError> {
    schedule_with(g, ScheduleOptions::default())
}

/// Batched matmuls (`[B, M, K] × [B?, K, N]`, f32, one batch axis) whose one use is a sum over
/// that axis and which are not outputs themselves, mapped to that sum: the packed CPU matmul
/// computes the sum directly (`sum_batch`), with no `[B, M, N]` temporary.
fn summed_matmuls(g: &Graph) -> std::collections::HashMap<ValueId, ValueId> {
    let uses = g.use_counts();
    let outputs: BTreeSet<ValueId> = g.outputs.iter().map(|(_, v)| *v).collect();
    let mut found = std::collections::HashMap::new();
    for v in g.values() {
        let n = g.node(v);
        let Op::Reduce {
            op: egret_ir::ReduceOp::Sum,
            axis: 0,
        } = n.op
        else {
            continue;
        };
        let x = n.inputs[0];
        let xn = g.node(x);
        if xn.op == Op::MatMul
            && xn.ty.dtype == DType::F32
            && xn.ty.shape.rank() == 3
            && uses[x.index()] == 1
            && !outputs.contains(&x)
        {
            found.insert(x, v);
        }
    }
    found
}

/// Inputs declared `bf16`, not outputs, whose every use is a tensor-core operand (of a
/// `matmul`, or the query, keys or values of a `fused_attention`): stored bf16 when those
/// read bf16 operands (`ScheduleOptions::bf16_operands`).
fn tensor_core_bf16_inputs(g: &Graph, outputs: &BTreeSet<ValueId>) -> BTreeSet<ValueId> {
    let mut only_operands: Vec<bool> = vec![true; g.len()];
    for n in &g.nodes {
        let operands = match n.op {
            Op::MatMul => n.inputs.len(),
            Op::FusedAttention { .. } => 3,
            _ => 0,
        };
        for x in &n.inputs[operands.min(n.inputs.len())..] {
            only_operands[x.index()] = false;
        }
    }
    g.values()
        .filter(|v| {
            let n = g.node(*v);
            matches!(n.op, Op::Input { .. })
                && n.ty.dtype == DType::BF16
                && only_operands[v.index()]
                && !outputs.contains(v)
        })
        .collect()
}

/// Graph outputs declared `bf16` that a tensor-core matmul or attention writes and nothing
/// else reads (one output, no other use): stored bf16 (`ScheduleOptions::bf16_operands`), as
/// the type says, rather than f32; half the bytes written, and the host reads them back as
/// bf16. (Values other kernels read stay f32: those kernels load f32.)
fn stored_bf16_outputs(g: &Graph, uses: &[usize]) -> BTreeSet<ValueId> {
    g.outputs
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| {
            let n = g.node(*v);
            matches!(
                n.op,
                Op::MatMul | Op::RmsNormMatMul { .. } | Op::FusedAttention { .. }
            ) && n.ty.dtype == DType::BF16
                && uses[v.index()] == 1
        })
        .collect()
}

/// Attention results, not outputs, whose every use is a permute to `[B, T, H, Dv]`: written
/// tokens first (`ScheduleOptions::attn_tokens_first`), which makes that permute a view.
fn permuted_attention(g: &Graph, outputs: &BTreeSet<ValueId>) -> BTreeSet<ValueId> {
    let mut users: Vec<Vec<&Op>> = vec![vec![]; g.len()];
    for n in &g.nodes {
        for x in &n.inputs {
            users[x.index()].push(&n.op);
        }
    }
    g.values()
        .filter(|v| {
            matches!(g.node(*v).op, Op::FusedAttention { .. })
                && !outputs.contains(v)
                && !users[v.index()].is_empty()
                && users[v.index()]
                    .iter()
                    .all(|op| matches!(op, Op::Permute { perm } if perm[..] == [0, 2, 1, 3]))
        })
        .collect()
}

/// Attention's dims from the shapes of `q [B,H,T,D]`, `k [B,Hkv,S,D]` and `v [B,Hkv,S,Dv]`
/// (the kernels need the head counts and sizes constant).
fn attn_dims(
    q: &[Dim],
    k: &[Dim],
    v: &[Dim],
    tokens_first: bool,
) -> Result<AttnDims, BackendError> {
    let c = |d: &Dim| {
        d.as_const().ok_or_else(|| {
            BackendError::Unsupported(format!(
                "attention needs constant head counts and sizes, got {d}"
            ))
        })
    };
    Ok(AttnDims {
        b: q[0].clone(),
        h: c(&q[1])?,
        t: q[2].clone(),
        d: c(&q[3])?,
        hkv: c(&k[1])?,
        s: k[2].clone(),
        dv: c(&v[3])?,
        tokens_first,
    })
}

/// Schedules `g` (verified) into a program.
pub fn schedule_with(g: &Graph, opts: ScheduleOptions) -> Result<Program, BackendError> {
    egret_ir::verify(g).map_err(BackendError::Ir)?;
    let order = if opts.deep_first {
        g.deep_first_topo_order()
    } else {
        g.live_topo_order()
    }
    .map_err(|_| BackendError::Unsupported("cycle".into()))?;
    let mut syms = BTreeSet::new();
    for n in &g.nodes {
        for d in n.ty.shape.dims() {
            syms.extend(d.symbols().map(str::to_string));
        }
    }
    let cands = if opts.states { find_states(&g) } else { vec![] };
    syms.extend(cands.iter().map(|c| c.capacity.clone()));
    // Per state: its buffer and the strides of its capacity layout.
    let mut state_bufs: Vec<Option<(u32, Vec<Poly>)>> = vec![None; cands.len()];
    let mut s = Sched {
        symbols: syms.into_iter().collect(),
        buffers: vec![],
        weight_only: vec![],
        kernels: vec![],
        init: vec![],
        uses: g.use_counts(),
    };
    let summed_matmuls = if opts.panel > 0 {
        summed_matmuls(g)
    } else {
        Default::default()
    };
    let outputs: BTreeSet<ValueId> = g.outputs.iter().map(|(_, v)| *v).collect();
    let bf16_inputs = if opts.bf16_operands {
        tensor_core_bf16_inputs(g, &outputs)
    } else {
        BTreeSet::new()
    };
    let tokens_first_attn = permuted_attention(g, &outputs);
    let bf16_outputs = if opts.bf16_operands && opts.panel == 0 {
        stored_bf16_outputs(g, &s.uses)
    } else {
        BTreeSet::new()
    };
    let mut vals: Vec<Option<Val>> = vec![None; g.len()];
    let mut taken = BTreeSet::new();
    let mut out_bufs: std::collections::HashMap<String, u32> = Default::default();
    for v in order {
        let n = g.node(v);
        let shape = n.ty.shape.dims().to_vec();
        let e = elem(n.ty.dtype);
        // (the element type of the buffer a matmul or attention writes its result to)
        let out_e = if bf16_outputs.contains(&v) {
            ElemType::BF16
        } else {
            e
        };
        let arg = |i: usize| {
            vals[n.inputs[i].index()]
                .clone()
                .expect("topological order")
        };
        let arg_shape = |i: usize| g.shape(n.inputs[i]).to_vec();
        let state = cands.iter().position(|c| c.input == v || c.concat == v);
        let val = 'val: {
            match &n.op {
                Op::Input { .. } if state.is_some() => {
                    let i = state.expect("checked");
                    let mut cap_shape = shape.clone();
                    cap_shape[cands[i].axis] = Dim::sym(&cands[i].capacity);
                    let buf = s.new_buffer(BufferRole::State(i as u32), e, &cap_shape, false);
                    let strides = contiguous_strides(&cap_shape);
                    state_bufs[i] = Some((buf, strides.clone()));
                    Val::View(Access {
                        buf,
                        offset: Poly::zero(),
                        strides,
                    })
                }
                Op::Concat { axis } if state.is_some() => {
                    // The first piece is the state itself; the rest are appended after it.
                    let i = state.expect("checked");
                    let (buf, strides) = state_bufs[i].clone().expect("input before its concat");
                    let mut start = strides[*axis].mul_dim(&arg_shape(0)[*axis]);
                    for j in 1..n.inputs.len() {
                        let pshape = arg_shape(j);
                        let x = s.expr(&arg(j), e);
                        s.kernels.push(Kernel::Elementwise {
                            out: Access {
                                buf,
                                offset: start.clone(),
                                strides: strides.clone(),
                            },
                            shape: pshape.clone(),
                            expr: x,
                            also: vec![],
                        });
                        s.init.push(false);
                        start = start.add(&strides[*axis].mul_dim(&pshape[*axis]));
                    }
                    Val::View(Access {
                        buf,
                        offset: Poly::zero(),
                        strides,
                    })
                }
                Op::Input { name } => {
                    let e = if bf16_inputs.contains(&v) {
                        ElemType::BF16
                    } else {
                        e
                    };
                    Val::View(Access::contiguous(
                        s.new_buffer(BufferRole::Input(name.clone()), e, &shape, false),
                        &shape,
                    ))
                }
                Op::Param { name } if shape.iter().any(|d| d.as_const().is_none()) => {
                    return Err(BackendError::Unsupported(format!(
                    "parameter `{name}` has a symbolic shape {}; parameters need constant shapes",
                    n.ty.shape
                )));
                }
                Op::Param { name } => Val::View(Access::contiguous(
                    s.new_buffer(BufferRole::Param(name.clone()), e, &shape, true),
                    &shape,
                )),
                Op::Constant { value } => Val::Inline(Expr::Const(*value, e)),
                Op::Iota { axis } => Val::Inline(Expr::Iota(*axis, e)),
                Op::Unary(u) => Val::Inline(Expr::Unary(*u, Box::new(s.expr(&arg(0), e)))),
                Op::Binary(BinaryOp::Add) if opts.matmul_residual => {
                    let sides = [(0, 1), (1, 0)].into_iter().find_map(|(p, r)| {
                        let product = n.inputs[p];
                        let same = g.shape(product) == shape.as_slice()
                            && g.shape(n.inputs[r]) == shape.as_slice();
                        match (&vals[product.index()], &vals[n.inputs[r].index()]) {
                            (Some(Val::View(pv)), Some(Val::View(rv)))
                                if same && s.uses[product.index()] == 1 =>
                            {
                                Some((pv.clone(), rv.clone()))
                            }
                            _ => None,
                        }
                    });
                    if let Some((pv, rv)) = sides {
                        if s.add_residual(&pv, &shape, rv) {
                            break 'val Val::View(pv);
                        }
                    }
                    Val::Inline(Expr::Binary(
                        BinaryOp::Add,
                        Box::new(s.expr(&arg(0), e)),
                        Box::new(s.expr(&arg(1), e)),
                    ))
                }
                Op::Binary(b) => Val::Inline(Expr::Binary(
                    *b,
                    Box::new(s.expr(&arg(0), e)),
                    Box::new(s.expr(&arg(1), e)),
                )),
                Op::Compare(c) => {
                    let ie = elem(g.ty(n.inputs[0]).dtype);
                    Val::Inline(Expr::Compare(
                        *c,
                        Box::new(s.expr(&arg(0), ie)),
                        Box::new(s.expr(&arg(1), ie)),
                    ))
                }
                Op::Select => Val::Inline(Expr::Select(
                    Box::new(s.expr(&arg(0), ElemType::Bool)),
                    Box::new(s.expr(&arg(1), e)),
                    Box::new(s.expr(&arg(2), e)),
                )),
                Op::Cast => {
                    let ie = elem(g.ty(n.inputs[0]).dtype);
                    Val::Inline(Expr::Cast(
                        e,
                        Box::new(s.expr(&arg(0), ie)),
                        round_of(n.ty.dtype),
                    ))
                }
                Op::SwiGlu => Val::Inline(Expr::SwiGlu(
                    Box::new(s.expr(&arg(0), e)),
                    Box::new(s.expr(&arg(1), e)),
                )),
                Op::Permute { perm } => match arg(0) {
                    Val::Inline(Expr::Const(c, t)) => Val::Inline(Expr::Const(c, t)),
                    a => {
                        let acc = s.view(&a, &arg_shape(0));
                        Val::View(Access {
                            buf: acc.buf,
                            offset: acc.offset.clone(),
                            strides: perm.iter().map(|&p| acc.strides[p].clone()).collect(),
                        })
                    }
                },
                Op::Broadcast => match arg(0) {
                    Val::Inline(Expr::Const(c, t)) => Val::Inline(Expr::Const(c, t)),
                    a => {
                        let ins = arg_shape(0);
                        let acc = s.view(&a, &ins);
                        let strides = ins
                            .iter()
                            .zip(&shape)
                            .zip(&acc.strides)
                            .map(|((i, o), st)| if i != o { Poly::zero() } else { st.clone() })
                            .collect();
                        Val::View(Access {
                            buf: acc.buf,
                            offset: acc.offset,
                            strides,
                        })
                    }
                },
                Op::Slice { axis, start, .. } => {
                    let acc = s.view(&arg(0), &arg_shape(0));
                    let offset = acc.offset.add(&acc.strides[*axis].scale(*start as i64));
                    Val::View(Access {
                        buf: acc.buf,
                        offset,
                        strides: acc.strides,
                    })
                }
                Op::Reshape => match arg(0) {
                    Val::Inline(Expr::Const(c, t)) => Val::Inline(Expr::Const(c, t)),
                    a => {
                        let ins = arg_shape(0);
                        let acc = s.view(&a, &ins);
                        match reshape_strides(&acc.strides, &ins, &shape) {
                            Some(strides) => Val::View(Access {
                                buf: acc.buf,
                                offset: acc.offset,
                                strides,
                            }),
                            None => {
                                let acc = s.materialize(Expr::Load(acc, e), &ins);
                                Val::View(Access {
                                    buf: acc.buf,
                                    offset: acc.offset,
                                    strides: contiguous_strides(&shape),
                                })
                            }
                        }
                    }
                },
                Op::Concat { axis } => 'concat: {
                    let mut reads = vec![];
                    let pieces: Vec<(Expr, Vec<Dim>)> = (0..n.inputs.len())
                        .map(|i| (s.expr(&arg(i), e), arg_shape(i)))
                        .collect();
                    for (x, _) in &pieces {
                        loads(x, &mut reads);
                    }
                    let wo = !reads.is_empty() && reads.iter().all(|b| s.weight_only[*b as usize]);
                    if !wo {
                        // Computed where it is used: consumers evaluate the piece their
                        // index falls in (or, used more than once, one kernel stores it).
                        let inline = pieces
                            .into_iter()
                            .map(|(x, pshape)| (pshape[*axis].clone(), x))
                            .collect();
                        break 'concat Val::Inline(Expr::Concat(*axis, inline));
                    }
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, wo);
                    let strides = contiguous_strides(&shape);
                    let mut start = Poly::zero();
                    let init = wo && shape.iter().all(|d| d.as_const().is_some());
                    if init {
                        s.buffers[out as usize].role = BufferRole::Init;
                    }
                    for (x, pshape) in pieces {
                        let acc = Access {
                            buf: out,
                            offset: start.clone(),
                            strides: strides.clone(),
                        };
                        start = start.add(&strides[*axis].mul_dim(&pshape[*axis]));
                        s.kernels.push(Kernel::Elementwise {
                            out: acc,
                            shape: pshape,
                            expr: x,
                            also: vec![],
                        });
                        s.init.push(init);
                    }
                    Val::View(Access::contiguous(out, &shape))
                }
                Op::Gather { axis } => {
                    let (table, idx) = (
                        s.view(&arg(0), &arg_shape(0)),
                        s.view(&arg(1), &arg_shape(1)),
                    );
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, false);
                    let k = Kernel::Gather {
                        out,
                        table: table.clone(),
                        idx: idx.clone(),
                        table_shape: arg_shape(0),
                        idx_shape: arg_shape(1),
                        axis: *axis,
                        elem: e,
                    };
                    s.push(k, &[table.buf, idx.buf], out);
                    Val::View(Access::contiguous(out, &shape))
                }
                Op::StopGradient => arg(0),
                Op::ScatterAdd => {
                    let (idx, src) = (
                        s.view(&arg(0), &arg_shape(0)),
                        s.view(&arg(1), &arg_shape(1)),
                    );
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, false);
                    let k = Kernel::ScatterAdd {
                        out,
                        idx: idx.clone(),
                        src: src.clone(),
                        idx_shape: arg_shape(0),
                        rows: shape[0].clone(),
                        inner: shape[1..].to_vec(),
                    };
                    s.push(k, &[idx.buf, src.buf], out);
                    Val::View(Access::contiguous(out, &shape))
                }
                Op::Reduce { .. } if summed_matmuls.contains_key(&n.inputs[0]) => {
                    // Computed, summed, by its matmul.
                    arg(0)
                }
                Op::Reduce { op, axis } => {
                    // Elementwise work feeding the reduction is done inside it, not stored.
                    let src = s.expr(&arg(0), elem(g.ty(n.inputs[0]).dtype));
                    let mut reads = vec![];
                    loads(&src, &mut reads);
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, false);
                    s.push(
                        Kernel::Reduce {
                            op: *op,
                            out,
                            src,
                            shape: arg_shape(0),
                            axis: *axis,
                        },
                        &reads,
                        out,
                    );
                    Val::View(Access::contiguous(out, &shape))
                }
                Op::Softmax { axis } => {
                    let src = s.view(&arg(0), &shape);
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, false);
                    s.push(
                        Kernel::Softmax {
                            out,
                            src: src.clone(),
                            shape: shape.clone(),
                            axis: *axis,
                        },
                        &[src.buf],
                        out,
                    );
                    Val::View(Access::contiguous(out, &shape))
                }
                Op::RmsNorm { eps } => {
                    let (x, w) = (s.view(&arg(0), &shape), s.view(&arg(1), &arg_shape(1)));
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, false);
                    s.push(
                        Kernel::RmsNorm {
                            out,
                            x: x.clone(),
                            w: w.clone(),
                            shape: shape.clone(),
                            eps: *eps,
                        },
                        &[x.buf, w.buf],
                        out,
                    );
                    Val::View(Access::contiguous(out, &shape))
                }
                Op::MatMul | Op::RmsNormMatMul { .. } => {
                    let fused = matches!(n.op, Op::RmsNormMatMul { .. });
                    let wi = if fused { 2 } else { 1 };
                    let (ash, wsh) = (arg_shape(0), arg_shape(wi));
                    // (bf16 operands: both of a plain matmul; the right one of a fused norm,
                    // whose left one must be normalised in f32 first)
                    let bf16 = opts.bf16_operands && opts.panel == 0;
                    let a = if bf16 && !fused {
                        s.bf16_operand(&arg(0), &ash)
                    } else {
                        s.view(&arg(0), &ash)
                    };
                    let a = s.row_contiguous(a.clone(), &ash, s.elem_of(&a));
                    let w = if bf16 && !fused {
                        s.bf16_operand(&arg(wi), &wsh)
                    } else {
                        s.view(&arg(wi), &wsh)
                    };
                    let batch = ash[..ash.len() - 2].to_vec();
                    let (m, k, nn) = (
                        ash[ash.len() - 2].clone(),
                        ash[ash.len() - 1].clone(),
                        wsh[wsh.len() - 1].clone(),
                    );
                    let shared_w = wsh.len() == 2;
                    // A matmul whose only use sums it over its batch axis: one summing kernel.
                    let summed = summed_matmuls.contains_key(&v);
                    let out_shape = match summed_matmuls.get(&v) {
                        Some(r) => g.shape(*r).to_vec(),
                        None => shape.clone(),
                    };
                    let out_e = if summed { e } else { out_e };
                    let out = s.new_buffer(BufferRole::Temp, out_e, &out_shape, false);
                    // Weights known at load with constant K, N and rows of `a` that collapse to one
                    // stride: pack the weights into panels once and run the blocked GEMM.
                    let rows_contig = one_block(&a.strides[..ash.len() - 1], &ash[..ash.len() - 1]);
                    if opts.panel > 0
                        && opts.pack_weights
                        && shared_w
                        && !summed
                        && s.weight_only[w.buf as usize]
                        && k.as_const().is_some()
                        && nn.as_const().is_some()
                        && rows_contig
                        && a.strides[ash.len() - 1] == Poly::c(1)
                    {
                        let (kc, ncst) = (
                            k.as_const().expect("checked"),
                            nn.as_const().expect("checked"),
                        );
                        let (w, norm) = match n.op {
                            Op::RmsNormMatMul { eps } => {
                                let gw = s.view(&arg(1), &arg_shape(1));
                                // fold-norm-weight: w'[k, n] = g[k]·w[k, n]
                                let gb = Access {
                                    buf: gw.buf,
                                    offset: gw.offset.clone(),
                                    strides: vec![gw.strides[0].clone(), Poly::zero()],
                                };
                                let expr = Expr::Binary(
                                    egret_ir::BinaryOp::Mul,
                                    Box::new(Expr::Load(gb, e)),
                                    Box::new(Expr::Load(w.clone(), e)),
                                );
                                let wf = s.materialize(expr, &wsh);
                                (wf, Some(eps))
                            }
                            _ => (w, None),
                        };
                        let pe = match opts.weights {
                            PanelType::F32 => e,
                            PanelType::BF16 | PanelType::F16 => ElemType::Half,
                            PanelType::Q8 => ElemType::Bytes,
                        };
                        let bytes = opts.weights.panel_bytes(kc, ncst, opts.panel);
                        let bp = s.new_buffer(
                            BufferRole::Temp,
                            pe,
                            &[Dim::c(bytes / pe.size() as i64)],
                            true,
                        );
                        s.buffers[bp as usize].streamed = true;
                        s.push(
                            Kernel::PackPanels {
                                out: bp,
                                w: w.clone(),
                                k: kc,
                                n: ncst,
                                nr: opts.panel,
                                store: opts.weights,
                            },
                            &[w.buf],
                            bp,
                        );
                        let a2 = Access {
                            buf: a.buf,
                            offset: a.offset.clone(),
                            strides: vec![a.strides[ash.len() - 2].clone(), Poly::c(1)],
                        };
                        let mut rows = batch.clone();
                        rows.push(m.clone());
                        s.push(
                            Kernel::Gemm {
                                out,
                                a: a2,
                                bp,
                                rows,
                                k: kc,
                                n: ncst,
                                nr: opts.panel,
                                norm,
                                panel: opts.weights,
                            },
                            &[a.buf, bp],
                            out,
                        );
                        break 'val Val::View(Access::contiguous(out, &shape));
                    }
                    // Otherwise, on the CPU (both operands computed at run time, or weights
                    // not packed at load): the micro-kernel over slices of `w` (times the
                    // norm weight) packed as it goes. Elsewhere: a dot product per output
                    // over a k-contiguous `w`.
                    let nr = if opts.panel > 0 && e == ElemType::F32 && (shared_w || !fused) {
                        opts.panel
                    } else {
                        0
                    };
                    let w = if nr > 0 {
                        w
                    } else if opts.n_major {
                        s.row_contiguous(w.clone(), &wsh, s.elem_of(&w))
                    } else {
                        s.k_contiguous(w.clone(), &wsh, s.elem_of(&w))
                    };
                    if let Op::RmsNormMatMul { eps } = n.op {
                        let gw = s.view(&arg(1), &arg_shape(1));
                        if nr == 0
                            && s.weight_only[gw.buf as usize]
                            && s.weight_only[w.buf as usize]
                            && shared_w
                        {
                            // fold-norm-weight: w'[k, n] = g[k]·w[k, n], once at load, in the
                            // layout the matmul wants.
                            let (wf, strides) = if opts.n_major {
                                let we = if bf16 { ElemType::BF16 } else { e };
                                let wf = s.new_buffer(BufferRole::Temp, we, &wsh, true);
                                (wf, contiguous_strides(&wsh))
                            } else {
                                let wf = s.new_buffer(
                                    BufferRole::Temp,
                                    e,
                                    &[nn.clone(), k.clone()],
                                    true,
                                );
                                (wf, vec![Poly::c(1), Poly::dim(&k)])
                            };
                            let view = Access {
                                buf: wf,
                                offset: Poly::zero(),
                                strides,
                            };
                            let gb = Access {
                                buf: gw.buf,
                                offset: gw.offset.clone(),
                                strides: vec![gw.strides[0].clone(), Poly::zero()],
                            };
                            let mut expr = Expr::Binary(
                                egret_ir::BinaryOp::Mul,
                                Box::new(Expr::Load(gb, e)),
                                Box::new(Expr::Load(w.clone(), e)),
                            );
                            if s.elem_of(&view) == ElemType::BF16 {
                                expr = Expr::Cast(ElemType::BF16, Box::new(expr), Round::BF16);
                            }
                            s.push(
                                Kernel::Elementwise {
                                    out: view.clone(),
                                    shape: wsh.clone(),
                                    expr,
                                    also: vec![],
                                },
                                &[gw.buf, w.buf],
                                wf,
                            );
                            let part =
                                s.split_k_part(opts.split_k, &k, [a.buf, view.buf], 0, false);
                            s.push(
                                Kernel::RmsNormMatMul {
                                    out,
                                    x: a.clone(),
                                    g: None,
                                    w: view.clone(),
                                    batch: batch.clone(),
                                    m: m.clone(),
                                    n: nn.clone(),
                                    k,
                                    eps,
                                    nr: 0,
                                    part,
                                },
                                &[a.buf, view.buf],
                                out,
                            );
                            s.push_split_k_sum(part, out, batch, m, nn);
                        } else {
                            let part = s.split_k_part(opts.split_k, &k, [a.buf, w.buf], nr, false);
                            s.push(
                                Kernel::RmsNormMatMul {
                                    out,
                                    x: a.clone(),
                                    g: Some(gw.clone()),
                                    w: w.clone(),
                                    batch: batch.clone(),
                                    m: m.clone(),
                                    n: nn.clone(),
                                    k,
                                    eps,
                                    nr,
                                    part,
                                },
                                &[a.buf, gw.buf, w.buf],
                                out,
                            );
                            s.push_split_k_sum(part, out, batch, m, nn);
                        }
                    } else {
                        let part = s.split_k_part(opts.split_k, &k, [a.buf, w.buf], nr, summed);
                        s.push(
                            Kernel::MatMul {
                                out,
                                a: a.clone(),
                                w: w.clone(),
                                batch: batch.clone(),
                                m: m.clone(),
                                n: nn.clone(),
                                k,
                                shared_w,
                                nr,
                                sum_batch: summed,
                                res: None,
                                part,
                            },
                            &[a.buf, w.buf],
                            out,
                        );
                        s.push_split_k_sum(part, out, batch, m, nn);
                    }
                    Val::View(Access::contiguous(out, &out_shape))
                }
                Op::AttentionLse { scale } | Op::AttentionGrad { scale, .. } => {
                    let wrt = match &n.op {
                        Op::AttentionGrad { wrt, .. } => Some(*wrt),
                        _ => None,
                    };
                    let sh: Vec<Vec<Dim>> = (0..n.inputs.len()).map(arg_shape).collect();
                    let acc: Vec<Access> = (0..n.inputs.len())
                        .map(|i| s.view(&arg(i), &sh[i]))
                        .collect();
                    // (operands `q, k, pos` for the log-sum-exp; `q, k, v, pos, dout, lse,
                    // delta` for a gradient)
                    let (pos, v_shape) = match wrt {
                        None => (acc[2].clone(), &sh[1]),
                        Some(_) => (acc[3].clone(), &sh[2]),
                    };
                    let dims = attn_dims(&sh[0], &sh[1], v_shape, false)?;
                    let grad = wrt.map(|wrt| AttnGradIn {
                        v: acc[2].clone(),
                        dout: acc[4].clone(),
                        lse: acc[5].clone(),
                        delta: acc[6].clone(),
                        wrt,
                    });
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, false);
                    let reads: Vec<u32> = acc.iter().map(|a| a.buf).collect();
                    s.push(
                        Kernel::AttentionBackward {
                            out,
                            q: acc[0].clone(),
                            k: acc[1].clone(),
                            pos,
                            grad,
                            dims,
                            scale: *scale,
                            nr: opts.panel,
                        },
                        &reads,
                        out,
                    );
                    Val::View(Access::contiguous(out, &shape))
                }
                Op::FusedAttention { scale } => {
                    let sh: Vec<Vec<Dim>> = (0..4).map(arg_shape).collect();
                    let acc: Vec<Access> = (0..4).map(|i| s.view(&arg(i), &sh[i])).collect();
                    let tokens_first = opts.attn_tokens_first && tokens_first_attn.contains(&v);
                    let dims = attn_dims(&sh[0], &sh[1], &sh[2], tokens_first)?;
                    // (tokens first: a `[B, T, H, Dv]` buffer seen as `[B, H, T, Dv]`)
                    let stored = if tokens_first {
                        vec![
                            shape[0].clone(),
                            shape[2].clone(),
                            shape[1].clone(),
                            shape[3].clone(),
                        ]
                    } else {
                        shape.clone()
                    };
                    let out = s.new_buffer(BufferRole::Temp, out_e, &stored, false);
                    let part = s.new_buffer(BufferRole::Temp, e, &[Dim::c(dims.part_len())], false);
                    let reads: Vec<u32> = acc.iter().map(|a| a.buf).collect();
                    s.push(
                        Kernel::Attention {
                            out,
                            part,
                            q: acc[0].clone(),
                            k: acc[1].clone(),
                            v: acc[2].clone(),
                            pos: acc[3].clone(),
                            dims: dims.clone(),
                            scale: *scale,
                            nr: opts.panel,
                        },
                        &reads,
                        out,
                    );
                    s.push(Kernel::AttentionCombine { out, part, dims }, &[part], out);
                    let mut view = Access::contiguous(out, &stored);
                    if tokens_first {
                        view.strides.swap(1, 2);
                    }
                    Val::View(view)
                }
            }
        };
        // Elementwise values used more than once (or returned) are stored once.
        let val = match val {
            Val::Inline(x) if !is_cheap(&x) && (s.uses[v.index()] > 1 || outputs.contains(&v)) => {
                Val::View(s.materialize(x, &shape))
            }
            other => other,
        };
        vals[v.index()] = Some(val);
        // Each output in its own contiguous per-run buffer, made as soon as the value is:
        // a copy made at the end would keep the value's buffer alive until then.
        for (name, o) in &g.outputs {
            if *o != v || cands.iter().any(|c| c.concat == v) {
                continue;
            }
            let val = vals[v.index()].clone().expect("just computed");
            let buf = match &val {
                Val::View(a)
                    if a.is_contiguous(&shape)
                        && s.buffers[a.buf as usize].role == BufferRole::Temp
                        && taken.insert(a.buf) =>
                {
                    // A contiguous view (a reshape) of the buffer: same elements, the
                    // output's shape.
                    s.buffers[a.buf as usize].dims =
                        shape.iter().map(|d| symdim(&s.symbols, d)).collect();
                    a.buf
                }
                other => {
                    let x = s.expr(other, e);
                    let out = s.new_buffer(BufferRole::Temp, e, &shape, false);
                    s.kernels.push(Kernel::Elementwise {
                        out: Access::contiguous(out, &shape),
                        shape: shape.clone(),
                        expr: x,
                        also: vec![],
                    });
                    s.init.push(false);
                    taken.insert(out);
                    out
                }
            };
            out_bufs.insert(name.clone(), buf);
        }
    }
    // Outputs in the graph's order (their buffers were made as each value was computed).
    let outs: Vec<(String, u32)> = g
        .outputs
        .iter()
        .filter(|(_, v)| !cands.iter().any(|c| c.concat == *v))
        .map(|(n, _)| (n.clone(), out_bufs[n]))
        .collect();
    let states = cands
        .iter()
        .zip(&state_bufs)
        .map(|(c, sb)| {
            let buf = &sb.as_ref().expect("scheduled").0;
            let sd =
                |shape: &[Dim]| -> Vec<_> { shape.iter().map(|d| symdim(&s.symbols, d)).collect() };
            let Op::Input { name } = &g.node(c.input).op else {
                unreachable!("states start at inputs")
            };
            StateSpec {
                input: name.clone(),
                output: c.output.clone(),
                buffer: *buf,
                axis: c.axis,
                dims: sd(g.shape(c.input)),
                out_dims: sd(g.shape(c.concat)),
                capacity: s
                    .symbols
                    .iter()
                    .position(|x| *x == c.capacity)
                    .expect("added above") as u32,
            }
        })
        .collect();
    let (kernels, init) = merge_elementwise(s.kernels, s.init);
    Ok(Program {
        name: g.name.clone(),
        states,
        symbols: s.symbols,
        buffers: s.buffers,
        kernels,
        init,
        outputs: outs,
    })
}

/// The most outputs `merge_elementwise` gives one kernel.
const MAX_MERGED_OUTPUTS: usize = 8;

/// Sibling fusion: neighbouring elementwise kernels over the same shape become one
/// (`Kernel::Elementwise::also`), one pass over the elements and one launch where there were
/// several: an optimizer's update of a parameter, its moments and its value (each stored,
/// since each is an output), reads the gradient and the moments once and launches once.
/// A kernel joins the one before it (up to `MAX_MERGED_OUTPUTS` outputs) when neither runs at
/// load (`init`), it writes a buffer the group neither writes nor reads, and it reads the
/// group's outputs only through the very (contiguous) access that wrote them and not
/// inside a concat (whose pieces read shifted indices): at each element, the value stored
/// there just before. Kernel order is otherwise kept, so every other dependency holds.
fn merge_elementwise(kernels: Vec<Kernel>, init: Vec<bool>) -> (Vec<Kernel>, Vec<bool>) {
    let mut out_k: Vec<Kernel> = Vec::with_capacity(kernels.len());
    let mut out_i: Vec<bool> = Vec::with_capacity(init.len());
    for (k, i) in kernels.into_iter().zip(init) {
        let joins = match (out_k.last(), out_i.last(), &k, i) {
            (
                Some(g @ Kernel::Elementwise { shape: g_shape, .. }),
                Some(false),
                Kernel::Elementwise {
                    out,
                    shape,
                    expr,
                    also,
                },
                false,
            ) => {
                let group = g.elementwise_outputs();
                let mut group_reads = vec![];
                for (_, e) in &group {
                    loads(e, &mut group_reads);
                }
                let mut reads_ok = true;
                expr_accesses(expr, false, &mut |a, shifted| {
                    // (a contiguous output: one element a place, none written twice; and not
                    // a piece of a concat, whose loads are shifted to the piece's own index)
                    if let Some((o, _)) = group.iter().find(|(o, _)| o.buf == a.buf) {
                        reads_ok &= *o == a && a.is_contiguous(g_shape) && !shifted;
                    }
                });
                also.is_empty()
                    && shape == g_shape
                    && group.len() < MAX_MERGED_OUTPUTS
                    && reads_ok
                    && !group.iter().any(|(o, _)| o.buf == out.buf)
                    && !group_reads.contains(&out.buf)
            }
            _ => false,
        };
        match (out_k.last_mut(), k) {
            (Some(Kernel::Elementwise { also, .. }), Kernel::Elementwise { out, expr, .. })
                if joins =>
            {
                also.push((out, expr))
            }
            (_, k) => {
                out_k.push(k);
                out_i.push(i);
            }
        }
    }
    (out_k, out_i)
}

/// Every access an expression loads through, and whether it loads at an index other than
/// the element's own (`shifted`: inside a concat's piece, which reads its operand at the
/// index less the piece's start along the concat axis).
fn expr_accesses<'a>(e: &'a Expr, shifted: bool, f: &mut dyn FnMut(&'a Access, bool)) {
    match e {
        Expr::Load(a, _) => f(a, shifted),
        Expr::Concat(..) => e
            .children()
            .into_iter()
            .for_each(|c| expr_accesses(c, true, f)),
        _ => e
            .children()
            .into_iter()
            .for_each(|c| expr_accesses(c, shifted, f)),
    }
}
