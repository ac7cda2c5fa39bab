//! Adaptive gating (AdapMoE): quality 0 is the fixed top-k, a zero threshold is top-1
//! everywhere (the same as one expert per token), the dropped experts are neither run nor
//! loaded, and the measured profile gives thresholds that cut the active experts.

mod common;

use std::path::Path;

use common::{carve_tiny, max_abs_diff};
use pregate::model::memory::VramBudget;
use pregate::model::offload::OffloadOptions;
use pregate::router::adaptive::AdaptiveMax;
use pregate::{Engine, EngineOptions};

const TOKENS: [u32; 12] = [102, 110, 32, 105, 116, 101, 109, 95, 51, 40, 120, 58];

fn load(path: &Path, k: Option<usize>, budget: VramBudget) -> Engine {
    Engine::load(
        path,
        &EngineOptions {
            ctx: 300,
            experts_per_token: k,
            budget,
            offload: OffloadOptions::default(),
            ..Default::default()
        },
    )
    .expect("load")
}

/// Logits after a prefill (grouped kernels), then after each of three decode steps.
fn run(engine: &Engine) -> Vec<Vec<f32>> {
    common::step_logits(engine, &TOKENS)
}

fn assert_close(want: &[Vec<f32>], got: &[Vec<f32>], tol: f32, what: &str) {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        let d = max_abs_diff(w, g);
        assert!(d <= tol, "{what}: step {i} differs by {d}");
    }
}

/// Runs `engine` with every layer's threshold at `keep`, checks that each token kept `k`
/// experts and that this is what a load at `k` experts a token computes; returns the run.
fn threshold_computes_k(engine: &Engine, carved: &Path, keep: f32, k: usize) -> Vec<Vec<f32>> {
    let layers = engine.model.config.n_layer;
    engine.model.set_adaptive_keep(&vec![keep; layers]).unwrap();
    engine.reset_metrics();
    let got = run(engine);
    assert_eq!(engine.metrics().mean_active_experts, Some(k as f64));
    let fixed_k = load(carved, Some(k), VramBudget::All);
    assert_close(
        &run(&fixed_k),
        &got,
        1e-5,
        &format!("threshold {keep} vs k = {k}"),
    );
    got
}

fn assert_bit_identical(want: &[Vec<f32>], got: &[Vec<f32>]) {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        assert!(
            w.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
            "step {i} differs"
        );
    }
}

#[test]
fn quality_zero_is_the_fixed_top_k_and_top1_everywhere_is_one_expert() {
    let (_, carved) = carve_tiny("adaptive_exact", 8, 1, 2);
    let mut engine = load(&carved, None, VramBudget::All);
    let fixed = run(&engine);
    let m = engine.metrics();
    assert_eq!(m.mean_active_experts, Some(2.0));

    // Every layer at threshold 0 keeps only its top-1 expert: what k = 1 computes.
    let top1 = threshold_computes_k(&engine, &carved, 0.0, 1);
    assert!(
        max_abs_diff(&fixed[0], &top1[0]) > 1e-4,
        "dropping experts changed nothing"
    );

    // Back to quality 0: bit-identical to the fixed top-k.
    engine.set_adaptive(0.0, None, &[], |_, _| {}).unwrap();
    let again = run(&engine);
    assert_bit_identical(&fixed, &again);
}

#[test]
fn dropped_experts_are_not_loaded_under_a_budget() {
    let (_, carved) = carve_tiny("adaptive_offload", 8, 1, 2);
    let resident = load(&carved, None, VramBudget::All);
    let layers = resident.model.config.n_layer;
    resident
        .model
        .set_adaptive_keep(&vec![0.0; layers])
        .unwrap();
    let want = run(&resident);
    drop(resident);

    let fixed = load(&carved, None, VramBudget::ExpertShare(0.01));
    run(&fixed);
    let fixed_misses = fixed.metrics().expert_misses;
    drop(fixed);
    let engine = load(&carved, None, VramBudget::ExpertShare(0.01));
    engine.model.set_adaptive_keep(&vec![0.0; layers]).unwrap();
    let got = run(&engine);
    assert_bit_identical(&want, &got);
    let m = engine.metrics();
    assert!(
        m.expert_misses < fixed_misses,
        "top-1 loads {} experts, top-2 {fixed_misses}",
        m.expert_misses
    );
}

