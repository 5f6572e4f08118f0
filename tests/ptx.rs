//! The GPU backend without a GPU: the PTX of SmolLM2-135M's `step` and AdamW `train_step`
//! assembles with NVIDIA's `ptxas` for sm_80 and sm_90, a few kernels' PTX is snapshotted, `egret compile --target
//! ptx` writes an artifact, and `--backend gpu` without a CUDA driver is one clear error.
//! With a GPU, generation on it equals the CPU's.

mod common;

use common::{egret_err, egret_ok, fixture, TempDir};
use egret_backends::ptx::PtxOptions;

fn ptx_of(ir: &str) -> String {
    let g = egret_ir::parse(ir).unwrap();
    egret::gpu::compile_graphs(&[&g], &PtxOptions::default(), false)
        .unwrap()
        .0
}

/// Both flavours: f32, and bf16 on tensor cores (its matmuls and, head size 64, its prompt
/// attention on `mma.sync`, with `ldmatrix`).
#[test]
fn smollm2_step_ptx_assembles_for_sm80_and_sm90() {
    let cfg = egret_models::presets::preset("smollm2-135m").unwrap();
    for (arch, tensor_cores, tma) in [
        ("sm_80", false, false),
        ("sm_90", false, false),
        ("sm_80", true, false),
        ("sm_90", true, false),
        ("sm_90a", true, false),
        ("sm_90a", true, true),
    ] {
        let t = TempDir::new(&format!("smollm2-ptx-{arch}-{tensor_cores}-{tma}"));
        let opts = PtxOptions {
            arch: arch.into(),
            tensor_cores,
            tma,
        };
        let dir = egret::gpu::compile_artifact(&cfg, "default", &opts, &t.0.join("a")).unwrap();
        let art = egret_runtime::Artifact::load(&dir).unwrap();
        assert_eq!(art.manifest().target.kind, "ptx");
        assert_eq!(art.manifest().target.cpu, arch);
        let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
        assert!(ptx.contains(&format!(".target {arch}")), "{arch}");
        for op in ["mma.sync", "ldmatrix", "cp.async.cg.shared.global"] {
            assert_eq!(ptx.contains(op), tensor_cores, "{arch} {op}");
        }
        for op in ["wgmma.mma_async", "wgmma.wait_group"] {
            assert_eq!(ptx.contains(op), arch == "sm_90a", "{arch} {op}");
        }
        for op in [
            "tensormap.replace",
            "tensormap.cp_fenceproxy",
            "cp.async.bulk.tensor",
            "mbarrier.try_wait.parity",
        ] {
            assert_eq!(ptx.contains(op), tma, "{arch} {op}");
        }
        common::assemble_ptx("smollm2 step", &ptx, arch);
    }
}

#[test]
fn smollm2_training_step_ptx_assembles_for_sm80_and_sm90() {
    let cfg = egret_models::presets::preset("smollm2-135m").unwrap();
    for arch in ["sm_80", "sm_90"] {
        let t = TempDir::new(&format!("smollm2-train-ptx-{arch}"));
        let opts = PtxOptions {
            arch: arch.into(),
            ..PtxOptions::default()
        };
        let dir = egret::train::compile_train_artifact_ptx(
            &cfg,
            "default",
            &opts,
            &egret::train::AdamW::default(),
            egret::train::TrainEntries::StepAndGrads,
            None,
            &t.0.join("a"),
        )
        .unwrap();
        let art = egret_runtime::Artifact::load(&dir).unwrap();
        assert_eq!(art.manifest().mode, "training");
        let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
        common::assemble_ptx("smollm2 train_step", &ptx, arch);
    }
}

/// `[M, K]·[K, N]` over element type `DT` (replaced by each test).
const MATMUL_IR: &str = r#"graph mm {
  %a = input "a" : DT[M, K]
  %w = input "w" : DT[K, N]
  %y = matmul(%a, %w) : DT[M, N]
  output "y" = %y
}"#;

/// Causal attention over `T` positions, `heads` heads of size `d`, element type `DT`.
fn attention_ir(heads: usize, d: usize, scale: f64) -> String {
    let t = format!("DT[1, {heads}, T, {d}]");
    format!(
        "graph at {{\n  %q = input \"q\" : {t}\n  %k = input \"k\" : {t}\n  \
         %v = input \"v\" : {t}\n  %pos = iota[axis=1] : i64[1, T]\n  \
         %o = fused_attention[scale={scale}](%q, %k, %v, %pos) : {t}\n  output \"o\" = %o\n}}"
    )
}

