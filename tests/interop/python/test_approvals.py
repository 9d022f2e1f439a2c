"""Approval gates (SPEC §4.7) against a client written with `requests`: the polling loop of an
RFC 8628 client (wait `interval` on authorization_pending, add 5 s on slow_down, stop on any
other error), while an approver approves through the admin API from another thread.
Prints `N passed, N failed`; exits non-zero on any failure."""
import os
import pathlib
import threading
import time

import jwt  # PyJWT
import requests

BROKER = os.environ["BROKER"]
WORK = pathlib.Path(os.environ["WORK"])
KEY = (WORK / "td-key.pem").read_text()
KID = (WORK / "td-kid").read_text()
APPROVER = (WORK / "approver-token").read_text()
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
API = "https://api.interop.test"
AGENT = "spiffe://interop.test/agent/approvals"

results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append(True)
            print(f"ok   python-approvals: {name}")
        except Exception as e:  # noqa: BLE001
            results.append(False)
            print(f"FAIL python-approvals: {name}: {type(e).__name__}: {e}")
        return fn

    return wrap


def svid():
    now = int(time.time())
    claims = {"sub": AGENT, "aud": ["writ"], "iat": now, "exp": now + 300}
    return jwt.encode(claims, KEY, algorithm="ES256", headers={"kid": KID})


def token_request(purpose, approval_id=None):
    form = {"grant_type": GRANT, "subject_token": svid(), "subject_token_type": JWT_TYPE,
            "scope": "deploy:prod", "audience": API, "task_purpose": purpose}
    if approval_id:
        form["approval_id"] = approval_id
    return requests.post(BROKER + "/oauth2/token", data=form, timeout=10)


def poll_until_decided(purpose, first_poll_now=False, max_wait=60):
    """The RFC 8628 §3.5 client loop. Returns (final response, errors seen)."""
    seen = []
    r = token_request(purpose)
    body = r.json()
    assert r.status_code == 400 and body["error"] == "authorization_pending", body
    approval_id, interval = body["approval_id"], body["interval"]
    seen.append(body["error"])
    deadline = time.monotonic() + max_wait
    wait = 0 if first_poll_now else interval
    while time.monotonic() < deadline:
        time.sleep(wait)
        r = token_request(purpose, approval_id)
        if r.status_code == 200:
            return r, seen, approval_id
        body = r.json()
        seen.append(body["error"])
        if body["error"] == "authorization_pending":
            wait = interval
        elif body["error"] == "slow_down":
            interval += 5
            wait = interval
        else:
            return r, seen, approval_id
    raise AssertionError(f"no decision in {max_wait} s: {seen}")


def approver(purpose, verb, body=None):
    """Waits until the request of `purpose` is listed pending, then decides it."""
    def run():
        for _ in range(200):
            r = requests.get(BROKER + "/admin/v1/approvals", params={"state": "pending"},
                             headers={"Authorization": f"Bearer {APPROVER}"}, timeout=10)
            mine = [a for a in r.json()["approvals"] if a["purpose"] == purpose]
            if mine:
                time.sleep(1.5)
                requests.post(f"{BROKER}/admin/v1/approvals/{mine[0]['approval_id']}/{verb}",
                              json=body, headers={"Authorization": f"Bearer {APPROVER}"},
                              timeout=10).raise_for_status()
                return
            time.sleep(0.05)
    t = threading.Thread(target=run)
    t.start()
    return t


@check("a held request is polled until approved, then the token is issued")
def _():
    purpose = "interop approve " + str(time.time())
    t = approver(purpose, "approve")
    r, seen, _ = poll_until_decided(purpose)
    t.join()
    assert r.status_code == 200, r.text
    tok = r.json()
    assert tok["scope"] == "deploy:prod" and tok["token_type"] == "Bearer", tok
    assert r.headers.get("Cache-Control") == "no-store", r.headers
    claims = jwt.decode(tok["access_token"], options={"verify_signature": False})
    assert claims["sub"] == AGENT, claims
    assert "authorization_pending" in seen, seen


@check("polling too fast gets slow_down; the loop backs off by 5 s and still gets the token")
def _():
    purpose = "interop slow " + str(time.time())
    t = approver(purpose, "approve")
    r, seen, _ = poll_until_decided(purpose, first_poll_now=True)
    t.join()
    assert "slow_down" in seen, seen
    assert r.status_code == 200, r.text


@check("a denied request ends the loop with access_denied")
def _():
    purpose = "interop deny " + str(time.time())
    t = approver(purpose, "deny", {"reason": "not today"})
    r, seen, _ = poll_until_decided(purpose)
    t.join()
    assert r.status_code == 400 and r.json()["error"] == "access_denied", r.text


failed = results.count(False)
print(f"{len(results) - failed} passed, {failed} failed")
raise SystemExit(1 if failed else 0)
