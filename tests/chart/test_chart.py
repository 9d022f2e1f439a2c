"""Chart tests: render charts/writ with Helm's engine (helm-python-sdk), validate every
manifest with kubernetes-validate --strict, scan with checkov, check that values.schema.json
rejects bad values, and that the rendered writ.toml and policies pass Writ's own checks.

Run by scripts/test.sh with the project's .venv. Prints `N passed, N failed`."""

import base64
import copy
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import urllib.parse

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "writ"
VENV_BIN = pathlib.Path(sys.executable).parent
WRIT = os.environ.get("WRIT_BIN", str(ROOT / "target" / "debug" / "writ"))

results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append((name, None))
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            results.append((name, e))
            print(f"FAIL {name}: {type(e).__name__}: {e}")
        return fn

    return wrap


def render(chart, values):
    chart.validate_schema(values)
    return chart.render(values, name="writ", namespace="writ", is_install=True)


def manifests(rendered):
    out = []
    for path, text in rendered.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def write_out(rendered, directory):
    paths = []
    for path, text in rendered.items():
        if path.endswith(".yaml") and text.strip():
            p = pathlib.Path(directory) / path.split("/")[-1]
            p.write_text(text)
            paths.append(str(p))
    return paths


def validate_strict(paths):
    out = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", *paths], capture_output=True, text=True
    )
    lines = (out.stdout + out.stderr).splitlines()
    bad = [l for l in lines if l.startswith(("ERROR", "CRITICAL"))]
    warn = [l for l in lines if l.startswith("WARN") and "ServiceMonitor" not in l]
    assert out.returncode == 0 and not bad and not warn, "\n".join(lines)
    assert any("passed" in l for l in lines), "\n".join(lines)


