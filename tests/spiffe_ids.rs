//! SPIFFE ID acceptance tables, after the SPIFFE ID specification (§2): scheme, trust domain
//! and path rules, every character class, dot segments, percent-encoding, case and lengths.

#![allow(
    clippy::restriction,
    clippy::pedantic,
    reason = "tests and benchmarks fail loudly"
)]

use writ::domain::parse_spiffe_id;

const TD_CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789.-_";
const PATH_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_";

#[test]
fn every_ascii_character_in_the_trust_domain() {
    for b in 0u8..=127 {
        let c = b as char;
        let id = format!("spiffe://a{c}b/path");
        let ok = TD_CHARS.contains(c);
        // `/` ends the trust domain: `a` with path `/b/path` is valid.
        if c == '/' {
            assert!(parse_spiffe_id(&id).is_some(), "{id:?}");
            continue;
        }
        assert_eq!(
            parse_spiffe_id(&id).is_some(),
            ok,
            "trust domain with {c:?} ({b})"
        );
    }
}

#[test]
fn every_ascii_character_in_a_path_segment() {
    for b in 0u8..=127 {
        let c = b as char;
        if c == '/' {
            continue;
        }
        let id = format!("spiffe://example.org/a{c}b");
        let ok = PATH_CHARS.contains(c);
        assert_eq!(parse_spiffe_id(&id).is_some(), ok, "path with {c:?} ({b})");
    }
}

#[test]
fn non_ascii_is_refused_everywhere() {
    for id in [
        "spiffe://exämple.org/a",
        "spiffe://example.org/ä",
        "spiffe://example.org/a\u{200b}",
    ] {
        assert!(parse_spiffe_id(id).is_none(), "{id}");
    }
}

#[test]
fn structure_table() {
    let accept = [
        "spiffe://example.org",
        "spiffe://example.org/a",
        "spiffe://example.org/a/b/c",
        "spiffe://example.org/A/B",
        "spiffe://1.2.3.4/a",
        "spiffe://x/.../a",
        "spiffe://x/a..b/.hidden",
        "spiffe://x/-_./a",
    ];
    for id in accept {
        assert!(parse_spiffe_id(id).is_some(), "should accept {id}");
    }
    let reject = [
        ("", "empty"),
        ("spiffe://", "no trust domain"),
        ("spiffe:///a", "empty trust domain"),
        ("spiffe:/example.org/a", "one slash"),
        ("spiffe:example.org/a", "no slashes"),
        ("SPIFFE://example.org/a", "scheme case"),
        ("Spiffe://example.org/a", "scheme case"),
        ("https://example.org/a", "other scheme"),
        ("example.org/a", "no scheme"),
        ("spiffe://Example.org/a", "uppercase trust domain"),
        ("spiffe://example.org/", "trailing slash"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/a//b", "empty segment"),
        ("spiffe://example.org/a/", "trailing slash"),
        ("spiffe://example.org/.", "dot segment"),
        ("spiffe://example.org/..", "dot-dot segment"),
        ("spiffe://example.org/a/./b", "dot segment"),
        ("spiffe://example.org/a/../b", "dot-dot segment"),
        ("spiffe://example.org/a%2Fb", "percent-encoding"),
        ("spiffe://example.org/%61", "percent-encoding"),
        (
            "spiffe://exa%6dple.org/a",
            "percent-encoding in trust domain",
        ),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org/a#frag", "fragment"),
        ("spiffe://example.org:8443/a", "port"),
        ("spiffe://user@example.org/a", "user info"),
        ("spiffe://user:pw@example.org/a", "user info"),
        ("spiffe://[::1]/a", "IPv6 literal"),
        (" spiffe://example.org/a", "leading space"),
        ("spiffe://example.org/a ", "trailing space"),
    ];
    for (id, why) in reject {
        assert!(
            parse_spiffe_id(id).is_none(),
            "should reject {id:?} ({why})"
        );
    }
}

#[test]
fn lengths() {
    // A trust domain may be 255 bytes, not 256.
    let td255 = "a".repeat(255);
    let td256 = "a".repeat(256);
    assert!(parse_spiffe_id(&format!("spiffe://{td255}/x")).is_some());
    assert!(parse_spiffe_id(&format!("spiffe://{td256}/x")).is_none());
    // The whole ID may be 2048 bytes, not 2049.
    let prefix = "spiffe://example.org/";
    let fill = |n: usize| {
        let mut p = String::new();
        while p.len() < n {
            p.push_str("abcdefghi/");
        }
        p.truncate(n);
        p.trim_end_matches('/').to_string() + &"z".repeat(n - p.trim_end_matches('/').len())
    };
    let id2048 = format!("{prefix}{}", fill(2048 - prefix.len()));
    assert_eq!(id2048.len(), 2048);
    assert!(parse_spiffe_id(&id2048).is_some(), "2048 bytes");
    let id2049 = format!("{id2048}z");
    assert!(parse_spiffe_id(&id2049).is_none(), "2049 bytes");
}
