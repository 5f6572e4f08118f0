//! Tokenizers against Hugging Face `tokenizers`: every fixture under tests/fixtures/tokenizer/
//! (written by tools/make_tokenizer_fixtures.py) is encoded and decoded here and must match id
//! for id. Three tokenizers: SmolLM2 from its real GGUF (byte-level BPE, `smollm`
//! pre-tokeniser), a small SentencePiece-style LLaMA vocabulary (tokenizer.json and GGUF
//! metadata), and a small byte-level BPE with LLaMA-3's split regex (tokenizer.json and GGUF
//! metadata). Bad inputs must give errors, never panics.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use egret_runtime::gguf::{GgufFile, GgufMetadata, GgufValue};
use egret_runtime::tokenizer::Tokenizer;
use egret_runtime::RuntimeError;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer")
}

fn read_json(name: &str) -> Value {
    let path = fixture_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Case {
    text: String,
    ids: Vec<u32>,
    ids_special: Vec<u32>,
    decoded: String,
    ids_gguf: Option<Vec<u32>>,
    /// A seeded random string: it may hold bytes the vocabulary lacks (HF drops them), so it
    /// need not decode back to itself.
    random: bool,
}

fn id_list(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn cases(name: &str) -> Vec<Case> {
    let v = read_json(name);
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_owned(),
            ids: id_list(&c["ids"]),
            ids_special: id_list(&c["ids_special"]),
            decoded: c["decoded"].as_str().expect("decoded").to_owned(),
            ids_gguf: c.get("ids_gguf").map(id_list),
            random: c["random"].as_bool().expect("random"),
        })
        .collect()
}

/// GGUF metadata written as JSON by the fixture script: scores are f32, token types i32,
/// other integers u32.
fn gguf_meta(name: &str) -> GgufMetadata {
    fn value(key: &str, v: &Value) -> GgufValue {
        match v {
            Value::String(s) => GgufValue::String(s.clone()),
            Value::Bool(b) => GgufValue::Bool(*b),
            Value::Number(n) if key.ends_with("scores") => {
                GgufValue::F32(n.as_f64().unwrap() as f32)
            }
            Value::Number(n) if key.ends_with("token_type") => {
                GgufValue::I32(n.as_i64().unwrap() as i32)
            }
            Value::Number(n) => GgufValue::U32(n.as_u64().unwrap() as u32),
            Value::Array(a) => GgufValue::Array(a.iter().map(|x| value(key, x)).collect()),
            other => panic!("unexpected metadata value {other}"),
        }
    }
    read_json(name)
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), value(k, v)))
        .collect()
}

fn smollm2_path() -> PathBuf {
    let path = std::env::var_os("EGRET_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/egret/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.exists(),
        "SmolLM2 GGUF not found at {} (set EGRET_SMOLLM2_GGUF): run scripts/test.sh once to fetch it",
        path.display()
    );
    path
}

fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let gguf = GgufFile::open(&smollm2_path()).expect("open SmolLM2 GGUF");
        Tokenizer::from_gguf_metadata(gguf.metadata()).expect("SmolLM2 tokenizer")
    })
}

