//! CPU-backend behaviour beyond the conformance suite: half-precision and int8 weight storage
//! stay within their rounding of the f32 result, and a kernel that meets bad data reports it as an
//! error instead of reading out of bounds.

mod common;

use std::collections::HashMap;

use common::{egret_ok, fixture};
use egret_backends::kernel::PanelType;
use egret_backends::llvm::CpuOptions;
use egret_ir::Tensor;
use egret_runtime::cpu::{HostData, HostValue};
use egret_runtime::plan::ElemType;

fn logits(weights: PanelType) -> Vec<Vec<f32>> {
    let src = egret::ModelSource::resolve(fixture("tiny/gqa_untied").to_str().unwrap()).unwrap();
    let m = egret::load_model(&src).unwrap();
    let opts = CpuOptions {
        weights,
        ..Default::default()
    };
    let mut cm = egret::cpu::CompiledModel::new(m.config, m.params, "default", &opts, 2).unwrap();
    cm.logits_all(&[3, 17, 0, 42, 42, 9, 25, 1, 30]).unwrap()
}

#[test]
fn half_precision_and_int8_weights_stay_within_their_rounding() {
    let full = logits(PanelType::F32);
    for (w, tol) in [
        (PanelType::BF16, 2e-2f32),
        (PanelType::F16, 2e-3),
        // (int8's step is a block's max / 127, about 5 times bf16's rounding of a weight
        // of typical size: 3.8e-2 here)
        (PanelType::Q8, 6e-2),
    ] {
        let half = logits(w);
        let scale = full.iter().flatten().fold(1f32, |m, x| m.max(x.abs()));
        let worst = full
            .iter()
            .flatten()
            .zip(half.iter().flatten())
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        assert!(
            worst < tol,
            "{w:?}: relative difference {worst} (tolerance {tol})"
        );
        assert!(worst > 0.0, "{w:?}: the weights were not actually rounded");
    }
}

/// int8 weights (`PanelType::Q8`) against f32 ones on weights that the q8-block rule stores
/// exactly (each column's block of 32 rows: integers up to 127 in size, one of them ±127,
/// times a power of two) and inputs whose products and sums f32 holds exactly: bit for bit
/// the same outputs, so a misplaced value or scale cannot hide. k = 1000 crosses the GEMM's
/// 512-row k blocks and ends in a partial block of 8 rows; n = 45 ends in a partial panel;
/// 1 row takes the decode path (the whole k in one call), 50 rows the blocked one.
#[test]
fn int8_weights_are_exact_where_their_blocks_hold_the_weights_exactly() {
    let (k, n) = (1000usize, 45usize);
    let g = egret_ir::parse(&format!(
        "graph q8 {{\n  %x = input \"x\" : f32[T, {k}]\n  %w = param \"w\" : f32[{k}, {n}]\n  %y = matmul(%x, %w) : f32[T, {n}]\n  output \"y\" = %y\n}}"
    ))
    .unwrap();
    let mut w = vec![0f32; k * n];
    for kk in 0..k {
        for j in 0..n {
            let b = kk / 32;
            let q = if kk % 32 == (j + b) % 32 || kk == k - 1 {
                if (j + b) % 2 == 0 {
                    127
                } else {
                    -127
                }
            } else {
                ((kk * 37 + j * 11 + b * 5) % 255) as i32 - 127
            };
            let scale = (2f32).powi(-7 - ((b + j) % 3) as i32);
            w[kk * n + j] = q as f32 * scale;
        }
    }
    let params = HashMap::from([("w".to_string(), Tensor::from_f32(vec![k, n], w).unwrap())]);
    for rows in [1usize, 50] {
        let x: Vec<f32> = (0..rows * k)
            .map(|i| (((i * 5 + i / 3) % 7) as f32 - 3.0) * 0.25)
            .collect();
        let inputs = HashMap::from([(
            "x".to_string(),
            HostValue {
                shape: vec![rows, k],
                data: HostData::F32(x),
            },
        )]);
        let run = |weights: PanelType| {
            let opts = CpuOptions {
                weights,
                ..Default::default()
            };
            let (mut ex, code) = egret::cpu::executor(&g, &params, &opts, 2).unwrap();
            // (the weights really were packed as int8: else both runs are the f32 path)
            let bytes = code.plan.buffers.iter().any(|b| b.elem == ElemType::Bytes);
            assert_eq!(bytes, weights == PanelType::Q8, "{weights:?}");
            ex.run(&inputs).unwrap().remove("y").unwrap().data
        };
        let (full, q8) = (run(PanelType::F32), run(PanelType::Q8));
        assert_eq!(full, q8, "{rows} rows");
        let HostData::F32(v) = full else {
            panic!("f32 output")
        };
        assert!(v.iter().any(|&y| y != 0.0), "{rows} rows: all zero");
    }
}

