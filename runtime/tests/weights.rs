//! Weight loading: GGUF files crafted here (a tiny writer below) with F32/F16/BF16/Q8_0/Q4_0/
//! Q4_1 tensors whose values are computed independently of the loader; the llama name
//! mapping and Q/K un-permutation; safetensors save → load round trips and sharded
//! directories; and bad input of every kind (each gives its error, with a useful message, and
//! nothing panics). The last test reads the real SmolLM2-135M Q4_1 checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use egret_runtime::gguf::{GgmlType, GgufFile, GgufValue};
use egret_runtime::weights::{
    self, load, load_safetensors_dir, load_safetensors_file, save_safetensors, SaveDType, Weights,
};
use egret_runtime::{HostTensor, RuntimeError};
use half::{bf16, f16};

// ---------------------------------------------------------------------------------------------
// Scratch directories.

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("egret-weights-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn err<T: std::fmt::Debug>(r: Result<T, RuntimeError>) -> RuntimeError {
    r.expect_err("expected an error")
}

/// The `reason` of a `RuntimeError::Gguf`, or a panic showing what came instead.
fn gguf_reason<T: std::fmt::Debug>(r: Result<T, RuntimeError>) -> String {
    match err(r) {
        RuntimeError::Gguf { reason, .. } => reason,
        other => panic!("expected RuntimeError::Gguf, got {other:?}"),
    }
}

fn safetensors_reason<T: std::fmt::Debug>(r: Result<T, RuntimeError>) -> String {
    match err(r) {
        RuntimeError::Safetensors { reason, .. } => reason,
        other => panic!("expected RuntimeError::Safetensors, got {other:?}"),
    }
}