/// GPU launches of the large matmul and prompt attention start one block per tile of their
/// tiled kernels (no empty blocks dispatched after the work): 128 × 256 tiles on sm_90a's
/// `wgmma` (bf16 operands), 128 × 128 elsewhere, 128 query rows per head; matmuls with few
/// rows or tiles a block per 4 rows × 32 columns; decode-sized attention a block per row.
#[test]
fn tiled_kernels_launch_one_block_per_tile() {
    let matmul = MATMUL_IR;
    let attention = attention_ir(16, 128, 0.088);
    let attention = attention.as_str();
    let blocks = |ir: &str, dt: &str, arch: &str, binds: &[(&str, i64)]| -> u32 {
        let g = egret_ir::parse(&ir.replace("DT", dt)).unwrap();
        let opts = PtxOptions {
            arch: arch.into(),
            tensor_cores: true,
            tma: false,
        };
        let (_, plans) = egret::gpu::compile_graphs(&[&g], &opts, false).unwrap();
        let plan = &plans[0];
        let syms: Vec<i64> = plan
            .symbols
            .iter()
            .map(|s| binds.iter().find(|(n, _)| n == s).unwrap().1)
            .collect();
        let big = plan
            .kernels
            .iter()
            .find(|k| k.what.starts_with("matmul") || k.what.starts_with("attention"))
            .unwrap_or_else(|| {
                panic!(
                    "{:?}",
                    plan.kernels.iter().map(|k| &k.what).collect::<Vec<_>>()
                )
            });
        big.gpu_blocks(&syms)
    };
    let cube = [("M", 4096), ("N", 4096), ("K", 4096)];
    assert_eq!(blocks(matmul, "bf16", "sm_90a", &cube), 32 * 16);
    assert_eq!(blocks(matmul, "bf16", "sm_80", &cube), 32 * 32);
    assert_eq!(blocks(matmul, "f32", "sm_90a", &cube), 32 * 32);
    // (4 × 4 large tiles, too few: 8 × 8 small ones; with 8 × 4 small ones too few again, the
    // row kernel, a block per 4 rows × 32 columns)
    let thin = [("M", 500), ("N", 512), ("K", 64)];
    assert_eq!(blocks(matmul, "bf16", "sm_90a", &thin), 8 * 8);
    assert_eq!(blocks(matmul, "f32", "sm_80", &thin), 8 * 8);
    let thinner = [("M", 500), ("N", 256), ("K", 64)];
    assert_eq!(blocks(matmul, "bf16", "sm_90a", &thinner), 125 * 8);
    let decode = [("M", 1), ("N", 49152), ("K", 576)];
    assert_eq!(blocks(matmul, "f32", "sm_80", &decode), 1536);
    let t = |t: i64| [("T", t)];
    assert_eq!(blocks(attention, "bf16", "sm_90a", &t(4096)), 16 * 32);
    assert_eq!(blocks(attention, "f32", "sm_80", &t(4000)), 16 * 32);
    // (decode-sized: a block per query row)
    assert_eq!(blocks(attention, "bf16", "sm_90a", &t(20)), 16 * 20);
    assert_eq!(blocks(attention, "f32", "sm_80", &t(20)), 16 * 20);
}

