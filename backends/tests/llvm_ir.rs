//! LLVM IR of a few kernels after O3 for a fixed CPU (`x86-64-v3`), as insta snapshots, so
//! changes in generated code are reviewed.

use egret_backends::kernel::PanelType;
use egret_backends::llvm::{optimized_ir, panel_width};
use egret_backends::schedule::{schedule_with, ScheduleOptions};

const CPU: &str = "x86-64-v3";

fn ir_of(src: &str) -> String {
    let g = egret_ir::parse(src).unwrap();
    let prog = schedule_with(
        &g,
        ScheduleOptions {
            panel: panel_width(CPU),
            weights: PanelType::F32,
            ..Default::default()
        },
    )
    .unwrap();
    let text = optimized_ir(&prog, CPU).unwrap();
    // Keep the function bodies; drop the module header (target triple, datalayout, ids).
    text.lines()
        .filter(|l| {
            !l.starts_with("; ModuleID")
                && !l.starts_with("source_filename")
                && !l.starts_with("target ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn gemm_with_packed_weights() {
    let ir = ir_of("graph mv {\n  %x = input \"x\" : f32[T, 64]\n  %w = param \"w\" : f32[32, 64]\n  %wt = permute[perm=[1, 0]](%w) : f32[64, 32]\n  %y = matmul(%x, %wt) : f32[T, 32]\n  output \"y\" = %y\n}");
    assert!(
        ir.contains("@llvm.fma.v8f32"),
        "the micro-kernel should use vector FMA:\n{ir}"
    );
    insta::assert_snapshot!(ir);
}

#[test]
fn activation_matmul_kernel() {
    // Both operands computed at run time: the micro-kernel over slices of the right operand
    // packed as the kernel goes.
    let ir = ir_of("graph mm {\n  %a = input \"a\" : f32[T, 64]\n  %b = input \"b\" : f32[64, T]\n  %bt = permute[perm=[1, 0]](%b) : f32[T, 64]\n  %c = permute[perm=[1, 0]](%bt) : f32[64, T]\n  %y = matmul(%a, %c) : f32[T, T]\n  output \"y\" = %y\n}");
    assert!(
        ir.contains("@llvm.fma.v8f32"),
        "the micro-kernel should use vector FMA:\n{ir}"
    );
    insta::assert_snapshot!(ir);
}

#[test]
fn fused_elementwise_kernel() {
    let ir = ir_of("graph ew {\n  %a = input \"a\" : f32[T, 64]\n  %b = input \"b\" : f32[T, 64]\n  %s = swiglu(%a, %b) : f32[T, 64]\n  %c = const[value=2.0] : f32[T, 64]\n  %y = mul(%s, %c) : f32[T, 64]\n  output \"y\" = %y\n}");
    insta::assert_snapshot!(ir);
}

/// The GPU's schedule folds a residual add into the matmul before it when the product has
/// no other use (one kernel, `+ residual`), and keeps the add when it has.
#[test]
fn gpu_schedule_folds_residual_adds_into_matmuls() {
    let describe = |src: &str| -> Vec<String> {
        let g = egret_ir::parse(src).unwrap();
        let prog = schedule_with(
            &g,
            egret_backends::ptx::schedule_options(&Default::default()),
        )
        .unwrap();
        prog.kernels.iter().map(|k| k.describe()).collect()
    };
    let folded = describe(
        "graph r {\n  %x = input \"x\" : f32[T, 8]\n  %w = param \"w\" : f32[8, 8]\n  %y = matmul(%x, %w) : f32[T, 8]\n  %z = add(%x, %y) : f32[T, 8]\n  output \"z\" = %z\n}",
    );
    assert_eq!(folded, ["matmul [][Tx8]·[8x8] + residual"], "{folded:?}");
    let kept = describe(
        "graph r {\n  %x = input \"x\" : f32[T, 8]\n  %w = param \"w\" : f32[8, 8]\n  %y = matmul(%x, %w) : f32[T, 8]\n  %z = add(%x, %y) : f32[T, 8]\n  output \"z\" = %z\n  output \"y\" = %y\n}",
    );
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(!kept[0].contains("residual"), "{kept:?}");
}

/// The GPU's schedule gives a matmul with a constant k of at least `SPLIT_K_MIN_K` (512) a
/// sum after it (the kernel may split k), which takes a folded residual too; a shorter or
/// symbolic k, or a product of parameters alone (made once at load), gets none.
#[test]
fn gpu_schedule_lets_long_k_matmuls_split() {
    // `y = x·w`, `x: [rows, k]` and `w: [k, 8]` inputs or parameters, then `tail`.
    let describe = |(rows, k): (&str, &str), (x, w): (&str, &str), tail: &str| -> Vec<String> {
        let src = format!(
            "graph s {{\n  %x = {x} \"x\" : f32[{rows}, {k}]\n  %w = {w} \"w\" : f32[{k}, 8]\n  \
             %y = matmul(%x, %w) : f32[{rows}, 8]\n{tail}}}"
        );
        let g = egret_ir::parse(&src).unwrap();
        let prog = schedule_with(
            &g,
            egret_backends::ptx::schedule_options(&Default::default()),
        )
        .unwrap();
        prog.kernels.iter().map(|k| k.describe()).collect()
    };
    let out = "  output \"y\" = %y\n";
    let run = ("input", "param");
    assert_eq!(
        describe(("T", "4096"), run, out),
        [
            "matmul [][Tx4096]·[4096x8] (may split k)",
            "matmul split-k sum [][Tx8]"
        ]
    );
    let res = "  %r = input \"r\" : f32[T, 8]\n  %z = add(%y, %r) : f32[T, 8]\n  \
               output \"z\" = %z\n";
    assert_eq!(
        describe(("T", "4096"), run, res),
        [
            "matmul [][Tx4096]·[4096x8] + residual (may split k)",
            "matmul split-k sum [][Tx8] + residual"
        ]
    );
    assert_eq!(
        describe(("T", "512"), run, out),
        [
            "matmul [][Tx512]·[512x8] (may split k)",
            "matmul split-k sum [][Tx8]"
        ]
    );
    assert_eq!(
        describe(("T", "511"), run, out),
        ["matmul [][Tx511]·[511x8]"]
    );
    assert_eq!(
        describe(("T", "K"), ("input", "input"), out),
        ["matmul [][TxK]·[Kx8]"]
    );
    // A fused norm, its weight folded into the weights at load or not.
    let norm = |w: &str| {
        let src = format!(
            "graph s {{\n  %x = input \"x\" : f32[T, 512]\n  %g = param \"g\" : f32[512]\n  \
             %w = {w} \"w\" : f32[512, 8]\n  \
             %y = rms_norm_matmul[eps=1e-5](%x, %g, %w) : f32[T, 8]\n  output \"y\" = %y\n}}"
        );
        let g = egret_ir::parse(&src).unwrap();
        let opts = egret_backends::ptx::schedule_options(&Default::default());
        let prog = schedule_with(&g, opts).unwrap();
        prog.kernels
            .iter()
            .map(|k| k.describe())
            .collect::<Vec<_>>()
    };
    for w in ["param", "input"] {
        let ks = norm(w);
        assert_eq!(
            ks[ks.len() - 2..],
            [
                "rms_norm_matmul [][Tx512]·[512x8] (may split k)",
                "matmul split-k sum [][Tx8]"
            ],
            "{w}: {ks:?}"
        );
    }
    // (both parameters: the product is made once, at load)
    let at_load = describe(("16", "4096"), ("param", "param"), out).join("; ");
    assert!(at_load.contains("matmul"), "{at_load}");
    assert!(!at_load.contains("split"), "{at_load}");
}

/// With tensor cores the GPU's schedule stores matmul operands bf16 where it can: a computed
/// left operand by the kernel computing it, a weight by a copy made once at load, a graph
/// input declared bf16 whose only use is the matmul as it is given; an f32 input (which
/// other kernels may read) and the left operand of a fused norm stay f32.
#[test]
fn tensor_core_schedule_stores_matmul_operands_bf16() {
    use egret_runtime::plan::{BufferRole, ElemType};
    let schedule = |src: &str, tensor_cores: bool| {
        let g = egret_ir::parse(src).unwrap();
        let opts = egret_backends::ptx::PtxOptions {
            tensor_cores,
            ..Default::default()
        };
        schedule_with(&g, egret_backends::ptx::schedule_options(&opts)).unwrap()
    };
    let bf16_roles = |prog: &egret_backends::kernel::Program| -> Vec<BufferRole> {
        prog.buffers
            .iter()
            .filter(|b| b.elem == ElemType::BF16)
            .map(|b| b.role.clone())
            .collect()
    };
    let computed = "graph c {\n  %x = input \"x\" : f32[T, 8]\n  %a = neg(%x) : f32[T, 8]\n  %w = param \"w\" : f32[8, 16]\n  %y = matmul(%a, %w) : f32[T, 16]\n  %v = param \"v\" : f32[16, 4]\n  %z = matmul(%y, %v) : f32[T, 4]\n  output \"z\" = %z\n}";
    let bf16 = bf16_roles(&schedule(computed, true));
    // neg(x) as it is computed, and the two weights' copies at load; `y` (stored f32 by its
    // matmul) is read as it is.
    assert_eq!(bf16.len(), 3, "{bf16:?}");
    assert_eq!(
        bf16.iter().filter(|r| **r == BufferRole::Init).count(),
        2,
        "{bf16:?}"
    );
    assert!(bf16_roles(&schedule(computed, false)).is_empty());
    let inputs = "graph i {\n  %a = input \"a\" : bf16[T, 8]\n  %w = input \"w\" : bf16[8, 16]\n  %y = matmul(%a, %w) : bf16[T, 16]\n  %f = input \"f\" : bf16[T, 16]\n  %g = neg(%f) : bf16[T, 16]\n  output \"y\" = %y\n  output \"g\" = %g\n}";
    let prog = schedule(inputs, true);
    let elem_of = |name: &str| {
        prog.buffers
            .iter()
            .find(|b| b.role == BufferRole::Input(name.into()))
            .map(|b| b.elem)
    };
    assert_eq!(elem_of("a"), Some(ElemType::BF16));
    assert_eq!(elem_of("w"), Some(ElemType::BF16));
    assert_eq!(elem_of("f"), Some(ElemType::F32));
    let fused = "graph n {\n  %x = input \"x\" : f32[T, 8]\n  %g = param \"g\" : f32[8]\n  %w = param \"w\" : f32[8, 16]\n  %y = rms_norm_matmul[eps=1e-5](%x, %g, %w) : f32[T, 16]\n  output \"y\" = %y\n}";
    // Only the folded weight `g·w`, made at load.
    let bf16 = bf16_roles(&schedule(fused, true));
    assert_eq!(bf16, [BufferRole::Init], "{bf16:?}");
}