fn assert_contains(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            haystack.contains(n),
            "message {haystack:?} should mention {n:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny GGUF writer (little-endian, following the spec rather than the reader).

#[derive(Clone, Debug)]
enum Val {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Arr(u32, Vec<Val>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Val {
    fn code(&self) -> u32 {
        match self {
            Val::U8(_) => 0,
            Val::I8(_) => 1,
            Val::U16(_) => 2,
            Val::I16(_) => 3,
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Arr(..) => 9,
            Val::U64(_) => 10,
            Val::I64(_) => 11,
            Val::F64(_) => 12,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Val::U8(v) => out.push(*v),
            Val::I8(v) => out.push(*v as u8),
            Val::U16(v) => out.extend(v.to_le_bytes()),
            Val::I16(v) => out.extend(v.to_le_bytes()),
            Val::U32(v) => out.extend(v.to_le_bytes()),
            Val::I32(v) => out.extend(v.to_le_bytes()),
            Val::F32(v) => out.extend(v.to_le_bytes()),
            Val::Bool(v) => out.push(*v as u8),
            Val::Str(s) => put_str(out, s),
            Val::Arr(elem, items) => {
                out.extend(elem.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    it.encode(out);
                }
            }
            Val::U64(v) => out.extend(v.to_le_bytes()),
            Val::I64(v) => out.extend(v.to_le_bytes()),
            Val::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

struct TensorSpec {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Overrides the offset the writer would assign.
    offset: Option<u64>,
}

fn tensor(name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        dims: dims.to_vec(),
        ty,
        data,
        offset: None,
    }
}

struct GgufWriter {
    version: u32,
    alignment: usize,
    kv: Vec<(String, Val)>,
    tensors: Vec<TensorSpec>,
}

/// Where each section of a written file begins.
#[derive(Debug)]
struct Layout {
    bytes: Vec<u8>,
    header_end: usize,
    metadata_end: usize,
    infos_end: usize,
    data_start: usize,
}

impl GgufWriter {
    fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(mut self, key: &str, v: Val) -> Self {
        self.kv.push((key.to_string(), v));
        self
    }

    fn tensor(mut self, t: TensorSpec) -> Self {
        self.tensors.push(t);
        self
    }

    fn build(&self) -> Layout {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        let header_end = b.len();
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            b.extend(v.code().to_le_bytes());
            v.encode(&mut b);
        }
        let metadata_end = b.len();
        let align = |x: usize| x.div_ceil(self.alignment) * self.alignment;
        let mut next = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            b.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.ty.to_le_bytes());
            let off = next;
            offsets.push(off);
            next = align(off + t.data.len());
            b.extend(t.offset.unwrap_or(off as u64).to_le_bytes());
        }
        let infos_end = b.len();
        let data_start = align(b.len());
        b.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            b.resize(data_start + off, 0);
            b.extend(&t.data);
        }
        Layout {
            bytes: b,
            header_end,
            metadata_end,
            infos_end,
            data_start,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoders for the test data, written from the ggml block layouts.

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

/// One Q8_0 block: f16 d, 32 × i8.
fn q8_0_block(d: f32, q: &[i8]) -> Vec<u8> {
    assert_eq!(q.len(), 32);
    let mut b = f16::from_f32(d).to_bits().to_le_bytes().to_vec();
    b.extend(q.iter().map(|&x| x as u8));
    b
}

/// The 16 nibble bytes of a Q4 block: element j in the low nibble of byte j, element j + 16 in
/// the high nibble.
fn nibbles(q: &[u8]) -> Vec<u8> {
    assert_eq!(q.len(), 32);
    (0..16).map(|j| (q[j] & 0xF) | (q[j + 16] << 4)).collect()
}

fn q4_0_block(d: f32, q: &[u8]) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_bits().to_le_bytes().to_vec();
    b.extend(nibbles(q));
    b
}

fn q4_1_block(d: f32, m: f32, q: &[u8]) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_bits().to_le_bytes().to_vec();
    b.extend(f16::from_f32(m).to_bits().to_le_bytes());
    b.extend(nibbles(q));
    b
}

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const BF16: u32 = 30;
const Q5_K: u32 = 13;

/// A small file with one tensor of every supported type; returns it with each tensor's
/// expected values (flat, file order) and row-major shape.
fn all_types_file() -> (GgufWriter, Vec<(&'static str, Vec<usize>, Vec<f32>)>) {
    let mut expected = Vec::new();

    // F32, dims [3, 2] → shape [2, 3].
    let v: Vec<f32> = vec![1.5, -2.0, 3.25, 0.0, -0.125, 1e-3];
    let mut w = GgufWriter::new()
        .kv("general.architecture", Val::Str("test".into()))
        .kv("general.name", Val::Str("all types".into()))
        .tensor(tensor("t_f32", &[3, 2], F32, f32_bytes(&v)));
    expected.push(("t_f32", vec![2, 3], v));

    // F16 and BF16, values exact in both.
    let v: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 2.0).collect();
    w = w.tensor(tensor("t_f16", &[4, 2], F16, f16_bytes(&v)));
    expected.push(("t_f16", vec![2, 4], v.clone()));
    w = w.tensor(tensor("t_bf16", &[8], BF16, bf16_bytes(&v)));
    expected.push(("t_bf16", vec![8], v));

    // Q8_0: two rows of 64 (two blocks each), scales 0.25, 0.5, 2, 0.0625.
    let scales = [0.25f32, 0.5, 2.0, 0.0625];
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    for (b, &d) in scales.iter().enumerate() {
        let q: Vec<i8> = (0..32)
            .map(|j| ((j as i32 * 9 + b as i32 * 31) % 256 - 128) as i8)
            .collect();
        bytes.extend(q8_0_block(d, &q));
        vals.extend(q.iter().map(|&x| d * x as f32));
    }
    w = w.tensor(tensor("t_q8_0", &[64, 2], Q8_0, bytes));
    expected.push(("t_q8_0", vec![2, 64], vals));

    // Q4_0: three blocks in one row of 96.
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    for (b, &d) in [0.5f32, 1.0, 0.125].iter().enumerate() {
        let q: Vec<u8> = (0..32).map(|j| ((j * 7 + b * 3) % 16) as u8).collect();
        bytes.extend(q4_0_block(d, &q));
        vals.extend(q.iter().map(|&x| d * (x as f32 - 8.0)));
    }
    w = w.tensor(tensor("t_q4_0", &[96], Q4_0, bytes));
    expected.push(("t_q4_0", vec![96], vals));

    // Q4_1: 2 × 1 × 32 (a 3-d tensor), with offsets m.
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    for (b, &(d, m)) in [(0.125f32, -1.0f32), (0.25, 0.5)].iter().enumerate() {
        let q: Vec<u8> = (0..32).map(|j| ((j * 5 + b) % 16) as u8).collect();
        bytes.extend(q4_1_block(d, m, &q));
        vals.extend(q.iter().map(|&x| x as f32 * d + m));
    }
    w = w.tensor(tensor("t_q4_1", &[32, 1, 2], Q4_1, bytes));
    expected.push(("t_q4_1", vec![2, 1, 32], vals));

    (w, expected)
}

// ---------------------------------------------------------------------------------------------
// GGUF: reading.

#[test]
fn gguf_dequantises_every_supported_type() {
    let s = Scratch::new("types");
    let (w, expected) = all_types_file();
    let path = s.write("all.gguf", &w.build().bytes);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.tensors().len(), expected.len());
    for (name, shape, vals) in &expected {
        let info = f.tensor_info(name).unwrap();
        let t = f.tensor_f32(info).unwrap();
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(&t.data, vals, "{name}");
    }
    let types: Vec<GgmlType> = f.tensors().iter().map(|t| t.ggml_type).collect();
    assert_eq!(
        types,
        [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1
        ]
    );
    assert_eq!(f.tensors()[5].dims, vec![32, 1, 2]);
}

#[test]
fn gguf_v2_and_custom_alignment() {
    let s = Scratch::new("v2");
    let (mut w, expected) = all_types_file();
    w.version = 2;
    w.alignment = 64;
    w = w.kv("general.alignment", Val::U32(64));
    let layout = w.build();
    assert_eq!(layout.data_start % 64, 0);
    let path = s.write("v2.gguf", &layout.bytes);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(
        (f.version(), f.alignment(), f.data_offset()),
        (2, 64, layout.data_start as u64)
    );
    for (name, _, vals) in &expected {
        assert_eq!(
            &f.tensor_f32(f.tensor_info(name).unwrap()).unwrap().data,
            vals,
            "{name}"
        );
    }
}

#[test]
fn gguf_metadata_of_every_type() {
    let s = Scratch::new("meta");
    let w = GgufWriter::new()
        .kv("u8", Val::U8(200))
        .kv("i8", Val::I8(-5))
        .kv("u16", Val::U16(60000))
        .kv("i16", Val::I16(-300))
        .kv("u32", Val::U32(4_000_000_000))
        .kv("i32", Val::I32(-7))
        .kv("i32pos", Val::I32(30))
        .kv("f32", Val::F32(1.5))
        .kv("bool", Val::Bool(true))
        .kv("str", Val::Str("héllo".into()))
        .kv(
            "arr",
            Val::Arr(8, vec![Val::Str("a".into()), Val::Str("bc".into())]),
        )
        .kv(
            "nested",
            Val::Arr(9, vec![Val::Arr(4, vec![Val::U32(1), Val::U32(2)])]),
        )
        .kv("u64", Val::U64(1 << 40))
        .kv("i64", Val::I64(-1))
        .kv("f64", Val::F64(1e5));
    let f = GgufFile::open(&s.write("m.gguf", &w.build().bytes)).unwrap();
    assert_eq!(f.metadata().len(), 15);
    assert_eq!(f.get_u64("u8"), Some(200));
    assert_eq!(f.get_u64("u16"), Some(60000));
    assert_eq!(f.get_u64("u32"), Some(4_000_000_000));
    assert_eq!(f.get_u64("i32pos"), Some(30));
    assert_eq!(f.get_u64("u64"), Some(1 << 40));
    assert_eq!(
        f.get_u64("i8"),
        None,
        "negative integers do not widen to u64"
    );
    assert_eq!(f.get_u64("i64"), None);
    assert_eq!(f.get_u64("str"), None);
    assert_eq!(f.metadata()["i16"], GgufValue::I16(-300));
    assert_eq!(f.metadata()["bool"], GgufValue::Bool(true));
    assert_eq!(f.get_f32("f32"), Some(1.5));
    assert_eq!(f.get_f32("f64"), Some(1e5));
    assert_eq!(f.get_f32("u8"), None);
    assert_eq!(f.get_str("str"), Some("héllo"));
    assert_eq!(
        f.get_array("arr"),
        Some(
            &[
                GgufValue::String("a".into()),
                GgufValue::String("bc".into())
            ][..]
        )
    );
    assert_eq!(
        f.get_array("nested").unwrap()[0],
        GgufValue::Array(vec![GgufValue::U32(1), GgufValue::U32(2)])
    );
    assert_eq!(f.architecture(), None);
    assert!(f.tensors().is_empty());
}

// ---------------------------------------------------------------------------------------------
// GGUF: llama names and the Q/K permutation.

/// llama.cpp's converter, written from its numpy expression
/// `W.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`:
/// row (h, i, j) of the result is row (h, j, i) of W.
fn converter_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let per_head = rows / n_head;
    let half = per_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for r in 0..rows {
        let (h, within) = (r / per_head, r % per_head);
        let (i, j) = (within / 2, within % 2);
        let src = h * per_head + j * half + i;
        out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
    }
    out
}

