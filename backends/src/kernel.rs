//! The kernel IR shared by the CPU and GPU code generators: a `Program` is a list of
//! buffers and a list of kernels, each a loop nest of a known kind over strided views of
//! those buffers. Views (`permute`, `broadcast`, `slice`, contiguous `reshape`) never
//! become kernels: they are `Access` strides. Chains of elementwise ops become one
//! `Elementwise` kernel whose body is an expression tree.

use egret_ir::{AttnGrad, BinaryOp, CompareOp, Dim, ReduceOp, UnaryOp};
use egret_runtime::plan::{BufferSpec, ElemType, StateSpec};

/// A sum of products of dims, `Σ coef · Π factors`: strides and offsets of views over
/// symbolic shapes (the stride of the outer dim of `[T, P+T]` is `P+T`, of `[B, T, P+T]`
/// is `T·(P+T)`). Generated code evaluates it from the symbol values at kernel entry.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Poly(pub Vec<(i64, Vec<Dim>)>);

impl Poly {
    pub fn zero() -> Poly {
        Poly(vec![])
    }

    pub fn c(v: i64) -> Poly {
        if v == 0 {
            Poly::zero()
        } else {
            Poly(vec![(v, vec![])])
        }
    }

    pub fn dim(d: &Dim) -> Poly {
        match d.as_const() {
            Some(v) => Poly::c(v),
            None => Poly(vec![(1, vec![d.clone()])]),
        }
    }

    /// `self · d`.
    pub fn mul_dim(&self, d: &Dim) -> Poly {
        match d.as_const() {
            Some(v) => self.scale(v),
            None => Poly(
                self.0
                    .iter()
                    .map(|(c, f)| (*c, f.iter().cloned().chain([d.clone()]).collect()))
                    .collect(),
            ),
        }
    }

    pub fn scale(&self, k: i64) -> Poly {
        if k == 0 {
            return Poly::zero();
        }
        Poly(self.0.iter().map(|(c, f)| (c * k, f.clone())).collect())
    }

    pub fn add(&self, o: &Poly) -> Poly {
        let mut terms = self.0.clone();
        for (c, f) in &o.0 {
            match terms.iter_mut().find(|(_, g)| g == f) {
                Some(t) => t.0 += c,
                None => terms.push((*c, f.clone())),
            }
        }
        terms.retain(|(c, _)| *c != 0);
        Poly(terms)
    }

    /// Equal as polynomials (whatever the order of terms and of factors within them).
    pub fn same(&self, o: &Poly) -> bool {
        fn canon(p: &Poly) -> Vec<(Vec<Dim>, i64)> {
            let mut terms: Vec<(Vec<Dim>, i64)> = vec![];
            for (c, f) in &p.0 {
                let mut f = f.clone();
                f.sort();
                match terms.iter_mut().find(|(g, _)| *g == f) {
                    Some(t) => t.1 += c,
                    None => terms.push((f, *c)),
                }
            }
            terms.retain(|(_, c)| *c != 0);
            terms.sort();
            terms
        }
        canon(self) == canon(o)
    }

    pub fn as_const(&self) -> Option<i64> {
        match self.0.as_slice() {
            [] => Some(0),
            [(c, f)] if f.is_empty() => Some(*c),
            _ => None,
        }
    }
}

impl std::fmt::Display for Poly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("0");
        }
        for (i, (c, fs)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" + ")?;
            }
            write!(f, "{c}")?;
            for d in fs {
                write!(f, "*({d})")?;
            }
        }
        Ok(())
    }
}

/// A strided view of a buffer: element `i` (a multi-index over the kernel's iteration
/// space) is at `offset + Σ i[d]·strides[d]` (in elements).
#[derive(Clone, Debug, PartialEq)]
pub struct Access {
    pub buf: u32,
    pub offset: Poly,
    pub strides: Vec<Poly>,
}

impl Access {
    /// The row-major contiguous view of a buffer of this shape.
    pub fn contiguous(buf: u32, shape: &[Dim]) -> Access {
        Access {
            buf,
            offset: Poly::zero(),
            strides: contiguous_strides(shape),
        }
    }

