//! The executable plan a compiled model carries: symbolic dims, buffers (inputs, parameters,
//! outputs, temporaries, values precomputed from parameters), and the ordered kernel calls.
//! Backends produce it; the executors in this crate run it. It is plain data (serde), so an
//! artifact can store it next to its kernels.

use serde::{Deserialize, Serialize};

/// `constant + Σ coef · symbols[index]`: a dimension known once the inputs are bound.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymDim {
    pub constant: i64,
    pub terms: Vec<(u32, i64)>,
}

impl SymDim {
    pub fn c(v: i64) -> SymDim {
        SymDim {
            constant: v,
            terms: vec![],
        }
    }

    pub fn eval(&self, syms: &[i64]) -> i64 {
        self.constant
            + self
                .terms
                .iter()
                .map(|(s, c)| syms.get(*s as usize).copied().unwrap_or(0) * c)
                .sum::<i64>()
    }

    /// The symbol's index if the dim is exactly one symbol.
    pub fn as_sym(&self) -> Option<u32> {
        match self.terms.as_slice() {
            [(s, 1)] if self.constant == 0 => Some(*s),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ElemType {
    F32,
    I64,
    /// One byte per element, 0 or 1.
    Bool,
    /// Two bytes per element (bf16 or f16 bits): packed weights only.
    Half,
    /// Bytes of packed quantised weights (int8 values, then their f32 scales): packed
    /// weights only.
    Bytes,
    /// bfloat16 values (GPU tensor-core matmul operands and graph inputs declared `bf16`
    /// when matmuls run on tensor cores): f32 values given for them are rounded to nearest
    /// even as they are copied in, and read back as f32.
    BF16,
}

impl ElemType {
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::I64 => 8,
            ElemType::Bool | ElemType::Bytes => 1,
            ElemType::Half | ElemType::BF16 => 2,
        }
    }
}

/// `x` rounded to bfloat16, nearest even (NaN stays NaN): its bits.
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// f32 values as bfloat16 bytes (little-endian), each rounded to nearest even.
pub fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter()
        .flat_map(|&x| bf16_bits(x).to_le_bytes())
        .collect()
}

/// bfloat16 bytes (little-endian) as f32 values (exact).
pub fn bf16_values(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufferRole {
    /// Bound by name from the caller's inputs.
    Input(String),
    /// Bound by name from the model's weights.
    Param(String),
    /// Computed once from parameters when weights are bound (merged or transposed weights).
    Init,
    /// Computed per run; its storage comes from the arena.
    Temp,
    /// Storage of the state `Plan::states[i]`, owned by the executor across runs.
    State(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferSpec {
    pub role: BufferRole,
    pub elem: ElemType,
    pub dims: Vec<SymDim>,
    /// Streamed in full by every run (packed weights): worth backing with huge pages.
    #[serde(default)]
    pub streamed: bool,
}

impl BufferSpec {
    pub fn bytes(&self, syms: &[i64]) -> usize {
        self.dims
            .iter()
            .map(|d| d.eval(syms).max(0) as usize)
            .product::<usize>()
            * self.elem.size()
    }
}

/// One kernel invocation: the kernel's symbol in the payload and its buffer operands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCall {
    pub symbol: String,
    /// Buffer ids, in the kernel's argument order.
    pub args: Vec<u32>,
    /// Runs once when weights are bound (all its operands are parameters or `Init`).
    pub init: bool,
    /// f32 scratch floats each thread needs.
    pub scratch_floats: usize,
    /// What the kernel computes, for `--explain`-style listings and profiles.
    pub what: String,
    /// Work estimate (elements or multiply-adds) as a product of dims: small kernels run on
    /// the calling thread alone, since waking the pool costs more than they do.
    pub work: Vec<SymDim>,
    /// GPU kernels: how many threads to launch, as a product of dims (the extent of the
    /// kernel's parallel loop), in blocks of `GPU_BLOCK`; empty for CPU kernels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<SymDim>,
    /// GPU kernels: bytes of dynamic shared memory each block is launched with (0: none;
    /// the executor raises the function's limit when it is over the default 48 KiB).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_bytes: u32,
    /// GPU kernels whose paths work in tiles (blocks of work): the paths' grids, in the
    /// order the kernel tests for them; a launch takes the first whose test holds, one
    /// block per tile (an older runtime ignores this and launches `threads`, which computes
    /// the same: kernels stride over their work by the grid).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiles: Vec<TileGrid>,
    /// GPU kernels whose first path (`tiles[0]`) needs far more registers and shared memory
    /// than their others (tensor-core matmul and attention tiles): the kernel compiled
    /// without that path, launched whenever a launch does not take it, so that the other
    /// paths run at the occupancy of their own needs (a kernel's register count and shared
    /// memory cover all its paths). It computes the same as `symbol` for any launch; an
    /// older runtime ignores it and launches `symbol` always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub light: Option<LightEntry>,
}

/// The entry point of a GPU kernel without its first path (`KernelCall::light`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LightEntry {
    pub symbol: String,
    /// Bytes of dynamic shared memory it is launched with (as `KernelCall::shared_bytes`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_bytes: u32,
}

/// How a GPU launch of a kernel call runs (`KernelCall::gpu_launch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuLaunch {
    /// Blocks of `GPU_BLOCK` threads; none where the path taken has nothing to do (a split
    /// matmul's sum where it did not split): no launch.
    pub blocks: u32,
    /// Whether it runs the call's light entry point (`KernelCall::light`).
    pub light: bool,
}