fn iota(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| i as f32 * scale).collect()
}

/// A two-layer llama file: dim 8, 2 heads, 1 KV head (head_dim 4), vocab 5, ffn 16.
fn tiny_llama(with_kv_heads: bool) -> (GgufWriter, Vec<(String, Vec<usize>, Vec<f32>)>) {
    let (dim, n_head, n_kv, vocab, ffn) = (8usize, 2usize, 1usize, 5usize, 16usize);
    let kv_heads_for_k = if with_kv_heads { n_kv } else { n_head };
    let kv_dim = if with_kv_heads { 4 } else { dim };
    let mut w = GgufWriter::new()
        .kv("general.architecture", Val::Str("llama".into()))
        .kv("llama.block_count", Val::U32(2))
        .kv("llama.embedding_length", Val::U32(dim as u32))
        .kv("llama.attention.head_count", Val::U32(n_head as u32));
    if with_kv_heads {
        w = w.kv("llama.attention.head_count_kv", Val::U32(n_kv as u32));
    }
    // (gguf name, hf name, hf shape, stored permuted with this many heads)
    let mut specs: Vec<(String, String, Vec<usize>, Option<usize>)> = vec![
        (
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![vocab, dim],
            None,
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![dim],
            None,
        ),
        (
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![vocab, dim],
            None,
        ),
        (
            "rope_freqs.weight".into(),
            "rope_freqs.weight".into(),
            vec![2],
            None,
        ),
    ];
    for l in 0..2 {
        let b = |s: &str| format!("blk.{l}.{s}");
        let h = |s: &str| format!("model.layers.{l}.{s}");
        specs.extend([
            (
                b("attn_norm.weight"),
                h("input_layernorm.weight"),
                vec![dim],
                None,
            ),
            (
                b("ffn_norm.weight"),
                h("post_attention_layernorm.weight"),
                vec![dim],
                None,
            ),
            (
                b("attn_q.weight"),
                h("self_attn.q_proj.weight"),
                vec![dim, dim],
                Some(n_head),
            ),
            (
                b("attn_q.bias"),
                h("self_attn.q_proj.bias"),
                vec![dim],
                Some(n_head),
            ),
            (
                b("attn_k.weight"),
                h("self_attn.k_proj.weight"),
                vec![kv_dim, dim],
                Some(kv_heads_for_k),
            ),
            (
                b("attn_v.weight"),
                h("self_attn.v_proj.weight"),
                vec![kv_dim, dim],
                None,
            ),
            (
                b("attn_output.weight"),
                h("self_attn.o_proj.weight"),
                vec![dim, dim],
                None,
            ),
            (
                b("ffn_gate.weight"),
                h("mlp.gate_proj.weight"),
                vec![ffn, dim],
                None,
            ),
            (
                b("ffn_up.weight"),
                h("mlp.up_proj.weight"),
                vec![ffn, dim],
                None,
            ),
            (
                b("ffn_down.weight"),
                h("mlp.down_proj.weight"),
                vec![dim, ffn],
                None,
            ),
        ]);
    }
    let mut expected = Vec::new();
    for (k, (gname, hname, shape, perm)) in specs.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        // Distinct values, exact in f16 for the F16 tensor (the Q projection).
        let base = if gname.ends_with("attn_q.weight") {
            k as f32
        } else {
            k as f32 * 1000.0
        };
        let hf: Vec<f32> = iota(n, 0.25).into_iter().map(|x| x + base).collect();
        let stored = match perm {
            Some(heads) => {
                let cols = if shape.len() == 2 { shape[1] } else { 1 };
                converter_permute(&hf, shape[0], cols, heads)
            }
            None => hf.clone(),
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        // Store the Q projection as F16 to exercise un-permuting a converted tensor.
        let (ty, data) = if gname.ends_with("attn_q.weight") {
            (F16, f16_bytes(&stored))
        } else {
            (F32, f32_bytes(&stored))
        };
        w = w.tensor(tensor(&gname, &dims, ty, data));
        expected.push((hname, shape, hf));
    }
    (w, expected)
}

