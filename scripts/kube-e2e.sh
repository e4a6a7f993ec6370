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
#   WSGATE_KUBE_E2E_API_DIR  use the API server already started with `kube-apiserver.sh start DIR` (not stopped at
#                          the end; namespaces get a suffix so that scenarios can run again on it)
#   WSGATE_E2E_BIN         the wsgate binary to test (default: `cargo build --bin wsgate`, target/debug/wsgate)
#   WSGATE_HELM            helm binary for rendering charts/wsgate (default: scripts/check-chart.sh --print-helm)
#   WSGATE_KUBE_E2E_RBAC   `minimal`: run the controller with the least privilege written in this script instead
#                          of the chart's RBAC (checks that it is enough; the webhook scenario is then skipped)
#
# Scenarios: smoke (the tier itself), crds, controller, routes, gateway, rust (tests/kube_real.rs). Each prints
# `ok:` lines per check; at exit one `scenario NAME: ok|FAILED|not run` line per selected scenario.
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
E2E_REUSED=0
E2E_SELECTED=()
E2E_SUMMARY=()
E2E_SKIP_REASON=""                   # set by a scenario that cannot run here (and says why)
E2E_CURRENT=""
E2E_PROCS=()
E2E_SPAWNED=""

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
    # Discovery cached per run (kubectl keys its cache by host:port, and ports are reused across runs).
    "${KUBECTL_BIN}" --kubeconfig "${KUBECONFIG_FILE}" --cache-dir "${E2E_DIR}/kubectl-cache" "$@"
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
    if [[ -n ${WSGATE_KUBE_E2E_API_DIR:-} ]]; then
        # An API server started earlier with `kube-apiserver.sh start DIR`: use it, leave it running.
        [[ -f ${WSGATE_KUBE_E2E_API_DIR}/env ]] || e2e_fail "WSGATE_KUBE_E2E_API_DIR: no ${WSGATE_KUBE_E2E_API_DIR}/env"
        E2E_REUSED=1
        E2E_DIR="$(mktemp -d /tmp/wsgate-kube-e2e.XXXXXX)"
        e2e_read_env "${WSGATE_KUBE_E2E_API_DIR}/env"
        kube_api GET /readyz >/dev/null || e2e_fail "the API server of ${WSGATE_KUBE_E2E_API_DIR} is not ready"
        e2e_log "reusing the API server ${KUBE_API_URL} of ${WSGATE_KUBE_E2E_API_DIR} (state in ${E2E_DIR})"
        return 0
    fi
    "${KAS}" build || e2e_fail "kube-apiserver build failed"
    if [[ -n ${WSGATE_KUBE_E2E_DIR:-} ]]; then
        E2E_DIR="${WSGATE_KUBE_E2E_DIR}"
        mkdir -p "${E2E_DIR}"
    else
        E2E_DIR="$(mktemp -d /tmp/wsgate-kube-e2e.XXXXXX)"
    fi
    "${KAS}" start "${E2E_DIR}/apiserver" >/dev/null || e2e_fail "kube-apiserver start failed"
    e2e_read_env "${E2E_DIR}/apiserver/env"
    e2e_log "API server ${KUBE_API_URL} (state in ${E2E_DIR})"
}

# e2e_read_env FILE: the connection settings from an API server's DIR/env.
e2e_read_env() {
    local envf=$1
    KUBE_API_URL="$(sed -n 's/^KUBE_API_URL=//p' "${envf}")"
    KUBE_CA_FILE="$(sed -n 's/^KUBE_CA_FILE=//p' "${envf}")"
    KUBE_TOKEN_FILE="$(sed -n 's/^KUBE_TOKEN_FILE=//p' "${envf}")"
    KUBECONFIG_FILE="$(sed -n 's/^KUBECONFIG=//p' "${envf}")"
    KUBECTL_BIN="$(sed -n 's/^KUBECTL=//p' "${envf}")"
}

e2e_cleanup() {
    local rc=$?
    [[ -n ${E2E_DIR} ]] || return 0
    # Processes the scenarios started (controller, gateway, backend) go first, whatever happens.
    e2e_stop_all_procs
    if [[ ${rc} -ne 0 ]]; then e2e_dump_proc_logs; fi
    e2e_summary "${rc}"
    if [[ ${E2E_REUSED} == 1 ]]; then
        if [[ ${rc} -ne 0 ]]; then
            e2e_log "FAILED (exit ${rc}); logs kept in ${E2E_DIR}; the API server of ${WSGATE_KUBE_E2E_API_DIR} is left running"
        else
            rm -rf "${E2E_DIR}"
        fi
        return 0
    fi
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

# --- processes started by scenarios -----------------------------------------------------------------------------

# e2e_spawn NAME CMD...: starts CMD in the background with stdout+stderr appended to $E2E_DIR/NAME.log; sets
# E2E_SPAWNED to its pid. Every spawned process is stopped by e2e_cleanup (or earlier with e2e_stop_proc).
e2e_spawn() {
    local name=$1
    shift
    printf '=== %s: %s\n' "$(date +%H:%M:%S)" "$*" >>"${E2E_DIR}/${name}.log"
    "$@" >>"${E2E_DIR}/${name}.log" 2>&1 &
    E2E_SPAWNED=$!
    E2E_PROCS+=("${E2E_SPAWNED}:${name}")
}

# e2e_alive PID: whether the process still runs (and is not a zombie).
e2e_alive() {
    kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]
}

# e2e_stop_proc PID: SIGTERM, then SIGKILL after 10 s; reaps it. Returns the process's exit status.
e2e_stop_proc() {
    local pid=$1 i rc=0
    if e2e_alive "${pid}"; then
        kill -TERM "${pid}" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            e2e_alive "${pid}" || break
            sleep 0.1
        done
        e2e_alive "${pid}" && kill -KILL "${pid}" 2>/dev/null
    fi
    wait "${pid}" 2>/dev/null || rc=$?
    local kept=() p
    for p in "${E2E_PROCS[@]}"; do [[ ${p%%:*} == "${pid}" ]] || kept+=("${p}"); done
    E2E_PROCS=("${kept[@]}")
    return "${rc}"
}

