//! Expert offload: a model whose experts live in a small VRAM cache gives bit-identical
//! output to the all-resident run (decode, prefill in waves, prefetch, both policies),
//! never goes past its budget, refuses a budget too small in bytes, and turns a model file
//! changed under its mapping into an error.

mod common;

use std::path::Path;

use common::carve_tiny;
use pregate::model::memory::VramBudget;
use pregate::model::offload::OffloadOptions;
use pregate::moe::{PolicyKind, Prefetch, Routing};
use pregate::{Engine, EngineOptions, Error};

const TOKENS: [u32; 12] = [102, 110, 32, 105, 116, 101, 109, 95, 51, 40, 120, 58];

fn load(path: &Path, budget: VramBudget, offload: OffloadOptions) -> pregate::Result<Engine> {
    Engine::load(
        path,
        &EngineOptions {
            ctx: 64,
            budget,
            offload,
            ..Default::default()
        },
    )
}

/// Logits after a prefill of most tokens, then after each decode step, and then greedy
/// tokens: every path through the expert kernels.
fn run(engine: &Engine) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut s = engine.session().expect("session");
    let split = TOKENS.len() - 3;
    let mut logits = vec![s.next_logits(&TOKENS[..split]).expect("prefill")];
    for &t in &TOKENS[split..] {
        logits.push(s.next_logits(&[t]).expect("decode"));
    }
    let mut tok = s.next_argmax(&[TOKENS[0]]).expect("decode");
    let mut greedy = vec![tok];
    for _ in 0..8 {
        tok = s.next_argmax(&[tok]).expect("decode");
        greedy.push(tok);
    }
    (logits, greedy)
}

#[test]
fn offloaded_experts_give_bit_identical_output() {
    let (_, carved) = carve_tiny("offload_exact", 8, 1, 2);
    let resident = load(&carved, VramBudget::All, OffloadOptions::default()).expect("load");
    assert!(resident.model.offload.is_none());
    let (want_logits, want_greedy) = run(&resident);
    let n_expert = resident.model.config.moe.as_ref().expect("moe").n_expert;
    drop(resident);
    for (policy, prefetch) in [
        (PolicyKind::Lru, Prefetch::None),
        (PolicyKind::Lfu, Prefetch::None),
        (PolicyKind::Lru, Prefetch::NextLayer),
    ] {
        let opts = OffloadOptions {
            policy,
            prefetch,
            verify: true,
            ..Default::default()
        };
        // A tiny share clamps to one token's experts: 2 slots per layer.
        let engine = load(&carved, VramBudget::ExpertShare(0.01), opts.clone()).expect("load");
        let off = engine.model.offload.as_ref().expect("offloaded");
        assert_eq!(off.slots, 2);
        let (logits, greedy) = run(&engine);
        let what = format!("{policy:?}/{prefetch:?}");
        for (i, (w, g)) in want_logits.iter().zip(&logits).enumerate() {
            assert!(
                w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: logits of step {i} differ by {}",
                common::max_abs_diff(w, g)
            );
        }
        assert_eq!(greedy, want_greedy, "{what}: greedy tokens");
        let m = engine.metrics();
        assert!(m.expert_misses > 0 && m.bytes_uploaded > 0, "{what}: {m:?}");
        assert_eq!(m.per_layer.len(), 2);
        // More experts were used than fit: some were loaded more than once.
        assert!(m.expert_misses as usize > 2 * 2, "{what}: {m:?}");
        if prefetch == Prefetch::NextLayer {
            assert!(
                m.prefetch_hits + m.wasted_prefetches > 0,
                "{what}: prefetch never ran: {m:?}"
            );
        }
        let budget = m.budget_bytes.expect("a budget");
        assert!(m.peak_vram_bytes <= budget, "{what}: {m:?}");
        assert!(n_expert > 2);
    }
}