/// The most threads one GPU launch starts; a kernel with more parallel work gives each thread
/// several items (its loop splits the work over however many threads run).
pub const GPU_MAX_THREADS: i64 = 1 << 20;

impl KernelCall {
    /// Blocks of `GPU_BLOCK` threads a GPU launch of this kernel starts for symbol values
    /// `syms`: one per tile of the first of `tiles` whose test holds (none: the path has
    /// nothing to do, and the kernel is not launched), else enough for `threads`, at least
    /// one; at most `GPU_MAX_THREADS / GPU_BLOCK`.
    pub fn gpu_blocks(&self, syms: &[i64]) -> u32 {
        self.gpu_launch(syms).blocks
    }

    /// The blocks (`gpu_blocks`) and entry point of a GPU launch for symbol values `syms`:
    /// the light one (`light`) where there is one and the launch takes a path other than
    /// the first of `tiles`.
    pub fn gpu_launch(&self, syms: &[i64]) -> GpuLaunch {
        let max = GPU_MAX_THREADS / GPU_BLOCK as i64;
        let path = self
            .tiles
            .iter()
            .enumerate()
            .find_map(|(i, t)| t.blocks(syms).map(|b| (i, b)));
        let blocks = match path {
            Some((_, b)) => b.clamp(0, max),
            None => {
                let want: i64 = self.threads.iter().map(|d| d.eval(syms).max(1)).product();
                let b = (want.clamp(1, GPU_MAX_THREADS) as u64).div_ceil(u64::from(GPU_BLOCK));
                (b as i64).clamp(1, max)
            }
        };
        GpuLaunch {
            blocks: blocks as u32,
            light: self.light.is_some() && !matches!(path, Some((0, _))),
        }
    }

    /// The entry point and dynamic shared memory of a launch that does (`light`) or does
    /// not run the light entry point.
    pub fn gpu_entry(&self, light: bool) -> (&str, u32) {
        match (&self.light, light) {
            (Some(l), true) => (&l.symbol, l.shared_bytes),
            _ => (&self.symbol, self.shared_bytes),
        }
    }
}

/// `⌈extent / tile⌉`: tiles of `tile` along a dimension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileDim {
    pub extent: SymDim,
    pub tile: i64,
}

impl TileDim {
    fn count(&self, syms: &[i64]) -> i64 {
        (self.extent.eval(syms).max(0) as u64).div_ceil(self.tile.max(1) as u64) as i64
    }
}

/// One path of a GPU kernel, as its launch sees it: `blocks` tiles (the product of the
/// `TileDim`s), one block each, when every `(dims, bound)` of `when` holds (the product of
/// `dims` at least `bound`: the kernel's own test for taking that path; none: always).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileGrid {
    pub blocks: Vec<TileDim>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<(Vec<TileDim>, i64)>,
}

