"""Writ against independent Python clients: JWT-SVIDs minted with PyJWT, issued tokens
verified with PyJWT against /oauth2/jwks, introspection, revocation and task end over HTTP.
Prints `N passed, N failed`; exits non-zero on any failure."""
import json
import os
import pathlib
import time
import urllib.error
import urllib.parse
import urllib.request

import jwt  # PyJWT

BROKER = os.environ["BROKER"]
WORK = pathlib.Path(os.environ["WORK"])
KEY = (WORK / "td-key.pem").read_text()
KID = (WORK / "td-kid").read_text()
ADMIN = (WORK / "admin-token").read_text()
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
API = "https://api.interop.test"

results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append(True)
            print(f"ok   python: {name}")
        except Exception as e:  # noqa: BLE001
            results.append(False)
            print(f"FAIL python: {name}: {type(e).__name__}: {e}")
        return fn

    return wrap


def svid(sub, alg="ES256", key=KEY, kid=KID, **extra):
    now = int(time.time())
    claims = {"sub": sub, "aud": ["writ"], "iat": now, "exp": now + 300, **extra}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def call(method, path, form=None, bearer=None):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(BROKER + path, data=data, method=method)
    if form is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    if bearer:
        req.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def exchange(sub, scope="repo:read"):
    return call("POST", "/oauth2/token", {
        "grant_type": GRANT, "subject_token": svid(sub), "subject_token_type": JWT_TYPE,
        "scope": scope, "audience": API,
    })


jwks_client = jwt.PyJWKClient(BROKER + "/oauth2/jwks")


def verify(token):
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt", header
    key = jwks_client.get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["ES256"], audience=API, issuer=BROKER,
                      options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]})


@check("a PyJWT-minted JWT-SVID is exchanged; PyJWT verifies the task token against the JWKS")
def _():
    s, v = exchange("spiffe://interop.test/agent/py")
    assert s == 200, v
    c = verify(v["access_token"])
    assert c["txn"] == v["task_id"] and c["sub"] == "spiffe://interop.test/agent/py"
    assert c["scope"] == "repo:read" and c["exp"] - c["iat"] == v["expires_in"]


@check("a tampered task token fails PyJWT verification")
def _():
    _, v = exchange("spiffe://interop.test/agent/py")
    h, p, sig = v["access_token"].split(".")
    forged = f"{h}.{p}.{sig[:-4]}AAAA"
    try:
        verify(forged)
    except jwt.InvalidSignatureError:
        return
    raise AssertionError("accepted")


@check("an HS256 SVID keyed with the public bundle is refused with invalid_request")
def _():
    # PyJWT refuses to use a public key as an HMAC secret, so the attack is built by hand:
    # HS256 over the token, keyed with the bundle's public key in PEM form.
    import base64
    import hashlib
    import hmac
    from jwcrypto import jwk as jk

    public_pem = jk.JWK.from_pem(KEY.encode()).export_to_pem()
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "kid": KID, "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "spiffe://interop.test/agent/py", "aud": ["writ"], "exp": now + 60}).encode())
    mac = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}.{b64(mac)}"
    s, v = call("POST", "/oauth2/token", {"grant_type": GRANT, "subject_token": token,
                                          "subject_token_type": JWT_TYPE, "scope": "repo:read", "audience": API})
    assert (s, v["error"]) == (400, "invalid_request"), v


@check("introspection by a resource-server SVID: active with the RFC 7662 members")
def _():
    _, v = exchange("spiffe://interop.test/agent/py")
    s, r = call("POST", "/oauth2/introspect", {"token": v["access_token"]},
                bearer=svid("spiffe://interop.test/resource/api"))
    assert s == 200 and r["active"] is True, r
    for k in ["scope", "client_id", "sub", "aud", "iss", "exp", "iat", "jti", "txn", "token_type"]:
        assert k in r, k


@check("RFC 7009 revocation makes the token inactive")
def _():
    _, v = exchange("spiffe://interop.test/agent/py")
    s, _ = call("POST", "/oauth2/revoke", {"token": v["access_token"]})
    assert s == 200
    s, r = call("POST", "/oauth2/introspect", {"token": v["access_token"]}, bearer=ADMIN)
    assert r == {"active": False}, r


@check("ending the task revokes its tokens; task state reads ended")
def _():
    _, v = exchange("spiffe://interop.test/agent/py")
    t = v["access_token"]
    s, r = call("POST", f"/v1/tasks/{v['task_id']}/end", bearer=t)
    assert s == 200 and r["state"] == "ended", r
    s, r = call("POST", "/oauth2/introspect", {"token": t}, bearer=ADMIN)
    assert r == {"active": False}, r
    s, r = call("GET", f"/v1/tasks/{v['task_id']}", bearer=ADMIN)
    assert s == 200 and r["state"] == "ended", r


failed = results.count(False)
print(f"{len(results) - failed} passed, {failed} failed")
raise SystemExit(1 if failed else 0)
