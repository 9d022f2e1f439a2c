//! Sender-constrained tokens (SPEC §4.5): the DPoP proof of an exchange checked, its `jti`
//! taken once across replicas, and the binding it gives the token (`cnf`, `token_type`,
//! policy's `context.binding`). The proof checks themselves are in [`crate::token::dpop`].
//! A request over mTLS with an X509-SVID binds the token to that certificate instead
//! (RFC 8705 §3: `cnf["x5t#S256"]`).

use std::time::Duration;

use serde_json::{Value, json};

use crate::audit::{self, Event};
use crate::broker::Broker;
use crate::error::{BrokerError, ErrorCode};
use crate::token::dpop::{self, Expect, ProofError};

/// How an issued token is bound to its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// A bearer token.
    None,
    /// Bound to the DPoP key with this RFC 7638 thumbprint.
    Dpop { jkt: String },
    /// Bound to the TLS client certificate with this SHA-256 thumbprint (RFC 8705 §3.1).
    Mtls { x5t: String },
}

impl Binding {
    /// `context.binding` for policy.
    pub fn name(&self) -> &'static str {
        match self {
            Binding::None => "none",
            Binding::Dpop { .. } => "dpop",
            Binding::Mtls { .. } => "mtls",
        }
    }

    pub fn jkt(&self) -> Option<&str> {
        match self {
            Binding::Dpop { jkt } => Some(jkt),
            Binding::None | Binding::Mtls { .. } => None,
        }
    }

    /// base64url(SHA-256) of the client certificate the token is bound to.
    pub fn x5t(&self) -> Option<&str> {
        match self {
            Binding::Mtls { x5t } => Some(x5t),
            Binding::None | Binding::Dpop { .. } => None,
        }
    }

    /// The token's `cnf` claim.
    pub fn cnf(&self) -> Option<Value> {
        match self {
            Binding::None => None,
            Binding::Dpop { jkt } => Some(json!({ "jkt": jkt })),
            Binding::Mtls { x5t } => Some(json!({ "x5t#S256": x5t })),
        }
    }

    /// `token_type` of the token response: a certificate-bound token is still a `Bearer`
    /// token on the wire (RFC 8705 §3).
    pub fn token_type(&self) -> &'static str {
        match self {
            Binding::None | Binding::Mtls { .. } => "Bearer",
            Binding::Dpop { .. } => "DPoP",
        }
    }
}

/// How long a proof's `jti` is remembered: as long as its `iat` can be within the window.
const REPLAY_WINDOW: Duration = Duration::from_secs(2 * dpop::MAX_AGE_SECS.unsigned_abs() + 1);

impl Broker {
    /// The metadata's `token_endpoint`, which a proof's `htu` must name.
    pub fn token_endpoint(&self) -> String {
        format!(
            "{}/oauth2/token",
            self.tokens.issuer().trim_end_matches('/')
        )
    }

    /// The nonce a client must put in its next proof, when nonces are required.
    pub fn dpop_nonce(&self) -> Option<String> {
        self.config
            .dpop
            .require_nonce
            .then(|| self.dpop_nonces.current(self.now()))
    }

    /// The binding that the exchange's `DPoP` header asks for: none without a header;
    /// otherwise a proof that passes every check of SPEC §4.5, whose `jti` no replica has
    /// seen within the window.
    pub async fn dpop_binding(
        &self,
        proof: Option<&str>,
        now: i64,
    ) -> Result<Binding, BrokerError> {
        let Some(proof) = proof else {
            return Ok(Binding::None);
        };
        let htu = self.token_endpoint();
        let expect = Expect {
            htm: "POST",
            htu: &htu,
            now,
            access_token: None,
            nonce: self.config.dpop.require_nonce.then_some(&self.dpop_nonces),
        };
        let checked = match dpop::check(proof, &expect) {
            Ok(p) => p,
            Err(e) => return Err(self.proof_refused(proof, Refused::Check(e))),
        };
        let fresh = self
            .store
            .claim(&format!("dpop:{}", checked.replay_key()), REPLAY_WINDOW)
            .await
            .map_err(|e| self.fail(e))?;
        if !fresh {
            return Err(self.proof_refused(proof, Refused::Replay));
        }
        Ok(Binding::Dpop { jkt: checked.jkt })
    }

    /// A proof refused: logged, recorded by its hash, answered `invalid_dpop_proof` (or
    /// `use_dpop_nonce` when only the nonce is missing or old).
    fn proof_refused(&self, proof: &str, e: Refused) -> BrokerError {
        tracing::info!(reason = %e, "DPoP proof refused");
        let entry = audit::Entry {
            decision: Some("deny"),
            reason: format!("dpop proof refused: {e}"),
            detail: Some(json!({"dpop_proof_sha256": crate::domain::sha256_hex(proof.as_bytes())})),
            ..audit::Entry::default()
        };
        if let Err(err) = self.audit.append_unauthenticated(Event::Exchange, entry) {
            return self.fail(err);
        }
        if matches!(e, Refused::Check(ProofError::Nonce)) {
            return BrokerError::new(
                ErrorCode::UseDpopNonce,
                "the DPoP proof must carry the nonce in the DPoP-Nonce header",
            );
        }
        BrokerError::invalid_dpop_proof(format!("the DPoP proof is refused: {e}"))
    }
}

/// Why a proof was refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Check(ProofError),
    #[error("the proof's `jti` was used before")]
    Replay,
}