    /// Whether this is the buffer's row-major layout for `shape`, from its start.
    pub fn is_contiguous(&self, shape: &[Dim]) -> bool {
        self.offset == Poly::zero() && self.strides == contiguous_strides(shape)
    }
}

/// A dim as the runtime plan stores it: symbols by their index in `symbols`.
pub fn symdim(symbols: &[String], d: &Dim) -> egret_runtime::plan::SymDim {
    let terms = d
        .terms()
        .iter()
        .map(|(s, c)| {
            (
                symbols
                    .iter()
                    .position(|x| x == s)
                    .expect("symbol of the program") as u32,
                *c,
            )
        })
        .collect();
    egret_runtime::plan::SymDim {
        constant: d.constant(),
        terms,
    }
}

/// Row-major strides of a shape.
pub fn contiguous_strides(shape: &[Dim]) -> Vec<Poly> {
    let mut strides = vec![Poly::zero(); shape.len()];
    let mut acc = Poly::c(1);
    for i in (0..shape.len()).rev() {
        strides[i] = acc.clone();
        acc = acc.mul_dim(&shape[i]);
    }
    strides
}

/// An element count as a constant times a multiset of symbolic dims, for telling whether
/// runs of dims hold the same number of elements.
#[derive(Clone, Debug, PartialEq)]
struct Numel {
    k: i128,
    syms: Vec<Dim>,
}

impl Numel {
    fn of(d: &Dim) -> Numel {
        match d.as_const() {
            Some(c) => Numel {
                k: c as i128,
                syms: vec![],
            },
            None => Numel {
                k: 1,
                syms: vec![d.clone()],
            },
        }
    }

    fn times(&self, d: &Dim) -> Numel {
        let o = Numel::of(d);
        let mut syms = [self.syms.clone(), o.syms].concat();
        syms.sort();
        Numel {
            k: self.k * o.k,
            syms,
        }
    }

    /// Whether `o` is `self` times a whole number of elements.
    fn divides(&self, o: &Numel) -> bool {
        let mut rest = o.syms.clone();
        self.k != 0
            && o.k % self.k == 0
            && self
                .syms
                .iter()
                .all(|d| match rest.iter().position(|x| x == d) {
                    Some(i) => {
                        rest.remove(i);
                        true
                    }
                    None => false,
                })
    }
}

/// Whether dims with these strides and extents are laid out as one block, as a contiguous
/// array of their shape would be up to its innermost stride: each stride is its inner
/// neighbour's times that one's extent.
pub fn one_block(strides: &[Poly], dims: &[Dim]) -> bool {
    (1..strides.len()).all(|i| strides[i].mul_dim(&dims[i]).same(&strides[i - 1]))
}

/// The strides that view `outs` as a reshape of a view of `ins` with `strides`, with no
/// copy: possible when each run of input dims that becomes a run of output dims is laid
/// out as one block (each stride its inner neighbour's times that one's extent), as the
/// `[B, T, 576]` columns of a fused projection's `[B, T, 960]` output split into
/// `[B, T, 9, 64]` heads are. Dims of extent 1 take any stride. `None` when a copy is needed
/// (or the runs cannot be matched symbolically).
pub fn reshape_strides(strides: &[Poly], ins: &[Dim], outs: &[Dim]) -> Option<Vec<Poly>> {
    let one = |d: &Dim| d.as_const() == Some(1);
    if ins.iter().chain(outs).any(|d| d.as_const() == Some(0)) {
        return None;
    }
    let is: Vec<usize> = (0..ins.len()).filter(|&i| !one(&ins[i])).collect();
    let os: Vec<usize> = (0..outs.len()).filter(|&j| !one(&outs[j])).collect();
    let mut res = vec![Poly::zero(); outs.len()];
    let (mut a, mut b) = (0, 0);
    while a < is.len() || b < os.len() {
        if a == is.len() || b == os.len() {
            return None;
        }
        let (a0, b0) = (a, b);
        let (mut pa, mut pb) = (Numel::of(&ins[is[a]]), Numel::of(&outs[os[b]]));
        a += 1;
        b += 1;
        while pa != pb {
            if pa.divides(&pb) && a < is.len() {
                pa = pa.times(&ins[is[a]]);
                a += 1;
            } else if pb.divides(&pa) && b < os.len() {
                pb = pb.times(&outs[os[b]]);
                b += 1;
            } else {
                return None;
            }
        }
        let run: (Vec<Poly>, Vec<Dim>) = is[a0..a]
            .iter()
            .map(|&i| (strides[i].clone(), ins[i].clone()))
            .unzip();
        if !one_block(&run.0, &run.1) {
            return None;
        }
        let mut st = strides[is[a - 1]].clone();
        for &j in os[b0..b].iter().rev() {
            res[j] = st.clone();
            st = st.mul_dim(&outs[j]);
        }
    }
    Some(res)
}

