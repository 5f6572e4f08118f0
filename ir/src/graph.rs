//! `Graph`: values in SSA form. Node `i` defines value `%i`; its operands are earlier or later
//! values (the verifier rejects cycles). Builders append in topological order; `compact`
//! restores that order and drops dead nodes after a pass.

use std::collections::HashMap;
use std::fmt;

use crate::dtype::DType;
use crate::infer::infer_type;
use crate::op::{BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};
use crate::shape::{Dim, Shape};
use crate::IrError;

/// An SSA value: the result of node `.0`. Displays as `%12`, as in the text format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// The type of a value: element type and symbolic shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, dims: Vec<Dim>) -> TensorType {
        TensorType {
            dtype,
            shape: Shape(dims),
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub ty: TensorType,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    /// Named results, in order.
    pub outputs: Vec<(String, ValueId)>,
}

impl Graph {
    pub fn new(name: &str) -> Graph {
        Graph {
            name: name.to_string(),
            nodes: Vec::new(),
            outputs: Vec::new(),
        }
    }

    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.index()]
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.nodes[v.index()].ty
    }

    pub fn shape(&self, v: ValueId) -> &[Dim] {
        self.ty(v).shape.dims()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = ValueId> {
        (0..self.nodes.len() as u32).map(ValueId)
    }

    /// Appends a node with an explicit type, unchecked (the verifier checks it later).
    pub fn push(&mut self, op: Op, inputs: Vec<ValueId>, ty: TensorType) -> ValueId {
        let id = ValueId(self.nodes.len() as u32);
        self.nodes.push(Node { op, inputs, ty });
        id
    }

    /// Appends a node whose type is inferred (for ops that declare their type, `declared`
    /// supplies it). Errors say which op and operands disagree.
    pub fn add(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        declared: Option<TensorType>,
    ) -> Result<ValueId, IrError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|v| self.ty(*v)).collect();
        let ty = infer_type(&op, &tys, declared.as_ref()).map_err(|msg| IrError::Build {
            op: op.name().to_string(),
            msg,
        })?;
        Ok(self.push(op, inputs.to_vec(), ty))
    }

    pub fn output(&mut self, name: &str, v: ValueId) {
        self.outputs.push((name.to_string(), v));
    }

    /// Named inputs (`input` nodes), in node order.
    pub fn inputs(&self) -> Vec<(&str, ValueId)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Input { name } => Some((name.as_str(), ValueId(i as u32))),
                _ => None,
            })
            .collect()
    }

    /// Parameters (`param` nodes), in node order.
    pub fn params(&self) -> Vec<(&str, ValueId)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.op {
                Op::Param { name } => Some((name.as_str(), ValueId(i as u32))),
                _ => None,
            })
            .collect()
    }

    /// Number of uses of each value (as an operand or an output).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.nodes.len()];
        for n in &self.nodes {
            for v in &n.inputs {
                if let Some(u) = uses.get_mut(v.index()) {
                    *u += 1;
                }
            }
        }
        for (_, v) in &self.outputs {
            if let Some(u) = uses.get_mut(v.index()) {
                *u += 1;
            }
        }
        uses
    }

    /// A topological order of the nodes reachable from the outputs, or the id of a node on
    /// a cycle. Operand ids must be in range (the verifier checks that first).
    /// Like `live_topo_order`, but at each node the operand with the longest chain behind
    /// it is computed first: a short side computation (a recomputed activation next to a
    /// long chain of gradients) then runs just before its use instead of long before it.
    pub fn deep_first_topo_order(&self) -> Result<Vec<ValueId>, ValueId> {
        let order = self.live_topo_order()?;
        let mut depth = vec![0usize; self.nodes.len()];
        for &v in &order {
            depth[v.index()] = 1 + self.nodes[v.index()]
                .inputs
                .iter()
                .map(|u| depth[u.index()])
                .max()
                .unwrap_or(0);
        }
        let mut done = vec![false; self.nodes.len()];
        let mut out = Vec::with_capacity(order.len());
        for (_, root) in &self.outputs {
            let mut stack = vec![(*root, false)];
            while let Some((v, expanded)) = stack.pop() {
                if done[v.index()] {
                    continue;
                }
                if expanded {
                    done[v.index()] = true;
                    out.push(v);
                    continue;
                }
                stack.push((v, true));
                let mut ins: Vec<ValueId> = self.nodes[v.index()]
                    .inputs
                    .iter()
                    .copied()
                    .filter(|u| !done[u.index()])
                    .collect();
                // Pushed shallowest first, so the deepest is popped (computed) first.
                ins.sort_by_key(|u| depth[u.index()]);
                stack.extend(ins.into_iter().map(|u| (u, false)));
            }
        }
        Ok(out)
    }

    pub fn live_topo_order(&self) -> Result<Vec<ValueId>, ValueId> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let mut mark = vec![Mark::New; self.nodes.len()];
        let mut order = Vec::new();
        for (_, root) in &self.outputs {
            if mark[root.index()] != Mark::New {
                continue;
            }
            // Iterative DFS: (node, next operand index).
            let mut stack = vec![(*root, 0usize)];
            mark[root.index()] = Mark::Active;
            while let Some(&mut (v, ref mut k)) = stack.last_mut() {
                let node = &self.nodes[v.index()];
                if *k < node.inputs.len() {
                    let u = node.inputs[*k];
                    *k += 1;
                    match mark[u.index()] {
                        Mark::New => {
                            mark[u.index()] = Mark::Active;
                            stack.push((u, 0));
                        }
                        Mark::Active => return Err(u),
                        Mark::Done => {}
                    }
                } else {
                    mark[v.index()] = Mark::Done;
                    order.push(v);
                    stack.pop();
                }
            }
        }
        Ok(order)
    }

    /// Rebuilds the graph with only the nodes the outputs need, in topological order,
    /// renumbered densely. Returns the number of nodes removed.
    pub fn compact(&mut self) -> Result<usize, IrError> {
        let order = self.live_topo_order().map_err(|v| IrError::Verify {
            value: Some(v),
            msg: "value depends on itself (cycle)".into(),
        })?;
        let mut remap: HashMap<ValueId, ValueId> = HashMap::new();
        let mut nodes = Vec::with_capacity(order.len());
        for v in order {
            let mut n = self.nodes[v.index()].clone();
            n.inputs = n.inputs.iter().map(|u| remap[u]).collect();
            remap.insert(v, ValueId(nodes.len() as u32));
            nodes.push(n);
        }
        let removed = self.nodes.len() - nodes.len();
        self.nodes = nodes;
        for (_, v) in &mut self.outputs {
            *v = remap[v];
        }
        Ok(removed)
    }

    /// Fixes some symbolic dims to constants (e.g. `B=1, T=2048` for a memory plan).
    pub fn bind_dims(&mut self, bindings: &HashMap<String, i64>) {
        for n in &mut self.nodes {
            n.ty.shape = crate::shape::Shape(
                n.ty.shape
                    .dims()
                    .iter()
                    .map(|d| d.substitute(bindings))
                    .collect(),
            );
        }
    }

    /// Graphviz text of the graph (one box per node, edges from operands).
    pub fn to_dot(&self) -> String {
        use petgraph::dot::{Config, Dot};
        use petgraph::graph::DiGraph;
        let mut g: DiGraph<String, ()> = DiGraph::new();
        let ids: Vec<_> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let label = match &n.op {
                    Op::Input { name } | Op::Param { name } => {
                        format!("%{i} {} {name}\n{}", n.op.name(), n.ty)
                    }
                    _ => format!("%{i} {}\n{}", n.op.name(), n.ty),
                };
                g.add_node(label)
            })
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            for u in &n.inputs {
                if let Some(src) = ids.get(u.index()) {
                    g.add_edge(*src, ids[i], ());
                }
            }
        }
        for (name, v) in &self.outputs {
            let o = g.add_node(format!("output {name}"));
            if let Some(src) = ids.get(v.index()) {
                g.add_edge(*src, o, ());
            }
        }
        format!("{:?}", Dot::with_config(&g, &[Config::EdgeNoLabel]))
    }
}

