//! Recording dispatches once and replaying them. A [`DispatchBuilder`] collects kernels, their
//! parameter structs and their buffers; `finish` packs every parameter struct into one
//! uniform buffer (a 256-byte slot per dispatch) and builds each bind group exactly once.

use std::sync::Arc;

use super::arena::GpuBuffer;
use super::context::Gpu;
use super::kernels::Kernel;
use crate::error::Result;

/// A buffer range bound at one binding index.
#[derive(Clone, Debug)]
pub struct Bind {
    pub binding: u32,
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: Option<u64>,
}

impl Bind {
    pub fn whole(binding: u32, buffer: &wgpu::Buffer) -> Bind {
        Bind {
            binding,
            buffer: buffer.clone(),
            offset: 0,
            size: None,
        }
    }
}

/// One recorded dispatch: a pipeline, its bind group (built once) and its grid.
pub struct Dispatch {
    pub kernel: Kernel,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    pub groups: [u32; 3],
}

struct Pending {
    kernel: Kernel,
    params: Vec<u8>,
    binds: Vec<Bind>,
    groups: [u32; 3],
}

/// A point in a plan where the host must act before the dispatches after it run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The MoE layer's router has written its expert ids: make those experts resident.
    Routed(usize),
    /// The MoE layer's expert kernels end here; they may rerun from its `Routed` mark for
    /// another wave of experts.
    ExpertsDone(usize),
}

/// A list of dispatches that replays in order inside one compute pass.
pub struct DispatchList {
    pub dispatches: Vec<Dispatch>,
    /// (index of the first dispatch after the mark, mark), in order. Empty for a plan that
    /// runs in one go.
    pub marks: Vec<(usize, Mark)>,
    /// Keeps the packed parameter slots alive.
    _params: Option<GpuBuffer>,
}

impl DispatchList {
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.encode_range(pass, 0..self.dispatches.len());
    }

    /// Encodes dispatches `range` (a segment between marks).
    pub fn encode_range(&self, pass: &mut wgpu::ComputePass<'_>, range: std::ops::Range<usize>) {
        for d in &self.dispatches[range] {
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
        }
    }

    pub fn len(&self) -> usize {
        self.dispatches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dispatches.is_empty()
    }
}

pub struct DispatchBuilder {
    pending: Vec<Pending>,
    marks: Vec<(usize, Mark)>,
    /// The device's limits, for kernels whose variant depends on them.
    pub limits: wgpu::Limits,
    /// A CPU adapter (lavapipe) favours kernels with fewer, longer threads.
    pub cpu_layout: bool,
}

impl DispatchBuilder {
    pub fn new(gpu: &Gpu) -> Self {
        DispatchBuilder {
            pending: Vec::new(),
            marks: Vec::new(),
            limits: gpu.limits.clone(),
            cpu_layout: gpu.cpu_layout,
        }
    }

    /// Records `kernel` with `params` at binding 0 and `binds` at the others.
    pub fn push<P: bytemuck::Pod>(
        &mut self,
        kernel: Kernel,
        params: &P,
        binds: Vec<Bind>,
        groups: [u32; 3],
    ) {
        self.pending.push(Pending {
            kernel,
            params: bytemuck::bytes_of(params).to_vec(),
            binds,
            groups,
        });
    }

    /// Marks the current point of the plan.
    pub fn mark(&mut self, mark: Mark) {
        self.marks.push((self.pending.len(), mark));
    }

    pub fn finish(self, gpu: &Gpu) -> Result<DispatchList> {
        let slot = (gpu.limits.min_uniform_buffer_offset_alignment as usize).max(256);
        let mut packed = vec![0u8; self.pending.len().max(1) * slot];
        for (i, p) in self.pending.iter().enumerate() {
            packed[i * slot..i * slot + p.params.len()].copy_from_slice(&p.params);
        }
        let params = gpu.uniform_init("dispatch params", &packed)?;
        let mut dispatches = Vec::with_capacity(self.pending.len());
        for (i, p) in self.pending.into_iter().enumerate() {
            let pipeline = gpu.pipeline(p.kernel);
            let layout = pipeline.get_bind_group_layout(0);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params,
                    offset: (i * slot) as u64,
                    size: wgpu::BufferSize::new(p.params.len() as u64),
                }),
            }];
            for b in &p.binds {
                entries.push(wgpu::BindGroupEntry {
                    binding: b.binding,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &b.buffer,
                        offset: b.offset,
                        size: b.size.and_then(wgpu::BufferSize::new),
                    }),
                });
            }
            let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(p.kernel.label()),
                layout: &layout,
                entries: &entries,
            });
            dispatches.push(Dispatch {
                kernel: p.kernel,
                pipeline,
                bind_group,
                groups: p.groups,
            });
        }
        gpu.check()?;
        Ok(DispatchList {
            dispatches,
            marks: self.marks,
            _params: Some(params),
        })
    }
}

/// Splits `n` threads of a 1-D grid of `wg`-wide workgroups into (x, y) under the 65535 limit.
pub fn grid_1d(n: u32, wg: u32) -> [u32; 3] {
    let groups = n.div_ceil(wg).max(1);
    if groups <= 65535 {
        [groups, 1, 1]
    } else {
        [65535, groups.div_ceil(65535), 1]
    }
}
