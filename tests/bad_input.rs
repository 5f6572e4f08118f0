//! Bad input gets one clear error line and exit status 1, never a panic: missing and corrupt
//! files, wrong shapes, missing tensors, out-of-range ids, malformed IR, unknown presets and
//! passes.

mod common;

use std::fs;

use common::{egret_err, fixture, TempDir};

fn copy_tiny(tmp: &TempDir, name: &str) -> std::path::PathBuf {
    let src = fixture("tiny/gqa_untied");
    let dst = tmp.0.join(name);
    fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

#[test]
fn missing_model_file() {
    let e = egret_err(&["logits", "/nonexistent/model.gguf", "--tokens", "1"]);
    assert!(e.contains("no such file or directory"), "{e}");
}

#[test]
fn unknown_preset_names_the_known_ones() {
    let e = egret_err(&["ir", "llama-8b"]);
    assert!(
        e.contains("unknown preset `llama-8b`") && e.contains("llama-7b"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let tmp = TempDir::new("bad-st");
    let d = copy_tiny(&tmp, "trunc");
    let bytes = fs::read(d.join("model.safetensors")).unwrap();
    fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", "1,2"]);
    assert!(e.contains("safetensors"), "{e}");
    fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage",
    )
    .unwrap();
    let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", "1,2"]);
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn truncated_and_corrupt_gguf() {
    let tmp = TempDir::new("bad-gguf");
    let p = tmp.0.join("m.gguf");
    fs::write(&p, b"GGUF\x03\x00\x00\x00\x01").unwrap();
    let e = egret_err(&["logits", p.to_str().unwrap(), "--tokens", "1"]);
    assert!(e.contains("not a valid GGUF file"), "{e}");
    fs::write(
        &p,
        b"GGUX\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    )
    .unwrap();
    let e = egret_err(&["generate", p.to_str().unwrap(), "--tokens", "1"]);
    assert!(e.contains("GGUF"), "{e}");
}

#[test]
fn wrong_tensor_shape_and_missing_tensor() {
    let tmp = TempDir::new("bad-shape");
    let d = copy_tiny(&tmp, "shape");
    let cfg = fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 80", "\"intermediate_size\": 96");
    fs::write(d.join("config.json"), cfg).unwrap();
    let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", "1,2"]);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[80, 48]")
            && e.contains("[96, 48]"),
        "{e}"
    );
    let d = copy_tiny(&tmp, "missing");
    let cfg = fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    fs::write(d.join("config.json"), cfg).unwrap();
    let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", "1,2"]);
    assert!(e.contains("missing tensor `model.layers.2."), "{e}");
}

#[test]
fn token_id_out_of_range() {
    let d = fixture("tiny/gqa_untied");
    let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", "1,101"]);
    assert!(
        e.contains("token id 101 is out of range") && e.contains("101 tokens"),
        "{e}"
    );
    let e = egret_err(&[
        "generate",
        d.to_str().unwrap(),
        "--tokens",
        "5,999999",
        "--backend",
        "interp",
    ]);
    assert!(e.contains("token id 999999 is out of range"), "{e}");
    let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", "1,x"]);
    assert!(e.contains("`x` is not a token id"), "{e}");
}

#[test]
fn malformed_ir_text() {
    let tmp = TempDir::new("bad-ir");
    let p = tmp.0.join("g.ir");
    fs::write(
        &p,
        "graph g {\n  %0 = input \"x\" : f32[4]\n  %1 = neg(%0 : f32[4]\n}\n",
    )
    .unwrap();
    let e = egret_err(&["ir", p.to_str().unwrap()]);
    assert!(e.contains("3:15: expected `,`, found `:`"), "{e}");
    fs::write(
        &p,
        "graph g {\n  %0 = input \"x\" : f32[4]\n  %1 = neg(%0) : f32[5]\n  output \"y\" = %1\n}\n",
    )
    .unwrap();
    let e = egret_err(&["ir", p.to_str().unwrap()]);
    assert!(
        e.contains("neg gives f32[4], but the node declares f32[5]"),
        "{e}"
    );
}

#[test]
fn unknown_pass_and_bad_config() {
    let e = egret_err(&["ir", "smollm2-135m", "--passes", "cse,fuse-everything"]);
    assert!(
        e.contains("unknown pass `fuse-everything`") && e.contains("cse"),
        "{e}"
    );
    let tmp = TempDir::new("bad-cfg");
    let d = copy_tiny(&tmp, "cfg");
    fs::write(d.join("config.json"), "{\"hidden_size\": 8,").unwrap();
    let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", "1"]);
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );
}
