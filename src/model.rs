//! What MODEL means on the command line, and loading it: configuration, weights (checked
//! against the configuration's parameter list) and tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use egret_ir::Tensor;
use egret_models::{presets, LlamaConfig};
use egret_runtime::gguf::GgufFile;
use egret_runtime::tokenizer::Tokenizer;
use egret_runtime::weights::{self, Weights};

use crate::{EgretError, Result};

/// A model as named by the user.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face directory (`config.json`, safetensors, optional `tokenizer.json`).
    HfDir(PathBuf),
    /// A GGUF file (`llama` architecture, or vocabulary-only for tokenizing).
    Gguf(PathBuf),
    /// A preset name (configuration only: no weights, no tokenizer).
    Preset(String),
}

impl ModelSource {
    /// A directory, a `config.json` file (its directory), a GGUF file (by magic), or a preset.
    pub fn resolve(arg: &str) -> Result<ModelSource> {
        let p = Path::new(arg);
        if p.is_dir() {
            return Ok(ModelSource::HfDir(p.to_path_buf()));
        }
        if p.is_file() {
            if p.file_name().is_some_and(|n| n == "config.json") {
                return Ok(ModelSource::HfDir(
                    p.parent().map(Path::to_path_buf).unwrap_or_default(),
                ));
            }
            let mut magic = [0u8; 4];
            let is_gguf = std::fs::File::open(p)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
                && &magic == b"GGUF";
            if is_gguf || p.extension().is_some_and(|e| e == "gguf") {
                return Ok(ModelSource::Gguf(p.to_path_buf()));
            }
            return Err(EgretError::Usage(format!(
                "{arg}: not a GGUF file, a config.json or a model directory"
            )));
        }
        if presets::NAMES.contains(&arg) {
            return Ok(ModelSource::Preset(arg.to_string()));
        }
        if arg.contains('/') || arg.contains('.') || arg.is_empty() {
            return Err(EgretError::Usage(format!(
                "{arg:?}: no such file or directory"
            )));
        }
        Err(egret_models::ModelError::UnknownPreset(arg.to_string()).into())
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        egret_runtime::RuntimeError::Io {
            path: path.to_path_buf(),
            source: e,
        }
        .into()
    })
}

pub fn load_config(src: &ModelSource) -> Result<LlamaConfig> {
    Ok(match src {
        ModelSource::HfDir(d) => {
            let p = d.join("config.json");
            LlamaConfig::from_hf_json(&read_text(&p)?, &p.display().to_string())?
        }
        ModelSource::Gguf(p) => {
            LlamaConfig::from_gguf(&GgufFile::open(p)?, &p.display().to_string())?
        }
        ModelSource::Preset(name) => presets::preset(name)?,
    })
}

pub fn load_tokenizer(src: &ModelSource) -> Result<Tokenizer> {
    match src {
        ModelSource::HfDir(d) => {
            let p = d.join("tokenizer.json");
            if !p.is_file() {
                return Err(EgretError::Usage(format!(
                    "{}: no tokenizer.json; pass token ids with --tokens",
                    d.display()
                )));
            }
            Ok(Tokenizer::from_tokenizer_json(&p)?)
        }
        ModelSource::Gguf(p) => Ok(Tokenizer::from_gguf_metadata(
            GgufFile::open(p)?.metadata(),
        )?),
        ModelSource::Preset(n) => Err(EgretError::Usage(format!(
            "preset `{n}` has no tokenizer; give a model directory or GGUF file"
        ))),
    }
}

/// A model ready to run: configuration, parameters by Hugging Face name, tokenizer if any.
pub struct LoadedModel {
    pub config: LlamaConfig,
    pub params: HashMap<String, Tensor>,
    pub tokenizer: Option<Tokenizer>,
}

/// Checks every parameter the configuration needs against the loaded tensors (presence and
/// shape) and moves them into interpreter tensors without copying.
pub fn bind_params(config: &LlamaConfig, mut w: Weights) -> Result<HashMap<String, Tensor>> {
    let mut params = HashMap::new();
    for (name, shape) in config.parameters() {
        w.expect(&name, &shape)?;
        let t = w.take(&name).expect("checked by expect");
        params.insert(name, Tensor::from_f32(t.shape, t.data)?);
    }
    Ok(params)
}

pub fn load_model(src: &ModelSource) -> Result<LoadedModel> {
    match src {
        ModelSource::HfDir(d) => {
            let config = load_config(src)?;
            let w = weights::load_safetensors_dir(d)?;
            let tokenizer = if d.join("tokenizer.json").is_file() { Some(load_tokenizer(src)?) } else { None };
            Ok(LoadedModel { params: bind_params(&config, w)?, config, tokenizer })
        }
        ModelSource::Gguf(p) => {
            let g = GgufFile::open(p)?;
            let config = LlamaConfig::from_gguf(&g, &p.display().to_string())?;
            let tokenizer = Some(Tokenizer::from_gguf_metadata(g.metadata())?);
            let w = g.load_weights()?;
            Ok(LoadedModel { params: bind_params(&config, w)?, config, tokenizer })
        }
        ModelSource::Preset(n) => Err(EgretError::Usage(format!(
            "preset `{n}` has no weights; give a Hugging Face directory or a GGUF file to run a model"
        ))),
    }
}
