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

/// A GGUF v3 file with no tensors and these metadata values (each already encoded as its
/// type tag and bytes).
fn gguf_with(kvs: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(v);
    }
    b
}

/// GGUF metadata values: a u32 (type 4) and a string (type 8).
fn gguf_u32(x: u32) -> Vec<u8> {
    [4u32.to_le_bytes().to_vec(), x.to_le_bytes().to_vec()].concat()
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut b = 8u32.to_le_bytes().to_vec();
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
    b
}

/// A GGUF key of the wrong type is named as such (not called missing), and an optional one
/// is not silently replaced by its default.
#[test]
fn gguf_keys_of_the_wrong_type() {
    let tmp = TempDir::new("gguf-types");
    let p = tmp.0.join("m.gguf");
    let base = |over: (&str, Vec<u8>)| {
        let mut kvs = vec![
            ("general.architecture", gguf_str("llama")),
            ("llama.embedding_length", gguf_u32(64)),
            ("llama.attention.head_count", gguf_u32(4)),
            ("llama.vocab_size", gguf_u32(100)),
            ("llama.feed_forward_length", gguf_u32(128)),
            ("llama.block_count", gguf_u32(2)),
        ];
        kvs.retain(|(k, _)| *k != over.0);
        kvs.push(over);
        gguf_with(&kvs)
    };
    fs::write(&p, base(("llama.context_length", gguf_u32(256)))).unwrap();
    common::egret_ok(&["ir", p.to_str().unwrap(), "--stats"]);
    for (key, value, want) in [
        (
            "llama.block_count",
            gguf_str("2"),
            "`llama.block_count` holds a string (\"2\"), not a non-negative integer",
        ),
        (
            "llama.rope.freq_base",
            gguf_str("10000"),
            "`llama.rope.freq_base` holds a string",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_u32(0),
            "holds a u32 (U32(0)), not a float",
        ),
    ] {
        fs::write(&p, base((key, value))).unwrap();
        let e = egret_err(&["ir", p.to_str().unwrap(), "--stats"]);
        assert!(e.contains(want), "{key}: {e}");
    }
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
    for t in ["1,,2", "1,2,", ",1", " "] {
        let e = egret_err(&["logits", d.to_str().unwrap(), "--tokens", t]);
        assert!(
            e.contains("is empty") || e.contains("no token ids"),
            "{t:?}: {e}"
        );
    }
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

/// Sizes past what any model or machine has get one clear error before anything is
/// allocated: a configuration's layers, dimensions and parameter count (which would
/// otherwise overflow or exhaust memory as the graph or the weights are built), a step's
/// batch × sequence, a benchmark's size, a thread count; a shape whose element count
/// overflows is refused by the tensor that would hold it.
#[test]
fn sizes_past_the_limits() {
    let tmp = TempDir::new("limits");
    let d = copy_tiny(&tmp, "cfg");
    let cfg = fs::read_to_string(d.join("config.json")).unwrap();
    let dir = d.to_str().unwrap();
    let big = r#"{"hidden_size": 16777216, "intermediate_size": 16777216}"#;
    for (set, want) in [
        (
            r#"{"num_hidden_layers": 1000000000}"#,
            "`num_hidden_layers` (1000000000) is over the limit",
        ),
        (
            r#"{"hidden_size": 4611686018427387904}"#,
            "`hidden_size` (4611686018427387904) is over the limit",
        ),
        (
            r#"{"num_attention_heads": 2305843009213693958}"#,
            "`num_attention_heads` (2305843009213693958) is over the limit",
        ),
        (big, "the model would have over 4398046511104 parameters"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        let set: serde_json::Value = serde_json::from_str(set).unwrap();
        for (k, x) in set.as_object().unwrap() {
            v[k] = x.clone();
        }
        fs::write(d.join("config.json"), v.to_string()).unwrap();
        for args in [
            vec!["ir", dir, "--stats"],
            vec!["logits", dir, "--tokens", "1"],
        ] {
            let e = egret_err(&args);
            assert!(e.contains("config.json") && e.contains(want), "{set}: {e}");
        }
    }
    fs::write(d.join("config.json"), &cfg).unwrap();
    let data = tmp.0.join("data.txt");
    fs::write(&data, "some text to train on ".repeat(20)).unwrap();
    for (batch, seq) in [("1", "18446744073709551615"), ("4294967296", "4294967296")] {
        let e = egret_err(&[
            "train",
            dir,
            "--data",
            data.to_str().unwrap(),
            "--steps",
            "1",
            "--batch",
            batch,
            "--seq",
            seq,
            "--backend",
            "interp",
        ]);
        assert!(
            e.contains("over the limit of 16777216 tokens a step"),
            "{e}"
        );
    }
    // (`ir` plans training memory for 2048 tokens when --seq is not given)
    let e = egret_err(&[
        "ir", dir, "--mode", "training", "--batch", "16777216", "--stats",
    ]);
    assert!(
        e.contains("over the limit of 16777216 tokens a step"),
        "{e}"
    );
    let e = egret_err(&["bench", "matmul", "--size", "4294967296"]);
    assert!(e.contains("--size must be 1 to 16384"), "{e}");
    let e = egret_err(&["logits", dir, "--tokens", "1", "--threads", "100000"]);
    assert!(e.contains("100000 threads is over the limit"), "{e}");
}

/// An output path that names an existing file (not a directory) is an error, and the file is
/// left as it was.
#[test]
fn an_output_directory_over_a_file_is_refused() {
    let tmp = TempDir::new("out-file");
    let d = copy_tiny(&tmp, "m");
    let f = tmp.0.join("taken");
    fs::write(&f, "keep me").unwrap();
    for cmd in ["compile", "convert"] {
        let e = egret_err(&[cmd, d.to_str().unwrap(), "-o", f.to_str().unwrap()]);
        assert!(e.contains("exists and is not a directory"), "{cmd}: {e}");
        assert_eq!(fs::read_to_string(&f).unwrap(), "keep me", "{cmd}");
    }
}

/// A CPU name LLVM does not know, or a 32-bit one (LLVM would abort on either for 64-bit
/// code, after printing its own warnings), is one clear error before LLVM sees it.
#[test]
fn an_unknown_or_32_bit_cpu_is_refused() {
    let d = fixture("tiny/gqa_untied");
    for cpu in ["bogus", "i686", "pentium4"] {
        let e = egret_err(&[
            "generate",
            d.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--max-new-tokens",
            "1",
            "--cpu",
            cpu,
        ]);
        assert!(e.contains(&format!("unknown CPU `{cpu}`")), "{e}");
    }
}

/// A directory in the way that is not one egret writes (no `manifest.json`, not empty) is
/// the user's: writing an artifact over it is an error, and everything in it stays.
#[test]
fn an_output_directory_of_other_things_is_left_alone() {
    let tmp = TempDir::new("out-dir");
    let d = copy_tiny(&tmp, "m");
    let victim = tmp.0.join("photos");
    fs::create_dir_all(victim.join("2026")).unwrap();
    fs::write(victim.join("notes.txt"), "keep me").unwrap();
    fs::write(victim.join("2026").join("a.jpg"), "jpeg").unwrap();
    for cmd in ["compile", "convert"] {
        let e = egret_err(&[cmd, d.to_str().unwrap(), "-o", victim.to_str().unwrap()]);
        assert!(e.contains("other things in it"), "{cmd}: {e}");
        assert_eq!(
            fs::read_to_string(victim.join("notes.txt")).unwrap(),
            "keep me"
        );
        assert_eq!(
            fs::read_to_string(victim.join("2026").join("a.jpg")).unwrap(),
            "jpeg"
        );
        assert_eq!(fs::read_dir(&victim).unwrap().count(), 2, "{cmd}");
    }
    // (an empty directory, or an earlier output of the same command, is written over)
    for (cmd, file) in [
        ("compile", "manifest.json"),
        ("convert", "model.safetensors"),
    ] {
        let empty = tmp.0.join(format!("empty-{cmd}"));
        fs::create_dir_all(&empty).unwrap();
        for _ in 0..2 {
            common::egret_ok(&[cmd, d.to_str().unwrap(), "-o", empty.to_str().unwrap()]);
            assert!(empty.join(file).is_file(), "{cmd}");
        }
    }
}

/// Text that is not UTF-8, a learning rate or weight decay that is not a finite number 0 or
/// more, and a stdout that cannot be written (a full disk) are each one clear error.
#[test]
fn bad_text_hyper_parameters_and_a_full_stdout_are_errors() {
    let tmp = TempDir::new("bad-text");
    let d = copy_tiny(&tmp, "m");
    let m = d.to_str().unwrap();
    let bad = tmp.0.join("bad.txt");
    fs::write(&bad, b"ab\xff\xfe cd").unwrap();
    let tok = common::smollm2_gguf();
    let t = tok.to_str().unwrap();
    let e = egret_err(&["tokenize", t, "--file", bad.to_str().unwrap()]);
    assert!(e.contains("is not UTF-8 text"), "{e}");
    let b = bad.to_str().unwrap();
    let e = egret_err(&["train", m, "--tokenizer", t, "--data", b, "--steps", "1"]);
    assert!(e.contains("is not UTF-8 text"), "{e}");
    for (flag, v) in [("--lr", "nan"), ("--lr", "-1"), ("--weight-decay", "inf")] {
        let arg = format!("{flag}={v}");
        let e = egret_err(&["train", m, "--tokenizer", t, "--data", b, &arg]);
        assert!(e.contains(flag), "{arg}: {e}");
    }
    if std::path::Path::new("/dev/full").exists() {
        // `egret ARGS` (with `EGRET_PROFILE` set or not) writing to a full disk: exit 1, and
        // its stderr.
        let to_full = |args: &[&str], profile: bool| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_egret"));
            if profile {
                cmd.env("EGRET_PROFILE", "1");
            }
            let out = cmd
                .args(args)
                .stdout(fs::File::create("/dev/full").unwrap())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            stderr
        };
        let stderr = to_full(&["passes"], false);
        assert!(
            stderr.starts_with("error: cannot write the output"),
            "{stderr}"
        );
        // Streamed text that cannot be written stops the generation at once (the profile
        // prints a line per run of the model: the prompt's, and no decode steps after it).
        let prompt = "The capital of France is";
        let gen = ["generate", t, "--prompt", prompt, "--max-new-tokens", "30"];
        let stderr = to_full(&gen, true);
        assert!(
            stderr.contains("error: cannot write the output"),
            "{stderr}"
        );
        let runs = stderr
            .lines()
            .filter(|l| l.starts_with("phase\tkernels"))
            .count();
        assert!((1..=2).contains(&runs), "{runs} runs after a failed write");
    }
}

/// An option that would do nothing where it is given (for another backend or target, or
/// fixed in an artifact already) is one clear error naming it, not silently ignored.
#[test]
fn options_that_would_do_nothing_are_refused() {
    let tmp = TempDir::new("unused-flags");
    let d = copy_tiny(&tmp, "m");
    let m = d.to_str().unwrap();
    let out = tmp.0.join("a");
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["logits", m, "--tokens", "1,2"];
        args.extend(extra);
        egret_err(&args)
    };
    for (extra, want) in [
        (
            &["--tensor-cores"][..],
            "--tensor-cores has no effect with --backend cpu",
        ),
        (
            &["--backend", "interp", "--cpu", "skylake", "--no-cache"],
            "--cpu, --no-cache have no effect with --backend interp",
        ),
        (
            &["--backend", "gpu", "--weights-dtype", "bf16"],
            "--weights-dtype has no effect with --backend gpu",
        ),
        (
            &["--backend", "gpu", "--threads", "2"],
            "--threads has no effect with --backend gpu",
        ),
        (
            &["--artifact", o, "--passes", "none"],
            "--passes has no effect with --artifact",
        ),
    ] {
        let e = run(extra);
        assert!(e.contains(want), "{extra:?}: {e}");
    }
    let e = egret_err(&["compile", m, "--tensor-cores", "-o", o]);
    assert!(
        e.contains("--tensor-cores has no effect with --target cpu"),
        "{e}"
    );
    let e = egret_err(&["compile", m, "--target", "ptx", "--cpu", "native", "-o", o]);
    assert!(e.contains("--cpu has no effect with --target ptx"), "{e}");
    assert!(!out.exists());
}
