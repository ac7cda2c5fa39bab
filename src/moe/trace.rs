//! Expert-access traces: for every token and MoE layer, the experts the router chose.
//! `pregate simulate` replays them through cache policies. File layout (little endian):
//! magic "PGTR", version u32 (1 or 2), n_layers u32, experts_per_layer u32, k u32,
//! n_tokens u32, then n_tokens × n_layers × k expert indices (u16). Version 2 adds a u32
//! flag after n_tokens and, when it is 1, the pre-gating router's plan after the choices:
//! as many predicted indices, in the same layout.

use std::path::Path;

use crate::error::{Error, Result};
use crate::moe::policy::ExpertId;

const MAGIC: &[u8; 4] = b"PGTR";
const VERSION: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertTrace {
    pub n_layers: u32,
    pub experts_per_layer: u32,
    /// Experts chosen per token and layer.
    pub k: u32,
    /// `[token][layer][k]`, flattened.
    pub choices: Vec<u16>,
    /// The pre-gating router's prediction of `choices` (same layout), when recorded.
    pub plan: Option<Vec<u16>>,
}

impl ExpertTrace {
    pub fn n_tokens(&self) -> usize {
        let per = (self.n_layers * self.k) as usize;
        self.choices.len().checked_div(per).unwrap_or(0)
    }

    pub fn total_experts(&self) -> usize {
        (self.n_layers * self.experts_per_layer) as usize
    }

    /// The access sequence in execution order (token by token, layer by layer), as global ids.
    pub fn sequence(&self) -> Vec<ExpertId> {
        self.global_ids(&self.choices)
    }

    /// The router's plan as global ids, aligned with [`ExpertTrace::sequence`].
    pub fn plan_sequence(&self) -> Option<Vec<ExpertId>> {
        self.plan.as_ref().map(|p| self.global_ids(p))
    }

    fn global_ids(&self, choices: &[u16]) -> Vec<ExpertId> {
        let k = self.k as usize;
        let per_token = self.n_layers as usize * k;
        choices
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let layer = (i % per_token) / k;
                layer as u32 * self.experts_per_layer + *e as u32
            })
            .collect()
    }

    /// Writes atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::with_capacity(24 + 2 * self.choices.len());
        bytes.extend(MAGIC);
        for v in [
            VERSION,
            self.n_layers,
            self.experts_per_layer,
            self.k,
            self.n_tokens() as u32,
            self.plan.is_some() as u32,
        ] {
            bytes.extend(v.to_le_bytes());
        }
        for c in self.choices.iter().chain(self.plan.iter().flatten()) {
            bytes.extend(c.to_le_bytes());
        }
        crate::format::write_atomic(path, &bytes)
    }

    pub fn read(path: &Path) -> Result<ExpertTrace> {
        let bytes = crate::format::read_all(path)?;
        let bad = |why: String| Error::BadFile {
            what: format!("trace {}", path.display()),
            why,
        };
        if bytes.len() < 24 || &bytes[..4] != MAGIC {
            return Err(bad("not a pregate trace (bad magic or too short)".into()));
        }
        let word = |i: usize| {
            u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ])
        };
        let version = word(1);
        if !(1..=VERSION).contains(&version) {
            return Err(bad(format!("version {version} (expected 1..={VERSION})")));
        }
        let (n_layers, experts_per_layer, k, n_tokens) = (word(2), word(3), word(4), word(5));
        let (header, has_plan) = match version {
            1 => (24, false),
            _ if bytes.len() < 28 => return Err(bad("too short for its header".into())),
            _ => (28, word(6) == 1),
        };
        let n = n_tokens as u64 * n_layers as u64 * k as u64;
        let want = header as u64 + 2 * n * (1 + has_plan as u64);
        if bytes.len() as u64 != want {
            return Err(bad(format!(
                "{} bytes, expected {want} for {n_tokens} tokens",
                bytes.len()
            )));
        }
        let mut all: Vec<u16> = bytes[header..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if let Some(e) = all.iter().find(|e| **e as u32 >= experts_per_layer) {
            return Err(bad(format!(
                "expert {e} out of range (experts per layer: {experts_per_layer})"
            )));
        }
        let plan = has_plan.then(|| all.split_off(n as usize));
        Ok(ExpertTrace {
            n_layers,
            experts_per_layer,
            k,
            choices: all,
            plan,
        })
    }
}

