//! Type rules: the result type of every op from its operands' types. Used by the graph
//! builders, the verifier and (later) the e-graph's shape analysis, so the rules live once.

use crate::dtype::DType;
use crate::graph::TensorType;
use crate::op::{AttnGrad, Op};
use crate::shape::{Dim, Shape};

fn same_shape(a: &TensorType, b: &TensorType, what: &str) -> Result<(), String> {
    if a.shape != b.shape {
        return Err(format!(
            "{what}: operand shapes differ: {} vs {} (broadcast explicitly)",
            a.shape, b.shape
        ));
    }
    Ok(())
}

fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis >= rank {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(())
}

fn float(t: &TensorType) -> Result<(), String> {
    if !t.dtype.is_float() {
        return Err(format!("needs a float operand, got {}", t.dtype));
    }
    Ok(())
}

fn rms_norm_operands(x: &TensorType, w: &TensorType) -> Result<(), String> {
    float(x)?;
    if w.dtype != x.dtype
        || w.shape.rank() != 1
        || x.shape.rank() == 0
        || w.shape.0[0] != x.shape.0[x.shape.rank() - 1]
    {
        return Err(format!("weight {w} does not fit the last dim of {x}"));
    }
    Ok(())
}

/// Infers the result type of `op` applied to operands of types `ins`. For ops that declare
/// their type, `declared` is required and checked for consistency with the operands.
pub fn infer_type(
    op: &Op,
    ins: &[&TensorType],
    declared: Option<&TensorType>,
) -> Result<TensorType, String> {
    if let Some(n) = op.arity() {
        if ins.len() != n {
            return Err(format!("expects {n} operand(s), got {}", ins.len()));
        }
    } else if ins.is_empty() {
        return Err("expects at least one operand".into());
    }
    let need_declared = || {
        declared
            .cloned()
            .ok_or_else(|| "needs a declared result type".to_string())
    };
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } => need_declared(),
        Op::Iota { axis } => {
            let t = need_declared()?;
            check_axis(*axis, t.shape.rank())?;
            if t.dtype == DType::Bool {
                return Err("iota of bool is meaningless".into());
            }
            Ok(t)
        }
        Op::Unary(u) => {
            if !ins[0].dtype.is_float()
                && !matches!(u, crate::op::UnaryOp::Neg | crate::op::UnaryOp::Abs)
            {
                return Err(format!(
                    "{} needs a float operand, got {}",
                    u.name(),
                    ins[0].dtype
                ));
            }
            if ins[0].dtype == DType::Bool {
                return Err("arithmetic on bool".into());
            }
            Ok(ins[0].clone())
        }
        Op::Binary(b) => {
            same_shape(ins[0], ins[1], b.name())?;
            if ins[0].dtype != ins[1].dtype {
                return Err(format!(
                    "operand dtypes differ: {} vs {}",
                    ins[0].dtype, ins[1].dtype
                ));
            }
            if ins[0].dtype == DType::Bool {
                return Err("arithmetic on bool".into());
            }
            Ok(ins[0].clone())
        }
        Op::Compare(c) => {
            same_shape(ins[0], ins[1], c.name())?;
            if ins[0].dtype != ins[1].dtype {
                return Err(format!(
                    "operand dtypes differ: {} vs {}",
                    ins[0].dtype, ins[1].dtype
                ));
            }
            Ok(TensorType {
                dtype: DType::Bool,
                shape: ins[0].shape.clone(),
            })
        }
        Op::Select => {
            if ins[0].dtype != DType::Bool {
                return Err(format!("condition must be bool, got {}", ins[0].dtype));
            }
            same_shape(ins[0], ins[1], "select")?;
            same_shape(ins[1], ins[2], "select")?;
            if ins[1].dtype != ins[2].dtype {
                return Err(format!(
                    "branch dtypes differ: {} vs {}",
                    ins[1].dtype, ins[2].dtype
                ));
            }
            Ok(ins[1].clone())
        }
        Op::Reduce { axis, .. } => {
            check_axis(*axis, ins[0].shape.rank())?;
            if ins[0].dtype == DType::Bool {
                return Err("reduction of bool".into());
            }
            let mut dims = ins[0].shape.0.clone();
            dims[*axis] = Dim::c(1);
            Ok(TensorType {
                dtype: ins[0].dtype,
                shape: Shape(dims),
            })
        }
        Op::MatMul => {
            let (a, b) = (&ins[0].shape.0, &ins[1].shape.0);
            if a.len() < 2 || b.len() < 2 {
                return Err(format!(
                    "operands must have rank >= 2, got {} and {}",
                    ins[0].shape, ins[1].shape
                ));
            }
            if ins[0].dtype != ins[1].dtype || !ins[0].dtype.is_float() {
                return Err(format!(
                    "operands must share a float dtype, got {} and {}",
                    ins[0].dtype, ins[1].dtype
                ));
            }
            let (m, k) = (&a[a.len() - 2], &a[a.len() - 1]);
            let (k2, n) = (&b[b.len() - 2], &b[b.len() - 1]);
            if k != k2 {
                return Err(format!(
                    "inner dims differ: {} x {}",
                    ins[0].shape, ins[1].shape
                ));
            }
            if b.len() != 2 && a[..a.len() - 2] != b[..b.len() - 2] {
                return Err(format!(
                    "batch dims differ: {} x {}",
                    ins[0].shape, ins[1].shape
                ));
            }
            let mut dims = a[..a.len() - 2].to_vec();
            dims.push(m.clone());
            dims.push(n.clone());
            Ok(TensorType {
                dtype: ins[0].dtype,
                shape: Shape(dims),
            })
        }
        Op::Reshape => {
            let t = need_declared()?;
            if t.dtype != ins[0].dtype {
                return Err(format!(
                    "reshape cannot change dtype ({} -> {})",
                    ins[0].dtype, t.dtype
                ));
            }
            if !ins[0].shape.same_numel(&t.shape) {
                return Err(format!(
                    "element counts differ: {} -> {}",
                    ins[0].shape, t.shape
                ));
            }
            Ok(t)
        }
        Op::Permute { perm } => {
            let rank = ins[0].shape.rank();
            let mut seen = vec![false; rank];
            if perm.len() != rank
                || perm
                    .iter()
                    .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
            {
                return Err(format!("{perm:?} is not a permutation of {rank} axes"));
            }
            let dims = perm.iter().map(|&p| ins[0].shape.0[p].clone()).collect();
            Ok(TensorType {
                dtype: ins[0].dtype,
                shape: Shape(dims),
            })
        }
        Op::Broadcast => {
            let t = need_declared()?;
            if t.dtype != ins[0].dtype {
                return Err("broadcast cannot change dtype".into());
            }
            if t.shape.rank() != ins[0].shape.rank() {
                return Err(format!(
                    "rank differs: {} -> {} (reshape first)",
                    ins[0].shape, t.shape
                ));
            }
            for (i, o) in ins[0].shape.0.iter().zip(&t.shape.0) {
                if i != o && i.as_const() != Some(1) {
                    return Err(format!("cannot broadcast {} to {}", ins[0].shape, t.shape));
                }
            }
            Ok(t)
        }
        Op::Slice { axis, start, end } => {
            check_axis(*axis, ins[0].shape.rank())?;
            if start > end {
                return Err(format!("slice start {start} > end {end}"));
            }
            let d = &ins[0].shape.0[*axis];
            if let Some(len) = d.as_const() {
                if *end as i64 > len {
                    return Err(format!("slice end {end} beyond dim {len}"));
                }
            }
            let mut dims = ins[0].shape.0.clone();
            dims[*axis] = Dim::c((end - start) as i64);
            Ok(TensorType {
                dtype: ins[0].dtype,
                shape: Shape(dims),
            })
        }
        Op::Concat { axis } => {
            let first = ins[0];
            check_axis(*axis, first.shape.rank())?;
            let mut total = Dim::c(0);
            for t in ins {
                if t.dtype != first.dtype || t.shape.rank() != first.shape.rank() {
                    return Err(format!("operands differ in dtype or rank: {first} vs {t}"));
                }
                for (i, (a, b)) in t.shape.0.iter().zip(&first.shape.0).enumerate() {
                    if i != *axis && a != b {
                        return Err(format!(
                            "dims off the concat axis differ: {} vs {}",
                            first.shape, t.shape
                        ));
                    }
                }
                total = total.add(&t.shape.0[*axis]);
            }
            let mut dims = first.shape.0.clone();
            dims[*axis] = total;
            Ok(TensorType {
                dtype: first.dtype,
                shape: Shape(dims),
            })
        }
        Op::Gather { axis } => {
            check_axis(*axis, ins[0].shape.rank())?;
            if !ins[1].dtype.is_int() {
                return Err(format!("indices must be integers, got {}", ins[1].dtype));
            }
            let t = &ins[0].shape.0;
            let mut dims = t[..*axis].to_vec();
            dims.extend(ins[1].shape.0.iter().cloned());
            dims.extend(t[axis + 1..].iter().cloned());
            Ok(TensorType {
                dtype: ins[0].dtype,
                shape: Shape(dims),
            })
        }
        Op::StopGradient => Ok(ins[0].clone()),
        Op::ScatterAdd => {
            let t = need_declared()?;
            if !ins[0].dtype.is_int() {
                return Err(format!("indices must be integers, got {}", ins[0].dtype));
            }
            float(ins[1])?;
            let (is, ss, os) = (&ins[0].shape.0, &ins[1].shape.0, &t.shape.0);
            if t.dtype != ins[1].dtype
                || ss.len() < is.len()
                || ss[..is.len()] != is[..]
                || os.len() != ss.len() - is.len() + 1
                || os[1..] != ss[is.len()..]
            {
                return Err(format!(
                    "indices {} and values {} cannot scatter into {} {}",
                    ins[0].shape, ins[1].shape, t.dtype, t.shape
                ));
            }
            Ok(t)
        }
        Op::Softmax { axis } => {
            check_axis(*axis, ins[0].shape.rank())?;
            float(ins[0])?;
            Ok(ins[0].clone())
        }
        Op::RmsNorm { .. } => {
            rms_norm_operands(ins[0], ins[1])?;
            Ok(ins[0].clone())
        }
        Op::RmsNormMatMul { .. } => {
            rms_norm_operands(ins[0], ins[1])?;
            infer_type(&Op::MatMul, &[ins[0], ins[2]], None).and_then(|t| {
                if ins[2].shape.rank() != 2 {
                    return Err(format!("weight must be rank 2, got {}", ins[2].shape));
                }
                Ok(t)
            })
        }
        Op::SwiGlu => {
            same_shape(ins[0], ins[1], "swiglu")?;
            float(ins[0])?;
            if ins[0].dtype != ins[1].dtype {
                return Err(format!(
                    "operand dtypes differ: {} vs {}",
                    ins[0].dtype, ins[1].dtype
                ));
            }
            Ok(ins[0].clone())
        }
        Op::FusedAttention { .. } => attention_type(ins[0], ins[1], Some(ins[2]), ins[3]),
        Op::AttentionLse { .. } => {
            attention_type(ins[0], ins[1], None, ins[2])?;
            Ok(TensorType {
                dtype: DType::F32,
                shape: Shape(ins[0].shape.0[..3].to_vec()),
            })
        }
        Op::AttentionGrad { wrt, .. } => {
            let out = attention_type(ins[0], ins[1], Some(ins[2]), ins[3])?;
            if *ins[4] != out {
                return Err(format!(
                    "the output's gradient must be {} {}, got {} {}",
                    out.dtype, out.shape, ins[4].dtype, ins[4].shape
                ));
            }
            let rows = Shape(ins[0].shape.0[..3].to_vec());
            for (t, what) in [(ins[5], "lse"), (ins[6], "delta")] {
                if t.dtype != DType::F32 || t.shape != rows {
                    return Err(format!(
                        "{what} must be f32 {rows}, got {} {}",
                        t.dtype, t.shape
                    ));
                }
            }
            Ok(match wrt {
                AttnGrad::Q => ins[0].clone(),
                AttnGrad::K => ins[1].clone(),
                AttnGrad::V => ins[2].clone(),
            })
        }
        Op::Cast => {
            let t = need_declared()?;
            if t.shape != ins[0].shape {
                return Err(format!(
                    "cast cannot change shape ({} -> {})",
                    ins[0].shape, t.shape
                ));
            }
            Ok(t)
        }
    }
}

