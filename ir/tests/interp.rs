//! The interpreter's meaning of each op, checked on small hand-computed cases.

use std::collections::HashMap;

use egret_ir::{parse, Interpreter, Tensor};

fn run(src: &str, inputs: Vec<(&str, Tensor)>) -> HashMap<String, Tensor> {
    let g = parse(src).unwrap();
    let it = Interpreter::new(&g).unwrap();
    let inputs = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    it.run(&inputs, &HashMap::new()).unwrap()
}

fn f(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(shape.to_vec(), v.to_vec()).unwrap()
}

#[test]
fn matmul_with_transposed_and_batched_operands() {
    let out = run(
        "graph g {\n %a = input \"a\" : f32[2, 2, 3]\n %w = input \"w\" : f32[4, 3]\n %wt = permute[perm=[1, 0]](%w) : f32[3, 4]\n %y = matmul(%a, %wt) : f32[2, 2, 4]\n output \"y\" = %y\n}",
        vec![("a", f(&[2, 2, 3], &[1., 2., 3., 4., 5., 6., 0., 1., 0., 1., 0., 0.])), ("w", f(&[4, 3], &[1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 1.]))],
    );
    assert_eq!(
        out["y"].to_f32_vec(),
        vec![1., 2., 3., 6., 4., 5., 6., 15., 0., 1., 0., 1., 1., 0., 0., 1.]
    );
}

#[test]
fn softmax_mask_gather_concat_slice() {
    let src = r#"graph g {
  %s = input "s" : f32[1, 3]
  %c = iota[axis=1] : i64[1, 3]
  %two = const[value=1] : i64[1, 3]
  %m = le(%c, %two) : bool[1, 3]
  %ninf = const[value=-inf] : f32[1, 3]
  %x = select(%m, %s, %ninf) : f32[1, 3]
  %mx = reduce_max[axis=1](%x) : f32[1, 1]
  %mb = broadcast(%mx) : f32[1, 3]
  %z = sub(%x, %mb) : f32[1, 3]
  %e = exp(%z) : f32[1, 3]
  %sum = reduce_sum[axis=1](%e) : f32[1, 1]
  %sb = broadcast(%sum) : f32[1, 3]
  %p = div(%e, %sb) : f32[1, 3]
  %t = input "t" : f32[3, 2]
  %i = input "i" : i64[2]
  %g = gather[axis=0](%t, %i) : f32[2, 2]
  %cat = concat[axis=1](%g, %g) : f32[2, 4]
  %sl = slice[axis=1, start=1, end=3](%cat) : f32[2, 2]
  output "p" = %p
  output "sl" = %sl
}"#;
    let out = run(
        src,
        vec![
            ("s", f(&[1, 3], &[1.0, 1.0, 5.0])),
            ("t", f(&[3, 2], &[1., 2., 3., 4., 5., 6.])),
            ("i", Tensor::from_i64(vec![2], vec![2, 0]).unwrap()),
        ],
    );
    let p = out["p"].to_f32_vec();
    assert!(
        (p[0] - 0.5).abs() < 1e-7 && (p[1] - 0.5).abs() < 1e-7 && p[2] == 0.0,
        "{p:?}"
    );
    assert_eq!(out["sl"].to_f32_vec(), vec![6., 5., 2., 1.]);
}

#[test]
fn symbolic_dims_bind_from_inputs_and_mismatches_are_errors() {
    let g = parse("graph g {\n %a = input \"a\" : f32[T, 2]\n %b = input \"b\" : f32[T, 2]\n %y = add(%a, %b) : f32[T, 2]\n output \"y\" = %y\n}").unwrap();
    let it = Interpreter::new(&g).unwrap();
    let mut inputs = HashMap::new();
    inputs.insert("a".to_string(), f(&[3, 2], &[0.; 6]));
    inputs.insert("b".to_string(), f(&[2, 2], &[0.; 4]));
    let e = it.run(&inputs, &HashMap::new()).unwrap_err().to_string();
    assert!(
        e.contains("input `b` is f32[2, 2], but the graph expects f32[T, 2] (with T=3)"),
        "{e}"
    );
    inputs.remove("b");
    let e = it.run(&inputs, &HashMap::new()).unwrap_err().to_string();
    assert!(e.contains("missing input `b`"), "{e}");
}

#[test]
fn gather_out_of_range_is_an_error() {
    let g = parse("graph g {\n %t = input \"t\" : f32[3, 2]\n %i = input \"i\" : i64[1]\n %y = gather[axis=0](%t, %i) : f32[1, 2]\n output \"y\" = %y\n}").unwrap();
    let it = Interpreter::new(&g).unwrap();
    let mut inputs = HashMap::new();
    inputs.insert("t".to_string(), f(&[3, 2], &[0.; 6]));
    inputs.insert("i".to_string(), Tensor::from_i64(vec![1], vec![3]).unwrap());
    let e = it.run(&inputs, &HashMap::new()).unwrap_err().to_string();
    assert!(
        e.contains("index 3 is out of range for an axis of length 3"),
        "{e}"
    );
}

#[test]
fn casts_round_to_the_narrow_type() {
    let out = run(
        "graph g {\n %x = input \"x\" : f32[3]\n %h = cast(%x) : bf16[3]\n %i = cast(%x) : i32[3]\n output \"h\" = %h\n output \"i\" = %i\n}",
        vec![("x", f(&[3], &[1.0 + 1.0 / 256.0, -2.7, 3.999]))],
    );
    assert_eq!(out["h"].to_f32_vec(), vec![1.0, -2.703125, 4.0]);
    assert_eq!(out["i"].to_i64_vec(), vec![1, -2, 3]);
}

/// A shape whose element count overflows is refused, not wrapped to a count that matches
/// the data (which would leave every later index out of bounds).
#[test]
fn a_shape_whose_element_count_overflows_is_refused() {
    let e = Tensor::from_f32(vec![1 << 32, 1 << 32], vec![]).unwrap_err();
    assert!(
        e.to_string().contains("more elements than memory can hold"),
        "{e}"
    );
    let e = Tensor::from_i64(vec![usize::MAX, 2], vec![]).unwrap_err();
    assert!(
        e.to_string().contains("more elements than memory can hold"),
        "{e}"
    );
}
