//! The VRAM expert cache's bookkeeping: each MoE layer has a fixed number of slots in its
//! gate/up/down pool buffers; this decides which expert sits in which slot, which to evict
//! (a [`ReplacementPolicy`] per layer), and counts hits, misses and prefetches. The GPU side
//! (pool buffers, the slot table the kernels read, the uploads) is the model's
//! (model/offload.rs); this part has no GPU in it, so it is tested on plain sequences.

use std::time::Duration;

use crate::error::{Error, Result};

use super::policy::{PolicyKind, ReplacementPolicy};

/// The slot table's mark for an expert that is not resident (moe.wgsl's MISSING).
pub const MISSING: u32 = u32::MAX;

/// The expert id the router writes for an expert that adaptive gating dropped
/// (moe_route.wgsl's SKIP): nothing to load or run.
pub const SKIP: u32 = u32::MAX;

/// Counters for one layer, or summed over layers.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LayerStats {
    /// Needed experts that were already resident.
    pub hits: u64,
    /// Needed experts that had to be loaded while the token waited.
    pub misses: u64,
    /// Hits on an expert that a prefetch loaded (and nothing used before).
    pub prefetch_hits: u64,
    /// Prefetched experts evicted without being used.
    pub wasted_prefetches: u64,
}

impl LayerStats {
    fn add(&mut self, o: &LayerStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.prefetch_hits += o.prefetch_hits;
        self.wasted_prefetches += o.wasted_prefetches;
    }
}

/// Everything a run reports about its experts.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CacheStats {
    pub total: LayerStats,
    pub per_layer: Vec<LayerStats>,
    pub bytes_uploaded: u64,
    /// Time the forward pass waited for experts to load (misses only; prefetches overlap).
    #[serde(serialize_with = "as_ms")]
    pub stall: Duration,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// One layer's slots.
struct LayerSlots {
    /// Slot → expert held.
    holder: Vec<Option<u32>>,
    /// Expert → slot.
    slot_of: Vec<Option<u32>>,
    /// Expert was loaded by a prefetch and not used since.
    prefetched: Vec<bool>,
    /// Expert → index of its next use in the plan's future (lookahead; MAX: unknown).
    next_use: Vec<usize>,
    policy: Box<dyn ReplacementPolicy + Send>,
    stats: LayerStats,
}

/// An expert to copy into a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub expert: u32,
    pub slot: u32,
}

/// What one pass of a layer's expert kernels may use: `(expert, slot)` for each, and the
/// loads to make first.
#[derive(Debug, Default, PartialEq)]
pub struct Wave {
    pub members: Vec<Load>,
    pub loads: Vec<Load>,
}

pub struct ExpertCache {
    n_expert: usize,
    layers: Vec<LayerSlots>,
    clock: usize,
    pub policy: PolicyKind,
}

impl ExpertCache {
    /// `slots[l]` slots for layer l (of `n_expert` experts each); lookahead plans by the
    /// future that [`ExpertCache::set_future`] gives it, and takes it as exact with
    /// `exact_plan` (`--routing pregate`: Belady over it).
    pub fn new(
        n_expert: usize,
        slots: &[usize],
        policy: PolicyKind,
        exact_plan: bool,
    ) -> Result<Self> {
        if policy == PolicyKind::Belady {
            return Err(Error::InvalidArgument(
                "belady needs the whole future: it runs in `pregate simulate` (the runtime has lru, lfu and lookahead)".into(),
            ));
        }
        if let Some(bad) = slots.iter().find(|s| **s == 0 || **s > n_expert) {
            return Err(Error::InvalidArgument(format!(
                "{bad} expert slots in a layer: need 1..={n_expert}"
            )));
        }
        let layers = slots
            .iter()
            .map(|&s| LayerSlots {
                holder: vec![None; s],
                slot_of: vec![None; n_expert],
                prefetched: vec![false; n_expert],
                next_use: vec![usize::MAX; n_expert],
                policy: match policy {
                    PolicyKind::Lfu => Box::new(super::policy::Lfu::default()),
                    PolicyKind::Lookahead => {
                        Box::new(super::policy::PlannedLookahead::new(exact_plan))
                    }
                    _ => Box::new(super::policy::Lru::default()),
                },
                stats: LayerStats::default(),
            })
            .collect();
        Ok(ExpertCache {
            n_expert,
            layers,
            clock: 0,
            policy,
        })
    }