#[test]
fn a_measured_profile_cuts_active_experts_within_its_budget() {
    let (_, carved) = carve_tiny("adaptive_profile", 8, 1, 2);
    let mut engine = load(&carved, None, VramBudget::All);
    let profile = carved.with_extension("adaptive.json");
    let _ = std::fs::remove_file(&profile);
    let n_layer = engine.model.config.n_layer;
    let extra_slots = engine.model.config.moe.as_ref().unwrap().extra_slots();
    let (mut passes, mut total, mut saved_before_checks) = (0, 0, None);
    let plan = engine
        .set_adaptive(20.0, None, &[], |done, of| {
            (passes, total) = (done, of);
            // The measurement is saved before the checks begin, so an interrupted
            // check does not lose it.
            if done == 2 + n_layer + 1 {
                saved_before_checks = Some(profile.exists());
            }
        })
        .expect("adaptive")
        .clone();
    // One routing pass, the base NLL, one pass per MoE layer, then the checks of the
    // thresholds; saved for the next run.
    let checks = pregate::router::adaptive::validate_passes(extra_slots);
    assert_eq!(total, 2 + n_layer + checks);
    assert!(
        (2 + n_layer + 1..=total).contains(&passes),
        "{passes} of {total}"
    );
    assert_eq!(saved_before_checks, Some(true));
    assert!(profile.exists());
    let saved = pregate::router::adaptive::AdaptiveProfile::load(&profile).unwrap();
    assert!(saved.base_nll.is_finite() && saved.base_nll > 0.0);
    // Four 256-token windows the carve left out (calib::held_out's own test checks that).
    assert_eq!(saved.tokens, 4 * 256);
    for l in &saved.layers {
        assert!(l.delta_nll.is_finite() && l.delta_se >= 0.0);
        assert_eq!(l.top1_share.as_ref().map(Vec::len), Some(saved.tokens));
    }
    assert!(plan.predicted_cost_pct <= 20.0 + 1e-9);
    // The thresholds' real cost on the calibration tokens was measured and fits.
    let measured = plan.measured_cost_pct.expect("validated");
    assert!(measured <= 20.0 + 1e-9, "{measured}");
    assert_eq!(saved.validated.len(), 1);
    assert_eq!(saved.validated[0].quality_pct, 20.0);
    assert!(plan
        .keep
        .iter()
        .all(|k| (0.0..=1.0).contains(k) || *k == 2.0));
    engine.reset_metrics();
    run(&engine);
    let active = engine.metrics().mean_active_experts.unwrap();
    assert!((1.0..2.0).contains(&active), "{active}");

    // The profile is read back, not measured again; a wrong one is an error.
    let mut again = load(&carved, None, VramBudget::All);
    again
        .set_adaptive(20.0, None, &[], |_, _| panic!("measured again"))
        .unwrap();
    std::fs::write(&profile, b"{ not json").unwrap();
    let err = again.set_adaptive(20.0, None, &[], |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("adaptive"), "{err}");
    assert!(again.set_adaptive(-1.0, None, &[], |_, _| {}).is_err());
    // A profile path that cannot be written is refused before any measurement.
    let nowhere = profile.with_file_name("no-such-folder").join("p.json");
    let err = again
        .set_adaptive(20.0, Some(&nowhere), &[], |_, _| panic!("measured"))
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    drop(again);

    // The CLI: eval --adaptive reports the mean active experts (the profile is found
    // next to the model; a fresh one is measured and saved).
    std::fs::remove_file(&profile).unwrap();
    let dir = carved.parent().unwrap();
    let text = common::calib_file(dir);
    let json = common::run_cli(&[
        "eval",
        "-m",
        carved.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "2",
        "--adaptive",
        "20",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    let active = v["mean_active_experts"]
        .as_f64()
        .expect("mean_active_experts");
    assert!((1.0..2.0).contains(&active), "{v}");
    assert!(v["ppl"].as_f64().unwrap().is_finite());
    assert!(profile.exists());
}

/// A carve whose least-squares router gives the norm signal (7 routed experts, top-2).
fn carve_least_squares(tag: &str) -> std::path::PathBuf {
    let (dir, dense) = common::tiny_dense(tag, 21);
    let carved = dir.join("lsq.gguf");
    let opts = pregate::carve::CarveOptions {
        n_experts: 8,
        n_shared: 1,
        n_active: 2,
        calib: vec![common::calib_file(&dir)],
        calib_tokens: 600,
        seq_len: 200,
        recover: false,
        ..Default::default()
    };
    pregate::carve::carve(&dense, &carved, &opts, |_| {}).expect("carve");
    carved
}

#[test]
fn a_least_squares_carve_drops_where_the_norm_signal_passes_the_threshold() {
    let carved = carve_least_squares("adaptive_norm_signal");
    let engine = load(&carved, None, VramBudget::All);
    let moe = engine.model.config.moe.clone().expect("moe");
    assert_eq!(moe.confidence, pregate::model::config::Confidence::Norm);
    let (layers, k) = (engine.model.config.n_layer, moe.n_used);

    let mut s = engine.session().expect("session");
    let (_, conf) = s.route_pass(&TOKENS).expect("route");
    assert!(conf.iter().all(|c| (0.0..=1.0).contains(c)), "{conf:?}");
    // Per layer, the median confidence as the threshold: about half the tokens drop.
    let keep: Vec<f32> = (0..layers)
        .map(|l| {
            let mut c: Vec<f32> = conf.iter().skip(l).step_by(layers).copied().collect();
            c.sort_by(f32::total_cmp);
            c[c.len() / 2]
        })
        .collect();
    engine.model.set_adaptive_keep(&keep).unwrap();
    let mut s = engine.session().expect("session");
    let (ids, again) = s.route_pass(&TOKENS).expect("route");
    // The first layer's confidence does not depend on the threshold (later layers see
    // the stream the cuts before them changed).
    let first = |c: &[f32]| c.iter().step_by(layers).copied().collect::<Vec<f32>>();
    assert_eq!(first(&conf), first(&again));
    let mut dropped = 0;
    for (i, c) in again.iter().enumerate() {
        let (t, l) = (i / layers, i % layers);
        let slot = &ids[(t * layers + l) * k..(t * layers + l + 1) * k];
        // A dropped expert shows as a repeat of the token's first.
        let top1_only = slot[1..].iter().all(|&e| e == slot[0]);
        assert_eq!(
            top1_only,
            *c >= keep[l],
            "token {t}, layer {l}: confidence {c}"
        );
        dropped += usize::from(top1_only);
    }
    let pairs = conf.len();
    assert!(
        dropped >= pairs / 3 && dropped < pairs,
        "{dropped} of {pairs}"
    );
}

#[test]
fn a_profile_measured_on_ones_own_text_is_kept_apart_and_reused_only_for_it() {
    let (_, carved) = carve_tiny("adaptive_own_text", 8, 1, 2);
    let dir = carved.parent().unwrap().to_path_buf();
    let own = dir.join("own.txt");
    let own_text = [own.clone()];
    let text: String = (0..60)
        .map(|i| format!("def f_{i}(x):\n    return x + {}\n", i % 5))
        .collect();
    std::fs::write(&own, &text).unwrap();
    let builtin = carved.with_extension("adaptive.json");
    let _ = std::fs::remove_file(&builtin);

    let mut engine = load(&carved, None, VramBudget::All);
    let plan = engine
        .set_adaptive(20.0, None, &own_text, |_, _| {})
        .expect("adaptive on own text")
        .clone();
    assert!(plan.measured_cost_pct.is_some());
    // Kept beside the model under the text's id; the built-in text's profile is untouched.
    assert!(!builtin.exists());
    let saved: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("carved.adaptive-") && name.ends_with(".json")
        })
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let prof = pregate::router::adaptive::AdaptiveProfile::load(&saved[0]).unwrap();
    let id = prof.calib.clone().expect("calibration id");
    assert_eq!(id.len(), 16);
    assert!(saved[0].to_string_lossy().contains(&id[..8]));
    // All of this short text's tokens (fewer than four 256-token windows), nothing else.
    let n_text = engine.tokenizer.encode(&text, false).unwrap().len();
    assert_eq!(prof.tokens, n_text.min(4 * 256));

    // The same text again: read back, not measured.
    let mut again = load(&carved, None, VramBudget::All);
    again
        .set_adaptive(20.0, None, &own_text, |_, _| panic!("measured again"))
        .unwrap();
    // That profile asked for with other text is refused, naming both.
    let err = again
        .set_adaptive(20.0, Some(&saved[0]), &[], |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("calibration text") && err.contains("built-in"),
        "{err}"
    );

    // An empty calibration file is named, and nothing is written.
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let before = std::fs::read_dir(&dir).unwrap().count();
    let err = again
        .set_adaptive(20.0, None, std::slice::from_ref(&empty), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("calibration text is empty") && err.contains("empty.txt"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), before);

    // The CLI refuses --adaptive-calib without --adaptive (it would do nothing).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pregate"))
        .args(["eval", "-m", carved.to_str().unwrap(), "-f"])
        .arg(&own)
        .arg("--adaptive-calib")
        .arg(&own)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--adaptive QUALITY"));
}

