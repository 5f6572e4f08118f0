//! The reference interpreter: runs any verified graph on the CPU and so defines what every
//! op means. Floats compute in f32 (as PyTorch does on CPU), reductions and matmuls
//! accumulate in f64, and a cast to f16/bf16 rounds to that type's precision.
//!
//! Tensors are strided views over shared buffers, so `permute`, `broadcast`, `slice`,
//! `const` and contiguous `reshape` copy nothing; a matmul against a transposed weight reads
//! the weight in place. Values are freed after their last use.

use std::collections::HashMap;
use std::sync::Arc;

use crate::dtype::DType;
use crate::graph::{Graph, ValueId};
use crate::op::{AttnGrad, BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};
use crate::IrError;

/// Below this many multiply-adds a matmul runs on one thread (spawning costs more).
const PARALLEL_MATMUL_MIN_MACS: usize = 1 << 18;

/// Storage of a tensor: floats (any float dtype) as f32, integers as i64.
#[derive(Clone, Debug)]
pub enum Data {
    F32(Arc<Vec<f32>>),
    I64(Arc<Vec<i64>>),
    Bool(Arc<Vec<bool>>),
}

/// A strided view of a shared buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
    data: Data,
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![0; shape.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc *= shape[i];
    }
    s
}

/// Calls `f` with the buffer offset of every element of a strided view, in row-major order.
fn for_each_offset(shape: &[usize], strides: &[usize], offset: usize, mut f: impl FnMut(usize)) {
    if shape.iter().any(|&d| d == 0) {
        return;
    }
    let rank = shape.len();
    if rank == 0 {
        f(offset);
        return;
    }
    let (inner, istride) = (shape[rank - 1], strides[rank - 1]);
    let mut idx = vec![0usize; rank - 1];
    let mut base = offset;
    loop {
        for j in 0..inner {
            f(base + j * istride);
        }
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            base += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            base -= strides[d] * shape[d];
            idx[d] = 0;
        }
    }
}

fn gather_strided<T: Copy>(buf: &[T], shape: &[usize], strides: &[usize], offset: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(shape.iter().product());
    for_each_offset(shape, strides, offset, |o| out.push(buf[o]));
    out
}

fn ierr(msg: impl Into<String>) -> IrError {
    IrError::Interp {
        value: None,
        msg: msg.into(),
    }
}

impl Tensor {
    fn dense(dtype: DType, shape: Vec<usize>, data: Data) -> Tensor {
        Tensor {
            dtype,
            strides: contiguous_strides(&shape),
            shape,
            offset: 0,
            data,
        }
    }

    /// A float tensor (`dtype` f32, f16 or bf16; values are taken as given).
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, IrError> {
        Self::check_len(&shape, data.len())?;
        Ok(Tensor::dense(DType::F32, shape, Data::F32(Arc::new(data))))
    }

    /// Shares an existing buffer (weights) without copying it.
    pub fn from_f32_arc(shape: Vec<usize>, data: Arc<Vec<f32>>) -> Result<Tensor, IrError> {
        Self::check_len(&shape, data.len())?;
        Ok(Tensor::dense(DType::F32, shape, Data::F32(data)))
    }

    pub fn from_i64(shape: Vec<usize>, data: Vec<i64>) -> Result<Tensor, IrError> {
        Self::check_len(&shape, data.len())?;
        Ok(Tensor::dense(DType::I64, shape, Data::I64(Arc::new(data))))
    }

    pub fn from_bool(shape: Vec<usize>, data: Vec<bool>) -> Result<Tensor, IrError> {
        Self::check_len(&shape, data.len())?;
        Ok(Tensor::dense(
            DType::Bool,
            shape,
            Data::Bool(Arc::new(data)),
        ))
    }