/// A sum over a matrix's rows launches a block per 32 outputs from 32 rows (and a thread per
/// output below), however short the outputs' last axis, and an elementwise kernel that
/// transposes a block per 32 × 32 tile.
#[test]
fn column_sums_and_transposes_launch_a_block_per_group_or_tile() {
    let g = egret_ir::parse(
        r#"graph g {
  %x = input "x" : f32[T, 576]
  %s = reduce_sum[axis=0](%x) : f32[1, 576]
  %y = input "y" : f32[T, 40, 3]
  %m = reduce_max[axis=1](%y) : f32[T, 1, 3]
  output "m" = %m
  %u = input "u" : f32[576, T]
  %ut = permute[perm=[1, 0]](%u) : f32[T, 576]
  %e = exp(%ut) : f32[T, 576]
  output "s" = %s
  output "e" = %e
}"#,
    )
    .unwrap();
    let (_, plans) = egret::gpu::compile_graphs(&[&g], &PtxOptions::default(), false).unwrap();
    let plan = &plans[0];
    let blocks = |what: &str, t: i64| -> u32 {
        let k = plan
            .kernels
            .iter()
            .find(|k| k.what.starts_with(what))
            .unwrap_or_else(|| {
                panic!(
                    "{what}: {:?}",
                    plan.kernels.iter().map(|k| &k.what).collect::<Vec<_>>()
                )
            });
        k.gpu_blocks(&[t])
    };
    assert_eq!(plan.symbols, ["T"]);
    assert_eq!(blocks("reduce_sum", 256), 576 / 32);
    assert_eq!(blocks("reduce_sum", 31), 576_u32.div_ceil(256));
    // (`T × 3` outputs, their last axis 3 long: a block per 32 of them)
    assert_eq!(blocks("reduce_max", 256), (256 * 3) / 32);
    assert_eq!(blocks("reduce_max", 11), 2);
    assert_eq!(blocks("elementwise", 256), (256 / 32) * (576 / 32));
    assert_eq!(blocks("elementwise", 33), 2 * (576 / 32));
}

/// Attention off tensor-core tiles takes a block per query row below 2048 rows (its warps
/// splitting the row's keys), and a warp per row (eight rows a block) from there.
#[test]
fn attention_off_its_tiles_takes_a_block_per_row_below_2048_rows() {
    let g = egret_ir::parse(&attention_ir(16, 64, 0.125).replace("DT", "f32")).unwrap();
    let (_, plans) = egret::gpu::compile_graphs(&[&g], &PtxOptions::default(), false).unwrap();
    let k = plans[0]
        .kernels
        .iter()
        .find(|k| k.what.starts_with("attention"))
        .unwrap();
    assert_eq!(k.gpu_blocks(&[1]), 16);
    assert_eq!(k.gpu_blocks(&[127]), 16 * 127);
    assert_eq!(k.gpu_blocks(&[128]), 16 * 128 / 8);
    assert_eq!(k.gpu_blocks(&[2000]), 16 * 2000 / 8);
}

/// A matmul that may split k (a constant k of 512 or more) is followed by the sum of its
/// slices, which is launched only where the matmul splits: with more than 32 rows and too few
/// tiles of either size (`[256 × 576]·[576 × 576]`: 36 of 64 × 64), not for decode or for
/// enough tiles.
#[test]
fn a_split_k_sum_is_launched_only_where_its_matmul_splits() {
    let g = egret_ir::parse(
        r#"graph mm {
  %a = input "a" : f32[M, 576]
  %w = input "w" : f32[576, 576]
  %y = matmul(%a, %w) : f32[M, 576]
  output "y" = %y
}"#,
    )
    .unwrap();
    for tensor_cores in [false, true] {
        let opts = PtxOptions {
            arch: "sm_90a".into(),
            tensor_cores,
            tma: false,
        };
        let (_, plans) = egret::gpu::compile_graphs(&[&g], &opts, false).unwrap();
        let call = |what: &str| {
            plans[0]
                .kernels
                .iter()
                .find(|k| k.what.starts_with(what))
                .unwrap_or_else(|| panic!("no {what} in {:?}", plans[0].kernels))
        };
        let (product, sum) = (call("matmul [][Mx576]"), call("matmul split-k sum"));
        let at = |k: &egret_runtime::plan::KernelCall, m: i64| k.gpu_launch(&[m]).blocks;
        // 4 × 9 tiles of 64 × 64, 8 slices each; the sum a thread per output
        assert_eq!(at(product, 256), 4 * 9 * 8);
        assert_eq!(at(sum, 256), 256 * 3);
        for m in [1, 32, 2000] {
            assert_eq!(at(sum, m), 0, "M = {m}");
            assert!(at(product, m) > 0, "M = {m}");
        }
    }
}

