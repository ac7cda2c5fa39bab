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
    /// Records that `id` was loaded ahead of need at step `t`: recent, but not a use (so
    /// a wasted prefetch does not raise a use rate). LRU treats it as an access.
    fn prefetched(&mut self, id: ExpertId, t: usize) {
        self.access(id, t);
    }
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

/// Least frequently used, by recent use rate (counts that fade, so the cache
/// follows a text whose experts change); ties go to the least recent.
#[derive(Default)]
pub struct Lfu {
    rate: UseRate,
    last: HashMap<ExpertId, usize>,
}

impl ReplacementPolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        self.rate.access(id);
        self.last.insert(id, t);
    }
    fn prefetched(&mut self, id: ExpertId, t: usize) {
        self.last.insert(id, t);
    }
    fn victim(&mut self, resident: &[ExpertId], _t: usize) -> ExpertId {
        furthest(resident, &self.last, |id| {
            (false, self.rate.distance(id, usize::MAX))
        })
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

/// How often each expert has been used lately: an exponential moving average, per access
/// of the cache, of "this access was expert e". Its inverse is the expected distance to
/// the expert's next use, the estimate a predicted plan is checked against.
struct UseRate {
    /// Expert → (rate, access count when it was last updated).
    rate: HashMap<ExpertId, (f64, u64)>,
    accesses: u64,
    /// What a rate keeps per access.
    decay: f64,
}

impl Default for UseRate {
    fn default() -> Self {
        UseRate::shared_by(1)
    }
}

impl UseRate {
    /// Per-access decay of one layer's cache: about 0.98 per token at two experts a token,
    /// so the rate follows the last ~50 tokens (measured on traces: BENCHMARKS.md,
    /// session 10).
    const LAYER_DECAY: f64 = 0.99;

    /// Rates for a cache that `layers` layers share (`simulate` without --per-layer): it
    /// sees `layers` times the accesses a token, so each fades that much less.
    fn shared_by(layers: usize) -> Self {
        UseRate {
            rate: HashMap::new(),
            accesses: 0,
            decay: Self::LAYER_DECAY.powf(1.0 / layers.max(1) as f64),
        }
    }

    fn access(&mut self, id: ExpertId) {
        self.accesses += 1;
        let now = self.accesses;
        let r = self.rate_of(id);
        self.rate.insert(id, (r + (1.0 - self.decay), now));
    }

    fn rate_of(&self, id: ExpertId) -> f64 {
        self.rate.get(&id).map_or(0.0, |(r, at)| {
            r * self
                .decay
                .powi((self.accesses - at).min(i32::MAX as u64) as i32)
        })
    }

    /// Accesses until `id`'s next use, expected from two signals whose chances of use add
    /// up: the plan's next use, `planned` accesses away, taken at PLAN_WEIGHT (a
    /// predicting router's plan misses uses and names wrong ones), and the expert's recent
    /// use rate. A frequent expert is likely to be needed again whatever the plan says.
    fn distance(&self, id: ExpertId, planned: usize) -> f64 {
        // Fitted on three eval.txt traces (routers of 4k, 16k and 32k tokens; BENCHMARKS.md,
        // session 11); 0.03-0.1 are alike, taking min(plan, rate) instead cost 1-3% more misses.
        const PLAN_WEIGHT: f64 = 0.1;
        let from_plan = match planned {
            usize::MAX => 0.0,
            p => PLAN_WEIGHT / p.max(1) as f64,
        };
        1.0 / (from_plan + self.rate_of(id)).max(1e-12)
    }
}

/// Picks the resident expert with the furthest `distance` (the least recent on a tie).
/// A distance is `(beyond the plan, accesses)`: what the plan does not know goes first.
fn furthest(
    resident: &[ExpertId],
    last: &HashMap<ExpertId, usize>,
    distance: impl Fn(ExpertId) -> (bool, f64),
) -> ExpertId {
    let key = |id: ExpertId| {
        let (beyond, d) = distance(id);
        let last = last.get(&id).copied().unwrap_or(0);
        (beyond, d, std::cmp::Reverse(last))
    };
    *resident
        .iter()
        .max_by(|a, b| {
            let (ka, kb) = (key(**a), key(**b));
            ka.0.cmp(&kb.0)
                .then(ka.1.total_cmp(&kb.1))
                .then(ka.2.cmp(&kb.2))
        })
        .unwrap_or(&resident[0])
}

/// Belady with a predicted future: evicts the resident expert whose next use in the
/// pre-gating router's plan is furthest away. With an exact plan (the pre-gate decides) it
/// is Belady. With a predicted one, the plan's next use, weighted lightly, adds to the
/// expert's recent use rate.
pub struct Lookahead {
    /// Each expert's positions in the plan, ascending.
    uses: HashMap<ExpertId, Vec<usize>>,
    last: HashMap<ExpertId, usize>,
    /// None when the plan is the sequence itself.
    rate: Option<UseRate>,
}

impl Lookahead {
    /// `plan[t]` is the expert predicted for access t of the real sequence; `exact` when it
    /// is the sequence (the pre-gate decides).
    pub fn new(plan: &[ExpertId], exact: bool) -> Lookahead {
        Self::shared_by(plan, exact, 1)
    }

    /// The same for a cache that `layers` layers share.
    fn shared_by(plan: &[ExpertId], exact: bool, layers: usize) -> Lookahead {
        let mut uses: HashMap<ExpertId, Vec<usize>> = HashMap::new();
        for (t, id) in plan.iter().enumerate() {
            uses.entry(*id).or_default().push(t);
        }
        Lookahead {
            uses,
            last: HashMap::new(),
            rate: (!exact).then(|| UseRate::shared_by(layers)),
        }
    }

    fn next_use(&self, id: ExpertId, t: usize) -> usize {
        self.uses
            .get(&id)
            .and_then(|u| u.get(u.partition_point(|p| *p < t)).copied())
            .map_or(usize::MAX, |p| p - t)
    }
}

impl ReplacementPolicy for Lookahead {
    fn name(&self) -> &'static str {
        "lookahead"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        self.last.insert(id, t);
        if let Some(r) = &mut self.rate {
            r.access(id);
        }
    }
    fn victim(&mut self, resident: &[ExpertId], t: usize) -> ExpertId {
        furthest(resident, &self.last, |id| {
            let planned = self.next_use(id, t);
            match &self.rate {
                Some(r) => (false, r.distance(id, planned)),
                None => (planned == usize::MAX, planned as f64),
            }
        })
    }
}

