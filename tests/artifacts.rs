//! Compiled artifacts: `egret compile` writes one, `--artifact`, the Rust example and the C
//! example run it with the same greedy ids as `egret generate`; the compile cache is reused;
//! damaged or foreign artifacts are refused with one clear error; the runtime's dependency
//! tree holds no compiler crate.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{egret_err, egret_ok, fixture, smollm2_gguf, Rng, TempDir};
use egret_runtime::artifact::{Manifest, MANIFEST};

fn profile_dir() -> PathBuf {
    // target/<profile>/deps/<test binary>
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo(args: &[&str]) {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args).current_dir(common::root());
    if !cfg!(debug_assertions) {
        c.arg("--release");
    }
    let out = c.output().expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ids_of(json: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

const PROMPT: &str = "504,3575,282,4649,314";

#[test]
fn runtime_depends_on_no_compiler_crate() {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "tree",
            "-p",
            "egret-runtime",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(common::root())
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(tree.contains("egret-runtime"), "{tree}");
    for banned in [
        "inkwell",
        "llvm-sys",
        "egg ",
        "egret-passes",
        "egret-backends",
        "egret-ir",
    ] {
        assert!(
            !tree
                .lines()
                .any(|l| l.starts_with(banned.trim()) && l[banned.trim().len()..].starts_with(' ')),
            "egret-runtime depends on {banned}:\n{tree}"
        );
    }
}

#[test]
fn smollm2_artifact_runs_from_the_cli_the_rust_example_and_c() {
    let gguf = smollm2_gguf();
    let g = gguf.to_str().unwrap();
    let t = TempDir::new("art-smollm2");
    let art = t.0.join("smollm2.egret");
    let a = art.to_str().unwrap();
    let printed = egret_ok(&["compile", g, "--target", "cpu", "-o", a]);
    assert_eq!(printed.trim(), a);
    let want = ids_of(&egret_ok(&[
        "generate",
        g,
        "--tokens",
        PROMPT,
        "--max-new-tokens",
        "12",
        "--json",
        "--no-cache",
    ]));
    assert_eq!(want.len(), 12);
    let got = ids_of(&egret_ok(&[
        "generate",
        g,
        "--tokens",
        PROMPT,
        "--max-new-tokens",
        "12",
        "--json",
        "--artifact",
        a,
    ]));
    assert_eq!(got, want, "--artifact");

    // The Rust example: only egret-runtime.
    cargo(&["build", "--example", "embed"]);
    let out = Command::new(profile_dir().join("examples/embed"))
        .args([a, g, "12", PROMPT, "--ids"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ids_of(&String::from_utf8_lossy(&out.stdout)),
        want,
        "Rust example"
    );

    // The C example against libegret_runtime.so.
    cargo(&[
        "rustc",
        "-p",
        "egret-runtime",
        "--lib",
        "--crate-type",
        "cdylib",
    ]);
    let lib = profile_dir();
    let exe = t.0.join("generate_c");
    let cc = Command::new("cc")
        .arg(common::root().join("examples/c/generate.c"))
        .arg("-I")
        .arg(common::root().join("runtime/include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-legret_runtime")
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        cc.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let mut args = vec![a.to_string(), g.to_string(), "12".into()];
    args.extend(PROMPT.split(',').map(str::to_string));
    let out = Command::new(&exe).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c_ids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(c_ids, want, "C example");
    // The C ABI reports errors instead of crashing.
    let out = Command::new(&exe)
        .args([t.0.join("nothing").to_str().unwrap(), g, "3", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("manifest.json"));
}

#[test]
fn the_compile_cache_is_reused_and_bypassed_on_request() {
    let t = TempDir::new("art-cache");
    let model = fixture("tiny/gqa_untied");
    let m = model.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            m,
            "--tokens",
            "3,17,0",
            "--max-new-tokens",
            "4",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_egret"))
            .args(&args)
            .env("EGRET_CACHE", &t.0)
            .env("EGRET_PROFILE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let compiled = String::from_utf8_lossy(&out.stderr).contains("compile\tartifact");
        (ids_of(&String::from_utf8_lossy(&out.stdout)), compiled)
    };
    let entries = || std::fs::read_dir(t.0.join("artifacts")).map_or(0, |d| d.count());
    let (a, compiled) = run(&[]);
    assert!(compiled, "cold start compiles");
    assert_eq!(entries(), 1);
    let (b, compiled) = run(&[]);
    assert!(!compiled, "warm start reuses the cached artifact");
    assert_eq!(a, b);
    let (c, compiled) = run(&["--no-cache"]);
    assert!(compiled, "--no-cache compiles");
    assert_eq!(a, c);
    let (_, compiled) = run(&["--passes", "none"]);
    assert!(compiled, "other passes, other artifact");
    assert_eq!(entries(), 2);
}

/// Compiles the tiny GQA model once into `dir/good`.
fn tiny_artifact(dir: &Path) -> PathBuf {
    let art = dir.join("good");
    egret_ok(&[
        "compile",
        fixture("tiny/gqa_untied").to_str().unwrap(),
        "-o",
        art.to_str().unwrap(),
    ]);
    art
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn run_artifact(art: &Path, weights: &str) -> String {
    egret_err(&[
        "generate",
        weights,
        "--tokens",
        "3,17,0",
        "--max-new-tokens",
        "2",
        "--artifact",
        art.to_str().unwrap(),
    ])
}

#[test]
fn bad_artifacts_are_refused_with_one_clear_error() {
    let t = TempDir::new("art-bad");
    let good = tiny_artifact(&t.0);
    let weights = fixture("tiny/gqa_untied");
    let w = weights.to_str().unwrap();
    // The good one runs.
    egret_ok(&[
        "generate",
        w,
        "--tokens",
        "3,17,0",
        "--max-new-tokens",
        "2",
        "--artifact",
        good.to_str().unwrap(),
    ]);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(good.join(MANIFEST)).unwrap()).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&Path)| {
        let d = t.0.join(name);
        copy_dir(&good, &d);
        edit(&d);
        d
    };
    let write_manifest = |d: &Path, m: &Manifest, rehash: bool| {
        let mut m = m.clone();
        if rehash {
            m.content_sha256 = m.content_hash();
        }
        std::fs::write(d.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
    };
    // A copy whose manifest is edited (and re-hashed, or not).
    let edited = |name: &str, f: &dyn Fn(&mut Manifest), rehash: bool| {
        variant(name, &|d| {
            let mut m = manifest.clone();
            f(&mut m);
            write_manifest(d, &m, rehash)
        })
    };
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "unknown format version",
            edited(
                "version",
                &|m| {
                    m.format_version = 99;
                },
                true,
            ),
            "format version 99 is not supported",
        ),
        (
            "one flipped byte in the payload",
            variant("flip", &|d| {
                let p = d.join("kernels.so");
                let mut b = std::fs::read(&p).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x20;
                std::fs::write(&p, b).unwrap();
            }),
            "SHA-256",
        ),
        (
            "another architecture",
            edited(
                "arch",
                &|m| {
                    m.target.arch = "riscv64".into();
                },
                true,
            ),
            "compiled for riscv64",
        ),
        (
            "a GPU target",
            edited(
                "ptx",
                &|m| {
                    m.target.kind = "ptx".into();
                },
                true,
            ),
            "its target is `ptx`, not `cpu`: run it with --backend gpu",
        ),
        (
            "missing payload",
            variant("missing", &|d| {
                std::fs::remove_file(d.join("kernels.so")).unwrap()
            }),
            "payload `kernels.so`",
        ),
        (
            "a plan edited without its hash",
            edited(
                "plan",
                &|m| {
                    m.entry_points[0].plan.kernels[0].args[0] = 0;
                    m.entry_points[0].plan.kernels.swap(1, 2);
                },
                false,
            ),
            "content_sha256",
        ),
        (
            "a plan naming a buffer it lacks",
            edited(
                "range",
                &|m| {
                    m.entry_points[0].plan.kernels[0].args[0] = 1_000_000;
                },
                true,
            ),
            "names buffer 1000000",
        ),
        (
            "a plan whose kernels are gone",
            edited(
                "no-kernels",
                &|m| {
                    m.entry_points[0].plan.kernels.clear();
                },
                true,
            ),
            "is computed by no kernel",
        ),
        (
            "a payload path outside the artifact",
            edited(
                "escape",
                &|m| {
                    m.payloads[0].file = "../good/kernels.so".into();
                    m.entry_points[0].payload = m.payloads[0].file.clone();
                },
                true,
            ),
            "not a plain file name",
        ),
    ];
    for (what, dir, want) in &cases {
        let line = run_artifact(dir, w);
        assert!(line.contains(want), "{what}: {line}");
    }
    // Through the library, a PTX target naming no GPU architecture is refused too.
    let ptx = egret_runtime::Artifact::load(t.0.join("ptx")).unwrap();
    let e = ptx.check_gpu_target().unwrap_err().to_string();
    assert!(e.contains("unknown GPU architecture `"), "{e}");
    // Truncated manifests.
    let text = std::fs::read(good.join(MANIFEST)).unwrap();
    for cut in [0, 1, 10, text.len() / 3, text.len() - 1] {
        let d = t.0.join(format!("cut{cut}"));
        copy_dir(&good, &d);
        std::fs::write(d.join(MANIFEST), &text[..cut]).unwrap();
        let line = run_artifact(&d, w);
        assert!(line.contains("manifest.json"), "cut at {cut}: {line}");
    }
    // Weights that do not fit: another model's.
    let other = fixture("tiny/odd_head_dim_mqa");
    let line = run_artifact(&good, other.to_str().unwrap());
    assert!(
        line.contains("shape") || line.contains("missing tensor"),
        "{line}"
    );
}

/// Random single-byte changes and truncations of a real manifest: loading gives an error or
/// (for bytes the load does not depend on) a valid artifact, never a panic.
#[test]
fn manifest_loader_survives_random_damage() {
    let t = TempDir::new("art-fuzz");
    let good = tiny_artifact(&t.0);
    let text = std::fs::read(good.join(MANIFEST)).unwrap();
    let d = t.0.join("fuzz");
    copy_dir(&good, &d);
    let mut rng = Rng(0x5eed);
    let mut refused = 0;
    for i in 0..400 {
        let mut b = text.clone();
        if i % 4 == 3 {
            b.truncate((rng.next() as usize) % b.len());
        } else {
            let at = (rng.next() as usize) % b.len();
            b[at] = (rng.next() & 0xff) as u8;
        }
        std::fs::write(d.join(MANIFEST), &b).unwrap();
        if egret_runtime::Artifact::load(&d).is_err() {
            refused += 1;
        }
    }
    assert!(
        refused > 300,
        "only {refused} of 400 damaged manifests refused"
    );
    // And the untouched one still loads.
    std::fs::write(d.join(MANIFEST), &text).unwrap();
    egret_runtime::Artifact::load(&d).unwrap();
}
