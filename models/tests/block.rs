//! The IR of one LLaMA block (SmolLM2-135M shapes, one layer), prefill and decode, as
//! snapshots: any change to how the model is spelled shows up here for review.

use egret_models::{build, presets::preset, GraphKind, LlamaConfig, RopeScaling};

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
    // llama3 and linear scaling, at the top or in `rope_parameters`; a llama3 scaling short
    // of a field, or with its bands the wrong way round, is refused
    let l3 = r#""rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192"#;
    let top = LlamaConfig::from_hf_json(&format!("{base},\"rope_scaling\":{{{l3}}}}}"), "c");
    let nested = LlamaConfig::from_hf_json(
        &format!("{base},\"rope_parameters\":{{{l3},\"rope_theta\":10000.0}}}}"),
        "c",
    );
    let want = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    assert_eq!(top.unwrap().rope_scaling, want);
    assert_eq!(nested.unwrap().rope_scaling, want);
    // the original context from the top level when the scaling lacks it (or overridden by a
    // top-level `original_max_position_embeddings`), as transformers 5 reads it
    let short = l3.replace(r#","original_max_position_embeddings":8192"#, "");
    for (extra, want) in [
        (r#""max_position_embeddings":4096"#, 4096),
        (r#""original_max_position_embeddings":2048"#, 2048),
    ] {
        let j = format!("{base},{extra},\"rope_scaling\":{{{short}}}}}");
        let got = LlamaConfig::from_hf_json(&j, "c").unwrap().rope_scaling;
        assert!(
            matches!(got, RopeScaling::Llama3 { original_max_position_embeddings: n, .. } if n == want),
            "{got:?}"
        );
    }
    let lin = format!("{base},\"rope_scaling\":{{\"type\":\"linear\",\"factor\":2.0}}}}");
    let lin = LlamaConfig::from_hf_json(&lin, "c").unwrap();
    assert_eq!(lin.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(lin.to_hf_json()["rope_scaling"]["rope_type"], "linear");
    for bad in [
        l3.replace(r#","high_freq_factor":4.0"#, ""),
        l3.replace(r#""high_freq_factor":4.0"#, r#""high_freq_factor":0.5"#),
        l3.replace(r#""factor":8.0"#, r#""factor":-8.0"#),
    ] {
        let e = LlamaConfig::from_hf_json(&format!("{base},\"rope_scaling\":{{{bad}}}}}"), "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("llama3"), "{e}");
    }
    let e = LlamaConfig::from_hf_json(r#"{"model_type":"gpt2"}"#, "c")
        .unwrap_err()
        .to_string();
    assert!(e.contains("gpt2"), "{e}");
}

/// A GGUF of `kvs` (u32 values) and zero-filled f32 tensors `(name, dims)`, version 3.
fn gguf_file(path: &std::path::Path, kvs: &[(&str, u32)], tensors: &[(&str, &[u64])]) {
    let mut b: Vec<u8> = b"GGUF".to_vec();
    let str_ = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64 + 1).to_le_bytes());
    str_(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    str_(&mut b, "llama");
    for (k, v) in kvs {
        str_(&mut b, k);
        b.extend(4u32.to_le_bytes()); // u32
        b.extend(v.to_le_bytes());
    }
    let mut offset = 0u64;
    for (name, dims) in tensors {
        str_(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        offset += (dims.iter().product::<u64>() * 4).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.resize(b.len() + offset as usize, 0);
    std::fs::write(path, b).unwrap();
}

/// GGUF files: linear RoPE scaling is read; Llama 3.1's per-dimension frequency factors
/// (`rope_freqs.weight`), which this loader does not apply, are refused rather than run as
/// plain RoPE.
#[test]
fn gguf_rope_scaling() {
    let dir = std::env::temp_dir().join(format!("egret-gguf-rope-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kvs = [
        ("llama.block_count", 1),
        ("llama.embedding_length", 8),
        ("llama.attention.head_count", 2),
        ("llama.feed_forward_length", 16),
        ("llama.vocab_size", 5),
    ];
    let tensors: &[(&str, &[u64])] = &[("token_embd.weight", &[8, 5])];
    let plain = dir.join("plain.gguf");
    gguf_file(&plain, &kvs, tensors);
    let g = egret_runtime::gguf::GgufFile::open(&plain).unwrap();
    let cfg = LlamaConfig::from_gguf(&g, "plain.gguf").unwrap();
    assert_eq!(cfg.rope_scaling, RopeScaling::Default);
    let freqs = dir.join("freqs.gguf");
    gguf_file(&freqs, &kvs, &[tensors[0], ("rope_freqs.weight", &[2])]);
    let g = egret_runtime::gguf::GgufFile::open(&freqs).unwrap();
    let e = LlamaConfig::from_gguf(&g, "freqs.gguf")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("freqs.gguf") && e.contains("rope_freqs.weight"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
