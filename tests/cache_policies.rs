//! Cache policies on synthetic traces: Belady's optimum never misses more than LRU or LFU
//! (property test), and traces survive a file round trip and reject corruption.

mod common;

use pregate::moe::{simulate, ExpertTrace, PolicyKind};
use proptest::prelude::*;

proptest! {
    #[test]
    fn belady_never_misses_more_than_any_policy(
        seq in proptest::collection::vec(0u32..24, 1..400),
        slots in 1usize..12,
    ) {
        let belady = simulate(&seq, slots, PolicyKind::Belady.build(&seq).as_mut()).misses;
        for kind in [PolicyKind::Lru, PolicyKind::Lfu] {
            let other = simulate(&seq, slots, kind.build(&seq).as_mut()).misses;
            prop_assert!(belady <= other, "{kind:?}: {other} < belady {belady}");
        }
        // Lookahead on an exact plan is Belady.
        let exact = simulate(&seq, slots, PolicyKind::Lookahead.build(&seq).as_mut()).misses;
        prop_assert_eq!(exact, belady);
        // On a plan that is wrong in places, it can only do worse.
        let plan: Vec<u32> = seq.iter().enumerate().map(|(i, e)| if i % 3 == 0 { (e + 5) % 24 } else { *e }).collect();
        let mut guess = PolicyKind::Lookahead.build_with_plan(&seq, Some(&plan));
        prop_assert!(simulate(&seq, slots, guess.as_mut()).misses >= belady);
        // Cold misses are a floor for every policy.
        let distinct = seq.iter().collect::<std::collections::HashSet<_>>().len() as u64;
        prop_assert!(belady >= distinct);
    }
}

#[test]
fn trace_round_trips_and_maps_layers_to_global_ids() {
    let t = ExpertTrace {
        n_layers: 2,
        experts_per_layer: 8,
        k: 2,
        choices: vec![0, 7, 1, 2, /* token 2 */ 3, 4, 5, 6],
        plan: None,
    };
    assert_eq!(t.n_tokens(), 2);
    assert_eq!(t.sequence(), vec![0, 7, 9, 10, 3, 4, 13, 14]);
    let path = common::tmp_dir("trace").join("t.bin");
    t.write(&path).expect("write");
    assert_eq!(ExpertTrace::read(&path).expect("read"), t);
    // Truncation, bad magic and out-of-range experts are errors, not panics.
    let bytes = std::fs::read(&path).expect("bytes");
    std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("write");
    assert!(ExpertTrace::read(&path).is_err());
    let mut bad = bytes.clone();
    bad[0] = b'X';
    std::fs::write(&path, &bad).expect("write");
    assert!(ExpertTrace::read(&path).is_err());
    let mut bad = bytes;
    let n = bad.len();
    bad[n - 2..].copy_from_slice(&9u16.to_le_bytes());
    std::fs::write(&path, &bad).expect("write");
    assert!(ExpertTrace::read(&path).is_err());
}
