//! Which cached expert to evict. One trait, [`ReplacementPolicy`], with LRU, LFU and
//! Belady's optimal policy (which knows the future, so it is the floor for misses on a
//! recorded trace), and [`simulate`], which replays an access sequence through a policy.

use std::collections::HashMap;

/// A global expert id: `layer * experts_per_layer + expert`.
pub type ExpertId = u32;

/// Decides which resident expert leaves when a new one must be loaded.
pub trait ReplacementPolicy {
    fn name(&self) -> &'static str;
    /// Records an access to `id` at step `t` (after a hit, or after loading it).
    fn access(&mut self, id: ExpertId, t: usize);
    /// Picks the expert to evict from `resident` (never empty) at step `t`.
    fn victim(&mut self, resident: &[ExpertId], t: usize) -> ExpertId;
    /// Each expert's next use in the plan (`next_use[id]`, usize::MAX: none known), when a
    /// plan knows them (the runtime's lookahead); other policies ignore it.
    fn set_next_use(&mut self, _next_use: &[usize]) {}
}

/// Least recently used.
#[derive(Default)]
pub struct Lru {
    last: HashMap<ExpertId, usize>,
}

impl ReplacementPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        self.last.insert(id, t);
    }
    fn victim(&mut self, resident: &[ExpertId], _t: usize) -> ExpertId {
        *resident
            .iter()
            .min_by_key(|id| self.last.get(id).copied().unwrap_or(0))
            .unwrap_or(&resident[0])
    }
}

/// Least frequently used (counts persist across evictions); ties go to the least recent.
#[derive(Default)]
pub struct Lfu {
    count: HashMap<ExpertId, u64>,
    last: HashMap<ExpertId, usize>,
}

impl ReplacementPolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        *self.count.entry(id).or_default() += 1;
        self.last.insert(id, t);
    }
    fn victim(&mut self, resident: &[ExpertId], _t: usize) -> ExpertId {
        *resident
            .iter()
            .min_by_key(|id| {
                (
                    self.count.get(id).copied().unwrap_or(0),
                    self.last.get(id).copied().unwrap_or(0),
                )
            })
            .unwrap_or(&resident[0])
    }
}

/// Belady's MIN: evict the expert whose next use is furthest away (or never comes).
pub struct Belady {
    /// For each step t, the next step > t at which `sequence[t]` is used again.
    next_use: Vec<usize>,
    /// Next use of each resident expert, as of its last access.
    next_of: HashMap<ExpertId, usize>,
}

impl Belady {
    /// Precomputes next uses of the whole access sequence.
    pub fn new(sequence: &[ExpertId]) -> Belady {
        let mut next_use = vec![usize::MAX; sequence.len()];
        let mut seen: HashMap<ExpertId, usize> = HashMap::new();
        for (t, id) in sequence.iter().enumerate().rev() {
            if let Some(n) = seen.insert(*id, t) {
                next_use[t] = n;
            }
        }
        Belady {
            next_use,
            next_of: HashMap::new(),
        }
    }
}

impl ReplacementPolicy for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        self.next_of
            .insert(id, self.next_use.get(t).copied().unwrap_or(usize::MAX));
    }
    fn victim(&mut self, resident: &[ExpertId], _t: usize) -> ExpertId {
        *resident
            .iter()
            .max_by_key(|id| self.next_of.get(id).copied().unwrap_or(usize::MAX))
            .unwrap_or(&resident[0])
    }
}

/// Belady with a predicted future: evicts the resident expert whose next use in the
/// pre-gating router's plan is furthest away; experts the plan never uses again go first,
/// the least recently used of them. With an exact plan (the pre-gate decides) it is Belady.
pub struct Lookahead {
    /// Each expert's positions in the plan, ascending.
    uses: HashMap<ExpertId, Vec<usize>>,
    last: HashMap<ExpertId, usize>,
}

impl Lookahead {
    /// `plan[t]` is the expert predicted for access t of the real sequence.
    pub fn new(plan: &[ExpertId]) -> Lookahead {
        let mut uses: HashMap<ExpertId, Vec<usize>> = HashMap::new();
        for (t, id) in plan.iter().enumerate() {
            uses.entry(*id).or_default().push(t);
        }
        Lookahead {
            uses,
            last: HashMap::new(),
        }
    }

    fn next_use(&self, id: ExpertId, t: usize) -> usize {
        self.uses
            .get(&id)
            .and_then(|u| u.get(u.partition_point(|p| *p < t)).copied())
            .unwrap_or(usize::MAX)
    }
}

impl ReplacementPolicy for Lookahead {
    fn name(&self) -> &'static str {
        "lookahead"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        self.last.insert(id, t);
    }
    fn victim(&mut self, resident: &[ExpertId], t: usize) -> ExpertId {
        *resident
            .iter()
            .max_by_key(|id| {
                let last = self.last.get(id).copied().unwrap_or(0);
                (self.next_use(**id, t), std::cmp::Reverse(last))
            })
            .unwrap_or(&resident[0])
    }
}

/// The runtime's lookahead: Belady over the uses that the pre-gating router's plan knows
/// (the rest of a prompt or of a text being scored), set before each step by
/// [`ReplacementPolicy::set_next_use`]. Experts the plan does not use go first, least
/// recently used first; with no plan (decode) it is LRU.
#[derive(Default)]
pub struct PlannedLookahead {
    /// Expert → index of its next use in the plan.
    next_use: Vec<usize>,
    last: HashMap<ExpertId, usize>,
}

