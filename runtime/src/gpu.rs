//! The CUDA executor: runs a `Plan` whose kernels are entry points of a PTX module (the GPU
//! payload of an artifact), through the CUDA driver API (cudarc, loaded at run time, so a
//! machine without CUDA builds and runs everything else). Parameters are uploaded once (and
//! `Init` kernels run then); each run uploads the inputs, lays temporaries out in one device
//! arena by the plan's memory plan, uploads one table of every kernel's operand pointers and
//! the symbol values, launches every kernel in order on one stream, and copies the outputs
//! back. States (the KV cache) live on the device between runs.
//!
//! A launch sequence seen again with the same launch parameters (kernels, grid sizes, the
//! entry point each launch takes (`KernelCall::gpu_launch`), and the device addresses of the
//! operand table, symbols, scratch and status, whose contents are uploaded before each run)
//! among the last `GPU_GRAPHS_KEPT` is captured as a CUDA graph and replayed from then on:
//! decode's hundreds of launches a token become one, and so do a training step's thousands
//! and the `Init` kernels re-run after it (two sequences in turn). If the driver refuses to
//! capture, the executor says so once on standard error and launches one by one.
//!
//! Kernel ABI (what `egret_backends::ptx` generates): `void kernel(u8** bufs, const i64* syms,
//! f32* scratch, i32* status)` on a 1-D grid of `GPU_BLOCK`-thread blocks; `bufs` holds the
//! kernel's operands in `KernelCall::args` order; a thread that fails (an index out of
//! range) stores its error code in `*status`.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream,
    DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::cpu::{HostData, HostValue};
use crate::error::{Result, RuntimeError};
use crate::plan::{BufferRole, ElemType, GpuLaunch, Plan, StateSpec, GPU_BLOCK};

/// Launch sequences remembered (and graphs kept) at once: a training step's run and its
/// `Init` re-run alternate; prefill and decode shapes come and go.
const GPU_GRAPHS_KEPT: usize = 4;

/// Buffers in the arena start at multiples of this (the widest vector access).
const ALIGN: usize = 256;

fn cuda(e: impl std::fmt::Debug) -> RuntimeError {
    RuntimeError::Gpu(format!("CUDA: {e:?}"))
}

/// Whether this machine can run GPU code: the CUDA driver library is present and has a
/// device. The error says which is missing.
pub fn gpu_available() -> Result<()> {
    // SAFETY: only probes for the library with dlopen.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(RuntimeError::Gpu(
            "no CUDA driver found (libcuda.so is not installed): use --backend cpu".into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(RuntimeError::Gpu(
            "the CUDA driver sees no GPU: use --backend cpu".into(),
        )),
        Err(e) => Err(RuntimeError::Gpu(format!(
            "the CUDA driver cannot start ({e:?}): use --backend cpu"
        ))),
    }
}

/// The name and compute capability of GPU 0, e.g. `("NVIDIA H100 80GB HBM3", (9, 0))`.
pub fn device_info() -> Result<(String, (i32, i32))> {
    gpu_available()?;
    let ctx = CudaContext::new(0).map_err(cuda)?;
    Ok((
        ctx.name().map_err(cuda)?,
        ctx.compute_capability().map_err(cuda)?,
    ))
}

/// A state kept on the device: its value's shape (empty before the first run) and capacity
/// along its axis.
struct DevState {
    data: Option<CudaSlice<u8>>,
    shape: Vec<usize>,
    cap: usize,
}