/// Tensor-core matmuls and attention launch a light entry point off their large tiles
/// (`KernelCall::light`): the kernel without the tile path, whose 230-255 registers and
/// shared-memory ring would hold the small tiles, row blocks and decode attention at one
/// block an SM. It has no tensor-core instructions, no dynamic shared memory, at most 128
/// registers (two blocks an SM) and no spills; f32 kernels have none.
#[test]
fn heavy_kernels_launch_a_light_entry_point_off_their_tiles() {
    let matmul = MATMUL_IR;
    let attention = attention_ir(4, 64, 0.125);
    let attention = attention.as_str();
    for (arch, dt, tensor_cores) in [
        ("sm_90a", "bf16", true),
        ("sm_80", "bf16", true),
        ("sm_80", "f32", true),
        ("sm_90", "f32", false),
    ] {
        for (ir, big, small) in [
            (matmul, [("M", 4096), ("N", 4096)], [("M", 500), ("N", 512)]),
            (attention, [("T", 4096), ("N", 0)], [("T", 20), ("N", 0)]),
        ] {
            let g = egret_ir::parse(&ir.replace("DT", dt)).unwrap();
            let opts = PtxOptions {
                arch: arch.into(),
                tensor_cores,
                tma: false,
            };
            let (ptx, plans) = egret::gpu::compile_graphs(&[&g], &opts, false).unwrap();
            let call = plans[0]
                .kernels
                .iter()
                .find(|k| k.what.starts_with("matmul") || k.what.starts_with("attention"))
                .unwrap();
            let Some(light) = &call.light else {
                assert!(
                    !tensor_cores,
                    "{arch} {dt}: {} has no light entry",
                    call.what
                );
                assert!(!ptx.contains("_light"), "{arch} {dt}");
                continue;
            };
            assert!(tensor_cores, "{arch} {dt}");
            let syms = |binds: &[(&str, i64)]| -> Vec<i64> {
                plans[0]
                    .symbols
                    .iter()
                    .map(|s| binds.iter().find(|(n, _)| n == s).map_or(64, |b| b.1))
                    .collect()
            };
            assert!(!call.gpu_launch(&syms(&big)).light, "{arch} {dt}");
            assert!(call.gpu_launch(&syms(&small)).light, "{arch} {dt}");
            assert_eq!(light.shared_bytes, 0);
            assert!(call.shared_bytes > 0, "{arch} {dt}");
            // The light entry's PTX: up to the next entry point.
            let start = ptx.find(&format!(".entry {}(", light.symbol)).unwrap();
            let text = &ptx[start..];
            let text = &text[..text[1..].find(".entry").map_or(text.len(), |e| e + 1)];
            for op in ["mma.sync", "wgmma", "ldmatrix", "egret_dynamic_shared"] {
                assert!(!text.contains(op), "{arch} {dt}: {op} in {}", light.symbol);
            }
            let report = common::ptxas_report("light entry", &ptx, arch);
            let of = |name: &str| &report.iter().find(|(n, _)| n == name).unwrap().1;
            let regs = |r: &str| -> u32 {
                let used = r.split("Used ").nth(1).unwrap();
                used.split(' ').next().unwrap().parse().unwrap()
            };
            let r = of(&light.symbol);
            assert!(regs(r) <= 128, "{arch} {dt} {}: {r}", light.symbol);
            assert!(r.contains(" 0 bytes spill stores"), "{arch} {dt}: {r}");
            let heavy = of(&call.symbol);
            assert!(regs(heavy) > 128, "{arch} {dt} {}: {heavy}", call.symbol);
        }
    }
}

/// The tensor-core matmul's and attention's entry points ask for no more shared memory
/// (static, as ptxas reports it, and the dynamic bytes they are launched with) than a block
/// may have on each architecture: 163 KiB on sm_80, 99 KiB on sm_86 and sm_89, 227 KiB on
/// sm_90.
#[test]
fn tensor_core_kernels_fit_each_architectures_shared_memory() {
    let attention = attention_ir(16, 128, 0.088);
    for (arch, limit, tma) in [
        ("sm_80", 163 * 1024, false),
        ("sm_86", 99 * 1024, false),
        ("sm_89", 99 * 1024, false),
        ("sm_90a", 227 * 1024, false),
        ("sm_90a", 227 * 1024, true),
    ] {
        for ir in [MATMUL_IR, attention.as_str()] {
            let g = egret_ir::parse(&ir.replace("DT", "bf16")).unwrap();
            let opts = PtxOptions {
                arch: arch.into(),
                tensor_cores: true,
                tma,
            };
            let (ptx, plans) = egret::gpu::compile_graphs(&[&g], &opts, false).unwrap();
            let report = common::ptxas_report("shared memory", &ptx, arch);
            let static_bytes = |name: &str| -> u32 {
                let r = &report.iter().find(|(n, _)| n == name).unwrap().1;
                r.split(" bytes smem")
                    .next()
                    .filter(|_| r.contains(" bytes smem"))
                    .map_or(0, |before| {
                        before.rsplit(' ').next().unwrap().parse().unwrap()
                    })
            };
            for call in &plans[0].kernels {
                for light in [false, true] {
                    if light && call.light.is_none() {
                        continue;
                    }
                    let (symbol, dynamic) = call.gpu_entry(light);
                    let total = static_bytes(symbol) + dynamic;
                    assert!(
                        total <= limit,
                        "{arch} {symbol}: {total} bytes of shared memory, over {limit}"
                    );
                }
            }
        }
    }
}

