//! The IR of one LLaMA block (SmolLM2 shapes, one layer, prefill) after each pass of the
//! default pipeline, as insta snapshots: any change in what a pass produces shows here.

use egret_models::{build, presets::preset, GraphKind};
use egret_passes::{pipeline, PassCx, PassManager, PrintAfter};

#[test]
fn llama_block_after_each_default_pass() {
    let mut cfg = preset("smollm2-135m").unwrap();
    cfg.num_hidden_layers = 1;
    let mut g = build(&cfg, GraphKind::Prefill).unwrap();
    let pm = PassManager::new(pipeline("default").unwrap())
        .print_after(PrintAfter::All)
        .unwrap();
    let mut dumps = vec![];
    pm.run(&mut g, &mut PassCx::default(), |name, g| {
        dumps.push((name.to_string(), egret_ir::print(g)))
    })
    .unwrap();
    assert_eq!(dumps.len(), 4);
    for (name, text) in dumps {
        insta::assert_snapshot!(format!("block_after_{name}"), text);
    }
}
