//! The CPU executor: runs a `Plan` whose kernels are native functions (JIT-compiled or from
//! an artifact's shared library). Parameters are bound once (and `Init` kernels run then);
//! each run binds the inputs, lays temporaries out in one arena by liveness, launches every
//! kernel on the thread pool and copies the outputs out. Outputs named by `set_feedback`
//! (a training step's new weights and moments) are not copied: they are written into
//! executor-owned storage that becomes the next run's parameter or input by a swap.
//!
//! Kernel ABI (what the backends generate):
//! `i32 kernel(u8** bufs, const i64* syms, i64 tid, i64 nthreads, f32* scratch)` — `bufs`
//! holds the kernel's operands in `KernelCall::args` order, `syms` the symbol values,
//! `scratch` this thread's scratch floats; a non-zero return is an error code.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Result, RuntimeError};
use crate::plan::{BufferRole, ElemType, KernelCall, Plan, StateSpec};
use crate::pool::Pool;

/// A compiled kernel: `f(buffers, symbols, tid, nthreads, scratch, work)`, run once on every
/// thread of a launch (`tid` in `0..nthreads`), with the thread's own scratch slice and the
/// launch's work counter (an `i64` all its threads share, zero when the launch starts, from
/// which kernels may claim units of work). Returns 0, or an error code (`kernel_error`).
pub type KernelFn =
    unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64, *mut f32, *mut i64) -> i32;

/// Runs a plan's kernel calls instead of the thread pool: how the CPU executor can drive
/// kernels compiled for another execution model (GPU kernels on a simulator of the GPU's
/// threads, say) while it keeps the plan's buffers, states and outputs as usual.
pub trait Launcher {
    /// Runs `f`, the kernel of `call`, on operand table `args` and symbol values `syms`;
    /// returns 0 or the kernel's error code (`kernel_error`), or why the launcher itself
    /// failed.
    fn launch(
        &mut self,
        f: KernelFn,
        call: &KernelCall,
        args: &[*mut u8],
        syms: &[i64],
    ) -> std::result::Result<i32, String>;
}

/// Kernels with less work than this (elements or multiply-adds) run on the calling thread:
/// waking the other threads costs a few microseconds, about this much work.
const PARALLEL_MIN_WORK: i64 = 1 << 15;

/// Buffers are placed at multiples of this (a cache line, and AVX-512 alignment).
const ALIGN: usize = 64;

/// Kernels loaded from a shared library (an artifact's CPU payload). The library stays
/// loaded as long as this value lives; keep it beside the executor.
pub struct KernelLibrary {
    _lib: libloading::Library,
    pub fns: Vec<KernelFn>,
}

/// Loads `path` and resolves every kernel the plan calls.
pub fn load_kernel_library(path: &std::path::Path, plan: &Plan) -> Result<KernelLibrary> {
    // SAFETY: loading runs the library's initialisers; egret's kernel libraries have none
    // beyond the C runtime's.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        RuntimeError::Invalid(format!(
            "cannot load kernel library {}: {e}",
            path.display()
        ))
    })?;
    let mut fns = Vec::with_capacity(plan.kernels.len());
    for k in &plan.kernels {
        // SAFETY: the symbol was generated with exactly the KernelFn signature.
        let f: libloading::Symbol<KernelFn> =
            unsafe { lib.get(k.symbol.as_bytes()) }.map_err(|e| {
                RuntimeError::Invalid(format!(
                    "kernel library {} lacks `{}`: {e}",
                    path.display(),
                    k.symbol
                ))
            })?;
        fns.push(*f);
    }
    Ok(KernelLibrary { _lib: lib, fns })
}

/// Kernel error codes and what they mean.
fn kernel_error(code: i32, what: &str) -> RuntimeError {
    let msg = match code {
        1 => "an index is out of range (a token id beyond the vocabulary?)".to_string(),
        c => format!("error code {c}"),
    };
    RuntimeError::Invalid(format!("kernel `{what}` failed: {msg}"))
}

/// Streamed buffers at least this large are anonymous memory maps advised to use transparent
/// huge pages: decode streams the packed weights every token, and 4 KiB pages cost a TLB miss
/// every 4 KiB of that stream. (Only those: faulting in huge pages costs start-up time.)
const HUGE_PAGE_MIN: usize = 4 << 20;