fn short(s: &str) -> String {
    s.chars()
        .take(60)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

/// Checks encode (with and without specials) and decode against the HF fixture.
fn check(tok: &Tokenizer, cases: &[Case], byte_level: bool) {
    for c in cases {
        assert_eq!(
            tok.encode(&c.text, false).unwrap(),
            c.ids,
            "encode {:?}",
            short(&c.text)
        );
        assert_eq!(
            tok.encode(&c.text, true).unwrap(),
            c.ids_special,
            "encode+special {:?}",
            short(&c.text)
        );
        assert_eq!(
            tok.decode(&c.ids).unwrap(),
            c.decoded,
            "decode {:?}",
            short(&c.text)
        );
        // `<mask>` (bpe_llama3) has lstrip: it eats the spaces before it.
        if byte_level && !c.random && !c.text.contains("<mask>") {
            assert_eq!(
                c.decoded,
                c.text,
                "byte-level decode(encode(s)) == s for {:?}",
                short(&c.text)
            );
            let bytes: Vec<u8> = c
                .ids
                .iter()
                .flat_map(|&id| tok.decode_token_bytes(id).unwrap())
                .collect();
            assert_eq!(
                bytes,
                c.text.as_bytes(),
                "streamed bytes of {:?}",
                short(&c.text)
            );
        }
    }
}

/// Writes `tok.to_tokenizer_json()` (with a config.json carrying BOS/EOS, as `egret convert`
/// writes) and reads it back.
fn round_trip(tok: &Tokenizer, name: &str) -> Tokenizer {
    let dir = std::env::temp_dir().join(format!(
        "egret-tokenizer-test-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(
        &path,
        serde_json::to_string(&tok.to_tokenizer_json()).unwrap(),
    )
    .unwrap();
    let config = serde_json::json!({ "bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_id() });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let back = Tokenizer::from_tokenizer_json(&path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!((back.bos_id(), back.eos_id()), (tok.bos_id(), tok.eos_id()));
    back
}

#[test]
fn smollm2_gguf_matches_hf() {
    let cases = cases("smollm2.cases.json");
    assert!(cases.len() > 30);
    check(smollm2(), &cases, true);
}

#[test]
fn smollm2_capital_of_france_and_specials() {
    let tok = smollm2();
    let fixture = read_json("smollm2.cases.json");
    let case = cases("smollm2.cases.json")
        .into_iter()
        .find(|c| c.text == "The capital of France is")
        .unwrap();
    assert_eq!(
        tok.encode("The capital of France is", false).unwrap(),
        case.ids
    );
    assert_eq!(
        tok.vocab_size(),
        fixture["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(
        tok.bos_id(),
        Some(fixture["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_id(),
        Some(fixture["eos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(
        tok.token_to_id("Ġthe"),
        tok.encode(" the", false).unwrap().first().copied()
    );
    // No BOS is added for SmolLM2 (add_bos_token = false).
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        tok.encode("hi", false).unwrap()
    );
}

#[test]
fn smollm2_tokenizer_json_round_trip() {
    let tok = smollm2();
    let back = round_trip(tok, "smollm2");
    check(&back, &cases("smollm2.cases.json"), true);
}

#[test]
fn smollm2_long_text_round_trips() {
    let tok = smollm2();
    let cases = cases("smollm2.cases.json");
    let base: String = cases
        .iter()
        .filter(|c| !c.random)
        .map(|c| c.text.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let mut text = String::new();
    while text.len() < 100_000 {
        text.push_str(&base);
        text.push_str(&format!(" {} ", text.len()));
    }
    let start = std::time::Instant::now();
    let ids = tok.encode(&text, false).unwrap();
    eprintln!(
        "encoded {} bytes into {} tokens in {:?}",
        text.len(),
        ids.len(),
        start.elapsed()
    );
    assert!(
        tok.decode(&ids).unwrap() == text,
        "a 100 KB text does not decode back to itself"
    );
}

#[test]
fn spm_llama_tokenizer_json_matches_hf() {
    let tok =
        Tokenizer::from_tokenizer_json(&fixture_dir().join("spm_llama.tokenizer.json")).unwrap();
    let cases = cases("spm_llama.cases.json");
    check(&tok, &cases, false);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    check(&round_trip(&tok, "spm-json"), &cases, false);
}

#[test]
fn spm_llama_gguf_matches_hf() {
    let tok = Tokenizer::from_gguf_metadata(&gguf_meta("spm_llama.gguf.json")).unwrap();
    let cases = cases("spm_llama.cases.json");
    check(&tok, &cases, false);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    check(&round_trip(&tok, "spm-gguf"), &cases, false);
    // The leading "▁" is stripped by decode but kept when streaming.
    let ids = tok.encode("Hello world", false).unwrap();
    let streamed: Vec<u8> = ids
        .iter()
        .flat_map(|&id| tok.decode_token_bytes(id).unwrap())
        .collect();
    assert_eq!(String::from_utf8(streamed).unwrap(), " Hello world");
}

#[test]
fn bpe_llama3_tokenizer_json_matches_hf() {
    let tok =
        Tokenizer::from_tokenizer_json(&fixture_dir().join("bpe_llama3.tokenizer.json")).unwrap();
    let cases = cases("bpe_llama3.cases.json");
    check(&tok, &cases, true);
    check(&round_trip(&tok, "llama3-json"), &cases, true);
}

/// The same vocabularies behind other pipeline parts (Metaspace pre-tokenizer and decoder,
/// Strip/Lowercase/Replace/Prepend normalizers, every Split behaviour, Digits, Whitespace,
/// WhitespaceSplit, RobertaProcessing): each must match HF and survive a round trip.
#[test]
fn pipeline_variants_match_hf() {
    for name in [
        "spm_metaspace_first",
        "spm_metaspace_always_split",
        "bpe_misc",
        "bpe_whitespace",
    ] {
        let tok =
            Tokenizer::from_tokenizer_json(&fixture_dir().join(format!("{name}.tokenizer.json")))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        let cases = cases(&format!("{name}.cases.json"));
        check(&tok, &cases, false);
        check(&round_trip(&tok, name), &cases, false);
    }
}

/// As HF does, the ids written in `added_tokens` are not trusted: a token in the model's
/// vocabulary keeps its vocabulary id, a new one gets the next id after the vocabulary.
#[test]
fn added_token_ids_are_assigned_as_hf_does() {
    let mut v = read_json("bpe_llama3.tokenizer.json");
    let vocab_len = v["model"]["vocab"].as_object().unwrap().len() as u32;
    let bos = v["model"]["vocab"]["<|begin_of_text|>"].as_u64().unwrap() as u32;
    let added = v["added_tokens"].as_array_mut().unwrap();
    added[0]["id"] = 999.into();
    added.push(
        serde_json::json!({"id": 5, "content": "<|new|>", "special": true, "normalized": false}),
    );
    let tok = Tokenizer::from_tokenizer_json_value(&v).unwrap();
    assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(bos));
    let new_id = tok.token_to_id("<|new|>").unwrap();
    assert!(new_id >= vocab_len, "{new_id}");
    assert_eq!(tok.encode("a<|new|>", false).unwrap().last(), Some(&new_id));
    assert_eq!(tok.decode(&[new_id]).unwrap(), "<|new|>");
}

#[test]
fn bpe_llama3_gguf_matches_hf() {
    let tok = Tokenizer::from_gguf_metadata(&gguf_meta("bpe_llama3.gguf.json")).unwrap();
    let back = round_trip(&tok, "llama3-gguf");
    for c in cases("bpe_llama3.cases.json") {
        let expected = c.ids_gguf.expect("ids_gguf");
        assert_eq!(
            tok.encode(&c.text, false).unwrap(),
            expected,
            "encode {:?}",
            short(&c.text)
        );
        assert_eq!(
            back.encode(&c.text, false).unwrap(),
            expected,
            "round trip {:?}",
            short(&c.text)
        );
        if !c.random {
            assert_eq!(tok.decode(&expected).unwrap(), c.text);
        }
        let bos = tok.bos_id().unwrap();
        assert_eq!(
            tok.encode(&c.text, true).unwrap(),
            [vec![bos], expected].concat()
        );
    }
}

fn assert_tokenizer_error<T: std::fmt::Debug>(r: egret_runtime::Result<T>, needle: &str) {
    match r {
        Err(RuntimeError::Tokenizer(msg)) => assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        ),
        other => panic!("expected a tokenizer error mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_gguf_metadata_is_an_error() {
    let mut m = gguf_meta("bpe_llama3.gguf.json");
    m.insert(
        "tokenizer.ggml.pre".into(),
        GgufValue::String("klingon".into()),
    );
    assert_tokenizer_error(Tokenizer::from_gguf_metadata(&m), "klingon");

    let mut m = gguf_meta("bpe_llama3.gguf.json");
    m.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("t5".into()),
    );
    assert_tokenizer_error(Tokenizer::from_gguf_metadata(&m), "t5");

    let mut m = gguf_meta("bpe_llama3.gguf.json");
    m.insert(
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(vec![GgufValue::I32(1)]),
    );
    assert_tokenizer_error(Tokenizer::from_gguf_metadata(&m), "token_type");

    let mut m = gguf_meta("bpe_llama3.gguf.json");
    m.insert(
        "tokenizer.ggml.merges".into(),
        GgufValue::Array(vec![GgufValue::String("Ġ zzzq".into())]),
    );
    assert_tokenizer_error(Tokenizer::from_gguf_metadata(&m), "zzzq");

    let mut m = gguf_meta("bpe_llama3.gguf.json");
    m.insert(
        "tokenizer.ggml.eos_token_id".into(),
        GgufValue::U32(1_000_000),
    );
    assert_tokenizer_error(Tokenizer::from_gguf_metadata(&m), "1000000");

    let mut m = gguf_meta("spm_llama.gguf.json");
    m.remove("tokenizer.ggml.tokens");
    assert_tokenizer_error(Tokenizer::from_gguf_metadata(&m), "tokens");

    assert_tokenizer_error(
        Tokenizer::from_gguf_metadata(&GgufMetadata::new()),
        "tokenizer.ggml.model",
    );
}

#[test]
fn bad_tokenizer_json_is_an_error() {
    let dir = std::env::temp_dir().join(format!("egret-tokenizer-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read_to_string(fixture_dir().join("bpe_llama3.tokenizer.json")).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&good).unwrap();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (good[..good.len() / 2].to_owned(), "not valid JSON"),
        ("[1, 2]".to_owned(), "object"),
        ("{}".to_owned(), "model"),
        (
            edit(&|v| v["model"]["type"] = "WordPiece".into()),
            "WordPiece",
        ),
        (
            edit(&|v| v["pre_tokenizer"] = serde_json::json!({"type": "BertPreTokenizer"})),
            "BertPreTokenizer",
        ),
        (
            edit(&|v| v["normalizer"] = serde_json::json!({"type": "NFKC"})),
            "NFKC",
        ),
        (
            edit(&|v| v["decoder"] = serde_json::json!({"type": "CTC"})),
            "CTC",
        ),
        (
            edit(&|v| v["model"]["merges"] = serde_json::json!(["Ġ qqqq"])),
            "qqqq",
        ),
        (
            edit(&|v| v["model"]["merges"] = serde_json::json!(["a b c"])),
            "merge 1",
        ),
        (
            edit(
                &|v| v["pre_tokenizer"] = serde_json::json!({"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated", "invert": false}),
            ),
            "regex",
        ),
        (
            edit(&|v| v["added_tokens"] = serde_json::json!([{"content": "x"}])),
            "id",
        ),
        (
            edit(&|v| v["model"]["vocab"]["zz"] = serde_json::json!(-3)),
            "zz",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = write(&format!("bad{i}.json"), text);
        assert_tokenizer_error(Tokenizer::from_tokenizer_json(&path), needle);
    }
    let missing = Tokenizer::from_tokenizer_json(&dir.join("missing.json"));
    assert!(
        matches!(missing, Err(RuntimeError::Io { .. })),
        "{missing:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ids_out_of_range_are_errors() {
    let tok =
        Tokenizer::from_tokenizer_json(&fixture_dir().join("spm_llama.tokenizer.json")).unwrap();
    let n = tok.vocab_size() as u32;
    for id in [n, n + 1, u32::MAX] {
        assert!(matches!(
            tok.decode(&[1, id]),
            Err(RuntimeError::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            tok.decode_token_bytes(id),
            Err(RuntimeError::TokenOutOfRange { .. })
        ));
    }
    assert!(tok.decode(&[]).unwrap().is_empty());
}

/// Pseudo-random text (a fixed LCG) of awkward characters never makes encode or decode fail.
#[test]
fn arbitrary_text_never_fails() {
    let pool: Vec<char> =
        " \t\n\r\u{a0}\u{200d}\u{fe0f}aZ0'’!?.,-_<|>[]sé日本語😀👍🏽\u{10ffff}\u{0}\u{7f}▁Ġ"
            .chars()
            .chain("<|im_start|><s></s><unk><mask>xyz".chars())
            .collect();
    let tokenizers = [
        Tokenizer::from_tokenizer_json(&fixture_dir().join("spm_llama.tokenizer.json")).unwrap(),
        Tokenizer::from_tokenizer_json(&fixture_dir().join("bpe_llama3.tokenizer.json")).unwrap(),
        Tokenizer::from_gguf_metadata(&gguf_meta("spm_llama.gguf.json")).unwrap(),
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for _ in 0..300 {
        let len = next() % 40;
        let text: String = (0..len).map(|_| pool[next() % pool.len()]).collect();
        for (i, tok) in tokenizers.iter().enumerate() {
            let ids = tok.encode(&text, true).unwrap();
            let decoded = tok.decode(&ids).unwrap();
            if i == 1 && !text.contains("<mask>") {
                assert_eq!(decoded.trim_start_matches("<|begin_of_text|>"), text);
            }
        }
    }
}