e2e_stop_all_procs() {
    local i
    for ((i = ${#E2E_PROCS[@]} - 1; i >= 0; i--)); do
        e2e_stop_proc "${E2E_PROCS[i]%%:*}" || true
    done
}

# On failure: the end of every scenario process log (the files stay in $E2E_DIR).
e2e_dump_proc_logs() {
    local f
    for f in "${E2E_DIR}"/*.log; do
        [[ -f ${f} ]] || continue
        e2e_log "last lines of ${f}:"
        tail -n 15 "${f}" | sed 's/^/    /' >&2
    done
}

# ===============================================================================================================
# SCENARIOS
#
# Controller / chart engineers: add a function `scenario_NAME` below and append NAME to SCENARIOS. Each scenario
# runs against the same API server (use your own namespace and object names), with the helpers above; fail with
# e2e_fail or `check`. Where 1.20 lacks a feature the real scenario would use, say so in a comment and an e2e_log
# line (see docs/KUBE-E2E.md, "Kubernetes 1.20 limitations").
#
# Webhooks: the API server dials a Service's cluster IP, which is a loopback address here (127.96.0.0/16): either
# point clientConfig at `url: https://127.0.0.1:PORT/...`, or keep the Service and listen on its cluster IP and
# port, as scenario_webhook does with the chart's configuration.
# ===============================================================================================================

SCENARIOS=(smoke crds controller routes gateway chart webhook rust)

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

# ---------------------------------------------------------------------------------------------------------------
# wsgate control plane: CRD, controller with least-privilege RBAC, route status, gateway end to end, and the Rust
# scenarios of tests/controller.rs (tests/kube_real.rs) against this server.
#
# Shared state: the CRD, the RBAC and the controller are set up once, by the first scenario that needs them
# (e2e_setup_crds, e2e_setup_rbac, e2e_start_controller), so any scenario also runs on its own.
# ---------------------------------------------------------------------------------------------------------------

CTL_NS=wsgate-system                 # the controller's namespace (Lease, ServiceAccount)
CTL_SA=wsgate-controller             # its ServiceAccount (the chart's, when the chart renders)
CTL_IDENTITY=e2e-controller-0
CTL_LEASE=wsgate-controller          # the Lease name (the chart's --lease-name)
CTL_PORT=""
CTL_PID=""
CTL_KUBECONFIG=""
CTL_CHART_ARGS=()                    # the chart's `wsgate controller` flags (lease name, timings, audience)
CTL_WEBHOOK_ARGS=()                  # the chart's webhook flags (--webhook*, --inject-*), but --webhook-listen
CTL_EXTRA_ARGS=()                    # what the running controller got beyond CTL_CHART_ARGS
RBAC_SOURCE=""
WSGATE_BIN=""
E2E_NS_SUFFIX=""                     # set when reusing an API server, so names don't collide with a past run
E2E_SETUP_CRDS=0

# e2e_free_port: a free TCP port on 127.0.0.1.
e2e_free_port() {
    "${E2E_PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# e2e_wsgate_bin: builds target/debug/wsgate (a no-op when up to date; CI has built it in scripts/test) unless
# WSGATE_BIN names a binary.
e2e_wsgate_bin() {
    [[ -z ${WSGATE_BIN} ]] || return 0
    if [[ -n ${WSGATE_E2E_BIN:-} ]]; then
        WSGATE_BIN=${WSGATE_E2E_BIN}
    else
        local t0=${SECONDS}
        (cd "${E2E_ROOT}" && cargo build --bin wsgate) >"${E2E_DIR}/cargo-build.log" 2>&1 ||
            { tail -n 30 "${E2E_DIR}/cargo-build.log" >&2; e2e_fail "cargo build --bin wsgate failed"; }
        WSGATE_BIN="${CARGO_TARGET_DIR:-${E2E_ROOT}/target}/debug/wsgate"
        e2e_log "wsgate binary ready ($((SECONDS - t0))s): ${WSGATE_BIN}"
    fi
    [[ -x ${WSGATE_BIN} ]] || e2e_fail "no wsgate binary at ${WSGATE_BIN}"
}

# e2e_wait_url SECS WHAT URL PID: waits for URL to answer 2xx while process PID lives.
e2e_wait_url() {
    local secs=$1 what=$2 url=$3 pid=$4
    local deadline=$((SECONDS + secs))
    until curl -fsS --max-time 5 -o /dev/null "${url}" 2>/dev/null; do
        e2e_alive "${pid}" || e2e_fail "${what}: the process exited (see its log above)"
        ((SECONDS < deadline)) || e2e_fail "timed out after ${secs}s waiting for ${what} (${url})"
        sleep 0.2
    done
}

# jq_check DESCRIPTION JSON FILTER: check that `jq -e FILTER` holds for JSON.
jq_check() {
    check "$1" jq_holds "$2" "$3"
}

jq_holds() { jq -e "$2" <<<"$1" >/dev/null; }

# --- objects ----------------------------------------------------------------------------------------------------

# route_path NS [NAME]
route_path() { printf '/apis/wsgate.io/v1alpha1/namespaces/%s/websocketroutes%s\n' "$1" "${2:+/$2}"; }

# create_route NS NAME SPEC_JSON: POST (not apply: the creation time matters for conflicts); prints the object.
create_route() {
    local body
    body="$(jq -cn --arg ns "$1" --arg n "$2" --argjson spec "$3" \
        '{apiVersion: "wsgate.io/v1alpha1", kind: "WebSocketRoute", metadata: {name: $n, namespace: $ns}, spec: $spec}')"
    kube_api POST "$(route_path "$1")" "${body}" || e2e_fail "create WebSocketRoute $1/$2"
}

# create_service NS NAME PORT
create_service() {
    kube_api POST "/api/v1/namespaces/$1/services" "$(jq -cn --arg ns "$1" --arg n "$2" --argjson p "$3" \
        '{apiVersion: "v1", kind: "Service", metadata: {name: $n, namespace: $ns}, spec: {ports: [{port: $p}]}}')" \
        >/dev/null || e2e_fail "create Service $1/$2"
}

# route_cond NS NAME TYPE STATUS [REASON]: the route's condition TYPE has STATUS (and REASON).
route_cond() {
    kube_api GET "$(route_path "$1" "$2")" | jq -e --arg t "$3" --arg s "$4" --arg r "${5-}" \
        '.status.conditions[]? | select(.type == $t and .status == $s and ($r == "" or .reason == $r))' >/dev/null
}

# wait_route_cond NS NAME TYPE STATUS REASON: waits (30 s) for the condition.
wait_route_cond() {
    wait_for 30 "route $1/$2 ${3}=${4} ${5}" route_cond "$@"
}

# route_event NS NAME REASON: an events.k8s.io/v1 Warning Event about the route with this reason exists.
route_event() {
    kube_api GET "/apis/events.k8s.io/v1/namespaces/$1/events" | jq -e --arg n "$2" --arg r "$3" \
        '.items[] | select(.regarding.kind == "WebSocketRoute" and .regarding.name == $n and .reason == $r
            and .type == "Warning" and .reportingController == "wsgate-controller")' >/dev/null
}

# pod_token NS SA POD AUDIENCE: a token bound to the pod (TokenRequest with boundObjectRef), as the kubelet
# projects it into a pod's volume.
pod_token() {
    local uid body
    uid="$(kube_api GET "/api/v1/namespaces/$1/pods/$3" | jq -er .metadata.uid)" || e2e_fail "get pod $1/$3"
    body="$(jq -cn --arg a "$4" --arg pod "$3" --arg uid "${uid}" '{apiVersion: "authentication.k8s.io/v1",
        kind: "TokenRequest", spec: {audiences: [$a], expirationSeconds: 3600,
        boundObjectRef: {apiVersion: "v1", kind: "Pod", name: $pod, uid: $uid}}}')"
    kube_api POST "/api/v1/namespaces/$1/serviceaccounts/$2/token" "${body}" | jq -er '.status.token'
}

# --- CRD, RBAC, controller --------------------------------------------------------------------------------------

e2e_setup_crds() {
    [[ ${E2E_SETUP_CRDS} == 0 ]] || return 0
    local f n=0
    for f in "${E2E_ROOT}"/crds/*.yaml; do
        apply_yaml_file "${f}"
        n=$((n + 1))
    done
    ((n > 0)) || e2e_fail "no CRDs in ${E2E_ROOT}/crds"
    wait_crd_established websocketroutes.wsgate.io
    E2E_SETUP_CRDS=1
}

# e2e_helm: prints a helm binary: WSGATE_HELM, else the one scripts/check-chart.sh installs (target/tools), else
# helm on the PATH.
e2e_helm() {
    local h
    if [[ -n ${WSGATE_HELM:-} ]]; then
        printf '%s\n' "${WSGATE_HELM}"
        return 0
    fi
    if [[ -x ${E2E_ROOT}/scripts/check-chart.sh ]] &&
        h="$("${E2E_ROOT}/scripts/check-chart.sh" --print-helm 2>"${E2E_DIR}/helm-install.log")" && [[ -x ${h} ]]; then
        printf '%s\n' "${h}"
        return 0
    fi
    command -v helm
}

# e2e_rbac_file FILE: writes the controller's ServiceAccount and RBAC to FILE; sets CTL_SA, RBAC_SOURCE and
# CTL_CHART_ARGS. From the Helm chart when charts/wsgate exists (the RBAC the controller is really installed
# with, and the chart's controller flags but the listen addresses and, until the webhook scenario, the webhook
# ones); without a chart, the least privilege the controller's code needs, written out here.
e2e_rbac_file() {
    local out=$1 chart="${E2E_ROOT}/charts/wsgate" helm
    CTL_CHART_ARGS=()
    CTL_WEBHOOK_ARGS=()
    if [[ -f ${chart}/Chart.yaml && ${WSGATE_KUBE_E2E_RBAC:-chart} != minimal ]]; then
        helm="$(e2e_helm)" || e2e_fail "charts/wsgate exists but no helm: set WSGATE_HELM or see scripts/check-chart.sh"
        "${helm}" template wsgate "${chart}" --namespace "${CTL_NS}" --kube-version 1.20.2 \
            >"${E2E_DIR}/chart.yaml" 2>"${E2E_DIR}/helm.log" ||
            { cat "${E2E_DIR}/helm.log" >&2; e2e_fail "helm template charts/wsgate failed"; }
        CTL_SA="$("${E2E_PYTHON}" - "${E2E_DIR}/chart.yaml" "${out}" "${E2E_DIR}/controller-args" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rbac = [d for d in docs if d.get("kind") in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
deployments = [d for d in docs if d.get("kind") == "Deployment"
               and any((c.get("args") or [None])[0] == "controller" for c in d["spec"]["template"]["spec"]["containers"])]
if len(deployments) != 1:
    sys.exit("expected one Deployment running `wsgate controller` in the rendered chart, found %d" % len(deployments))
pod = deployments[0]["spec"]["template"]["spec"]
container = next(c for c in pod["containers"] if (c.get("args") or [None])[0] == "controller")
drop = ("--control-listen", "--webhook", "--inject-")
args = [a for a in container["args"][1:] if not a.startswith(drop)]
webhook = [a for a in container["args"][1:] if a.startswith(("--webhook", "--inject-")) and not a.startswith("--webhook-listen")]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump_all(rbac, f)
with open(sys.argv[3], "w") as f:
    f.write("".join(a + "\n" for a in args))
with open(sys.argv[3] + "-webhook", "w") as f:
    f.write("".join(a + "\n" for a in webhook))
print(pod.get("serviceAccountName") or "default")
PY
)" || e2e_fail "cannot extract the controller's RBAC and flags from the rendered chart"
        mapfile -t CTL_CHART_ARGS <"${E2E_DIR}/controller-args"
        mapfile -t CTL_WEBHOOK_ARGS <"${E2E_DIR}/controller-args-webhook"
        RBAC_SOURCE="charts/wsgate rendered by helm $("${helm}" version --short 2>/dev/null || true)"
        return 0
    fi
    CTL_SA=wsgate-controller
    RBAC_SOURCE="built-in least privilege ($([[ -f ${chart}/Chart.yaml ]] && echo WSGATE_KUBE_E2E_RBAC=minimal ||
        echo charts/wsgate not present))"
    cat >"${out}" <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: ${CTL_SA}, namespace: ${CTL_NS}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: wsgate-controller}
rules:
- apiGroups: [wsgate.io]
  resources: [websocketroutes]
  verbs: [get, list, watch]
- apiGroups: [wsgate.io]
  resources: [websocketroutes/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [services, secrets]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: wsgate-controller}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: wsgate-controller}
subjects:
- {kind: ServiceAccount, name: ${CTL_SA}, namespace: ${CTL_NS}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: wsgate-controller-leader-election, namespace: ${CTL_NS}}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: wsgate-controller-leader-election, namespace: ${CTL_NS}}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: wsgate-controller-leader-election}
subjects:
- {kind: ServiceAccount, name: ${CTL_SA}, namespace: ${CTL_NS}}
EOF
}

# e2e_setup_rbac: the controller's namespace, ServiceAccount and RBAC (server-side dry run, then for real), and
# CTL_KUBECONFIG, a kubeconfig authenticating as that ServiceAccount.
e2e_setup_rbac() {
    [[ -z ${CTL_KUBECONFIG} ]] || return 0
    ensure_namespace "${CTL_NS}"
    local rbac="${E2E_DIR}/controller-rbac.yaml"
    e2e_rbac_file "${rbac}"
    local a
    for a in "${CTL_CHART_ARGS[@]}"; do [[ ${a} != --lease-name=* ]] || CTL_LEASE=${a#--lease-name=}; done
    apply_yaml_file "${rbac}" dryRun=All
    apply_yaml_file "${rbac}"
    CTL_KUBECONFIG="${E2E_DIR}/controller.kubeconfig"
    sa_kubeconfig "${CTL_NS}" "${CTL_SA}" "${CTL_KUBECONFIG}"
    e2e_log "controller RBAC: ${RBAC_SOURCE}; ServiceAccount ${CTL_NS}/${CTL_SA}"
    [[ ${#CTL_CHART_ARGS[@]} -eq 0 ]] || e2e_log "controller flags from the chart: ${CTL_CHART_ARGS[*]}"
}

# e2e_start_controller [ARGS...]: `wsgate controller` as the ServiceAccount (KUBECONFIG; kube::Client::try_default
# reads a kubeconfig before in-cluster settings), with the chart's flags and ARGS, control API on
# 127.0.0.1:CTL_PORT, POD_NAMESPACE and POD_NAME as the chart's downward API sets them; waits for /readyz (caches
# synced) and for it to hold the Lease. A no-op while it runs with the same ARGS; restarted with other ones.
e2e_start_controller() {
    if [[ -n ${CTL_PID} ]] && e2e_alive "${CTL_PID}"; then
        [[ "${CTL_EXTRA_ARGS[*]}" != "$*" ]] || return 0
        e2e_stop_controller
    fi
    e2e_setup_crds
    e2e_setup_rbac
    e2e_wsgate_bin
    CTL_EXTRA_ARGS=("$@")
    CTL_PORT="$(e2e_free_port)"
    e2e_spawn controller env -u KUBERNETES_SERVICE_HOST -u KUBERNETES_SERVICE_PORT \
        KUBECONFIG="${CTL_KUBECONFIG}" POD_NAMESPACE="${CTL_NS}" POD_NAME="${CTL_IDENTITY}" NO_COLOR=1 \
        WSGATE_LOG=info "${WSGATE_BIN}" controller "${CTL_CHART_ARGS[@]}" "$@" \
        --control-listen "127.0.0.1:${CTL_PORT}" --identity "${CTL_IDENTITY}" --lease-namespace "${CTL_NS}"
    CTL_PID=${E2E_SPAWNED}
    e2e_wait_url 60 "the controller's /readyz" "http://127.0.0.1:${CTL_PORT}/readyz" "${CTL_PID}"
    wait_for 30 "the controller to hold the Lease ${CTL_NS}/${CTL_LEASE}" lease_held_by "${CTL_IDENTITY}"
    e2e_log "controller up (pid ${CTL_PID}, control API http://127.0.0.1:${CTL_PORT}, log ${E2E_DIR}/controller.log)"
}

lease_held_by() {
    kube_api GET "/apis/coordination.k8s.io/v1/namespaces/${CTL_NS}/leases/${CTL_LEASE}" |
        jq -e --arg id "$1" '.spec.holderIdentity == $id' >/dev/null
}

lease_released() {
    kube_api GET "/apis/coordination.k8s.io/v1/namespaces/${CTL_NS}/leases/${CTL_LEASE}" |
        jq -e '(.spec.holderIdentity // "") == ""' >/dev/null
}

# e2e_stop_controller: SIGTERM; the controller must exit 0, release its Lease, and never have been refused by the
# API server (its RBAC is enough for everything it did).
e2e_stop_controller() {
    [[ -n ${CTL_PID} ]] || return 0
    local rc=0
    e2e_stop_proc "${CTL_PID}" || rc=$?
    CTL_PID=""
    CTL_EXTRA_ARGS=()
    check "controller exited cleanly on SIGTERM (exit ${rc})" test "${rc}" = 0
    check "controller released the Lease on shutdown" lease_released
    local denied
    # kube-rs reports a refusal as `... is forbidden: User "system:serviceaccount:..." cannot ...` (reason Forbidden).
    denied="$(grep -ci 'forbidden' "${E2E_DIR}/controller.log" || true)"
    check "the API server refused the controller nothing with its RBAC (${denied} forbidden in its log)" \
        test "${denied}" = 0
}

# ---------------------------------------------------------------------------------------------------------------

# crds/ applied with server-side apply (dry run first), Established, structural, with its printer columns.
scenario_crds() {
    local name=websocketroutes.wsgate.io f code
    for f in "${E2E_ROOT}"/crds/*.yaml; do apply_yaml_file "${f}" dryRun=All; done
    if [[ ${E2E_SETUP_CRDS} == 0 ]]; then
        code="$(kube_api_status GET "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/${name}")"
        if [[ ${E2E_REUSED} == 0 ]]; then
            check "server-side dry run of crds/ stores nothing (GET -> ${code})" test "${code}" = 404
        fi
    fi
    e2e_setup_crds
    local crd
    crd="$(kube_api GET "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/${name}")"
    jq_check "CRD ${name} Established, NamesAccepted, no NonStructuralSchema" "${crd}" \
        '([.status.conditions[] | select(.status == "True") | .type] | index("Established") != null and
          index("NamesAccepted") != null) and ([.status.conditions[] | select(.type == "NonStructuralSchema")] | length == 0)'
    jq_check "served as wsgate.io/v1alpha1 WebSocketRoute (short name wsr) with a status subresource" "${crd}" \
        '.spec.versions[0].name == "v1alpha1" and .spec.names.shortNames == ["wsr"] and .spec.versions[0].subresources.status != null'
    local managed
    managed="$(jq -r '[.metadata.managedFields[] | "\(.manager)/\(.operation)"] | join(",")' <<<"${crd}")"
    check "applied server-side (managedFields: ${managed})" grep -q 'wsgate-e2e/Apply' <<<"${managed}"
    local cel
    cel="$(cat "${E2E_ROOT}"/crds/*.yaml | grep -c 'x-kubernetes-validations' || true)"
    if [[ ${cel} == 0 ]]; then
        e2e_log "note: the CRD uses no CEL rules (x-kubernetes-validations, 1.25+; 1.20's server-side apply would reject them)"
    else
        e2e_log "note: 1.20 lacks CEL (x-kubernetes-validations): ${cel} rule(s) in crds/ are not checked here"
    fi
}

# The controller as its ServiceAccount with only its RBAC: caches sync, it leads, and the RBAC is no wider than
# intended.
scenario_controller() {
    e2e_setup_crds
    e2e_setup_rbac
    local tok code
    tok="$(sa_token "${CTL_NS}" "${CTL_SA}")" || e2e_fail "TokenRequest for ${CTL_NS}/${CTL_SA}"
    code="$(KUBE_TOKEN="${tok}" kube_api_status GET /apis/wsgate.io/v1alpha1/websocketroutes)"
    check "controller ServiceAccount may list WebSocketRoutes in every namespace (${code})" test "${code}" = 200
    code="$(KUBE_TOKEN="${tok}" kube_api_status POST /apis/wsgate.io/v1alpha1/namespaces/default/websocketroutes \
        '{"apiVersion":"wsgate.io/v1alpha1","kind":"WebSocketRoute","metadata":{"name":"x"},"spec":{"backend":{"port":1}}}')"
    check "controller ServiceAccount may not create WebSocketRoutes (${code})" test "${code}" = 403
    code="$(KUBE_TOKEN="${tok}" kube_api_status POST /api/v1/namespaces/default/pods \
        '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"},"spec":{"containers":[{"name":"x","image":"x"}]}}')"
    check "controller ServiceAccount may not create pods (${code})" test "${code}" = 403
    code="$(KUBE_TOKEN="${tok}" kube_api_status PATCH /api/v1/namespaces/default/secrets/x '{}' \
        application/merge-patch+json)"
    check "controller ServiceAccount may not patch Secrets (${code})" test "${code}" = 403
    code="$(KUBE_TOKEN="${tok}" kube_api_status DELETE /api/v1/namespaces/default/services/kubernetes)"
    check "controller ServiceAccount may not delete Services (${code})" test "${code}" = 403
    code="$(KUBE_TOKEN="${tok}" kube_api_status GET /apis/coordination.k8s.io/v1/namespaces/default/leases)"
    check "controller ServiceAccount has no Lease access outside ${CTL_NS} (${code})" test "${code}" = 403

    # Wider than what the controller's code calls (pods get; services and secrets list/watch): reported, not
    # failed, since the chart's RBAC may also serve the webhook.
    local extra=() what
    for what in "/api/v1/pods:list pods" "/api/v1/namespaces/default/secrets/x:get secrets" \
        "/api/v1/namespaces/default/services/kubernetes:get services"; do
        code="$(KUBE_TOKEN="${tok}" kube_api_status GET "${what%%:*}")"
        [[ ${code} == 403 ]] || extra+=("${what#*:}")
    done
    [[ ${#extra[@]} -eq 0 ]] || e2e_log "note: the RBAC grants more than the controller's own calls need: ${extra[*]}"

    e2e_start_controller
    check "controller /healthz answers" curl -fsS -o /dev/null "http://127.0.0.1:${CTL_PORT}/healthz"
    check "controller holds the Lease ${CTL_NS}/${CTL_LEASE} as ${CTL_IDENTITY}" lease_held_by "${CTL_IDENTITY}"
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${CTL_PORT}/v1/snapshot?namespace=default&pod=x")"
    check "control API refuses a snapshot request without a token (${code})" test "${code}" = 401
}

# ingress_spec HOST SERVICE PORT: the spec of a route (no workloadSelector: ingress gateways) for HOST to a Service.
ingress_spec() {
    jq -cn --arg h "$1" --arg s "$2" --argjson p "$3" '{match: {hostnames: [$h]}, backend: {service: {name: $s, port: $p}}}'
}

# route_observed NS NAME GENERATION: the route's status.observedGeneration is GENERATION.
route_observed() {
    kube_api GET "$(route_path "$1" "$2")" | jq -e --argjson g "$3" \
        '.metadata.generation == $g and .status.observedGeneration == $g' >/dev/null
}

# Route status written by the controller (server-side apply on the status subresource), Events, references,
# conflicts.
scenario_routes() {
    e2e_start_controller
    local ns="e2e-routes${E2E_NS_SUFFIX}" r code
    ensure_namespace "${ns}"

    # A valid route to an existing Service: Accepted + ResolvedRefs at observedGeneration 1.
    create_service "${ns}" chat 8080
    # Host names carry the namespace: routes without a workloadSelector are for ingress gateways of every namespace,
    # so they would conflict with another run's (WSGATE_KUBE_E2E_API_DIR) otherwise.
    create_route "${ns}" chat "$(ingress_spec "chat.${ns}.example" chat 8080)" >/dev/null
    wait_route_cond "${ns}" chat Accepted True Accepted
    wait_route_cond "${ns}" chat ResolvedRefs True ResolvedRefs
    r="$(kube_api GET "$(route_path "${ns}" chat)")"
    check "chat: Accepted=True and ResolvedRefs=True" route_cond "${ns}" chat ResolvedRefs True ResolvedRefs
    jq_check "chat: observedGeneration 1 in status and in both conditions" "${r}" \
        '.metadata.generation == 1 and .status.observedGeneration == 1 and ([.status.conditions[].observedGeneration] == [1, 1])'
    jq_check "chat: status.backend $(jq -c .status.backend <<<"${r}")" "${r}" \
        ".status.backend == \"http://chat.${ns}.svc:8080\""
    # 1.20's managedFields have no `subresource` field (1.22+): the status owner shows as manager `wsgate`,
    # operation Apply, owning f:status.
    jq_check "chat: status written by server-side apply as field manager wsgate" "${r}" \
        '[.metadata.managedFields[] | select(.manager == "wsgate" and .operation == "Apply" and
          (.fieldsV1 | has("f:status")))] | length == 1'
    e2e_log "note: 1.20 managedFields have no 'subresource' field (1.22+); the status owner is the entry owning f:status"

    # A spec change bumps generation; the status follows.
    kube_api PATCH "$(route_path "${ns}" chat)" '{"spec":{"match":{"pathPrefixes":["/chat"]}}}' \
        application/merge-patch+json >/dev/null || e2e_fail "patch route chat"
    wait_for 30 "chat at observedGeneration 2" route_observed "${ns}" chat 2
    check "chat: spec edit -> generation 2 -> observedGeneration 2" route_observed "${ns}" chat 2

    # Passes the CRD schema, fails the controller's validation: Accepted=False Invalid, and a Warning Event.
    create_route "${ns}" both '{"backend":{"url":"http://a:1","port":8080}}' >/dev/null
    wait_route_cond "${ns}" both Accepted False Invalid
    r="$(kube_api GET "$(route_path "${ns}" both)")"
    jq_check "both: Accepted=False Invalid: $(jq -r '.status.conditions[] | select(.type == "Accepted") | .message' <<<"${r}")" \
        "${r}" '.status.conditions[] | select(.type == "Accepted") |
            .message == "spec.backend: exactly one of url, service or port may be set"'
    jq_check "both: ResolvedRefs=Unknown until the spec is valid" "${r}" \
        '.status.conditions[] | select(.type == "ResolvedRefs") | .status == "Unknown"'
    wait_for 30 "a Warning Event Invalid for both" route_event "${ns}" both Invalid
    check "both: Warning Event Invalid (events.k8s.io/v1, reportingController wsgate-controller)" \
        route_event "${ns}" both Invalid

    # What the schema itself refuses never reaches the controller.
    code="$(kube_api_status POST "$(route_path "${ns}")" "$(jq -cn --arg ns "${ns}" '{apiVersion: "wsgate.io/v1alpha1",
        kind: "WebSocketRoute", metadata: {name: "bad", namespace: $ns},
        spec: {backend: {port: 70000}, limits: {maxMessageBytes: 0}}}')")"
    check "schema violations (port 70000, maxMessageBytes 0) refused by the API server with 422 (got ${code})" \
        test "${code}" = 422

    # A missing Service: ResolvedRefs=False BackendNotFound (+ Event), then True once it exists.
    create_route "${ns}" late "$(ingress_spec "late.${ns}.example" late-svc 9000)" >/dev/null
    wait_route_cond "${ns}" late ResolvedRefs False BackendNotFound
    r="$(kube_api GET "$(route_path "${ns}" late)")"
    jq_check "late: ResolvedRefs=False BackendNotFound \"Service ${ns}/late-svc not found\", still Accepted" "${r}" \
        "([.status.conditions[] | select(.type == \"ResolvedRefs\") | .message] == [\"Service ${ns}/late-svc not found\"])
         and ([.status.conditions[] | select(.type == \"Accepted\") | .status] == [\"True\"])"
    wait_for 30 "a Warning Event BackendNotFound for late" route_event "${ns}" late BackendNotFound
    check "late: Warning Event BackendNotFound" route_event "${ns}" late BackendNotFound
    create_service "${ns}" late-svc 9000
    wait_route_cond "${ns}" late ResolvedRefs True ResolvedRefs
    check "late: ResolvedRefs=True once Service ${ns}/late-svc exists" route_cond "${ns}" late ResolvedRefs True ResolvedRefs

    # Conflict: same host and path for the same (ingress) gateways; the newer route loses, whatever its name.
    local spec
    spec="$(jq -cn --arg h "dup.${ns}.example" '{match: {hostnames: [$h], pathPrefixes: ["/ws"]}, backend: {url: "http://a:1"}}')"
    local zeta alpha
    zeta="$(create_route "${ns}" zeta "${spec}")"
    wait_route_cond "${ns}" zeta Accepted True Accepted
    # creationTimestamp has whole seconds: let the next second begin so alpha is strictly newer.
    local created_at
    created_at="$(date -d "$(jq -r .metadata.creationTimestamp <<<"${zeta}")" +%s)"
    while (($(date +%s) <= created_at)); do sleep 0.1; done
    alpha="$(create_route "${ns}" alpha "${spec}")"
    check "alpha created after zeta ($(jq -r .metadata.creationTimestamp <<<"${zeta}") < $(jq -r .metadata.creationTimestamp <<<"${alpha}"))" \
        test "$(jq -r .metadata.creationTimestamp <<<"${zeta}")" '<' "$(jq -r .metadata.creationTimestamp <<<"${alpha}")"
    wait_route_cond "${ns}" alpha Accepted False Conflicted
    r="$(kube_api GET "$(route_path "${ns}" alpha)")"
    jq_check "alpha (newer): Accepted=False Conflicted: $(jq -r '.status.conditions[] | select(.type == "Accepted") | .message' <<<"${r}")" \
        "${r}" ".status.conditions[] | select(.type == \"Accepted\") | .message | contains(\"older route ${ns}/zeta\")"
    check "zeta (older): still Accepted=True" route_cond "${ns}" zeta Accepted True Accepted
    wait_for 30 "a Warning Event Conflicted for alpha" route_event "${ns}" alpha Conflicted
    check "alpha: Warning Event Conflicted" route_event "${ns}" alpha Conflicted
    kube_api DELETE "$(route_path "${ns}" zeta)" >/dev/null || e2e_fail "delete zeta"
    wait_route_cond "${ns}" alpha Accepted True Accepted
    check "alpha: Accepted=True once zeta is deleted" route_cond "${ns}" alpha Accepted True Accepted

    if [[ -n ${KUBECTL_BIN} ]]; then
        local out
        # A fresh discovery cache: kubectl keys it by host:port, and an earlier run (or scenario) may have cached
        # this server's resources before the CRD existed.
        out="$(kubectl_e2e --cache-dir "${E2E_DIR}/kubectl-cache-routes" get wsr -n "${ns}")" || e2e_fail "kubectl get wsr"
        printf '%s\n' "${out}" | sed 's/^/    /' >&2
        check "kubectl get wsr shows the printer columns (HOSTS BACKEND ACCEPTED GATEWAYS AGE)" \
            grep -qE '^NAME +HOSTS +BACKEND +ACCEPTED +GATEWAYS +AGE' <<<"${out}"
    fi
}

# e2e_ws_client: writes $E2E_DIR/ws_echo.py, a minimal RFC 6455 client (standard library only):
#   ws_echo.py HOST PORT PATH MESSAGE   handshake, one masked text frame, expects the same text back, closes.
e2e_ws_client() {
    [[ -f ${E2E_DIR}/ws_echo.py ]] && return 0
    cat >"${E2E_DIR}/ws_echo.py" <<'PY'
import base64, hashlib, os, socket, struct, sys

host, port, path, text = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
sock = socket.create_connection((host, port), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
sock.sendall((
    "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, host, port, key)).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = sock.recv(4096)
    if not chunk:
        sys.exit("connection closed during the handshake: %r" % buf)
    buf += chunk
head, _, buf = buf.partition(b"\r\n\r\n")
lines = head.decode("latin-1").split("\r\n")
if lines[0].split(" ")[1:2] != ["101"]:
    sys.exit("handshake refused: %s" % lines[0])
accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
if headers.get("sec-websocket-accept") != accept:
    sys.exit("bad Sec-WebSocket-Accept: %r" % headers.get("sec-websocket-accept"))

def send(opcode, payload):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

def read(n):
    global buf
    while len(buf) < n:
        chunk = sock.recv(4096)
        if not chunk:
            sys.exit("connection closed while reading a frame")
        buf += chunk
    out, buf = buf[:n], buf[n:]
    return out

send(0x1, text)
while True:
    b0, b1 = read(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read(8))[0]
    payload = read(n)
    opcode = b0 & 0x0F
    if opcode == 0x9:
        send(0xA, payload)
        continue
    if opcode == 0x8:
        sys.exit("closed by the server: %r" % payload)
    if opcode != 0x1 or payload != text:
        sys.exit("expected text %r, got opcode %d %r" % (text, opcode, payload))
    break
send(0x8, struct.pack("!H", 1000))
print("echo: %s" % payload.decode())
PY
}

# ws_echo PORT PATH MESSAGE: a WebSocket round trip through the gateway on 127.0.0.1:PORT; prints "echo: MESSAGE".
ws_echo() {
    "${E2E_PYTHON}" "${E2E_DIR}/ws_echo.py" 127.0.0.1 "$1" "$2" "$3"
}

# ws_echo_ok PORT PATH MESSAGE: ws_echo, quietly.
ws_echo_ok() { ws_echo "$@" >/dev/null; }

# snapshot_code PORT NS POD TOKEN: the control API's HTTP status for the pod's snapshot with this bearer token.
snapshot_code() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 40 ${4:+-H "Authorization: Bearer $4"} \
        "http://127.0.0.1:$1/v1/snapshot?namespace=$2&pod=$3"
}

# e2e_start_echo_backend: examples/echo_backend.py on a free port (it prints the port on its first line); sets
# E2E_BACKEND_PID and E2E_BACKEND_PORT.
e2e_start_echo_backend() {
    local log="${E2E_DIR}/echo-backend.log" lines=0
    [[ -f ${log} ]] && lines=$(wc -l <"${log}")
    e2e_spawn echo-backend "${E2E_PYTHON}" -u "${E2E_ROOT}/examples/echo_backend.py" --port 0
    E2E_BACKEND_PID=${E2E_SPAWNED}
    wait_for 20 "the echo backend's port" bash -c "tail -n +$((lines + 1)) '${log}' | grep -q 'listening on'"
    E2E_BACKEND_PORT="$(tail -n +$((lines + 1)) "${log}" | sed -n 's/^echo backend listening on .*:\([0-9]*\)$/\1/p')"
    [[ -n ${E2E_BACKEND_PORT} ]] || e2e_fail "echo backend printed no port"
    e2e_alive "${E2E_BACKEND_PID}" || e2e_fail "echo backend exited"
}

# End to end: a (stored, never run) gateway pod with a bound token, the real `wsgate gateway` binary polling the
# controller as that pod, a real echo backend, a WebSocket client; then the controller goes away and traffic
# keeps flowing.
scenario_gateway() {
    e2e_start_controller
    e2e_ws_client
    local ns="e2e-gw${E2E_NS_SUFFIX}"
    ensure_namespace "${ns}"
    ensure_service_account "${ns}" gateway
    local p
    for p in 'gw-0 {"app":"echo","wsgate.io/e2e":"gateway"}' 'gw-1 {"app":"other"}'; do
        kube_api POST "/api/v1/namespaces/${ns}/pods" "$(jq -cn --arg ns "${ns}" --arg n "${p%% *}" \
            --argjson l "${p#* }" '{apiVersion: "v1", kind: "Pod", metadata: {name: $n, namespace: $ns, labels: $l},
            spec: {serviceAccountName: "gateway", containers: [{name: "gateway", image: "example.invalid/wsgate"}]}}')" \
            >/dev/null || e2e_fail "create pod ${ns}/${p%% *}"
    done
    e2e_log "pods ${ns}/gw-0 (app=echo) and gw-1 (app=other) stored (no kubelet runs them)"

    e2e_start_echo_backend
    local backend_pid=${E2E_BACKEND_PID} backend_port=${E2E_BACKEND_PORT}

    create_route "${ns}" echo "$(jq -cn --arg u "http://127.0.0.1:${backend_port}" \
        '{match: {pathPrefixes: ["/echo"]}, backend: {url: $u}, workloadSelector: {app: "echo"}}')" >/dev/null
    wait_route_cond "${ns}" echo Accepted True Accepted

    # The gateway's token: bound to pod gw-0, audience wsgate-control (what a projected volume holds).
    local token_file="${E2E_DIR}/gw-0.token" token
    token="$(pod_token "${ns}" gateway gw-0 wsgate-control)" || e2e_fail "TokenRequest bound to ${ns}/gw-0"
    (umask 077 && printf '%s\n' "${token}" >"${token_file}")
    local review
    review="$(kube_api POST /apis/authentication.k8s.io/v1/tokenreviews "$(jq -cn --arg t "${token}" \
        '{apiVersion: "authentication.k8s.io/v1", kind: "TokenReview", spec: {token: $t, audiences: ["wsgate-control"]}}')")" ||
        e2e_fail "TokenReview"
    jq_check "TokenReview: system:serviceaccount:${ns}:gateway with pod-name gw-0 in extra (bound token, 1.20)" \
        "${review}" ".status.authenticated == true and .status.user.username == \"system:serviceaccount:${ns}:gateway\"
            and .status.user.extra[\"authentication.kubernetes.io/pod-name\"] == [\"gw-0\"]"

    local gw_port admin_port
    gw_port="$(e2e_free_port)"
    admin_port="$(e2e_free_port)"
    e2e_wsgate_bin
    e2e_spawn gateway env POD_NAMESPACE="${ns}" POD_NAME=gw-0 NO_COLOR=1 \
        "${WSGATE_BIN}" gateway --listen "127.0.0.1:${gw_port}" --admin-listen "127.0.0.1:${admin_port}" \
        --control-url "http://127.0.0.1:${CTL_PORT}" --control-token-file "${token_file}"
    local gw_pid=${E2E_SPAWNED}
    e2e_wait_url 30 "the gateway's /readyz" "http://127.0.0.1:${admin_port}/readyz" "${gw_pid}"
    check "gateway /readyz 200: $(curl -fsS "http://127.0.0.1:${admin_port}/readyz")" \
        curl -fsS -o /dev/null "http://127.0.0.1:${admin_port}/readyz"
    wait_for 30 "a WebSocket echo through the gateway" ws_echo "${gw_port}" /echo "hello through wsgate"
    check "WebSocket client -> gateway -> echo backend: $(ws_echo "${gw_port}" /echo "hello through wsgate")" \
        ws_echo_ok "${gw_port}" /echo "hello through wsgate"
    wait_for 30 "route echo to count 1 gateway" jq_holds_route "${ns}" echo '.status.gateways == 1'
    check "route echo: status.gateways = 1" jq_holds_route "${ns}" echo '.status.gateways == 1'

    # The control API's authentication against the real TokenReview.
    local code other
    code="$(snapshot_code "${CTL_PORT}" "${ns}" gw-1 "${token}")"
    check "control API: gw-0's token asking for gw-1's snapshot -> 403 (got ${code})" test "${code}" = 403
    other="$(pod_token "${ns}" gateway gw-0 https://kubernetes.default.svc)" || e2e_fail "TokenRequest"
    code="$(snapshot_code "${CTL_PORT}" "${ns}" gw-0 "${other}")"
    check "control API: a token for the API server's audience -> 401 (got ${code})" test "${code}" = 401
    other="$(pod_token "${ns}" gateway gw-1 wsgate-control)" || e2e_fail "TokenRequest"
    local snap
    snap="$(curl -fsS --max-time 40 -H "Authorization: Bearer ${other}" \
        "http://127.0.0.1:${CTL_PORT}/v1/snapshot?namespace=${ns}&pod=gw-1")" || e2e_fail "snapshot for gw-1"
    jq_check "control API: gw-1 (app=other) is not selected: its snapshot has no routes" "${snap}" '.routes == []'

    # The controller goes away: the gateway keeps its last snapshot and keeps serving.
    e2e_stop_controller
    check "controller stopped: gateway /readyz still 200" curl -fsS -o /dev/null "http://127.0.0.1:${admin_port}/readyz"
    check "controller stopped: WebSocket echo still works ($(ws_echo "${gw_port}" /echo "still here"))" \
        ws_echo_ok "${gw_port}" /echo "still here"
    local rc=0
    e2e_stop_proc "${gw_pid}" || rc=$?
    check "gateway exited cleanly on SIGTERM (exit ${rc})" test "${rc}" = 0
    e2e_stop_proc "${backend_pid}" || true
}

# jq_holds_get PATH FILTER: GET PATH as admin and `jq -e FILTER` holds.
jq_holds_get() {
    kube_api GET "$1" | jq -e "$2" >/dev/null
}

# jq_holds_route NS NAME FILTER
jq_holds_route() {
    kube_api GET "$(route_path "$1" "$2")" | jq -e "$3" >/dev/null
}

# e2e_render_chart OUT [HELM ARGS...]: renders charts/wsgate for this server (--kube-version 1.20.2, release wsgate in
# CTL_NS) into OUT, without the objects whose API group this server does not serve (cert-manager, Prometheus
# Operator: their CRDs are not installed here); prints how many objects it kept, and logs the dropped kinds.
e2e_render_chart() {
    local out=$1 helm groups
    shift
    helm="$(e2e_helm)" || e2e_fail "no helm: set WSGATE_HELM or see scripts/check-chart.sh"
    "${helm}" template wsgate "${E2E_ROOT}/charts/wsgate" --namespace "${CTL_NS}" --kube-version 1.20.2 "$@" \
        >"${out}.all" 2>"${E2E_DIR}/helm.log" || { cat "${E2E_DIR}/helm.log" >&2; e2e_fail "helm template $*"; }
    groups="$(kube_api GET /apis | jq -c '[.groups[].versions[].groupVersion] + ["v1"]')" || e2e_fail "discovery"
    "${E2E_PYTHON}" - "${out}.all" "${out}" "${groups}" <<'PY'
import json, sys, yaml
served = set(json.loads(sys.argv[3]))
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kept = [d for d in docs if d["apiVersion"] in served]
dropped = sorted({"%s %s" % (d["kind"], d["apiVersion"]) for d in docs if d["apiVersion"] not in served})
yaml.safe_dump_all(kept, open(sys.argv[2], "w"))
if dropped:
    print("not served here, left out: " + ", ".join(dropped), file=sys.stderr)
print(len(kept))
PY
}

# The Helm chart on 1.20: rendered with 1.20's capabilities (policy/v1beta1 PodDisruptionBudget, autoscaling/v2beta2
# HorizontalPodAutoscaler), accepted by a server-side dry run with the default and the chart's CI values, then
# installed for real. No controller-manager or kubelet: the Deployment is stored and makes no pods, so the
# injection webhook it registers is not served by it (failurePolicy Ignore; pods in labelled namespaces are
# created without a sidecar). The webhook against a running controller is the `webhook` scenario's.
scenario_chart() {
    if [[ ! -f ${E2E_ROOT}/charts/wsgate/Chart.yaml ]]; then
        E2E_SKIP_REASON="no charts/wsgate"
        return 0
    fi
    e2e_setup_crds
    e2e_setup_rbac
    local values name out n
    for values in "" "${E2E_ROOT}"/charts/wsgate/ci/*.yaml; do
        name=${values##*/}
        name=${name%.yaml}
        out="${E2E_DIR}/chart-dry-${name:-default}.yaml"
        n="$(e2e_render_chart "${out}" ${values:+-f "${values}"})"
        # apply_yaml_file fails the tier on the first object the server refuses.
        apply_yaml_file "${out}" dryRun=All
        check "chart (${name:-default} values): server-side dry run accepts all ${n} objects of served kinds" \
            test "${n}" -gt 0
    done
    check "chart renders a policy/v1beta1 PodDisruptionBudget for 1.20 (policy/v1 is 1.21+)" \
        grep -q '^apiVersion: policy/v1beta1' "${E2E_DIR}/chart-dry-default.yaml"
    e2e_install_chart
    local deploy svc hook
    deploy="$(kube_api GET "/apis/apps/v1/namespaces/${CTL_NS}/deployments/wsgate-controller")" ||
        e2e_fail "controller Deployment not stored"
    jq_check "controller Deployment stored, runs as ServiceAccount ${CTL_SA} (no pods: no controller-manager)" \
        "${deploy}" ".spec.template.spec.serviceAccountName == \"${CTL_SA}\""
    svc="$(kube_api GET "/api/v1/namespaces/${CTL_NS}/services/wsgate-controller")" || e2e_fail "controller Service"
    jq_check "controller Service got a loopback cluster IP ($(jq -r .spec.clusterIP <<<"${svc}"))" "${svc}" \
        '.spec.clusterIP | startswith("127.")'
    hook="$(kube_api GET /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wsgate-injector)" ||
        e2e_fail "MutatingWebhookConfiguration wsgate-injector not stored"
    jq_check "MutatingWebhookConfiguration wsgate-injector stored: $(jq -c '[.webhooks[] | "\(.name) \(.failurePolicy)"]' <<<"${hook}")" \
        "${hook}" '[.webhooks[].failurePolicy] | all(. == "Ignore")'
}

# e2e_install_chart: the chart rendered for 1.20 with default values, installed (server-side apply), once.
E2E_CHART_INSTALLED=0
e2e_install_chart() {
    [[ ${E2E_CHART_INSTALLED} == 0 ]] || return 0
    e2e_setup_crds
    e2e_setup_rbac
    e2e_render_chart "${E2E_DIR}/chart-default.yaml" >/dev/null
    apply_yaml_file "${E2E_DIR}/chart-default.yaml"
    E2E_CHART_INSTALLED=1
}

# pod_json NS NAME LABELS_JSON ANNOTATIONS_JSON: a one-container pod with ServiceAccount default.
pod_json() {
    jq -cn --arg ns "$1" --arg n "$2" --argjson l "$3" --argjson a "$4" '{apiVersion: "v1", kind: "Pod",
        metadata: {name: $n, namespace: $ns, labels: $l, annotations: $a},
        spec: {containers: [{name: "app", image: "example.invalid/app", ports: [{containerPort: 3000}]}]}}'
}

# webhook_ca_patched: every webhook of wsgate-injector has a caBundle.
webhook_ca_patched() {
    kube_api GET /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wsgate-injector |
        jq -e '[.webhooks[].clientConfig.caBundle // ""] | all(length > 0)' >/dev/null
}

# The sidecar-injection webhook as the chart installs it: the chart's MutatingWebhookConfiguration (clientConfig
# names the Service wsgate-controller, port 443), the controller with the chart's webhook flags and RBAC. The API
# server dials the Service's cluster IP (a 127.96.x.y address here, see "Network"), so the controller's webhook
# listens there on port 443; its serving certificate is the one the controller generates into its Secret for
# wsgate-controller.wsgate-system.svc, and it patches the caBundle itself. 1.20 has no native sidecars: the
# webhook asks the server's version and injects a regular container.
scenario_webhook() {
    e2e_wsgate_bin
    if ! "${WSGATE_BIN}" controller --help 2>/dev/null | grep -q -- '--webhook'; then
        E2E_SKIP_REASON="this wsgate binary has no 'controller --webhook'"
        e2e_log "note: ${E2E_SKIP_REASON}: webhook scenario not run"
        return 0
    fi
    if [[ ! -f ${E2E_ROOT}/charts/wsgate/Chart.yaml || ${WSGATE_KUBE_E2E_RBAC:-chart} == minimal ]]; then
        E2E_SKIP_REASON="needs charts/wsgate and its RBAC"
        return 0
    fi
    e2e_install_chart
    [[ ${#CTL_WEBHOOK_ARGS[@]} -gt 0 ]] || e2e_fail "the chart passes no --webhook flags to the controller"
    local ip hook="/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/wsgate-injector"
    ip="$(kube_api GET "/api/v1/namespaces/${CTL_NS}/services/wsgate-controller" | jq -er .spec.clusterIP)" ||
        e2e_fail "no cluster IP for ${CTL_NS}/wsgate-controller"
    e2e_start_controller "${CTL_WEBHOOK_ARGS[@]}" "--webhook-listen=${ip}:443"
    wait_for 60 "the controller to patch the caBundle of wsgate-injector" webhook_ca_patched
    check "controller generated its serving certificate into Secret ${CTL_NS}/wsgate-webhook-cert" \
        jq_holds_get "/api/v1/namespaces/${CTL_NS}/secrets/wsgate-webhook-cert" '.data["tls.crt"] | length > 0'
    check "controller patched the caBundle of every webhook of wsgate-injector" webhook_ca_patched
    local ca="${E2E_DIR}/webhook-ca.pem" code
    kube_api GET "${hook}" | jq -r '.webhooks[0].clientConfig.caBundle' | base64 -d >"${ca}" ||
        e2e_fail "cannot read the caBundle"
    code="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 --cacert "${ca}" \
        --resolve "wsgate-controller.${CTL_NS}.svc:443:${ip}" "https://wsgate-controller.${CTL_NS}.svc/inject")" || code=000
    check "webhook serves https://wsgate-controller.${CTL_NS}.svc on ${ip}:443 with a certificate the caBundle verifies (HTTP ${code})" \
        test "${code}" != 000

    local on="e2e-inject${E2E_NS_SUFFIX}" off="e2e-plain${E2E_NS_SUFFIX}" pod containers out
    ensure_namespace "${on}" '{"wsgate.io/inject":"enabled"}'
    ensure_namespace "${off}"
    ensure_service_account "${on}" default

    # Without wsgate.io/target-port the sidecar gets its routes from the control API: --control-url, and a projected
    # token for the control API's audience.
    pod="$(kube_api POST "/api/v1/namespaces/${on}/pods" "$(pod_json "${on}" app-0 '{"app":"chat"}' '{}')")" ||
        e2e_fail "create pod ${on}/app-0"
    containers="$(jq -c '[.spec.containers[].name]' <<<"${pod}")"
    jq_check "pod in a namespace labelled wsgate.io/inject=enabled gets the sidecar (containers ${containers})" \
        "${pod}" '[.spec.containers[].name] == ["app", "wsgate-gateway"]'
    jq_check "1.20: injected as a regular container (no init container with restartPolicy Always)" "${pod}" \
        '[.spec.initContainers[]? | select(.name == "wsgate-gateway")] | length == 0'
    local url
    url="$(printf '%s\n' "${CTL_WEBHOOK_ARGS[@]}" | sed -n 's/^--inject-control-url=//p')"
    jq_check "sidecar runs 'gateway --control-url ${url}' with POD_NAMESPACE/POD_NAME from the downward API" "${pod}" \
        ".spec.containers[] | select(.name == \"wsgate-gateway\") | (.args | index(\"--control-url\")) != null and
            (.args | index(\"${url}\")) != null and ([.env[]?.name] | index(\"POD_NAMESPACE\") != null and index(\"POD_NAME\") != null)"
    jq_check "sidecar mounts a projected ServiceAccount token with audience wsgate-control" "${pod}" \
        '([.spec.volumes[] | select(.name == "wsgate-control-token") | .projected.sources[].serviceAccountToken.audience]
            == ["wsgate-control"]) and ([.spec.containers[] | select(.name == "wsgate-gateway") | .volumeMounts[]?.name]
            | index("wsgate-control-token") != null)'

    # Idempotent: a pod that already carries the sidecar (app-0's stored spec under a new name) is not injected again.
    local again
    again="$(jq -c '{apiVersion, kind, metadata: {name: "app-again", namespace: .metadata.namespace,
        labels: .metadata.labels, annotations: .metadata.annotations}, spec: (.spec | del(.nodeName))}' <<<"${pod}")"
    again="$(kube_api POST "/api/v1/namespaces/${on}/pods" "${again}")" || e2e_fail "create pod ${on}/app-again"
    jq_check "an already injected pod is left as it is (containers $(jq -c '[.spec.containers[].name]' <<<"${again}"))" \
        "${again}" '[.spec.containers[].name] == ["app", "wsgate-gateway"] and
            ([.spec.volumes[].name] | map(select(. == "wsgate-control-token")) | length == 1)'

    # Emulated kubelet: the injected container's own command line, with its listeners on loopback ports, the
    # control URL pointing at this controller and the token that its projected volume would hold, serves a route
    # selecting app=chat, end to end to the echo backend.
    e2e_ws_client
    e2e_start_echo_backend
    local backend_pid=${E2E_BACKEND_PID}
    create_route "${on}" chat "$(jq -cn --arg u "http://127.0.0.1:${E2E_BACKEND_PORT}" \
        '{match: {pathPrefixes: ["/chat"]}, backend: {url: $u}, workloadSelector: {app: "chat"}}')" >/dev/null
    local side gw_port admin_port token_file="${E2E_DIR}/app-0.token" mount audience
    side="$(jq -c '.spec.containers[] | select(.name == "wsgate-gateway")' <<<"${pod}")"
    mount="$(jq -r '.volumeMounts[] | select(.name == "wsgate-control-token") | .mountPath' <<<"${side}")"
    check "token mounted at ${mount}/token, the gateway's default --control-token-file" \
        bash -c "'${WSGATE_BIN}' gateway --help | grep -q -- '${mount}/token'"
    audience="$(jq -r '.spec.volumes[] | select(.name == "wsgate-control-token") | .projected.sources[0].serviceAccountToken.audience' <<<"${pod}")"
    (umask 077 && pod_token "${on}" default app-0 "${audience}" >"${token_file}") || e2e_fail "TokenRequest for ${on}/app-0"
    gw_port="$(e2e_free_port)"
    admin_port="$(e2e_free_port)"
    local args=() a
    mapfile -t args < <(jq -r '.args[]' <<<"${side}")
    for a in "${!args[@]}"; do
        case ${args[a]} in
        --listen) args[a + 1]="127.0.0.1:${gw_port}" ;;
        --admin-listen) args[a + 1]="127.0.0.1:${admin_port}" ;;
        --control-url) args[a + 1]="http://127.0.0.1:${CTL_PORT}" ;;
        --listen=* | --admin-listen=* | --control-url=*) e2e_fail "unexpected injected argument form: ${args[a]}" ;;
        esac
    done
    e2e_log "sidecar command line as injected: $(jq -r '.args | join(" ")' <<<"${side}")"
    e2e_spawn sidecar env POD_NAMESPACE="${on}" POD_NAME=app-0 NO_COLOR=1 \
        "${WSGATE_BIN}" "${args[@]}" --control-token-file "${token_file}"
    local side_pid=${E2E_SPAWNED}
    e2e_wait_url 30 "the emulated sidecar's /readyz" "http://127.0.0.1:${admin_port}/readyz" "${side_pid}"
    wait_for 30 "a WebSocket echo through the emulated sidecar" ws_echo "${gw_port}" /chat "hello sidecar"
    check "emulated sidecar (injected args): WebSocket client -> sidecar -> echo backend" \
        ws_echo_ok "${gw_port}" /chat "hello sidecar"
    e2e_stop_proc "${side_pid}" || true
    e2e_stop_proc "${backend_pid}" || true

    pod="$(kube_api POST "/api/v1/namespaces/${on}/pods" "$(pod_json "${on}" app-out \
        '{"wsgate.io/inject":"disabled"}' '{}')")" || e2e_fail "create pod ${on}/app-out"
    jq_check "pod labelled wsgate.io/inject=disabled in that namespace is untouched" "${pod}" \
        '[.spec.containers[].name] == ["app"]'
    ensure_service_account "${off}" default
    pod="$(kube_api POST "/api/v1/namespaces/${off}/pods" "$(pod_json "${off}" plain-0 '{}' '{}')")" ||
        e2e_fail "create pod ${off}/plain-0"
    jq_check "pod in an unlabelled namespace is untouched" "${pod}" '[.spec.containers[].name] == ["app"]'
    pod="$(kube_api POST "/api/v1/namespaces/${off}/pods" "$(pod_json "${off}" opt-in '{"wsgate.io/inject":"enabled"}' \
        '{"wsgate.io/target-port":"3000"}')")" || e2e_fail "create pod ${off}/opt-in"
    jq_check "pod labelled wsgate.io/inject=enabled in an unlabelled namespace gets the sidecar; with wsgate.io/target-port it proxies to 127.0.0.1:3000" \
        "${pod}" '([.spec.containers[].name] == ["app", "wsgate-gateway"]) and
            (.spec.containers[1].args | index("http://127.0.0.1:3000") != null)'

    # 1.20 has no kubernetes.io/metadata.name namespace label (1.21+), so the chart's NotIn on it cannot keep the
    # API server from calling the webhook for the excluded namespaces: the webhook's own list must.
    e2e_log "note: 1.20 namespaces have no kubernetes.io/metadata.name label (1.21+): the webhook's own exclusion list is what protects ${CTL_NS}"
    pod="$(kube_api POST "/api/v1/namespaces/${CTL_NS}/pods" "$(pod_json "${CTL_NS}" excluded-0 \
        '{"wsgate.io/inject":"enabled"}' '{}')")" || e2e_fail "create pod ${CTL_NS}/excluded-0"
    jq_check "pod labelled wsgate.io/inject=enabled in the excluded namespace ${CTL_NS} is untouched" "${pod}" \
        '[.spec.containers[].name] == ["app"]'
    out="$(mktemp)"
    code="$(kube_api_raw "${out}" POST "/api/v1/namespaces/${on}/pods" "$(pod_json "${on}" bad-0 '{}' \
        '{"wsgate.io/port":"http"}')")" || code=000
    check "bad annotation: the pod is refused (HTTP ${code}): $(jq -r .message "${out}" 2>/dev/null | head -c 300)" \
        bash -c "[[ ${code} == 4?? ]] && jq -e '.message | contains(\"wsgate.io/port\")' '${out}' >/dev/null"
    code="$(kube_api_raw "${out}" POST "/api/v1/namespaces/${on}/pods" "$(pod_json "${on}" native-0 '{}' \
        '{"wsgate.io/sidecar-mode":"native","wsgate.io/target-port":"3000"}')")" || code=000
    check "1.20: a pod asking for a native sidecar is refused (HTTP ${code}): $(jq -r .message "${out}" 2>/dev/null | head -c 300)" \
        bash -c "[[ ${code} == 4?? ]]"
    rm -f "${out}"
    e2e_stop_controller
}