/// Apps share one Engine across threads. Two sessions stepping at once share one expert
/// cache: neither may evict an expert the other's step still reads.
#[test]
fn sessions_on_two_threads_share_the_expert_cache_exactly() {
    let (_, carved) = carve_tiny("offload_threads", 8, 1, 2);
    let resident = load(&carved, VramBudget::All, OffloadOptions::default()).expect("load");
    let want = run(&resident);
    let one_kv = resident.memory.kv_cache;
    drop(resident);
    let load_shared = |prefetch| {
        let opts = EngineOptions {
            ctx: 64,
            budget: VramBudget::ExpertShare(0.01),
            sessions: 3,
            offload: OffloadOptions {
                prefetch,
                ..Default::default()
            },
            ..Default::default()
        };
        Engine::load(&carved, &opts).expect("load")
    };
    // The next layer's prefetch loads while a step runs: it too must keep to its step.
    let prefetching = load_shared(Prefetch::NextLayer);
    runs_on_threads_match(&prefetching, &want, "next-layer prefetch");
    drop(prefetching);
    let engine = load_shared(Prefetch::None);
    assert_eq!(engine.memory.sessions, 3);
    assert_eq!(
        engine.memory.kv_cache,
        3 * one_kv,
        "a KV cache for each session"
    );
    assert_eq!(engine.model.offload.as_ref().expect("offloaded").slots, 2);
    for round in 0..3 {
        runs_on_threads_match(&engine, &want, &format!("round {round}"));
    }
    // A session past the planned three does not fit the budget, and the error says why.
    let open: Vec<_> = (0..3).map(|_| engine.session().expect("planned")).collect();
    match engine.session().err().expect("a fourth session") {
        Error::BudgetExceeded { hint, .. } => {
            assert!(hint.contains("holds 3 session(s)"), "{hint}")
        }
        e => panic!("unexpected error {e}"),
    }
    drop(open);
}

/// Three threads each `run` a session of `engine` at once; each gets `want` bit for bit.
fn runs_on_threads_match(engine: &Engine, want: &(Vec<Vec<f32>>, Vec<u32>), what: &str) {
    let got: Vec<_> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..3).map(|_| s.spawn(|| run(engine))).collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    for (logits, greedy) in got {
        assert_eq!(greedy, want.1, "{what}: greedy tokens");
        for (i, (w, g)) in want.0.iter().zip(&logits).enumerate() {
            assert!(
                w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: logits of step {i} differ by {}",
                common::max_abs_diff(w, g)
            );
        }
    }
}

#[test]
fn a_byte_budget_makes_slots_and_a_small_one_names_the_bytes() {
    let (_, carved) = carve_tiny("offload_bytes", 8, 1, 2);
    let resident = load(&carved, VramBudget::All, OffloadOptions::default()).expect("load");
    let plan = resident.memory.clone();
    drop(resident);
    assert!(plan.expert_slots.is_none() && plan.experts > 0 && plan.slot_bytes > 0);
    // Room for everything but the experts, plus 3 slots in each of the 2 layers (and
    // their slot table rows and the staging ring).
    let staging = plan.staging_buffers as u64 * plan.slot_bytes;
    let slots_bytes = 2 * (3 * plan.slot_bytes + 4 * plan.n_expert as u64) + staging;
    let budget = plan.total() - plan.experts + slots_bytes;
    let engine = load(
        &carved,
        VramBudget::Bytes(budget),
        OffloadOptions::default(),
    )
    .expect("load under a byte budget");
    assert_eq!(engine.memory.expert_slots, Some(3));
    run(&engine);
    let m = engine.metrics();
    assert!(
        m.peak_vram_bytes <= budget,
        "peak {} > {budget}",
        m.peak_vram_bytes
    );
    drop(engine);
    // Fewer bytes than one token's experts need, with the context fixed: a clear error.
    let small = plan.total() - plan.experts;
    let err = Engine::load(
        &carved,
        &EngineOptions {
            ctx: 64,
            budget: VramBudget::Bytes(small),
            ..Default::default()
        },
    )
    .err()
    .expect("too small");
    match &err {
        Error::BudgetTooSmall { needed, budget, .. } => assert!(needed > budget),
        e => panic!("unexpected error {e}"),
    }
    assert!(err.to_string().contains("bytes needed"), "{err}");
}

