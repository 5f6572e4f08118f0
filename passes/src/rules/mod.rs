//! Rewrite rules, one file per topic. Each rule has a kebab-case name, its math in a
//! comment, a pattern (an s-expression of op names) and an applier that checks the
//! conditions the pattern cannot express (axes, constants, shapes) and builds the result
//! through `add_typed`, so every rewrite preserves types. Rules point one way — toward the
//! simpler or fused form — and none is an unbounded commutativity or associativity rule.

pub mod algebra;
pub mod fusion;
pub mod layout;
pub mod merge;

use egg::{Applier, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use egret_ir::{Op, TensorType};

use crate::egraph::{add_typed, ENode, TensorAnalysis, EG};

pub type Rw = Rewrite<ENode, TensorAnalysis>;

struct Apply<F>(F);

impl<F> Applier<ENode, TensorAnalysis> for Apply<F>
where
    F: Fn(&mut EG, Id, &Subst) -> Option<Id> + Send + Sync + 'static,
{
    fn apply_one(
        &self,
        eg: &mut EG,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<ENode>>,
        _: Symbol,
    ) -> Vec<Id> {
        let Some(id) = (self.0)(eg, eclass, subst) else {
            return vec![];
        };
        if eg[id].data.ty != eg[eclass].data.ty {
            debug_assert!(
                false,
                "rule changed a type: {} vs {}",
                eg[id].data.ty, eg[eclass].data.ty
            );
            return vec![];
        }
        if eg.union(eclass, id) {
            vec![id]
        } else {
            vec![]
        }
    }
}

/// A rule from its name, pattern and applier. The applier gets `(egraph, matched class,
/// bindings)` and returns an equivalent class, or `None` where a condition fails.
///
/// A pattern names each variable once: egg compiles a subterm whose variables are already
/// bound into a hash-cons lookup, which cannot honour wildcard attributes. Where two
/// positions must be the same value, bind two variables and compare their classes.
pub fn rule<F>(name: &str, lhs: &str, f: F) -> Rw
where
    F: Fn(&mut EG, Id, &Subst) -> Option<Id> + Send + Sync + 'static,
{
    let pat: Pattern<ENode> = lhs
        .parse()
        .unwrap_or_else(|e| panic!("rule {name}: bad pattern {lhs}: {e:?}"));
    let mut vars: Vec<&str> = lhs
        .split(|c: char| c == '(' || c == ')' || c.is_whitespace())
        .filter(|t| t.starts_with('?'))
        .collect();
    let n = vars.len();
    vars.sort();
    vars.dedup();
    assert_eq!(vars.len(), n, "rule {name}: a variable repeats in {lhs}");
    Rewrite::new(name, pat, Apply(f)).unwrap_or_else(|e| panic!("rule {name}: {e}"))
}

/// The class bound to `?name`.
pub fn var(s: &Subst, name: &str) -> Id {
    let v: Var = name.parse().expect("variable name");
    s[v]
}

/// Whether two bindings are the same e-class.
pub fn same(eg: &EG, a: Id, b: Id) -> bool {
    eg.find(a) == eg.find(b)
}

pub fn ty(eg: &EG, id: Id) -> TensorType {
    eg[id].data.ty.clone()
}

pub fn konst(eg: &EG, id: Id) -> Option<f64> {
    eg[id].data.konst
}

/// Whether the class is a splat constant equal to `v` at f32 precision (how the
/// interpreter stores it).
pub fn is_const(eg: &EG, id: Id, v: f64) -> bool {
    konst(eg, id).is_some_and(|c| (c as f32) == (v as f32) || (c.is_nan() && v.is_nan()))
}

/// The e-nodes of a class whose op has this name (cloned: callers then mutate the e-graph).
pub fn nodes_named(eg: &EG, id: Id, name: &str) -> Vec<ENode> {
    eg[id]
        .nodes
        .iter()
        .filter(|n| n.op.name() == name)
        .cloned()
        .collect()
}

pub fn first_named(eg: &EG, id: Id, name: &str) -> Option<ENode> {
    eg[id].nodes.iter().find(|n| n.op.name() == name).cloned()
}

pub fn constant(eg: &mut EG, value: f64, ty: TensorType) -> Id {
    eg.add(ENode::new(Op::Constant { value }, Some(ty), vec![]))
}

pub fn op(eg: &mut EG, op: Op, children: Vec<Id>) -> Option<Id> {
    add_typed(eg, op, None, children)
}

pub fn declared(eg: &mut EG, op: Op, ty: TensorType, children: Vec<Id>) -> Option<Id> {
    add_typed(eg, op, Some(ty), children)
}

/// Every rule of the e-graph passes, by topic.
pub fn all() -> Vec<Rw> {
    let mut r = algebra::rules();
    r.extend(layout::rules());
    r.extend(fusion::rules());
    r
}

/// Rules that only simplify (no fusion): the `canonicalize` pass.
pub fn canonical() -> Vec<Rw> {
    let mut r = algebra::rules();
    r.extend(layout::rules());
    r
}