#[test]
fn bf16_generation_of_the_tiny_model_runs_from_the_cli() {
    let d = fixture("tiny/gqa_untied");
    let out = egret_ok(&[
        "generate",
        d.to_str().unwrap(),
        "--tokens",
        "3,17,0",
        "--max-new-tokens",
        "5",
        "--weights-dtype",
        "bf16",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 5);
}

#[test]
fn out_of_range_index_in_a_kernel_is_an_error() {
    let g = egret_ir::parse("graph g {\n  %t = param \"table\" : f32[4, 3]\n  %i = input \"ids\" : i64[N]\n  %y = gather[axis=0](%t, %i) : f32[N, 3]\n  output \"y\" = %y\n}").unwrap();
    let mut params = HashMap::new();
    params.insert(
        "table".to_string(),
        Tensor::from_f32(vec![4, 3], vec![0.5; 12]).unwrap(),
    );
    let (mut ex, _code) = egret::cpu::executor(&g, &params, &CpuOptions::default(), 2).unwrap();
    let mut inputs = HashMap::new();
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![2],
            data: HostData::I64(vec![1, 4]),
        },
    );
    let err = ex
        .run(&inputs)
        .err()
        .expect("index 4 of 4 rows must fail")
        .to_string();
    assert!(err.contains("out of range"), "{err}");
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![2],
            data: HostData::I64(vec![1, 3]),
        },
    );
    let ok = ex.run(&inputs).unwrap();
    assert_eq!(ok["y"].data, HostData::F32(vec![0.5; 6]));
    // Inputs of the wrong shape or element type are refused before any kernel runs.
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![2],
            data: HostData::F32(vec![1.0, 3.0]),
        },
    );
    assert!(ex.run(&inputs).is_err());
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![3],
            data: HostData::I64(vec![1, 3]),
        },
    );
    assert!(ex.run(&inputs).is_err());
}

/// `out = concat(past, 2·new)` along the middle axis, with a running sum of the result: the
/// state is kept in the executor and grown in place, across capacity doublings.
#[test]
fn states_grow_in_place_across_runs() {
    let g = egret_ir::parse(
        "graph g {\n  %p = input \"past\" : f32[2, P, 3]\n  %n = input \"new\" : f32[2, T, 3]\n  %c = const[value=2.0] : f32[2, T, 3]\n  %m = mul(%n, %c) : f32[2, T, 3]\n  %y = concat[axis=1](%p, %m) : f32[2, P+T, 3]\n  %s = reduce_sum[axis=1](%y) : f32[2, 1, 3]\n  output \"sum\" = %s\n  output \"present\" = %y\n}",
    )
    .unwrap();
    let (mut ex, _code) =
        egret::cpu::executors(&[&g], &HashMap::new(), &CpuOptions::default(), 2, true)
            .unwrap()
            .remove(0);
    assert_eq!(ex.plan().states.len(), 1);
    assert_eq!(ex.plan().outputs.len(), 1, "the state is not an output");
    // Reference: the whole value, row by row.
    let mut want: Vec<Vec<f32>> = vec![vec![]; 2];
    let mut step = 0;
    for t in [5usize, 1, 1, 70, 1, 100, 3] {
        let new: Vec<f32> = (0..2 * t * 3).map(|i| (step * 1000 + i) as f32).collect();
        step += 1;
        let mut inputs = HashMap::new();
        inputs.insert(
            "new".to_string(),
            HostValue {
                shape: vec![2, t, 3],
                data: HostData::F32(new.clone()),
            },
        );
        let out = ex.run(&inputs).unwrap();
        for b in 0..2 {
            want[b].extend(new[b * t * 3..(b + 1) * t * 3].iter().map(|x| 2.0 * x));
        }
        let len = want[0].len() / 3;
        let got = ex.state("present").unwrap();
        assert_eq!(got.shape, vec![2, len, 3]);
        assert_eq!(got.data, HostData::F32(want.concat()));
        let sums: Vec<f32> = (0..2)
            .flat_map(|b| (0..3).map(move |c| (b, c)))
            .map(|(b, c)| want[b].iter().skip(c).step_by(3).sum())
            .collect();
        assert_eq!(out["sum"].data, HostData::F32(sums));
    }
    // An input of the state's name replaces its value; a reset empties it.
    let mut inputs = HashMap::new();
    inputs.insert(
        "past".to_string(),
        HostValue {
            shape: vec![2, 1, 3],
            data: HostData::F32(vec![1.0; 6]),
        },
    );
    inputs.insert(
        "new".to_string(),
        HostValue {
            shape: vec![2, 1, 3],
            data: HostData::F32(vec![0.5; 6]),
        },
    );
    let out = ex.run(&inputs).unwrap();
    assert_eq!(out["sum"].data, HostData::F32(vec![2.0; 6]));
    ex.reset_states();
    inputs.remove("past");
    let out = ex.run(&inputs).unwrap();
    assert_eq!(out["sum"].data, HostData::F32(vec![1.0; 6]));
    assert_eq!(ex.state("past").unwrap().shape, vec![2, 1, 3]);
}