#[test]
fn ptx_snapshots() {
    insta::assert_snapshot!(
        "swiglu_elementwise",
        ptx_of(
            r#"graph swiglu {
  %g = input "g" : f32[N, 8]
  %u = input "u" : f32[N, 8]
  %s = swiglu(%g, %u) : f32[N, 8]
  output "s" = %s
}"#
        )
    );
    insta::assert_snapshot!(
        "matmul",
        ptx_of(
            r#"graph mm {
  %a = input "a" : f32[M, 64]
  %w = param "w" : f32[64, 32]
  %y = matmul(%a, %w) : f32[M, 32]
  output "y" = %y
}"#
        )
    );
    insta::assert_snapshot!(
        "rms_norm",
        ptx_of(
            r#"graph rn {
  %x = input "x" : f32[N, 16]
  %w = param "w" : f32[16]
  %y = rms_norm[eps=1e-5](%x, %w) : f32[N, 16]
  output "y" = %y
}"#
        )
    );
}

#[test]
fn compile_target_ptx_writes_an_artifact() {
    let t = TempDir::new("compile-ptx");
    let d = fixture("tiny/gqa_untied");
    let out = t.0.join("m.egret");
    let line = egret_ok(&[
        "compile",
        d.to_str().unwrap(),
        "--target",
        "ptx",
        "--gpu-arch",
        "sm_90",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(line.trim(), out.to_str().unwrap());
    let art = egret_runtime::Artifact::load(&out).unwrap();
    assert_eq!(art.manifest().target.kind, "ptx");
    assert_eq!(art.manifest().payloads[0].file, "kernels.ptx");
    // An artifact runs only on the backend it was compiled for.
    let e = egret_err(&[
        "generate",
        d.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--backend",
        "cpu",
        "--artifact",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("not `cpu`: run it with --backend gpu"), "{e}");
    let cpu_art = t.0.join("c.egret");
    egret_ok(&[
        "compile",
        d.to_str().unwrap(),
        "-o",
        cpu_art.to_str().unwrap(),
    ]);
    let e = egret_err(&[
        "generate",
        d.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--backend",
        "gpu",
        "--artifact",
        cpu_art.to_str().unwrap(),
    ]);
    assert!(e.contains("not `ptx`: run it with --backend cpu"), "{e}");
    let e = egret_err(&[
        "compile",
        d.to_str().unwrap(),
        "--target",
        "ptx",
        "--gpu-arch",
        "sm_70",
        "-o",
        t.0.join("x").to_str().unwrap(),
    ]);
    assert!(e.contains("unknown GPU architecture `sm_70`"), "{e}");
    assert!(!t.0.join("x").exists());
}

#[test]
fn gpu_backend_generates_like_the_cpu_or_says_there_is_no_gpu() {
    let d = fixture("tiny/gqa_untied");
    let args = |backend: &'static str| {
        vec![
            "generate",
            d.to_str().unwrap(),
            "--tokens",
            "1,5,9,3",
            "--max-new-tokens",
            "12",
            "--backend",
            backend,
            "--json",
        ]
    };
    if egret_runtime::gpu::gpu_available().is_err() {
        let e = egret_err(&args("gpu"));
        assert!(e.contains("no CUDA driver"), "{e}");
        eprintln!("skipped generating on the GPU: no CUDA driver");
        return;
    }
    let ids = |out: String| {
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["ids"].clone()
    };
    assert_eq!(ids(egret_ok(&args("gpu"))), ids(egret_ok(&args("cpu"))));
}
