#!/usr/bin/env bash
# Real Kubernetes API server tier (docs/KUBE-E2E.md): builds (cached) and starts kube-apiserver 1.20.2 + etcd on
# 127.0.0.1, runs the scenarios, stops everything.
#
#   scripts/kube-e2e.sh                 every scenario in SCENARIOS
#   scripts/kube-e2e.sh smoke ...       only the named scenarios
#   scripts/kube-e2e.sh --list          list the scenarios
#
# Environment:
#   WSGATE_KUBE_E2E_DIR    state/log directory (default: a new /tmp/wsgate-kube-e2e.XXXXXX, removed on success)
#   WSGATE_KUBE_E2E_KEEP   1 = leave the API server running and the directory in place at exit (debugging)
#   WSGATE_KUBE_CACHE      binary cache, see scripts/kube-apiserver.sh
#
# The helpers (kube_api, apply_yaml_file, wait_for, ...) can be reused by sourcing this file: the tier only runs
# when the file is executed.
set -euo pipefail

E2E_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAS="${E2E_ROOT}/scripts/kube-apiserver.sh"

# Set by e2e_start from DIR/env.
KUBE_API_URL=""
KUBE_CA_FILE=""
KUBE_TOKEN_FILE=""
KUBECONFIG_FILE=""
KUBECTL_BIN=""
E2E_DIR=""
E2E_CHECKS=0
E2E_PYTHON=""

e2e_log() { printf '[kube-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
e2e_fail() {
    printf '[kube-e2e] FAIL: %s\n' "$*" >&2
    exit 1
}

# check DESCRIPTION CMD...: runs CMD; counts a pass or fails the tier with DESCRIPTION.
check() {
    local what=$1
    shift
    if "$@"; then
        E2E_CHECKS=$((E2E_CHECKS + 1))
        e2e_log "ok: ${what}"
    else
        e2e_fail "${what}"
    fi
}

# ===============================================================================================================
# Reusable helpers
# ===============================================================================================================

# kube_api METHOD PATH [BODY [CONTENT_TYPE]]
#   Calls the API server as the admin (or as whoever KUBE_TOKEN names: `KUBE_TOKEN=$tok kube_api GET ...`).
#   BODY is a literal string or @FILE (@- for stdin); CONTENT_TYPE defaults to application/json.
#   Prints the response body; returns 0 on 2xx, otherwise prints "METHOD PATH -> CODE body" to stderr and
#   returns 1.
kube_api() {
    local method=$1 path=$2 body=${3-} ctype=${4:-application/json}
    local out code
    out="$(mktemp)"
    code="$(kube_api_raw "${out}" "${method}" "${path}" "${body}" "${ctype}")" || code=000
    if [[ ${code} == 2?? ]]; then
        cat "${out}"
        rm -f "${out}"
        return 0
    fi
    printf '%s %s -> %s %s\n' "${method}" "${path}" "${code}" "$(head -c 2000 "${out}")" >&2
    rm -f "${out}"
    return 1
}

# kube_api_as TOKEN METHOD PATH [BODY [CONTENT_TYPE]]: kube_api with another identity's bearer token.
kube_api_as() { KUBE_TOKEN=$1 kube_api "${@:2}"; }

# kube_api_status METHOD PATH [BODY [CONTENT_TYPE]]: prints only the HTTP status code (for negative checks).
kube_api_status() {
    local out code
    out="$(mktemp)"
    code="$(kube_api_raw "${out}" "$@")" || code=000
    rm -f "${out}"
    printf '%s\n' "${code}"
}

# kube_api_raw OUTFILE METHOD PATH [BODY [CONTENT_TYPE]]: the curl call behind kube_api; prints the status code.
kube_api_raw() {
    local out=$1 method=$2 path=$3 body=${4-} ctype=${5:-application/json}
    local token=${KUBE_TOKEN:-}
    [[ -n ${token} ]] || token="$(cat "${KUBE_TOKEN_FILE}")"
    local args=(-sS -o "${out}" -w '%{http_code}' --max-time 60 --cacert "${KUBE_CA_FILE}"
        -H "Authorization: Bearer ${token}" -H 'Accept: application/json' -X "${method}")
    if [[ -n ${body} ]]; then
        args+=(-H "Content-Type: ${ctype}" --data-binary "${body}")
    fi
    curl "${args[@]}" "${KUBE_API_URL}${path}"
}

# wait_for SECS DESCRIPTION CMD...: polls CMD (every 0.5 s, output discarded) until it succeeds; fails the tier
# after SECS.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || e2e_fail "timed out after ${secs}s waiting for ${what}"
        sleep 0.5
    done
}