/// 64-byte-aligned zeroed storage (page-aligned and huge-page-advised when large). Heap
/// storage comes from `alloc_zeroed`, whose large blocks are fresh zero pages committed
/// only as they are touched (an arena laid out for more than a run uses pays for what it
/// uses), and whose failure is an error here instead of an abort.
enum Aligned {
    Heap {
        ptr: std::ptr::NonNull<u8>,
        layout: std::alloc::Layout,
        len: usize,
    },
    Map {
        map: memmap2::MmapMut,
        len: usize,
    },
}

impl Aligned {
    /// No storage (nothing allocated: a dangling, aligned pointer).
    fn empty() -> Aligned {
        let ptr = std::ptr::NonNull::new(std::ptr::without_provenance_mut(ALIGN));
        Aligned::Heap {
            ptr: ptr.unwrap_or(std::ptr::NonNull::dangling()),
            layout: std::alloc::Layout::new::<()>(),
            len: 0,
        }
    }

    /// `len` zeroed bytes, or an error where memory cannot hold them.
    fn new(len: usize) -> Result<Aligned> {
        Aligned::with_pages(len, false)
    }

    fn with_pages(len: usize, huge: bool) -> Result<Aligned> {
        if huge && len >= HUGE_PAGE_MIN {
            if let Ok(map) = memmap2::MmapMut::map_anon(len) {
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage);
                return Ok(Aligned::Map { map, len });
            }
        }
        let oom = || RuntimeError::Invalid(format!("out of memory: cannot allocate {len} bytes"));
        if len == 0 {
            return Ok(Aligned::empty());
        }
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).map_err(|_| oom())?;
        // SAFETY: the layout's size is not zero.
        let ptr =
            std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or_else(oom)?;
        Ok(Aligned::Heap { ptr, layout, len })
    }

    fn len(&self) -> usize {
        match self {
            Aligned::Heap { len, .. } | Aligned::Map { len, .. } => *len,
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match self {
            Aligned::Heap { ptr, .. } => ptr.as_ptr(),
            Aligned::Map { map, .. } => map.as_mut_ptr(),
        }
    }

    fn as_ptr(&self) -> *const u8 {
        match self {
            Aligned::Heap { ptr, .. } => ptr.as_ptr(),
            Aligned::Map { map, .. } => map.as_ptr(),
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        match self {
            Aligned::Heap { ptr, layout, len } if *len > 0 => {
                // SAFETY: allocated by `alloc_zeroed` with this layout, freed once.
                unsafe { std::alloc::dealloc(ptr.as_ptr(), *layout) };
            }
            _ => {}
        }
    }
}

/// Host data for an input or an output.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HostValue {
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// Storage of a buffer that outlives runs: parameters are shared with the caller (never
/// written), `Init` values owned.
enum Storage {
    Owned(Aligned),
    Shared(Arc<Vec<f32>>),
}

impl Storage {
    fn ptr(&mut self) -> *mut u8 {
        match self {
            Storage::Owned(a) => a.ptr(),
            // Kernels only read parameters; the pointer is never written through.
            Storage::Shared(v) => v.as_ptr() as *mut u8,
        }
    }

    fn as_ptr(&self) -> *const u8 {
        match self {
            Storage::Owned(a) => a.as_ptr(),
            Storage::Shared(v) => v.as_ptr() as *const u8,
        }
    }
}

/// An output kept as the next run's value of a parameter or an input (`set_feedback`).
struct Feedback {
    /// The output's buffer (a per-run temporary).
    out: u32,
    /// The parameter's or input's buffer it replaces.
    target: u32,
    /// Where the next run writes the output: the target's storage of two runs ago.
    spare: Option<Aligned>,
}

/// Copies `n` elements of type `T` at `p` out.
///
/// SAFETY: `p` must address `n` initialised, aligned values of `T`.
unsafe fn copy_out<T: Copy>(p: *const u8, n: usize) -> Vec<T> {
    std::slice::from_raw_parts(p as *const T, n).to_vec()
}

/// A state's storage (see `StateSpec`): its value's shape now and its capacity.
struct StateBuf {
    data: Aligned,
    /// Empty until the first run.
    shape: Vec<usize>,
    cap: usize,
}

impl StateBuf {
    fn empty() -> StateBuf {
        StateBuf {
            data: Aligned::empty(),
            shape: vec![],
            cap: 0,
        }
    }

    /// Re-lays the value out for `dims` (the logical shape, `axis` included) and `cap`,
    /// keeping the first `len` entries along `axis` of the current value.
    fn relayout(
        &mut self,
        axis: usize,
        dims: &[usize],
        len: usize,
        cap: usize,
        elem: usize,
    ) -> Result<()> {
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product::<usize>() * elem;
        let mut data = Aligned::new(outer * cap * inner)?;
        if self.cap > 0 && len > 0 {
            let (src, dst) = (self.data.ptr(), data.ptr());
            for o in 0..outer {
                // SAFETY: both buffers hold `outer` rows of their capacity; len ≤ both.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.add(o * self.cap * inner),
                        dst.add(o * cap * inner),
                        len * inner,
                    )
                };
            }
        }
        self.data = data;
        self.cap = cap;
        Ok(())
    }
}