/// The runtime's lookahead: the same rule over the uses that the pre-gating router's plan
/// knows (the rest of a prompt or of a text being scored), set before each step by
/// [`ReplacementPolicy::set_next_use`] in accesses from now. With no plan (decode) the
/// recent use rates decide, least recent on a tie. With an exact plan it is Belady over it.
#[derive(Default)]
pub struct PlannedLookahead {
    /// Expert → accesses until its next use in the plan.
    next_use: Vec<usize>,
    last: HashMap<ExpertId, usize>,
    rate: UseRate,
    exact: bool,
}

impl PlannedLookahead {
    /// `exact`: the plan is what will run (`--routing pregate`), so it alone decides.
    pub fn new(exact: bool) -> Self {
        PlannedLookahead {
            exact,
            ..Default::default()
        }
    }
}

impl ReplacementPolicy for PlannedLookahead {
    fn name(&self) -> &'static str {
        "lookahead"
    }
    fn access(&mut self, id: ExpertId, t: usize) {
        self.last.insert(id, t);
        self.rate.access(id);
    }
    fn prefetched(&mut self, id: ExpertId, t: usize) {
        self.last.insert(id, t);
    }
    fn victim(&mut self, resident: &[ExpertId], _t: usize) -> ExpertId {
        furthest(resident, &self.last, |id| {
            let planned = self
                .next_use
                .get(id as usize)
                .copied()
                .unwrap_or(usize::MAX);
            match (self.exact, planned) {
                // Past the plan's horizon (decode: the next token is not known yet).
                (true, usize::MAX) => (true, self.rate.distance(id, usize::MAX)),
                (true, p) => (false, p as f64),
                (false, p) => (false, self.rate.distance(id, p)),
            }
        })
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
        self.build_shared(sequence, plan, 1)
    }

    /// The policy of one cache that `layers` layers share (their accesses interleaved in
    /// `sequence`): the use rates of LFU and lookahead fade per token, not per access.
    pub fn build_shared(
        self,
        sequence: &[ExpertId],
        plan: Option<&[ExpertId]>,
        layers: usize,
    ) -> Box<dyn ReplacementPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::Lfu => Box::new(Lfu {
                rate: UseRate::shared_by(layers),
                last: HashMap::new(),
            }),
            PolicyKind::Belady => Box::new(Belady::new(sequence)),
            PolicyKind::Lookahead => Box::new(match plan {
                Some(p) => Lookahead::shared_by(p, false, layers),
                None => Lookahead::shared_by(sequence, true, layers),
            }),
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
    fn lfu_forgets_what_stopped_being_used() {
        // 1 is used 300 times, then 2 and 3 take over. Counts that never fade would keep 1
        // and make 2 and 3 thrash for 400 accesses; fading rates let 1 go after ~100.
        let seq: Vec<ExpertId> = std::iter::repeat_n(1, 300)
            .chain([2, 3].into_iter().cycle().take(400))
            .collect();
        let misses = run(PolicyKind::Lfu, &seq, 2);
        assert!((3..150).contains(&misses), "{misses} misses");
    }

    #[test]
    fn a_predicted_plan_gives_way_to_what_recent_use_says() {
        // The plan keeps predicting 9 (never used) in place of 2, which really comes every
        // other access. Trusting the plan alone evicts 2 again and again; the use rates
        // keep it.
        let seq: Vec<ExpertId> = [1, 2, 3, 2, 4, 2].into_iter().cycle().take(600).collect();
        let plan: Vec<ExpertId> = seq.iter().map(|e| if *e == 2 { 9 } else { *e }).collect();
        let mut blended = Lookahead::new(&plan, false);
        let with_rates = simulate(&seq, 2, &mut blended).misses;
        let mut plan_only = Lookahead::new(&plan, true);
        let plan_alone = simulate(&seq, 2, &mut plan_only).misses;
        assert!(with_rates < plan_alone, "{with_rates} vs {plan_alone}");
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