# resource_path APIVERSION KIND NAMESPACE [NAME]: the REST path of a kind (plural found through discovery).
# NAMESPACE is ignored for cluster-scoped kinds; empty NAME gives the collection path.
resource_path() {
    local api_version=$1 kind=$2 ns=$3 name=${4-}
    local base
    if [[ ${api_version} == */* ]]; then base="/apis/${api_version}"; else base="/api/${api_version}"; fi
    local found
    found="$(kube_api GET "${base}" | jq -r --arg k "${kind}" \
        'first(.resources[] | select(.kind == $k and (.name | contains("/") | not))) | "\(.name) \(.namespaced)"')" ||
        return 1
    [[ -n ${found} && ${found} != null* ]] || {
        printf 'resource_path: no resource of kind %s in %s\n' "${kind}" "${api_version}" >&2
        return 1
    }
    local plural=${found% *} namespaced=${found#* }
    local path="${base}"
    if [[ ${namespaced} == true ]]; then path+="/namespaces/${ns:-default}"; fi
    path+="/${plural}"
    [[ -n ${name} ]] && path+="/${name}"
    printf '%s\n' "${path}"
}

# yaml_docs FILE: one compact JSON object per line for each non-empty YAML document of FILE (List kinds are
# flattened).
yaml_docs() {
    "${E2E_PYTHON:-python3}" - "$1" <<'PY'
import json, sys, yaml
with open(sys.argv[1]) as f:
    for doc in yaml.safe_load_all(f):
        if not doc:
            continue
        items = doc.get("items", []) if str(doc.get("kind", "")).endswith("List") else [doc]
        for item in items:
            print(json.dumps(item, separators=(",", ":")))
PY
}

# apply_yaml_file FILE [QUERY]: server-side apply of every object in FILE (field manager $FIELD_MANAGER, default
# wsgate-e2e, force=true), through curl. QUERY adds query parameters, e.g. `dryRun=All` for a server-side dry run.
# Kinds defined by a CRD in the same file need that CRD established first (see wait_crd_established).
apply_yaml_file() {
    local file=$1 query=${2-} manager=${FIELD_MANAGER:-wsgate-e2e}
    [[ -f ${file} ]] || e2e_fail "apply_yaml_file: no file ${file}"
    local docs doc api_version kind ns name path n=0
    docs="$(yaml_docs "${file}")" || e2e_fail "apply_yaml_file: ${file} is not valid YAML"
    while IFS= read -r doc; do
        [[ -n ${doc} ]] || continue
        api_version="$(jq -r '.apiVersion // empty' <<<"${doc}")"
        kind="$(jq -r '.kind // empty' <<<"${doc}")"
        name="$(jq -r '.metadata.name // empty' <<<"${doc}")"
        ns="$(jq -r '.metadata.namespace // empty' <<<"${doc}")"
        [[ -n ${api_version} && -n ${kind} && -n ${name} ]] ||
            e2e_fail "apply_yaml_file ${file}: object without apiVersion/kind/metadata.name"
        path="$(resource_path "${api_version}" "${kind}" "${ns}" "${name}")" ||
            e2e_fail "apply_yaml_file ${file}: cannot resolve ${api_version} ${kind}"
        kube_api PATCH "${path}?fieldManager=${manager}&force=true${query:+&${query}}" "${doc}" \
            application/apply-patch+yaml >/dev/null ||
            e2e_fail "apply_yaml_file ${file}: apply of ${kind} ${ns:+${ns}/}${name} failed"
        n=$((n + 1))
    done <<<"${docs}"
    e2e_log "applied ${n} object(s) from ${file##*/}${query:+ (${query})}"
}

crd_established() {
    kube_api GET "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$1" |
        jq -e '.status.conditions[]? | select(.type == "Established" and .status == "True")' >/dev/null
}

# wait_crd_established NAME [SECS]: waits until the CRD is Established (its REST paths are then served).
wait_crd_established() {
    wait_for "${2:-60}" "CRD $1 Established" crd_established "$1"
    # Discovery of the new group can lag a little behind the condition.
    local group=${1#*.}
    wait_for 30 "discovery of ${group}" kube_api GET "/apis/${group}"
}

# ensure_namespace NAME [LABELS_JSON]: creates the namespace (labels merged in) and its `default` ServiceAccount;
# there is no kube-controller-manager in this tier, so nothing else creates that ServiceAccount, and the
# ServiceAccount admission plugin rejects pods without it.
ensure_namespace() {
    local ns=$1 labels=${2:-\{\}}
    local body
    body="$(jq -cn --arg n "${ns}" --argjson l "${labels}" \
        '{apiVersion: "v1", kind: "Namespace", metadata: {name: $n, labels: $l}}')"
    kube_api PATCH "/api/v1/namespaces/${ns}?fieldManager=wsgate-e2e&force=true" "${body}" \
        application/apply-patch+yaml >/dev/null || e2e_fail "cannot create namespace ${ns}"
    ensure_service_account "${ns}" default
}

# ensure_service_account NAMESPACE NAME
ensure_service_account() {
    local body
    body="$(jq -cn --arg ns "$1" --arg n "$2" \
        '{apiVersion: "v1", kind: "ServiceAccount", metadata: {name: $n, namespace: $ns}}')"
    kube_api PATCH "/api/v1/namespaces/$1/serviceaccounts/$2?fieldManager=wsgate-e2e&force=true" "${body}" \
        application/apply-patch+yaml >/dev/null || e2e_fail "cannot create serviceaccount $1/$2"
}

# sa_token NAMESPACE SA [AUDIENCE [SECONDS]]: prints a bound token for the ServiceAccount (TokenRequest API).
sa_token() {
    local ns=$1 sa=$2 aud=${3:-https://kubernetes.default.svc} secs=${4:-3600}
    local body
    body="$(jq -cn --arg a "${aud}" --argjson s "${secs}" \
        '{apiVersion: "authentication.k8s.io/v1", kind: "TokenRequest", spec: {audiences: [$a], expirationSeconds: $s}}')"
    kube_api POST "/api/v1/namespaces/${ns}/serviceaccounts/${sa}/token" "${body}" | jq -er '.status.token'
}

# sa_kubeconfig NAMESPACE SA OUTFILE: a kubeconfig that authenticates as the ServiceAccount (e.g. to run the
# controller with only the chart's RBAC, not as admin).
sa_kubeconfig() {
    local ns=$1 sa=$2 out=$3 token
    token="$(sa_token "${ns}" "${sa}")" || e2e_fail "cannot get a token for ${ns}/${sa}"
    (
        umask 077
        cat >"${out}" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: wsgate-e2e
  cluster:
    server: ${KUBE_API_URL}
    certificate-authority-data: $(base64 -w0 <"${KUBE_CA_FILE}")
users:
- name: ${ns}-${sa}
  user:
    token: ${token}
contexts:
- name: wsgate-e2e
  context:
    cluster: wsgate-e2e
    user: ${ns}-${sa}
    namespace: ${ns}
current-context: wsgate-e2e
EOF
    )
}

# kubectl_e2e ARGS...: kubectl 1.20.2 (from Debian's kubernetes-client, cached by kube-apiserver.sh) against the
# tier's API server as admin. Returns 127 when that kubectl could not be fetched.
kubectl_e2e() {
    [[ -n ${KUBECTL_BIN} && -x ${KUBECTL_BIN} ]] || {
        printf 'kubectl_e2e: kubectl %s not available\n' 1.20.2 >&2
        return 127
    }
    "${KUBECTL_BIN}" --kubeconfig "${KUBECONFIG_FILE}" "$@"
}

# ===============================================================================================================
# Lifecycle
# ===============================================================================================================

# E2E_PYTHON: a python3 with PyYAML (installs Debian's python3-yaml when none has it).
e2e_pick_python() {
    local py
    for py in python3 /usr/bin/python3; do
        if command -v "${py}" >/dev/null 2>&1 && "${py}" -c 'import yaml' 2>/dev/null; then
            E2E_PYTHON=${py}
            return 0
        fi
    done
    e2e_log "installing Debian python3-yaml"
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends python3-yaml >&2 ||
        { apt-get update -qq >&2 && apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends python3-yaml >&2; } ||
        e2e_fail "python3 with PyYAML is required (Debian python3-yaml)"
    /usr/bin/python3 -c 'import yaml' 2>/dev/null || e2e_fail "python3-yaml installed but /usr/bin/python3 cannot import yaml"
    E2E_PYTHON=/usr/bin/python3
}

e2e_start() {
    "${KAS}" build || e2e_fail "kube-apiserver build failed"
    if [[ -n ${WSGATE_KUBE_E2E_DIR:-} ]]; then
        E2E_DIR="${WSGATE_KUBE_E2E_DIR}"
        mkdir -p "${E2E_DIR}"
    else
        E2E_DIR="$(mktemp -d /tmp/wsgate-kube-e2e.XXXXXX)"
    fi
    "${KAS}" start "${E2E_DIR}/apiserver" >/dev/null || e2e_fail "kube-apiserver start failed"
    local envf="${E2E_DIR}/apiserver/env"
    KUBE_API_URL="$(sed -n 's/^KUBE_API_URL=//p' "${envf}")"
    KUBE_CA_FILE="$(sed -n 's/^KUBE_CA_FILE=//p' "${envf}")"
    KUBE_TOKEN_FILE="$(sed -n 's/^KUBE_TOKEN_FILE=//p' "${envf}")"
    KUBECONFIG_FILE="$(sed -n 's/^KUBECONFIG=//p' "${envf}")"
    KUBECTL_BIN="$(sed -n 's/^KUBECTL=//p' "${envf}")"
    e2e_log "API server ${KUBE_API_URL} (state in ${E2E_DIR})"
}

e2e_cleanup() {
    local rc=$?
    [[ -n ${E2E_DIR} ]] || return 0
    if [[ ${WSGATE_KUBE_E2E_KEEP:-0} == 1 ]]; then
        e2e_log "WSGATE_KUBE_E2E_KEEP=1: left running; stop with: ${KAS} stop ${E2E_DIR}/apiserver"
        return 0
    fi
    "${KAS}" stop "${E2E_DIR}/apiserver" || true
    if [[ ${rc} -ne 0 ]]; then
        e2e_log "last errors in the API server log (${E2E_DIR}/apiserver/kube-apiserver.log):"
        grep -E '^[EF][0-9]{4} ' "${E2E_DIR}/apiserver/kube-apiserver.log" 2>/dev/null | tail -n 15 >&2 || true
        e2e_log "FAILED (exit ${rc}); state and logs kept in ${E2E_DIR}"
    elif [[ -z ${WSGATE_KUBE_E2E_DIR:-} ]]; then
        rm -rf "${E2E_DIR}"
    fi
}

# ===============================================================================================================
# SCENARIOS
#
# Controller / chart engineers: add a function `scenario_NAME` below and append NAME to SCENARIOS. Each scenario
# runs against the same API server (use your own namespace and object names), with the helpers above; fail with
# e2e_fail or `check`. Where 1.20 lacks a feature the real scenario would use, say so in a comment and an e2e_log
# line (see docs/KUBE-E2E.md, "Kubernetes 1.20 limitations").
#
# Webhooks: point clientConfig at `url: https://127.0.0.1:PORT/...`, never at a Service: the API server would dial
# the Service's cluster IP, which is not on this machine.
# ===============================================================================================================

SCENARIOS=(smoke)

# The tier itself: version, CRD with structural schema, create/list/validate custom objects, server-side apply and
# dry run, the status subresource, RBAC for a ServiceAccount token, pod storage with ServiceAccount admission.
scenario_smoke() {
    local ver
    ver="$(kube_api GET /version | jq -r .gitVersion)"
    check "GET /version is v1.20.2 (got ${ver})" test "${ver}" = v1.20.2

    local crd="${E2E_DIR}/smoke-crd.yaml"
    cat >"${crd}" <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.wsgate.io
spec:
  group: smoke.wsgate.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
              color: {type: string, enum: [red, blue]}
          status:
            type: object
            properties:
              ready: {type: boolean}
EOF
    apply_yaml_file "${crd}"
    wait_crd_established widgets.smoke.wsgate.io
    check "CRD widgets.smoke.wsgate.io established" crd_established widgets.smoke.wsgate.io

    local coll=/apis/smoke.wsgate.io/v1/namespaces/default/widgets
    kube_api POST "${coll}" \
        '{"apiVersion":"smoke.wsgate.io/v1","kind":"Widget","metadata":{"name":"w1"},"spec":{"size":3,"color":"red"}}' \
        >/dev/null || e2e_fail "create widget w1"
    local listed
    listed="$(kube_api GET "${coll}" | jq -c '[.items[] | {n: .metadata.name, s: .spec.size}]')"
    check "list returns w1 with size 3 (got ${listed})" test "${listed}" = '[{"n":"w1","s":3}]'

    local code
    code="$(kube_api_status POST "${coll}" \
        '{"apiVersion":"smoke.wsgate.io/v1","kind":"Widget","metadata":{"name":"bad"},"spec":{"size":0,"color":"green"}}')"
    check "schema rejects size 0 / color green with 422 (got ${code})" test "${code}" = 422

    local w2="${E2E_DIR}/smoke-w2.yaml"
    printf 'apiVersion: smoke.wsgate.io/v1\nkind: Widget\nmetadata: {name: w2, namespace: default}\nspec: {size: 5}\n' >"${w2}"
    apply_yaml_file "${w2}" dryRun=All
    code="$(kube_api_status GET "${coll}/w2")"
    check "server-side dry run stores nothing (GET w2 -> ${code})" test "${code}" = 404
    apply_yaml_file "${w2}"
    local mgr
    mgr="$(kube_api GET "${coll}/w2" | jq -r '[.metadata.managedFields[].manager] | join(",")')"
    check "server-side apply created w2, managed by wsgate-e2e (got ${mgr})" test "${mgr}" = wsgate-e2e

    local gen1 gen2
    gen1="$(kube_api GET "${coll}/w1" | jq -r .metadata.generation)"
    kube_api PATCH "${coll}/w1/status" '{"status":{"ready":true}}' application/merge-patch+json >/dev/null ||
        e2e_fail "status patch"
    gen2="$(kube_api GET "${coll}/w1" | jq -r '"\(.metadata.generation) \(.status.ready)"')"
    check "status write keeps generation ${gen1} (got ${gen2})" test "${gen2}" = "${gen1} true"
    kube_api PATCH "${coll}/w1" '{"spec":{"size":4}}' application/merge-patch+json >/dev/null || e2e_fail "spec patch"
    gen2="$(kube_api GET "${coll}/w1" | jq -r .metadata.generation)"
    check "spec write bumps generation (${gen1} -> ${gen2})" test "${gen2}" = "$((gen1 + 1))"

    # RBAC: a ServiceAccount token is not admin.
    ensure_namespace smoke '{"wsgate.io/inject":"enabled"}'
    ensure_service_account smoke reader
    local tok
    tok="$(sa_token smoke reader)" || e2e_fail "TokenRequest for smoke/reader"
    code="$(KUBE_TOKEN="${tok}" kube_api_status GET /apis/smoke.wsgate.io/v1/namespaces/smoke/widgets)"
    check "ServiceAccount without RBAC gets 403 (got ${code})" test "${code}" = 403
    local rbac="${E2E_DIR}/smoke-rbac.yaml"
    cat >"${rbac}" <<'EOF'
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: widget-reader, namespace: smoke}
rules:
- apiGroups: [smoke.wsgate.io]
  resources: [widgets]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: widget-reader, namespace: smoke}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: widget-reader}
subjects:
- {kind: ServiceAccount, name: reader, namespace: smoke}
EOF
    apply_yaml_file "${rbac}"
    wait_for 30 "RBAC grant for smoke/reader" kube_api_as "${tok}" GET /apis/smoke.wsgate.io/v1/namespaces/smoke/widgets
    code="$(KUBE_TOKEN="${tok}" kube_api_status GET /api/v1/namespaces/smoke/secrets)"
    check "granted ServiceAccount lists widgets but still gets 403 on secrets (got ${code})" test "${code}" = 403

    # Pods are stored (nothing schedules or runs them). 1.20 has no native sidecars: the init container's
    # restartPolicy is an unknown field there and is dropped silently.
    local pod
    pod="$(kube_api POST /api/v1/namespaces/smoke/pods '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p1"},
        "spec":{"initContainers":[{"name":"side","image":"example.invalid/side","restartPolicy":"Always"}],
                "containers":[{"name":"app","image":"example.invalid/app"}]}}')" || e2e_fail "create pod smoke/p1"
    check "ServiceAccount admission gave the pod a projected token volume (BoundServiceAccountTokenVolume gate)" \
        test "$(jq '[.spec.volumes[]? | select(.projected.sources[]?.serviceAccountToken)] | length' <<<"${pod}")" = 1
    check "pod stored; init container restartPolicy dropped by 1.20 (got $(jq -c '.spec.initContainers[0].restartPolicy' <<<"${pod}"))" \
        test "$(jq -c '.spec.initContainers[0].restartPolicy' <<<"${pod}")" = null

    if [[ -n ${KUBECTL_BIN} ]]; then
        local out
        out="$(kubectl_e2e get widgets -n default -o name)" || e2e_fail "kubectl get widgets"
        check "kubectl ${KUBECTL_BIN##*/} lists the widgets ($(tr '\n' ' ' <<<"${out}"))" \
            test "$(tr '\n' ' ' <<<"${out}")" = "widget.smoke.wsgate.io/w1 widget.smoke.wsgate.io/w2 "
    else
        e2e_log "kubectl 1.20.2 unavailable: kubectl check skipped"
    fi

    kube_api DELETE "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.smoke.wsgate.io" >/dev/null ||
        e2e_fail "delete CRD"
}