#[test]
fn gguf_llama_loads_under_hf_names_with_qk_unpermuted() {
    for with_kv_heads in [true, false] {
        let s = Scratch::new("llama");
        let (w, expected) = tiny_llama(with_kv_heads);
        let path = s.write("tiny.gguf", &w.build().bytes);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.architecture(), Some("llama"));
        let weights = f.load_weights().unwrap();
        assert_eq!(weights.len(), expected.len());
        for (name, shape, vals) in &expected {
            let t = weights.expect(name, shape).unwrap();
            assert_eq!(
                &t.data, vals,
                "{name} (with head_count_kv: {with_kv_heads})"
            );
        }
        // `weights::load` dispatches on the extension, and on the magic without one.
        assert_eq!(load(&path).unwrap().len(), expected.len());
        let bare = s.write("tiny", &std::fs::read(&path).unwrap());
        assert_eq!(load(&bare).unwrap().len(), expected.len());
    }
}

#[test]
fn gguf_load_weights_refuses_other_architectures_and_bad_heads() {
    let s = Scratch::new("arch");
    let w = GgufWriter::new()
        .kv("general.architecture", Val::Str("qwen2".into()))
        .tensor(tensor(
            "token_embd.weight",
            &[2],
            F32,
            f32_bytes(&[1.0, 2.0]),
        ));
    let f = GgufFile::open(&s.write("q.gguf", &w.build().bytes)).unwrap();
    match err(f.load_weights()) {
        RuntimeError::Unsupported { what, .. } => assert_contains(&what, &["qwen2", "llama"]),
        other => panic!("{other:?}"),
    }

    let w = GgufWriter::new().tensor(tensor(
        "token_embd.weight",
        &[2],
        F32,
        f32_bytes(&[1.0, 2.0]),
    ));
    let f = GgufFile::open(&s.write("noarch.gguf", &w.build().bytes)).unwrap();
    assert_contains(&gguf_reason(f.load_weights()), &["general.architecture"]);

    // A Q projection without head_count, and one whose rows do not split into the heads.
    let q = tensor("blk.0.attn_q.weight", &[2, 6], F32, f32_bytes(&[0.0; 12]));
    let w = GgufWriter::new()
        .kv("general.architecture", Val::Str("llama".into()))
        .tensor(q);
    let f = GgufFile::open(&s.write("nohead.gguf", &w.build().bytes)).unwrap();
    assert_contains(
        &gguf_reason(f.load_weights()),
        &["llama.attention.head_count"],
    );

    let q = tensor("blk.0.attn_q.weight", &[2, 6], F32, f32_bytes(&[0.0; 12]));
    let w = GgufWriter::new()
        .kv("general.architecture", Val::Str("llama".into()))
        .kv("llama.attention.head_count", Val::U32(2))
        .tensor(q);
    let f = GgufFile::open(&s.write("badhead.gguf", &w.build().bytes)).unwrap();
    assert_contains(
        &gguf_reason(f.load_weights()),
        &["blk.0.attn_q.weight", "6 rows", "2 heads"],
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF: bad input.

#[test]
fn gguf_missing_file() {
    let s = Scratch::new("missing");
    let p = s.path("nope.gguf");
    match err(GgufFile::open(&p)) {
        RuntimeError::Io { path, .. } => assert_eq!(path, p),
        other => panic!("{other:?}"),
    }
    let msg = err(load(&p)).to_string();
    assert_contains(&msg, &["nope.gguf"]);
}

#[test]
fn gguf_truncated_at_each_section() {
    let s = Scratch::new("trunc");
    let (w, _) = all_types_file();
    let l = w.build();
    let cases: [(&str, usize, &[&str]); 6] = [
        ("empty", 0, &["truncated", "header"]),
        ("header", 10, &["truncated", "header"]),
        ("metadata", l.header_end + 20, &["truncated", "metadata"]),
        (
            "tensor info",
            (l.metadata_end + l.infos_end) / 2,
            &["truncated", "tensor"],
        ),
        (
            "data start",
            l.data_start + 3,
            &["truncated", "t_f32", "needs bytes"],
        ),
        (
            "data end",
            l.bytes.len() - 1,
            &["truncated", "t_q4_1", "needs bytes"],
        ),
    ];
    for (what, cut, needles) in cases {
        let p = s.write(&format!("cut-{cut}.gguf"), &l.bytes[..cut]);
        let reason = gguf_reason(GgufFile::open(&p));
        for n in needles {
            assert!(
                reason.contains(n),
                "cut in the {what} at byte {cut}: {reason:?} should mention {n:?}"
            );
        }
        // The Display names the file and says it is not valid GGUF.
        let msg = err(GgufFile::open(&p)).to_string();
        assert_contains(&msg, &[&format!("cut-{cut}.gguf"), "not a valid GGUF file"]);
    }
    // The data section is cut: the message gives the exact byte range and file size.
    let cut = l.bytes.len() - 1;
    let reason = gguf_reason(GgufFile::open(&s.path(&format!("cut-{cut}.gguf"))));
    assert!(
        reason.contains(&format!("but the file has {cut}")),
        "{reason}"
    );
}

#[test]
fn gguf_every_truncation_and_byte_flip_is_an_error_not_a_panic() {
    let s = Scratch::new("fuzz");
    let (w, _) = tiny_llama(true);
    let bytes = w.build().bytes;
    let p = s.path("f.gguf");
    // Every prefix (stepping through the data section quickly: it is only floats).
    let mut cut = 0;
    while cut < bytes.len() {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(
            GgufFile::open(&p).is_err(),
            "a file cut at {cut} of {} opened",
            bytes.len()
        );
        cut += if cut < 2048 { 1 } else { 61 };
    }
    // Single-byte corruptions in the header, metadata and directory: open may succeed (a
    // changed value can be valid) but nothing may panic, and loading all tensors either
    // succeeds or errors.
    let mut state = 0x2545F4914F6CDD1Du64;
    let dir_end = bytes.len().min(2048);
    for _ in 0..600 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = bytes.clone();
        let at = (state as usize) % dir_end;
        b[at] ^= (state >> 32) as u8 | 1;
        std::fs::write(&p, &b).unwrap();
        if let Ok(f) = GgufFile::open(&p) {
            for info in f.tensors() {
                let _ = f.tensor_f32(info);
            }
            let _ = f.load_weights();
        }
    }
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

#[test]
fn gguf_bad_magic_and_version() {
    let s = Scratch::new("magic");
    let mut b = GgufWriter::new().build().bytes;
    b[..4].copy_from_slice(b"GGML");
    let reason = gguf_reason(GgufFile::open(&s.write("magic.gguf", &b)));
    assert_contains(&reason, &["magic", "GGML"]);

    for (version, needles) in [
        (1u32, &["version 1", "2 and 3"][..]),
        (3u32 << 24, &["big-endian"][..]),
    ] {
        let p = s.write("v.gguf", &header(version, 0, 0));
        match err(GgufFile::open(&p)) {
            RuntimeError::Unsupported { what, .. } => assert_contains(&what, needles),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn gguf_absurd_counts_and_lengths() {
    let s = Scratch::new("absurd");
    // Counts far beyond what the file could hold.
    let reason = gguf_reason(GgufFile::open(&s.write("t.gguf", &header(3, u64::MAX, 0))));
    assert_contains(
        &reason,
        &["tensor count 18446744073709551615", "cannot fit"],
    );
    let reason = gguf_reason(GgufFile::open(&s.write("k.gguf", &header(3, 0, 1 << 40))));
    assert_contains(&reason, &["metadata entry count", "cannot fit"]);

    // A key whose length is absurd.
    let mut b = header(3, 0, 1);
    b.extend(u64::MAX.to_le_bytes());
    b.extend([0u8; 16]);
    let reason = gguf_reason(GgufFile::open(&s.write("key.gguf", &b)));
    assert_contains(
        &reason,
        &["metadata entry #0", "string of length 18446744073709551615"],
    );

    // An array whose element count is absurd.
    let mut b = header(3, 0, 1);
    put_str(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0u8; 32]);
    let reason = gguf_reason(GgufFile::open(&s.write("arr.gguf", &b)));
    assert_contains(
        &reason,
        &[
            "tokenizer.ggml.tokens",
            "array element count 1152921504606846976",
        ],
    );

    // Unknown value type, bad bool, arrays nested too deep.
    let w = GgufWriter::new().kv("x", Val::U8(0));
    let mut b = w.build().bytes;
    let at = 24 + 8 + 1; // header, key length, key
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("ty.gguf", &b))),
        &["`x`", "value type 99"],
    );
    let w = GgufWriter::new().kv("flag", Val::U8(2));
    let mut b = w.build().bytes;
    b[24 + 8 + 4..24 + 8 + 4 + 4].copy_from_slice(&7u32.to_le_bytes());
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("bool.gguf", &b))),
        &["flag", "bool"],
    );
    let mut deep = Val::U8(1);
    for _ in 0..12 {
        deep = Val::Arr(deep.code(), vec![deep]);
    }
    let b = GgufWriter::new().kv("deep", deep).build().bytes;
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("deep.gguf", &b))),
        &["deep", "nested"],
    );

    // Too many dimensions.
    let b = GgufWriter::new()
        .tensor(tensor("t", &[1, 1, 1, 1, 1], F32, f32_bytes(&[1.0])))
        .build()
        .bytes;
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("dims.gguf", &b))),
        &["`t`", "5 dimensions"],
    );

    // Dimensions whose product overflows.
    let b = GgufWriter::new()
        .tensor(tensor("huge", &[1 << 40, 1 << 40], F32, vec![]))
        .build()
        .bytes;
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("ovf.gguf", &b))),
        &["huge", "overflow"],
    );

    // A bad alignment.
    let b = GgufWriter::new()
        .kv("general.alignment", Val::U32(24))
        .build()
        .bytes;
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("al.gguf", &b))),
        &["general.alignment", "power of two"],
    );
}

