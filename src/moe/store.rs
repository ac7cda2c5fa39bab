//! Where each routed expert's bytes live in the mapped model file. Experts are never copied
//! whole into memory: a load reads one expert's gate, up and down rows from the mapping,
//! repacks them for the GPU and hands them to the cache's slot.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::{GgufFile, TensorInfo};
use crate::model::memory::EXPERT_PARTS;
use crate::model::ModelConfig;
use crate::quant::{repack_for_gpu, DType};

/// One stacked expert tensor: expert e owns bytes `e * per_expert ..` of it.
#[derive(Clone, Debug)]
struct StackedPart {
    tensor: TensorInfo,
    per_expert: u64,
}

/// An expert's gate, up and down rows, repacked as the GPU reads them.
pub struct ExpertWords {
    pub parts: [Vec<u32>; 3],
}

impl ExpertWords {
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| 4 * p.len() as u64).sum()
    }
}

pub struct ExpertStore {
    /// Per layer: gate, up, down (None for dense layers).
    layers: Vec<Option<[StackedPart; 3]>>,
    /// With `--verify`: each expert's sha256 as of open, checked on its first load.
    checksums: Option<Vec<Vec<[u8; 32]>>>,
    verified: Vec<Vec<bool>>,
}

impl ExpertStore {
    pub fn new(f: &GgufFile, c: &ModelConfig) -> Result<ExpertStore> {
        let n_expert = c.moe.as_ref().map_or(0, |m| m.n_expert);
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let parts = EXPERT_PARTS.map(|p| f.tensor(&format!("blk.{l}.ffn_{p}_exps.weight")));
            let [Some(g), Some(u), Some(d)] = parts else {
                layers.push(None);
                continue;
            };
            let part = |t: &TensorInfo| -> Result<StackedPart> {
                if n_expert == 0 || !t.n_bytes.is_multiple_of(n_expert as u64) {
                    return Err(Error::BadTensor {
                        tensor: t.name.clone(),
                        why: format!("{} bytes do not split into {n_expert} experts", t.n_bytes),
                    });
                }
                Ok(StackedPart {
                    tensor: t.clone(),
                    per_expert: t.n_bytes / n_expert as u64,
                })
            };
            layers.push(Some([part(g)?, part(u)?, part(d)?]));
        }
        Ok(ExpertStore {
            verified: vec![vec![false; n_expert]; c.n_layer],
            layers,
            checksums: None,
        })
    }

    /// Hashes every expert now, so that a load can tell if the file changed under the
    /// mapping since (`--verify`).
    pub fn enable_verify(&mut self, f: &GgufFile) -> Result<()> {
        let n_expert = self.verified.first().map_or(0, |v| v.len());
        let mut sums = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            let mut layer = Vec::new();
            if self.layers[l].is_some() {
                for e in 0..n_expert {
                    layer.push(self.checksum(f, l, e)?);
                }
            }
            sums.push(layer);
        }
        self.checksums = Some(sums);
        Ok(())
    }

    /// Expert `e`'s gate, up and down bytes in the mapping, with their types.
    fn raw<'f>(
        &self,
        f: &'f GgufFile,
        layer: usize,
        e: usize,
    ) -> Result<([&'f [u8]; 3], [DType; 3])> {
        let Some(parts) = self.layers.get(layer).and_then(|p| p.as_ref()) else {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} has no routed experts"
            )));
        };
        let read = |p: &StackedPart| {
            let start = e as u64 * p.per_expert;
            f.bytes_checked(&p.tensor, start..start + p.per_expert)
        };
        Ok((
            [read(&parts[0])?, read(&parts[1])?, read(&parts[2])?],
            parts.each_ref().map(|p| p.tensor.dtype),
        ))
    }

    fn checksum(&self, f: &GgufFile, layer: usize, e: usize) -> Result<[u8; 32]> {
        let mut h = Sha256::new();
        for part in self.raw(f, layer, e)?.0 {
            h.update(part);
        }
        Ok(h.finalize().into())
    }

    /// Reads `experts` of `layer`, one loader thread each when there are several (page
    /// faults on a cold file and the repacking overlap).
    pub fn read_many(
        &mut self,
        f: &GgufFile,
        layer: usize,
        experts: &[usize],
    ) -> Result<Vec<ExpertWords>> {
        for &e in experts {
            self.check(f, layer, e)?;
        }
        if experts.len() <= 1 {
            return experts
                .iter()
                .map(|&e| self.repacked(f, layer, e))
                .collect();
        }
        let this = &*self;
        std::thread::scope(|scope| {
            let handles: Vec<_> = experts
                .iter()
                .map(|&e| scope.spawn(move || this.repacked(f, layer, e)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().map_err(|_| {
                        Error::InvalidArgument("an expert loader thread panicked".into())
                    })?
                })
                .collect()
        })
    }

    /// With `--verify`, checks expert `e` against its checksum on its first load.
    fn check(&mut self, f: &GgufFile, layer: usize, e: usize) -> Result<()> {
        if let Some(sums) = &self.checksums {
            if !self.verified[layer][e] {
                if self.checksum(f, layer, e)? != sums[layer][e] {
                    return Err(Error::BadTensor {
                        tensor: format!("blk.{layer} expert {e}"),
                        why: "its bytes changed on disk since the model was opened (--verify)"
                            .into(),
                    });
                }
                self.verified[layer][e] = true;
            }
        }
        Ok(())
    }

    fn repacked(&self, f: &GgufFile, layer: usize, e: usize) -> Result<ExpertWords> {
        let (raw, dtypes) = self.raw(f, layer, e)?;
        Ok(ExpertWords {
            parts: [0, 1, 2].map(|i| repack_for_gpu(dtypes[i], raw[i])),
        })
    }
}