impl ReplacementPolicy for PlannedLookahead {
    fn name(&self) -> &'static str {
        "lookahead"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        self.last.insert(id, t);
    }
    fn victim(&mut self, resident: &[ExpertId], _t: usize) -> ExpertId {
        *resident
            .iter()
            .max_by_key(|id| {
                let next = self
                    .next_use
                    .get(**id as usize)
                    .copied()
                    .unwrap_or(usize::MAX);
                let last = self.last.get(id).copied().unwrap_or(0);
                (next, std::cmp::Reverse(last))
            })
            .unwrap_or(&resident[0])
    }
    fn set_next_use(&mut self, next_use: &[usize]) {
        self.next_use.clear();
        self.next_use.extend_from_slice(next_use);
    }
}

/// Policies selectable by name (`--policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Lru,
    Lfu,
    Belady,
    /// Belady on the pre-gating router's plan (see [`Lookahead`]).
    Lookahead,
}

impl PolicyKind {
    pub fn label(&self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Belady => "belady",
            PolicyKind::Lookahead => "lookahead",
        }
    }

    /// The policy for replaying `sequence`. Lookahead follows `plan` (the router's
    /// prediction of the sequence), or the sequence itself when the pre-gate decides.
    pub fn build(self, sequence: &[ExpertId]) -> Box<dyn ReplacementPolicy> {
        self.build_with_plan(sequence, None)
    }

    pub fn build_with_plan(
        self,
        sequence: &[ExpertId],
        plan: Option<&[ExpertId]>,
    ) -> Box<dyn ReplacementPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::Lfu => Box::new(Lfu::default()),
            PolicyKind::Belady => Box::new(Belady::new(sequence)),
            PolicyKind::Lookahead => Box::new(Lookahead::new(plan.unwrap_or(sequence))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SimResult {
    pub policy: String,
    pub slots: usize,
    pub misses: u64,
    pub accesses: u64,
}

/// Replays `sequence` through a cache of `slots` experts managed by `policy`.
pub fn simulate(
    sequence: &[ExpertId],
    slots: usize,
    policy: &mut dyn ReplacementPolicy,
) -> SimResult {
    let mut resident: Vec<ExpertId> = Vec::with_capacity(slots);
    let mut misses = 0;
    for (t, &id) in sequence.iter().enumerate() {
        if !resident.contains(&id) {
            misses += 1;
            if slots == 0 {
                continue;
            }
            if resident.len() == slots {
                let v = policy.victim(&resident, t);
                resident.retain(|r| *r != v);
            }
            resident.push(id);
        }
        policy.access(id, t);
    }
    SimResult {
        policy: policy.name().to_string(),
        slots,
        misses,
        accesses: sequence.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: PolicyKind, seq: &[ExpertId], slots: usize) -> u64 {
        simulate(seq, slots, kind.build(seq).as_mut()).misses
    }

    #[test]
    fn lru_evicts_the_least_recent() {
        // 1 2 1 3 1 2: with 2 slots LRU evicts 2 for 3, then 3 for 2 → misses 1,2,3,2 = 4.
        assert_eq!(run(PolicyKind::Lru, &[1, 2, 1, 3, 1, 2], 2), 4);
    }

    #[test]
    fn lfu_keeps_the_frequent() {
        // 1 is used most; LFU keeps it, evicting 2 then 3: 1,1,1,2,3,2,3 → misses 1,2,3,2,3 = 5.
        assert_eq!(run(PolicyKind::Lfu, &[1, 1, 1, 2, 3, 2, 3], 2), 5);
        // Here frequency misleads: LRU drops the stale 1 and keeps 2 and 3 → 3 misses.
        assert_eq!(run(PolicyKind::Lru, &[1, 1, 1, 2, 3, 2, 3], 2), 3);
    }

    #[test]
    fn belady_evicts_the_furthest_next_use() {
        // Classic example: 1 2 3 4 1 2 5 1 2 3 4 5 with 3 slots → 7 misses for MIN.
        let seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5];
        assert_eq!(run(PolicyKind::Belady, &seq, 3), 7);
        assert_eq!(run(PolicyKind::Lru, &seq, 3), 10);
    }

    #[test]
    fn lookahead_with_an_exact_plan_is_belady_and_a_wrong_plan_costs() {
        let seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5];
        assert_eq!(run(PolicyKind::Lookahead, &seq, 3), 7);
        // A plan that believes 1 and 2 never come back evicts them first.
        let wrong = [1, 2, 3, 4, 9, 9, 5, 9, 9, 3, 4, 5];
        let mut p = PolicyKind::Lookahead.build_with_plan(&seq, Some(&wrong));
        assert!(simulate(&seq, 3, p.as_mut()).misses > 7);
    }

    #[test]
    fn enough_slots_means_only_cold_misses() {
        let seq = [4, 5, 6, 4, 5, 6, 4];
        for k in [
            PolicyKind::Lru,
            PolicyKind::Lfu,
            PolicyKind::Belady,
            PolicyKind::Lookahead,
        ] {
            assert_eq!(run(k, &seq, 3), 3);
        }
    }
}
