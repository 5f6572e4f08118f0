//! Compiled artifacts: a directory holding `manifest.json` and the kernel payload (for the
//! CPU, `kernels.so`: a shared library of the plan's kernels). The manifest carries the format
//! version, the target, the entry points with their plans (buffers, memory plan, kernel
//! schedule), the parameters the weights must supply, and the SHA-256 of every payload.
//!
//! `Artifact::load` refuses, with one clear error each: an unknown format or version, a
//! malformed or truncated manifest, a plan that refers to buffers or symbols it does not have
//! or has an output that no kernel computes, a missing payload or one whose hash differs, and
//! a target this machine cannot run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::plan::Plan;

use crate::{Result, RuntimeError};

/// The manifest's file name inside an artifact directory.
pub const MANIFEST: &str = "manifest.json";
/// The value of `Manifest::format`.
pub const FORMAT: &str = "egret-artifact";
/// The format version this runtime reads and writes; any other is refused.
/// Version 2: CPU kernels take the launch's work counter as a sixth argument (`KernelFn`).
/// Version 3: GPU kernels may need dynamic shared memory (`KernelCall::shared_bytes`), and
/// buffers may hold bf16 (`ElemType::BF16`): an older runtime would launch them wrongly.
/// Version 4: packed weights may be int8 with their scales (`ElemType::Bytes`), which an
/// older runtime cannot parse; training artifacts may also have a `grads` entry point.
pub const FORMAT_VERSION: u32 = 4;
/// Manifests larger than this are refused before parsing (a real one is a few MiB).
const MANIFEST_MAX_BYTES: u64 = 256 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `egret-artifact`.
    pub format: String,
    pub format_version: u32,
    /// The compiler that wrote it (`egret 0.1.0`).
    pub compiler: String,
    pub target: Target,
    /// `inference` (entry point `step`) or `training` (entry points `train_step` and
    /// `grads`).
    pub mode: String,
    /// The model configuration it was compiled from (informative).
    pub model: serde_json::Value,
    /// Storage of matmul weights in the packed panels (`f32`, `bf16`, `f16`).
    pub weights_dtype: String,
    pub entry_points: Vec<EntryPoint>,
    /// What the weights must supply, by Hugging Face name.
    pub parameters: Vec<ParamSpec>,
    pub payloads: Vec<Payload>,
    /// For `mode: training`: the AdamW constants the `train_step` entry point was compiled
    /// with (the runtime computes the bias corrections from them).
    #[serde(default)]
    pub optimizer: Option<AdamWSpec>,
    /// SHA-256 of the target, entry points, parameters, payload list and optimizer
    /// (`content_hash`): a plan changed by one byte would run kernels over the wrong buffers,
    /// so it is refused.
    pub content_sha256: String,
}

/// AdamW's fixed hyper-parameters (see `egret_passes::optim` for the update).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWSpec {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
}

