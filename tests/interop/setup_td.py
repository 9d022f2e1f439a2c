"""Creates a SPIFFE trust domain for the interop run with jwcrypto (independent of Writ):
an EC P-256 JWT-SVID key, its SPIFFE bundle, an admin token and the broker config."""
import hashlib
import json
import os
import pathlib
import secrets
import sys

from jwcrypto import jwk

out = pathlib.Path(sys.argv[1])
port = sys.argv[2]
root = pathlib.Path(sys.argv[3])
op_port = sys.argv[4]
# An issuer that is never started: tokens that name it meet an unreachable issuer (503).
down_port = sys.argv[5]

key = jwk.JWK.generate(kty="EC", crv="P-256")
kid = key.thumbprint()
(out / "td-key.pem").write_bytes(key.export_to_pem(private_key=True, password=None))
public = json.loads(key.export_public())
public.update({"kid": kid, "use": "jwt-svid", "alg": "ES256"})
(out / "bundle.json").write_text(json.dumps({"keys": [public], "spiffe_sequence": 1}))
admin = "interop-admin-" + secrets.token_urlsafe(24)
(out / "admin-token").write_text(admin)
approver = "interop-approver-" + secrets.token_urlsafe(24)
(out / "approver-token").write_text(approver)
(out / "td-kid").write_text(kid)
(out / "policies").mkdir(exist_ok=True)
(out / "policies" / "interop.cedar").write_text(
    """@id("agents-read")
@max_ttl("5m")
permit (
  principal in Writ::TrustDomain::"interop.test",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"repo:read"
) when { principal.path like "/agent/*" };

@id("sub-agents-delegate-read")
permit (
  principal in Writ::TrustDomain::"interop.test",
  action == Writ::Action::"delegate",
  resource == Writ::Scope::"repo:read"
) when { principal.path like "/agent/sub/*" && context.on_behalf_of == "spiffe://interop.test/agent/node" };
@id("agents-deploy-prod")
@approval("required")
permit (
  principal in Writ::TrustDomain::"interop.test",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"deploy:prod"
) when { principal.path like "/agent/*" };

@id("op-agent-deploy")
permit (
  principal in Writ::Issuer::"http://127.0.0.1:{op_port}",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"deploy"
) when {{ principal.sub == "agent" }};
""".replace("{op_port}", op_port).replace("{{", "{").replace("}}", "}")
)
(out / "writ.toml").write_text(
    f"""[server]
listen = "127.0.0.1:{port}"
issuer = "http://127.0.0.1:{port}"
[tokens]
signing_keys = ["{out / 'signing.pem'}"]
[[spiffe.trust_domains]]
name = "interop.test"
bundle_file = "{out / 'bundle.json'}"
audience = "writ"
[[oidc.issuers]]
issuer = "http://127.0.0.1:{op_port}"
audience = "writ"
[[oidc.issuers]]
issuer = "http://127.0.0.1:{down_port}"
audience = "writ"
[policy]
dir = "{out / 'policies'}"
[audit]
path = "{out / 'decisions.jsonl'}"
[admin]
token_sha256 = ["{hashlib.sha256(admin.encode()).hexdigest()}"]
[introspection]
principals = ["spiffe://interop.test/resource/*"]
[approvals]
token_sha256 = ["{hashlib.sha256(approver.encode()).hexdigest()}"]
interval = "1s"
ttl = "2m"
[status]
# Short, so that the resource-server suite (node/verify.mjs) sees a revocation quickly.
ttl = "2s"
"""
)