#[test]
fn a_model_file_changed_while_mapped_is_an_error_not_garbage() {
    let (_, carved) = carve_tiny("offload_changed", 8, 1, 2);
    let opts = OffloadOptions {
        verify: true,
        ..Default::default()
    };
    // Bytes changed in place: --verify's checksums catch it on the first upload.
    let engine = load(&carved, VramBudget::ExpertShare(0.01), opts).expect("load");
    let f = &engine.model.file;
    let t = f.tensor("blk.0.ffn_up_exps.weight").expect("experts");
    let mut bytes = std::fs::read(&carved).expect("read");
    let n = t.n_bytes as usize;
    for b in &mut bytes[t.offset as usize..t.offset as usize + n] {
        *b ^= 0x55;
    }
    std::fs::write(&carved, &bytes).expect("rewrite in place");
    let mut s = engine.session().expect("session");
    let err = s.next_argmax(&TOKENS).expect_err("changed experts");
    assert!(err.to_string().contains("changed on disk"), "{err}");
    drop(s);
    drop(engine);
    // Truncated: the size check refuses to read past the end (instead of SIGBUS).
    let engine = load(
        &carved,
        VramBudget::ExpertShare(0.01),
        OffloadOptions::default(),
    )
    .expect("load");
    let t = engine
        .model
        .file
        .tensor("blk.1.ffn_gate_exps.weight")
        .expect("experts");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&carved)
        .expect("open");
    file.set_len(t.offset + 16).expect("truncate");
    let mut s = engine.session().expect("session");
    let err = s.next_argmax(&TOKENS).expect_err("truncated file");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn pregate_prefetch_keeps_output_exact_and_needs_a_router() {
    let (_, carved) = carve_tiny("offload_pregate", 8, 1, 2);
    let resident = load(&carved, VramBudget::All, OffloadOptions::default()).expect("load");
    let (want_logits, want_greedy) = run(&resident);
    // Train a router on the model's own routing and save it where it is looked for.
    let tokens: Vec<u32> = (0..400u32).map(|i| 32 + (i * 7 + i / 5) % 90).collect();
    let trace = pregate::moe::trace::record_tokens(&resident, &tokens, |_, _| {}).expect("trace");
    drop(resident);
    let opts = pregate::router::TrainOptions {
        buckets: 256,
        ..Default::default()
    };
    let (router, report) =
        pregate::router::train(&tokens, &trace, &opts, |_, _, _| {}).expect("train");
    assert!(report.loss.last() < report.loss.first(), "{report:?}");
    let pregate_opts = OffloadOptions {
        prefetch: Prefetch::Pregate,
        ..Default::default()
    };
    // No router yet: a clear error.
    let err = load(&carved, VramBudget::ExpertShare(0.01), pregate_opts.clone())
        .err()
        .expect("no router");
    assert!(err.to_string().contains("train-router"), "{err}");
    router
        .save(&pregate::model::offload::default_router_path(&carved))
        .expect("save");
    // The CLI records the router's plan in a trace, and simulate replays lookahead on it:
    // never better than Belady.
    let dir = carved.parent().expect("dir");
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "fn main() { let x = 1 + 2; println!(\"{x}\"); }\n".repeat(6),
    )
    .expect("text");
    let trace_path = dir.join("plan.bin");
    let cli = common::run_cli;
    let (m, t, tr) = (
        carved.to_str().expect("path"),
        text.to_str().expect("path"),
        trace_path.to_str().expect("path"),
    );
    cli(&["trace", "-m", m, "--ctx", "64", "-f", t, "-o", tr]);
    let plan = pregate::moe::ExpertTrace::read(&trace_path).expect("trace");
    assert!(
        plan.plan.is_some(),
        "the router next to the model recorded its plan"
    );
    // `simulate TRACE --policy belady,lookahead --json` plus `extra`: one row a policy.
    let simulate = |extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["simulate", tr, "--policy", "belady,lookahead", "--json"];
        args.extend(extra);
        let rows: Vec<serde_json::Value> = cli(&args)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(rows.len(), 2, "{rows:?}");
        rows
    };
    let rows = simulate(&["--slots", "4"]);
    let misses: Vec<u64> = rows
        .iter()
        .map(|r| r["misses"].as_u64().expect("misses"))
        .collect();
    assert_eq!(misses.len(), 2);
    // Belady's row is the library's replay on the same pool.
    let seq = plan.sequence();
    let mut belady = PolicyKind::Belady.build_shared(&seq, None, plan.n_layers as usize);
    assert_eq!(
        misses[0],
        pregate::moe::simulate(&seq, 4, belady.as_mut()).misses
    );
    // Each row is also given against Belady's count on the same slots.
    for (r, m) in rows.iter().zip(&misses) {
        let x = r["x_belady"].as_f64().expect("x_belady");
        assert!(
            (x - *m as f64 / misses[0].max(1) as f64).abs() < 1e-9,
            "{r}"
        );
    }
    assert!(
        misses[1] >= misses[0],
        "lookahead {} < belady {}",
        misses[1],
        misses[0]
    );
    // Per-layer caches (the runtime's layout): each row is the DP split's replay, beside
    // the even split's, and lookahead is still never better than Belady.
    let rows = simulate(&["--slots", "50%", "--per-layer"]);
    let slots = rows[0]["slots"].as_u64().expect("slots") as usize;
    for (r, kind) in rows.iter().zip([PolicyKind::Belady, PolicyKind::Lookahead]) {
        let want = pregate::moe::sizing::replay_per_layer(&plan, kind, slots).expect("fits");
        assert_eq!(r["misses"].as_u64(), Some(want.misses), "{r}");
        assert_eq!(r["uniform_misses"].as_u64(), Some(want.even_misses), "{r}");
        assert!(want.misses <= want.even_misses, "{r}");
        assert!(want.split.iter().sum::<usize>() <= slots, "{r}");
    }
    assert!(rows[1]["x_belady"].as_f64().expect("x") >= 1.0, "{rows:?}");
    // More slots than the trace has experts: refused by the flag, not a huge allocation.
    for extra in [
        &["--slots", "18446744073709551615"][..],
        &["--slots", "10000000000", "--per-layer"],
    ] {
        let out = common::cli(&[&["simulate", tr][..], extra].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains("--slots") && err.contains("experts"), "{err}");
    }

    let engine = load(&carved, VramBudget::ExpertShare(0.01), pregate_opts).expect("load");
    let (logits, greedy) = run(&engine);
    for (w, g) in want_logits.iter().zip(&logits) {
        assert!(w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    assert_eq!(greedy, want_greedy);
    let m = engine.metrics();
    assert_eq!(m.prefetch, "pregate");
    assert!(m.prefetch_hits + m.wasted_prefetches > 0, "{m:?}");
    drop(engine);

    // --routing pregate: the router decides. The experts that run are exactly its plan,
    // and the offloaded run (no readback) matches the resident one bit for bit.
    let decide = OffloadOptions {
        routing: Routing::Pregate,
        ..Default::default()
    };
    let resident = load(&carved, VramBudget::All, decide.clone()).expect("load");
    let window = &tokens[..48];
    let ran = pregate::moe::trace::record_tokens(&resident, window, |_, _| {}).expect("trace");
    assert_eq!(ran.choices, router.plan(window));
    let (want_logits, want_greedy) = run(&resident);
    drop(resident);
    let offloaded = load(&carved, VramBudget::ExpertShare(0.01), decide).expect("load");
    let (logits, greedy) = run(&offloaded);
    assert_eq!(greedy, want_greedy);
    for (w, g) in want_logits.iter().zip(&logits) {
        assert!(w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    assert!(offloaded.metrics().expert_misses > 0);
    drop(offloaded);
    lookahead_plans_by_the_router(&carved, &tokens);
}

/// `--policy lookahead`: a cache policy only (output bit-identical to resident), slots
/// split across layers by miss curves, and over a scored text whose plan is exact
/// (`--routing pregate`) no more misses than LRU.
fn lookahead_plans_by_the_router(carved: &Path, tokens: &[u32]) {
    let scored = |policy: PolicyKind, routing: Routing, budget: VramBudget| {
        let engine = Engine::load(
            carved,
            &EngineOptions {
                ctx: 256,
                budget,
                offload: OffloadOptions {
                    policy,
                    routing,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .expect("load");
        let text = &tokens[..240];
        let nll = engine
            .session()
            .expect("session")
            .nll(&text[..239], &text[1..], 0)
            .expect("nll");
        (nll, engine.metrics())
    };
    for routing in [Routing::Layer, Routing::Pregate] {
        let (want, _) = scored(PolicyKind::Lru, routing, VramBudget::All);
        let (lru, lru_m) = scored(PolicyKind::Lru, routing, VramBudget::ExpertShare(0.6));
        let (look, m) = scored(PolicyKind::Lookahead, routing, VramBudget::ExpertShare(0.6));
        for got in [&lru, &look] {
            assert!(want
                .iter()
                .zip(got)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        assert_eq!(m.policy, "lookahead");
        let slots = m.expert_slots.expect("offloaded");
        assert_eq!(
            m.layer_slots.iter().sum::<usize>(),
            slots * m.layer_slots.len()
        );
        assert!(m.layer_slots.iter().all(|s| (2..=8).contains(s)), "{m:?}");
        if routing == Routing::Pregate {
            assert!(
                m.expert_misses <= lru_m.expert_misses,
                "lookahead {} > lru {}",
                m.expert_misses,
                lru_m.expert_misses
            );
        }
    }
}

#[test]
fn a_prefill_chunk_loads_each_needed_expert_once_per_layer() {
    let (_, carved) = carve_tiny("offload_prefill", 8, 1, 2);
    let resident = load(&carved, VramBudget::All, OffloadOptions::default()).expect("load");
    let trace = pregate::moe::trace::record_tokens(&resident, &TOKENS, |_, _| {}).expect("trace");
    let (layers, k) = (trace.n_layers as usize, trace.k as usize);
    let distinct: Vec<u64> = (0..layers)
        .map(|l| {
            let mut used: Vec<u16> = (0..TOKENS.len())
                .flat_map(|t| {
                    trace.choices[(t * layers + l) * k..(t * layers + l + 1) * k].to_vec()
                })
                .collect();
            used.sort();
            used.dedup();
            used.len() as u64
        })
        .collect();
    drop(resident);
    // From a cold cache, one prefill chunk: each needed expert is loaded exactly once per
    // layer, whether the slots hold them all (one wave) or not (several waves).
    for share in [0.01, 0.5, 0.9] {
        let engine = load(
            &carved,
            VramBudget::ExpertShare(share),
            OffloadOptions::default(),
        )
        .expect("load");
        let slots = engine.model.offload.as_ref().expect("offloaded").slots;
        engine
            .session()
            .expect("session")
            .next_argmax(&TOKENS)
            .expect("prefill");
        let m = engine.metrics();
        for (l, s) in m.per_layer.iter().enumerate() {
            assert_eq!(
                (s.misses, s.hits),
                (distinct[l], 0),
                "layer {l}, {slots} slots"
            );
        }
    }
}
