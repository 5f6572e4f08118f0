use egret_runtime::gguf::GgufFile;
use egret_runtime::tokenizer::Tokenizer;
#[test]
fn dump() {
    let p = std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/egret/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = GgufFile::open(&p).unwrap();
    let t = Tokenizer::from_gguf_metadata(g.metadata()).unwrap();
    std::fs::write("/tmp/smollm2_egret_tokenizer.json", serde_json::to_string(&t.to_tokenizer_json()).unwrap()).unwrap();
    println!("{:?}", t.encode("The capital of France is", false).unwrap());
    let t2 = Tokenizer::from_tokenizer_json(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tokenizer/spm_llama.tokenizer.json"))).unwrap();
    std::fs::write("/tmp/spm_egret_tokenizer.json", serde_json::to_string(&t2.to_tokenizer_json()).unwrap()).unwrap();
    let m = egret_runtime::gguf::GgufMetadata::new(); let _ = m;
}