    fn check_len(shape: &[usize], len: usize) -> Result<(), IrError> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .ok_or_else(|| {
                ierr(format!(
                    "shape {shape:?} has more elements than memory can hold"
                ))
            })?;
        if n != len {
            return Err(ierr(format!(
                "shape {shape:?} needs {n} elements, got {len}"
            )));
        }
        Ok(())
    }

    /// Same storage, relabelled dtype (within the same storage class).
    fn with_dtype(mut self, dtype: DType) -> Tensor {
        self.dtype = dtype;
        self
    }

    /// The shared f32 buffer, if this tensor is a dense float tensor over all of it.
    pub fn f32_arc(&self) -> Option<Arc<Vec<f32>>> {
        match &self.data {
            Data::F32(b) if self.is_contiguous() => Some(b.clone()),
            _ => None,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn is_contiguous(&self) -> bool {
        let len = match &self.data {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::Bool(v) => v.len(),
        };
        self.offset == 0 && self.strides == contiguous_strides(&self.shape) && len == self.numel()
    }

    /// The elements in row-major order as f32 (integers and bools converted).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(b) => gather_strided(b, &self.shape, &self.strides, self.offset),
            Data::I64(b) => gather_strided(b, &self.shape, &self.strides, self.offset)
                .into_iter()
                .map(|x| x as f32)
                .collect(),
            Data::Bool(b) => gather_strided(b, &self.shape, &self.strides, self.offset)
                .into_iter()
                .map(|x| x as u8 as f32)
                .collect(),
        }
    }

    /// The elements in row-major order as i64 (floats truncated).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match &self.data {
            Data::F32(b) => gather_strided(b, &self.shape, &self.strides, self.offset)
                .into_iter()
                .map(|x| x as i64)
                .collect(),
            Data::I64(b) => gather_strided(b, &self.shape, &self.strides, self.offset),
            Data::Bool(b) => gather_strided(b, &self.shape, &self.strides, self.offset)
                .into_iter()
                .map(|x| x as i64)
                .collect(),
        }
    }

    fn f32s(&self) -> Result<Arc<Vec<f32>>, IrError> {
        match &self.data {
            Data::F32(b) if self.is_contiguous() => Ok(b.clone()),
            Data::F32(b) => Ok(Arc::new(gather_strided(
                b,
                &self.shape,
                &self.strides,
                self.offset,
            ))),
            _ => Err(ierr(format!("expected a float tensor, got {}", self.dtype))),
        }
    }

    fn i64s(&self) -> Result<Arc<Vec<i64>>, IrError> {
        match &self.data {
            Data::I64(b) if self.is_contiguous() => Ok(b.clone()),
            Data::I64(b) => Ok(Arc::new(gather_strided(
                b,
                &self.shape,
                &self.strides,
                self.offset,
            ))),
            _ => Err(ierr(format!(
                "expected an integer tensor, got {}",
                self.dtype
            ))),
        }
    }

    fn bools(&self) -> Result<Arc<Vec<bool>>, IrError> {
        match &self.data {
            Data::Bool(b) if self.is_contiguous() => Ok(b.clone()),
            Data::Bool(b) => Ok(Arc::new(gather_strided(
                b,
                &self.shape,
                &self.strides,
                self.offset,
            ))),
            _ => Err(ierr(format!("expected a bool tensor, got {}", self.dtype))),
        }
    }

    /// A contiguous copy (or the same buffer if already contiguous).
    fn contiguous(&self) -> Tensor {
        if self.is_contiguous() {
            return self.clone();
        }
        let data = match &self.data {
            Data::F32(b) => Data::F32(Arc::new(gather_strided(
                b,
                &self.shape,
                &self.strides,
                self.offset,
            ))),
            Data::I64(b) => Data::I64(Arc::new(gather_strided(
                b,
                &self.shape,
                &self.strides,
                self.offset,
            ))),
            Data::Bool(b) => Data::Bool(Arc::new(gather_strided(
                b,
                &self.shape,
                &self.strides,
                self.offset,
            ))),
        };
        Tensor::dense(self.dtype, self.shape.clone(), data)
    }

    fn permute(&self, perm: &[usize]) -> Tensor {
        let mut t = self.clone();
        t.shape = perm.iter().map(|&p| self.shape[p]).collect();
        t.strides = perm.iter().map(|&p| self.strides[p]).collect();
        t
    }

    fn reshape(&self, shape: Vec<usize>) -> Result<Tensor, IrError> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(ierr(format!(
                "reshape {:?} -> {shape:?} changes the element count",
                self.shape
            )));
        }
        let mut t = self.contiguous();
        t.strides = contiguous_strides(&shape);
        t.shape = shape;
        Ok(t)
    }

    fn broadcast(&self, shape: Vec<usize>) -> Result<Tensor, IrError> {
        if shape.len() != self.shape.len() {
            return Err(ierr(format!(
                "broadcast {:?} -> {shape:?} changes rank",
                self.shape
            )));
        }
        let mut t = self.clone();
        for i in 0..shape.len() {
            if self.shape[i] != shape[i] {
                if self.shape[i] != 1 {
                    return Err(ierr(format!(
                        "cannot broadcast {:?} to {shape:?}",
                        self.shape
                    )));
                }
                t.strides[i] = 0;
            }
        }
        t.shape = shape;
        Ok(t)
    }

    fn splat(dtype: DType, shape: Vec<usize>, value: f64) -> Tensor {
        let data = if dtype.is_float() {
            Data::F32(Arc::new(vec![round_to(dtype, value as f32)]))
        } else if dtype == DType::Bool {
            Data::Bool(Arc::new(vec![value != 0.0]))
        } else {
            Data::I64(Arc::new(vec![wrap_int(dtype, value as i64)]))
        };
        Tensor {
            dtype,
            strides: vec![0; shape.len()],
            shape,
            offset: 0,
            data,
        }
    }
}

/// Rounds an f32 to the precision of a float dtype (f16/bf16: nearest even).
fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn wrap_int(dtype: DType, x: i64) -> i64 {
    if dtype == DType::I32 {
        x as i32 as i64
    } else {
        x
    }
}

/// `f(x)` in the interpreter's f32 arithmetic (constant folding uses the same).
pub fn unary_f32(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sin => (x as f64).sin() as f32,
        UnaryOp::Cos => (x as f64).cos() as f32,
        UnaryOp::Abs => x.abs(),
    }
}

fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// `f(a, b)` in the interpreter's f32 arithmetic (constant folding uses the same).
pub fn binary_f32(op: BinaryOp, a: f32, b: f32) -> f32 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        }
        BinaryOp::Min => {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.min(b)
            }
        }
        BinaryOp::Pow => (a as f64).powf(b as f64) as f32,
    }
}

fn binary_i64(op: BinaryOp, a: i64, b: i64) -> Result<i64, IrError> {
    Ok(match op {
        BinaryOp::Add => a.wrapping_add(b),
        BinaryOp::Sub => a.wrapping_sub(b),
        BinaryOp::Mul => a.wrapping_mul(b),
        BinaryOp::Div => {
            if b == 0 {
                return Err(ierr("integer division by zero"));
            }
            a.wrapping_div(b)
        }
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Pow => {
            let e = u32::try_from(b).map_err(|_| ierr(format!("integer pow with exponent {b}")))?;
            a.wrapping_pow(e)
        }
    })
}

fn compare<T: PartialOrd>(op: CompareOp, a: T, b: T) -> bool {
    match op {
        CompareOp::Lt => a < b,
        CompareOp::Le => a <= b,
        CompareOp::Gt => a > b,
        CompareOp::Ge => a >= b,
        CompareOp::Eq => a == b,
        CompareOp::Ne => a != b,
    }
}

