//! Fingerprints the compiler's sources into `EGRET_BUILD_ID`: the compile cache keys
//! artifacts by it, so an artifact compiled by other code is never reused.

use std::hash::{Hash, Hasher};
use std::path::Path;

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            visit(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

fn main() {
    let mut files = vec![];
    for d in [
        "ir/src",
        "models/src",
        "passes/src",
        "backends/src",
        "runtime/src",
        "src",
    ] {
        println!("cargo:rerun-if-changed={d}");
        visit(Path::new(d), &mut files);
    }
    files.push("Cargo.lock".into());
    println!("cargo:rerun-if-changed=Cargo.lock");
    files.sort();
    // DefaultHasher::new() uses fixed keys: the same sources give the same id.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in &files {
        f.hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    println!("cargo:rustc-env=EGRET_BUILD_ID={:016x}", h.finish());
}