impl Manifest {
    /// The hash `content_sha256` must hold.
    pub fn content_hash(&self) -> String {
        let text = serde_json::to_string(&(
            &self.target,
            &self.entry_points,
            &self.parameters,
            &self.payloads,
            &self.optimizer,
        ))
        .unwrap_or_default();
        sha256_hex(text.as_bytes())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `cpu` (a shared library) or `ptx`.
    pub kind: String,
    /// The CPU architecture (`x86_64`), as Rust's `std::env::consts::ARCH` names it.
    pub arch: String,
    /// The LLVM CPU name the code was generated for.
    pub cpu: String,
    /// CPU features the code may use (`avx2`, `fma`, `avx512f`, ...), checked at load.
    pub features: Vec<String>,
}

/// A plan and the payload whose exported functions its kernel calls name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryPoint {
    /// `step`: tokens at positions over the KV cache (prompt and decode alike);
    /// `train_step`: loss, gradients and the AdamW update; `grads`: loss and gradients.
    pub name: String,
    pub payload: String,
    pub plan: Plan,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// A file name inside the artifact directory (no directories).
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Hex SHA-256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether this machine has an x86 feature (by LLVM's name); `None` if it cannot tell.
fn host_has(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! known {
            ($($f:tt),*) => {
                match feature {
                    $($f => Some(std::arch::is_x86_feature_detected!($f)),)*
                    _ => None,
                }
            };
        }
        known!(
            "sse2",
            "sse3",
            "ssse3",
            "sse4.1",
            "sse4.2",
            "popcnt",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "bmi1",
            "bmi2",
            "lzcnt",
            "movbe",
            "avx512f",
            "avx512bw",
            "avx512cd",
            "avx512dq",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avx512fp16",
            "avx512ifma",
            "avx512vbmi",
            "avx512vbmi2",
            "avx512bitalg",
            "avx512vpopcntdq",
            "vpclmulqdq",
            "gfni",
            "vaes"
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        None
    }
}

/// The features of `list` this runtime can check (the others are recorded but not checked).
pub fn checkable_features(list: &[String]) -> Vec<String> {
    list.iter()
        .filter(|f| host_has(f).is_some())
        .cloned()
        .collect()
}

/// A loaded, checked artifact directory.
#[derive(Clone, Debug)]
pub struct Artifact {
    dir: PathBuf,
    manifest: Manifest,
}

/// Whether PTX for `arch` (`sm_XY`, or `sm_XYa` for architecture-specific code) runs on a
/// GPU of compute capability `(major, minor)`: one of at least `X.Y`, or exactly `X.Y` for
/// architecture-specific code. `None` for an architecture name it does not know.
pub fn gpu_arch_runs_on(arch: &str, (major, minor): (i32, i32)) -> Option<bool> {
    let version = arch.strip_prefix("sm_")?;
    let (version, specific) = match version.strip_suffix('a') {
        Some(v) => (v, true),
        None => (version, false),
    };
    let want: i32 = version.parse().ok()?;
    let have = major * 10 + minor;
    Some(have >= want && (!specific || have == want))
}

impl Artifact {
    /// Reads and checks `dir/manifest.json` and the payloads it lists.
    pub fn load(dir: impl AsRef<Path>) -> Result<Artifact> {
        let dir = dir.as_ref().to_path_buf();
        let bad = |reason: String| RuntimeError::Artifact {
            path: dir.clone(),
            reason,
        };
        let mpath = dir.join(MANIFEST);
        let meta = std::fs::metadata(&mpath).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
        if meta.len() > MANIFEST_MAX_BYTES {
            return Err(bad(format!(
                "{MANIFEST} is {} bytes, too large",
                meta.len()
            )));
        }
        let text = std::fs::read(&mpath).map_err(|e| bad(format!("{MANIFEST}: {e}")))?;
        // The format and version first, so a newer manifest gets the version error rather
        // than whatever field it changed.
        let head: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("{MANIFEST} is not valid JSON: {e}")))?;
        if head.get("format").and_then(|v| v.as_str()) != Some(FORMAT) {
            return Err(bad(format!("{MANIFEST} is not an `{FORMAT}` manifest")));
        }
        match head.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v == FORMAT_VERSION as u64 => {}
            Some(v) => {
                return Err(bad(format!(
                    "format version {v} is not supported (this runtime reads version {FORMAT_VERSION}); recompile with this egret"
                )))
            }
            None => return Err(bad(format!("{MANIFEST} has no format_version"))),
        }
        let manifest: Manifest = serde_json::from_value(head)
            .map_err(|e| bad(format!("{MANIFEST} is malformed: {e}")))?;
        if manifest.content_hash() != manifest.content_sha256 {
            return Err(bad(format!(
                "{MANIFEST} does not match its content_sha256: it was changed or damaged"
            )));
        }
        for p in &manifest.payloads {
            if p.file.is_empty() || p.file.contains(['/', '\\']) || p.file == "." || p.file == ".."
            {
                return Err(bad(format!(
                    "payload name `{}` is not a plain file name",
                    p.file
                )));
            }
            let bytes = std::fs::read(dir.join(&p.file))
                .map_err(|e| bad(format!("payload `{}`: {e}", p.file)))?;
            let got = sha256_hex(&bytes);
            if got != p.sha256 {
                return Err(bad(format!(
                    "payload `{}` has SHA-256 {got}, the manifest says {}: the file was changed or damaged",
                    p.file, p.sha256
                )));
            }
        }
        for e in &manifest.entry_points {
            if !manifest.payloads.iter().any(|p| p.file == e.payload) {
                return Err(bad(format!(
                    "entry point `{}` names payload `{}`, which the manifest does not list",
                    e.name, e.payload
                )));
            }
            e.plan
                .validate()
                .map_err(|r| bad(format!("entry point `{}`: {r}", e.name)))?;
        }
        Ok(Artifact { dir, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn entry(&self, name: &str) -> Result<&EntryPoint> {
        self.manifest
            .entry_points
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| RuntimeError::Artifact {
                path: self.dir.clone(),
                reason: format!("no entry point `{name}`"),
            })
    }

    /// Checks that this machine can run a `ptx` artifact: a CUDA driver, a GPU, and one of
    /// at least the compute capability the PTX was generated for (`sm_80`: 8.0), or exactly
    /// it for architecture-specific PTX (`sm_90a`: 9.0 alone).
    pub fn check_gpu_target(&self) -> Result<()> {
        let t = &self.manifest.target;
        let bad = |reason: String| RuntimeError::Artifact {
            path: self.dir.clone(),
            reason,
        };
        if t.kind != "ptx" {
            return Err(bad(format!("its target is `{}`, not `ptx`", t.kind)));
        }
        if gpu_arch_runs_on(&t.cpu, (0, 0)).is_none() {
            return Err(bad(format!("unknown GPU architecture `{}`", t.cpu)));
        }
        let (name, (major, minor)) = crate::gpu::device_info()?;
        if gpu_arch_runs_on(&t.cpu, (major, minor)) != Some(true) {
            return Err(bad(format!(
                "compiled for {} but this GPU ({name}) is sm_{major}{minor}",
                t.cpu
            )));
        }
        Ok(())
    }

    /// Checks that this machine can run the CPU payload: the architecture, and every
    /// feature the code may use that the runtime can detect.
    pub fn check_cpu_target(&self) -> Result<()> {
        let t = &self.manifest.target;
        let bad = |reason: String| RuntimeError::Artifact {
            path: self.dir.clone(),
            reason,
        };
        if t.kind != "cpu" {
            return Err(bad(format!(
                "its target is `{}`, not `cpu`: run it with the matching backend",
                t.kind
            )));
        }
        if t.arch != std::env::consts::ARCH {
            return Err(bad(format!(
                "compiled for {} ({}), this machine is {}",
                t.arch,
                t.cpu,
                std::env::consts::ARCH
            )));
        }
        let missing: Vec<&str> = t
            .features
            .iter()
            .filter(|f| host_has(f) == Some(false))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(bad(format!(
                "compiled for CPU `{}`, which has {}; this CPU does not: recompile for it (`--cpu native`)",
                t.cpu,
                missing.join(", ")
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::gpu_arch_runs_on;

    #[test]
    fn ptx_runs_on_its_architecture_and_later_ones_and_sm_90a_on_sm_90_alone() {
        assert_eq!(gpu_arch_runs_on("sm_80", (8, 0)), Some(true));
        assert_eq!(gpu_arch_runs_on("sm_80", (9, 0)), Some(true));
        assert_eq!(gpu_arch_runs_on("sm_86", (8, 0)), Some(false));
        assert_eq!(gpu_arch_runs_on("sm_90a", (9, 0)), Some(true));
        assert_eq!(gpu_arch_runs_on("sm_90a", (8, 9)), Some(false));
        assert_eq!(gpu_arch_runs_on("sm_90a", (10, 0)), Some(false));
        assert_eq!(gpu_arch_runs_on("sm_9x", (9, 0)), None);
        assert_eq!(gpu_arch_runs_on("compute_90", (9, 0)), None);
    }
}
