//! Where the broker may be sent by an OIDC discovery document.
//!
//! An operator's configuration is trusted: a configured issuer or `jwks_uri` may name any
//! host (https, or http on loopback). A discovery document is not: it is fetched from the
//! issuer, and a `jwks_uri` in it that names the broker's own loopback interface, a private
//! network or a link-local address (cloud metadata at 169.254.169.254) would turn the broker
//! into a way to reach them. Such a `jwks_uri` is refused, except that an issuer that is itself
//! on loopback (local issuers, tests) may keep its keys on loopback, over http too.
//!
//! IP literals are checked here. Host names are checked after resolution by [`PublicOnly`],
//! the resolver of the client that fetches discovered key sets, so what is checked is what
//! the connection uses (no second lookup an attacker could answer differently).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What kind of network an address is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddrClass {
    Public,
    /// 127/8, ::1, the unspecified addresses (which reach the local host), `localhost`.
    Loopback,
    /// 169.254/16, fe80::/10.
    LinkLocal,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7.
    Private,
}

impl AddrClass {
    fn describe(self) -> &'static str {
        match self {
            AddrClass::Public => "a public address",
            AddrClass::Loopback => "a loopback address",
            AddrClass::LinkLocal => "a link-local address",
            AddrClass::Private => "a private address",
        }
    }
}

pub(crate) fn classify_ip(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    if ip.is_loopback() || ip.is_unspecified() {
        AddrClass::Loopback
    } else if ip.is_link_local() {
        AddrClass::LinkLocal
    } else if ip.is_private() {
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let first = ip.segments().first().copied().unwrap_or(0);
    if ip.is_loopback() || ip.is_unspecified() {
        AddrClass::Loopback
    } else if first & 0xffc0 == 0xfe80 {
        AddrClass::LinkLocal
    } else if first & 0xfe00 == 0xfc00 {
        AddrClass::Private
    } else {
        AddrClass::Public
    }
}

/// The class of a URL's host when it can be known without DNS: IP literals and `localhost`
/// (RFC 6761 §6.3: `localhost` and names under it are loopback). `None` for other names.
fn classify_host(url: &url::Url) -> Option<AddrClass> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(classify_v4(ip)),
        url::Host::Ipv6(ip) => Some(classify_ip(IpAddr::V6(ip))),
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            (d == "localhost" || d.ends_with(".localhost")).then_some(AddrClass::Loopback)
        }
    }
}

/// True when `issuer` (a configured issuer URL) is on a loopback host.
pub(crate) fn issuer_is_loopback(issuer: &str) -> bool {
    url::Url::parse(issuer)
        .ok()
        .and_then(|u| classify_host(&u))
        .is_some_and(|c| c == AddrClass::Loopback)
}

/// Whether a resolved or literal address of class `class` may be fetched for an issuer.
fn permitted(class: AddrClass, issuer_loopback: bool) -> bool {
    match class {
        AddrClass::Public => true,
        AddrClass::Loopback => issuer_loopback,
        AddrClass::LinkLocal | AddrClass::Private => false,
    }
}

/// The rule for a `jwks_uri` read from `issuer`'s discovery document: https to a host that
/// is not (literally) loopback, private or link-local; http and loopback only when the
/// configured issuer is itself on loopback.
pub(crate) fn check_discovered_jwks_uri(jwks_uri: &str, issuer: &str) -> Result<(), String> {
    let url = url::Url::parse(jwks_uri).map_err(|_| format!("`{jwks_uri}` is not a URL"))?;
    if url.host().is_none() {
        return Err(format!("`{jwks_uri}` has no host"));
    }
    let issuer_loopback = issuer_is_loopback(issuer);
    let class = classify_host(&url);
    if let Some(class) = class
        && !permitted(class, issuer_loopback)
    {
        return Err(format!(
            "discovery names `{jwks_uri}`, {}; configure `jwks_uri` for the issuer to use it",
            class.describe()
        ));
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" if issuer_loopback && class == Some(AddrClass::Loopback) => Ok(()),
        _ => Err(format!(
            "discovery names `{jwks_uri}`, which must use https"
        )),
    }
}