/// `Σ a[i]·b[i]` accumulated in f64 over eight lanes (fixed order: deterministic).
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += *x as f64 * *y as f64;
    }
    s
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `c[r, n] = a_row(r) · bt_row(r, n)` for every output row `r` of length `n_cols`.
fn matmul_rows(
    c: &mut [f32],
    n_cols: usize,
    k: usize,
    a: &[f32],
    bt_of_row: &(dyn Fn(usize) -> usize + Sync),
    bt: &[f32],
    macs: usize,
) {
    let rows = c.len() / n_cols.max(1);
    let row = |r: usize, out: &mut [f32], col0: usize| {
        let ar = &a[r * k..(r + 1) * k];
        let base = bt_of_row(r);
        for (j, o) in out.iter_mut().enumerate() {
            let n = col0 + j;
            *o = dot_f64(ar, &bt[base + n * k..base + (n + 1) * k]) as f32;
        }
    };
    let nt = threads();
    if macs < PARALLEL_MATMUL_MIN_MACS || nt == 1 || n_cols == 0 {
        for (r, out) in c.chunks_mut(n_cols.max(1)).enumerate() {
            row(r, out, 0);
        }
    } else if rows >= nt * 4 {
        let per = rows.div_ceil(nt);
        std::thread::scope(|s| {
            for (t, chunk) in c.chunks_mut(per * n_cols).enumerate() {
                let row = &row;
                s.spawn(move || {
                    for (i, out) in chunk.chunks_mut(n_cols).enumerate() {
                        row(t * per + i, out, 0);
                    }
                });
            }
        });
    } else {
        // Few rows (decode): split each row's columns across threads.
        let per = n_cols.div_ceil(nt);
        for (r, out) in c.chunks_mut(n_cols).enumerate() {
            std::thread::scope(|s| {
                for (t, part) in out.chunks_mut(per).enumerate() {
                    let row = &row;
                    s.spawn(move || row(r, part, t * per));
                }
            });
        }
    }
}

/// Runs a graph. Construction verifies it and plans the evaluation order.
#[derive(Clone, Debug)]
pub struct Interpreter {
    graph: Graph,
    order: Vec<ValueId>,
    uses: Vec<usize>,
    /// Values computed from parameters alone (merged weights, transposes), kept by `prepare`.
    cache: HashMap<ValueId, Tensor>,
}

impl Interpreter {
    pub fn new(graph: &Graph) -> Result<Interpreter, IrError> {
        crate::verify(graph)?;
        let order = graph.live_topo_order().map_err(|v| IrError::Verify {
            value: Some(v),
            msg: "cycle".into(),
        })?;
        Ok(Interpreter {
            graph: graph.clone(),
            order,
            uses: graph.use_counts(),
            cache: HashMap::new(),
        })
    }