#[test]
fn room_past_the_top_k_changes_nothing_at_quality_zero_and_adds_experts_where_unsure() {
    let carved = carve_least_squares("adaptive_room");
    let fixed = load(&carved, None, VramBudget::All);
    let want = run(&fixed);
    drop(fixed);
    let load_wide = |budget, adaptive_max| {
        Engine::load(
            &carved,
            &EngineOptions {
                ctx: 300,
                budget,
                adaptive_max,
                ..Default::default()
            },
        )
        .expect("load")
    };
    let mut wide = load_wide(VramBudget::All, AdaptiveMax::Auto);
    let moe = wide.model.config.moe.clone().expect("moe");
    // No recovery fit to bound it: twice the top-k.
    assert_eq!((moe.n_used, moe.n_slots), (2, 4));
    // Without a threshold the slots past the top-k stay empty: bit-identical.
    let got = run(&wide);
    assert_bit_identical(&want, &got);
    assert_eq!(wide.metrics().mean_active_experts, Some(2.0));

    // Threshold 1 keeps every expert whose predicted output is positive: here all four,
    // which is what four experts a token computes.
    threshold_computes_k(&wide, &carved, 1.0, 4);

    // A quality setting is searched both ways and recorded with its room and its mean
    // experts; a drop-only engine does not reuse it.
    let profile = carved.with_extension("adaptive.json");
    let _ = std::fs::remove_file(&profile);
    let plan = wide
        .set_adaptive(20.0, None, &[], |_, _| {})
        .expect("adaptive")
        .clone();
    let mean = plan.mean_experts.expect("mean experts measured");
    assert!((1.0..=4.0).contains(&mean), "{mean}");
    assert!(plan.measured_cost_pct.unwrap() <= 20.0 + 1e-9);
    let saved = pregate::router::adaptive::AdaptiveProfile::load(&profile).unwrap();
    assert_eq!(saved.validated.len(), 1);
    assert_eq!(saved.validated[0].extra_slots, 2);
    assert_eq!(saved.validated[0].mean_experts, Some(mean));
    let mut narrow = load(&carved, None, VramBudget::All);
    narrow.set_adaptive(20.0, None, &[], |_, _| {}).unwrap();
    let saved = pregate::router::adaptive::AdaptiveProfile::load(&profile).unwrap();
    assert_eq!(saved.validated.len(), 2);
    assert_eq!(saved.validated[1].extra_slots, 0);
    // Every pass is kept: the result is the largest λ whose cost fitted, and a looser
    // quality starts from those checks, so it never lands below that λ.
    let fitted = saved
        .checks
        .iter()
        .filter(|c| c.extra_slots == 2 && c.cost <= 1.2f64.ln())
        .map(|c| c.lambda)
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(saved.validated[0].lambda, fitted, "{:?}", saved.checks);
    let looser = wide
        .set_adaptive(40.0, None, &[], |_, _| {})
        .expect("adaptive")
        .clone();
    assert!(
        looser.lambda >= plan.lambda,
        "{} < {}",
        looser.lambda,
        plan.lambda
    );
    assert!(looser.measured_cost_pct.unwrap() <= 40.0 + 1e-9);

    // Offloaded, the default leaves no room (added experts would be cache misses); asked
    // for, the cache holds a token's four at once and the run is the resident one.
    let small = load_wide(VramBudget::ExpertShare(0.01), AdaptiveMax::Auto);
    let moe = small.model.config.moe.clone().expect("moe");
    assert_eq!((moe.n_used, moe.n_slots), (2, 2));
    drop(small);
    let resident = load_wide(VramBudget::All, AdaptiveMax::Experts(4));
    resident.model.set_adaptive_keep(&plan.keep).unwrap();
    let want = run(&resident);
    drop(resident);
    let small = load_wide(VramBudget::ExpertShare(0.01), AdaptiveMax::Experts(4));
    assert_eq!(small.memory.expert_slots, Some(4));
    small.model.set_adaptive_keep(&plan.keep).unwrap();
    assert_close(
        &want,
        &run(&small),
        1e-5,
        "with room, offloaded vs resident",
    );
}

