//! The text format prints and parses back to the same graph, over every op; malformed text
//! gets an error with line and column.

use egret_ir::{parse, print, verify, BinaryOp, CompareOp, DType, Dim, Graph, ReduceOp, UnaryOp};

/// A graph that uses every op at least once.
fn every_op() -> Graph {
    let mut g = Graph::new("every_op");
    let (b, t) = (Dim::sym("B"), Dim::sym("T"));
    let x = g.input("x", DType::F32, vec![b.clone(), t.clone(), Dim::c(4)]);
    let ids = g.input("ids", DType::I64, vec![b.clone(), t.clone()]);
    let past = g.input(
        "past",
        DType::F32,
        vec![b.clone(), Dim::sym("P"), Dim::c(4)],
    );
    let w = g.param("model.w.weight", DType::F32, vec![Dim::c(6), Dim::c(4)]);
    let table = g.param(
        "model.embed_tokens.weight",
        DType::F32,
        vec![Dim::c(10), Dim::c(4)],
    );
    let mut cur = x;
    for u in UnaryOp::ALL {
        cur = g.unary(*u, cur).unwrap();
    }
    for op in BinaryOp::ALL {
        cur = g.binary(*op, cur, x).unwrap();
    }
    let mut conds = vec![];
    for c in CompareOp::ALL {
        conds.push(g.compare(*c, cur, x).unwrap());
    }
    let neg = g.constant(
        f64::NEG_INFINITY,
        DType::F32,
        vec![b.clone(), t.clone(), Dim::c(4)],
    );
    let tiny = g.constant(1e-5, DType::F32, vec![b.clone(), t.clone(), Dim::c(4)]);
    let sel = g.select(conds[0], cur, neg).unwrap();
    let sel = g.binary(BinaryOp::Add, sel, tiny).unwrap();
    let mut red = vec![];
    for r in ReduceOp::ALL {
        red.push(g.reduce(*r, sel, 2).unwrap());
    }
    let wt = g.permute(w, vec![1, 0]).unwrap();
    let mm = g.matmul(sel, wt).unwrap();
    let r = g
        .reshape(mm, vec![b.clone(), t.clone(), Dim::c(2), Dim::c(3)])
        .unwrap();
    let s = g.slice(r, 3, 1, 3).unwrap();
    let bc = g
        .broadcast(red[0], vec![b.clone(), t.clone(), Dim::c(4)])
        .unwrap();
    let cat = g.concat(&[past, bc], 1).unwrap();
    let emb = g.gather(table, ids, 0).unwrap();
    let io = g.iota(1, DType::I64, vec![b.clone(), t.clone()]).unwrap();
    let c = g.cast(io, DType::BF16).unwrap();
    let c16 = g.cast(emb, DType::F16).unwrap();
    g.output("slice", s);
    g.output("concat", cat);
    g.output("gather", emb);
    g.output("cast", c);
    g.output("cast16", c16);
    g.output("max", red[1]);
    g.output("mean", red[2]);
    verify(&g).unwrap();
    g
}

#[test]
fn every_op_round_trips() {
    let g = every_op();
    let text = print(&g);
    let back = parse(&text).unwrap();
    assert_eq!(back, g);
    assert_eq!(print(&back), text);
    verify(&back).unwrap();
    // Each op name appears in the text.
    for name in [
        "input",
        "param",
        "const",
        "iota",
        "select",
        "matmul",
        "reshape",
        "permute",
        "broadcast",
        "slice",
        "concat",
        "gather",
        "cast",
        "reduce_sum",
        "reduce_max",
        "reduce_mean",
        "sigmoid",
        "pow",
        "le",
    ] {
        assert!(
            text.contains(&format!(" {name}")),
            "{name} missing from\n{text}"
        );
    }
}

#[test]
fn text_accepts_names_comments_and_dim_expressions() {
    let src = r#"
; a comment
graph "odd name" {
  %x = input "x" : f32[B, P+T, 2*T-1]   ; trailing comment
  %y = neg(%x) : f32[B, T+P, -1+2*T]
  output "y" = %y
}
"#;
    let g = parse(src).unwrap();
    verify(&g).unwrap();
    assert_eq!(g.name, "odd name");
    assert_eq!(print(&parse(&print(&g)).unwrap()), print(&g));
    assert!(print(&g).contains("f32[B, P+T, 2*T-1]"), "{}", print(&g));
}

fn parse_err(src: &str) -> String {
    parse(src).unwrap_err().to_string()
}

#[test]
fn malformed_text_reports_line_and_column() {
    let e = parse_err("graph g {\n  %0 = input \"x\" : f32[4]\n  %1 = frobnicate(%0) : f32[4]\n  output \"y\" = %1\n}\n");
    assert_eq!(e, "3:8: unknown op `frobnicate`");
    let e = parse_err(
        "graph g {\n  %0 = input \"x\" : f32[4]\n  %1 = neg(%7) : f32[4]\n  output \"y\" = %1\n}\n",
    );
    assert_eq!(e, "3:12: %7 is not defined");
    let e = parse_err("graph g {\n  %0 = input \"x\" : q7[4]\n}");
    assert!(e.starts_with("2:20: unknown dtype `q7`"), "{e}");
    let e = parse_err("graph g {\n  %0 = input \"x\" : f32[4]\n  %0 = neg(%0) : f32[4]\n}");
    assert_eq!(e, "3:3: %0 is defined twice");
    let e = parse_err("graph g {\n  %0 = reduce_sum(%0) : f32[4]\n}");
    assert_eq!(e, "2:8: missing attribute `axis`");
    let e = parse_err("graph g {\n  %0 = input \"x : f32[4]\n}");
    assert!(e.starts_with("2:14: unterminated string"), "{e}");
    let e = parse_err("graph g {\n  %0 = input \"x\" : f32[4]\n");
    assert!(e.contains("end of input"), "{e}");
    let e = parse_err("graph g {\n  %0 = slice[axis=0, start=1, end=2, step=1](%0) : f32[1]\n}");
    assert_eq!(e, "2:38: unknown attribute `step`");
    let e = parse_err("graph g {\n  %0 = input \"x\" : f32[3, -4]\n}");
    assert_eq!(e, "2:27: dimension -4 is negative");
}