/// A generation longer than the cache's first capacities and long enough for split-KV
/// decode attention: decode over the in-place cache matches one prefill of the sequence.
#[test]
fn long_decode_over_the_growing_cache_matches_prefill() {
    use egret_runtime::generate::LanguageModel;
    let src = egret::ModelSource::resolve(fixture("tiny/gqa_untied").to_str().unwrap()).unwrap();
    let m = egret::load_model(&src).unwrap();
    let vocab = m.config.vocab_size as u32;
    let mut cm =
        egret::cpu::CompiledModel::new(m.config, m.params, "default", &CpuOptions::default(), 2)
            .unwrap();
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 7 + 3) % vocab).collect();
    let full = cm.logits_all(&ids).unwrap();
    let k = 10;
    let mut rows = vec![cm.prefill(&ids[..k]).unwrap()];
    for &t in &ids[k..ids.len() - 1] {
        rows.push(cm.decode(t).unwrap());
    }
    let scale = full.iter().flatten().fold(1f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in rows.iter().zip(&full[k - 1..]).enumerate() {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-4 * scale, "position {}: max |diff| {d}", k - 1 + i);
    }
}

#[test]
fn scatter_add_sums_rows_and_refuses_an_index_out_of_range() {
    let g = egret_ir::parse("graph g {\n  %i = input \"ids\" : i64[N]\n  %x = input \"x\" : f32[N, 2]\n  %y = scatter_add(%i, %x) : f32[3, 2]\n  output \"y\" = %y\n}").unwrap();
    let (mut ex, _code) =
        egret::cpu::executor(&g, &HashMap::new(), &CpuOptions::default(), 2).unwrap();
    let run = |ex: &mut egret_runtime::cpu::CpuExecutor, ids: Vec<i64>| {
        let n = ids.len();
        let inputs = HashMap::from([
            (
                "ids".to_string(),
                HostValue {
                    shape: vec![n],
                    data: HostData::I64(ids),
                },
            ),
            (
                "x".to_string(),
                HostValue {
                    shape: vec![n, 2],
                    data: HostData::F32((0..2 * n).map(|v| v as f32).collect()),
                },
            ),
        ]);
        ex.run(&inputs).map(|o| o["y"].data.clone())
    };
    // Rows 0 and 2 hit twice and once, row 1 never.
    assert_eq!(
        run(&mut ex, vec![0, 2, 0]).unwrap(),
        HostData::F32(vec![4.0, 6.0, 0.0, 0.0, 2.0, 3.0])
    );
    let err = run(&mut ex, vec![0, 3]).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
    // The interpreter defines the op the same way.
    let it = egret_ir::Interpreter::new(&g).unwrap();
    let bad = HashMap::from([
        (
            "ids".to_string(),
            Tensor::from_i64(vec![2], vec![0, -1]).unwrap(),
        ),
        (
            "x".to_string(),
            Tensor::from_f32(vec![2, 2], vec![1.0; 4]).unwrap(),
        ),
    ]);
    let err = it.run(&bad, &HashMap::new()).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn fed_back_outputs_become_the_next_runs_parameters_and_inputs() {
    // new.p = p + x, new_m = m·2: fed back, each run starts from the last run's values.
    let g = egret_ir::parse("graph g {\n  %p = param \"p\" : f32[3]\n  %x = input \"x\" : f32[3]\n  %m = input \"m\" : f32[3]\n  %np = add(%p, %x) : f32[3]\n  %two = const[value=2.0] : f32[3]\n  %nm = mul(%m, %two) : f32[3]\n  %s = reduce_sum[axis=0](%np) : f32[1]\n  output \"new.p\" = %np\n  output \"new_m\" = %nm\n  output \"s\" = %s\n}").unwrap();
    let params = HashMap::from([(
        "p".to_string(),
        Tensor::from_f32(vec![3], vec![1.0, 2.0, 3.0]).unwrap(),
    )]);
    let (mut ex, _code) = egret::cpu::executor(&g, &params, &CpuOptions::default(), 2).unwrap();
    let bad = ex
        .set_feedback(vec![("nope".into(), "p".into())])
        .unwrap_err()
        .to_string();
    assert!(bad.contains("no such output"), "{bad}");
    let bad = ex
        .set_feedback(vec![("new.p".into(), "q".into())])
        .unwrap_err()
        .to_string();
    assert!(bad.contains("no such parameter or input"), "{bad}");
    let bad = ex
        .set_feedback(vec![("s".into(), "p".into())])
        .unwrap_err()
        .to_string();
    assert!(bad.contains("shapes differ"), "{bad}");
    ex.set_feedback(vec![
        ("new.p".into(), "p".into()),
        ("new_m".into(), "m".into()),
    ])
    .unwrap();
    let f32v = |v: Vec<f32>| HostValue {
        shape: vec![v.len()],
        data: HostData::F32(v),
    };
    let x = ("x".to_string(), f32v(vec![0.5, 0.5, 0.5]));
    // The first run gives `m`; later runs keep the executor's.
    let first = HashMap::from([x.clone(), ("m".to_string(), f32v(vec![1.0, -1.0, 3.0]))]);
    let out = ex.run(&first).unwrap();
    assert_eq!(out.len(), 1, "fed-back outputs are not returned");
    assert_eq!(out["s"].data, HostData::F32(vec![7.5]));
    let out = ex.run(&HashMap::from([x.clone()])).unwrap();
    assert_eq!(out["s"].data, HostData::F32(vec![9.0]));
    assert_eq!(ex.read("p").unwrap(), vec![2.0, 3.0, 4.0]);
    assert_eq!(ex.read("m").unwrap(), vec![4.0, -4.0, 12.0]);
    // A run that fails (a wrong input) leaves the kept values as they were.
    let wrong = HashMap::from([("x".to_string(), f32v(vec![1.0; 4]))]);
    assert!(ex.run(&wrong).is_err());
    assert_eq!(ex.read("p").unwrap(), vec![2.0, 3.0, 4.0]);
    // Without `m` and nothing kept for it, after a fresh feedback set-up: one clear error.
    ex.set_feedback(vec![("new.p".into(), "p".into())]).unwrap();
    let e = ex.run(&HashMap::from([x])).unwrap_err().to_string();
    assert!(e.contains("missing input `m`"), "{e}");
}

#[test]
fn run_into_writes_outputs_in_place_when_the_caller_holds_storage_for_them() {
    // y = x·2 with a symbolic length; z = sum(y).
    let g = egret_ir::parse("graph g {\n  %x = input \"x\" : f32[n]\n  %two = const[value=2.0] : f32[n]\n  %y = mul(%x, %two) : f32[n]\n  %z = reduce_sum[axis=0](%y) : f32[1]\n  output \"y\" = %y\n  output \"z\" = %z\n}").unwrap();
    let (mut ex, _code) =
        egret::cpu::executor(&g, &HashMap::new(), &CpuOptions::default(), 2).unwrap();
    let f32v = |v: Vec<f32>| HostValue {
        shape: vec![v.len()],
        data: HostData::F32(v),
    };
    let x = |v: Vec<f32>| HashMap::from([("x".to_string(), f32v(v))]);
    // No entries: every output is filled in, as `run` returns them.
    let mut outs = HashMap::new();
    ex.run_into(&x(vec![1.0, 2.0, 3.0]), &mut outs).unwrap();
    assert_eq!(outs, ex.run(&x(vec![1.0, 2.0, 3.0])).unwrap());
    // Entries of the right shape are written in place: the same allocation, new values.
    let HostData::F32(y) = &outs["y"].data else {
        panic!("f32 output")
    };
    let before = y.as_ptr();
    ex.run_into(&x(vec![4.0, 5.0, 6.0]), &mut outs).unwrap();
    let HostData::F32(y) = &outs["y"].data else {
        panic!("f32 output")
    };
    assert_eq!(y.as_ptr(), before);
    assert_eq!(outs["y"].data, HostData::F32(vec![8.0, 10.0, 12.0]));
    assert_eq!(outs["z"].data, HostData::F32(vec![30.0]));
    // An entry of another length or element type is replaced, not written past its end.
    outs.insert("y".into(), f32v(vec![0.0; 2]));
    outs.insert(
        "z".into(),
        HostValue {
            shape: vec![1],
            data: HostData::I64(vec![7]),
        },
    );
    ex.run_into(&x(vec![1.0, 1.0, 1.0, 1.0]), &mut outs)
        .unwrap();
    assert_eq!(outs["y"], f32v(vec![2.0; 4]));
    assert_eq!(outs["z"], f32v(vec![8.0]));
}

#[test]
fn gemm_work_claimed_by_any_number_of_threads_gives_the_same_bits() {
    // x·wᵀ with packed weights (1000 columns: 32 panels of 32, the last partial), for one row
    // (decode: guided ranges of panels), 100 rows (two chunks, each cut into ranges per
    // thread) and 300 rows (five chunks), with one k block (K = 65) and two (K = 600).
    let val = |i: usize| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
    for k in [65usize, 600] {
        let g = egret_ir::parse(&format!("graph g {{\n  %x = input \"x\" : f32[T, {k}]\n  %w = param \"w\" : f32[1000, {k}]\n  %wt = permute[perm=[1, 0]](%w) : f32[{k}, 1000]\n  %y = matmul(%x, %wt) : f32[T, 1000]\n  output \"y\" = %y\n}}")).unwrap();
        let params = HashMap::from([(
            "w".to_string(),
            Tensor::from_f32(vec![1000, k], (0..1000 * k).map(val).collect()).unwrap(),
        )]);
        for rows in [1usize, 100, 300] {
            let host = |x: Vec<f32>| {
                HashMap::from([(
                    "x".to_string(),
                    HostValue {
                        shape: vec![rows, k],
                        data: HostData::F32(x),
                    },
                )])
            };
            let x: Vec<f32> = (0..rows * k).map(|i| val(i + 17)).collect();
            let mut results = vec![];
            for threads in [1, 2, 3, 5] {
                let (mut ex, _code) =
                    egret::cpu::executor(&g, &params, &CpuOptions::default(), threads).unwrap();
                // A run on zeros first: the second finds its work only if the counter starts
                // from zero at every launch.
                ex.run(&host(vec![0.0; rows * k])).unwrap();
                let out = ex.run(&host(x.clone())).unwrap().remove("y").unwrap();
                let HostData::F32(y) = out.data else {
                    panic!("f32 output")
                };
                results.push(y);
            }
            for (i, y) in results.iter().enumerate() {
                assert_eq!(
                    y, &results[0],
                    "K {k}, {rows} rows: thread count #{i} differs"
                );
            }
            // And the values (every 7th row, and the last): within f32 rounding of an f64
            // dot product.
            for r in (0..rows).filter(|r| r % 7 == 0 || *r == rows - 1) {
                for c in 0..1000 {
                    let want: f64 = (0..k)
                        .map(|j| x[r * k + j] as f64 * val(c * k + j) as f64)
                        .sum();
                    let got = results[0][r * 1000 + c] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "K {k}, [{r}, {c}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn tiled_attention_matches_the_interpreter_across_blocks_and_targets() {
    // Attention and its backward. Several blocks of rows and of keys on both sides (T 50
    // queries, S 75 keys), GQA (4 heads on 2), head sizes that fill no panel (33, 20),
    // values strided (a slice of a wider tensor, permuted), a cache offset (causal from key
    // 25) and, in batch 1, positions in no order (rows that see few keys next to rows that
    // see all, and one that sees none). Panels of 32 (AVX-512), 16 (AVX2) and 8 (SSE), and
    // thread counts that give units of different sizes.
    let (t, s, d, dv) = (50usize, 75usize, 33usize, 20usize);
    let (w, vw, ve) = (2 * dv + 5, 2 * dv, 2 * dv + 3);
    let g = egret_ir::parse(&format!(
        "graph g {{
  %qt = input \"q\" : f32[2, {t}, 4, {d}]
  %q = permute[perm=[0, 2, 1, 3]](%qt) : f32[2, 4, {t}, {d}]
  %k = input \"k\" : f32[2, 2, {s}, {d}]
  %kv = input \"v\" : f32[2, {s}, {w}]
  %vs = slice[axis=2, start=3, end={ve}](%kv) : f32[2, {s}, {vw}]
  %vr = reshape(%vs) : f32[2, {s}, 2, {dv}]
  %v = permute[perm=[0, 2, 1, 3]](%vr) : f32[2, 2, {s}, {dv}]
  %pos = input \"pos\" : i64[2, {t}]
  %o = fused_attention[scale=0.3](%q, %k, %v, %pos) : f32[2, 4, {t}, {dv}]
  %do = input \"do\" : f32[2, 4, {t}, {dv}]
  %lse = attention_lse[scale=0.3](%q, %k, %pos) : f32[2, 4, {t}]
  %m = mul(%do, %o) : f32[2, 4, {t}, {dv}]
  %r = reduce_sum[axis=3](%m) : f32[2, 4, {t}, 1]
  %delta = reshape(%r) : f32[2, 4, {t}]
  %dq = attention_grad_q[scale=0.3](%q, %k, %v, %pos, %do, %lse, %delta) : f32[2, 4, {t}, {d}]
  %dk = attention_grad_k[scale=0.3](%q, %k, %v, %pos, %do, %lse, %delta) : f32[2, 2, {s}, {d}]
  %dv = attention_grad_v[scale=0.3](%q, %k, %v, %pos, %do, %lse, %delta) : f32[2, 2, {s}, {dv}]
  output \"o\" = %o
  output \"lse\" = %lse
  output \"dq\" = %dq
  output \"dk\" = %dk
  output \"dv\" = %dv
}}"
    ))
    .unwrap();
    let val = |i: usize, salt: usize| (((i + salt) * 7919) % 1013) as f32 / 1013.0 * 2.0 - 1.0;
    let f32s = |shape: Vec<usize>, salt: usize| {
        let n = shape.iter().product();
        Tensor::from_f32(shape, (0..n).map(|i| val(i, salt)).collect()).unwrap()
    };
    let pos: Vec<i64> = (0..t as i64)
        .map(|i| i + 25)
        .chain((0..t).map(|i| if i == 3 { -1 } else { ((i * 37) % s) as i64 }))
        .collect();
    let inputs = HashMap::from([
        ("q".to_string(), f32s(vec![2, t, 4, d], 1)),
        ("k".to_string(), f32s(vec![2, 2, s, d], 2)),
        ("v".to_string(), f32s(vec![2, s, 2 * dv + 5], 3)),
        ("do".to_string(), f32s(vec![2, 4, t, dv], 4)),
        (
            "pos".to_string(),
            Tensor::from_i64(vec![2, t], pos).unwrap(),
        ),
    ]);
    let want = egret_ir::Interpreter::new(&g)
        .unwrap()
        .run(&inputs, &HashMap::new())
        .unwrap();
    let host: HashMap<String, HostValue> = inputs
        .iter()
        .map(|(k, v)| {
            let data = if k == "pos" {
                HostData::I64(v.to_i64_vec())
            } else {
                HostData::F32(v.to_f32_vec())
            };
            let shape = v.shape().to_vec();
            (k.clone(), HostValue { shape, data })
        })
        .collect();
    for cpu in ["native", "x86-64-v3", "x86-64"] {
        for threads in [1, 2, 3] {
            let opts = CpuOptions {
                cpu: cpu.into(),
                ..Default::default()
            };
            let (mut ex, _code) =
                egret::cpu::executor(&g, &HashMap::new(), &opts, threads).unwrap();
            let got = ex.run(&host).unwrap();
            for name in ["o", "lse", "dq", "dk", "dv"] {
                let HostData::F32(y) = &got[name].data else {
                    panic!("f32 output")
                };
                let w = want[name].to_f32_vec();
                // The row that sees no key: a NaN output and a -inf log-sum-exp on both
                // sides; its gradients are zero, and it adds nothing to the keys'.
                let finite = |x: &f32| x.is_finite();
                for (i, (a, b)) in y.iter().zip(&w).enumerate() {
                    let same = finite(a) == finite(b)
                        && (finite(a) || a.is_nan() == b.is_nan() && (a.is_nan() || a == b));
                    assert!(same, "{cpu}, {threads} threads, {name}[{i}]: {a} vs {b}");
                }
                let both = || y.iter().zip(&w).filter(|(a, b)| finite(a) && finite(b));
                let err: f64 = both().map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let norm: f64 = both().map(|(_, b)| (*b as f64).powi(2)).sum();
                let rel = (err / norm).sqrt();
                assert!(
                    rel < 1e-5,
                    "{cpu}, {threads} threads, {name}: relative L2 {rel}"
                );
            }
        }
    }
}