#[test]
fn gguf_tensor_offsets_outside_the_file() {
    let s = Scratch::new("offset");
    let data = f32_bytes(&[1.0; 8]);
    let mut t = tensor("blk.3.attn_q.weight", &[8], F32, data.clone());
    t.offset = Some(1 << 20);
    let l = GgufWriter::new().tensor(t).build();
    let reason = gguf_reason(GgufFile::open(&s.write("far.gguf", &l.bytes)));
    let start = l.data_start + (1 << 20);
    assert_contains(
        &reason,
        &[&format!(
            "truncated: tensor `blk.3.attn_q.weight` needs bytes {start}..{} but the file has {}",
            start + 32,
            l.bytes.len()
        )],
    );

    // An offset so large that adding the data section's start overflows.
    let mut t = tensor("t", &[8], F32, data.clone());
    t.offset = Some(u64::MAX - 31);
    let l = GgufWriter::new().tensor(t).build();
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("ovf.gguf", &l.bytes))),
        &["`t`", "overflow"],
    );

    // An offset that is not aligned.
    let mut t = tensor("t", &[8], F32, data);
    t.offset = Some(4);
    let l = GgufWriter::new().tensor(t).build();
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("mis.gguf", &l.bytes))),
        &["`t`", "offset 4", "alignment 32"],
    );

    // A quantised row that is not a whole number of blocks.
    let l = GgufWriter::new()
        .tensor(tensor("q", &[16], Q8_0, vec![0; 34]))
        .build();
    assert_contains(
        &gguf_reason(GgufFile::open(&s.write("blk.gguf", &l.bytes))),
        &["`q`", "block size 32"],
    );

    // A directory entry that did not come from the file is checked as well.
    let l = GgufWriter::new()
        .tensor(tensor("t", &[8], F32, f32_bytes(&[1.0; 8])))
        .build();
    let f = GgufFile::open(&s.write("ok.gguf", &l.bytes)).unwrap();
    let mut info = f.tensors()[0].clone();
    info.dims = vec![1 << 30];
    assert_contains(&gguf_reason(f.tensor_f32(&info)), &["`t`", "needs bytes"]);
}