impl TileGrid {
    /// The block count for symbol values `syms`, or `None` where the kernel takes another
    /// path.
    pub fn blocks(&self, syms: &[i64]) -> Option<i64> {
        let product = |dims: &[TileDim]| dims.iter().map(|d| d.count(syms)).product::<i64>();
        self.when
            .iter()
            .all(|(dims, bound)| product(dims) >= *bound)
            .then(|| product(&self.blocks))
    }
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// Threads per block of every GPU launch: part of the contract between the PTX a backend
/// generates (kernels that share memory within a block are written for it) and the CUDA
/// executor that launches it.
pub const GPU_BLOCK: u32 = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub symbols: Vec<String>,
    pub buffers: Vec<BufferSpec>,
    pub kernels: Vec<KernelCall>,
    /// Named results and the buffer holding each.
    pub outputs: Vec<(String, u32)>,
    /// Values grown in place from run to run (a KV cache).
    #[serde(default)]
    pub states: Vec<StateSpec>,
}

/// A value the graph spells `output = concat(input, new, axis)` (a KV cache: `past_key.0`
/// in, `present_key.0` out), kept by the executor in one buffer between runs instead of being
/// copied in and out: the buffer's extent along `axis` is a capacity (the symbol
/// `capacity`), a run appends `new` after the first `len` entries, and the value after the
/// run is the input of the next. Strides of every view of it are in terms of the capacity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSpec {
    /// Name of the value before a run (the graph input).
    pub input: String,
    /// Name of the value after a run (the graph output).
    pub output: String,
    /// The buffer (role `State`) holding it; its dims are `dims` with `capacity` at `axis`.
    pub buffer: u32,
    pub axis: usize,
    /// Dims of the input; the one at `axis` is a lone symbol, its current length.
    pub dims: Vec<SymDim>,
    /// Dims of the output.
    pub out_dims: Vec<SymDim>,
    /// Symbol holding the allocated extent along `axis`.
    pub capacity: u32,
}

/// Capacity a state starts with, along its growing axis: a KV cache of a short prompt is
/// not re-laid out at the first few tokens.
pub const STATE_MIN_CAPACITY: usize = 64;

/// What a run needs done to a state before it starts (`StateSpec::growth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateGrowth {
    /// Entries along the axis to keep (the value's length before the run).
    pub len: usize,
    /// The new capacity.
    pub cap: usize,
    /// The value's shape after the run (its extent along the axis within `cap`).
    pub out: Vec<usize>,
}

impl StateSpec {
    /// The symbol holding the current length along `axis`.
    pub fn len_symbol(&self) -> Option<u32> {
        self.dims.get(self.axis).and_then(SymDim::as_sym)
    }

    /// The capacity for `need` entries when `current` is allocated: doubling, from
    /// `STATE_MIN_CAPACITY`.
    pub fn capacity_for(need: usize, current: usize) -> usize {
        need.next_power_of_two()
            .max(STATE_MIN_CAPACITY)
            .max(current)
    }

    /// The value's shape after a run with these symbols.
    pub fn out_shape(&self, syms: &[i64]) -> Vec<usize> {
        self.out_dims
            .iter()
            .map(|d| d.eval(syms).max(0) as usize)
            .collect()
    }

    /// Checks a held value of shape `held` (empty: none yet) with capacity `cap` against a
    /// run with these symbols; `Some` when it must be (re-)laid out first: it has no storage
    /// yet or the run would outgrow the capacity.
    pub fn growth(
        &self,
        syms: &[i64],
        held: &[usize],
        cap: usize,
    ) -> Result<Option<StateGrowth>, String> {
        let want: Vec<usize> = self
            .dims
            .iter()
            .map(|d| d.eval(syms).max(0) as usize)
            .collect();
        if !held.is_empty() && held != want {
            return Err(format!(
                "state `{}` holds shape {held:?} but this run needs {want:?}; reset the states to start a new sequence",
                self.input
            ));
        }
        let out = self.out_shape(syms);
        let need = out[self.axis];
        Ok((cap < need || held.is_empty()).then(|| StateGrowth {
            len: want[self.axis],
            cap: StateSpec::capacity_for(need, cap),
            out,
        }))
    }
}

impl Plan {
    /// The buffer of the parameter or input named `name` (the first such in the plan).
    pub fn named_buffer(&self, name: &str) -> Option<usize> {
        self.buffers.iter().position(
            |b| matches!(&b.role, BufferRole::Param(n) | BufferRole::Input(n) if n == name),
        )
    }

