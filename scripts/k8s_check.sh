#!/usr/bin/env bash
# Checks the Kubernetes side offline: `helm lint` and `helm template` of the
# chart with its defaults and with a values file that sets every option
# (deploy/helm/ssmfs-csi/ci/all-values.yaml); every rendered object and every
# file in deploy/kubernetes/ validated against Kubernetes 1.30's schemas
# (kubernetes-validate, strict: unknown fields fail); and the volume and
# mount that deploy/examples/airflow-values.yaml hands Airflow's chart,
# validated inside a Pod (Airflow's chart and its values schema come from no
# registry this project can reach, so the file itself is checked as YAML and
# for what it sets).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
K8S_VERSION=1.30.0
helm=.tools/bin/helm; validate=(.venv-k8s/bin/kubernetes-validate -k "$K8S_VERSION" --strict --quiet)
chart=deploy/helm/ssmfs-csi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
"$helm" lint --strict "$chart"
"$helm" lint --strict "$chart" -f "$chart/ci/all-values.yaml"
"$helm" template ssmfs-csi "$chart" --namespace kube-system > "$out/default.yaml"
"$helm" template ssmfs-csi "$chart" --namespace kube-system -f "$chart/ci/all-values.yaml" > "$out/all.yaml"
# The rendered DaemonSet must carry what the values set.
grep -q -- '--linger=30m' "$out/all.yaml"
grep -q -- '--serve-user=10001:10001' "$out/all.yaml"
grep -q 'eventsTopic' "$out/all.yaml"
grep -q 'path: /run/ssmfs-csi-airflow' "$out/all.yaml"
grep -q 'AWS_ENDPOINT_URL_STS' "$out/all.yaml"  # awsEndpoints reach the containers
grep -q 'runAsUser: 0' "$out/default.yaml"  # the plugin mounts: root, whatever the image's user
# The shared cluster's policy reaches the plugin; Pod Identity's audience the CSIDriver.
grep -q -- '--node-identity-namespaces=platform,ops' "$out/all.yaml"
grep -q -- '--max-mounts-per-namespace=4' "$out/all.yaml"
grep -q 'audience: pods.eks.amazonaws.com' "$out/default.yaml"
grep -q -- '--serve-user=64721:64721' "$out/default.yaml"  # the serving side's own uid, not nobody
"${validate[@]}" "$out/default.yaml" "$out/all.yaml" deploy/kubernetes/*.yaml
# The upgrade guarantee rests on the layout: two DaemonSets with distinct
# selectors, the plugin's without surge, the serving side's surging, never
# unavailable, and ready only when it serves every mount.
.venv-k8s/bin/python - "$out/default.yaml" "$out/all.yaml" deploy/kubernetes/*.yaml <<'PY'
import sys, yaml
docs = [d for path in sys.argv[1:] for d in yaml.safe_load_all(open(path)) if d]
for source in (sys.argv[1], sys.argv[2], "deploy/kubernetes"):
    sets = [d for path in sys.argv[1:] if path.startswith(source) or path == source
            for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "DaemonSet"]
    assert len(sets) == 2, (source, len(sets))
    by_component = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: d for d in sets}
    node, serve = by_component["node"], by_component["serve"]
    assert "maxSurge" not in node["spec"]["updateStrategy"]["rollingUpdate"], source
    rolling = serve["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"], (source, rolling)
    container = serve["spec"]["template"]["spec"]["containers"][0]
    assert "--check-ready" in container["readinessProbe"]["exec"]["command"], source
    assert not container["securityContext"].get("privileged"), source
    # Root for an instant, able only to change its ids (it reads the link
    # key, then becomes --serve-user); never the host's network.
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and sorted(caps.get("add", [])) == ["SETGID", "SETUID"], (source, caps)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False, source
    assert any(a.startswith("--serve-user=") for a in container["args"]), source
    for ds in (node, serve):
        assert not ds["spec"]["template"]["spec"].get("hostNetwork"), source
    names = [c["name"] for c in node["spec"]["template"]["spec"]["containers"]]
    assert names == ["plugin", "node-driver-registrar"], (source, names)
PY
.venv-k8s/bin/python - deploy/examples/airflow-values.yaml "$out/airflow-pod.yaml" <<'PY'
import sys, yaml
values = yaml.safe_load(open(sys.argv[1]))
env = {e["name"]: e["value"] for e in values["env"]}
assert env["AIRFLOW__SECRETS__BACKEND"] == "ssmfs_airflow.SsmfsSecretsBackend", env
volume = values["volumes"][0]
assert volume["csi"]["driver"] == "ssmfs.csi.aws-ssm.dev" and volume["csi"]["readOnly"] is True
for component in ("workers", "scheduler", "triggerer", "dagProcessor"):
    assert "eks.amazonaws.com/role-arn" in values[component]["serviceAccount"]["annotations"], component
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "airflow-worker"},
       "spec": {"containers": [{"name": "base", "image": "apache/airflow:3.1.0", "env": values["env"],
                                "volumeMounts": values["volumeMounts"]}],
                "volumes": values["volumes"]}}
yaml.safe_dump(pod, open(sys.argv[2], "w"))
PY
"${validate[@]}" "$out/airflow-pod.yaml"
# The rotation patterns: schema-valid, the volume read-only, the rendered
# files in memory, and the sidecar's flags ones ssmfs render takes.
"${validate[@]}" deploy/examples/rotation.yaml
.venv-k8s/bin/python - deploy/examples/rotation.yaml <<'PY'
import sys, yaml
docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(open(sys.argv[1])) if d}
web = docs["web"]["spec"]
volumes = {v["name"]: v for v in web["volumes"]}
assert volumes["secrets"]["csi"]["readOnly"] is True
assert volumes["rendered"]["emptyDir"]["medium"] == "Memory"
render = web["containers"][0]
assert render["args"][0] == "render" and all(a.startswith("--template=") for a in render["args"][1:])
worker = docs["worker"]["spec"]["containers"][0]["command"]
assert worker[1] == "exec" and "--on-change=restart" in worker and worker[worker.index("--") + 1] == "/app/worker"
PY
echo "k8s_check: chart, manifests and Airflow values valid for Kubernetes $K8S_VERSION"
