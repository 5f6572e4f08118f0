use egret_runtime::gguf::GgufFile;
use egret_runtime::tokenizer::Tokenizer;
#[test]
fn random_vs_hf() {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string("/tmp/random_cases.json").unwrap()).unwrap();
    let texts: Vec<String> = v["texts"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    let p = std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/egret/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = GgufFile::open(&p).unwrap();
    let fx = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tokenizer"));
    let toks = [
        ("smollm2", Tokenizer::from_gguf_metadata(g.metadata()).unwrap()),
        ("spm_llama", Tokenizer::from_tokenizer_json(&fx.join("spm_llama.tokenizer.json")).unwrap()),
        ("bpe_llama3", Tokenizer::from_tokenizer_json(&fx.join("bpe_llama3.tokenizer.json")).unwrap()),
    ];
    let mut bad = 0;
    for (name, t) in &toks {
        for (i, text) in texts.iter().enumerate() {
            let want: Vec<u32> = v[*name][i].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let got = t.encode(text, false).unwrap();
            let dec = t.decode(&want).unwrap();
            let want_dec = v[format!("{name}_dec")][i].as_str().unwrap();
            if got != want || dec != want_dec {
                bad += 1;
                if bad < 15 { println!("{name} {:?}\n  got  {:?}\n  want {:?}\n dec_ok {}", text, got, want, dec == want_dec); }
            }
        }
    }
    println!("mismatches: {bad}");
    assert_eq!(bad, 0);
}