    /// The memory plan's peak: the most bytes of per-run temporaries (`Temp` buffers) live
    /// at once as the kernels run in order, each buffer live from the first kernel that
    /// touches it to the last; buffers for which `exclude` holds are not counted.
    pub fn peak_temp_bytes(&self, syms: &[i64], exclude: impl Fn(u32) -> bool) -> u64 {
        let nb = self.buffers.len();
        let (mut first, mut last) = (vec![usize::MAX; nb], vec![0usize; nb]);
        for (k, call) in self.kernels.iter().enumerate().filter(|(_, c)| !c.init) {
            for &a in &call.args {
                let a = a as usize;
                first[a] = first[a].min(k);
                last[a] = last[a].max(k);
            }
        }
        let n = self.kernels.len();
        let mut delta = vec![0i128; n + 1];
        for b in 0..nb {
            if self.buffers[b].role != BufferRole::Temp
                || first[b] == usize::MAX
                || exclude(b as u32)
            {
                continue;
            }
            let sz = self.buffers[b].bytes(syms) as i128;
            delta[first[b]] += sz;
            delta[last[b] + 1] -= sz;
        }
        let (mut cur, mut peak) = (0i128, 0i128);
        for d in delta {
            cur += d;
            peak = peak.max(cur);
        }
        peak as u64
    }

    /// The symbol values to lay the arena out for: each rounded up to a power of two when
    /// every buffer only grows with the symbols (that layout then serves every smaller value,
    /// so a decode loop whose cache grows by one each step re-plans only at each doubling);
    /// else the values themselves.
    pub fn layout_symbols(&self, syms: &[i64]) -> Vec<i64> {
        let monotone = self
            .buffers
            .iter()
            .all(|b| b.dims.iter().all(|d| d.terms.iter().all(|t| t.1 >= 0)));
        if monotone {
            syms.iter()
                .map(|&v| (v.max(1) as u64).next_power_of_two() as i64)
                .collect()
        } else {
            syms.to_vec()
        }
    }

    /// The memory plan for these symbol values: each per-run temporary (`Temp`) gets an
    /// offset in one arena, live from the first kernel that touches it to the last (outputs
    /// to the end), largest first, each at the lowest offset (a multiple of `align`) that no
    /// buffer live at the same time overlaps. Returns the offsets (by buffer) and the size.
    pub fn arena_layout(&self, syms: &[i64], align: usize) -> (Vec<usize>, usize) {
        let nb = self.buffers.len();
        let (mut first, mut last) = (vec![usize::MAX; nb], vec![0usize; nb]);
        for (k, call) in self.kernels.iter().enumerate() {
            if call.init {
                continue;
            }
            for &a in &call.args {
                let a = a as usize;
                first[a] = first[a].min(k);
                last[a] = last[a].max(k);
            }
        }
        for (_, b) in &self.outputs {
            last[*b as usize] = usize::MAX;
        }
        let mut temps: Vec<usize> = (0..nb)
            .filter(|&b| self.buffers[b].role == BufferRole::Temp && first[b] != usize::MAX)
            .collect();
        let size = |b: usize| self.buffers[b].bytes(syms).div_ceil(align) * align;
        temps.sort_by_key(|&b| std::cmp::Reverse(size(b)));
        let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // (offset, size, first, last)
        let mut offsets = vec![0usize; nb];
        let mut arena = 0;
        for b in temps {
            let (sz, f, l) = (size(b), first[b], last[b]);
            let mut conflicts: Vec<(usize, usize)> = placed
                .iter()
                .filter(|p| p.2 <= l && f <= p.3)
                .map(|p| (p.0, p.1))
                .collect();
            conflicts.sort();
            let mut off = 0;
            for (o, s) in conflicts {
                if off + sz <= o {
                    break;
                }
                off = off.max(o + s);
            }
            offsets[b] = off;
            arena = arena.max(off + sz);
            placed.push((off, sz, f, l));
        }
        (offsets, arena)
    }