#[test]
fn verifier_catches_bad_graphs() {
    let check = |src: &str| verify(&parse(src).unwrap()).unwrap_err().to_string();
    // Wrong declared type.
    let e = check(
        "graph g {\n %0 = input \"x\" : f32[4]\n %1 = neg(%0) : f32[5]\n output \"y\" = %1\n}",
    );
    assert_eq!(
        e,
        "invalid graph: %1: neg gives f32[4], but the node declares f32[5]"
    );
    // Shapes that disagree.
    let e = check("graph g {\n %0 = input \"x\" : f32[4]\n %1 = input \"z\" : f32[3]\n %2 = add(%0, %1) : f32[4]\n output \"y\" = %2\n}");
    assert!(e.contains("operand shapes differ: [4] vs [3]"), "{e}");
    // Matmul inner dims.
    let e = check("graph g {\n %0 = input \"a\" : f32[2, 3]\n %1 = input \"b\" : f32[4, 5]\n %2 = matmul(%0, %1) : f32[2, 5]\n output \"y\" = %2\n}");
    assert!(e.contains("inner dims differ"), "{e}");
    // A cycle through forward references.
    let e =
        check("graph g {\n %0 = neg(%1) : f32[4]\n %1 = neg(%0) : f32[4]\n output \"y\" = %1\n}");
    assert!(e.contains("cycle"), "{e}");
    // Dtype mismatch.
    let e = check("graph g {\n %0 = input \"a\" : f32[2]\n %1 = input \"b\" : i64[2]\n %2 = mul(%0, %1) : f32[2]\n output \"y\" = %2\n}");
    assert!(e.contains("dtypes differ"), "{e}");
    // Reshape that changes the element count (symbolically).
    let e = check("graph g {\n %0 = input \"a\" : f32[T, 6]\n %1 = reshape(%0) : f32[T, 2, 4]\n output \"y\" = %1\n}");
    assert!(e.contains("element counts differ"), "{e}");
    // No outputs; duplicate input names.
    assert!(check("graph g {\n %0 = input \"a\" : f32[2]\n}").contains("no outputs"));
    let e = check(
        "graph g {\n %0 = input \"a\" : f32[2]\n %1 = input \"a\" : f32[2]\n output \"y\" = %1\n}",
    );
    assert!(e.contains("declared twice"), "{e}");
    // Bad permutation, out-of-range axis, bool arithmetic.
    let e = check("graph g {\n %0 = input \"a\" : f32[2, 3]\n %1 = permute[perm=[0, 0]](%0) : f32[2, 2]\n output \"y\" = %1\n}");
    assert!(e.contains("not a permutation"), "{e}");
    let e = check("graph g {\n %0 = input \"a\" : f32[2, 3]\n %1 = reduce_sum[axis=2](%0) : f32[2, 3]\n output \"y\" = %1\n}");
    assert!(e.contains("axis 2 out of range"), "{e}");
    // Attention's backward: the output's gradient and the row statistics must fit.
    let grad = |dout: &str, lse: &str| {
        format!(
            "graph g {{\n %q = input \"q\" : f32[1, 4, 5, 8]\n %k = input \"k\" : f32[1, 2, 7, 8]\n \
             %v = input \"v\" : f32[1, 2, 7, 6]\n %p = input \"p\" : i64[1, 5]\n \
             %do = input \"do\" : {dout}\n %l = input \"l\" : {lse}\n \
             %d = input \"d\" : f32[1, 4, 5]\n \
             %g = attention_grad_k[scale=0.5](%q, %k, %v, %p, %do, %l, %d) : f32[1, 2, 7, 8]\n \
             output \"y\" = %g\n}}"
        )
    };
    assert!(verify(&parse(&grad("f32[1, 4, 5, 6]", "f32[1, 4, 5]")).unwrap()).is_ok());
    let e = check(&grad("f32[1, 4, 5, 8]", "f32[1, 4, 5]"));
    assert!(
        e.contains("the output's gradient must be f32 [1, 4, 5, 6]"),
        "{e}"
    );
    let e = check(&grad("f32[1, 4, 5, 6]", "bf16[1, 4, 5]"));
    assert!(e.contains("lse must be f32 [1, 4, 5]"), "{e}");
}

#[test]
fn dangling_operand_in_a_built_graph_is_reported() {
    let mut g = Graph::new("g");
    let x = g.input("x", DType::F32, vec![Dim::c(2)]);
    let y = g.push(
        egret_ir::Op::Unary(UnaryOp::Neg),
        vec![egret_ir::ValueId(9)],
        g.ty(x).clone(),
    );
    g.output("y", y);
    let e = verify(&g).unwrap_err().to_string();
    assert_eq!(e, "invalid graph: %1: neg uses %9, which is not defined");
}
