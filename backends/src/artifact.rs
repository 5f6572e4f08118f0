//! Writing compiled artifacts (the format is `egret_runtime::artifact`'s): the CPU payload is
//! the program's kernels as a shared library, `kernels.so`, next to `manifest.json`. The
//! directory is assembled under a temporary name and renamed into place, so an existing
//! artifact is replaced whole or not at all.

use std::path::{Path, PathBuf};

use egret_runtime::artifact::{
    sha256_hex, EntryPoint, Manifest, ParamSpec, Payload, Target, FORMAT, FORMAT_VERSION, MANIFEST,
};
use egret_runtime::plan::BufferRole;

use crate::kernel::{PanelType, Program};
use crate::llvm::{compile_shared_library, target_cpu, CpuOptions};
use crate::BackendError;

/// The CPU payload's file name.
pub const CPU_PAYLOAD: &str = "kernels.so";

fn io(path: &Path, e: std::io::Error) -> BackendError {
    BackendError::Io(format!("{}: {e}", path.display()))
}

/// What an artifact is for: its mode, entry point and (for training) optimizer constants.
#[derive(Clone, Debug, PartialEq)]
pub struct EntrySpec {
    /// `inference` or `training`.
    pub mode: String,
    /// `step` (inference over the KV cache) or `train_step`.
    pub entry: String,
    pub optimizer: Option<egret_runtime::artifact::AdamWSpec>,
}

impl EntrySpec {
    pub fn inference() -> EntrySpec {
        EntrySpec {
            mode: "inference".into(),
            entry: "step".into(),
            optimizer: None,
        }
    }
}

/// Compiles `step` (the scheduled program of the entry point) for the CPU into an artifact
/// at `dir`. `model` is the configuration recorded in the manifest.
pub fn write_cpu_artifact(
    step: &Program,
    opts: &CpuOptions,
    model: serde_json::Value,
    spec: &EntrySpec,
    dir: &Path,
) -> Result<PathBuf, BackendError> {
    egret_runtime::fsutil::write_dir_atomic(
        dir,
        |tmp| {
            let so = tmp.join(CPU_PAYLOAD);
            let plan = compile_shared_library(step, opts, &so)?;
            let bytes = std::fs::read(&so).map_err(|e| io(&so, e))?;
            let parameters = plan
                .buffers
                .iter()
                .filter_map(|b| match &b.role {
                    BufferRole::Param(n) => Some(ParamSpec {
                        name: n.clone(),
                        shape: b.dims.iter().map(|d| d.constant.max(0) as usize).collect(),
                        dtype: "f32".into(),
                    }),
                    _ => None,
                })
                .collect();
            let (cpu, features) = target_cpu(&opts.cpu);
            let mut manifest = Manifest {
                format: FORMAT.into(),
                format_version: FORMAT_VERSION,
                compiler: format!("egret {}", env!("CARGO_PKG_VERSION")),
                target: Target {
                    kind: "cpu".into(),
                    arch: std::env::consts::ARCH.into(),
                    cpu,
                    features,
                },
                mode: spec.mode.clone(),
                model,
                weights_dtype: match opts.weights {
                    PanelType::F32 => "f32",
                    PanelType::BF16 => "bf16",
                    PanelType::F16 => "f16",
                }
                .into(),
                entry_points: vec![EntryPoint {
                    name: spec.entry.clone(),
                    payload: CPU_PAYLOAD.into(),
                    plan,
                }],
                parameters,
                payloads: vec![Payload {
                    file: CPU_PAYLOAD.into(),
                    sha256: sha256_hex(&bytes),
                    bytes: bytes.len() as u64,
                }],
                optimizer: spec.optimizer,
                content_sha256: String::new(),
            };
            manifest.content_sha256 = manifest.content_hash();
            let text = serde_json::to_string(&manifest)
                .map_err(|e| BackendError::Io(format!("manifest: {e}")))?;
            let m = tmp.join(MANIFEST);
            std::fs::write(&m, text).map_err(|e| io(&m, e))
        },
        io,
    )?;
    Ok(dir.to_path_buf())
}