    /// Binds symbols from input shapes: every input dim that is a lone symbol fixes it; the
    /// rest are checked. `shapes` gives each input's shape by name; `fixed` gives symbols
    /// known otherwise (a state's length and capacity).
    pub fn bind_symbols(
        &self,
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
        fixed: &[(u32, i64)],
    ) -> Result<Vec<i64>, String> {
        let mut syms: Vec<Option<i64>> = vec![None; self.symbols.len()];
        for &(s, v) in fixed {
            if let Some(x) = syms.get_mut(s as usize) {
                *x = Some(v);
            }
        }
        for b in &self.buffers {
            let BufferRole::Input(name) = &b.role else {
                continue;
            };
            let shape = shape_of(name).ok_or_else(|| format!("missing input `{name}`"))?;
            if shape.len() != b.dims.len() {
                return Err(format!(
                    "input `{name}` has rank {}, expected {}",
                    shape.len(),
                    b.dims.len()
                ));
            }
            for (d, &n) in b.dims.iter().zip(&shape) {
                if let Some(s) = d.as_sym() {
                    match syms[s as usize] {
                        Some(v) if v != n as i64 => {
                            return Err(format!(
                                "input `{name}`: dimension {} is {n} here but {v} elsewhere",
                                self.symbols[s as usize]
                            ));
                        }
                        _ => syms[s as usize] = Some(n as i64),
                    }
                }
            }
        }
        // A symbol no buffer mentions (a plan compiled with a sibling's symbols) stays 0.
        let used = |i: usize| {
            self.buffers.iter().any(|b| {
                b.dims
                    .iter()
                    .any(|d| d.terms.iter().any(|t| t.0 as usize == i))
            })
        };
        let syms: Vec<i64> = syms
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Some(v) => Ok(v),
                None if !used(i) => Ok(0),
                None => Err(format!(
                    "symbol `{}` is not fixed by any input",
                    self.symbols[i]
                )),
            })
            .collect::<Result<_, _>>()?;
        for b in &self.buffers {
            let BufferRole::Input(name) = &b.role else {
                continue;
            };
            let shape = shape_of(name).unwrap_or_default();
            let want: Vec<usize> = b
                .dims
                .iter()
                .map(|d| d.eval(&syms).max(0) as usize)
                .collect();
            if shape != want {
                return Err(format!(
                    "input `{name}` has shape {shape:?}, expected {want:?}"
                ));
            }
        }
        Ok(syms)
    }
}