    /// The experts of `layer`'s next uses, soonest first, as the plan predicts them:
    /// lookahead evicts the one used furthest ahead, and a wave loads the soonest last
    /// so that they are still resident when the next step comes.
    pub fn set_future(&mut self, layer: usize, future: &[Vec<u32>]) {
        let ls = &mut self.layers[layer];
        ls.next_use.iter_mut().for_each(|n| *n = usize::MAX);
        // In accesses from now (a token's experts are accesses), the unit of the policy's
        // use rates.
        let mut at = 0;
        for use_ in future {
            for &e in use_ {
                if let Some(n) = ls.next_use.get_mut(e as usize) {
                    *n = (*n).min(at);
                }
                at += 1;
            }
        }
        ls.policy.set_next_use(&ls.next_use);
    }

    /// The layer's slot table row for `wave`: each member's slot, MISSING elsewhere (so the
    /// grouped kernel skips experts outside the wave).
    pub fn table_row(&self, wave: &Wave) -> Vec<u32> {
        let mut row = vec![MISSING; self.n_expert];
        for m in &wave.members {
            row[m.expert as usize] = m.slot;
        }
        row
    }

    /// Picks a slot for `expert`: a free one, else the policy's victim among the slots not
    /// in `pinned`. None when every slot is pinned.
    fn place(&mut self, layer: usize, expert: u32, pinned: &[u32]) -> Option<u32> {
        let ls = &mut self.layers[layer];
        let slot = match ls.holder.iter().position(|h| h.is_none()) {
            Some(free) => free as u32,
            None => {
                let candidates: Vec<u32> = ls
                    .holder
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| !pinned.contains(&(*s as u32)))
                    .filter_map(|(_, h)| *h)
                    .collect();
                if candidates.is_empty() {
                    return None;
                }
                let victim = ls.policy.victim(&candidates, self.clock);
                let slot = ls.slot_of[victim as usize]?;
                ls.slot_of[victim as usize] = None;
                if std::mem::take(&mut ls.prefetched[victim as usize]) {
                    ls.stats.wasted_prefetches += 1;
                }
                slot
            }
        };
        ls.holder[slot as usize] = Some(expert);
        ls.slot_of[expert as usize] = Some(slot);
        Some(slot)
    }

    fn touch(&mut self, layer: usize, expert: u32) {
        self.clock += 1;
        self.layers[layer].policy.access(expert, self.clock);
    }

    /// The next wave for `pending` (the layer's needed experts; those taken are removed):
    /// every resident one (hits), then missing ones while slots not yet in the wave can
    /// be evicted (misses, to load before the kernels run).
    pub fn next_wave(&mut self, layer: usize, pending: &mut Vec<u32>) -> Result<Wave> {
        pending.retain(|e| *e != SKIP);
        if let Some(bad) = pending.iter().find(|e| **e as usize >= self.n_expert) {
            return Err(Error::InvalidArgument(format!(
                "expert {bad} of layer {layer} is out of range"
            )));
        }
        pending.sort_unstable();
        pending.dedup();
        let mut wave = Wave::default();
        let mut pinned = Vec::new();
        let mut rest = Vec::new();
        for &e in pending.iter() {
            let ls = &mut self.layers[layer];
            match ls.slot_of[e as usize] {
                Some(slot) => {
                    ls.stats.hits += 1;
                    if std::mem::take(&mut ls.prefetched[e as usize]) {
                        ls.stats.prefetch_hits += 1;
                    }
                    pinned.push(slot);
                    wave.members.push(Load { expert: e, slot });
                    self.touch(layer, e);
                }
                None => rest.push(e),
            }
        }
        // Furthest next use first: when the slots run out, the soonest-needed experts load
        // in the last wave and stay for the next step.
        let next_use = &self.layers[layer].next_use;
        rest.sort_by_key(|e| std::cmp::Reverse(next_use[*e as usize]));
        let mut left = Vec::new();
        for e in rest {
            match self.place(layer, e, &pinned) {
                Some(slot) => {
                    self.layers[layer].stats.misses += 1;
                    pinned.push(slot);
                    let load = Load { expert: e, slot };
                    wave.members.push(load);
                    wave.loads.push(load);
                    self.touch(layer, e);
                }
                None => left.push(e),
            }
        }
        *pending = left;
        Ok(wave)
    }

    /// Loads ahead of need: places each predicted expert that is not resident, never
    /// evicting another of the same prediction. Returns the loads to make.
    pub fn prefetch(&mut self, layer: usize, predicted: &[u32]) -> Vec<Load> {
        let mut loads = Vec::new();
        let mut pinned = Vec::new();
        for &e in predicted {
            if e as usize >= self.n_expert {
                continue;
            }
            if let Some(slot) = self.layers[layer].slot_of[e as usize] {
                pinned.push(slot);
                continue;
            }
            if let Some(slot) = self.place(layer, e, &pinned) {
                self.layers[layer].prefetched[e as usize] = true;
                pinned.push(slot);
                loads.push(Load { expert: e, slot });
                // Recent, so that LRU keeps it until it is needed; not a use, so that a
                // wasted prefetch does not raise LFU's rates.
                self.clock += 1;
                self.layers[layer].policy.prefetched(e, self.clock);
            }
        }
        loads
    }

    /// Whether every one of `experts` (SKIP aside) is resident in `layer`.
    pub fn all_resident(&self, layer: usize, experts: &[u32]) -> bool {
        let ls = &self.layers[layer];
        experts
            .iter()
            .filter(|e| **e != SKIP)
            .all(|e| ls.slot_of.get(*e as usize).is_some_and(|s| s.is_some()))
    }

    /// Forgets slot `load.slot`'s content (its upload failed).
    pub fn forget(&mut self, layer: usize, load: Load) {
        let ls = &mut self.layers[layer];
        ls.holder[load.slot as usize] = None;
        ls.slot_of[load.expert as usize] = None;
    }

    /// Counters per layer and in total (bytes and stall are the caller's to fill).
    pub fn stats(&self) -> CacheStats {
        let per_layer: Vec<LayerStats> = self.layers.iter().map(|l| l.stats.clone()).collect();
        let mut total = LayerStats::default();
        for l in &per_layer {
            total.add(l);
        }
        CacheStats {
            total,
            per_layer,
            ..Default::default()
        }
    }

    pub fn reset_stats(&mut self) {
        for l in &mut self.layers {
            l.stats = LayerStats::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reuses_resident_experts_and_loads_the_rest() {
        let mut c = ExpertCache::new(8, &[2], PolicyKind::Lru, false).unwrap();
        let w = c.next_wave(0, &mut vec![3, 5]).unwrap();
        assert_eq!(w.loads.len(), 2);
        assert_eq!(c.table_row(&w)[3], w.members[0].slot);
        // 5 stays, 3 is the least recent when 6 comes.
        let w = c.next_wave(0, &mut vec![5]).unwrap();
        assert!(w.loads.is_empty());
        let w = c.next_wave(0, &mut vec![6, 5]).unwrap();
        assert_eq!(w.loads, vec![Load { expert: 6, slot: 0 }]);
        assert_eq!(c.stats().total.hits, 2);
        assert_eq!(c.stats().total.misses, 3);
    }

    #[test]
    fn more_experts_than_slots_take_several_waves_each_loaded_once() {
        let mut c = ExpertCache::new(8, &[2], PolicyKind::Lru, false).unwrap();
        let mut pending = vec![7, 1, 4, 2, 1];
        let mut loaded = Vec::new();
        let mut waves = 0;
        while !pending.is_empty() {
            let w = c.next_wave(0, &mut pending).unwrap();
            assert!(!w.members.is_empty() && w.members.len() <= 2);
            loaded.extend(w.loads.iter().map(|l| l.expert));
            waves += 1;
        }
        loaded.sort();
        assert_eq!(loaded, vec![1, 2, 4, 7]);
        assert_eq!(waves, 2);
    }

    #[test]
    fn prefetches_count_as_hits_or_as_waste() {
        let mut c = ExpertCache::new(8, &[2], PolicyKind::Lru, false).unwrap();
        assert_eq!(c.prefetch(0, &[1, 2]).len(), 2);
        c.next_wave(0, &mut vec![1]).unwrap();
        // 2 was never used; a miss on 3 evicts it (1 was used more recently).
        c.next_wave(0, &mut vec![3]).unwrap();
        let s = c.stats().total;
        assert_eq!(
            (s.hits, s.prefetch_hits, s.misses, s.wasted_prefetches),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn a_wasted_prefetch_is_not_a_use_for_lfu() {
        let mut c = ExpertCache::new(8, &[2], PolicyKind::Lfu, false).unwrap();
        c.next_wave(0, &mut vec![1]).unwrap();
        c.next_wave(0, &mut vec![2]).unwrap();
        // 3 is loaded ahead (in place of 1, the least used lately) and never used: the
        // next miss evicts it, not 2, which was really used.
        assert_eq!(c.prefetch(0, &[3]).len(), 1);
        c.next_wave(0, &mut vec![4]).unwrap();
        assert!(c.next_wave(0, &mut vec![2]).unwrap().loads.is_empty());
    }

    #[test]
    fn lookahead_keeps_what_the_plan_needs_next() {
        // Three experts, two slots: the soonest-needed one (1) loads in the last wave.
        let mut c = ExpertCache::new(8, &[2], PolicyKind::Lookahead, false).unwrap();
        c.set_future(0, &[vec![1]]);
        let first = c.next_wave(0, &mut vec![1, 2, 3]).unwrap();
        assert!(!first.members.iter().any(|m| m.expert == 1));
        let mut pending = vec![1];
        c.next_wave(0, &mut pending).unwrap();
        assert!(c.next_wave(0, &mut vec![1]).unwrap().loads.is_empty());
        // LRU loads in id order and evicts 1 on the way.
        let mut lru = ExpertCache::new(8, &[2], PolicyKind::Lru, false).unwrap();
        let mut pending = vec![1, 2, 3];
        while !pending.is_empty() {
            lru.next_wave(0, &mut pending).unwrap();
        }
        assert_eq!(lru.next_wave(0, &mut vec![1]).unwrap().loads.len(), 1);
        // Eviction: the expert the plan does not use again leaves, however recent.
        let mut c = ExpertCache::new(8, &[2], PolicyKind::Lookahead, false).unwrap();
        c.next_wave(0, &mut vec![4]).unwrap();
        c.next_wave(0, &mut vec![5]).unwrap();
        c.set_future(0, &[vec![4], vec![6]]);
        let w = c.next_wave(0, &mut vec![6]).unwrap();
        assert_eq!(w.loads, vec![Load { expert: 6, slot: 1 }]);
    }

    #[test]
    fn bad_configurations_are_errors() {
        assert!(ExpertCache::new(8, &[0], PolicyKind::Lru, false).is_err());
        assert!(ExpertCache::new(8, &[9], PolicyKind::Lru, false).is_err());
        assert!(ExpertCache::new(8, &[2], PolicyKind::Belady, false).is_err());
        let mut c = ExpertCache::new(8, &[2], PolicyKind::Lru, false).unwrap();
        assert!(c.next_wave(0, &mut vec![8]).is_err());
    }
}
