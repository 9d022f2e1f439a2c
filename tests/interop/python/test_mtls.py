"""mTLS with X509-SVIDs against a real `writ serve` with [server.tls], with clients written
elsewhere: Python `requests`, the standard `ssl`/`http.client` modules, and curl.

The PKI is minted here with `cryptography` (independent of Writ): a server CA and a
certificate for 127.0.0.1, a trust domain CA (the bundle's `x509-svid` authority), a
well-formed X509-SVID, and defective ones. Checks:
- an exchange over mTLS without subject_token (requests): the token's cnf["x5t#S256"] is
  base64url(SHA-256(leaf DER)) as computed here; introspection shows it;
- client_credentials with tls_client_auth (curl --cert/--key) and with a JWT-SVID
  client_assertion (http.client over TLS, no client certificate);
- defective certificates (expired, another trust domain's CA, two URI SANs, a CA leaf) are
  refused: 401 invalid_client for client credentials, 400 invalid_request for an exchange;
- no client authentication is 401 invalid_client.
"""
import base64
import datetime
import hashlib
import http.client
import json
import os
import pathlib
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse

import jwt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = pathlib.Path(__file__).resolve().parents[3]
WRIT = os.environ.get("WRIT_BIN", str(ROOT / "target/debug/writ"))
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AGENT = "spiffe://mtls.test/agent/py"
API = "https://api.interop.test"
NOW = datetime.datetime.now(datetime.timezone.utc)

failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else f": {detail}"))
    if not cond:
        failures.append(name)


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(name, uri=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    )
    if uri:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    return key, b.sign(key, hashes.SHA256())