impl Plan {
    /// Checks that every index in the plan is in range, so running it cannot index out of
    /// bounds whatever the manifest says.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nb = self.buffers.len();
        let ns = self.symbols.len();
        let dims_ok = |ds: &[SymDim]| {
            ds.iter()
                .all(|d| d.terms.iter().all(|t| (t.0 as usize) < ns))
        };
        for (i, b) in self.buffers.iter().enumerate() {
            if !dims_ok(&b.dims) {
                return Err(format!("buffer {i} uses a symbol out of range"));
            }
            if let BufferRole::State(s) = b.role {
                if s as usize >= self.states.len() {
                    return Err(format!("buffer {i} names state {s}, which does not exist"));
                }
            }
        }
        for k in &self.kernels {
            if let Some(a) = k.args.iter().find(|&&a| a as usize >= nb) {
                return Err(format!("kernel `{}` names buffer {a} of {nb}", k.symbol));
            }
            if !dims_ok(&k.work) {
                return Err(format!("kernel `{}` uses a symbol out of range", k.symbol));
            }
        }
        if let Some((n, b)) = self.outputs.iter().find(|(_, b)| *b as usize >= nb) {
            return Err(format!("output `{n}` names buffer {b} of {nb}"));
        }
        // A per-run temporary gets memory only where a kernel (other than an init one)
        // touches it: an output that none computes would be read from nowhere.
        if let Some((n, _)) = self.outputs.iter().find(|(_, b)| {
            self.buffers[*b as usize].role == BufferRole::Temp
                && !self.kernels.iter().any(|k| !k.init && k.args.contains(b))
        }) {
            return Err(format!("output `{n}` is computed by no kernel"));
        }
        for (i, st) in self.states.iter().enumerate() {
            let ok = (st.buffer as usize) < nb
                && self.buffers[st.buffer as usize].role == BufferRole::State(i as u32)
                && (st.capacity as usize) < ns
                && st.axis < st.dims.len()
                && st.dims.len() == st.out_dims.len()
                && st.dims.len() == self.buffers[st.buffer as usize].dims.len()
                && st.len_symbol().is_some()
                && dims_ok(&st.dims)
                && dims_ok(&st.out_dims);
            if !ok {
                return Err(format!("state `{}` is inconsistent", st.input));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matmul-like call over `[M, K]·[K, N]` (symbols `M`, `N`): 128 × 256 tiles where
    /// `M > 32` and there are at least 132 tiles of 128 × 128; else (`rows`) a block per 4
    /// rows × 32 columns; with neither, a thread per `(M, N)`.
    fn tiled_call(rows: bool) -> KernelCall {
        let (m, n) = (
            SymDim {
                constant: 0,
                terms: vec![(0, 1)],
            },
            SymDim {
                constant: 0,
                terms: vec![(1, 1)],
            },
        );
        let tile = |d: &SymDim, t| TileDim {
            extent: d.clone(),
            tile: t,
        };
        let mut tiles = vec![TileGrid {
            blocks: vec![tile(&m, 128), tile(&n, 256)],
            when: vec![
                (vec![tile(&m, 1)], 33),
                (vec![tile(&m, 128), tile(&n, 128)], 132),
            ],
        }];
        if rows {
            tiles.push(TileGrid {
                blocks: vec![tile(&m, 4), tile(&n, 32)],
                when: vec![],
            });
        }
        KernelCall {
            symbol: "k".into(),
            args: vec![],
            init: false,
            scratch_floats: 0,
            what: "matmul".into(),
            work: vec![],
            threads: vec![m.clone(), n.clone()],
            shared_bytes: 0,
            tiles,
            light: None,
        }
    }

    #[test]
    fn a_tiled_launch_starts_one_block_per_tile_of_the_path_the_kernel_takes() {
        let call = tiled_call(true);
        // 32 × 16 tiles of 128 × 256 (and 32 × 32 ≥ 132 of 128 × 128).
        assert_eq!(call.gpu_blocks(&[4096, 4096]), 512);
        // partial tiles count: ⌈1000/128⌉ · ⌈3000/256⌉ = 8 · 12
        assert_eq!(call.gpu_blocks(&[1000, 3000]), 96);
        // 32 rows, or too few tiles (1 · 32 and 2 · 4 under 132): the row path
        assert_eq!(call.gpu_blocks(&[32, 4096]), 8 * 128);
        assert_eq!(call.gpu_blocks(&[47, 4096]), 12 * 128);
        assert_eq!(call.gpu_blocks(&[256, 500]), 64 * 16);
        // capped as `threads` is
        let huge = call.gpu_blocks(&[1 << 20, 1 << 20]);
        assert_eq!(huge as i64, GPU_MAX_THREADS / GPU_BLOCK as i64);
        // a path with no tiles: no launch
        assert_eq!(call.gpu_blocks(&[0, 4096]), 0);
        // no path's test holds, or no paths: `threads`
        let only_tiled = tiled_call(false);
        assert_eq!(only_tiled.gpu_blocks(&[32, 4096]), 32 * 4096 / 256);
        let mut plain = tiled_call(true);
        plain.tiles.clear();
        assert_eq!(plain.gpu_blocks(&[4096, 4096]), 4096);
        assert_eq!(plain.gpu_blocks(&[0, 0]), 1);
    }

    #[test]
    fn a_launch_off_the_first_path_runs_the_light_entry_point() {
        let mut call = tiled_call(true);
        call.shared_bytes = 200_000;
        // (no light entry: always the kernel's own)
        assert!(!call.gpu_launch(&[32, 4096]).light);
        assert_eq!(call.gpu_entry(false), ("k", 200_000));
        call.light = Some(LightEntry {
            symbol: "k_light".into(),
            shared_bytes: 0,
        });
        assert_eq!(
            call.gpu_launch(&[4096, 4096]),
            GpuLaunch {
                blocks: 512,
                light: false
            }
        );
        // the row path, and no path at all (`threads`)
        assert_eq!(
            call.gpu_launch(&[32, 4096]),
            GpuLaunch {
                blocks: 8 * 128,
                light: true
            }
        );
        call.tiles.truncate(1);
        assert_eq!(
            call.gpu_launch(&[32, 4096]),
            GpuLaunch {
                blocks: 32 * 4096 / 256,
                light: true
            }
        );
        assert_eq!(call.gpu_entry(true), ("k_light", 0));
        assert_eq!(call.gpu_entry(false), ("k", 200_000));
    }
}
