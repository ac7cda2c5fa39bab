//! A tiny model written by the test runs end to end on the GPU and matches a plain CPU
//! forward pass; bad input through the CLI gives a clear error and exit code 1.

mod common;

use std::process::Command;

use common::{max_abs_diff, reference_logits, write_tiny_model, TinySpec};
use pregate::format::{GgufFile, GgufWriter};
use pregate::gpu::KernelLayout;
use pregate::model::Session;
use pregate::quant::DType;
use pregate::{Engine, EngineOptions, GenerateParams};

fn engine_for(spec: TinySpec, seed: u64, tag: &str) -> (Engine, common::TinyWeights) {
    engine_with(spec, seed, tag, KernelLayout::Auto)
}

fn engine_with(
    spec: TinySpec,
    seed: u64,
    tag: &str,
    layout: KernelLayout,
) -> (Engine, common::TinyWeights) {
    let path = common::tmp_dir(tag).join("tiny.gguf");
    let tw = write_tiny_model(&path, spec, seed);
    let mut opts = EngineOptions {
        ctx: 64,
        ..Default::default()
    };
    opts.gpu.layout = layout;
    (Engine::load(&path, &opts).expect("load tiny model"), tw)
}

/// Both kernel layouts, whatever the adapter: the GPU one folds norms and the SwiGLU into
/// its decode mat-vecs, and prefills with workgroup tiles.
fn check_against_reference(spec: TinySpec, tag: &str) {
    for (layout, name) in [(KernelLayout::Cpu, "cpu"), (KernelLayout::Gpu, "gpu")] {
        check_layout_against_reference(spec, &format!("{tag}-{name}"), layout);
    }
}

fn check_layout_against_reference(spec: TinySpec, tag: &str, layout: KernelLayout) {
    let (engine, tw) = engine_with(spec, 11, tag, layout);
    let tokens: Vec<u32> = vec![5, 100, 257, 3, 3, 42, 200, 77, 1, 256, 9, 13, 60];
    let want = reference_logits(&tw, &tokens);
    let tol = |v: &[f32]| 2e-3 * v.iter().fold(1f32, |m, x| m.max(x.abs()));

    // Decode: one token per step.
    let mut s = engine.session().expect("session");
    for (i, t) in tokens.iter().enumerate() {
        let got = s.next_logits(&[*t]).expect("step");
        assert!(
            max_abs_diff(&got, &want[i]) < tol(&want[i]),
            "{tag}: decode step {i}: {} vs tol {}",
            max_abs_diff(&got, &want[i]),
            tol(&want[i])
        );
    }
    // Prefill: a batch of 10, then 3 decode steps on top of its cache.
    let mut s = engine.session().expect("session");
    let got = s.next_logits(&tokens[..10]).expect("prefill");
    assert!(
        max_abs_diff(&got, &want[9]) < tol(&want[9]),
        "{tag}: prefill"
    );
    for i in 10..tokens.len() {
        let got = s.next_logits(&tokens[i..i + 1]).expect("step");
        assert!(
            max_abs_diff(&got, &want[i]) < tol(&want[i]),
            "{tag}: decode after prefill {i}"
        );
    }
    // Greedy on the GPU (argmax kernel) agrees with the reference's argmax.
    let mut s = engine.session().expect("session");
    let id = s.next_argmax(&tokens).expect("argmax");
    let last = want.last().expect("logits");
    let best = last
        .iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > last[b] { i } else { b });
    assert_eq!(id as usize, best, "{tag}: argmax");
    // Scoring: nll of each next token equals the reference log-softmax.
    let mut s = Session::new(engine.model.clone(), 64).expect("session");
    let targets: Vec<u32> = tokens[1..].iter().copied().chain([0]).collect();
    let nll = s.nll(&tokens, &targets, 0).expect("nll");
    for i in 0..tokens.len() - 1 {
        let row = &want[i];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
        let w = lse - row[targets[i] as usize];
        assert!(
            (nll[i] - w).abs() < 1e-2,
            "{tag}: nll {i}: {} vs {w}",
            nll[i]
        );
    }
}

