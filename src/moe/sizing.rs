//! Per-layer cache sizing (AdapMoE): given each layer's miss curve (misses as a function of
//! its slot count, measured by replaying a recorded trace), split a total slot budget
//! across layers to minimise the total misses, by dynamic programming.

use super::policy::{simulate, PolicyKind};
use super::ExpertTrace;

/// Misses of layer `l`'s accesses with `s` slots, for s in 0..=experts_per_layer, when
/// each layer has its own cache run by `policy`.
pub fn miss_curves(trace: &ExpertTrace, policy: PolicyKind) -> Vec<Vec<u64>> {
    let (layers, k, e) = (
        trace.n_layers as usize,
        trace.k as usize,
        trace.experts_per_layer as usize,
    );
    let plan = trace.plan.as_ref();
    (0..layers)
        .map(|l| {
            let pick = |choices: &[u16]| -> Vec<u32> {
                (0..trace.n_tokens())
                    .flat_map(|t| choices[(t * layers + l) * k..(t * layers + l + 1) * k].to_vec())
                    .map(u32::from)
                    .collect()
            };
            let seq = pick(&trace.choices);
            let layer_plan = plan.map(|p| pick(p));
            (0..=e)
                .map(|s| {
                    let mut p = policy.build_with_plan(&seq, layer_plan.as_deref());
                    simulate(&seq, s, p.as_mut()).misses
                })
                .collect()
        })
        .collect()
}

/// Slots per layer summing to at most `total` (each layer at least `min`) that minimise
/// the summed misses of `curves` (`curves[l][s]`: layer l's misses with s slots).
pub fn split_slots(curves: &[Vec<u64>], total: usize, min: usize) -> Option<Vec<usize>> {
    let layers = curves.len();
    // best[l][b]: least misses of layers ..l with b slots in all; choice[l][b]: layer l-1's.
    let mut best = vec![vec![u64::MAX; total + 1]; layers + 1];
    let mut choice = vec![vec![0usize; total + 1]; layers + 1];
    best[0].iter_mut().for_each(|b| *b = 0);
    for l in 0..layers {
        let max_s = curves[l].len() - 1;
        for b in 0..=total {
            for s in min..=max_s.min(b) {
                let prev = best[l][b - s];
                if prev == u64::MAX {
                    continue;
                }
                let v = prev + curves[l][s];
                if v < best[l + 1][b] {
                    best[l + 1][b] = v;
                    choice[l + 1][b] = s;
                }
            }
        }
    }
    // Curves need not use every slot (a layer holds at most all its experts).
    let mut b = (0..=total).min_by_key(|b| (best[layers][*b], usize::MAX - b))?;
    if best[layers][b] == u64::MAX {
        return None;
    }
    let mut out = vec![0; layers];
    for l in (0..layers).rev() {
        out[l] = choice[l + 1][b];
        b -= out[l];
    }
    Some(out)
}

/// Per-layer caches replayed on a trace under one policy: the DP split of the slots over
/// the layers' miss curves against an even split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerLayerReplay {
    /// Misses with the DP split.
    pub misses: u64,
    /// Misses with `even` slots in every layer.
    pub even_misses: u64,
    /// The DP split, slots per layer.
    pub split: Vec<usize>,
    /// The even share (at most a layer's experts).
    pub even: usize,
}

/// Replays `trace` with each layer's own cache under `policy` and `slots` in all; None
/// when the slots cannot hold one token's `k` experts in every layer.
pub fn replay_per_layer(
    trace: &ExpertTrace,
    policy: PolicyKind,
    slots: usize,
) -> Option<PerLayerReplay> {
    let curves = miss_curves(trace, policy);
    let split = split_slots(&curves, slots, trace.k as usize)?;
    let even = (slots / curves.len().max(1)).min(trace.experts_per_layer as usize);
    let cost = |s: &dyn Fn(usize) -> usize| -> u64 {
        curves.iter().enumerate().map(|(l, c)| c[s(l)]).sum()
    };
    Some(PerLayerReplay {
        misses: cost(&|l| split[l]),
        even_misses: cost(&|_| even),
        split,
        even,
    })
}

/// Slots per layer for `--policy lookahead` at run time, with no recorded trace: the
/// pre-gating router's plan of `tokens` (calibration text) stands in for one. The curves are
/// LFU's, because in decode the plan knows no future token and lookahead falls back to the
/// experts' recent use rates, which is LFU. `uniform` slots per MoE layer (`moe_layer[l]`)
/// is the total to split, the plan's `k` experts a token; each layer keeps at least `min`
/// (one token's experts: more than `k` where adaptive gating may add). Dense layers keep
/// `uniform` (they have no pool).
pub fn split_by_plan(
    router: &crate::router::PreGateRouter,
    tokens: &[u32],
    (k, min): (usize, usize),
    uniform: usize,
    moe_layer: &[bool],
) -> Vec<usize> {
    let n_layer = moe_layer.len();
    let e = router.config.n_expert;
    let trace = ExpertTrace {
        n_layers: n_layer as u32,
        experts_per_layer: e as u32,
        k: k as u32,
        choices: router.plan_top(tokens, k),
        plan: None,
    };
    let curves = miss_curves(&trace, PolicyKind::Lfu);
    let moe_curves: Vec<Vec<u64>> = curves
        .into_iter()
        .zip(moe_layer)
        .filter(|(_, m)| **m)
        .map(|(c, _)| c)
        .collect();
    let total = uniform * moe_curves.len();
    let Some(split) = split_slots(&moe_curves, total, min.max(k).min(e)) else {
        return vec![uniform; n_layer];
    };
    let mut it = split.into_iter();
    moe_layer
        .iter()
        .map(|m| match m {
            true => it.next().unwrap_or(uniform),
            false => uniform,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_go_where_they_save_the_most_misses() {
        // Layer 0 gains little from a second slot, layer 1 a lot.
        let curves = vec![vec![100, 50, 45, 44], vec![100, 90, 10, 5]];
        assert_eq!(split_slots(&curves, 3, 1), Some(vec![1, 2]));
        assert_eq!(split_slots(&curves, 2, 1), Some(vec![1, 1]));
        assert_eq!(split_slots(&curves, 1, 1), None);
        // A uniform split is never better than the DP's.
        let dp = split_slots(&curves, 4, 1).unwrap();
        let cost = |s: &[usize]| curves[0][s[0]] + curves[1][s[1]];
        assert!(cost(&dp) <= cost(&[2, 2]));
    }

    #[test]
    fn a_per_layer_replay_counts_each_layers_misses_under_its_split() {
        // Two layers, top-1 of 3 experts. Layer 0 cycles through all three (every access
        // misses with fewer than 3 slots under LRU); layer 1 always uses expert 0.
        let choices: Vec<u16> = (0..6u16).flat_map(|t| [t % 3, 0]).collect();
        let trace = ExpertTrace {
            n_layers: 2,
            experts_per_layer: 3,
            k: 1,
            choices,
            plan: None,
        };
        let r = replay_per_layer(&trace, PolicyKind::Lru, 4).unwrap();
        // DP: 3 slots to layer 0 (3 cold misses), 1 to layer 1 (1 cold miss).
        assert_eq!((r.split.clone(), r.misses), (vec![3, 1], 4));
        // Even: 2 each, and layer 0 misses all 6 of its accesses.
        assert_eq!((r.even, r.even_misses), (2, 7));
        assert!(replay_per_layer(&trace, PolicyKind::Lru, 1).is_none());
    }
}