pub struct GpuExecutor {
    plan: Plan,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    /// Each call's entry point, and its light one (`KernelCall::light`).
    funcs: Vec<(CudaFunction, Option<CudaFunction>)>,
    /// Parameters and `Init` values, by buffer.
    persistent: Vec<Option<CudaSlice<u8>>>,
    arena: Option<CudaSlice<u8>>,
    layout: Option<(Vec<i64>, Vec<usize>, usize)>,
    scratch: Option<CudaSlice<u8>>,
    table: Option<CudaSlice<u64>>,
    syms: CudaSlice<i64>,
    status: CudaSlice<i32>,
    states: Vec<DevState>,
    /// Seconds spent in kernels by the last run (host-timed around a synchronised stream).
    last_kernel_s: f64,
    /// Seconds the device took over the last run's launches, by `clock`.
    last_device_s: f64,
    /// Events recorded on `stream` before and after each launch sequence, timing it on the
    /// device (launch and synchronisation costs on the host left out).
    clock: [CudaEvent; 2],
    /// With profiling on, each kernel of the last run (what it computes, and "(light entry)"
    /// where it ran that: `KernelCall::light`) and its seconds (the stream is synchronised
    /// after every launch, so this slows the run down); launches of no blocks are not there.
    profile: Option<Vec<(String, f64)>>,
    feedback: Vec<Fed>,
    /// Inputs kept on the device between runs (targets of `feedback`).
    resident: HashMap<String, (Vec<usize>, CudaSlice<u8>)>,
    /// Launch sequences replayed as CUDA graphs (module docs); off after a refused capture.
    graphs: bool,
    /// The last launch sequences' parameters, newest last, and the graphs captured for
    /// those seen twice (at most `GPU_GRAPHS_KEPT` of each).
    seen: Vec<Vec<u64>>,
    captured: Vec<(Vec<u64>, CudaGraph)>,
}

/// An output fed back over a parameter or input (`GpuExecutor::set_feedback`), with its
/// output buffer and the target parameter's buffer looked up once (a training step feeds
/// back hundreds: scanning the plan's buffers for each, every step, cost milliseconds).
struct Fed {
    out: String,
    target: String,
    ob: Option<u32>,
    param: Option<usize>,
}

/// Launches a captured graph on its stream.
fn replay(g: &CudaGraph) -> Result<()> {
    g.launch()
        .map_err(|e| RuntimeError::Gpu(format!("replaying a CUDA graph failed: {e:?}")))
}

fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

