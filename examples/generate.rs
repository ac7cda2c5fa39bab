//! Embedding pregate in an app: load a model, stream a continuation.
//! `cargo run --release --example generate -- [MODEL] [PROMPT]`

use std::io::Write;

use pregate::pull::{resolve_model, DEFAULT_MODEL};
use pregate::{Engine, EngineOptions, GenerateParams};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let prompt = args
        .next()
        .unwrap_or_else(|| "def quicksort(xs):".to_string());

    // A path, or a known model name that is pulled into the cache on first use.
    let path = resolve_model(&model, |_| {})?;
    let engine = Engine::load(path, &EngineOptions::default())?;
    let mut session = engine.session()?;

    let ids = engine.tokenizer.encode(&prompt, true)?;
    let params = GenerateParams {
        max_tokens: 64,
        ..Default::default()
    };
    for piece in engine.generate(&mut session, &ids, params)? {
        print!("{}", piece?);
        std::io::stdout().flush()?;
    }
    println!();
    Ok(())
}
