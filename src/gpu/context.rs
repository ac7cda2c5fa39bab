//! Instance → adapter → device → queue, with the adapter's real limits and optional features.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use super::arena::{Arena, GpuBuffer};
use super::kernels::Kernel;
use crate::error::{Error, Result};

/// Which graphics API to use; `Auto` lets wgpu pick the best adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    #[default]
    Auto,
    /// Vulkan, Metal or DX12 (not GL).
    #[value(skip)]
    Native,
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl BackendChoice {
    fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Auto => wgpu::Backends::all(),
            BackendChoice::Native => wgpu::Backends::PRIMARY,
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Index into [`list_adapters`]; None picks the highest-performance adapter.
    pub adapter: Option<usize>,
    pub backend: BackendChoice,
    /// VRAM budget in bytes for everything pregate allocates (None: unlimited).
    pub vram_budget: Option<u64>,
    /// Thread layout of the kernels that have one per kind of device.
    pub layout: KernelLayout,
}

/// Kernels whose fastest thread layout differs between CPU adapters (few long threads) and
/// GPUs (workgroup tiles, many threads per row, coalesced loads) have a variant for each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelLayout {
    /// By the adapter's device type.
    #[default]
    Auto,
    /// The variants for CPU adapters (lavapipe, SwiftShader).
    Cpu,
    /// The variants for GPUs.
    Gpu,
}

/// What `pregate devices` prints about an adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub index: usize,
    /// The adapter used when `--adapter` is not given.
    pub default: bool,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub subgroups: bool,
    pub shader_f16: bool,
    pub timestamps: bool,
}

/// Storage buffers are also UNIFORM: mat-vec kernels bind activations as uniforms (see
/// matvec.wgsl).
const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::UNIFORM)
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Bytes of a storage buffer holding `bytes`: whole 16-byte units (at least one), since
/// weight kernels read buffers as array<vec4<u32>>.
fn storage_size(bytes: u64) -> u64 {
    bytes.max(16).next_multiple_of(16)
}

fn instance(backend: BackendChoice) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backend.backends();
    wgpu::Instance::new(desc)
}

fn adapters(backend: BackendChoice) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance(backend).enumerate_adapters(backend.backends()))
}

/// The adapter pregate runs on when `--adapter` is not given: the high-performance one.
fn default_adapter(backend: BackendChoice) -> Result<wgpu::Adapter> {
    let request = |backend: BackendChoice| {
        pollster::block_on(
            instance(backend).request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                // Real limits, not privacy buckets: we size shards by them.
                apply_limit_buckets: false,
            }),
        )
    };
    // Auto tries the native APIs first: probing GL/EGL is slow and noisy, and it is only
    // the last resort.
    let found = match backend {
        BackendChoice::Auto => {
            request(BackendChoice::Native).or_else(|_| request(BackendChoice::Gl))
        }
        b => request(b),
    };
    found.map_err(|e| Error::NoAdapter(format!(" ({e})")))
}

pub fn list_adapters(backend: BackendChoice) -> Vec<AdapterSummary> {
    let default = default_adapter(backend).ok().map(|a| a.get_info());
    let all = adapters(backend);
    // Identical cards have identical infos: only the first is marked.
    let default_index = all.iter().position(|a| Some(a.get_info()) == default);
    all.iter()
        .enumerate()
        .map(|(index, a)| {
            let info = a.get_info();
            let l = a.limits();
            let f = a.features();
            AdapterSummary {
                index,
                default: Some(index) == default_index,
                name: info.name,
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info),
                max_storage_binding: l.max_storage_buffer_binding_size,
                max_buffer: l.max_buffer_size,
                subgroups: f.contains(wgpu::Features::SUBGROUP),
                shader_f16: f.contains(wgpu::Features::SHADER_F16),
                timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
            }
        })
        .collect()
}

/// The device pregate runs on, its pipeline cache and its allocation arena.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub arena: Arc<Arena>,
    /// Use the CPU-adapter variants of layout-dependent kernels.
    pub cpu_layout: bool,
    /// The first validation or out-of-memory error wgpu reported, if any.
    errors: Arc<Mutex<Option<String>>>,
    pipelines: Mutex<HashMap<Kernel, Arc<wgpu::ComputePipeline>>>,
}

/// The adapter `opts` select: `--adapter`'s index, or the default one.
fn pick_adapter(opts: &GpuOptions) -> Result<wgpu::Adapter> {
    match opts.adapter {
        Some(i) => {
            let mut all = adapters(opts.backend);
            let n = all.len();
            if i >= n {
                return Err(Error::NoAdapter(format!(
                    ": --adapter {i} but only {n} adapter(s) exist (see `pregate devices`)"
                )));
            }
            Ok(all.swap_remove(i))
        }
        None => default_adapter(opts.backend),
    }
}

impl KernelLayout {
    /// Whether the CPU-adapter variants run on an adapter of this type.
    fn is_cpu(self, device_type: wgpu::DeviceType) -> bool {
        match self {
            KernelLayout::Auto => device_type == wgpu::DeviceType::Cpu,
            KernelLayout::Cpu => true,
            KernelLayout::Gpu => false,
        }
    }
}