/// The operands of attention (`fused_attention`; its backward ops without `v` where they
/// take none): `q [B,H,T,D]`, `k [B,Hkv,S,D]`, `v [B,Hkv,S,Dv]`, positions `[B,T]`, `H` a
/// constant multiple of `Hkv`. Returns attention's output type, `[B,H,T,Dv]` (`[B,H,T,D]`
/// without `v`).
fn attention_type(
    q: &TensorType,
    k: &TensorType,
    v: Option<&TensorType>,
    p: &TensorType,
) -> Result<TensorType, String> {
    let v = v.unwrap_or(k);
    let ins = [q, k, v, p];
    let (q, k, v, p) = (
        &ins[0].shape.0,
        &ins[1].shape.0,
        &ins[2].shape.0,
        &ins[3].shape.0,
    );
    if q.len() != 4 || k.len() != 4 || v.len() != 4 || p.len() != 2 {
        return Err(format!(
            "expects q, k, v of rank 4 and positions of rank 2, got {} {} {} {}",
            ins[0].shape, ins[1].shape, ins[2].shape, ins[3].shape
        ));
    }
    for t in &ins[..3] {
        float(t)?;
        if t.dtype != ins[0].dtype {
            return Err("q, k, v must share a dtype".into());
        }
    }
    if !ins[3].dtype.is_int() {
        return Err(format!("positions must be integers, got {}", ins[3].dtype));
    }
    if k[0] != q[0] || v[0] != q[0] || p[0] != q[0] || p[1] != q[2] {
        return Err(format!(
            "batch/sequence dims disagree: q {} positions {}",
            ins[0].shape, ins[3].shape
        ));
    }
    if k[1] != v[1] || k[2] != v[2] || k[3] != q[3] {
        return Err(format!(
            "k {} and v {} do not fit q {}",
            ins[1].shape, ins[2].shape, ins[0].shape
        ));
    }
    match (q[1].as_const(), k[1].as_const()) {
        (Some(h), Some(hkv)) if hkv > 0 && h % hkv == 0 => {}
        _ => {
            return Err(format!(
                "query heads {} must be a constant multiple of KV heads {}",
                q[1], k[1]
            ))
        }
    }
    Ok(TensorType {
        dtype: ins[0].dtype,
        shape: Shape(vec![q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()]),
    })
}
