//! Embedding egret: load an artifact compiled by `egret compile`, bind weights, generate.
//! Uses only the `egret-runtime` crate (no compiler, no LLVM):
//!
//! ```text
//! egret compile model.gguf -o model.egret
//! cargo run --example embed -- model.egret model.gguf 20 "The capital of France is"
//! ```
//!
//! The prompt is text (encoded with the GGUF's or `tokenizer.json`'s tokenizer) or, with
//! `--ids`, comma-separated token ids. Prints one JSON object: `ids` (generated) and `text`.

use egret_runtime::generate::GenerateOptions;
use egret_runtime::tokenizer::Tokenizer;
use egret_runtime::{Artifact, Session};

fn run() -> Result<String, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, weights, max_new, prompt, rest @ ..] = args.as_slice() else {
        return Err("usage: embed ARTIFACT_DIR WEIGHTS MAX_NEW PROMPT [--ids]".into());
    };
    let wpath = std::path::Path::new(weights);
    let tokenizer = if wpath.is_dir() {
        Tokenizer::from_tokenizer_json(&wpath.join("tokenizer.json")).ok()
    } else {
        egret_runtime::gguf::GgufFile::open(wpath)
            .ok()
            .and_then(|g| Tokenizer::from_gguf_metadata(g.metadata()).ok())
    };
    let ids: Vec<u32> = if rest.iter().any(|a| a == "--ids") {
        prompt
            .split(',')
            .map(|t| t.trim().parse())
            .collect::<Result<_, _>>()?
    } else {
        tokenizer
            .as_ref()
            .ok_or("no tokenizer with these weights: pass --ids")?
            .encode(prompt, false)?
    };
    let art = Artifact::load(dir)?;
    let mut session = Session::new(&art, egret_runtime::weights::load(wpath)?, 0)?;
    let opts = GenerateOptions {
        max_new_tokens: max_new.parse()?,
        sampler: Default::default(),
        stop_ids: tokenizer
            .as_ref()
            .and_then(|t| t.eos_id())
            .into_iter()
            .collect(),
    };
    let out = session.generate(&ids, &opts, |_| {})?;
    let text = match &tokenizer {
        Some(t) => t.decode(&out.ids)?,
        None => String::new(),
    };
    Ok(serde_json::json!({ "ids": out.ids, "text": text }).to_string())
}

fn main() {
    match run() {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