    /// Precomputes every value that depends only on parameters and constants (and has a
    /// shape free of symbols) and is used by the rest of the graph, so `run` does not
    /// recompute it (e.g. weights concatenated by `merge-matmuls`). Later runs must pass the
    /// same parameters.
    pub fn prepare(&mut self, params: &HashMap<String, Tensor>) -> Result<(), IrError> {
        let g = &self.graph;
        let mut fixed = vec![false; g.len()];
        for &v in &self.order {
            let n = g.node(v);
            let const_shape = n.ty.shape.dims().iter().all(|d| d.as_const().is_some());
            fixed[v.index()] = const_shape
                && match n.op {
                    Op::Input { .. } => false,
                    Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. } => true,
                    _ => n.inputs.iter().all(|u| fixed[u.index()]),
                };
        }
        // Fixed values some non-fixed node (or an output) needs.
        let mut frontier = vec![false; g.len()];
        for &v in &self.order {
            if !fixed[v.index()] {
                for u in &g.node(v).inputs {
                    frontier[u.index()] |= fixed[u.index()];
                }
            }
        }
        for (_, v) in &g.outputs {
            frontier[v.index()] |= fixed[v.index()];
        }
        // Evaluate the fixed sub-graph once.
        let mut vals: HashMap<ValueId, Tensor> = HashMap::new();
        let bindings = HashMap::new();
        for &v in &self.order {
            if !fixed[v.index()] {
                continue;
            }
            let n = g.node(v);
            let shape =
                n.ty.shape
                    .eval(&bindings)
                    .map_err(|s| ierr(format!("unbound `{s}`")))?;
            let t = match &n.op {
                Op::Param { name } => params
                    .get(name)
                    .cloned()
                    .ok_or_else(|| ierr(format!("missing parameter `{name}`")))?
                    .with_dtype(n.ty.dtype),
                _ => {
                    let args: Vec<&Tensor> = n.inputs.iter().map(|u| &vals[u]).collect();
                    eval(&n.op, n.ty.dtype, &shape, &args)?
                }
            };
            if t.shape != shape {
                return Err(IrError::Interp {
                    value: Some(v),
                    msg: format!(
                        "parameter has shape {:?}, the graph declares {:?}",
                        t.shape, shape
                    ),
                });
            }
            vals.insert(v, t);
        }
        // A fixed right operand of a matmul is stored column-major, so each output element
        // reads one contiguous row of it.
        let mut rhs = vec![false; g.len()];
        for &v in &self.order {
            let n = g.node(v);
            if matches!(n.op, Op::MatMul | Op::RmsNormMatMul { .. }) {
                if let Some(w) = n.inputs.last() {
                    rhs[w.index()] = true;
                }
            }
        }
        self.cache = vals
            .into_iter()
            .filter(|(v, _)| frontier[v.index()])
            .map(|(v, t)| {
                let t = if rhs[v.index()] && t.shape.len() == 2 {
                    t.permute(&[1, 0]).contiguous().permute(&[1, 0])
                } else {
                    t
                };
                (v, t)
            })
            .collect();
        // Re-plan: fixed nodes are no longer evaluated; count uses among the rest.
        self.order
            .retain(|v| !fixed[v.index()] || self.cache.contains_key(v));
        let mut uses = vec![0; g.len()];
        for &v in &self.order {
            if !self.cache.contains_key(&v) {
                for u in &g.node(v).inputs {
                    uses[u.index()] += 1;
                }
            }
        }
        for (_, v) in &g.outputs {
            uses[v.index()] += 1;
        }
        self.uses = uses;
        Ok(())
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Evaluates the graph. `inputs` are bound to `input` nodes and `params` to `param`
    /// nodes by name; symbolic dims are bound from their shapes. Returns the outputs by name.
    pub fn run(
        &self,
        inputs: &HashMap<String, Tensor>,
        params: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, IrError> {
        let g = &self.graph;
        let mut bindings: HashMap<String, i64> = HashMap::new();
        // Bind symbols from inputs and params: single-symbol dims first, then check the rest.
        let bound: Vec<(ValueId, &Tensor)> = g
            .values()
            .filter_map(|v| match &g.node(v).op {
                Op::Input { name } => Some(
                    inputs
                        .get(name)
                        .map(|t| (v, t))
                        .ok_or_else(|| ierr(format!("missing input `{name}`"))),
                ),
                Op::Param { name } => Some(
                    params
                        .get(name)
                        .map(|t| (v, t))
                        .ok_or_else(|| ierr(format!("missing parameter `{name}`"))),
                ),
                _ => None,
            })
            .collect::<Result<_, _>>()?;
        for (v, t) in &bound {
            let ty = g.ty(*v);
            if ty.shape.rank() != t.shape.len() {
                return Err(self.bad_binding(*v, t, &bindings));
            }
            for (d, &n) in ty.shape.dims().iter().zip(&t.shape) {
                if let Some(s) = d.as_sym() {
                    match bindings.get(s) {
                        Some(&prev) if prev != n as i64 => {
                            return Err(self.bad_binding(*v, t, &bindings))
                        }
                        _ => {
                            bindings.insert(s.to_string(), n as i64);
                        }
                    }
                }
            }
        }
        for (v, t) in &bound {
            let ty = g.ty(*v);
            let class_ok = (ty.dtype.is_float() && t.dtype.is_float())
                || (ty.dtype.is_int() && t.dtype.is_int())
                || (ty.dtype == t.dtype);
            if !class_ok || ty.shape.eval(&bindings).ok().as_deref() != Some(t.shape.as_slice()) {
                return Err(self.bad_binding(*v, t, &bindings));
            }
        }
        let mut vals: Vec<Option<Tensor>> = vec![None; g.len()];
        let mut uses = self.uses.clone();
        for &v in &self.order {
            if let Some(t) = self.cache.get(&v) {
                vals[v.index()] = Some(t.clone());
                continue;
            }
            let node = g.node(v);
            let args: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|u| {
                    vals[u.index()]
                        .as_ref()
                        .ok_or_else(|| ierr(format!("{u} used before it is computed")))
                })
                .collect::<Result<_, _>>()?;
            let shape = node.ty.shape.eval(&bindings).map_err(|s| IrError::Interp {
                value: Some(v),
                msg: format!("symbol `{s}` is not bound by any input"),
            })?;
            let out = match &node.op {
                Op::Input { name } => inputs[name].clone().with_dtype(node.ty.dtype),
                Op::Param { name } => params[name].clone().with_dtype(node.ty.dtype),
                _ => eval(&node.op, node.ty.dtype, &shape, &args).map_err(|e| match e {
                    IrError::Interp { value: None, msg } => IrError::Interp {
                        value: Some(v),
                        msg: format!("{}: {msg}", node.op.name()),
                    },
                    e => e,
                })?,
            };
            if out.shape != shape {
                return Err(IrError::Interp {
                    value: Some(v),
                    msg: format!(
                        "{} produced shape {:?}, the graph declares {:?}",
                        node.op.name(),
                        out.shape,
                        shape
                    ),
                });
            }
            for u in &node.inputs {
                uses[u.index()] -= 1;
                if uses[u.index()] == 0 {
                    vals[u.index()] = None;
                }
            }
            vals[v.index()] = Some(out);
        }
        let mut outs = HashMap::new();
        for (name, v) in &g.outputs {
            let t = vals[v.index()]
                .clone()
                .ok_or_else(|| ierr(format!("output `{name}` was not computed")))?;
            outs.insert(name.clone(), t);
        }
        Ok(outs)
    }

    fn bad_binding(&self, v: ValueId, t: &Tensor, b: &HashMap<String, i64>) -> IrError {
        let node = self.graph.node(v);
        let (kind, name) = match &node.op {
            Op::Input { name } => ("input", name.as_str()),
            Op::Param { name } => ("parameter", name.as_str()),
            _ => ("value", ""),
        };
        let mut bound: Vec<String> = b.iter().map(|(k, v)| format!("{k}={v}")).collect();
        bound.sort();
        IrError::Interp {
            value: Some(v),
            msg: format!(
                "{kind} `{name}` is {}{:?}, but the graph expects {}{}",
                t.dtype,
                t.shape,
                node.ty,
                if bound.is_empty() {
                    String::new()
                } else {
                    format!(" (with {})", bound.join(", "))
                }
            ),
        }
    }
}