impl GpuOptions {
    /// Whether a [`Gpu`] opened with these options runs the CPU-adapter kernel variants,
    /// found without opening a device (the memory plan needs it first).
    pub fn cpu_layout(&self) -> Result<bool> {
        match self.layout {
            KernelLayout::Cpu => Ok(true),
            KernelLayout::Gpu => Ok(false),
            KernelLayout::Auto => {
                Ok(KernelLayout::Auto.is_cpu(pick_adapter(self)?.get_info().device_type))
            }
        }
    }
}

impl Gpu {
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        let adapter = pick_adapter(opts)?;
        let info = adapter.get_info();
        let wanted =
            wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY;
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("pregate"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Gpu(format!("cannot open device {}: {e}", info.name)))?;
        tracing::info!(adapter = %info.name, backend = ?info.backend, "GPU ready");
        // wgpu panics on errors by default; record them instead and report them as ours.
        let errors: Arc<Mutex<Option<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let msg = e.to_string();
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(msg);
        }));
        let cpu_layout = opts.layout.is_cpu(info.device_type);
        Ok(Gpu {
            cpu_layout,
            device,
            queue,
            info,
            limits,
            features,
            arena: Arc::new(Arena::new(opts.vram_budget)),
            errors,
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// Largest byte range one storage binding may cover.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// An uninitialised buffer of at least `bytes` (16, rounded to 4), charged to the arena.
    fn charged(
        &self,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
        mapped_at_creation: bool,
    ) -> Result<GpuBuffer> {
        let size = bytes.max(16).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        self.arena.charge(size, label)?;
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation,
        });
        Ok(GpuBuffer::new(buf, self.arena.clone()))
    }

    /// A storage buffer, charged to the arena.
    pub fn storage(&self, label: &str, bytes: u64) -> Result<GpuBuffer> {
        self.charged(label, storage_size(bytes), STORAGE_USAGE, false)
    }

    /// A storage buffer initialised with `data`, charged to the arena.
    pub fn storage_init(&self, label: &str, data: &[u8]) -> Result<GpuBuffer> {
        let size = storage_size(data.len() as u64) as usize;
        let mut padded;
        let contents = if size != data.len() {
            padded = data.to_vec();
            padded.resize(size, 0);
            &padded[..]
        } else {
            data
        };
        self.arena.charge(contents.len() as u64, label)?;
        let buf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: STORAGE_USAGE,
            });
        Ok(GpuBuffer::new(buf, self.arena.clone()))
    }

    /// A uniform buffer initialised with `data`, charged to the arena.
    pub fn uniform_init(&self, label: &str, data: &[u8]) -> Result<GpuBuffer> {
        self.arena.charge(data.len() as u64, label)?;
        let buf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: data,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            });
        Ok(GpuBuffer::new(buf, self.arena.clone()))
    }

    /// A host-writable staging buffer, created mapped, charged to the arena.
    pub fn staging(&self, label: &str, bytes: u64) -> Result<GpuBuffer> {
        let usage = wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC;
        self.charged(label, bytes, usage, true)
    }

    /// A host-readable buffer for results copied back at the end of a step.
    pub fn readback(&self, label: &str, bytes: u64) -> Result<GpuBuffer> {
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        self.charged(label, bytes, usage, false)
    }

    /// Maps a readback buffer and copies out its first `bytes` bytes.
    pub fn read(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let slice = buf.slice(0..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("poll: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Gpu("map callback dropped".into()))?
            .map_err(|e| Error::Gpu(format!("map: {e}")))?;
        let out = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("map range: {e}")))?
            .to_vec();
        buf.unmap();
        Ok(out)
    }

    /// Runs a dispatch list in one submit and waits for it (tests, tools; not the hot path).
    pub fn run_once(&self, list: &super::DispatchList) -> Result<()> {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("run_once"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            list.encode(&mut pass);
        }
        self.queue.submit([enc.finish()]);
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("poll: {e}")))?;
        self.check()
    }

    /// Copies the first `n` floats of a storage buffer back to the host.
    pub fn read_f32(&self, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let bytes = (n * 4) as u64;
        let rb = self.readback("read_f32", bytes)?;
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read"),
            });
        enc.copy_buffer_to_buffer(buf, 0, &rb, 0, bytes);
        self.queue.submit([enc.finish()]);
        Ok(bytemuck::pod_collect_to_vec(&self.read(&rb, bytes)?))
    }

    /// The pipeline for `kernel`, compiled on first use.
    pub fn pipeline(&self, kernel: Kernel) -> Arc<wgpu::ComputePipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(kernel)
            .or_insert_with(|| {
                let source = kernel.source();
                let module = self
                    .device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(kernel.label()),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    });
                Arc::new(
                    self.device
                        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                            label: Some(kernel.label()),
                            layout: None,
                            module: &module,
                            entry_point: Some(kernel.entry_point()),
                            compilation_options: wgpu::PipelineCompilationOptions {
                                constants: &[],
                                // Kernels initialise what they read; skip the zero-fill pass.
                                zero_initialize_workgroup_memory: false,
                            },
                            cache: None,
                        }),
                )
            })
            .clone()
    }

    /// Returns the first error wgpu reported since the last check.
    pub fn check(&self) -> Result<()> {
        let mut slot = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(msg) => Err(Error::Gpu(msg)),
            None => Ok(()),
        }
    }

    pub fn adapter_name(&self) -> String {
        self.info.name.clone()
    }

    pub fn backend_name(&self) -> String {
        format!("{:?}", self.info.backend).to_lowercase()
    }
}