impl GpuExecutor {
    /// Loads `ptx` (the module whose entry points `plan`'s calls name) on GPU 0.
    pub fn new(plan: Plan, ptx: &str) -> Result<GpuExecutor> {
        gpu_available()?;
        let ctx = CudaContext::new(0).map_err(cuda)?;
        // One stream, so the driver need not track which buffers each launch touches.
        // SAFETY: every operation of this executor goes through `stream`.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(cuda)?;
        let timed = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
        let clock = [timed().map_err(cuda)?, timed().map_err(cuda)?];
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| RuntimeError::Gpu(format!("the driver rejected the PTX: {e:?}")))?;
        // Each call's entry point, and its light one where it has one (`KernelCall::light`).
        let load = |symbol: &str, shared: u32| -> Result<CudaFunction> {
            let f = module.load_function(symbol).map_err(|e| {
                RuntimeError::Gpu(format!("the PTX lacks kernel `{symbol}`: {e:?}"))
            })?;
            if shared > 0 {
                f.set_attribute(
                    sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .map_err(|e| {
                    RuntimeError::Gpu(format!(
                        "kernel `{symbol}` cannot have {shared} bytes of shared memory: {e:?}"
                    ))
                })?;
            }
            Ok(f)
        };
        let mut funcs = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            let (symbol, shared) = k.gpu_entry(false);
            let light = k
                .light
                .as_ref()
                .map(|l| load(&l.symbol, l.shared_bytes))
                .transpose()?;
            funcs.push((load(symbol, shared)?, light));
        }
        let n = plan.buffers.len();
        let states = plan
            .states
            .iter()
            .map(|_| DevState {
                data: None,
                shape: vec![],
                cap: 0,
            })
            .collect();
        Ok(GpuExecutor {
            syms: stream
                .alloc_zeros::<i64>(plan.symbols.len().max(1))
                .map_err(cuda)?,
            status: stream.alloc_zeros::<i32>(1).map_err(cuda)?,
            plan,
            _module: module,
            funcs,
            persistent: (0..n).map(|_| None).collect(),
            arena: None,
            layout: None,
            scratch: None,
            table: None,
            states,
            stream,
            last_kernel_s: 0.0,
            last_device_s: 0.0,
            clock,
            profile: None,
            feedback: vec![],
            resident: HashMap::new(),
            graphs: true,
            seen: vec![],
            captured: vec![],
        })
    }

    /// Whether repeated launch sequences replay as CUDA graphs (on by default).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.captured.clear();
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Seconds the last run spent launching and running kernels, on the host's clock (from
    /// the first launch to the end of the stream's work, as a caller waits for it).
    pub fn last_kernel_seconds(&self) -> f64 {
        self.last_kernel_s
    }

    /// Seconds the device spent on the last run's kernels, timed by events on its stream
    /// around each launch sequence (as `torch.cuda.Event` times PyTorch's work): the launch
    /// calls and the host's wait for the stream are not counted, so this is the figure to
    /// set beside another library's kernel time.
    pub fn last_device_seconds(&self) -> f64 {
        self.last_device_s
    }

    /// Keeps outputs on the device as the next run's values of parameters or inputs, by name:
    /// `(output, target)` pairs, a training step's `new.X → X`, `new_m.X → m.X`. After each
    /// run every such output is copied over its target (and not returned); an input fed back
    /// is uploaded once (when given) and then stays on the device while no run gives it.
    ///
    /// An output whose elements are stored otherwise than its target's (a bf16 output
    /// stored bf16 over an f32 input, say) cannot be copied over it: an error.
    pub fn set_feedback(&mut self, pairs: Vec<(String, String)>) -> Result<()> {
        let outputs: HashMap<&str, u32> = self
            .plan
            .outputs
            .iter()
            .map(|(n, b)| (n.as_str(), *b))
            .collect();
        for (out, target) in &pairs {
            let out_elem = outputs
                .get(out.as_str())
                .map(|b| self.plan.buffers[*b as usize].elem);
            if out_elem.is_some_and(|e| self.target_elem(target).is_some_and(|t| t != e)) {
                return Err(RuntimeError::Invalid(format!(
                    "output `{out}` cannot be fed back to `{target}`: their element types differ"
                )));
            }
        }
        let mut params: HashMap<&str, usize> = HashMap::new();
        for (i, b) in self.plan.buffers.iter().enumerate() {
            if let BufferRole::Param(n) = &b.role {
                params.entry(n.as_str()).or_insert(i);
            }
        }
        self.feedback = pairs
            .into_iter()
            .map(|(out, target)| Fed {
                ob: outputs.get(out.as_str()).copied(),
                param: params.get(target.as_str()).copied(),
                out,
                target,
            })
            .collect();
        Ok(())
    }

    /// The element type of the parameter or input `name`.
    fn target_elem(&self, name: &str) -> Option<ElemType> {
        self.plan
            .named_buffer(name)
            .map(|b| self.plan.buffers[b].elem)
    }

    /// The current value of a parameter or of an input kept on the device, by name, as f32
    /// (bf16 ones widened; none for other element types).
    pub fn read(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let slice = match self
            .plan
            .buffers
            .iter()
            .position(|b| b.role == BufferRole::Param(name.to_string()))
        {
            Some(b) => self.persistent[b].as_ref(),
            None => self.resident.get(name).map(|r| &r.1),
        };
        let Some(s) = slice else { return Ok(None) };
        let host = self.stream.clone_dtoh(s).map_err(cuda)?;
        Ok(match self.target_elem(name) {
            Some(ElemType::BF16) => Some(crate::plan::bf16_values(&host)),
            Some(ElemType::F32) => Some(f32s(&host)),
            _ => None,
        })
    }

    /// Times every kernel of the following runs (see `profile`).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(Vec::new);
    }

    /// With profiling on: what each kernel of the last run computed and its seconds.
    pub fn profile(&self) -> &[(String, f64)] {
        self.profile.as_deref().unwrap_or(&[])
    }

    /// Bytes of the last run's device arena.
    pub fn arena_bytes(&self) -> usize {
        self.layout.as_ref().map(|l| l.2).unwrap_or(0)
    }

    /// Empties every state: the next run starts a new sequence.
    pub fn reset_states(&mut self) {
        for st in &mut self.states {
            *st = DevState {
                data: None,
                shape: vec![],
                cap: 0,
            };
        }
    }

    /// Uploads the parameters (shapes checked) and runs the `Init` kernels.
    pub fn bind_params(
        &mut self,
        get: &dyn Fn(&str) -> Option<(Vec<usize>, Arc<Vec<f32>>)>,
    ) -> Result<()> {
        for (i, b) in self.plan.buffers.iter().enumerate() {
            match &b.role {
                BufferRole::Param(name) => {
                    let (shape, data) = get(name).ok_or_else(|| RuntimeError::MissingTensor {
                        name: name.clone(),
                        source_desc: "weights".into(),
                    })?;
                    let want: Vec<usize> =
                        b.dims.iter().map(|d| d.eval(&[]).max(0) as usize).collect();
                    if shape != want {
                        return Err(RuntimeError::ShapeMismatch {
                            name: name.clone(),
                            got: shape,
                            expected: want,
                        });
                    }
                    let bytes: &[u8] = bytemuck_f32(&data);
                    self.persistent[i] = Some(self.upload(bytes)?);
                }
                BufferRole::Init => {
                    if self.persistent[i]
                        .as_ref()
                        .is_none_or(|s| s.len() != b.bytes(&[]).max(1))
                    {
                        self.persistent[i] = Some(
                            self.stream
                                .alloc_zeros::<u8>(b.bytes(&[]).max(1))
                                .map_err(cuda)?,
                        );
                    }
                }
                _ => {}
            }
        }
        let init: Vec<usize> = (0..self.plan.kernels.len())
            .filter(|k| self.plan.kernels[*k].init)
            .collect();
        if !init.is_empty() {
            let ptrs = vec![0u64; self.plan.buffers.len()];
            self.launch_all(&init, &[], &ptrs)?;
        }
        Ok(())
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return self.stream.alloc_zeros::<u8>(1).map_err(cuda);
        }
        self.stream.clone_htod(bytes).map_err(cuda)
    }

    /// Fixes each state's length symbol (from an input of the state's name, which replaces
    /// its value, else from the value kept since the last run) and its capacity.
    fn load_states(&mut self, inputs: &HashMap<String, HostValue>) -> Result<Vec<(u32, i64)>> {
        let mut fixed = vec![];
        for i in 0..self.plan.states.len() {
            let spec = self.plan.states[i].clone();
            let len_sym = spec.len_symbol().ok_or_else(|| {
                RuntimeError::Invalid(format!("state `{}` has no length symbol", spec.input))
            })?;
            if let Some(v) = inputs.get(&spec.input) {
                let elem = self.plan.buffers[spec.buffer as usize].elem;
                let bytes = host_bytes(v, elem)
                    .ok_or_else(|| wrong_input(&spec.input, "element type or length"))?;
                if v.shape.len() != spec.dims.len() {
                    return Err(wrong_input(&spec.input, "rank"));
                }
                let len = v.shape[spec.axis];
                let cap = StateSpec::capacity_for(len, 0);
                let data = relayout_host(&bytes, &v.shape, spec.axis, len, cap, elem.size());
                self.states[i] = DevState {
                    data: Some(self.upload(&data)?),
                    shape: v.shape.clone(),
                    cap,
                };
            }
            let st = &self.states[i];
            fixed.push((
                len_sym,
                st.shape.get(spec.axis).copied().unwrap_or(0) as i64,
            ));
            fixed.push((spec.capacity, st.cap as i64));
        }
        Ok(fixed)
    }

    /// Checks each state against the bound symbols and makes room for this run's growth
    /// (through the host: it happens at each doubling only).
    fn grow_states(&mut self, syms: &mut [i64]) -> Result<()> {
        for i in 0..self.plan.states.len() {
            let spec = &self.plan.states[i];
            let elem = self.plan.buffers[spec.buffer as usize].elem.size();
            let st = &self.states[i];
            let grow = spec
                .growth(syms, &st.shape, st.cap)
                .map_err(RuntimeError::Invalid)?;
            if let Some(g) = grow {
                let mut shape = g.out.clone();
                let laid_out = match &st.data {
                    Some(d) => {
                        // Rows of the old capacity, re-laid out for the new one.
                        let host = self.stream.clone_dtoh(d).map_err(cuda)?;
                        shape[spec.axis] = st.cap;
                        relayout_host(&host, &shape, spec.axis, g.len, g.cap, elem)
                    }
                    None => {
                        shape[spec.axis] = g.cap;
                        vec![0u8; shape.iter().product::<usize>() * elem]
                    }
                };
                let data = self.upload(&laid_out)?;
                let st = &mut self.states[i];
                st.data = Some(data);
                st.cap = g.cap;
            }
            syms[spec.capacity as usize] = self.states[i].cap as i64;
        }
        Ok(())
    }

    /// Launches `kernels` in order with buffer device addresses `ptrs` (persistent buffers
    /// filled in here) and symbol values `syms`; waits for them and checks the status.
    fn launch_all(&mut self, kernels: &[usize], syms: &[i64], ptrs: &[u64]) -> Result<()> {
        let mut table: Vec<u64> = Vec::new();
        let mut starts = Vec::with_capacity(kernels.len());
        let mut scratch_need = 0usize;
        let mut launch = Vec::with_capacity(kernels.len());
        for &k in kernels {
            let call = &self.plan.kernels[k];
            starts.push(table.len());
            for &a in &call.args {
                table.push(match &self.persistent[a as usize] {
                    Some(s) => dptr(s, &self.stream),
                    None => ptrs[a as usize],
                });
            }
            let grid = call.gpu_launch(syms);
            scratch_need =
                scratch_need.max(call.scratch_floats * 4 * (grid.blocks * GPU_BLOCK) as usize);
            launch.push(grid);
        }
        if self.table.as_ref().is_none_or(|t| t.len() < table.len()) {
            self.table = Some(
                self.stream
                    .alloc_zeros::<u64>(table.len().max(1))
                    .map_err(cuda)?,
            );
        }
        if self.scratch.as_ref().is_none_or(|s| s.len() < scratch_need) {
            self.scratch = Some(
                self.stream
                    .alloc_zeros::<u8>(scratch_need.max(4))
                    .map_err(cuda)?,
            );
        }
        let tab = self.table.as_mut().expect("allocated");
        if !table.is_empty() {
            self.stream
                .memcpy_htod(&table, &mut tab.slice_mut(0..table.len()))
                .map_err(cuda)?;
        }
        let mut sv = syms.to_vec();
        sv.resize(self.syms.len(), 0);
        self.stream.memcpy_htod(&sv, &mut self.syms).map_err(cuda)?;
        self.stream
            .memcpy_htod(&[0i32], &mut self.status)
            .map_err(cuda)?;
        let (tab_p, syms_p, scratch_p, status_p) = (
            dptr(self.table.as_ref().expect("allocated"), &self.stream),
            dptr(&self.syms, &self.stream),
            dptr(self.scratch.as_ref().expect("allocated"), &self.stream),
            dptr(&self.status, &self.stream),
        );
        let t0 = std::time::Instant::now();
        self.clock[0].record(&self.stream).map_err(cuda)?;
        // What a graph of this sequence depends on (the table, symbols and status are
        // uploaded before each run, so only their addresses count).
        let ptrs = [tab_p, syms_p, scratch_p, status_p];
        let key: Vec<u64> = kernels
            .iter()
            .map(|&k| k as u64)
            .chain(
                launch
                    .iter()
                    .map(|g| u64::from(g.blocks) << 1 | u64::from(g.light)),
            )
            .chain(ptrs)
            .collect();
        let graphs = self.graphs && self.profile.is_none();
        if let Some((_, g)) = self.captured.iter().find(|(k, _)| graphs && *k == key) {
            replay(g)?;
        } else if graphs && self.seen.contains(&key) {
            match self.capture(kernels, &launch, &starts, ptrs) {
                Ok(g) => {
                    replay(&g)?;
                    if self.captured.len() == GPU_GRAPHS_KEPT {
                        self.captured.remove(0);
                    }
                    self.captured.push((key, g));
                }
                Err(why) => {
                    eprintln!("egret: launching kernel by kernel: {why}");
                    self.graphs = false;
                    self.launch_each(kernels, &launch, &starts, ptrs)?;
                }
            }
        } else {
            if self.seen.len() == GPU_GRAPHS_KEPT {
                self.seen.remove(0);
            }
            self.seen.push(key);
            self.launch_each(kernels, &launch, &starts, ptrs)?;
        }
        self.clock[1].record(&self.stream).map_err(cuda)?;
        let status = self
            .stream
            .clone_dtoh(&self.status)
            .map_err(|e| RuntimeError::Gpu(format!("a kernel failed on the device: {e:?}")))?;
        self.last_kernel_s += t0.elapsed().as_secs_f64();
        // (the status copy waited for the stream, so both events are done)
        let ms = self.clock[0].elapsed_ms(&self.clock[1]).map_err(cuda)?;
        self.last_device_s += f64::from(ms) / 1e3;
        if status[0] != 0 {
            let msg = match status[0] {
                1 => "an index is out of range (a token id beyond the vocabulary?)".to_string(),
                c => format!("error code {c}"),
            };
            return Err(RuntimeError::Invalid(format!("a GPU kernel failed: {msg}")));
        }
        Ok(())
    }

    /// Enqueues `kernels` with grid sizes `launch`, operand tables at `starts` of the table,
    /// and `[table, syms, scratch, status]` device addresses; with profiling on, waits for
    /// and times each.
    fn launch_each(
        &mut self,
        kernels: &[usize],
        launch: &[GpuLaunch],
        starts: &[usize],
        [tab_p, syms_p, scratch_p, status_p]: [u64; 4],
    ) -> Result<()> {
        for (i, &k) in kernels.iter().enumerate() {
            let tk = std::time::Instant::now();
            let bufs = tab_p + 8 * starts[i] as u64;
            let GpuLaunch { blocks, light } = launch[i];
            if blocks == 0 {
                // (nothing to do: `KernelCall::gpu_launch`)
                continue;
            }
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (GPU_BLOCK, 1, 1),
                shared_mem_bytes: self.plan.kernels[k].gpu_entry(light).1,
            };
            let f = match &self.funcs[k] {
                (_, Some(lf)) if light => lf,
                (f, _) => f,
            };
            let mut b = self.stream.launch_builder(f);
            b.arg(&bufs).arg(&syms_p).arg(&scratch_p).arg(&status_p);
            // SAFETY: the entry point takes exactly these four pointers; every pointer in
            // the table addresses a live device buffer of the size the plan gives it.
            unsafe { b.launch(cfg) }.map_err(|e| {
                RuntimeError::Gpu(format!(
                    "launching `{}` failed: {e:?}",
                    self.plan.kernels[k].what
                ))
            })?;
            if let Some(p) = &mut self.profile {
                self.stream.synchronize().map_err(cuda)?;
                // (which entry point ran, where the kernel has two)
                let what = &self.plan.kernels[k].what;
                let what = if light {
                    format!("{what} (light entry)")
                } else {
                    what.clone()
                };
                p.push((what, tk.elapsed().as_secs_f64()));
            }
        }
        Ok(())
    }

    /// The launch sequence of `launch_each`, captured as a graph (not run).
    fn capture(
        &mut self,
        kernels: &[usize],
        launch: &[GpuLaunch],
        starts: &[usize],
        ptrs: [u64; 4],
    ) -> std::result::Result<CudaGraph, String> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| format!("the driver refused to capture a graph: {e:?}"))?;
        let enqueued = self.launch_each(kernels, launch, starts, ptrs);
        // (the capture always ends, so the stream leaves capture mode whatever happened)
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| format!("capturing a graph failed: {e:?}"))?;
        enqueued.map_err(|e| format!("launching into a graph failed: {e}"))?;
        graph.ok_or_else(|| "the captured graph is empty".to_string())
    }

    /// Runs the plan on named inputs; returns the named outputs.
    pub fn run(
        &mut self,
        inputs: &HashMap<String, HostValue>,
    ) -> Result<HashMap<String, HostValue>> {
        // A run's profile and kernel time cover its launches, the `Init` kernels re-run
        // after fed-back parameters included.
        if let Some(p) = &mut self.profile {
            p.clear();
        }
        self.last_kernel_s = 0.0;
        self.last_device_s = 0.0;
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
        if self.layout.as_ref().is_none_or(|l| l.0 != plan_syms) {
            let (offsets, bytes) = self.plan.arena_layout(&plan_syms, ALIGN);
            if self.arena.as_ref().is_none_or(|a| a.len() < bytes) {
                self.arena = Some(self.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(cuda)?);
            }
            self.layout = Some((plan_syms, offsets, bytes));
        }
        let base = dptr(self.arena.as_ref().expect("allocated"), &self.stream);
        let offsets = self.layout.as_ref().expect("planned").1.clone();
        let mut ptrs = vec![0u64; self.plan.buffers.len()];
        // Uploaded inputs live until the run ends.
        let mut uploaded: Vec<CudaSlice<u8>> = vec![];
        let fed_targets: std::collections::HashSet<&str> =
            self.feedback.iter().map(|f| f.target.as_str()).collect();
        for (i, b) in self.plan.buffers.iter().enumerate() {
            match &b.role {
                BufferRole::Temp => ptrs[i] = base + offsets[i] as u64,
                BufferRole::Input(name) => {
                    let fed = fed_targets.contains(name.as_str());
                    match inputs.get(name) {
                        Some(v) => {
                            let bytes = host_bytes(v, b.elem)
                                .ok_or_else(|| wrong_input(name, "element type"))?;
                            let s = self.upload(&bytes)?;
                            ptrs[i] = dptr(&s, &self.stream);
                            if fed {
                                self.resident.insert(name.clone(), (v.shape.clone(), s));
                            } else {
                                uploaded.push(s);
                            }
                        }
                        None if fed && self.resident.contains_key(name) => {
                            ptrs[i] = dptr(&self.resident[name].1, &self.stream)
                        }
                        None => {
                            return Err(RuntimeError::Invalid(format!("missing input `{name}`")))
                        }
                    }
                }
                BufferRole::State(j) => {
                    ptrs[i] = dptr(
                        self.states[*j as usize].data.as_ref().expect("grown"),
                        &self.stream,
                    )
                }
                _ => {}
            }
        }
        let run: Vec<usize> = (0..self.plan.kernels.len())
            .filter(|k| !self.plan.kernels[*k].init)
            .collect();
        self.launch_all(&run, &syms, &ptrs)?;
        let mut outs = HashMap::new();
        // Outputs fed back stay on the device, copied over their targets.
        let mut params_changed = false;
        for Fed {
            out,
            target,
            ob,
            param,
        } in &self.feedback
        {
            let Some(ob) = *ob else {
                return Err(RuntimeError::Invalid(format!(
                    "no output `{out}` to feed back"
                )));
            };
            let bytes = self.plan.buffers[ob as usize].bytes(&syms);
            let src = match &self.persistent[ob as usize] {
                Some(s) => dptr(s, &self.stream),
                None => ptrs[ob as usize],
            };
            let dst = match *param {
                Some(pb) => {
                    params_changed = true;
                    self.persistent[pb]
                        .as_ref()
                        .map(|s| (dptr(s, &self.stream), s.len()))
                }
                None => self
                    .resident
                    .get(target)
                    .map(|(_, s)| (dptr(s, &self.stream), s.len())),
            };
            let Some((dst, _)) = dst.filter(|(_, len)| *len >= bytes) else {
                return Err(RuntimeError::Invalid(format!(
                    "output `{out}` cannot be fed back to `{target}`: it has no buffer of {bytes} bytes"
                )));
            };
            if bytes > 0 {
                // SAFETY: both addresses are live device buffers of at least `bytes` bytes.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        dst,
                        src,
                        bytes,
                        self.stream.cu_stream(),
                    )
                }
                .map_err(cuda)?;
            }
        }
        let fed_outputs: std::collections::HashSet<&str> =
            self.feedback.iter().map(|f| f.out.as_str()).collect();
        for (name, b) in &self.plan.outputs {
            if fed_outputs.contains(name.as_str()) {
                continue;
            }
            let spec = &self.plan.buffers[*b as usize];
            let shape: Vec<usize> = spec
                .dims
                .iter()
                .map(|d| d.eval(&syms).max(0) as usize)
                .collect();
            let n: usize = shape.iter().product();
            let bytes = n * spec.elem.size();
            let mut host = vec![0u8; bytes];
            // Wherever the output lives (arena, parameter, `Init` value, uploaded input).
            let src = match &self.persistent[*b as usize] {
                Some(s) => dptr(s, &self.stream),
                None => ptrs[*b as usize],
            };
            if bytes > 0 {
                // SAFETY: `src` addresses a live device buffer of at least `bytes` bytes (the
                // plan's size for these symbols); the stream is synchronised (launch_all).
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, src) }
                    .map_err(cuda)?;
            }
            let data = match spec.elem {
                ElemType::F32 => HostData::F32(f32s(&host)),
                ElemType::I64 => HostData::I64(i64s(&host)),
                ElemType::Bool => HostData::I64(host.iter().map(|&b| b as i64).collect()),
                ElemType::BF16 => HostData::F32(crate::plan::bf16_values(&host)),
                ElemType::Half | ElemType::Bytes => {
                    return Err(RuntimeError::Invalid(format!(
                        "output `{name}` is a buffer of packed weights"
                    )))
                }
            };
            outs.insert(name.clone(), HostValue { shape, data });
        }
        drop(uploaded);
        if params_changed {
            let init: Vec<usize> = (0..self.plan.kernels.len())
                .filter(|k| self.plan.kernels[*k].init)
                .collect();
            if !init.is_empty() {
                let ptrs = vec![0u64; self.plan.buffers.len()];
                self.launch_all(&init, &[], &ptrs)?;
            }
        }
        for (i, spec) in self.plan.states.iter().enumerate() {
            self.states[i].shape = spec.out_shape(&syms);
        }
        Ok(outs)
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
        let st = &self.states[i];
        let data = st.data.as_ref()?;
        if st.shape.is_empty() {
            return None;
        }
        let host = self.stream.clone_dtoh(data).ok()?;
        let mut full = st.shape.clone();
        full[spec.axis] = st.cap;
        let len = st.shape[spec.axis];
        let bytes = relayout_host(&host, &full, spec.axis, len, len, elem.size());
        Some(HostValue {
            shape: st.shape.clone(),
            data: match elem {
                ElemType::I64 => HostData::I64(i64s(&bytes)),
                _ => HostData::F32(f32s(&bytes)),
            },
        })
    }
}