/// A scalar expression over the kernel's iteration index.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Load(Access, ElemType),
    Const(f64, ElemType),
    /// The index along an axis of the iteration space.
    Iota(usize, ElemType),
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    Compare(CompareOp, Box<Expr>, Box<Expr>),
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// Conversion; `round` rounds an f32 to f16/bf16 precision.
    Cast(ElemType, Box<Expr>, Round),
    /// `silu(a) * b`.
    SwiGlu(Box<Expr>, Box<Expr>),
    /// Pieces `(len, e)` laid end to end along an axis of the iteration space: at index `i`
    /// along `axis`, the piece that starts at `start <= i < start + len` (its start the sum
    /// of the lengths before it), evaluated at `i - start` (every piece is evaluated at its
    /// index clamped into `0..len`, so its loads stay in bounds, and the right one selected).
    Concat(usize, Vec<(Dim, Expr)>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    None,
    F16,
    BF16,
}

impl Expr {
    pub fn elem(&self) -> ElemType {
        match self {
            Expr::Load(_, t) | Expr::Const(_, t) | Expr::Iota(_, t) | Expr::Cast(t, _, _) => *t,
            Expr::Unary(_, a) | Expr::Binary(_, a, _) | Expr::SwiGlu(a, _) => a.elem(),
            Expr::Compare(..) => ElemType::Bool,
            Expr::Select(_, a, _) => a.elem(),
            Expr::Concat(_, pieces) => pieces[0].1.elem(),
        }
    }