def make_leaf(ca_key, ca_cert, sans, *, ca=False, eku=ExtendedKeyUsageOID.CLIENT_AUTH,
              not_after=None):
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(hours=2))
        .not_valid_after(not_after or NOW + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            # digital_signature only (keyCertSign with cA for the CA-leaf case)
            x509.KeyUsage(True, False, False, False, False, ca, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    return key, b.sign(ca_key, hashes.SHA256())


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_pair(work, name, key, cert, chain=()):
    (work / f"{name}.pem").write_bytes(pem(cert) + b"".join(pem(c) for c in chain))
    (work / f"{name}.key").write_bytes(key_pem(key))
    return str(work / f"{name}.pem"), str(work / f"{name}.key")


def x5t(cert):
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def claims_of(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def main():
    work = pathlib.Path(tempfile.mkdtemp())
    port = free_port()
    base = f"https://127.0.0.1:{port}"

    server_ca_key, server_ca = make_ca("interop server CA")
    skey, scert = make_leaf(
        server_ca_key, server_ca, [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))],
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    server_pem, server_key = write_pair(work, "server", skey, scert)
    (work / "server-ca.pem").write_bytes(pem(server_ca))
    ca_file = str(work / "server-ca.pem")

    td_key, td_ca = make_ca("mtls.test CA", "spiffe://mtls.test")
    other_key, other_ca = make_ca("other CA", "spiffe://other.test")
    jwt_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(jwt_key.public_key()))
    jwk.update({"kid": "jwt-1", "use": "jwt-svid", "alg": "ES256"})
    x509_key = {
        "kty": "EC",
        "use": "x509-svid",
        "x5c": [base64.b64encode(td_ca.public_bytes(serialization.Encoding.DER)).decode()],
    }
    (work / "bundle.json").write_text(json.dumps({"keys": [jwk, x509_key]}))
    (work / "other.json").write_text(json.dumps({"keys": [{
        "kty": "EC", "use": "x509-svid",
        "x5c": [base64.b64encode(other_ca.public_bytes(serialization.Encoding.DER)).decode()],
    }]}))
    admin = "mtls-admin-" + secrets.token_urlsafe(16)
    (work / "policies").mkdir()
    (work / "policies" / "p.cedar").write_text("""@id("agents-read")
permit (
  principal in Writ::TrustDomain::"mtls.test",
  action == Writ::Action::"exchange",
  resource == Writ::Scope::"repo:read"
) when { principal.path like "/agent/*" };
""")
    subprocess.run([WRIT, "keys", "generate", "--alg", "ES256", "--out", str(work / "signing.pem")],
                   check=True, stdout=subprocess.DEVNULL)
    (work / "writ.toml").write_text(f"""[server]
listen = "127.0.0.1:{port}"
issuer = "{base}"
[server.tls]
cert = "{server_pem}"
key = "{server_key}"
client_auth = "optional"
[tokens]
signing_keys = ["{work / 'signing.pem'}"]
[[spiffe.trust_domains]]
name = "mtls.test"
bundle_file = "{work / 'bundle.json'}"
audience = "writ"
[[spiffe.trust_domains]]
name = "other.test"
bundle_file = "{work / 'other.json'}"
audience = "writ"
[policy]
dir = "{work / 'policies'}"
[audit]
path = "{work / 'decisions.jsonl'}"
[admin]
token_sha256 = ["{hashlib.sha256(admin.encode()).hexdigest()}"]
""")
    proc = subprocess.Popen([WRIT, "serve", "--config", str(work / "writ.toml")],
                            stderr=open(work / "serve.log", "w"))
    try:
        for _ in range(200):
            try:
                requests.get(f"{base}/readyz", verify=ca_file, timeout=1).raise_for_status()
                break
            except Exception:
                time.sleep(0.05)
        else:
            print((work / "serve.log").read_text())
            raise SystemExit("the TLS broker did not become ready")
        run(base, work, ca_file, admin, td_key, td_ca, other_key, other_ca, jwt_key)
        subprocess.run([WRIT, "audit", "verify", str(work / "decisions.jsonl")], check=True,
                       stdout=subprocess.DEVNULL)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    if failures:
        print(f"{len(failures)} failed: {failures}")
        sys.exit(1)
    print("mtls interop: all passed")


def run(base, work, ca_file, admin, td_key, td_ca, other_key, other_ca, jwt_key):
    key, cert = make_leaf(td_key, td_ca, [x509.UniformResourceIdentifier(AGENT)])
    agent = write_pair(work, "agent", key, cert)

    # 1. requests: an exchange whose subject is the certificate.
    r = requests.post(f"{base}/oauth2/token", cert=agent, verify=ca_file, data={
        "grant_type": GRANT, "scope": "repo:read", "audience": API})
    check("requests: exchange over mTLS without subject_token", r.status_code == 200, r.text)
    token = r.json().get("access_token", "")
    claims = claims_of(token) if token else {}
    check("requests: cnf x5t#S256 is SHA-256 of the leaf DER",
          claims.get("cnf") == {"x5t#S256": x5t(cert)}, claims)
    check("requests: sub is the certificate's SPIFFE ID", claims.get("sub") == AGENT, claims)
    r = requests.post(f"{base}/oauth2/introspect", verify=ca_file, data={"token": token},
                      headers={"Authorization": f"Bearer {admin}"})
    check("requests: introspection shows cnf",
          r.status_code == 200 and r.json().get("cnf", {}).get("x5t#S256") == x5t(cert), r.text)

    # 2. curl: client credentials by tls_client_auth.
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", f"{base}/oauth2/token", "--cert", agent[0],
         "--key", agent[1], "--cacert", ca_file, "-d", "grant_type=client_credentials",
         "--data-urlencode", f"client_id={AGENT}", "-d", "scope=repo:read",
         "--data-urlencode", f"audience={API}"],
        capture_output=True, text=True, check=True).stdout
    body, code = out.rsplit("\n", 1)
    check("curl: client_credentials with tls_client_auth", code == "200", out)
    if code == "200":
        check("curl: the token is bound to the certificate",
              claims_of(json.loads(body)["access_token"]).get("cnf") == {"x5t#S256": x5t(cert)})
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", f"{base}/oauth2/token", "--cacert", ca_file,
         "-d", "grant_type=client_credentials", "-d", "scope=repo:read"],
        capture_output=True, text=True, check=True).stdout
    body, code = out.rsplit("\n", 1)
    check("curl: no client authentication is 401 invalid_client",
          code == "401" and json.loads(body).get("error") == "invalid_client", out)

    # 3. ssl + http.client: a JWT-SVID client assertion over TLS without a certificate.
    now = int(time.time())
    assertion = jwt.encode({"sub": AGENT, "aud": [f"{base}/oauth2/token"], "iat": now,
                            "exp": now + 120}, jwt_key, algorithm="ES256",
                           headers={"kid": "jwt-1"})
    ctx = ssl.create_default_context(cafile=ca_file)
    host, port = base.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    form = urllib.parse.urlencode({
        "grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion, "client_id": AGENT, "scope": "repo:read", "audience": API})
    conn.request("POST", "/oauth2/token", form, {"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    text = resp.read().decode()
    check("ssl: client_credentials with a JWT-SVID assertion", resp.status == 200, text)
    if resp.status == 200:
        check("ssl: an assertion over TLS without a certificate gives a bearer token",
              "cnf" not in claims_of(json.loads(text)["access_token"]))

    # 4. ssl with a client certificate: defective X509-SVIDs.
    cases = [
        ("expired", make_leaf(td_key, td_ca, [x509.UniformResourceIdentifier(AGENT)],
                              not_after=NOW - datetime.timedelta(minutes=30))),
        ("another trust domain's CA", make_leaf(other_key, other_ca,
                                                [x509.UniformResourceIdentifier(AGENT)])),
        ("two URI SANs", make_leaf(td_key, td_ca, [
            x509.UniformResourceIdentifier(AGENT),
            x509.UniformResourceIdentifier("spiffe://mtls.test/agent/two")])),
        ("a CA as leaf", make_leaf(td_key, td_ca, [x509.UniformResourceIdentifier(AGENT)],
                                   ca=True)),
    ]
    for name, (k, c) in cases:
        pair = write_pair(work, "bad", k, c)
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.load_cert_chain(*pair)
        for grant, want in (("client_credentials", (401, "invalid_client")),
                            (GRANT, (400, "invalid_request"))):
            conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
            conn.request("POST", "/oauth2/token",
                         urllib.parse.urlencode({"grant_type": grant, "scope": "repo:read",
                                                 "audience": API}),
                         {"Content-Type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            text = resp.read().decode()
            got = (resp.status, json.loads(text).get("error") if text.startswith("{") else text)
            check(f"ssl: {name} ({grant.rsplit(':', 1)[-1]}) is {want}", got == want, got)


if __name__ == "__main__":
    main()
