"""An agent's side of Writ, with the Python standard library only: exchange a workload
identity (a JWT-SVID) for a task token, mint a second token into the task, end the task, and
handle each OAuth error the broker answers.

    BROKER=http://127.0.0.1:8080 SVID_FILE=.writ-dev/demo.svid python3 examples/agents/agent.py

tests/interop/run.sh runs it against a real broker, with UNAVAILABLE_TOKEN_FILE naming an
ID token of an OIDC issuer that is down, to show the 503 retry.
"""
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


class Refused(Exception):
    """The broker refused (4xx): retrying the same request gets the same answer."""

    def __init__(self, status, error, description):
        super().__init__(f"{status} {error}: {description}")
        self.status, self.error, self.description = status, error, description


def post(broker, path, form=None, bearer=None, attempts=3):
    """POSTs a form; on 503 waits for Retry-After and tries again, at most `attempts` times."""
    for attempt in range(attempts):
        data = urllib.parse.urlencode(form or {}, doseq=True).encode()
        req = urllib.request.Request(broker + path, data=data, method="POST")
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
        if bearer:
            req.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            if e.code == 503 and attempt + 1 < attempts:
                # The broker could not decide (store, decision log or an OIDC issuer down):
                # it issued nothing. Wait as told and try again.
                time.sleep(int(e.headers.get("Retry-After", "1")))
                continue
            raise Refused(e.code, body.get("error"), body.get("error_description")) from None
    raise AssertionError("unreachable")


def exchange(broker, svid, scope, audience, purpose=None, task_id=None):
    """RFC 8693: a task token for `scope` at `audience`; with `task_id`, into that task."""
    form = {"grant_type": GRANT, "subject_token": svid, "subject_token_type": JWT_TYPE,
            "scope": scope, "audience": audience}
    if purpose:
        form["task_purpose"] = purpose
    if task_id:
        form["task_id"] = task_id
    return post(broker, "/oauth2/token", form)


def end_task(broker, token, task_id):
    """Ends the task: every token of it (and of tasks delegated from it) stops working."""
    return post(broker, f"/v1/tasks/{task_id}/end", bearer=token)


def what_to_do(e):
    """What an agent does about each refusal."""
    return {
        "invalid_request": "fix the request or get a fresh identity token (expired, wrong audience, ...)",
        "invalid_scope": "policy does not allow a scope: ask for less, or ask a human",
        "invalid_target": "the audience is not an absolute URI or SPIFFE ID",
        "invalid_grant": "the task is over (ended, expired, budget spent) or this workload is blocked",
        "access_denied": "this token may not do that (e.g. end another task)",
        "temporarily_unavailable": "the broker could not decide; it kept answering 503",
    }.get(e.error, "unexpected refusal")


def main():
    broker = os.environ["BROKER"]
    svid = open(os.environ["SVID_FILE"]).read().strip()
    scope = os.environ.get("SCOPE", "repo:read")
    api = os.environ.get("AUDIENCE", "https://api.example.org")

    first = exchange(broker, svid, scope, api, purpose="triage issue 42")
    task = first["task_id"]
    print(f"task {task}: token for {first['scope']}, {first['expires_in']} s")
    second = exchange(broker, svid, scope, api, task_id=task)
    print(f"second token in {second['task_id']}")
    other = exchange(broker, svid, scope, api)

    for label, call in [
        ("invalid_request", lambda: exchange(broker, "not-a-jwt", scope, api)),
        ("invalid_scope", lambda: exchange(broker, svid, scope + " repo:admin", api)),
        ("invalid_target", lambda: exchange(broker, svid, scope, "not a uri")),
        ("access_denied", lambda: end_task(broker, other["access_token"], task)),
    ]:
        try:
            call()
            raise SystemExit(f"expected {label}, got a token")
        except Refused as e:
            assert e.error == label, e
            print(f"{e.status} {e.error}: {what_to_do(e)}")

    print("ended:", json.dumps(end_task(broker, second["access_token"], task)))
    try:
        exchange(broker, svid, scope, api, task_id=task)
        raise SystemExit("expected invalid_grant after the end")
    except Refused as e:
        assert e.error == "invalid_grant", e
        print(f"after the end: {e.status} {e.error}: {what_to_do(e)}")

    # An identity the broker cannot check now (its OIDC issuer is down): 503, retried.
    if os.environ.get("UNAVAILABLE_TOKEN_FILE"):
        token = open(os.environ["UNAVAILABLE_TOKEN_FILE"]).read().strip()
        started = time.monotonic()
        try:
            exchange(broker, token, scope, api)
            raise SystemExit("expected temporarily_unavailable")
        except Refused as e:
            assert e.status == 503 and e.error == "temporarily_unavailable", e
            waited = time.monotonic() - started
            assert waited >= 2, f"did not wait for Retry-After ({waited:.1f} s)"
            print(f"{e.status} {e.error} after {waited:.0f} s of retries: {what_to_do(e)}")


if __name__ == "__main__":
    main()