/// Convenience builders used by model definitions and tests. Each infers the result type and
/// returns an error naming the op if operand types disagree.
impl Graph {
    pub fn input(&mut self, name: &str, dtype: DType, dims: Vec<Dim>) -> ValueId {
        self.push(
            Op::Input { name: name.into() },
            vec![],
            TensorType::new(dtype, dims),
        )
    }

    pub fn param(&mut self, name: &str, dtype: DType, dims: Vec<Dim>) -> ValueId {
        self.push(
            Op::Param { name: name.into() },
            vec![],
            TensorType::new(dtype, dims),
        )
    }

    pub fn constant(&mut self, value: f64, dtype: DType, dims: Vec<Dim>) -> ValueId {
        self.push(Op::Constant { value }, vec![], TensorType::new(dtype, dims))
    }

    /// A constant with the same type as `like`.
    pub fn constant_like(&mut self, value: f64, like: ValueId) -> ValueId {
        let ty = self.ty(like).clone();
        self.push(Op::Constant { value }, vec![], ty)
    }

    pub fn iota(&mut self, axis: usize, dtype: DType, dims: Vec<Dim>) -> Result<ValueId, IrError> {
        self.add(Op::Iota { axis }, &[], Some(TensorType::new(dtype, dims)))
    }

    pub fn unary(&mut self, op: UnaryOp, x: ValueId) -> Result<ValueId, IrError> {
        self.add(Op::Unary(op), &[x], None)
    }