# rust_namespaces: how many namespaces tests/kube_real.rs has created (rt-TEST-XXXXXX).
rust_namespaces() {
    kube_api GET /api/v1/namespaces | jq '[.items[].metadata.name | select(startswith("rt-"))] | length'
}

# The Rust scenarios of tests/controller.rs, run by tests/kube_real.rs against this server; the controllers there
# run in-process with the controller's ServiceAccount kubeconfig (its RBAC only). The binary controller is
# stopped first (it would lead and write the tests' statuses) and the tests delete every WebSocketRoute.
scenario_rust() {
    e2e_setup_crds
    e2e_setup_rbac
    e2e_stop_controller
    local log="${E2E_DIR}/cargo-test-kube_real.log" rc=0 t0=${SECONDS} before
    before="$(rust_namespaces)"
    (cd "${E2E_ROOT}" && WSGATE_KUBE_E2E=1 WSGATE_KUBE_E2E_KUBECONFIG="${KUBECONFIG_FILE}" \
        WSGATE_KUBE_E2E_CONTROLLER_KUBECONFIG="${CTL_KUBECONFIG}" NO_COLOR=1 \
        cargo test --test kube_real -- --test-threads=1) >"${log}" 2>&1 || rc=$?
    # The test names, not cargo's summary line: the main test run's summary is the one CI reads.
    local t n=0
    while read -r t; do
        e2e_log "  tests/kube_real.rs: ${t}"
        n=$((n + 1))
    done < <(sed -n 's/^test \([a-z_0-9]*\) \.\.\. \(.*\)$/\1: \2/p' "${log}")
    if [[ ${rc} -ne 0 ]] || grep -q '^test .* FAILED$' "${log}"; then
        # Not cargo's "test result:" line (see above).
        sed -n '/^failures:$/,$p' "${log}" | grep -v '^test result:' | head -n 80 >&2
        e2e_fail "cargo test --test kube_real failed (exit ${rc}, log ${log})"
    fi
    check "tests/kube_real.rs: ${n} controller scenario test(s) ok against kube-apiserver 1.20.2 ($((SECONDS - t0))s)" \
        test "${n}" -gt 0
    local after
    after="$(rust_namespaces)"
    check "each test worked in its own namespace on this server (${before} -> ${after} rt-* namespaces)" \
        test "$((after - before))" = "${n}"
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
    # A command failing under `set -e` says where (functions and subshells too: errtrace).
    set -E
    trap 'e2e_log "FAIL: exit $? at ${BASH_SOURCE[0]##*/}:${LINENO}: ${BASH_COMMAND}"' ERR
    # The servers run in their own sessions: turn signals into an exit so that the EXIT trap stops them.
    trap 'exit 130' INT
    trap 'exit 143' TERM
    e2e_start
    [[ ${E2E_REUSED} == 0 ]] || E2E_NS_SUFFIX="-$(date +%H%M%S)"
    e2e_log "API server up after $((SECONDS - t0))s"
    local t1 c1
    E2E_SELECTED=("${selected[@]}")
    for s in "${selected[@]}"; do
        t1=${SECONDS} c1=${E2E_CHECKS}
        E2E_CURRENT=${s}
        e2e_log "scenario ${s}"
        E2E_SKIP_REASON=""
        "scenario_${s}"
        if [[ -n ${E2E_SKIP_REASON} ]]; then
            E2E_SUMMARY+=("${s}: skipped (${E2E_SKIP_REASON})")
            e2e_log "scenario ${s} skipped"
            continue
        fi
        E2E_SUMMARY+=("${s}: ok ($((E2E_CHECKS - c1)) checks, $((SECONDS - t1))s)")
        e2e_log "scenario ${s} ok ($((SECONDS - t1))s)"
    done
    E2E_CURRENT=""
    e2e_log "all ${#selected[@]} scenario(s) ok, ${E2E_CHECKS} checks, $((SECONDS - t0))s"
}

# e2e_summary RC: one line per selected scenario: ok, FAILED or not run.
e2e_summary() {
    [[ ${#E2E_SELECTED[@]} -gt 0 ]] || return 0
    local line s i=0
    for s in "${E2E_SELECTED[@]}"; do
        if ((i < ${#E2E_SUMMARY[@]})); then
            line=${E2E_SUMMARY[i]}
        elif [[ ${s} == "${E2E_CURRENT}" && $1 -ne 0 ]]; then
            line="${s}: FAILED"
        else
            line="${s}: not run"
        fi
        printf '[kube-e2e] scenario %s\n' "${line}" >&2
        i=$((i + 1))
    done
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    e2e_main "$@"
fi
