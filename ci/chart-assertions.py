"""Assertions on a rendered Armada chart that a schema validator cannot make:
custom resources (skipped by kubernetes-validate), the arguments the pods
start with (every flag must be one the binary knows), and what each values
file in deploy/helm/ci asks for.

Usage: chart-assertions.py NAME VALUES RENDERED
"""
import pathlib
import re
import sys

import yaml

name, values_path, rendered_path = sys.argv[1:4]
root = pathlib.Path(__file__).resolve().parent.parent
values = yaml.safe_load(open(values_path)) or {}
docs = [d for d in yaml.safe_load_all(open(rendered_path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)


def fail(msg):
    print(f"chart-assertions [{name}]: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


# The flags the binary knows: every option has an ARMADA_* environment name.
known = set()
for src in ["server/src/config.rs", "server/src/main.rs"]:
    text = (root / src).read_text()
    for env in re.findall(r'env = "ARMADA_([A-Z0-9_]+)"', text):
        known.add("--" + env.lower().replace("_", "-"))

(sts,) = by_kind["StatefulSet"]
pod = sts["spec"]["template"]["spec"]
(c,) = pod["containers"]
args = c["args"]
mode = values.get("mode", "leader")
check(args[0] == mode, f"the first argument is the mode: {args[0]}")
for a in args[1:]:
    flag = a.split("=", 1)[0]
    check(flag in known, f"{flag} is not an option of armada (known: {len(known)})")


def arg(flag):
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


replicas = values.get("replicas", 3)
check(sts["spec"]["replicas"] == replicas, "replicas")
founding = values.get("initialMembers", 0) or replicas
members = arg("--initial-members").split(",")
check(len(members) == founding, f"{founding} founding members expected: {members}")
for i, m in enumerate(members):
    want = f"{i + 1}=armada-{i}.armada-headless.prod.svc:5012"
    check(m == want, f"member {m} should be {want}")
check("--node-id-from-hostname" in args, "node ids come from the pod names")
check(arg("--initial-cluster-state") == "auto", "pods beyond the founding ones join")
check(arg("--join") == "armada.prod.svc:8443", "a joining pod asks through the client service")
check(arg("--advertise-raft-address") == "$(POD_NAME).armada-headless.prod.svc:5012", "advertised Raft address")
envs = {e["name"]: e for e in c["env"]}
check(envs["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "POD_NAME from the downward API")
check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness is /readyz")
check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness is /healthz")
check(pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532, "non-root")
check(c["securityContext"]["readOnlyRootFilesystem"] is True, "read-only root")
drain_ms = int(arg("--drain-timeout-ms"))
check(pod["terminationGracePeriodSeconds"] * 1000 > drain_ms, "the grace period outlasts the drain")
check(sts["spec"]["podManagementPolicy"] == "Parallel", "founding pods start together")

services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
headless = services["armada-headless"]
check(headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"], "headless service")
check(sts["spec"]["serviceName"] == "armada-headless", "pods named through the headless service")
client_ports = {p["name"] for p in services["armada"]["spec"]["ports"]}
check(("replication" in client_ports) == (mode == "leader"), "replication is served by leader clusters")
pod_labels = sts["spec"]["template"]["metadata"]["labels"]
for s in services.values():
    check(all(pod_labels.get(k) == v for k, v in s["spec"]["selector"].items()), f"service {s['metadata']['name']} selects the pods")

persistence = values.get("persistence", {}).get("enabled", True)
check(bool(sts["spec"].get("volumeClaimTemplates")) == persistence, "a volume claim per pod when persistent")
volumes = {v["name"]: v for v in pod.get("volumes") or []}
if not persistence:
    check("emptyDir" in volumes["data"], "data in an emptyDir")
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
check(mounts["data"] == "/var/lib/armada" and arg("--data-dir").startswith("/var/lib/armada/"), "data dir on the volume")

pdb = by_kind.get("PodDisruptionBudget", [])
check(bool(pdb) == values.get("podDisruptionBudget", {}).get("enabled", True), "PodDisruptionBudget")
if pdb:
    check(pdb[0]["spec"]["maxUnavailable"] == 1, "one pod down at a time")

tls_mode = values.get("tls", {}).get("mode", "none")
if tls_mode == "none":
    check(not any(a.startswith("--api-tls") for a in args), "no TLS arguments")
else:
    for listener in ["api", "etcd", "replication"]:
        check(arg(f"--{listener}-tls-cert") == "/etc/armada/tls/tls.crt", f"{listener} TLS certificate")
    check(arg("--raft-tls-ca") == "/etc/armada/tls/ca.crt", "Raft verifies peers with the CA")
    check(mounts["tls"] == "/etc/armada/tls", "TLS files mounted")
    if values["tls"].get("clientAuth"):
        check(arg("--api-tls-client-ca") == "/etc/armada/tls/ca.crt", "mutual TLS")
    secret = volumes["tls"]["secret"]["secretName"]
    if tls_mode == "secret":
        check(secret == values["tls"]["secretName"], "the given TLS secret")
    else:
        (cert,) = by_kind["Certificate"]
        check(cert["apiVersion"] == "cert-manager.io/v1", "cert-manager's API")
        check(cert["spec"]["secretName"] == secret, "the pods mount the Certificate's secret")
        check("*.armada-headless.prod.svc" in cert["spec"]["dnsNames"], "valid for every pod name")
        check("armada.prod.svc" in cert["spec"]["dnsNames"], "valid for the client service")
        check(set(cert["spec"]["usages"]) == {"server auth", "client auth"}, "server and client use (Raft is mutual)")
        issuer = values["tls"]["certManager"]["issuerRef"]
        check(cert["spec"]["issuerRef"]["name"] == issuer["name"] and cert["spec"]["issuerRef"]["kind"] == issuer["kind"], "issuer")
check(("Certificate" in by_kind) == (tls_mode == "cert-manager"), "a Certificate only with cert-manager")

for api, t in (values.get("tokens") or {}).items():
    if isinstance(t, dict) and t.get("secretName"):
        path = arg(f"--{api}-token-file")
        check(path == f"/etc/armada/tokens/{api}/{t['key']}", f"{api} token file: {path}")
        check(volumes[f"token-{api}"]["secret"]["secretName"] == t["secretName"], f"{api} token secret")

if mode == "follower":
    leader = values["leader"]
    check(arg("--leader-address") == leader["address"], "leader address")
    if leader.get("token", {}).get("secretName"):
        check(arg("--leader-token-file") == f"/etc/armada/leader-token/{leader['token']['key']}", "leader token")
        check(volumes["leader-token"]["secret"]["secretName"] == leader["token"]["secretName"], "leader token secret")
    if leader.get("tls", {}).get("enabled"):
        check(arg("--leader-tls-ca") == "/etc/armada/leader-tls/ca.crt", "leader CA")

anti = values.get("antiAffinity", "soft")
aff = pod.get("affinity", {}).get("podAntiAffinity", {})
if anti == "hard":
    check("requiredDuringSchedulingIgnoredDuringExecution" in aff, "hard anti-affinity")
elif anti == "soft":
    check("preferredDuringSchedulingIgnoredDuringExecution" in aff, "soft anti-affinity")
else:
    check(not aff, "no anti-affinity")

for extra in values.get("extraArgs", []):
    check(extra in args, f"extra argument {extra}")

metrics = values.get("metrics", {})
sm = by_kind.get("ServiceMonitor", [])
check(bool(sm) == metrics.get("serviceMonitor", {}).get("enabled", False), "ServiceMonitor")
if sm:
    check(sm[0]["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor API")
    (ep,) = sm[0]["spec"]["endpoints"]
    check(ep["port"] == "http" and ep["path"] == "/metrics", "scrapes /metrics on the http port")
    sel = sm[0]["spec"]["selector"]["matchLabels"]
    check(all(headless["metadata"]["labels"].get(k) == v for k, v in sel.items()), "selects the services")
    for k, v in metrics["serviceMonitor"].get("labels", {}).items():
        check(sm[0]["metadata"]["labels"].get(k) == v, f"ServiceMonitor label {k}")
pr = by_kind.get("PrometheusRule", [])
check(bool(pr) == metrics.get("prometheusRule", {}).get("enabled", False), "PrometheusRule")
if pr:
    rules = [r for g in pr[0]["spec"]["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    check({"ArmadaNodeDown", "ArmadaGroupWithoutLeader", "ArmadaSlowDisk"} <= alerts, f"alerts: {alerts}")
    check(("ArmadaReplicationStalled" in alerts) == (mode == "follower"), "replication alerts on followers")
    exported = (root / "server/src/ops/metrics.rs").read_text()
    for r in rules:
        for series in re.findall(r"armada_[a-z_]+", r["expr"]):
            check(f'"{series}"' in exported, f"alert {r['alert']} uses {series}, which /metrics does not export")

print(f"chart-assertions [{name}]: {len(docs)} objects, {len(args)} arguments checked")
