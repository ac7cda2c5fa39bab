//! Read-ME's carving (design §3, "Read-ME variant"). The calibration tokens are clustered,
//! by data domain (one cluster per calibration file) or by k-means over their FFN
//! activation patterns. Per layer, each cluster keeps the neurons of largest mean |h|
//! (h = silu(gate)·up). The shared expert is what every cluster keeps, and expert c is the
//! rest of cluster c's set, so a token of cluster c that picks expert c computes exactly
//! its cluster's neurons. One decision per token (its cluster) serves every layer, which is
//! what makes the pre-gating router's lookahead exact.

use std::path::{Path, PathBuf};

use half::f16;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::moe::ExpertTrace;

use super::calib::LayerCalibration;
use super::partition::Partition;
use super::tensors::MoeShape;
use super::{CarveOptions, Layout, Method};

/// How the calibration tokens were clustered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterSource {
    /// One cluster per calibration file.
    Domains,
    /// k-means over activation patterns.
    Kmeans,
}

/// The calibration tokens' clusters, written next to the carved model so that
/// `train-router` can fit the pre-gating router to them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClusterLabels {
    pub clusters: usize,
    pub source: ClusterSource,
    pub tokens: Vec<u32>,
    pub labels: Vec<u32>,
}

impl ClusterLabels {
    /// Where the labels of the model at `model` live: `MODEL.labels.json`.
    pub fn path_for(model: &Path) -> PathBuf {
        model.with_extension("labels.json")
    }

    /// Written to a temporary file and renamed.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec(self).map_err(|e| Error::Io(e.into()))?;
        crate::format::write_atomic(path, &text)
    }

    pub fn load(path: &Path) -> Result<ClusterLabels> {
        let bytes = crate::format::read_all(path)?;
        let bad = |why: String| Error::BadFile {
            what: format!("cluster labels {}", path.display()),
            why,
        };
        let l: ClusterLabels = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if l.tokens.len() != l.labels.len() || l.tokens.is_empty() {
            return Err(bad(format!(
                "{} tokens but {} labels",
                l.tokens.len(),
                l.labels.len()
            )));
        }
        if let Some(c) = l.labels.iter().find(|&&c| c as usize >= l.clusters) {
            return Err(bad(format!(
                "label {c} is not below {} clusters",
                l.clusters
            )));
        }
        Ok(l)
    }

    /// The labels as an expert trace of `n_layers` layers that all make the same top-1
    /// choice (Read-ME's one decision per token), for `router::train`.
    pub fn as_trace(&self, n_layers: usize) -> ExpertTrace {
        ExpertTrace {
            n_layers: n_layers as u32,
            experts_per_layer: self.clusters as u32,
            k: 1,
            choices: self
                .labels
                .iter()
                .flat_map(|&c| std::iter::repeat_n(c as u16, n_layers))
                .collect(),
            plan: None,
        }
    }
}

/// One layer's neuron sets before padding.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSets {
    /// Neurons every cluster keeps, by descending total |h|.
    pub shared: Vec<usize>,
    /// Per cluster, the neurons it keeps that are not shared, by descending mean |h|.
    pub experts: Vec<Vec<usize>>,
}

/// Layer sets from `hidden` [n_tokens, d_ff]: each cluster keeps its `keep` neurons of
/// largest mean |h| (ties to the lower index). Every cluster must have a token.
pub fn cluster_sets(
    hidden: &[f16],
    d_ff: usize,
    labels: &[u32],
    n_clusters: usize,
    keep: usize,
) -> ClusterSets {
    let mut sums = vec![0f64; n_clusters * d_ff];
    for (row, &c) in hidden.chunks_exact(d_ff).zip(labels) {
        let s = &mut sums[c as usize * d_ff..(c as usize + 1) * d_ff];
        for (a, h) in s.iter_mut().zip(row) {
            *a += h.to_f32().abs() as f64;
        }
    }
    // Within a cluster the sum ranks like the mean.
    let ranked = |s: &[f64]| {
        let mut idx: Vec<usize> = (0..d_ff).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        idx
    };
    let sets: Vec<Vec<usize>> = sums
        .chunks_exact(d_ff)
        .map(|s| {
            let mut r = ranked(s);
            r.truncate(keep.min(d_ff));
            r
        })
        .collect();
    let mut kept_by = vec![0usize; d_ff];
    for set in &sets {
        for &i in set {
            kept_by[i] += 1;
        }
    }
    let total: Vec<f64> = (0..d_ff)
        .map(|i| (0..n_clusters).map(|c| sums[c * d_ff + i]).sum())
        .collect();
    let shared: Vec<usize> = ranked(&total)
        .into_iter()
        .filter(|&i| kept_by[i] == n_clusters)
        .collect();
    let experts = sets
        .into_iter()
        .map(|s| s.into_iter().filter(|&i| kept_by[i] < n_clusters).collect())
        .collect();
    ClusterSets { shared, experts }
}