/// A resolver that only hands out addresses the rule permits, for the client that fetches
/// discovered key sets. A name that resolves only to refused addresses fails to connect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublicOnly {
    /// The issuer is on loopback: its keys may be too.
    pub allow_loopback: bool,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = filter_resolved(found, allow_loopback);
            if kept.is_empty() {
                return Err(format!(
                    "`{host}` resolves to no public address (loopback, private and link-local \
                     addresses are refused for a discovered jwks_uri)"
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

fn filter_resolved(found: Vec<SocketAddr>, allow_loopback: bool) -> Vec<SocketAddr> {
    found
        .into_iter()
        .filter(|a| permitted(classify_ip(a.ip()), allow_loopback))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_classified() {
        let c = |s: &str| classify_ip(s.parse().unwrap());
        for (ip, class) in [
            ("127.0.0.1", AddrClass::Loopback),
            ("127.8.9.10", AddrClass::Loopback),
            ("0.0.0.0", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("169.254.169.254", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("febf::1", AddrClass::LinkLocal),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("192.168.0.1", AddrClass::Private),
            ("fc00::1", AddrClass::Private),
            ("fdff::1", AddrClass::Private),
            ("::ffff:192.168.0.1", AddrClass::Private),
            ("172.32.0.1", AddrClass::Public),
            ("8.8.8.8", AddrClass::Public),
            ("2001:db8::1", AddrClass::Public),
            ("fec0::1", AddrClass::Public),
        ] {
            assert_eq!(c(ip), class, "{ip}");
        }
    }

    #[test]
    fn discovered_jwks_uris_follow_the_issuer() {
        let public = "https://issuer.example";
        let local = "http://127.0.0.1:8081";
        let ok = [
            ("https://keys.example/jwks", public),
            ("https://8.8.8.8/jwks", public),
            ("https://keys.example/jwks", local),
            ("http://127.0.0.1:9000/jwks", local),
            ("http://localhost:9000/jwks", local),
            ("http://[::1]:9000/jwks", local),
            ("https://127.0.0.1/jwks", "https://localhost"),
        ];
        for (uri, issuer) in ok {
            assert_eq!(
                check_discovered_jwks_uri(uri, issuer),
                Ok(()),
                "{uri} for {issuer}"
            );
        }
        let refused = [
            // Loopback, from an issuer that is not on loopback.
            ("http://127.0.0.1:9000/jwks", public),
            ("https://127.0.0.1/jwks", public),
            ("https://localhost/jwks", public),
            ("https://a.localhost./jwks", public),
            ("https://0.0.0.0/jwks", public),
            ("https://[::1]/jwks", public),
            ("https://[::ffff:127.0.0.1]/jwks", public),
            // Private and link-local, from any issuer.
            ("https://10.0.0.1/jwks", public),
            ("https://10.0.0.1/jwks", local),
            ("https://169.254.169.254/jwks", local),
            ("https://[fe80::1]/jwks", public),
            ("https://[fd12::1]/jwks", local),
            // Plain http anywhere but loopback-from-loopback.
            ("http://keys.example/jwks", public),
            ("http://keys.example/jwks", local),
            ("ftp://keys.example/jwks", public),
            ("not a url", public),
        ];
        for (uri, issuer) in refused {
            assert!(
                check_discovered_jwks_uri(uri, issuer).is_err(),
                "{uri} for {issuer}"
            );
        }
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let addrs: Vec<SocketAddr> = ["127.0.0.1:0", "10.0.0.1:0", "[fe80::1]:0", "8.8.8.8:0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let ips = |v: Vec<SocketAddr>| v.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>();
        assert_eq!(ips(filter_resolved(addrs.clone(), false)), ["8.8.8.8"]);
        assert_eq!(ips(filter_resolved(addrs, true)), ["127.0.0.1", "8.8.8.8"]);
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_for_a_public_issuer() {
        use reqwest::dns::Resolve;
        // `localhost` resolves from the hosts file: no network is used.
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let e = PublicOnly {
            allow_loopback: false,
        }
        .resolve(name)
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("no public address"), "{e}");
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let found: Vec<SocketAddr> = PublicOnly {
            allow_loopback: true,
        }
        .resolve(name)
        .await
        .unwrap()
        .collect();
        assert!(found.iter().all(|a| a.ip().is_loopback()) && !found.is_empty());
    }
}