/// Evaluates one op on its operands; `shape` is the result shape under the current bindings.
fn eval(op: &Op, dtype: DType, shape: &[usize], a: &[&Tensor]) -> Result<Tensor, IrError> {
    Ok(match op {
        Op::Input { .. } | Op::Param { .. } => unreachable!("bound by the caller"),
        Op::Constant { value } => Tensor::splat(dtype, shape.to_vec(), *value),
        Op::Iota { axis } => {
            let strides = contiguous_strides(shape);
            let n: usize = shape.iter().product();
            let idx = (0..n).map(|i| ((i / strides[*axis]) % shape[*axis]) as i64);
            if dtype.is_float() {
                Tensor::dense(
                    dtype,
                    shape.to_vec(),
                    Data::F32(Arc::new(idx.map(|x| round_to(dtype, x as f32)).collect())),
                )
            } else {
                Tensor::dense(
                    dtype,
                    shape.to_vec(),
                    Data::I64(Arc::new(idx.map(|x| wrap_int(dtype, x)).collect())),
                )
            }
        }
        Op::Unary(u) => match &a[0].data {
            Data::F32(_) => {
                let x = a[0].f32s()?;
                let out = x
                    .iter()
                    .map(|&x| round_to(dtype, unary_f32(*u, x)))
                    .collect();
                Tensor::dense(dtype, shape.to_vec(), Data::F32(Arc::new(out)))
            }
            Data::I64(_) => {
                let x = a[0].i64s()?;
                let out = x
                    .iter()
                    .map(|&x| match u {
                        UnaryOp::Neg => Ok(wrap_int(dtype, x.wrapping_neg())),
                        UnaryOp::Abs => Ok(wrap_int(dtype, x.wrapping_abs())),
                        _ => Err(ierr(format!("{} of an integer", u.name()))),
                    })
                    .collect::<Result<_, _>>()?;
                Tensor::dense(dtype, shape.to_vec(), Data::I64(Arc::new(out)))
            }
            Data::Bool(_) => return Err(ierr("arithmetic on bool")),
        },
        Op::Binary(b) => match &a[0].data {
            Data::F32(_) => {
                let (x, y) = (a[0].f32s()?, a[1].f32s()?);
                let out = x
                    .iter()
                    .zip(y.iter())
                    .map(|(&x, &y)| round_to(dtype, binary_f32(*b, x, y)))
                    .collect();
                Tensor::dense(dtype, shape.to_vec(), Data::F32(Arc::new(out)))
            }
            Data::I64(_) => {
                let (x, y) = (a[0].i64s()?, a[1].i64s()?);
                let out = x
                    .iter()
                    .zip(y.iter())
                    .map(|(&x, &y)| binary_i64(*b, x, y).map(|v| wrap_int(dtype, v)))
                    .collect::<Result<_, _>>()?;
                Tensor::dense(dtype, shape.to_vec(), Data::I64(Arc::new(out)))
            }
            Data::Bool(_) => return Err(ierr("arithmetic on bool")),
        },
        Op::Compare(c) => {
            let out: Vec<bool> = match &a[0].data {
                Data::F32(_) => {
                    let (x, y) = (a[0].f32s()?, a[1].f32s()?);
                    x.iter()
                        .zip(y.iter())
                        .map(|(&x, &y)| compare(*c, x, y))
                        .collect()
                }
                Data::I64(_) => {
                    let (x, y) = (a[0].i64s()?, a[1].i64s()?);
                    x.iter()
                        .zip(y.iter())
                        .map(|(&x, &y)| compare(*c, x, y))
                        .collect()
                }
                Data::Bool(_) => {
                    let (x, y) = (a[0].bools()?, a[1].bools()?);
                    x.iter()
                        .zip(y.iter())
                        .map(|(&x, &y)| compare(*c, x, y))
                        .collect()
                }
            };
            Tensor::dense(DType::Bool, shape.to_vec(), Data::Bool(Arc::new(out)))
        }
        Op::Select => {
            let c = a[0].bools()?;
            let data = match &a[1].data {
                Data::F32(_) => {
                    let (x, y) = (a[1].f32s()?, a[2].f32s()?);
                    Data::F32(Arc::new(
                        c.iter()
                            .zip(x.iter().zip(y.iter()))
                            .map(|(&c, (&x, &y))| if c { x } else { y })
                            .collect(),
                    ))
                }
                Data::I64(_) => {
                    let (x, y) = (a[1].i64s()?, a[2].i64s()?);
                    Data::I64(Arc::new(
                        c.iter()
                            .zip(x.iter().zip(y.iter()))
                            .map(|(&c, (&x, &y))| if c { x } else { y })
                            .collect(),
                    ))
                }
                Data::Bool(_) => {
                    let (x, y) = (a[1].bools()?, a[2].bools()?);
                    Data::Bool(Arc::new(
                        c.iter()
                            .zip(x.iter().zip(y.iter()))
                            .map(|(&c, (&x, &y))| if c { x } else { y })
                            .collect(),
                    ))
                }
            };
            Tensor::dense(dtype, shape.to_vec(), data)
        }
        Op::Reduce { op, axis } => reduce(*op, *axis, dtype, a[0])?,
        Op::MatMul => matmul(dtype, shape, a[0], a[1])?,
        Op::Reshape => a[0].reshape(shape.to_vec())?.with_dtype(dtype),
        Op::Permute { perm } => a[0].permute(perm),
        Op::Broadcast => a[0].broadcast(shape.to_vec())?,
        Op::Slice { axis, start, end } => {
            let t = a[0];
            if *end > t.shape[*axis] {
                return Err(ierr(format!(
                    "slice end {end} beyond dim {} of length {}",
                    axis, t.shape[*axis]
                )));
            }
            let mut v = t.clone();
            v.offset += start * t.strides[*axis];
            v.shape[*axis] = end - start;
            v
        }
        Op::Concat { axis } => concat(*axis, dtype, shape, a)?,
        Op::Gather { axis } => gather(*axis, dtype, shape, a[0], a[1])?,
        Op::ScatterAdd => scatter_add(dtype, shape, a[0], a[1])?,
        Op::StopGradient => a[0].clone(),
        Op::Cast => cast(dtype, a[0]),
        Op::Softmax { axis } => {
            let x = a[0].f32s()?;
            let mut out = x.to_vec();
            let outer: usize = shape[..*axis].iter().product();
            let inner: usize = shape[axis + 1..].iter().product();
            for o in 0..outer {
                for i in 0..inner {
                    softmax_strided(
                        &mut out[o * shape[*axis] * inner + i..],
                        shape[*axis],
                        inner,
                    );
                }
            }
            out.iter_mut().for_each(|v| *v = round_to(dtype, *v));
            Tensor::dense(dtype, shape.to_vec(), Data::F32(Arc::new(out)))
        }
        Op::RmsNorm { eps } => Tensor::dense(
            dtype,
            shape.to_vec(),
            Data::F32(Arc::new(rms_norm(a[0], a[1], *eps)?)),
        ),
        Op::RmsNormMatMul { eps } => {
            let xs = a[0].shape.clone();
            let n = Tensor::dense(
                a[0].dtype,
                xs,
                Data::F32(Arc::new(rms_norm(a[0], a[1], *eps)?)),
            );
            matmul(dtype, shape, &n, a[2])?
        }
        Op::SwiGlu => {
            let (g, u) = (a[0].f32s()?, a[1].f32s()?);
            let out = g
                .iter()
                .zip(u.iter())
                .map(|(&g, &u)| round_to(dtype, (g * sigmoid(g)) * u))
                .collect();
            Tensor::dense(dtype, shape.to_vec(), Data::F32(Arc::new(out)))
        }
        Op::FusedAttention { scale } => {
            fused_attention(*scale, dtype, shape, a[0], a[1], a[2], a[3])?
        }
        Op::AttentionLse { scale } => {
            let rows = AttnRows::new(*scale, a[0], a[1], a[2])?;
            let mut out = Vec::with_capacity(shape.iter().product());
            for (bi, hi, ti) in rows.units() {
                out.push(rows.lse(bi, hi, ti) as f32);
            }
            Tensor::dense(dtype, shape.to_vec(), Data::F32(Arc::new(out)))
        }
        Op::AttentionGrad { scale, wrt } => {
            let rows = AttnRows::new(*scale, a[0], a[1], a[3])?;
            let out = attention_grad(&rows, *wrt, a[2], a[4], a[5], a[6])?;
            let out = out.into_iter().map(|v| round_to(dtype, v as f32)).collect();
            Tensor::dense(dtype, shape.to_vec(), Data::F32(Arc::new(out)))
        }
    })
}