#[test]
fn gguf_unsupported_tensor_type() {
    let s = Scratch::new("q5k");
    let l = GgufWriter::new()
        .kv("general.architecture", Val::Str("llama".into()))
        .tensor(tensor("blk.0.ffn_down.weight", &[256], Q5_K, vec![0; 176]))
        .tensor(tensor("odd", &[4], 1000, vec![0; 4]))
        .build();
    let f = GgufFile::open(&s.write("q5k.gguf", &l.bytes)).unwrap();
    assert_eq!(f.tensors()[0].ggml_type, GgmlType::Other(13));
    match err(f.tensor_f32(&f.tensors()[0])) {
        RuntimeError::Unsupported { what, .. } => {
            assert_contains(&what, &["blk.0.ffn_down.weight", "Q5_K", "Q4_1"])
        }
        other => panic!("{other:?}"),
    }
    match err(f.tensor_f32(&f.tensors()[1])) {
        RuntimeError::Unsupported { what, .. } => {
            assert_contains(&what, &["odd", "unknown type 1000"])
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        err(f.load_weights()),
        RuntimeError::Unsupported { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Safetensors.

fn sample_weights() -> Weights {
    let mut w = Weights::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        HostTensor::new(vec![3, 4], iota(12, 0.25)),
    );
    w.insert(
        "model.norm.weight".into(),
        HostTensor::new(vec![4], vec![1.0, -1.0, 0.5, 2.0]),
    );
    // Values that bf16 and f16 cannot hold exactly, to check the rounding.
    let odd: Vec<f32> = (0..10)
        .map(|i| 1.0 + i as f32 * 0.001_953_7 + 1e-7)
        .chain([1e-9, 70000.0])
        .collect();
    w.insert("odd".into(), HostTensor::new(vec![2, 6], odd));
    w.insert("scalar".into(), HostTensor::new(vec![], vec![3.5]));
    w
}

#[test]
fn safetensors_round_trip_in_each_dtype() {
    let s = Scratch::new("rt");
    let w = sample_weights();
    for (dtype, round) in [
        (SaveDType::F32, (|x: f32| x) as fn(f32) -> f32),
        (SaveDType::BF16, |x: f32| bf16::from_f32(x).to_f32()),
        (SaveDType::F16, |x: f32| f16::from_f32(x).to_f32()),
    ] {
        let p = s.path("model.safetensors");
        save_safetensors(&p, &w, dtype).unwrap();
        let back = load_safetensors_file(&p).unwrap();
        assert_eq!(
            back.names().collect::<Vec<_>>(),
            w.names().collect::<Vec<_>>()
        );
        for (name, t) in w.iter() {
            let b = back.get(name).unwrap();
            assert_eq!(b.shape, t.shape, "{name}");
            let want: Vec<f32> = t.data.iter().map(|&x| round(x)).collect();
            assert_eq!(b.data, want, "{name} in {dtype:?}");
        }
        // Written with the dtype asked for and the metadata transformers expects.
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let want = match dtype {
            SaveDType::F32 => safetensors::Dtype::F32,
            SaveDType::BF16 => safetensors::Dtype::BF16,
            SaveDType::F16 => safetensors::Dtype::F16,
        };
        assert!(meta.tensors().values().all(|i| i.dtype == want));
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        // Loading the directory finds model.safetensors; no temporary file is left behind.
        assert_eq!(load(&s.0).unwrap().len(), w.len());
        let names: Vec<_> = std::fs::read_dir(&s.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["model.safetensors"]);
    }
    // bf16 rounds to nearest even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
    let mut w = Weights::new();
    w.insert(
        "t".into(),
        HostTensor::new(vec![2], vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]),
    );
    let p = s.path("even.safetensors");
    save_safetensors(&p, &w, SaveDType::BF16).unwrap();
    assert_eq!(
        load(&p).unwrap().get("t").unwrap().data,
        vec![1.0, 1.0 + 4.0 / 256.0]
    );
}

#[test]
fn safetensors_save_refuses_inconsistent_tensors_and_bad_paths() {
    let s = Scratch::new("savebad");
    let mut w = Weights::new();
    w.insert(
        "bad".into(),
        HostTensor {
            shape: vec![2, 2],
            data: vec![1.0],
        },
    );
    let msg = err(save_safetensors(
        &s.path("x.safetensors"),
        &w,
        SaveDType::F32,
    ))
    .to_string();
    assert_contains(&msg, &["bad", "[2, 2]"]);
    let w = sample_weights();
    match err(save_safetensors(
        &s.path("no/such/dir/x.safetensors"),
        &w,
        SaveDType::F32,
    )) {
        RuntimeError::Write { path, .. } => assert!(path.ends_with("x.safetensors")),
        other => panic!("{other:?}"),
    }
}

/// Writes `w` as a sharded Hugging Face directory: tensors alternate between two shards.
fn write_sharded(dir: &Path, w: &Weights) -> serde_json::Value {
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut parts = [Weights::new(), Weights::new()];
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in w.iter().enumerate() {
        parts[i % 2].insert(name.to_string(), t.clone());
        map.insert(name.to_string(), shards[i % 2].into());
    }
    for (part, shard) in parts.iter().zip(shards) {
        save_safetensors(&dir.join(shard), part, SaveDType::F32).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    index
}

#[test]
fn safetensors_sharded_directory() {
    let s = Scratch::new("shard");
    let w = sample_weights();
    write_sharded(&s.0, &w);
    for loaded in [load_safetensors_dir(&s.0).unwrap(), load(&s.0).unwrap()] {
        assert_eq!(loaded.len(), w.len());
        for (name, t) in w.iter() {
            assert_eq!(loaded.get(name), Some(t), "{name}");
        }
    }
}

#[test]
fn safetensors_sharded_directory_errors() {
    // A missing shard.
    let s = Scratch::new("shard-missing");
    write_sharded(&s.0, &sample_weights());
    let gone = s.path("model-00002-of-00002.safetensors");
    std::fs::remove_file(&gone).unwrap();
    match err(load(&s.0)) {
        RuntimeError::Io { path, .. } => assert_eq!(path, gone),
        other => panic!("{other:?}"),
    }

    // The index names a tensor its shard lacks.
    let s = Scratch::new("shard-lacks");
    let mut index = write_sharded(&s.0, &sample_weights());
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] =
        "model-00001-of-00002.safetensors".into();
    std::fs::write(s.path("model.safetensors.index.json"), index.to_string()).unwrap();
    match err(load(&s.0)) {
        RuntimeError::MissingTensor { name, source_desc } => {
            assert_eq!(name, "model.layers.0.mlp.up_proj.weight");
            assert_contains(&source_desc, &["model-00001-of-00002.safetensors"]);
        }
        other => panic!("{other:?}"),
    }

    // A corrupt index; a shard name that leaves the directory.
    std::fs::write(
        s.path("model.safetensors.index.json"),
        "{\"weight_map\": [}",
    )
    .unwrap();
    assert_contains(&safetensors_reason(load(&s.0)), &["index"]);
    std::fs::write(
        s.path("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "../x.safetensors"}}"#,
    )
    .unwrap();
    assert_contains(&safetensors_reason(load(&s.0)), &["../x.safetensors"]);

    // The same tensor in two shards.
    let s = Scratch::new("shard-dup");
    let w = sample_weights();
    write_sharded(&s.0, &w);
    save_safetensors(
        &s.path("model-00002-of-00002.safetensors"),
        &w,
        SaveDType::F32,
    )
    .unwrap();
    assert_contains(
        &safetensors_reason(load(&s.0)),
        &["is also in", "model-00001-of-00002"],
    );

    // A directory with no checkpoint at all.
    let s = Scratch::new("empty-dir");
    let msg = err(load(&s.0)).to_string();
    assert!(matches!(err(load(&s.0)), RuntimeError::Io { .. }));
    assert_contains(&msg, &["model.safetensors", "model.safetensors.index.json"]);
}

#[test]
fn safetensors_bad_files() {
    let s = Scratch::new("stbad");
    // Missing.
    let p = s.path("nope.safetensors");
    match err(load_safetensors_file(&p)) {
        RuntimeError::Io { path, .. } => assert_eq!(path, p),
        other => panic!("{other:?}"),
    }
    let p = s.path("model.safetensors");
    save_safetensors(&p, &sample_weights(), SaveDType::F16).unwrap();
    let good = std::fs::read(&p).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    // Truncated inside the size field, inside the header, inside the data.
    for (cut, needle) in [
        (0, "truncated"),
        (5, "truncated"),
        (8 + header_len / 2, "header"),
        (good.len() - 1, "size"),
    ] {
        let q = s.write("cut.safetensors", &good[..cut]);
        let reason = safetensors_reason(load_safetensors_file(&q));
        assert_contains(&reason, &[needle]);
        assert_contains(
            &err(load(&q)).to_string(),
            &["cut.safetensors", "not a valid safetensors file"],
        );
    }
    // Corrupt JSON in the header.
    let mut bad = good.clone();
    bad[8] = b'[';
    assert_contains(
        &safetensors_reason(load_safetensors_file(&s.write("json.safetensors", &bad))),
        &["JSON"],
    );
    // A header length beyond the file.
    let mut bad = good.clone();
    bad[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_contains(
        &safetensors_reason(load_safetensors_file(&s.write("len.safetensors", &bad))),
        &["header"],
    );
    // Extra bytes after the data.
    let mut bad = good.clone();
    bad.extend([0u8; 4]);
    assert!(matches!(
        err(load_safetensors_file(&s.write("pad.safetensors", &bad))),
        RuntimeError::Safetensors { .. }
    ));

    // An integer tensor.
    let bytes = [1u8, 0, 0, 0, 0, 0, 0, 0];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1], &bytes).unwrap();
    let q = s.path("int.safetensors");
    safetensors::serialize_to_file([("ids", view)], None, &q).unwrap();
    match err(load_safetensors_file(&q)) {
        RuntimeError::Unsupported { what, .. } => assert_contains(&what, &["ids", "I64", "F32"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn safetensors_loads_f16_and_bf16_written_by_the_crate() {
    // Files written by the reference writer (as transformers' checkpoints are) read back.
    let s = Scratch::new("ext");
    let vals = [0.5f32, -1.25, 3.0, 1024.0];
    let f16b = f16_bytes(&vals);
    let bf16b = bf16_bytes(&vals);
    let f32b = f32_bytes(&vals);
    let views = [
        (
            "a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2, 2], &f16b)
                .unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4], &bf16b)
                .unwrap(),
        ),
        (
            "c",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4], &f32b)
                .unwrap(),
        ),
    ];
    let p = s.path("x.safetensors");
    safetensors::serialize_to_file(views, None, &p).unwrap();
    let w = load(&p).unwrap();
    assert_eq!(w.expect("a", &[2, 2]).unwrap().data, vals);
    assert_eq!(w.expect("b", &[4]).unwrap().data, vals);
    assert_eq!(w.expect("c", &[1, 4]).unwrap().data, vals);
}

// ---------------------------------------------------------------------------------------------
// Weights.

#[test]
fn weights_expect_take_and_names() {
    let mut w = sample_weights();
    assert_eq!(w.len(), 4);
    assert_eq!(
        w.names().collect::<Vec<_>>(),
        [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "odd",
            "scalar"
        ]
    );
    assert_eq!(w.expect("model.norm.weight", &[4]).unwrap().data[1], -1.0);
    match err(w.expect("model.norm.weight", &[5])) {
        RuntimeError::ShapeMismatch {
            name,
            got,
            expected,
        } => {
            assert_eq!(
                (name.as_str(), got, expected),
                ("model.norm.weight", vec![4], vec![5])
            );
        }
        other => panic!("{other:?}"),
    }
    let msg = err(w.expect("lm_head.weight", &[3, 4])).to_string();
    assert!(matches!(
        err(w.expect("lm_head.weight", &[3, 4])),
        RuntimeError::MissingTensor { .. }
    ));
    assert_contains(&msg, &["lm_head.weight"]);
    let t = w.take("scalar").unwrap();
    assert_eq!(t.data, vec![3.5]);
    assert!(w.take("scalar").is_none());
    assert_eq!(w.len(), 3);

    // Loaded weights name their file in a missing-tensor message.
    let s = Scratch::new("expect");
    let p = s.path("m.safetensors");
    save_safetensors(&p, &w, SaveDType::F32).unwrap();
    let msg = err(weights::load(&p).unwrap().expect("lm_head.weight", &[1])).to_string();
    assert_contains(&msg, &["m.safetensors", "missing tensor `lm_head.weight`"]);
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M checkpoint.

fn smollm2_path() -> PathBuf {
    if let Some(p) = std::env::var_os("EGRET_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cache/egret/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.is_file() {
        panic!(
            "SmolLM2-135M-Instruct.Q4_1.gguf not found at {} (nor set in EGRET_SMOLLM2_GGUF): \
             run `scripts/test.sh`, which installs it",
            p.display()
        );
    }
    p
}

#[test]
fn smollm2_gguf_loads() {
    let path = smollm2_path();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count"), Some(30));
    assert_eq!(f.get_u64("llama.embedding_length"), Some(576));
    assert_eq!(f.get_u64("llama.attention.head_count"), Some(9));
    assert_eq!(f.get_u64("llama.attention.head_count_kv"), Some(3));
    assert_eq!(f.get_f32("llama.rope.freq_base"), Some(100000.0));
    assert_eq!(
        f.get_array("tokenizer.ggml.tokens").map(<[_]>::len),
        Some(49152)
    );
    assert_eq!(f.get_str("tokenizer.ggml.pre"), Some("smollm"));

    // The directory: embeddings, final norm, and 9 tensors per layer; tied, so no output.
    assert_eq!(f.tensors().len(), 2 + 30 * 9);
    assert!(f.tensor_info("output.weight").is_none());
    let embd = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embd.dims, vec![576, 49152]);
    let k = f.tensor_info("blk.0.attn_k.weight").unwrap();
    assert_eq!(k.dims, vec![576, 192]);
    assert_eq!(k.ggml_type, GgmlType::Q4_1);
    assert_eq!(
        f.tensor_info("blk.0.attn_norm.weight").unwrap().ggml_type,
        GgmlType::F32
    );

    let start = std::time::Instant::now();
    let w = f.load_weights().unwrap();
    eprintln!(
        "SmolLM2 Q4_1: dequantised {} tensors in {:?}",
        w.len(),
        start.elapsed()
    );
    assert_eq!(w.len(), f.tensors().len());
    assert!(w.get("lm_head.weight").is_none());
    w.expect("model.embed_tokens.weight", &[49152, 576])
        .unwrap();
    w.expect("model.norm.weight", &[576]).unwrap();
    for l in 0..30 {
        for (name, shape) in [
            ("input_layernorm.weight", &[576][..]),
            ("post_attention_layernorm.weight", &[576]),
            ("self_attn.q_proj.weight", &[576, 576]),
            ("self_attn.k_proj.weight", &[192, 576]),
            ("self_attn.v_proj.weight", &[192, 576]),
            ("self_attn.o_proj.weight", &[576, 576]),
            ("mlp.gate_proj.weight", &[1536, 576]),
            ("mlp.up_proj.weight", &[1536, 576]),
            ("mlp.down_proj.weight", &[576, 1536]),
        ] {
            w.expect(&format!("model.layers.{l}.{name}"), shape)
                .unwrap();
        }
    }
    for (name, t) in w.iter() {
        assert!(
            t.data.iter().all(|x| x.is_finite()),
            "{name} has a NaN or infinity"
        );
    }
    // The un-permuted K projection is a row permutation of the stored one.
    let stored = f.tensor_f32(k).unwrap();
    let hf = w.get("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_ne!(stored.data, hf.data);
    assert_eq!(
        egret_runtime::gguf::permute_qk_rows(&hf.data, 192, 576, 3),
        stored.data
    );
}