#[test]
fn qwen2_q8_model_matches_cpu_reference() {
    check_against_reference(TinySpec::default(), "qwen2-q8");
}

#[test]
fn llama_k_quant_model_matches_cpu_reference() {
    let spec = TinySpec {
        arch: "llama",
        dtype: DType::Q4K,
        n_head: 8,
        n_kv_head: 8,
        ..Default::default()
    };
    check_against_reference(spec, "llama-q4k");
}

/// A native qwen2moe model (llama.cpp's tensor names): softmax router, probability-weighted
/// top-2 of 6 experts, and a sigmoid-gated shared expert, decode and prefill.
#[test]
fn native_qwen2moe_matches_reference() {
    let spec = TinySpec {
        arch: "qwen2moe",
        moe: Some(common::NativeMoe {
            n_expert: 6,
            n_used: 2,
            expert_ff: 64,
            shared_ff: 128,
        }),
        ..Default::default()
    };
    check_against_reference(spec, "qwen2moe");
}

/// A native qwen3moe model: per-head q/k RMSNorm, no biases, softmax router with the
/// top-k probabilities renormalised, no shared expert; decode and prefill.
#[test]
fn native_qwen3moe_matches_reference() {
    let spec = TinySpec {
        arch: "qwen3moe",
        moe: Some(common::NativeMoe {
            n_expert: 8,
            n_used: 3,
            expert_ff: 64,
            shared_ff: 0,
        }),
        ..Default::default()
    };
    check_against_reference(spec, "qwen3moe");
}

#[test]
fn streaming_generation_is_deterministic_and_stops() {
    let (engine, _) = engine_for(TinySpec::default(), 3, "gen");
    let prompt = engine
        .tokenizer
        .encode("hello world", true)
        .expect("encode");
    assert_eq!(prompt.len(), 11, "byte-level tokens");
    let run = || {
        let mut s = engine.session().expect("session");
        let params = GenerateParams {
            max_tokens: 12,
            ..Default::default()
        };
        let mut g = engine.generate(&mut s, &prompt, params).expect("generate");
        let text: String = g.by_ref().map(|p| p.expect("piece")).collect();
        (text, g.stats.generated_tokens)
    };
    let (a, n) = run();
    assert!(n > 0 && n <= 12);
    assert_eq!(a, run().0);
    // A prompt that fills the context is refused with a clear error.
    let mut s = engine.session().expect("session");
    let long = vec![1u32; 100];
    let err = engine
        .generate(&mut s, &long, GenerateParams::default())
        .err()
        .expect("too long");
    assert!(err.to_string().contains("context"), "{err}");
}

/// A tiny model in a fresh folder for CLI tests: the folder, and the model's path.
fn cli_model(tag: &str) -> (std::path::PathBuf, String) {
    let dir = common::tmp_dir(tag);
    let model = dir.join("tiny.gguf");
    write_tiny_model(&model, TinySpec::default(), 5);
    let m = model.to_string_lossy().to_string();
    (dir, m)
}

fn pregate(args: &[&str]) -> (i32, String) {
    pregate_with_stdin(args, b"")
}

/// Runs the binary with `stdin` as its input; exit code and stderr, never a panic.
fn pregate_with_stdin(args: &[&str], stdin: &[u8]) -> (i32, String) {
    let (code, _, stderr) = pregate_output(args, stdin);
    (code, stderr)
}

/// Runs the binary with `stdin` as its input; exit code, stdout and stderr, never a panic.
fn pregate_output(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = pregate_command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pregate");
    let written = child.stdin.take().expect("stdin").write_all(stdin);
    // A binary that exits before reading its input closes the pipe; its exit code and
    // stderr, checked below, say why.
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    let out = child.wait_with_output().expect("pregate's output");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("panicked"),
        "pregate {args:?} panicked:\n{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// The binary with `args`, run as on CI and servers: no desktop session, and not the
/// quiet that .cargo/config.toml gives in-process tests. Mesa's device-select layer then
/// prints Wayland errors unless pregate quiets it; the tests that forbid "error" check that.
fn pregate_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pregate"));
    cmd.args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT");
    cmd
}