/// Attention's query rows against their visible keys, for its backward ops: the scaled
/// score of a (row, key) pair computed as `fused_attention` computes it.
struct AttnRows {
    scale: f32,
    /// `(b, h, t, d, hkv, s)`.
    dims: (usize, usize, usize, usize, usize, usize),
    q: Arc<Vec<f32>>,
    k: Arc<Vec<f32>>,
    pos: Arc<Vec<i64>>,
}

impl AttnRows {
    fn new(scale: f64, q: &Tensor, k: &Tensor, pos: &Tensor) -> Result<AttnRows, IrError> {
        Ok(AttnRows {
            scale: scale as f32,
            dims: (
                q.shape[0], q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2],
            ),
            q: q.f32s()?,
            k: k.f32s()?,
            pos: pos.i64s()?,
        })
    }

    /// Every query row `(b, h, t)`, in memory order.
    fn units(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let (b, h, t, ..) = self.dims;
        (0..b).flat_map(move |bi| (0..h).flat_map(move |hi| (0..t).map(move |ti| (bi, hi, ti))))
    }

    /// Row `(b, h, t)`'s query, its KV head and its visible keys.
    fn row(&self, bi: usize, hi: usize, ti: usize) -> (&[f32], usize, usize) {
        let (_, h, t, d, hkv, s) = self.dims;
        let g = hi / (h / hkv.max(1)).max(1);
        let limit = self.pos[bi * t + ti];
        let visible = if limit < 0 {
            0
        } else {
            (limit as usize + 1).min(s)
        };
        (&self.q[((bi * h + hi) * t + ti) * d..][..d], g, visible)
    }

    fn key(&self, bi: usize, g: usize, j: usize) -> &[f32] {
        let (_, _, _, d, hkv, s) = self.dims;
        &self.k[((bi * hkv + g) * s + j) * d..][..d]
    }

    fn score(&self, qr: &[f32], bi: usize, g: usize, j: usize) -> f64 {
        (dot_f64(qr, self.key(bi, g, j)) as f32 * self.scale) as f64
    }

    /// `log Σ_{j visible} exp(score_j)`, `-inf` with no visible key.
    fn lse(&self, bi: usize, hi: usize, ti: usize) -> f64 {
        let (qr, g, visible) = self.row(bi, hi, ti);
        let scores: Vec<f64> = (0..visible).map(|j| self.score(qr, bi, g, j)).collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return m;
        }
        m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }
}