#[test]
fn a_stopped_measurement_resumes_where_it_stopped() {
    use pregate::router::adaptive::{self, AdaptiveProfile, PartialProfile};
    let (_, carved) = carve_tiny("adaptive_resume", 8, 1, 2);
    let engine = load(&carved, None, VramBudget::All);
    let n_moe = engine.model.weights.moe_layers().len();
    assert!(n_moe >= 2, "{n_moe}");
    let windows: Vec<Vec<u32>> = vec![TOKENS.to_vec(), TOKENS.iter().rev().copied().collect()];

    // The whole measurement, keeping every checkpoint: one after the base NLL, then one a
    // MoE layer.
    let mut session = engine.session().unwrap();
    let stamp = adaptive::model_stamp(&carved);
    let mut states: Vec<PartialProfile> = Vec::new();
    let full = adaptive::measure(
        &mut session,
        &windows,
        &stamp,
        None,
        |p| states.push(p.clone()),
        |_, _| {},
    )
    .expect("measure");
    assert_eq!(states.len(), 1 + n_moe);
    assert_eq!(states[1].measured.len(), 1);

    // Stopped after the first MoE layer: resuming runs only the passes left and gives the
    // same profile, value for value.
    let (mut first, mut resumed_passes) = (None, 0);
    let resumed = adaptive::measure(
        &mut session,
        &windows,
        &stamp,
        Some(states[1].clone()),
        |_| resumed_passes += 1,
        |done, total| {
            first.get_or_insert((done, total));
        },
    )
    .expect("resume");
    assert_eq!(resumed, full);
    assert_eq!(resumed_passes, n_moe - 1);
    assert_eq!(first, Some((3, adaptive::measure_passes(n_moe))));

    // A partial of other windows, or of another model file, is not resumed.
    let path = carved.with_extension("adaptive.json.partial");
    assert!(states.iter().all(|p| p.model == stamp));
    states[1].save(&path).unwrap();
    assert!(PartialProfile::load_matching(&path, &stamp, &windows).is_some());
    assert!(PartialProfile::load_matching(&path, "0-0", &windows).is_none());
    assert!(PartialProfile::load_matching(&path, &stamp, &windows[..1]).is_none());
    std::fs::write(&path, b"{ cut sho").unwrap();
    assert!(PartialProfile::load_matching(&path, &stamp, &windows).is_none());

    // The engine resumes one left beside the profile (here: every layer done, one with a
    // value no pass gives), and removes it once the profile is saved.
    let dir = carved.parent().unwrap();
    let own = [dir.join("resume.txt")];
    let text: String = (0..40).map(|i| format!("x_{i} = {i} * 3\n")).collect();
    std::fs::write(&own[0], &text).unwrap();
    let mut engine = load(&carved, None, VramBudget::All);
    engine.set_adaptive(20.0, None, &own, |_, _| {}).unwrap();
    let profile_path = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("carved.adaptive-") && name.ends_with(".json")
        })
        .expect("profile of the own text");
    let measured = AdaptiveProfile::load(&profile_path).unwrap();
    let id = measured.calib.clone().unwrap();
    let planted = 0.125;
    let mut profile = AdaptiveProfile {
        calib: None,
        validated: Vec::new(),
        ..measured.clone()
    };
    let layer = engine.model.weights.moe_layers()[0];
    profile.layers[layer].delta_nll = planted;
    let left = PartialProfile {
        model: stamp,
        windows: id,
        profile,
        base_token_nll: Vec::new(),
        shares: Vec::new(),
        measured: engine.model.weights.moe_layers(),
    };
    let partial_path = adaptive::partial_path(&profile_path);
    left.save(&partial_path).unwrap();
    std::fs::remove_file(&profile_path).unwrap();
    let mut engine = load(&carved, None, VramBudget::All);
    let mut first = None;
    engine
        .set_adaptive(20.0, None, &own, |done, _| {
            first.get_or_insert(done);
        })
        .unwrap();
    assert_eq!(first, Some(adaptive::measure_passes(n_moe)));
    let saved = AdaptiveProfile::load(&profile_path).unwrap();
    assert_eq!(saved.layers[layer].delta_nll, planted);
    assert_eq!(saved.calib, measured.calib);
    assert!(!partial_path.exists());
}