struct Layout {
    syms: Vec<i64>,
    offsets: Vec<usize>,
    arena_bytes: usize,
}

pub struct CpuExecutor {
    plan: Plan,
    fns: Vec<KernelFn>,
    pool: Pool,
    persistent: Vec<Option<Storage>>,
    arena: Aligned,
    scratch: Aligned,
    /// The work counter of the launch under way (`KernelFn`), zeroed before each.
    work: Box<WorkCounter>,
    layout: Option<Layout>,
    states: Vec<StateBuf>,
    feedback: Vec<Feedback>,
    /// Inputs that are feedback targets, kept between runs: name → (shape, storage).
    resident: HashMap<String, (Vec<usize>, Aligned)>,
    /// Runs the kernels instead of the pool when set (`with_launcher`).
    launcher: Option<Box<dyn Launcher + Send>>,
}

// SAFETY: kernel functions are plain code; buffers are owned and only touched inside `run`.
unsafe impl Send for CpuExecutor {}

/// A launch's work counter, alone in its cache lines (threads hammer it while claiming).
#[repr(align(128))]
struct WorkCounter(std::sync::atomic::AtomicI64);

struct SendPtr<T>(*const T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl CpuExecutor {
    /// `fns[i]` implements `plan.kernels[i]`.
    pub fn new(plan: Plan, fns: Vec<KernelFn>, threads: usize) -> Result<CpuExecutor> {
        if fns.len() != plan.kernels.len() {
            return Err(RuntimeError::Invalid(format!(
                "{} kernels for a plan of {}",
                fns.len(),
                plan.kernels.len()
            )));
        }
        let n = plan.buffers.len();
        let states = plan.states.iter().map(|_| StateBuf::empty()).collect();
        Ok(CpuExecutor {
            plan,
            fns,
            pool: Pool::new(threads)?,
            persistent: (0..n).map(|_| None).collect(),
            arena: Aligned::empty(),
            scratch: Aligned::empty(),
            work: Box::new(WorkCounter(std::sync::atomic::AtomicI64::new(0))),
            layout: None,
            states,
            feedback: vec![],
            resident: HashMap::new(),
            launcher: None,
        })
    }

    /// An executor whose kernel calls `launcher` runs (one host thread; no pool).
    pub fn with_launcher(
        plan: Plan,
        fns: Vec<KernelFn>,
        launcher: Box<dyn Launcher + Send>,
    ) -> Result<CpuExecutor> {
        let mut ex = CpuExecutor::new(plan, fns, 1)?;
        ex.launcher = Some(launcher);
        Ok(ex)
    }

    /// Keeps outputs as the next run's values of parameters or inputs, by name: `(output,
    /// target)` pairs, a training step's `new.X → X`, `new_m.X → m.X`. Each run writes such
    /// an output into storage of the executor's, which then becomes the target by a swap
    /// (nothing is copied, and the output is not returned); parameters changed this way rerun
    /// the `Init` kernels. An input fed back is copied in when a run gives it and kept while
    /// no run does. The output and its target must have the same element type and shape.
    pub fn set_feedback(&mut self, pairs: Vec<(String, String)>) -> Result<()> {
        let mut feedback = vec![];
        for (out, target) in pairs {
            let bad = |why: &str| {
                RuntimeError::Invalid(format!(
                    "output `{out}` cannot be fed back to `{target}`: {why}"
                ))
            };
            let ob = self
                .plan
                .outputs
                .iter()
                .find(|(n, _)| *n == out)
                .map(|(_, b)| *b)
                .ok_or_else(|| bad("there is no such output"))?;
            let tb = self
                .plan
                .named_buffer(&target)
                .ok_or_else(|| bad("there is no such parameter or input"))?;
            let (o, t) = (&self.plan.buffers[ob as usize], &self.plan.buffers[tb]);
            if o.role != BufferRole::Temp {
                return Err(bad("the output is not computed by the run"));
            }
            if o.elem != t.elem || o.dims != t.dims {
                return Err(bad("their element types or shapes differ"));
            }
            if feedback.iter().any(|f: &Feedback| f.target == tb as u32) {
                return Err(bad("the target is fed twice"));
            }
            feedback.push(Feedback {
                out: ob,
                target: tb as u32,
                spare: None,
            });
        }
        self.feedback = feedback;
        self.resident.clear();
        Ok(())
    }

    /// The current value of a parameter or of an input kept by `set_feedback`, as f32 (a
    /// bf16 input widened).
    pub fn read(&self, name: &str) -> Option<Vec<f32>> {
        if let Some((shape, a)) = self.resident.get(name) {
            let n: usize = shape.iter().product();
            return match self.plan.buffers[self.plan.named_buffer(name)?].elem {
                // SAFETY: the storage holds the input's `n` values of its element type
                // (checked when copied in).
                ElemType::F32 => Some(unsafe { copy_out(a.as_ptr(), n) }),
                ElemType::BF16 => Some(crate::plan::bf16_values(unsafe {
                    std::slice::from_raw_parts(a.as_ptr(), 2 * n)
                })),
                _ => None,
            };
        }
        let b = self
            .plan
            .buffers
            .iter()
            .position(|b| b.role == BufferRole::Param(name.to_string()))?;
        let spec = &self.plan.buffers[b];
        if spec.elem != ElemType::F32 {
            return None;
        }
        let p = self.persistent[b].as_ref()?.as_ptr();
        // SAFETY: a bound parameter holds its (constant) shape's f32 values.
        Some(unsafe { copy_out(p, spec.bytes(&[]) / 4) })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Empties every state: the next run starts a new sequence (length 0).
    pub fn reset_states(&mut self) {
        for st in &mut self.states {
            *st = StateBuf::empty();
        }
    }

    /// The current value of a state, by its input or output name (a copy).
    pub fn state(&mut self, name: &str) -> Option<HostValue> {
        let i = self
            .plan
            .states
            .iter()
            .position(|s| s.input == name || s.output == name)?;
        let spec = &self.plan.states[i];
        let elem = self.plan.buffers[spec.buffer as usize].elem;
        let st = &mut self.states[i];
        if st.shape.is_empty() {
            return None;
        }
        let axis = spec.axis;
        let outer: usize = st.shape[..axis].iter().product();
        let inner: usize = st.shape[axis + 1..].iter().product();
        let len = st.shape[axis];
        let p = st.data.ptr();
        let mut f = vec![];
        let mut l = vec![];
        for o in 0..outer {
            let row = o * st.cap * inner;
            // SAFETY: row `o` holds `cap · inner` elements, the first `len · inner` set.
            unsafe {
                match elem {
                    ElemType::I64 => l.extend_from_slice(std::slice::from_raw_parts(
                        (p as *const i64).add(row),
                        len * inner,
                    )),
                    _ => f.extend_from_slice(std::slice::from_raw_parts(
                        (p as *const f32).add(row),
                        len * inner,
                    )),
                }
            }
        }
        Some(HostValue {
            shape: st.shape.clone(),
            data: if elem == ElemType::I64 {
                HostData::I64(l)
            } else {
                HostData::F32(f)
            },
        })
    }

    /// Fixes each state's length symbol: from an input of the state's input name (which
    /// replaces the state's value), else from the value kept since the last run.
    fn load_states(&mut self, inputs: &HashMap<String, HostValue>) -> Result<Vec<(u32, i64)>> {
        let mut fixed = vec![];
        for (i, spec) in self.plan.states.iter().enumerate() {
            let len_sym = spec.len_symbol().ok_or_else(|| {
                RuntimeError::Invalid(format!("state `{}` has no length symbol", spec.input))
            })?;
            let elem = self.plan.buffers[spec.buffer as usize].elem;
            let st = &mut self.states[i];
            if let Some(v) = inputs.get(&spec.input) {
                let (bytes, n) = match (&v.data, elem) {
                    (HostData::F32(d), ElemType::F32) => (d.as_ptr() as *const u8, d.len()),
                    (HostData::I64(d), ElemType::I64) => (d.as_ptr() as *const u8, d.len()),
                    _ => {
                        return Err(RuntimeError::Invalid(format!(
                            "input `{}` has the wrong element type",
                            spec.input
                        )))
                    }
                };
                if v.shape.len() != spec.dims.len() || v.shape.iter().product::<usize>() != n {
                    return Err(RuntimeError::Invalid(format!(
                        "input `{}` has shape {:?}, rank {} expected",
                        spec.input,
                        v.shape,
                        spec.dims.len()
                    )));
                }
                let len = v.shape[spec.axis];
                let cap = StateSpec::capacity_for(len, 0);
                *st = StateBuf::empty();
                st.relayout(spec.axis, &v.shape, 0, cap, elem.size())?;
                let outer: usize = v.shape[..spec.axis].iter().product();
                let inner = v.shape[spec.axis + 1..].iter().product::<usize>() * elem.size();
                let dst = st.data.ptr();
                for o in 0..outer {
                    // SAFETY: the source holds `outer` rows of `len · inner` bytes; the
                    // state `outer` rows of `cap · inner`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            bytes.add(o * len * inner),
                            dst.add(o * cap * inner),
                            len * inner,
                        )
                    };
                }
                st.shape = v.shape.clone();
            }
            let len = st.shape.get(spec.axis).copied().unwrap_or(0);
            fixed.push((len_sym, len as i64));
            // Set by `grow_states` once the other symbols are bound.
            fixed.push((spec.capacity, st.cap as i64));
        }
        Ok(fixed)
    }

    /// Checks each state against the bound symbols and makes room for this run's growth;
    /// fixes the capacity symbols in `syms`.
    fn grow_states(&mut self, syms: &mut [i64]) -> Result<()> {
        for (i, spec) in self.plan.states.iter().enumerate() {
            let elem = self.plan.buffers[spec.buffer as usize].elem.size();
            let st = &mut self.states[i];
            let grow = spec
                .growth(syms, &st.shape, st.cap)
                .map_err(RuntimeError::Invalid)?;
            if let Some(g) = grow {
                st.relayout(spec.axis, &g.out, g.len, g.cap, elem)?;
            }
            syms[spec.capacity as usize] = st.cap as i64;
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Bytes of the last run's arena (temporaries), for reports.
    pub fn arena_bytes(&self) -> usize {
        self.layout.as_ref().map(|l| l.arena_bytes).unwrap_or(0)
    }

    /// Binds the parameters (shared, not copied; shapes checked) and runs the `Init` kernels.
    pub fn bind_params(
        &mut self,
        get: &dyn Fn(&str) -> Option<(Vec<usize>, Arc<Vec<f32>>)>,
    ) -> Result<()> {
        for (i, b) in self.plan.buffers.iter().enumerate() {
            let BufferRole::Param(name) = &b.role else {
                continue;
            };
            let (shape, data) = get(name).ok_or_else(|| RuntimeError::MissingTensor {
                name: name.clone(),
                source_desc: "weights".into(),
            })?;
            let want: Vec<usize> = b.dims.iter().map(|d| d.eval(&[]).max(0) as usize).collect();
            if shape != want {
                return Err(RuntimeError::ShapeMismatch {
                    name: name.clone(),
                    got: shape,
                    expected: want,
                });
            }
            self.persistent[i] = Some(Storage::Shared(data));
        }
        self.run_init()
    }

    /// Runs the `Init` kernels on the bound parameters.
    fn run_init(&mut self) -> Result<()> {
        // Init buffers: kept from an earlier bind (a training step rebinds new weights).
        for (i, b) in self.plan.buffers.iter().enumerate() {
            if b.role == BufferRole::Init {
                let keep = matches!(&self.persistent[i], Some(Storage::Owned(a)) if a.len() == b.bytes(&[]));
                if !keep {
                    self.persistent[i] = Some(Storage::Owned(Aligned::with_pages(
                        b.bytes(&[]),
                        b.streamed,
                    )?));
                }
            }
        }
        let init: Vec<usize> = (0..self.plan.kernels.len())
            .filter(|k| self.plan.kernels[*k].init)
            .collect();
        let profile = std::env::var_os("EGRET_PROFILE").is_some();
        for k in init {
            let t0 = std::time::Instant::now();
            self.launch(k, &[], &vec![std::ptr::null_mut(); self.plan.buffers.len()])?;
            if profile {
                eprintln!(
                    "profile\t{}\t{:.1}\tinit: {}",
                    self.plan.kernels[k].symbol,
                    t0.elapsed().as_secs_f64() * 1e6,
                    self.plan.kernels[k].what
                );
            }
        }
        // Init values only other init kernels read (concatenated or folded weights before
        // packing) are not needed any more.
        let mut needed = vec![false; self.plan.buffers.len()];
        for call in self.plan.kernels.iter().filter(|k| !k.init) {
            for &a in &call.args {
                needed[a as usize] = true;
            }
        }
        for (_, b) in &self.plan.outputs {
            needed[*b as usize] = true;
        }
        // Parameters that change every run (fed back) rerun the init kernels each time.
        let rerun = self.feedback.iter().any(|f| {
            matches!(
                self.plan.buffers[f.target as usize].role,
                BufferRole::Param(_)
            )
        });
        for (i, b) in self.plan.buffers.iter().enumerate() {
            if b.role == BufferRole::Init && !needed[i] && !rerun {
                self.persistent[i] = None;
            }
        }
        Ok(())
    }

    fn plan_layout(&self, syms: &[i64]) -> Layout {
        let (offsets, arena_bytes) = self.plan.arena_layout(syms, ALIGN);
        Layout {
            syms: syms.to_vec(),
            offsets,
            arena_bytes,
        }
    }

    fn launch(&mut self, k: usize, syms: &[i64], ptrs: &[*mut u8]) -> Result<()> {
        let call = &self.plan.kernels[k];
        let args: Vec<*mut u8> = call
            .args
            .iter()
            .map(|&a| match &mut self.persistent[a as usize] {
                Some(p) => p.ptr(),
                None => ptrs[a as usize],
            })
            .collect();
        if let Some(l) = self.launcher.as_mut() {
            let rc = l
                .launch(self.fns[k], call, &args, syms)
                .map_err(RuntimeError::Invalid)?;
            if rc != 0 {
                return Err(kernel_error(rc, &call.what));
            }
            return Ok(());
        }
        let threads = self.pool.threads();
        let need = call.scratch_floats * 4 * threads.max(1);
        if self.scratch.len() < need {
            self.scratch = Aligned::new(need)?;
        }
        let f = self.fns[k];
        let stride = call.scratch_floats;
        // The pool's launch publishes this store to every thread before they start.
        self.work.0.store(0, std::sync::atomic::Ordering::Relaxed);
        let (args_p, syms_p, scratch_p, work_p) = (
            SendPtr(args.as_ptr()),
            SendPtr(syms.as_ptr()),
            SendPtr(self.scratch.ptr() as *const f32),
            SendPtr(self.work.0.as_ptr() as *const i64),
        );
        let status = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let st = status.clone();
        let task = Arc::new(move |tid: usize, n: usize| {
            let (a, s, sc, w) = (&args_p, &syms_p, &scratch_p, &work_p);
            // SAFETY: the plan's kernels read and write only their operand buffers, which
            // outlive this call; each thread gets a disjoint scratch slice; the counter is
            // only touched atomically.
            let rc = unsafe {
                f(
                    a.0 as *const *mut u8,
                    s.0,
                    tid as i64,
                    n as i64,
                    (sc.0 as *mut f32).add(tid * stride),
                    w.0 as *mut i64,
                )
            };
            if rc != 0 {
                st.store(rc, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let work: i64 = call.work.iter().map(|d| d.eval(syms).max(1)).product();
        if work < PARALLEL_MIN_WORK {
            task(0, 1);
        } else {
            self.pool.run(task);
        }
        let rc = status.load(std::sync::atomic::Ordering::SeqCst);
        if rc != 0 {
            return Err(kernel_error(rc, &self.plan.kernels[k].what));
        }
        Ok(())
    }

    /// Runs the plan on named inputs; returns the named outputs.
    pub fn run(
        &mut self,
        inputs: &HashMap<String, HostValue>,
    ) -> Result<HashMap<String, HostValue>> {
        let mut outs = HashMap::new();
        self.run_into(inputs, &mut outs)?;
        Ok(outs)
    }

    /// Runs the plan on named inputs, writing the named outputs into `outs`. An output whose
    /// entry already holds a value of its element type and shape (from an earlier run, say)
    /// is computed in place there, with no copy and no allocation, as numpy's `out=` does;
    /// any other output is copied into a fresh entry. On an error `outs` may hold partial
    /// results.
    pub fn run_into(
        &mut self,
        inputs: &HashMap<String, HostValue>,
        outs: &mut HashMap<String, HostValue>,
    ) -> Result<()> {
        let t_run = std::time::Instant::now();
        let fixed = self.load_states(inputs)?;
        let mut syms = self
            .plan
            .bind_symbols(
                |n| {
                    inputs
                        .get(n)
                        .map(|v| v.shape.clone())
                        .or_else(|| self.resident.get(n).map(|r| r.0.clone()))
                },
                &fixed,
            )
            .map_err(RuntimeError::Invalid)?;
        self.grow_states(&mut syms)?;
        let plan_syms = self.plan.layout_symbols(&syms);
        if self.layout.as_ref().is_none_or(|l| l.syms != plan_syms) {
            let l = self.plan_layout(&plan_syms);
            if self.arena.len() < l.arena_bytes {
                self.arena = Aligned::new(l.arena_bytes)?;
            }
            self.layout = Some(l);
        }
        let layout = self.layout.as_ref().expect("just planned");
        let base = self.arena.ptr();
        let mut ptrs: Vec<*mut u8> = vec![std::ptr::null_mut(); self.plan.buffers.len()];
        // Inputs stored as bf16, rounded from the f32 values given: kept until the run ends.
        let mut converted: Vec<Aligned> = vec![];
        for (i, b) in self.plan.buffers.iter().enumerate() {
            match &b.role {
                BufferRole::Temp => {
                    // SAFETY: offsets lie within the arena, sized for these symbols.
                    ptrs[i] = unsafe { base.add(layout.offsets[i]) };
                }
                BufferRole::Input(name) => {
                    let fed = self.feedback.iter().any(|f| f.target as usize == i);
                    let Some(v) = inputs.get(name) else {
                        // Not given: an input kept by `set_feedback`, or missing.
                        let r = self.resident.get_mut(name).ok_or_else(|| {
                            RuntimeError::Invalid(format!("missing input `{name}`"))
                        })?;
                        ptrs[i] = r.1.ptr();
                        continue;
                    };
                    // Inputs are read in place: kernels never write their inputs.
                    let n: usize = v.shape.iter().product();
                    let p = match (&v.data, b.elem) {
                        (HostData::F32(d), ElemType::F32) if d.len() == n => d.as_ptr() as *mut u8,
                        (HostData::I64(d), ElemType::I64) if d.len() == n => d.as_ptr() as *mut u8,
                        (HostData::F32(d), ElemType::BF16) if d.len() == n => {
                            let mut a = Aligned::new(2 * n)?;
                            let h = a.ptr() as *mut u16;
                            for (i, &x) in d.iter().enumerate() {
                                // SAFETY: the storage holds `n` two-byte values.
                                unsafe { h.add(i).write_unaligned(crate::plan::bf16_bits(x)) };
                            }
                            converted.push(a);
                            converted.last_mut().expect("pushed").ptr()
                        }
                        _ => {
                            return Err(RuntimeError::Invalid(format!(
                                "input `{name}` has the wrong element type or length"
                            )))
                        }
                    };
                    ptrs[i] = if fed {
                        // Kept from now on, in storage the executor owns.
                        let bytes = n * b.elem.size();
                        let r = self
                            .resident
                            .entry(name.clone())
                            .or_insert_with(|| (vec![], Aligned::empty()));
                        if r.1.len() < bytes {
                            r.1 = Aligned::new(bytes)?;
                        }
                        r.0 = v.shape.clone();
                        // SAFETY: `p` holds `bytes` bytes (checked above), the storage as many.
                        unsafe { std::ptr::copy_nonoverlapping(p, r.1.ptr(), bytes) };
                        r.1.ptr()
                    } else {
                        p
                    };
                }
                BufferRole::State(j) => ptrs[i] = self.states[*j as usize].data.ptr(),
                _ => {}
            }
        }
        // Outputs the caller holds storage for are written there, outside the arena.
        let mut in_place = vec![false; self.plan.outputs.len()];
        for (o, (name, b)) in self.plan.outputs.iter().enumerate() {
            let bi = *b as usize;
            let spec = &self.plan.buffers[bi];
            let shared = self.plan.outputs.iter().filter(|(_, c)| c == b).count() > 1;
            if spec.role != BufferRole::Temp
                || shared
                || self.persistent[bi].is_some()
                || self.feedback.iter().any(|f| f.out == *b)
            {
                continue;
            }
            let Some(v) = outs.get_mut(name) else {
                continue;
            };
            let dims_match = v.shape.len() == spec.dims.len()
                && v.shape
                    .iter()
                    .zip(&spec.dims)
                    .all(|(&s, d)| d.eval(&syms) == s as i64);
            let n: usize = v.shape.iter().product();
            let p = match (&mut v.data, spec.elem) {
                (HostData::F32(d), ElemType::F32) if d.len() == n => d.as_mut_ptr() as *mut u8,
                (HostData::I64(d), ElemType::I64) if d.len() == n => d.as_mut_ptr() as *mut u8,
                _ => continue,
            };
            if dims_match {
                ptrs[bi] = p;
                in_place[o] = true;
            }
        }
        // Outputs fed back are written outside the arena, into their spare storage.
        for f in &mut self.feedback {
            let bytes = self.plan.buffers[f.out as usize].bytes(&syms);
            if f.spare.as_ref().is_none_or(|a| a.len() < bytes) {
                f.spare = Some(Aligned::new(bytes)?);
            }
            ptrs[f.out as usize] = f.spare.as_mut().expect("just made").ptr();
        }
        let profile = std::env::var_os("EGRET_PROFILE").is_some();
        if profile {
            eprintln!("phase\tsetup\t{:.1}", t_run.elapsed().as_secs_f64() * 1e6);
        }
        let t_kernels = std::time::Instant::now();
        for k in 0..self.plan.kernels.len() {
            if !self.plan.kernels[k].init {
                let t0 = std::time::Instant::now();
                self.launch(k, &syms, &ptrs)?;
                if profile {
                    eprintln!(
                        "profile\t{}\t{:.1}\t{}",
                        self.plan.kernels[k].symbol,
                        t0.elapsed().as_secs_f64() * 1e6,
                        self.plan.kernels[k].what
                    );
                }
            }
        }
        if profile {
            eprintln!(
                "phase\tkernels\t{:.1}",
                t_kernels.elapsed().as_secs_f64() * 1e6
            );
        }
        for (i, spec) in self.plan.states.iter().enumerate() {
            self.states[i].shape = spec.out_shape(&syms);
        }
        // Every kernel succeeded: each fed-back output becomes its target (by a swap; the
        // target's old storage is the next run's spare).
        let mut params_changed = false;
        for f in &mut self.feedback {
            let new = f.spare.take().expect("allocated for this run");
            match &self.plan.buffers[f.target as usize].role {
                BufferRole::Param(_) => {
                    params_changed = true;
                    let old = self.persistent[f.target as usize].replace(Storage::Owned(new));
                    if let Some(Storage::Owned(a)) = old {
                        f.spare = Some(a);
                    }
                }
                BufferRole::Input(name) => {
                    let shape = self.plan.buffers[f.out as usize]
                        .dims
                        .iter()
                        .map(|d| d.eval(&syms).max(0) as usize)
                        .collect();
                    if let Some((_, old)) = self.resident.insert(name.clone(), (shape, new)) {
                        f.spare = Some(old);
                    }
                }
                _ => unreachable!("set_feedback targets parameters and inputs"),
            }
        }
        let t_out = std::time::Instant::now();
        for (o, (name, b)) in self.plan.outputs.iter().enumerate() {
            if in_place[o] || self.feedback.iter().any(|f| f.out == *b) {
                continue;
            }
            let spec = &self.plan.buffers[*b as usize];
            let shape: Vec<usize> = spec
                .dims
                .iter()
                .map(|d| d.eval(&syms).max(0) as usize)
                .collect();
            let n: usize = shape.iter().product();
            let p = match &mut self.persistent[*b as usize] {
                Some(a) => a.ptr() as *const u8,
                None => ptrs[*b as usize] as *const u8,
            };
            // SAFETY: the buffer holds n elements of its type.
            let data = unsafe {
                match spec.elem {
                    ElemType::F32 => {
                        HostData::F32(std::slice::from_raw_parts(p as *const f32, n).to_vec())
                    }
                    ElemType::I64 => {
                        HostData::I64(std::slice::from_raw_parts(p as *const i64, n).to_vec())
                    }
                    ElemType::Bool => HostData::I64(
                        std::slice::from_raw_parts(p, n)
                            .iter()
                            .map(|&b| b as i64)
                            .collect(),
                    ),
                    ElemType::BF16 => HostData::F32(crate::plan::bf16_values(
                        std::slice::from_raw_parts(p, 2 * n),
                    )),
                    ElemType::Half | ElemType::Bytes => {
                        return Err(RuntimeError::Invalid(format!(
                            "output `{name}` is a buffer of packed weights"
                        )))
                    }
                }
            };
            outs.insert(name.clone(), HostValue { shape, data });
        }
        if profile {
            eprintln!("phase\toutputs\t{:.1}", t_out.elapsed().as_secs_f64() * 1e6);
        }
        // New parameters: the values derived from them (transposed, packed) follow.
        if params_changed {
            let t_init = std::time::Instant::now();
            self.run_init()?;
            if profile {
                eprintln!("phase\tinit\t{:.1}", t_init.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(())
    }
}