/// `attention_grad_{q,k,v}` (see `Op::AttentionGrad`), summed in f64 over every visible
/// (row, key) pair.
fn attention_grad(
    rows: &AttnRows,
    wrt: AttnGrad,
    v: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
) -> Result<Vec<f64>, IrError> {
    let (_, _, _, d, hkv, s) = rows.dims;
    let dv = v.shape[3];
    let (vv, dov, lv, dlv) = (v.f32s()?, dout.f32s()?, lse.f32s()?, delta.f32s()?);
    let mut out = vec![
        0f64;
        match wrt {
            AttnGrad::Q => rows.q.len(),
            AttnGrad::K => rows.k.len(),
            AttnGrad::V => vv.len(),
        }
    ];
    for (u, (bi, hi, ti)) in rows.units().enumerate() {
        let (qr, g, visible) = rows.row(bi, hi, ti);
        let dor = &dov[u * dv..][..dv];
        for j in 0..visible {
            let p = (rows.score(qr, bi, g, j) - lv[u] as f64).exp();
            let kv = ((bi * hkv + g) * s + j) * dv;
            let ds = p * (dot_f64(dor, &vv[kv..kv + dv]) - dlv[u] as f64);
            let sc = rows.scale as f64;
            match wrt {
                AttnGrad::Q => {
                    let k = rows.key(bi, g, j);
                    for (o, &x) in out[u * d..][..d].iter_mut().zip(k) {
                        *o += sc * ds * x as f64;
                    }
                }
                AttnGrad::K => {
                    let at = ((bi * hkv + g) * s + j) * d;
                    for (o, &x) in out[at..at + d].iter_mut().zip(qr) {
                        *o += sc * ds * x as f64;
                    }
                }
                AttnGrad::V => {
                    for (o, &x) in out[kv..kv + dv].iter_mut().zip(dor) {
                        *o += p * x as f64;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// In-place softmax of `len` elements `stride` apart, computed as the spelled-out form is:
/// max in f32, `exp(x - max)` in f32, the sum accumulated in f64 and rounded, then divided.
fn softmax_strided(x: &mut [f32], len: usize, stride: usize) {
    let at = |j: usize| j * stride;
    let m = (0..len)
        .map(|j| x[at(j)] as f64)
        .fold(f64::NEG_INFINITY, |m, v| {
            if v.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(v)
            }
        }) as f32;
    for j in 0..len {
        x[at(j)] = (x[at(j)] - m).exp();
    }
    let s = (0..len).map(|j| x[at(j)] as f64).sum::<f64>() as f32;
    for j in 0..len {
        x[at(j)] /= s;
    }
}

/// `w * (x * rsqrt(mean(x²) + eps))` over the last axis, in the spelled-out form's arithmetic.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Vec<f32>, IrError> {
    let (xv, wv) = (x.f32s()?, w.f32s()?);
    let n = *x.shape.last().unwrap_or(&1);
    let eps = eps as f32;
    let mut out = vec![0f32; xv.len()];
    for (row, o) in xv.chunks(n.max(1)).zip(out.chunks_mut(n.max(1))) {
        let mean = (row.iter().map(|&v| (v * v) as f64).sum::<f64>() / n as f64) as f32;
        let r = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(wv.iter()) {
            *o = w * (v * r);
        }
    }
    Ok(out)
}

fn fused_attention(
    scale: f64,
    dtype: DType,
    shape: &[usize],
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: &Tensor,
) -> Result<Tensor, IrError> {
    let (b, h, t, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (hkv, s, dv) = (k.shape[1], k.shape[2], v.shape[3]);
    let rep = h / hkv.max(1);
    let (qv, kv, pv) = (q.f32s()?, k.f32s()?, pos.i64s()?);
    // vᵀ per KV head: [B, Hkv, Dv, S], so each output element is one contiguous dot.
    let vt = v.permute(&[0, 1, 3, 2]).f32s()?;
    let scale = scale as f32;
    let mut out = vec![0f32; b * h * t * dv];
    let mut p = vec![0f32; s];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / rep;
            let kb = &kv[(bi * hkv + g) * s * d..][..s * d];
            let vb = &vt[(bi * hkv + g) * dv * s..][..dv * s];
            for ti in 0..t {
                let qr = &qv[((bi * h + hi) * t + ti) * d..][..d];
                let limit = pv[bi * t + ti];
                for (j, pj) in p.iter_mut().enumerate() {
                    let score = dot_f64(qr, &kb[j * d..(j + 1) * d]) as f32 * scale;
                    *pj = if (j as i64) <= limit {
                        score
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                softmax_strided(&mut p, s, 1);
                let o = &mut out[((bi * h + hi) * t + ti) * dv..][..dv];
                for (c, oc) in o.iter_mut().enumerate() {
                    *oc = round_to(dtype, dot_f64(&p, &vb[c * s..(c + 1) * s]) as f32);
                }
            }
        }
    }
    Ok(Tensor::dense(
        dtype,
        shape.to_vec(),
        Data::F32(Arc::new(out)),
    ))
}

fn reduce(op: ReduceOp, axis: usize, dtype: DType, x: &Tensor) -> Result<Tensor, IrError> {
    let x = x.contiguous();
    let outer: usize = x.shape[..axis].iter().product();
    let len = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut shape = x.shape.clone();
    shape[axis] = 1;
    match &x.data {
        Data::F32(buf) => {
            let mut out = vec![0f32; outer * inner];
            for o in 0..outer {
                for i in 0..inner {
                    let at = |j: usize| buf[(o * len + j) * inner + i];
                    let v = match op {
                        ReduceOp::Sum => (0..len).map(|j| at(j) as f64).sum::<f64>(),
                        ReduceOp::Mean => (0..len).map(|j| at(j) as f64).sum::<f64>() / len as f64,
                        ReduceOp::Max => {
                            (0..len)
                                .map(|j| at(j) as f64)
                                .fold(f64::NEG_INFINITY, |m, v| {
                                    if v.is_nan() || m.is_nan() {
                                        f64::NAN
                                    } else {
                                        m.max(v)
                                    }
                                })
                        }
                    };
                    out[o * inner + i] = round_to(dtype, v as f32);
                }
            }
            Ok(Tensor::dense(dtype, shape, Data::F32(Arc::new(out))))
        }
        Data::I64(buf) => {
            let mut out = vec![0i64; outer * inner];
            for o in 0..outer {
                for i in 0..inner {
                    let it = (0..len).map(|j| buf[(o * len + j) * inner + i]);
                    out[o * inner + i] = wrap_int(
                        dtype,
                        match op {
                            ReduceOp::Sum => it.fold(0i64, |a, b| a.wrapping_add(b)),
                            ReduceOp::Mean => {
                                it.fold(0i64, |a, b| a.wrapping_add(b)) / (len.max(1) as i64)
                            }
                            ReduceOp::Max => it.max().unwrap_or(i64::MIN),
                        },
                    );
                }
            }
            Ok(Tensor::dense(dtype, shape, Data::I64(Arc::new(out))))
        }
        Data::Bool(_) => Err(ierr("reduction of bool")),
    }
}

fn matmul(dtype: DType, shape: &[usize], a: &Tensor, b: &Tensor) -> Result<Tensor, IrError> {
    let ra = a.shape.len();
    let rb = b.shape.len();
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let n = b.shape[rb - 1];
    if b.shape[rb - 2] != k {
        return Err(ierr(format!(
            "inner dims differ: {:?} x {:?}",
            a.shape, b.shape
        )));
    }
    let av = a.f32s()?;
    // Bᵀ as a dense [.., N, K] buffer: free when B is itself a transposed view (a weight).
    let mut perm: Vec<usize> = (0..rb).collect();
    perm.swap(rb - 1, rb - 2);
    let bt = b.permute(&perm).f32s()?;
    let batch: usize = a.shape[..ra - 2].iter().product();
    let shared_b = rb == 2;
    let mut c = vec![0f32; batch * m * n];
    let bt_of_row = move |r: usize| if shared_b { 0 } else { (r / m.max(1)) * n * k };
    matmul_rows(&mut c, n, k, &av, &bt_of_row, &bt, batch * m * n * k);
    if dtype != DType::F32 {
        c.iter_mut().for_each(|x| *x = round_to(dtype, *x));
    }
    Ok(Tensor::dense(dtype, shape.to_vec(), Data::F32(Arc::new(c))))
}

/// Sums in f64, in index order.
fn scatter_add(
    dtype: DType,
    shape: &[usize],
    idx: &Tensor,
    src: &Tensor,
) -> Result<Tensor, IrError> {
    let ids = idx.i64s()?;
    let vals = src.f32s()?;
    let rows = shape[0];
    let inner: usize = shape[1..].iter().product();
    let mut acc = vec![0f64; rows * inner];
    for (j, &i) in ids.iter().enumerate() {
        if i < 0 || i as usize >= rows {
            return Err(ierr(format!(
                "index {i} is out of range for an axis of length {rows}"
            )));
        }
        let (o, s) = (i as usize * inner, j * inner);
        for (a, &v) in acc[o..o + inner].iter_mut().zip(&vals[s..s + inner]) {
            *a += v as f64;
        }
    }
    let out = acc.into_iter().map(|x| round_to(dtype, x as f32)).collect();
    Ok(Tensor::dense(
        dtype,
        shape.to_vec(),
        Data::F32(Arc::new(out)),
    ))
}

fn concat(axis: usize, dtype: DType, shape: &[usize], xs: &[&Tensor]) -> Result<Tensor, IrError> {
    let outer: usize = shape[..axis].iter().product();
    macro_rules! cat {
        ($get:ident, $variant:ident) => {{
            let parts: Vec<_> = xs.iter().map(|t| t.$get()).collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(shape.iter().product());
            for o in 0..outer {
                for (p, t) in parts.iter().zip(xs) {
                    let block: usize = t.shape[axis..].iter().product();
                    out.extend_from_slice(&p[o * block..(o + 1) * block]);
                }
            }
            Data::$variant(Arc::new(out))
        }};
    }
    let data = match &xs[0].data {
        Data::F32(_) => cat!(f32s, F32),
        Data::I64(_) => cat!(i64s, I64),
        Data::Bool(_) => cat!(bools, Bool),
    };
    Ok(Tensor::dense(dtype, shape.to_vec(), data))
}

fn gather(
    axis: usize,
    dtype: DType,
    shape: &[usize],
    table: &Tensor,
    idx: &Tensor,
) -> Result<Tensor, IrError> {
    let ids = idx.i64s()?;
    let outer: usize = table.shape[..axis].iter().product();
    let len = table.shape[axis];
    let inner: usize = table.shape[axis + 1..].iter().product();
    for &i in ids.iter() {
        if i < 0 || i as usize >= len {
            return Err(ierr(format!(
                "index {i} is out of range for an axis of length {len}"
            )));
        }
    }
    macro_rules! gat {
        ($get:ident, $variant:ident) => {{
            let t = table.$get()?;
            let mut out = Vec::with_capacity(shape.iter().product());
            for o in 0..outer {
                for &i in ids.iter() {
                    let at = (o * len + i as usize) * inner;
                    out.extend_from_slice(&t[at..at + inner]);
                }
            }
            Data::$variant(Arc::new(out))
        }};
    }
    let data = match &table.data {
        Data::F32(_) => gat!(f32s, F32),
        Data::I64(_) => gat!(i64s, I64),
        Data::Bool(_) => gat!(bools, Bool),
    };
    Ok(Tensor::dense(dtype, shape.to_vec(), data))
}

fn cast(dtype: DType, x: &Tensor) -> Tensor {
    let shape = x.shape.clone();
    let data = if dtype.is_float() {
        Data::F32(Arc::new(
            x.to_f32_vec()
                .into_iter()
                .map(|v| round_to(dtype, v))
                .collect(),
        ))
    } else if dtype == DType::Bool {
        Data::Bool(Arc::new(
            x.to_f32_vec().into_iter().map(|v| v != 0.0).collect(),
        ))
    } else {
        Data::I64(Arc::new(
            x.to_i64_vec()
                .into_iter()
                .map(|v| wrap_int(dtype, v))
                .collect(),
        ))
    };
    Tensor::dense(dtype, shape, data)
}