# --- add scenario functions above this line ------------------------------------------------------------------

e2e_main() {
    if [[ ${1:-} == --list ]]; then
        printf '%s\n' "${SCENARIOS[@]}"
        return 0
    fi
    local selected=("$@") s
    [[ ${#selected[@]} -gt 0 ]] || selected=("${SCENARIOS[@]}")
    for s in "${selected[@]}"; do
        declare -F "scenario_${s}" >/dev/null || e2e_fail "unknown scenario '${s}' (have: ${SCENARIOS[*]})"
    done
    command -v jq >/dev/null 2>&1 || e2e_fail "jq is required"
    e2e_pick_python

    local t0=${SECONDS}
    trap e2e_cleanup EXIT
    # The servers run in their own sessions: turn signals into an exit so that the EXIT trap stops them.
    trap 'exit 130' INT
    trap 'exit 143' TERM
    e2e_start
    e2e_log "API server up after $((SECONDS - t0))s"
    local t1
    for s in "${selected[@]}"; do
        t1=${SECONDS}
        e2e_log "scenario ${s}"
        "scenario_${s}"
        e2e_log "scenario ${s} ok ($((SECONDS - t1))s)"
    done
    e2e_log "all ${#selected[@]} scenario(s) ok, ${E2E_CHECKS} checks, $((SECONDS - t0))s"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    e2e_main "$@"
fi