fn expect_error(args: &[&str], needle: &str) {
    let (code, stderr) = pregate(args);
    assert_eq!(code, 1, "pregate {args:?} should exit 1; stderr:\n{stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "pregate {args:?}: expected '{needle}' in:\n{stderr}"
    );
}

/// Rewrites a GGUF without one tensor, or with another architecture name.
fn rewrite(src: &std::path::Path, dst: &std::path::Path, drop: Option<&str>, arch: Option<&str>) {
    let f = GgufFile::open(src).expect("open");
    let mut w = GgufWriter::new();
    for (k, v) in &f.metadata {
        w.meta(k, v.clone());
    }
    if let Some(a) = arch {
        w.meta(
            "general.architecture",
            pregate::format::MetaValue::String(a.into()),
        );
    }
    for t in &f.tensors {
        if Some(t.name.as_str()) != drop {
            w.tensor(&t.name, t.dtype, &t.dims, f.bytes(t).to_vec())
                .expect("tensor");
        }
    }
    w.write(dst).expect("write");
}

/// Generation that runs out of context stops with a note saying so, not in silence; chat
/// drops its oldest turns to make room, and says what to do when one message is too long.
#[test]
fn generate_and_chat_say_when_the_context_is_full() {
    let (dir, m) = cli_model("cli-ctx-full");
    let (code, stderr) = pregate(&["generate", "-m", &m, "-p", "hi", "--ctx", "8", "-n", "64"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("the context of 8 tokens is full (raise --ctx)"),
        "expected the context-full note in:\n{stderr}"
    );
    // In chat, a message that cannot fit is refused and the hint names --ctx.
    let (code, stderr) =
        pregate_with_stdin(&["chat", "-m", &m, "--ctx", "8"], b"hello there\n/quit\n");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("but the context holds 8") && stderr.contains("a larger --ctx"),
        "expected the overflow error and the --ctx hint in:\n{stderr}"
    );
    // A long conversation drops its oldest turns instead, and every message is answered.
    let turns = "hello there\n".repeat(8) + "/quit\n";
    let (code, stderr) = pregate_with_stdin(
        &[
            "chat", "-m", &m, "--ctx", "256", "-n", "8", "--system", "be brief",
        ],
        turns.as_bytes(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("oldest messages to fit the context of 256 tokens")
            && !stderr.contains("error"),
        "expected old turns dropped and no error in:\n{stderr}"
    );
    // /help lists the commands; a mistyped command says so; neither goes to the model
    // (whose 8-token context would refuse them).
    let (code, stderr) =
        pregate_with_stdin(&["chat", "-m", &m, "--ctx", "8"], b"/help\n/exti\n/quit\n");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("/reset   forget")
            && stderr.contains("unknown command /exti")
            && !stderr.contains("context holds")
            && !stderr.contains("error"),
        "expected the command list and the unknown command in:\n{stderr}"
    );
    // A fenced block is one turn, however many lines it has: one overflow, not three.
    let (code, stderr) = pregate_with_stdin(
        &["chat", "-m", &m, "--ctx", "8"],
        b"\"\"\"\nhello there\n  second line\nthird line\n\"\"\"\n/quit\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stderr.matches("but the context holds 8").count(),
        1,
        "expected one overflow for the one block in:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pregate generate ... | head` closes the pipe early on purpose: generation stops
/// quietly with success, not with "error: Broken pipe".
#[test]
fn generate_into_a_closed_pipe_stops_quietly() {
    use std::process::Stdio;
    let (_dir, m) = cli_model("cli-broken-pipe");
    let mut child = pregate_command(&["generate", "-m", &m, "-p", "hello", "-n", "64"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pregate");
    // The reader goes before the model has even loaded: every write meets a closed pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("pregate's output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

/// `generate --file` (a path, or `-` for standard input) generates exactly what the same
/// text given as `--prompt` does; a missing file is a clear error.
#[test]
fn generate_reads_its_prompt_from_a_file_or_stdin() {
    let (dir, m) = cli_model("cli-prompt-file");
    let text = "a prompt\nover two lines ";
    let prompt_file = dir.join("prompt.txt");
    std::fs::write(&prompt_file, text).expect("write prompt");
    let greedy = ["-n", "8", "--temperature", "0"];
    let run = |input: &[&str], stdin: &[u8]| {
        let mut args = vec!["generate", "-m", &m];
        args.extend(input);
        args.extend(greedy);
        let (code, stdout, stderr) = pregate_output(&args, stdin);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        stdout
    };
    let want = run(&["-p", text], b"");
    assert!(!want.trim().is_empty(), "no text generated");
    let f = prompt_file.to_string_lossy().to_string();
    assert_eq!(run(&["-f", &f], b""), want, "--file PATH");
    assert_eq!(run(&["-f", "-"], text.as_bytes()), want, "--file -");
    let missing = dir.join("missing.txt").to_string_lossy().to_string();
    expect_error(
        &["generate", "-m", &m, "-f", &missing],
        "reading the prompt from",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Cache options on a model whose experts are all resident (here: a dense one) do
/// nothing, and the user is told rather than left to think they acted.
#[test]
fn cache_options_without_a_cache_are_named_as_unused() {
    let (dir, m) = cli_model("cli-unused-cache");
    let args = ["generate", "-m", &m, "-p", "hi", "-n", "1"];
    let (code, stderr) = pregate(&[&args[..], &["--policy", "lru", "--verify"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("--policy, --verify not used"),
        "expected the unused options named in:\n{stderr}"
    );
    let (code, stderr) = pregate(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("not used"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gives_clear_errors_and_exit_code_1() {
    let dir = common::tmp_dir("cli-errors");
    let good = dir.join("good.gguf");
    write_tiny_model(&good, TinySpec::default(), 5);
    let bytes = std::fs::read(&good).expect("read");
    let g = |name: &str| dir.join(name).to_string_lossy().to_string();

    std::fs::write(g("trunc.gguf"), &bytes[..bytes.len() / 2]).expect("write");
    expect_error(
        &["generate", "-m", &g("trunc.gguf"), "-p", "hi"],
        "truncated",
    );

    let mut magic = bytes.clone();
    magic[..4].copy_from_slice(b"GGML");
    std::fs::write(g("magic.gguf"), &magic).expect("write");
    expect_error(
        &["generate", "-m", &g("magic.gguf"), "-p", "hi"],
        "bad magic",
    );

    // The first tensor's info sits after its name; corrupt its type, then its offset.
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("name")
        + name.len()
        + 4
        + 16;
    let mut dtype = bytes.clone();
    dtype[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(g("dtype.gguf"), &dtype).expect("write");
    expect_error(
        &["generate", "-m", &g("dtype.gguf"), "-p", "hi"],
        "unknown ggml type id 99",
    );
    let mut off = bytes.clone();
    off[at + 4..at + 12].copy_from_slice(&(1u64 << 36).to_le_bytes());
    std::fs::write(g("offset.gguf"), &off).expect("write");
    expect_error(
        &["generate", "-m", &g("offset.gguf"), "-p", "hi"],
        "token_embd.weight",
    );

    rewrite(&good, &dir.join("arch.gguf"), None, Some("gemma3"));
    expect_error(
        &["generate", "-m", &g("arch.gguf"), "-p", "hi"],
        "unsupported architecture 'gemma3'",
    );

    rewrite(
        &good,
        &dir.join("missing.gguf"),
        Some("blk.1.ffn_up.weight"),
        None,
    );
    expect_error(
        &["generate", "-m", &g("missing.gguf"), "-p", "hi"],
        "no tensor 'blk.1.ffn_up.weight'",
    );

    let long = "word ".repeat(40);
    expect_error(
        &[
            "generate",
            "-m",
            &g("good.gguf"),
            "--ctx",
            "16",
            "-p",
            &long,
        ],
        "context",
    );

    expect_error(
        &["generate", "-m", &g("nope.gguf"), "-p", "hi"],
        "nope.gguf",
    );

    // pregate's own files: a damaged expert trace, a bench text too short to feed.
    std::fs::write(g("bad.trace"), b"PGTR but not a trace").expect("write");
    expect_error(&["simulate", &g("bad.trace")], "cannot read trace");
    std::fs::write(g("short.txt"), "hi").expect("write");
    expect_error(
        &[
            "bench",
            "-m",
            &g("good.gguf"),
            "--text",
            &g("short.txt"),
            "--prompt-tokens",
            "8",
        ],
        "--text has",
    );
    // Counts whose sum overflows are refused, not a panic.
    let max = u64::MAX.to_string();
    let good = g("good.gguf");
    let huge = [
        "bench",
        "-m",
        &good,
        "--prompt-tokens",
        &max,
        "--gen-tokens",
        "64",
    ];
    expect_error(&huge, "--prompt-tokens");
    let (m, t) = (g("good.gguf"), g("short.txt"));
    expect_error(&["eval", "-m", &m, "-f", &t, "--chunks", "0"], "--chunks 0");
    // Outputs are checked before any work: a file the user has, a folder that is not there.
    std::fs::write(g("mine.trace"), b"mine").expect("write");
    let trace = ["trace", "-m", &m, "-f", &t, "-o"];
    expect_error(&[&trace[..], &[&g("mine.trace")]].concat(), "--force");
    assert_eq!(std::fs::read(g("mine.trace")).expect("read"), b"mine");
    let nowhere = g("no-such-folder/t.trace");
    expect_error(&[&trace[..], &[&nowhere]].concat(), "does not exist");

    // The good model still runs through the CLI, printing only the continuation on stdout.
    common::run_cli(&["generate", "-m", &g("good.gguf"), "-p", "hi", "-n", "4"]);
}

#[test]
fn vram_budget_fits_the_context_or_names_the_bytes_needed() {
    let path = common::tmp_dir("budget").join("tiny.gguf");
    write_tiny_model(&path, TinySpec::default(), 4);
    let load = |budget: Option<u64>, ctx: usize| {
        let mut opts = EngineOptions {
            ctx,
            ..Default::default()
        };
        opts.gpu.vram_budget = budget;
        Engine::load(&path, &opts)
    };
    let full = load(None, 0).expect("load");
    let need = full.memory.total();
    assert_eq!(full.ctx(), 256, "the tiny model's trained context");
    drop(full);

    // A budget below the weights is refused, naming the bytes.
    let err = load(Some(need / 4), 0).err().expect("too small");
    assert!(
        matches!(err, pregate::Error::BudgetTooSmall { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("bytes needed"), "{err}");

    // A budget that fits: the run never charges more than it.
    let e = load(Some(need), 0).expect("fits");
    let mut s = e.session().expect("session");
    let ids = e.tokenizer.encode("hello", true).expect("encode");
    let params = GenerateParams {
        max_tokens: 4,
        ..Default::default()
    };
    let _: Vec<_> = e
        .generate(&mut s, &ids, params)
        .expect("generate")
        .collect();
    assert!(
        e.gpu().arena.peak() <= need,
        "peak {} > budget {need}",
        e.gpu().arena.peak()
    );

    // An explicit --ctx that does not fit is an error, not a silent shrink.
    let err = load(Some(need - 1024), 256)
        .err()
        .expect("ctx does not fit");
    assert!(err.to_string().contains("VRAM budget"), "{err}");
}

/// Attention binds a layer's whole K cache; a context past the adapter's largest binding
/// is refused with the most that fits, not a wgpu validation error mid-step.
#[test]
fn a_context_past_the_binding_limit_names_the_most_that_fits() {
    let path = common::tmp_dir("kv-binding").join("tiny.gguf");
    write_tiny_model(&path, TinySpec::default(), 4);
    let probe = Engine::load(&path, &EngineOptions::default()).expect("load");
    let c = &probe.model.config;
    let per_token = (c.n_kv_head * c.head_dim * 4) as u64;
    let most = (probe.gpu().max_binding() / per_token) as usize;
    drop(probe);
    let load = |ctx: usize| {
        let opts = EngineOptions {
            ctx,
            ..Default::default()
        };
        Engine::load(&path, &opts).and_then(|e| e.session().map(|_| ()))
    };
    let err = load(most + 1).expect_err("one token past the binding limit");
    assert!(
        err.to_string()
            .contains(&format!("at most {most} tokens fit")),
        "{err}"
    );
    load(most.min(4096)).expect("a context within the limit opens a session");
}