def checkov(directory):
    out = subprocess.run(
        [str(VENV_BIN / "checkov"), "--framework", "kubernetes", "-d", directory, "--quiet", "--compact",
         "--skip-download", "-o", "json"],
        capture_output=True, text=True,
    )
    data = json.loads(out.stdout)
    reports = data if isinstance(data, list) else [data]
    failed = [c for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, [(c["check_id"], c["resource"]) for c in failed]
    skipped = [c for r in reports for c in r.get("results", {}).get("skipped_checks", [])]
    for s in skipped:
        assert s.get("check_result", {}).get("suppress_comment"), f"skip without a reason: {s['check_id']}"


def writ_checks(rendered, env=None):
    cms = {d["metadata"]["name"]: d for d in manifests(rendered) if d["kind"] == "ConfigMap"}
    toml = cms["writ-config"]["data"]["writ.toml"]
    with tempfile.TemporaryDirectory() as d:
        cfg = pathlib.Path(d) / "writ.toml"
        cfg.write_text(toml)
        out = subprocess.run([WRIT, "config", "check", "--syntax-only", "--config", str(cfg)], capture_output=True, text=True,
                             env={**os.environ, **(env or {})})
        assert out.returncode == 0, out.stderr
        pol = pathlib.Path(d) / "policies"
        pol.mkdir()
        for name, text in cms["writ-policies"]["data"].items():
            (pol / name).write_text(text)
        out = subprocess.run([WRIT, "policy", "check", str(pol)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    return toml


def deployment(rendered):
    return next(d for d in manifests(rendered) if d["kind"] == "Deployment" and d["metadata"]["name"] == "writ")


def container_env(rendered):
    return {e["name"]: e for e in deployment(rendered)["spec"]["template"]["spec"]["containers"][0]["env"]}


def kubelet_env(env, secrets):
    """The environment the kubelet gives the container: secretKeyRef values from `secrets`
    ({(name, key): value}; other Secrets are left out) and $(VAR) references to earlier variables expanded."""
    out = {}
    for name, e in env.items():
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) in secrets:
                out[name] = secrets[(ref["name"], ref["key"])]
        else:
            out[name] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
    return out


def notes(rendered):
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


REDIS_PASSWORD = "s3cr3t p@ss/word+%"


with helm.Chart.load(str(CHART)) as chart:
    PROD = yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text())
    # The README's install: its --set values, then -f examples/production/my-values.yaml.
    README_VALUES = yaml.safe_load((ROOT / "examples" / "production" / "my-values.yaml").read_text())
    README_VALUES.setdefault("broker", {})["issuer"] = "https://writ.platform.example.org"
    README_VALUES.setdefault("redis", {})["url"] = "redis://redis.data:6379/0"
    README_VALUES.setdefault("adminTokens", {})["existingSecret"] = "writ-admin-tokens"

    for label, values in [
        ("default values", {}),
        ("production values", PROD),
        ("README install with examples/production/my-values.yaml", README_VALUES),
        ("trial values with the single-node Redis", {"redis": {"url": "", "internal": {"enabled": True}}}),
    ]:

        @check(f"{label}: render, kubernetes-validate --strict, checkov, writ config/policy check")
        def _(values=values):
            rendered = render(chart, values)
            with tempfile.TemporaryDirectory() as d:
                validate_strict(write_out(rendered, d))
                checkov(d)
            writ_checks(rendered)

    @check("default values: two hardened replicas with probes, limits and the PDB")
    def _():
        r = render(chart, {})
        dep = deployment(r)
        spec = dep["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert dep["spec"]["replicas"] == 2
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and spec["securityContext"]["runAsNonRoot"] is True
        assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
        assert spec["automountServiceAccountToken"] is False
        kinds = {d["kind"] for d in manifests(r)}
        assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "NetworkPolicy", "ServiceAccount"} <= kinds
        assert "HorizontalPodAutoscaler" not in kinds and "ServiceMonitor" not in kinds
        toml = writ_checks(r)
        assert 'backend = "redis"' in toml and 'url = "redis://redis:6379/0"' in toml

    @check("production values: cluster store, HPA instead of replicas, ServiceMonitor, CSI, digest, bundles")
    def _():
        r = render(chart, PROD)
        dep = deployment(r)
        assert "replicas" not in dep["spec"]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["image"].startswith("registry.example.org/platform/writ@sha256:")
        toml = writ_checks(r)
        assert 'backend = "redis-cluster"' in toml
        assert 'signing_keys = ["/etc/writ/keys/writ-2.pem", "/etc/writ/keys/writ-1.pem"]' in toml
        assert '[[oidc.issuers]]' in toml and 'bundle_file = "/etc/writ/bundles/platform.example.org.json"' in toml
        kinds = {d["kind"] for d in manifests(r)}
        assert {"HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert vols["spiffe-workload-api"]["csi"]["driver"] == "csi.spiffe.io"
        assert vols["bundles"]["projected"]["sources"][0]["configMap"]["name"] == "spire-bundle-spiffe"
        secrets = [d for d in manifests(r) if d["kind"] == "Secret"]
        assert not secrets, "existing secrets are used, none created"

    bad_values = {
        "replicaCount 0": {"replicaCount": 0},
        "image tag latest": {"image": {"repository": "writ", "tag": "latest", "pullPolicy": "Always"}},
        "a duration that is not one": {"broker": {**copy.deepcopy(chart.values["broker"]), "tokens": {"defaultTtl": "five minutes", "maxTtl": "15m"}}},
        "an unknown top-level key": {"replicas": 3},
        "a store URL that is not redis": {"redis": {"url": "http://redis:6379", "internal": {"enabled": False}}},
        "an admin digest that is not SHA-256": {"adminTokens": {"sha256": ["abc"]}},
        "a policy file not ending in .cedar": {"policies": {"demo.txt": "permit (principal, action, resource);"}},
        "an unknown Workload API mode": {"spiffe": {"workloadApi": {"mode": "socket"}}},
        "a trust domain with two bundle sources": {"spiffe": {"trustDomains": [
            {"name": "example.org", "audience": "writ", "workloadApi": True,
             "bundleConfigMap": {"name": "b", "key": "bundle.spiffe"}}]}},
        "a trust domain without a bundle source": {"spiffe": {"trustDomains": [{"name": "example.org", "audience": "writ"}]}},
        "workloadApi: false as a source": {"spiffe": {"trustDomains": [{"name": "example.org", "audience": "writ", "workloadApi": False}]}},
        "an http bundle endpoint": {"spiffe": {"trustDomains": [
            {"name": "partner.example", "audience": "writ", "bundleEndpoint": {"url": "http://spire.partner.example/bundle"}}]}},
        "a bundle endpoint refresh bound that is no duration": {"spiffe": {"trustDomains": [
            {"name": "partner.example", "audience": "writ",
             "bundleEndpoint": {"url": "https://spire.partner.example/bundle", "refreshHintMin": "soon"}}]}},
        "an agent socket name with a slash": {"spiffe": {"workloadApi": {"mode": "csi", "socketName": "a/b.sock"}}},
        "an http OIDC issuer": {"oidc": {"issuers": [{"issuer": "http://issuer.example", "audience": "writ"}]}},
        "a principal that is no subject": {"broker": {**copy.deepcopy(chart.values["broker"]), "adminPrincipals": ["root"]}},
        "a Redis URL carrying a password": {"redis": {"url": "redis://:hunter2@redis:6379/0", "internal": {"enabled": False}}},
        "a Redis Cluster node URL carrying a password": {"redis": {"url": "", "clusterNodes": ["redis://u:hunter2@r0:6379"], "internal": {"enabled": False}}},
        "both redis.auth.password and redis.existingSecret": {"redis": {"auth": {"password": "x"}, "existingSecret": "writ-redis", "internal": {"enabled": False}}},
        "an empty redis.existingSecretKey": {"redis": {"existingSecret": "writ-redis", "existingSecretKey": "", "internal": {"enabled": False}}},
        "an unknown redis.existingSecretKeyType": {"redis": {"existingSecret": "writ-redis", "existingSecretKeyType": "token", "internal": {"enabled": False}}},
        "an empty networkPolicy.ingressFrom": {"networkPolicy": {"enabled": True, "ingressFrom": []}},
        "an empty networkPolicy.metricsFrom": {"networkPolicy": {"enabled": True, "metricsFrom": []}},
        "a metrics port equal to the broker's": {"metrics": {"port": 8080}},
        "a metrics port out of range": {"metrics": {"port": 70000}},
        "an empty networkPolicy.adminFrom": {"networkPolicy": {"enabled": True, "adminFrom": []}},
        "an admin port equal to the broker's": {"admin": {"port": 8080}},
        "an admin port out of range": {"admin": {"port": 0}},
    }
    for label, values in bad_values.items():

        @check(f"values.schema.json rejects {label}")
        def _(values=values):
            try:
                chart.validate_schema(values)
            except helm.HelmError:
                return
            raise AssertionError("accepted")

    @check("values.schema.json accepts good overrides (the rejections above are not vacuous)")
    def _():
        chart.validate_schema({"replicaCount": 3, "broker": {**copy.deepcopy(chart.values["broker"]), "adminPrincipals": ["spiffe://example.org/security/*"]}})

    SPIRE = {
        "spiffe": {
            "trustDomains": [
                {"name": "platform.example.org", "audience": "writ", "workloadApi": True},
                {"name": "files.example.org", "audience": "writ",
                 "bundleConfigMap": {"name": "files-bundle", "key": "bundle.spiffe"}},
                {"name": "partner.example", "audience": "writ",
                 "bundleEndpoint": {"url": "https://spire.partner.example:8443/bundle",
                                    "caConfigMap": {"name": "partner-ca", "key": "ca.pem"},
                                    "refreshHintMin": "30s", "refreshHintMax": "30m", "maxBundleAge": "12h"}},
                {"name": "web.example", "audience": "writ",
                 "bundleEndpoint": {"url": "https://web.example/bundle"}},
            ],
            "workloadApi": {"mode": "csi", "mountPath": "/spiffe-workload-api"},
        }
    }

    for mode in ("csi", "hostPath"):

        @check(f"SPIRE values ({mode}): Workload API, bundle file and bundle endpoint trust domains; "
               "render, kubernetes-validate --strict, checkov, writ config check")
        def _(mode=mode):
            values = copy.deepcopy(SPIRE)
            values["spiffe"]["workloadApi"]["mode"] = mode
            r = render(chart, values)
            with tempfile.TemporaryDirectory() as d:
                validate_strict(write_out(r, d))
                checkov(d)
            toml = writ_checks(r)
            domains = toml.split("[[spiffe.trust_domains]]")[1:]
            assert len(domains) == 4, toml
            assert 'workload_api = "unix:///spiffe-workload-api/spire-agent.sock"' in domains[0], toml
            assert 'bundle_file = "/etc/writ/bundles/files.example.org.json"' in domains[1], toml
            assert 'bundle_endpoint = "https://spire.partner.example:8443/bundle"' in domains[2], toml
            assert 'bundle_endpoint_ca = "/etc/writ/federation/partner.example.pem"' in domains[2], toml
            assert 'refresh_hint_min = "30s"' in domains[2] and 'refresh_hint_max = "30m"' in domains[2], toml
            assert 'max_bundle_age = "12h"' in domains[2], toml
            assert "bundle_endpoint_ca" not in domains[3] and "refresh_hint" not in domains[3], toml
            for td in domains:
                assert sum(k in td for k in ("bundle_file", "bundle_endpoint =", "workload_api")) == 1, td
            spec = deployment(r)["spec"]["template"]["spec"]
            vols = {v["name"]: v for v in spec["volumes"]}
            if mode == "csi":
                assert vols["spiffe-workload-api"]["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
            else:
                assert vols["spiffe-workload-api"]["hostPath"]["path"] == "/run/spire/agent-sockets"
            mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
            assert mounts["spiffe-workload-api"]["mountPath"] == "/spiffe-workload-api"
            assert all(m["readOnly"] for m in mounts.values() if m["name"] != "tmp")
            assert [s["configMap"]["name"] for s in vols["bundles"]["projected"]["sources"]] == ["files-bundle"]
            ca = vols["federation-ca"]["projected"]["sources"]
            assert ca == [{"configMap": {"name": "partner-ca", "items": [{"key": "ca.pem", "path": "partner.example.pem"}]}}], ca
            text = notes(r)
            assert "kind: ClusterSPIFFEID" in text and "spiffeIDTemplate:" in text, text
            assert "app.kubernetes.io/instance: writ" in text, text
            assert "partner.example: bundle endpoint https://spire.partner.example:8443/bundle" in text, text
            assert "fails closed" in text, text

    @check("Workload API trust domains only: no bundle volumes; without a mount the chart fails naming the value")
    def _():
        values = {"spiffe": {"trustDomains": [{"name": "example.org", "audience": "writ", "workloadApi": True}],
                             "workloadApi": {"mode": "csi"}}}
        r = render(chart, values)
        vols = {v["name"] for v in deployment(r)["spec"]["template"]["spec"]["volumes"]}
        assert "bundles" not in vols and "federation-ca" not in vols and "spiffe-workload-api" in vols, vols
        writ_checks(r)
        values["spiffe"]["workloadApi"]["mode"] = "none"
        try:
            chart.render(values, name="writ", namespace="writ")
        except helm.HelmError as e:
            assert "spiffe.workloadApi.mode" in str(e) and "spiffe.trustDomains[0]" in str(e), str(e)
            return
        raise AssertionError("rendered a Workload API trust domain without the socket")

    @check("no Workload API mount: no ClusterSPIFFEID in the NOTES")
    def _():
        assert "ClusterSPIFFEID" not in notes(render(chart, {}))

    @check("a chart without a Redis or without signing keys fails with the value to set")
    def _():
        for values, needle in [
            ({"redis": {"url": "", "internal": {"enabled": False}}}, "redis.url"),
            ({"signingKeys": {"existingSecret": "", "files": ["writ-1.pem"]}}, "signingKeys.existingSecret"),
            ({"redis": {"url": "", "clusterNodes": ["redis://r0:6379"], "existingSecret": "writ-redis", "internal": {"enabled": False}}},
             "redis.existingSecretKeyType"),
        ]:
            try:
                chart.render(values, name="writ", namespace="writ")
            except helm.HelmError as e:
                assert needle in str(e), str(e)
                continue
            raise AssertionError(f"rendered without {needle}")

    @check("redis.auth.password: in a chart-made Secret only, never in a ConfigMap or the NOTES")
    def _():
        values = {"redis": {"url": "redis://redis.data:6379/0", "auth": {"password": REDIS_PASSWORD}, "internal": {"enabled": False}}}
        r = render(chart, values)
        encoded = urllib.parse.quote(REDIS_PASSWORD, safe="")
        for d in manifests(r):
            if d["kind"] == "ConfigMap":
                text = json.dumps(d)
                assert REDIS_PASSWORD not in text and encoded not in text, d["metadata"]["name"]
        assert REDIS_PASSWORD not in notes(r) and encoded not in notes(r)
        secret = next(d for d in manifests(r) if d["kind"] == "Secret" and d["metadata"]["name"] == "writ-redis-auth")
        assert base64.b64decode(secret["data"]["password"]).decode() == REDIS_PASSWORD
        assert base64.b64decode(secret["data"]["password-urlencoded"]).decode() == encoded
        env = container_env(r)
        assert env["WRIT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "writ-redis-auth", "key": "password-urlencoded"}
        assert all(REDIS_PASSWORD not in e.get("value", "") for e in env.values())
        live = kubelet_env(env, {("writ-redis-auth", "password-urlencoded"): encoded})
        assert live["WRIT_STORE__URL"] == f"redis://:{encoded}@redis.data:6379/0", live
        writ_checks(r, live)
        with tempfile.TemporaryDirectory() as d:
            validate_strict(write_out(r, d))
            checkov(d)

    @check("redis.existingSecret holding the URL: WRIT_STORE__URL from the Secret, no URL in the ConfigMap")
    def _():
        values = {"redis": {"url": "", "existingSecret": "writ-redis", "existingSecretKey": "url", "internal": {"enabled": False}}}
        r = render(chart, values)
        env = container_env(r)
        assert env["WRIT_STORE__URL"]["valueFrom"]["secretKeyRef"] == {"name": "writ-redis", "key": "url"}
        assert "WRIT_REDIS_PASSWORD" not in env
        assert not [d for d in manifests(r) if d["kind"] == "Secret" and d["metadata"]["name"] == "writ-redis-auth"]
        toml = writ_checks(r, {"WRIT_STORE__URL": f"redis://:{REDIS_PASSWORD}@redis.data:6379/0"})
        assert "url =" not in toml.split("[store]")[1].split("\n\n")[0], toml
        assert "writ-redis" in notes(r) and "redis://" not in notes(r)
        with tempfile.TemporaryDirectory() as d:
            validate_strict(write_out(r, d))
            checkov(d)

    @check("redis.existingSecret holding a password: put into every Redis Cluster node URL by the kubelet")
    def _():
        values = copy.deepcopy(PROD)
        values["redis"].update({"existingSecret": "writ-redis", "existingSecretKey": "password", "existingSecretKeyType": "password"})
        r = render(chart, values)
        env = container_env(r)
        assert env["WRIT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "writ-redis", "key": "password"}
        live = kubelet_env(env, {("writ-redis", "password"): "pw%2Fx"})
        assert live["WRIT_STORE__NODES"] == (
            '["redis://:pw%2Fx@redis-cluster-0.redis-cluster:6379", "redis://:pw%2Fx@redis-cluster-1.redis-cluster:6379", '
            '"redis://:pw%2Fx@redis-cluster-2.redis-cluster:6379"]'
        ), live
        writ_checks(r, live)
        assert "pw%2Fx" not in json.dumps(manifests(r))

    @check("an ACL user in redis.url is kept when the password is added")
    def _():
        values = {"redis": {"url": "rediss://writ@redis.data:6380/2", "auth": {"password": "pw"}, "internal": {"enabled": False}}}
        live = kubelet_env(container_env(render(chart, values)), {("writ-redis-auth", "password-urlencoded"): "pw"})
        assert live["WRIT_STORE__URL"] == "rediss://writ:pw@redis.data:6380/2", live

    @check("redis.auth.password with the single-node Redis: the trial Redis requires it")
    def _():
        r = render(chart, {"redis": {"url": "", "auth": {"password": "pw"}, "internal": {"enabled": True}}})
        red = next(d for d in manifests(r) if d["kind"] == "Deployment" and d["metadata"]["name"] == "writ-redis")
        c = red["spec"]["template"]["spec"]["containers"][0]
        assert c["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"], c["args"]
        assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "writ-redis-auth", "key": "password"}
        live = kubelet_env(container_env(r), {("writ-redis-auth", "password-urlencoded"): "pw"})
        assert live["WRIT_STORE__URL"] == "redis://:pw@writ-redis:6379/0", live
        with tempfile.TemporaryDirectory() as d:
            validate_strict(write_out(r, d))
            checkov(d)

    @check("default NetworkPolicy names its sources: broker port from ingressFrom, metrics port from metricsFrom, admin port from adminFrom")
    def _():
        r = render(chart, {})
        np = next(d for d in manifests(r) if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "writ")
        rules = np["spec"]["ingress"]
        assert rules and all(rule.get("from") for rule in rules), rules
        by_port = {rule["ports"][0]["port"]: rule for rule in rules}
        assert set(by_port) == {8080, 9090, 8081}, rules
        assert all(len(rule["ports"]) == 1 for rule in rules), rules
        assert by_port[8080]["from"] == [{"podSelector": {"matchLabels": {"writ-client": "true"}}}]
        assert by_port[9090]["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        assert by_port[8081]["from"] == [{"podSelector": {"matchLabels": {"writ-admin": "true"}}}]

    @check("metrics on their own port: [metrics] listen, a metrics Service the ServiceMonitor scrapes, not the main Service")
    def _():
        r = render(chart, {"metrics": {"port": 9464}, "serviceMonitor": {"enabled": True}})
        toml = writ_checks(r)
        assert '[metrics]\nlisten = "0.0.0.0:9464"' in toml, toml
        c = deployment(r)["spec"]["template"]["spec"]["containers"][0]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9464, "admin": 8081}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["port"] == "http"
        services = {d["metadata"]["name"]: d for d in manifests(r) if d["kind"] == "Service"}
        assert [p["name"] for p in services["writ"]["spec"]["ports"]] == ["http"]
        assert [(p["name"], p["port"], p["targetPort"]) for p in services["writ-metrics"]["spec"]["ports"]] == [("metrics", 9464, "metrics")]
        sm = next(d for d in manifests(r) if d["kind"] == "ServiceMonitor")
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
        sel = sm["spec"]["selector"]["matchLabels"]
        assert sel.items() <= services["writ-metrics"]["metadata"]["labels"].items()
        assert not sel.items() <= services["writ"]["metadata"]["labels"].items(), "the ServiceMonitor also selects the main Service"

    @check("the admin API on its own port: [admin] listen, an admin Service, not the main Service, adminFrom only")
    def _():
        admin_from = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "security"}}}]
        r = render(chart, {"admin": {"port": 8181}, "networkPolicy": {**copy.deepcopy(chart.values["networkPolicy"]), "adminFrom": admin_from}})
        toml = writ_checks(r)
        assert re.search(r'^\[admin\]\nlisten = "0\.0\.0\.0:8181"$', toml, re.M), toml
        c = deployment(r)["spec"]["template"]["spec"]["containers"][0]
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9090, "admin": 8181}
        services = {d["metadata"]["name"]: d for d in manifests(r) if d["kind"] == "Service"}
        assert [p["name"] for p in services["writ"]["spec"]["ports"]] == ["http"]
        admin = services["writ-admin"]["spec"]
        assert admin["type"] == "ClusterIP"
        assert [(p["name"], p["port"], p["targetPort"]) for p in admin["ports"]] == [("admin", 8181, "admin")]
        np = next(d for d in manifests(r) if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "writ")
        by_port = {rule["ports"][0]["port"]: rule for rule in np["spec"]["ingress"]}
        assert by_port[8181]["from"] == admin_from, np
        assert 8081 not in by_port, np

    @check("an admin port equal to the metrics port fails with the value to set")
    def _():
        try:
            chart.render({"admin": {"port": 9090}}, name="writ", namespace="writ")
        except helm.HelmError as e:
            assert "admin.port must differ from metrics.port" in str(e), str(e)
            return
        raise AssertionError("rendered with admin.port equal to metrics.port")

    @check("helm lint --strict passes with the default, production and Redis Secret values")
    def _():
        for values in [{}, PROD, {"redis": {"auth": {"password": REDIS_PASSWORD}, "internal": {"enabled": True}}},
                       {"redis": {"existingSecret": "writ-redis", "internal": {"enabled": False}}}]:
            out = helm.lint(str(CHART), values, strict=True, namespace="writ")
            assert not out["errors"] and all(m["severity"] < 2 for m in out["messages"]), out

    @check("the Dockerfile builds the chart's default image: non-root user 10001, writ entrypoint")
    def _():
        docker = (ROOT / "Dockerfile").read_text()
        assert re.search(r"^USER 10001:10001$", docker, re.M)
        assert 'ENTRYPOINT ["/usr/local/bin/writ"]' in docker
        assert chart.values["image"]["repository"] == "writ"
        assert chart.values["image"]["tag"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
        dep = deployment(render(chart, {}))
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c["securityContext"]["runAsUser"] == 10001 and c["args"][0] == "serve"

failed = [r for r in results if r[1] is not None]
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