/// Records which experts every token of `text` uses in every layer, running the MoE model
/// in windows of the session's context (each window from an empty cache).
pub fn record(
    engine: &crate::Engine,
    text: &str,
    max_tokens: Option<usize>,
    progress: impl FnMut(usize, usize),
) -> Result<ExpertTrace> {
    let mut tokens = engine.tokenizer.encode(text, false)?;
    if let Some(n) = max_tokens {
        tokens.truncate(n);
    }
    record_tokens(engine, &tokens, progress)
}

/// As [`record`], for tokens already encoded.
pub fn record_tokens(
    engine: &crate::Engine,
    tokens: &[u32],
    mut progress: impl FnMut(usize, usize),
) -> Result<ExpertTrace> {
    let c = &engine.model.config;
    let Some(moe) = &c.moe else {
        return Err(Error::InvalidArgument(
            "expert traces need a mixture-of-experts model (see `pregate carve`)".into(),
        ));
    };
    if tokens.is_empty() {
        return Err(Error::InvalidArgument("the text has no tokens".into()));
    }
    let mut session = engine.session()?;
    let window = session.ctx();
    let mut choices = Vec::with_capacity(tokens.len() * c.n_layer * moe.n_slots);
    for (i, w) in tokens.chunks(window).enumerate() {
        session.reset();
        choices.extend(session.route_trace(w)?.into_iter().map(|e| e as u16));
        progress(((i + 1) * window).min(tokens.len()), tokens.len());
    }
    Ok(ExpertTrace {
        n_layers: c.n_layer as u32,
        experts_per_layer: moe.n_expert as u32,
        k: moe.n_slots as u32,
        choices,
        plan: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> ExpertTrace {
        // 3 tokens, 2 layers, top-2 of 4 experts.
        ExpertTrace {
            n_layers: 2,
            experts_per_layer: 4,
            k: 2,
            choices: vec![0, 1, 2, 3, 1, 2, 0, 3, 3, 2, 1, 0],
            plan: Some(vec![0, 2, 2, 3, 1, 0, 0, 3, 3, 1, 1, 0]),
        }
    }

    #[test]
    fn a_trace_reads_back_as_written() {
        let path = std::env::temp_dir().join(format!("pregate-trace-{}", std::process::id()));
        let t = trace();
        t.write(&path).expect("write");
        assert_eq!(ExpertTrace::read(&path).expect("read"), t);
        assert_eq!(t.sequence()[..4], [0, 1, 6, 7]);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn a_damaged_trace_is_an_error_naming_the_file() {
        let path = std::env::temp_dir().join(format!("pregate-bad-trace-{}", std::process::id()));
        trace().write(&path).expect("write");
        let good = std::fs::read(&path).expect("read");
        let mut out_of_range = good.clone();
        out_of_range[28] = 9; // the first choice: expert 9 of 4
        let cases: [(&[u8], &str); 4] = [
            (b"not a trace at all, just text", "not a pregate trace"),
            (&good[..good.len() - 2], "bytes, expected"),
            (&good[..20], "not a pregate trace"),
            (&out_of_range, "out of range"),
        ];
        for (bytes, why) in cases {
            std::fs::write(&path, bytes).expect("write");
            let err = ExpertTrace::read(&path)
                .expect_err("damaged trace")
                .to_string();
            assert!(
                err.contains(why) && err.contains("pregate-bad-trace"),
                "{err}"
            );
        }
        std::fs::remove_file(&path).ok();
    }
}