/// Tokens' activation patterns for k-means: per layer, |h| scaled to unit length, so every
/// layer weighs the same; `layers[l]` is [n_tokens, d_ff].
struct Patterns<'a> {
    layers: &'a [&'a [f16]],
    d_ff: usize,
    /// 1/‖h‖ of each token in each layer, [n_tokens][n_layers].
    inv_norm: Vec<f32>,
}

impl Patterns<'_> {
    fn unit_row(&self, t: usize, l: usize, out: &mut [f32]) {
        let row = &self.layers[l][t * self.d_ff..(t + 1) * self.d_ff];
        let s = self.inv_norm[t * self.layers.len() + l];
        for (o, h) in out.iter_mut().zip(row) {
            *o = h.to_f32().abs() * s;
        }
    }

    /// Squared distance of token t to each centroid ([k][n_layers][d_ff]; `sq` their norms²).
    fn distances(&self, t: usize, centroids: &[f32], sq: &[f32], row: &mut [f32]) -> Vec<f32> {
        let (n_l, d) = (self.layers.len(), self.d_ff);
        let k = sq.len();
        let mut dist: Vec<f32> = sq.iter().map(|s| s + n_l as f32).collect();
        for l in 0..n_l {
            self.unit_row(t, l, row);
            for (c, dc) in dist.iter_mut().enumerate() {
                let cent = &centroids[(c * n_l + l) * d..(c * n_l + l + 1) * d];
                let dot: f32 = cent.iter().zip(row.iter()).map(|(a, b)| a * b).sum();
                *dc -= 2.0 * dot;
            }
        }
        debug_assert_eq!(dist.len(), k);
        dist.iter().map(|v| v.max(0.0)).collect()
    }
}

/// Distances of every token to every centroid, `[n_tokens][k]`, on all cores.
fn all_distances(p: &Patterns, n: usize, centroids: &[f32], k: usize) -> Vec<f32> {
    let (n_l, d) = (p.layers.len(), p.d_ff);
    let sq: Vec<f32> = centroids
        .chunks_exact(n_l * d)
        .map(|c| c.iter().map(|v| v * v).sum())
        .collect();
    debug_assert_eq!(sq.len(), k);
    let threads = std::thread::available_parallelism().map_or(1, |v| v.get());
    let chunk = n.div_ceil(threads).max(1);
    let mut out = vec![0f32; n * k];
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk * k).enumerate() {
            let sq = &sq;
            s.spawn(move || {
                let mut row = vec![0f32; d];
                for (j, o) in part.chunks_exact_mut(k).enumerate() {
                    o.copy_from_slice(&p.distances(i * chunk + j, centroids, sq, &mut row));
                }
            });
        }
    });
    out
}