    pub fn binary(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        self.add(Op::Binary(op), &[a, b], None)
    }

    pub fn compare(&mut self, op: CompareOp, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        self.add(Op::Compare(op), &[a, b], None)
    }

    pub fn select(&mut self, c: ValueId, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        self.add(Op::Select, &[c, a, b], None)
    }

    pub fn reduce(&mut self, op: ReduceOp, x: ValueId, axis: usize) -> Result<ValueId, IrError> {
        self.add(Op::Reduce { op, axis }, &[x], None)
    }

    pub fn matmul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId, IrError> {
        self.add(Op::MatMul, &[a, b], None)
    }

    pub fn reshape(&mut self, x: ValueId, dims: Vec<Dim>) -> Result<ValueId, IrError> {
        let dtype = self.ty(x).dtype;
        self.add(Op::Reshape, &[x], Some(TensorType::new(dtype, dims)))
    }

    pub fn permute(&mut self, x: ValueId, perm: Vec<usize>) -> Result<ValueId, IrError> {
        self.add(Op::Permute { perm }, &[x], None)
    }

    pub fn broadcast(&mut self, x: ValueId, dims: Vec<Dim>) -> Result<ValueId, IrError> {
        let dtype = self.ty(x).dtype;
        self.add(Op::Broadcast, &[x], Some(TensorType::new(dtype, dims)))
    }

    pub fn slice(
        &mut self,
        x: ValueId,
        axis: usize,
        start: usize,
        end: usize,
    ) -> Result<ValueId, IrError> {
        self.add(Op::Slice { axis, start, end }, &[x], None)
    }

    pub fn concat(&mut self, xs: &[ValueId], axis: usize) -> Result<ValueId, IrError> {
        self.add(Op::Concat { axis }, xs, None)
    }

    pub fn gather(
        &mut self,
        table: ValueId,
        idx: ValueId,
        axis: usize,
    ) -> Result<ValueId, IrError> {
        self.add(Op::Gather { axis }, &[table, idx], None)
    }

    pub fn stop_gradient(&mut self, x: ValueId) -> Result<ValueId, IrError> {
        self.add(Op::StopGradient, &[x], None)
    }

    /// `scatter_add(idx, src)` into `rows` rows (see `Op::ScatterAdd`).
    pub fn scatter_add(
        &mut self,
        idx: ValueId,
        src: ValueId,
        rows: Dim,
    ) -> Result<ValueId, IrError> {
        let (is, ss) = (self.shape(idx).len(), self.shape(src).to_vec());
        let mut dims = vec![rows];
        dims.extend(ss.iter().skip(is).cloned());
        let ty = TensorType {
            dtype: self.ty(src).dtype,
            shape: Shape(dims),
        };
        self.add(Op::ScatterAdd, &[idx, src], Some(ty))
    }

    pub fn cast(&mut self, x: ValueId, dtype: DType) -> Result<ValueId, IrError> {
        let shape = self.ty(x).shape.clone();
        self.add(Op::Cast, &[x], Some(TensorType { dtype, shape }))
    }

    /// `broadcast(x)` to `like`'s shape, reshaping first if `x` has lower rank (its dims are
    /// aligned to the right, as in numpy).
    pub fn broadcast_to(&mut self, x: ValueId, like: &[Dim]) -> Result<ValueId, IrError> {
        let xs = self.shape(x).to_vec();
        if xs.as_slice() == like {
            return Ok(x);
        }
        let x = if xs.len() < like.len() {
            let mut dims = vec![Dim::c(1); like.len() - xs.len()];
            dims.extend(xs);
            self.reshape(x, dims)?
        } else {
            x
        };
        self.broadcast(x, like.to_vec())
    }
}