    /// The sub-expressions, in evaluation order (loads are numbered in this order).
    pub fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::Load(..) | Expr::Const(..) | Expr::Iota(..) => vec![],
            Expr::Unary(_, a) | Expr::Cast(_, a, _) => vec![a],
            Expr::Binary(_, a, b) | Expr::Compare(_, a, b) | Expr::SwiGlu(a, b) => vec![a, b],
            Expr::Select(c, a, b) => vec![c, a, b],
            Expr::Concat(_, pieces) => pieces.iter().map(|(_, e)| e).collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// `out[i] = expr(i)` for every `i` in `shape`, then `o[i] = e(i)` for each `(o, e)` of
    /// `also` in order (siblings merged by `schedule::merge_elementwise`: one pass over the
    /// elements, one launch). At each element every output is stored before the next is
    /// computed, so an expression may load an earlier output, at that same element only.
    Elementwise {
        out: Access,
        shape: Vec<Dim>,
        expr: Expr,
        also: Vec<(Access, Expr)>,
    },
    /// `out = reduce(src, axis)` with the axis kept as 1; `out` contiguous. `src` is an
    /// expression over `shape` (a load, or elementwise work fused into the reduction).
    Reduce {
        op: ReduceOp,
        out: u32,
        src: Expr,
        shape: Vec<Dim>,
        axis: usize,
    },
    /// Softmax along `axis`; `out` contiguous.
    Softmax {
        out: u32,
        src: Access,
        shape: Vec<Dim>,
        axis: usize,
    },
    /// `out[b, m, n] = Σ_k a[b, m, k] · w[b?, k, n]`; `batch` dims flattened in row-major order.
    /// With `nr > 0` (CPU), the GEMM micro-kernel over `KC × nr` slices of `w` that each
    /// thread packs as it goes, `a` row-contiguous; otherwise a dot product per output, `w`
    /// k-contiguous. With `sum_batch` (only with `nr > 0`), the batch entries' products are
    /// summed into one `[m, n]` result: a matmul summed over its batch axis, as a weight's
    /// gradient over a batch of sequences is. With `res` (GPU, `nr = 0`), the residual of an
    /// `add` that was the product's only use is added as each output is stored:
    /// `out[b, m, n] = Σ_k a[b, m, k] · w[b?, k, n] + res[b, m, n]`. With `part` (GPU, a
    /// constant k of at least `SPLIT_K_MIN_K`), a product with too few output tiles to fill the
    /// GPU splits k (`SPLIT_K`) and leaves its partial tiles in `part`, summed into `out`
    /// by the `MatMulCombine` that follows.
    MatMul {
        out: u32,
        a: Access,
        w: Access,
        batch: Vec<Dim>,
        m: Dim,
        n: Dim,
        k: Dim,
        shared_w: bool,
        nr: i64,
        sum_batch: bool,
        res: Option<Access>,
        part: Option<u32>,
    },
    /// `out[b, m, n] = Σ_s part[s, tile(b, m, n), m % T, n % T] (+ res[b, m, n])`: the
    /// k-slices of the split `MatMul` before it summed in order (`SPLIT_K`,
    /// `T = SPLIT_K_TILE`), plus that matmul's residual if it has one; nothing to do when
    /// the matmul did not split (its own paths add the residual then), and on the GPU not
    /// launched then (its paths have no blocks: `gpu_tiles`). The matmul is a `MatMul` or,
    /// its partial tiles scaled by the rows' norms, an `RmsNormMatMul`.
    MatMulCombine {
        out: u32,
        part: u32,
        batch: Vec<Dim>,
        m: Dim,
        n: Dim,
        res: Option<Access>,
    },
    /// `out[r, :] = w * (x[r, :] * rsqrt(mean(x[r, :]²) + eps))`, rows over `shape[..-1]`.
    RmsNorm {
        out: u32,
        x: Access,
        w: Access,
        shape: Vec<Dim>,
        eps: f64,
    },
    /// `matmul(rms_norm(x, g), w)`; with `g: None` the norm weight is already folded into
    /// `w` (`w'[k, n] = g[k]·w[k, n]`, computed once at load), so only the row scale remains.
    RmsNormMatMul {
        out: u32,
        x: Access,
        g: Option<Access>,
        w: Access,
        batch: Vec<Dim>,
        m: Dim,
        n: Dim,
        k: Dim,
        eps: f64,
        /// As for `MatMul` (`x` row-contiguous, `g` folded into the packed slices).
        nr: i64,
        /// As for `MatMul` (GPU): the partial tiles of a split k, each scaled by its row's
        /// norm, summed by the `MatMulCombine` that follows.
        part: Option<u32>,
    },
    /// Causal grouped-query attention, online softmax; see `Op::FusedAttention`. With few
    /// query rows (decode) the keys are split (`attn_splits`) and each split's partial result
    /// `(acc[dv], max, sum)` goes to `part`, merged by the `AttentionCombine` that follows.
    /// Unsplit on the CPU, with `nr > 0` (the schedule's panel width) and at least a
    /// micro-kernel block of query rows, blocks of rows against `nr` keys at a time, the
    /// products on the GEMM micro-kernel (as `AttentionBackward`'s).
    Attention {
        out: u32,
        part: u32,
        q: Access,
        k: Access,
        v: Access,
        pos: Access,
        dims: AttnDims,
        scale: f64,
        nr: i64,
    },
    /// Split-KV merge: `o = Σ_c acc_c·e^(m_c−M) / Σ_c l_c·e^(m_c−M)`, `M = max_c m_c`, over
    /// the splits in `part`; nothing to do when the attention did not split.
    AttentionCombine { out: u32, part: u32, dims: AttnDims },
    /// Attention's backward, FlashAttention-2's: with `grad` `None` each query row's
    /// log-sum-exp (`Op::AttentionLse`, `[B, H, T]` f32); otherwise the gradient with respect
    /// to `grad.wrt` (`Op::AttentionGrad`). Probabilities are recomputed from `q` and `k`,
    /// never stored. One unit per row of the result: a query row for the
    /// log-sum-exp and `dq` (over its visible keys), a key row for `dk` and `dv` (over the
    /// query rows that see it, of every head that reads its KV head). The CPU takes the
    /// pairs in tiles of rows against `nr` keys or queries, its products on the GEMM
    /// micro-kernel with panels of `nr` columns (`nr` is the schedule's panel width, which
    /// the CPU needs); the GPU pair by pair, a warp a unit (`nr` 0).
    AttentionBackward {
        out: u32,
        q: Access,
        k: Access,
        pos: Access,
        grad: Option<AttnGradIn>,
        dims: AttnDims,
        scale: f64,
        nr: i64,
    },
    /// Weights repacked for `Gemm`: `w` is a `[K, N]` view; column panels of `nr` columns are
    /// stored k-major, `out[(p·K + k)·nr + j] = w[k, p·nr + j]`, zero past `N`.
    PackPanels {
        out: u32,
        w: Access,
        k: i64,
        n: i64,
        nr: i64,
        store: PanelType,
    },
    /// `out[r, :] = a[r, :] · W` over `rows` rows (`a` k-contiguous with row stride
    /// `a.strides[0]`), `W` packed by `PackPanels` into `bp`; with `norm`, each row is scaled
    /// by `rsqrt(mean(a[r]²) + eps)` (the RMSNorm weight is folded into `W`). A register-
    /// blocked micro-kernel of `mr × nr` accumulators over cache blocks of `a` and `bp`.
    Gemm {
        out: u32,
        a: Access,
        bp: u32,
        rows: Vec<Dim>,
        k: i64,
        n: i64,
        nr: i64,
        norm: Option<f64>,
        panel: PanelType,
    },
    /// Rows of `table` (`[outer, len, inner]` around `axis`) picked by `idx`.
    Gather {
        out: u32,
        table: Access,
        idx: Access,
        table_shape: Vec<Dim>,
        idx_shape: Vec<Dim>,
        axis: usize,
        elem: ElemType,
    },
    /// `scatter_add`: `out[v, c] = Σ src[j, c]` over the positions `j` of `idx` (shape
    /// `idx_shape`) with `idx[j] = v`; `out` is `[rows, inner..]` and contiguous, `src`
    /// `[idx_shape.., inner..]`. Each thread owns a range of rows and sums in index order.
    ScatterAdd {
        out: u32,
        idx: Access,
        src: Access,
        idx_shape: Vec<Dim>,
        rows: Dim,
        inner: Vec<Dim>,
    },
}

