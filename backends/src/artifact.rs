//! Writing compiled artifacts (the format is `egret_runtime::artifact`'s): the CPU payload is
//! the program's kernels as a shared library, `kernels.so`, the GPU payload a PTX module,
//! `kernels.ptx`, next to `manifest.json`. The
//! directory is assembled under a temporary name and renamed into place, so an existing
//! artifact is replaced whole or not at all.

use std::path::{Path, PathBuf};

use egret_runtime::artifact::{
    sha256_hex, EntryPoint, Manifest, ParamSpec, Payload, Target, FORMAT, FORMAT_VERSION, MANIFEST,
};
use egret_runtime::plan::{BufferRole, Plan};

use crate::kernel::{PanelType, Program};
use crate::llvm::{compile_shared_library, target_cpu, CpuOptions};
use crate::ptx::{compile_ptx, PtxOptions};
use crate::BackendError;

/// The CPU payload's file name.
pub const CPU_PAYLOAD: &str = "kernels.so";
/// The GPU payload's file name.
pub const PTX_PAYLOAD: &str = "kernels.ptx";

fn io(path: &Path, e: std::io::Error) -> BackendError {
    BackendError::Io(format!("{}: {e}", path.display()))
}

/// What an artifact is for: its mode and (for training) optimizer constants.
#[derive(Clone, Debug, PartialEq)]
pub struct EntrySpec {
    /// `inference` or `training`.
    pub mode: String,
    pub optimizer: Option<egret_runtime::artifact::AdamWSpec>,
}

impl EntrySpec {
    pub fn inference() -> EntrySpec {
        EntrySpec {
            mode: "inference".into(),
            optimizer: None,
        }
    }
}

/// An artifact's entry points: each one's name (`step`: inference over the KV cache;
/// `train_step` and `grads` in a training artifact) and its scheduled program. The programs
/// compile into one payload, sharing their kernels, so they must share their symbols
/// (`llvm::unify_symbols`).
pub type Entries<'a> = [(&'a str, &'a Program)];

/// Compiles `entries` for the CPU into an artifact at `dir`. `model` is the configuration
/// recorded in the manifest.
pub fn write_cpu_artifact(
    entries: &Entries,
    opts: &CpuOptions,
    model: serde_json::Value,
    spec: &EntrySpec,
    dir: &Path,
) -> Result<PathBuf, BackendError> {
    let (cpu, features) = target_cpu(&opts.cpu);
    let target = Target {
        kind: "cpu".into(),
        arch: std::env::consts::ARCH.into(),
        cpu,
        features,
    };
    let dtype = match opts.weights {
        PanelType::F32 => "f32",
        PanelType::BF16 => "bf16",
        PanelType::F16 => "f16",
        PanelType::Q8 => "q8",
    };
    write_artifact(
        dir,
        CPU_PAYLOAD,
        target,
        dtype,
        model,
        spec,
        entries,
        |progs, path| compile_shared_library(progs, opts, path),
    )
}

/// Compiles `entries` (scheduled with `ptx::schedule_options`) to PTX for `opts.arch` into an
/// artifact at `dir`: `kernels.ptx` beside the manifest, target kind `ptx`.
pub fn write_ptx_artifact(
    entries: &Entries,
    opts: &PtxOptions,
    model: serde_json::Value,
    spec: &EntrySpec,
    dir: &Path,
) -> Result<PathBuf, BackendError> {
    let target = Target {
        kind: "ptx".into(),
        arch: "nvptx64".into(),
        cpu: opts.arch.clone(),
        features: crate::ptx::ptx_features(opts),
    };
    write_artifact(
        dir,
        PTX_PAYLOAD,
        target,
        "f32",
        model,
        spec,
        entries,
        |progs, path| {
            let (text, plans) = compile_ptx(progs, opts)?;
            std::fs::write(path, text).map_err(|e| io(path, e))?;
            Ok(plans)
        },
    )
}

/// Whether `dir` holds an egret artifact and nothing else (its manifest, of this format,
/// and payloads), which writing an artifact there may replace whole.
fn is_artifact_dir(dir: &Path) -> bool {
    let manifest = std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let ours = manifest.is_some_and(|m| m["format"] == FORMAT);
    ours && egret_runtime::fsutil::holds_only(dir, &[MANIFEST, CPU_PAYLOAD, PTX_PAYLOAD])
}

/// Writes an artifact whose payload `payload` is made from the entries' programs by
/// `compile` (which returns each program's plan, whose calls the payload implements), under a
/// temporary name renamed into place.
#[allow(clippy::too_many_arguments)]
fn write_artifact(
    dir: &Path,
    payload: &str,
    target: Target,
    weights_dtype: &str,
    model: serde_json::Value,
    spec: &EntrySpec,
    entries: &Entries,
    compile: impl FnOnce(&[&Program], &Path) -> Result<Vec<Plan>, BackendError>,
) -> Result<PathBuf, BackendError> {
    if entries.is_empty() {
        return Err(BackendError::Unsupported(
            "an artifact needs at least one entry point".into(),
        ));
    }
    if let Some((i, (name, _))) = entries
        .iter()
        .enumerate()
        .find(|(i, (n, _))| entries[..*i].iter().any(|(m, _)| m == n))
    {
        return Err(BackendError::Unsupported(format!(
            "entry point `{name}` given twice (the second at {i})"
        )));
    }
    let progs: Vec<&Program> = entries.iter().map(|(_, p)| *p).collect();
    let replace = egret_runtime::fsutil::Replace {
        what: "an egret artifact",
        ours: &is_artifact_dir,
        keep_others: false,
    };
    egret_runtime::fsutil::write_dir_atomic(
        dir,
        replace,
        |tmp| {
            let file = tmp.join(payload);
            let plans = compile(&progs, &file)?;
            if plans.len() != progs.len() {
                return Err(BackendError::Unsupported(format!(
                    "{} plans compiled for {} entry points",
                    plans.len(),
                    progs.len()
                )));
            }
            let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
            // Every parameter any entry point reads, once, in the order first read.
            let mut parameters: Vec<ParamSpec> = Vec::new();
            for b in plans.iter().flat_map(|p| &p.buffers) {
                if let BufferRole::Param(n) = &b.role {
                    let shape: Vec<usize> =
                        b.dims.iter().map(|d| d.constant.max(0) as usize).collect();
                    match parameters.iter().find(|p| p.name == *n) {
                        Some(p) if p.shape != shape => {
                            return Err(BackendError::Unsupported(format!(
                                "entry points disagree on the shape of parameter `{n}`"
                            )))
                        }
                        Some(_) => {}
                        None => parameters.push(ParamSpec {
                            name: n.clone(),
                            shape,
                            dtype: "f32".into(),
                        }),
                    }
                }
            }
            let mut manifest = Manifest {
                format: FORMAT.into(),
                format_version: FORMAT_VERSION,
                compiler: format!("egret {}", env!("CARGO_PKG_VERSION")),
                target,
                mode: spec.mode.clone(),
                model,
                weights_dtype: weights_dtype.into(),
                entry_points: entries
                    .iter()
                    .zip(plans)
                    .map(|((name, _), plan)| EntryPoint {
                        name: name.to_string(),
                        payload: payload.into(),
                        plan,
                    })
                    .collect(),
                parameters,
                payloads: vec![Payload {
                    file: payload.into(),
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
