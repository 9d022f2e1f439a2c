//! Inputs kept from fuzzing (`fuzz/regressions/<target>/`) and the seed corpus
//! (`fuzz/seeds/<target>/`), run through the same checks as the fuzz targets, so a fixed
//! finding stays fixed without a fuzzer on the machine.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use std::path::Path;

fn run_dir(target: &str, check: fn(&[u8])) -> usize {
    let mut count = 0;
    for kind in ["regressions", "seeds"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind)
            .join(target);
        if !dir.exists() {
            continue;
        }
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("readable input");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} fails its check", file.display());
            count += 1;
        }
    }
    count
}

#[test]
fn token_form_inputs() {
    assert!(run_dir("token_form", writ::fuzzing::token_form) > 0);
}

#[test]
fn jwt_inputs() {
    assert!(run_dir("jwt", writ::fuzzing::jwt) > 0);
}

#[test]
fn spiffe_id_inputs() {
    assert!(run_dir("spiffe_id", writ::fuzzing::spiffe_id) > 0);
}

#[test]
fn policy_entities_inputs() {
    assert!(run_dir("policy_entities", writ::fuzzing::policy_entities) > 0);
}

/// The reference reading of the SPIFFE ID spec that the spiffe_id check compares against.
#[test]
fn reference_spiffe_id_reading() {
    assert!(writ::fuzzing::spec_valid_spiffe_id(
        "spiffe://example.org/a/b"
    ));
    assert!(writ::fuzzing::spec_valid_spiffe_id("spiffe://example.org"));
    for bad in [
        "spiffe://Example.org/a",
        "spiffe://example.org/",
        "spiffe://example.org//a",
        "spiffe://example.org/./a",
        "spiffe://example.org/a/..",
        "spiffe://example.org:8080/a",
        "spiffe://user@example.org/a",
        "spiffe://example.org/a%20b",
        "spiffe://example.org/a?q",
        "spiffe://example.org/a#f",
        "SPIFFE://example.org/a",
        "spiffe:///a",
    ] {
        assert!(!writ::fuzzing::spec_valid_spiffe_id(bad), "{bad}");
    }
}

/// A well-formed, current JWT-SVID signed by a key the check's trust domain does not hold is
/// refused, as the jwt check requires of every input.
#[test]
fn jwt_check_on_a_real_svid_from_another_key() {
    let key_dir = tempfile::tempdir().unwrap();
    let key_path = key_dir.path().join("k.pem");
    writ::token::keys::generate_file(writ::token::keys::KeyAlg::Es256, &key_path).unwrap();
    let key = writ::token::keys::SigningKey::load(&key_path).unwrap();
    let svid = writ::dev::sign_svid(
        &key,
        "spiffe://example.org/agent",
        "writ",
        std::time::Duration::from_secs(300),
    )
    .unwrap();
    writ::fuzzing::jwt(svid.as_bytes());
}