/// How packed GEMM weights are stored: f32, rounded to bf16/f16 (half the bytes, which is
/// what decode is bound by), or quantised to int8 (a quarter); the GEMM computes in f32
/// whichever it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelType {
    F32,
    BF16,
    F16,
    /// Symmetric int8, like llama.cpp's Q8_0 (which keeps f16 scales and rounds halves away
    /// from zero): each column's weights in blocks of `Q8_BLOCK` rows of k share one f32
    /// scale `s = max|w| / 127`, and `q = round(w / s)` to nearest even.
    Q8,
}

/// Rows of k whose weights share one scale in a `PanelType::Q8` panel (Q8_0's block).
pub const Q8_BLOCK: i64 = 32;
// (a power of two: the micro-kernel finds a row's block by a shift, and `GEMM_KC` is a
// multiple of it)
const _: () = assert!((Q8_BLOCK as u64).is_power_of_two());

impl PanelType {
    /// Bytes of one stored weight.
    pub fn value_bytes(self) -> i64 {
        match self {
            PanelType::F32 => 4,
            PanelType::BF16 | PanelType::F16 => 2,
            PanelType::Q8 => 1,
        }
    }

    /// Bytes of a `k × n` weight packed in panels of `nr` columns: the values (`[panel][k]
    /// [nr]`), then for `Q8` the scales (f32, `[panel][k block][nr]`).
    pub fn panel_bytes(self, k: i64, n: i64, nr: i64) -> i64 {
        let panels = (n + nr - 1) / nr;
        let scales = match self {
            PanelType::Q8 => panels * ((k + Q8_BLOCK - 1) / Q8_BLOCK) * nr * 4,
            _ => 0,
        };
        panels * k * nr * self.value_bytes() + scales
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttnDims {
    pub b: Dim,
    pub h: i64,
    pub t: Dim,
    pub d: i64,
    pub hkv: i64,
    pub s: Dim,
    pub dv: i64,
    /// `out` is laid out `[B, T, H, Dv]` (tokens first), the attention's `[B, H, T, Dv]`
    /// value a permuted view of it: the permute back that follows attention in a
    /// transformer is then free, not a copy (`ScheduleOptions::attn_tokens_first`).
    pub tokens_first: bool,
}

/// The operands only attention's gradients read (`Kernel::AttentionBackward`), and which
/// gradient is wanted.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnGradIn {
    pub v: Access,
    /// The gradient of attention's output, `[B, H, T, Dv]`.
    pub dout: Access,
    /// f32 `[B, H, T]`: the rows' log-sum-exp and `Σ dout·out`.
    pub lse: Access,
    pub delta: Access,
    pub wrt: AttnGrad,
}

/// Split-KV decode attention: with at most `ATTN_SPLIT_UNITS` query rows (`B·H·T`), the
/// visible keys of each row are cut into `nsplit = clamp(S / ATTN_SPLIT_MIN_KEYS, 1,
/// ATTN_SPLITS)` contiguous chunks, so every thread has work even when there are fewer rows
/// than threads; the partial results (`dv + 2` floats each) fit a fixed buffer.
pub const ATTN_SPLIT_UNITS: i64 = 64;
/// The most splits per query row.
pub const ATTN_SPLITS: i64 = 16;
/// The fewest keys worth a split of their own.
pub const ATTN_SPLIT_MIN_KEYS: i64 = 128;

/// Split-K GPU matmuls (`Kernel::MatMul::part`): a plain matmul whose k is a constant of
/// at least `SPLIT_K_MIN_K` splits k into `SPLIT_K` slices where its output has fewer than
/// `SPLIT_K_MAX_TILES + 1` tiles of `SPLIT_K_TILE` square and more than a few rows (as the
/// GPU kernel decides: the small-tile kernel's threshold), each block a (tile, slice). A
/// training step at `T = 256` has many: its LM head's input gradient `[T × 49152]·[49152 ×
/// 576]`, and every layer's products into the model's width (`o_proj`, `down_proj` and
/// the input gradients of the others: `[T × k]·[k × 576]`, 36 tiles), 288 blocks of tiles
/// where the row-block kernel they took read the weights once per 4 rows. Slices of at
/// least 64 of k (four of the tiled kernel's k-steps; the last slices may be shorter, or
/// empty) are worth the partial tile each writes and the sum reads.
pub const SPLIT_K_MIN_K: i64 = SPLIT_K * 64;
/// Slices of k per tile of a split matmul.
pub const SPLIT_K: i64 = 8;
/// The most output tiles a split matmul has.
pub const SPLIT_K_MAX_TILES: i64 = 63;
/// Rows and columns of a split matmul's tiles.
pub const SPLIT_K_TILE: i64 = 64;

/// Floats of a split matmul's partial-tiles buffer.
pub fn split_k_part_len() -> i64 {
    SPLIT_K_MAX_TILES * SPLIT_K * SPLIT_K_TILE * SPLIT_K_TILE
}

impl AttnDims {
    /// Floats of the split-KV partial-results buffer.
    pub fn part_len(&self) -> i64 {
        ATTN_SPLIT_UNITS * ATTN_SPLITS * (self.dv + 2)
    }
}

impl Kernel {
    /// Work as a product of dims (elements touched or multiply-adds).
    pub fn work(&self) -> Vec<Dim> {
        match self {
            Kernel::Elementwise { shape, .. }
            | Kernel::Reduce { shape, .. }
            | Kernel::Softmax { shape, .. }
            | Kernel::RmsNorm { shape, .. } => shape.clone(),
            Kernel::MatMul { batch, m, n, k, .. }
            | Kernel::RmsNormMatMul { batch, m, n, k, .. } => batch
                .iter()
                .cloned()
                .chain([m.clone(), n.clone(), k.clone()])
                .collect(),
            Kernel::Attention { dims: d, .. } => vec![
                d.b.clone(),
                Dim::c(d.h),
                d.t.clone(),
                d.s.clone(),
                Dim::c(d.d + d.dv),
            ],
            Kernel::AttentionCombine { dims: d, .. } => vec![
                d.b.clone(),
                Dim::c(d.h),
                d.t.clone(),
                Dim::c(ATTN_SPLITS * d.dv),
            ],
            Kernel::MatMulCombine { batch, m, n, .. } => batch
                .iter()
                .cloned()
                .chain([m.clone(), n.clone(), Dim::c(SPLIT_K)])
                .collect(),
            Kernel::AttentionBackward { dims: d, grad, .. } => vec![
                d.b.clone(),
                Dim::c(d.h),
                d.t.clone(),
                d.s.clone(),
                Dim::c(if grad.is_some() {
                    2 * d.d + 2 * d.dv
                } else {
                    d.d
                }),
            ],
            Kernel::Gather {
                idx_shape,
                table_shape,
                axis,
                ..
            } => idx_shape
                .iter()
                .cloned()
                .chain(table_shape[axis + 1..].iter().cloned())
                .collect(),
            Kernel::ScatterAdd {
                idx_shape,
                rows,
                inner,
                ..
            } => [rows.clone()]
                .into_iter()
                .chain(idx_shape.iter().cloned())
                .chain(inner.iter().cloned())
                .collect(),
            Kernel::PackPanels { k, n, .. } => vec![Dim::c(*k), Dim::c(*n)],
            Kernel::Gemm { rows, k, n, .. } => rows
                .iter()
                .cloned()
                .chain([Dim::c(*k), Dim::c(*n)])
                .collect(),
        }
    }