/// Little-endian f32s from bytes (a download).
fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian i64s from bytes.
fn i64s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn wrong_input(name: &str, what: &str) -> RuntimeError {
    RuntimeError::Invalid(format!("input `{name}` has the wrong {what}"))
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The bytes of a host value if its type fits `elem` and its length its shape (f32 values
/// for a bf16 buffer rounded to it).
fn host_bytes(v: &HostValue, elem: ElemType) -> Option<std::borrow::Cow<'_, [u8]>> {
    use std::borrow::Cow;
    let n: usize = v.shape.iter().product();
    match (&v.data, elem) {
        (HostData::F32(d), ElemType::F32) if d.len() == n => Some(Cow::Borrowed(bytemuck_f32(d))),
        (HostData::F32(d), ElemType::BF16) if d.len() == n => {
            Some(Cow::Owned(crate::plan::bf16_bytes(d)))
        }
        (HostData::I64(d), ElemType::I64) if d.len() == n => {
            // SAFETY: as above, for i64.
            Some(Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(d.as_ptr() as *const u8, d.len() * 8)
            }))
        }
        _ => None,
    }
}

/// `src` holds a value of `shape` (its extent along `axis` the old capacity); returns it laid
/// out with capacity `cap` along `axis`, the first `len` entries of each row kept.
fn relayout_host(
    src: &[u8],
    shape: &[usize],
    axis: usize,
    len: usize,
    cap: usize,
    elem: usize,
) -> Vec<u8> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product::<usize>() * elem;
    let old = shape[axis];
    let mut out = vec![0u8; outer * cap * inner];
    let keep = len.min(old).min(cap) * inner;
    for o in 0..outer {
        let (s, d) = (o * old * inner, o * cap * inner);
        out[d..d + keep].copy_from_slice(&src[s..s + keep]);
    }
    out
}