/// Clusters `n_tokens` tokens into `k` by k-means over their activation patterns in every
/// layer (`layers[l]` is [n_tokens, d_ff]): k-means++ seeding, then Lloyd's iterations
/// until no token moves (at most 30). Every cluster keeps at least one token.
pub fn kmeans_labels(
    layers: &[&[f16]],
    d_ff: usize,
    n_tokens: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<u32>> {
    if k == 0 || n_tokens < k {
        return Err(Error::Carve(format!(
            "{n_tokens} calibration tokens cannot form {k} clusters"
        )));
    }
    let n_l = layers.len();
    let mut inv_norm = vec![0f32; n_tokens * n_l];
    for (l, h) in layers.iter().enumerate() {
        for t in 0..n_tokens {
            let row = &h[t * d_ff..(t + 1) * d_ff];
            let norm = row.iter().map(|v| v.to_f32().powi(2)).sum::<f32>().sqrt();
            inv_norm[t * n_l + l] = 1.0 / norm.max(1e-12);
        }
    }
    let p = Patterns {
        layers,
        d_ff,
        inv_norm,
    };
    let width = n_l * d_ff;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut row = vec![0f32; d_ff];
    let mut set_centroid = |cent: &mut [f32], t: usize| {
        for l in 0..n_l {
            p.unit_row(t, l, &mut row);
            cent[l * d_ff..(l + 1) * d_ff].copy_from_slice(&row);
        }
    };
    // k-means++: each next seed is drawn with probability ∝ its squared distance to the
    // nearest seed so far.
    let mut centroids = vec![0f32; k * width];
    set_centroid(&mut centroids[..width], rng.random_range(0..n_tokens));
    for c in 1..k {
        let dist = all_distances(&p, n_tokens, &centroids[..c * width], c);
        let nearest: Vec<f32> = dist
            .chunks_exact(c)
            .map(|d| d.iter().copied().fold(f32::MAX, f32::min))
            .collect();
        let total: f32 = nearest.iter().sum();
        let mut pick = rng.random::<f32>() * total;
        let mut chosen = n_tokens - 1;
        for (t, d) in nearest.iter().enumerate() {
            if pick < *d {
                chosen = t;
                break;
            }
            pick -= d;
        }
        set_centroid(&mut centroids[c * width..(c + 1) * width], chosen);
    }
    let mut labels = vec![u32::MAX; n_tokens];
    for _ in 0..30 {
        let dist = all_distances(&p, n_tokens, &centroids, k);
        let mut moved = false;
        for (t, d) in dist.chunks_exact(k).enumerate() {
            let best = (0..k).min_by(|&a, &b| d[a].total_cmp(&d[b])).unwrap_or(0) as u32;
            moved |= labels[t] != best;
            labels[t] = best;
        }
        // An empty cluster takes the token farthest from its own centroid.
        let mut counts = vec![0usize; k];
        labels.iter().for_each(|&c| counts[c as usize] += 1);
        for c in 0..k {
            if counts[c] > 0 {
                continue;
            }
            let own = |t: usize| dist[t * k + labels[t] as usize];
            let far = (0..n_tokens)
                .filter(|&t| counts[labels[t] as usize] > 1)
                .max_by(|&a, &b| own(a).total_cmp(&own(b)));
            if let Some(t) = far {
                counts[labels[t] as usize] -= 1;
                counts[c] += 1;
                labels[t] = c as u32;
                moved = true;
            }
        }
        if !moved {
            break;
        }
        centroids.fill(0.0);
        for (t, &c) in labels.iter().enumerate() {
            let cent = &mut centroids[c as usize * width..(c as usize + 1) * width];
            for l in 0..n_l {
                p.unit_row(t, l, &mut row);
                for (a, v) in cent[l * d_ff..(l + 1) * d_ff].iter_mut().zip(&row) {
                    *a += v;
                }
            }
        }
        for (cent, n) in centroids.chunks_exact_mut(width).zip(&counts) {
            cent.iter_mut().for_each(|v| *v /= (*n).max(1) as f32);
        }
    }
    Ok(labels)
}

/// Read-ME: cluster the tokens (by file when there are several, else k-means), then per
/// layer give each cluster its top neurons. A layer's experts are padded to its largest
/// (block-aligned), and so is its shared expert: layers differ in size, the shape records
/// the largest.
pub(super) fn layout(
    profiles: &[LayerCalibration],
    d_ff: usize,
    tokens: &[u32],
    domains: Option<Vec<u32>>,
    opts: &CarveOptions,
) -> Result<Layout> {
    let k = opts.n_experts;
    let (labels, source) = match domains {
        Some(l) => (l, ClusterSource::Domains),
        None => {
            let hidden: Vec<&[half::f16]> = profiles.iter().map(|p| &p.hidden[..]).collect();
            let l = kmeans_labels(&hidden, d_ff, tokens.len(), k, opts.seed)?;
            (l, ClusterSource::Kmeans)
        }
    };
    let keep = ((opts.remain_rate * d_ff as f64).round() as usize).clamp(1, d_ff);
    let sets: Vec<ClusterSets> = profiles
        .iter()
        .map(|p| cluster_sets(&p.hidden, d_ff, &labels, k, keep))
        .collect();
    let block = opts.down_type.block_len();
    let round = |n: usize| n.div_ceil(block) * block;
    let layer_ff =
        |s: &ClusterSets| round(s.experts.iter().map(Vec::len).max().unwrap_or(0)).max(block);
    let expert_ff = sets.iter().map(layer_ff).max().unwrap_or(block);
    let shared_ff = round(sets.iter().map(|s| s.shared.len()).max().unwrap_or(0));
    // With a shared expert anywhere, every layer has one (a block of zeros at least), so
    // the runtime finds the shared tensors in each layer.
    let layer_shared = |s: &ClusterSets| match shared_ff {
        0 => 0,
        _ => round(s.shared.len()).max(block),
    };
    let pad = |v: &[usize], n: usize| -> Vec<usize> {
        v.iter()
            .copied()
            .chain(std::iter::repeat(d_ff))
            .take(n)
            .collect()
    };
    let mut padding = 0;
    let parts: Vec<Partition> = sets
        .iter()
        .map(|s| {
            let real = s.shared.len() + s.experts.iter().map(Vec::len).sum::<usize>();
            let (ff, sh) = (layer_ff(s), layer_shared(s));
            padding += sh + k * ff - real;
            let experts: Vec<Vec<usize>> = s.experts.iter().map(|e| pad(e, ff)).collect();
            Partition {
                shared: pad(&s.shared, sh),
                representatives: experts.iter().map(|e| e[0]).collect(),
                experts,
            }
        })
        .collect();
    Ok(Layout {
        parts,
        shape: MoeShape {
            method: Method::Readme,
            n_routed: k,
            n_active: opts.n_active,
            expert_ff,
            shared_ff,
            padding: padding / profiles.len().max(1),
            experts_total: k + usize::from(shared_ff > 0),
            shared_experts: usize::from(shared_ff > 0),
        },
        labels: Some(ClusterLabels {
            clusters: k,
            source,
            tokens: tokens.to_vec(),
            labels,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[f32]) -> Vec<f16> {
        v.iter().map(|x| f16::from_f32(*x)).collect()
    }

    #[test]
    fn shared_is_the_intersection_and_experts_the_rest() {
        // 6 neurons, 3 tokens: clusters 0, 1, 0.
        let hidden = h(&[
            5.0, 4.0, 3.0, 0.1, 0.0, 0.0, // cluster 0
            5.0, 0.0, 0.0, 0.2, 4.0, 3.0, // cluster 1
            -5.0, 4.0, 0.0, 2.0, 0.0, 0.0, // cluster 0 (|h| counts)
        ]);
        let s = cluster_sets(&hidden, 6, &[0, 1, 0], 2, 3);
        // Cluster 0 keeps {0, 1, 2} (sums 10, 8, 3 beat 2.1); cluster 1 keeps {0, 4, 5}.
        assert_eq!(s.shared, vec![0]);
        assert_eq!(s.experts, vec![vec![1, 2], vec![4, 5]]);
    }

    #[test]
    fn kmeans_separates_two_activation_patterns() {
        // Tokens alternate between two patterns in each of two layers, with small noise.
        let (n, d) = (40, 16);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut layer = |shift: usize| {
            let mut v = vec![0f32; n * d];
            for t in 0..n {
                for i in 0..d {
                    let on = (i + shift) % d < d / 2;
                    let base = if (t % 2 == 0) == on { 1.0 } else { 0.05 };
                    v[t * d + i] = base + rng.random::<f32>() * 0.1;
                }
            }
            h(&v)
        };
        let (a, b) = (layer(0), layer(3));
        let labels = kmeans_labels(&[&a, &b], d, n, 2, 9).expect("kmeans");
        for t in 0..n {
            assert_eq!(labels[t] == labels[0], t % 2 == 0, "token {t}: {labels:?}");
        }
        assert!(kmeans_labels(&[&a], d, 1, 2, 9).is_err());
    }
}