    /// An elementwise kernel's outputs with their expressions, in the order it computes them
    /// (`out`, then `also`); none for other kernels.
    pub fn elementwise_outputs(&self) -> Vec<(&Access, &Expr)> {
        match self {
            Kernel::Elementwise {
                out, expr, also, ..
            } => std::iter::once((out, expr))
                .chain(also.iter().map(|(o, e)| (o, e)))
                .collect(),
            _ => vec![],
        }
    }

    /// One line saying what the kernel computes.
    pub fn describe(&self) -> String {
        match self {
            Kernel::Elementwise { shape, also, .. } if !also.is_empty() => {
                format!("elementwise {} ({} outputs)", dims(shape), also.len() + 1)
            }
            Kernel::Elementwise { shape, .. } => format!("elementwise {}", dims(shape)),
            Kernel::Reduce {
                op, shape, axis, ..
            } => format!("{} axis {axis} of {}", op.name(), dims(shape)),
            Kernel::Softmax { shape, axis, .. } => {
                format!("softmax axis {axis} of {}", dims(shape))
            }
            Kernel::MatMul {
                m,
                n,
                k,
                batch,
                nr,
                sum_batch,
                res,
                part,
                ..
            } => format!(
                "{}matmul {}[{m}x{k}]·[{k}x{n}]{}{}{}",
                if *nr > 0 { "packed " } else { "" },
                dims(batch),
                if *sum_batch {
                    " summed over the batch"
                } else {
                    ""
                },
                if res.is_some() { " + residual" } else { "" },
                if part.is_some() { " (may split k)" } else { "" }
            ),
            Kernel::MatMulCombine {
                m, n, batch, res, ..
            } => format!(
                "matmul split-k sum {}[{m}x{n}]{}",
                dims(batch),
                if res.is_some() { " + residual" } else { "" }
            ),
            Kernel::RmsNorm { shape, .. } => format!("rms_norm {}", dims(shape)),
            Kernel::RmsNormMatMul {
                m,
                n,
                k,
                batch,
                part,
                ..
            } => format!(
                "rms_norm_matmul {}[{m}x{k}]·[{k}x{n}]{}",
                dims(batch),
                if part.is_some() { " (may split k)" } else { "" }
            ),
            Kernel::Attention { dims: d, .. } => format!(
                "attention b={} h={} t={} s={} d={}",
                d.b, d.h, d.t, d.s, d.d
            ),
            Kernel::AttentionCombine { dims: d, .. } => format!(
                "attention split-KV merge b={} h={} t={} d={}",
                d.b, d.h, d.t, d.dv
            ),
            Kernel::AttentionBackward { dims: d, grad, .. } => format!(
                "attention {} b={} h={} t={} s={} d={}",
                match grad.as_ref().map(|g| g.wrt) {
                    None => "log-sum-exp",
                    Some(AttnGrad::Q) => "grad q",
                    Some(AttnGrad::K) => "grad k",
                    Some(AttnGrad::V) => "grad v",
                },
                d.b,
                d.h,
                d.t,
                d.s,
                d.d
            ),
            Kernel::Gather {
                table_shape,
                idx_shape,
                ..
            } => format!("gather {} by {}", dims(table_shape), dims(idx_shape)),
            Kernel::ScatterAdd {
                idx_shape,
                rows,
                inner,
                ..
            } => {
                let out: Vec<Dim> = [rows.clone()]
                    .into_iter()
                    .chain(inner.iter().cloned())
                    .collect();
                format!("scatter_add {} into {}", dims(idx_shape), dims(&out))
            }
            Kernel::PackPanels {
                k, n, nr, store, ..
            } => format!("pack [{k}x{n}] in {store:?} panels of {nr}"),
            Kernel::Gemm {
                rows, k, n, norm, ..
            } => format!(
                "{} {}x[{k}x{n}]",
                if norm.is_some() {
                    "gemm+rms_norm"
                } else {
                    "gemm"
                },
                dims(rows)
            ),
        }
    }
}

fn dims(d: &[Dim]) -> String {
    let v: Vec<String> = d.iter().map(|x| x.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// A scheduled graph: buffers (with roles and symbolic dims) and kernels in execution order.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub name: String,
    pub symbols: Vec<String>,
    pub buffers: Vec<BufferSpec>,
    pub kernels: Vec<Kernel>,
    /// Kernels that depend only on parameters (run once at load).
    pub init: Vec<bool>,
    pub outputs: Vec<(String, u32)>,
    /// Values grown in place between runs (see `StateSpec`).
    pub states: Vec<StateSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(s: &str) -> Vec<Dim> {
        s.split(',')
            .map(|d| match d.trim().parse::<i64>() {
                Ok(v) => Dim::c(v),
                Err(_) => Dim::sym(d.trim()),
            })
            .collect()
    }

    fn show(s: Option<Vec<Poly>>) -> String {
        match s {
            None => "copy".into(),
            Some(v) => v
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    #[test]
    fn reshape_of_a_view_keeps_strides_when_each_merged_run_is_one_block() {
        let t = || Poly::dim(&Dim::sym("T"));
        let contiguous = contiguous_strides(&dims("B, T, 576"));
        // The first 576 of 960 columns ([B, T, 960] rows), and those split into heads.
        let cols = vec![t().scale(960), Poly::c(960), Poly::c(1)];
        let heads = vec![t().scale(960), Poly::c(960), Poly::c(64), Poly::c(1)];
        // Heads permuted in front of T ([B, 9, T, 64] seen as [B, T, 9, 64]).
        let permuted = vec![t().scale(576), Poly::c(64), t().scale(64), Poly::c(1)];
        let transposed = vec![Poly::c(1), Poly::c(3)];
        let cases: [(&[Poly], &str, &str, &str); 9] = [
            // Contiguous: any reshape is a view.
            (
                &contiguous,
                "B, T, 576",
                "B, T, 9, 64",
                "576*(T), 576, 64, 1",
            ),
            // Splitting the columns keeps their row stride; merging them back is a view too.
            (&cols, "B, T, 576", "B, T, 9, 64", "960*(T), 960, 64, 1"),
            (&heads, "B, T, 9, 64", "B, T, 576", "960*(T), 960, 1"),
            // Runs that do not line up, or that are not one block, need a copy.
            (&cols, "B, T, 576", "B, 576, T", "copy"),
            (&permuted, "B, T, 9, 64", "B, T, 576", "copy"),
            (&transposed, "3, 2", "6", "copy"),
            (&contiguous, "B, T, 576", "T, B, 576", "copy"),
            // Extents of 1 come and go with any stride.
            (
                &cols,
                "B, T, 576",
                "B, 1, T, 576, 1",
                "960*(T), 0, 960, 1, 0",
            ),
            (&transposed, "3, 2", "3, 1, 2", "1, 0, 3"),
        ];
        for (strides, ins, outs, want) in cases {
            assert_eq!(
                show(reshape_strides(strides, &dims(ins), &dims(outs))),
                want,
                "{ins} -> {outs}"
            );
        }
    }
}
