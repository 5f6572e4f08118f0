//! The IR of one LLaMA block (SmolLM2-135M shapes, one layer), prefill and decode, as
//! snapshots: any change to how the model is spelled shows up here for review.

use egret_models::{build, presets::preset, GraphKind, LlamaConfig};

fn one_layer() -> LlamaConfig {
    let mut cfg = preset("smollm2-135m").unwrap();
    cfg.num_hidden_layers = 1;
    cfg
}

#[test]
fn prefill_block_ir() {
    let g = build(&one_layer(), GraphKind::Prefill).unwrap();
    insta::assert_snapshot!(egret_ir::print(&g));
}

#[test]
fn decode_block_ir() {
    let g = build(&one_layer(), GraphKind::Decode).unwrap();
    insta::assert_snapshot!(egret_ir::print(&g));
}

#[test]
fn every_preset_builds_and_verifies() {
    for name in egret_models::presets::NAMES {
        let cfg = preset(name).unwrap();
        for kind in [GraphKind::Prefill, GraphKind::Decode] {
            let g = build(&cfg, kind).unwrap();
            egret_ir::verify(&g).unwrap();
            let params = g.params().len();
            assert_eq!(
                params,
                cfg.parameters().len(),
                "{name}: graph params vs config parameter list"
            );
            assert_eq!(g.outputs.len(), 1 + 2 * cfg.num_hidden_layers);
        }
    }
}

#[test]
fn config_json_spellings() {
    let base = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2"#;
    let top = LlamaConfig::from_hf_json(&format!("{base},\"rope_theta\":5000.0}}"), "c").unwrap();
    let nested = LlamaConfig::from_hf_json(
        &format!(
            "{base},\"rope_parameters\":{{\"rope_type\":\"default\",\"rope_theta\":5000.0}}}}"
        ),
        "c",
    )
    .unwrap();
    assert_eq!(top, nested);
    assert_eq!(top.rope_theta, 5000.0);
    assert_eq!(top.num_key_value_heads, 2);
    assert_eq!(top.head_dim, 4);
    let e = LlamaConfig::from_hf_json(&format!("{base},\"num_key_value_heads\":3}}"), "c.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.json") && e.contains("not a multiple"), "{e}");
    let e = LlamaConfig::from_hf_json(
        &format!("{base},\"rope_scaling\":{{\"rope_type\":\"yarn\",\"factor\":4.0}}}}"),
        "c",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("yarn"), "{e}");
    let e = LlamaConfig::from_hf_json(r#"{"model_type":"gpt2"}"#, "c")
        .unwrap_err()
        .to_string();
    assert!(e.contains("gpt2"), "{e}");
}
