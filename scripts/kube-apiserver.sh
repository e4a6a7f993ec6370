#!/usr/bin/env bash
# Real Kubernetes API server for the end-to-end tier (docs/KUBE-E2E.md).
#
#   scripts/kube-apiserver.sh build         build kube-apiserver 1.20.2 from Debian's `kubernetes` source package
#                                           (cached; a cache hit returns at once) and fetch the matching kubectl
#   scripts/kube-apiserver.sh start DIR     start etcd + kube-apiserver on 127.0.0.1 with state in DIR; writes
#                                           DIR/admin.kubeconfig, DIR/admin.token, DIR/env and prints the API URL
#   scripts/kube-apiserver.sh stop DIR      stop both (and nothing else)
#   scripts/kube-apiserver.sh status DIR    exit 0 when the API server in DIR answers /readyz
#   scripts/kube-apiserver.sh paths         print the cached binaries' paths (KUBE_APISERVER=..., KUBECTL=...)
#
# Environment:
#   WSGATE_KUBE_CACHE        cache directory (default /var/cache/wsgate-kube)
#   WSGATE_KUBE_KEEP_BUILD   1 = keep the extracted source tree after a successful build (default: removed)
#   WSGATE_KUBE_READY_SECS   how long `start` waits for /readyz (default 180)
#   WSGATE_KUBE_SERVICE_CIDR service cluster IP range (default 127.96.0.0/16: loopback, see SERVICE_CIDR below)
#
# The build runs with `nice -n 19`, `ionice -c3` and GOMAXPROCS=2 so it only takes idle CPU from whoever else is
# compiling on the machine.
set -euo pipefail

readonly KUBE_VERSION=1.20.2
readonly KUBE_MAJOR=1
readonly KUBE_MINOR=20
readonly SRC_PKG=kubernetes
readonly GO_APT_PKG=golang-1.19-go
readonly GO_ROOT=/usr/lib/go-1.19
readonly REFLECT2_APT_PKG=golang-github-modern-go-reflect2-dev
readonly REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
readonly CACHE_DIR="${WSGATE_KUBE_CACHE:-/var/cache/wsgate-kube}"
readonly APISERVER_BIN="${CACHE_DIR}/kube-apiserver-${KUBE_VERSION}"
readonly APISERVER_KEY="${APISERVER_BIN}.key"
readonly KUBECTL_BIN="${CACHE_DIR}/kubectl-${KUBE_VERSION}"
readonly APT_SRC_FILE=/etc/apt/sources.list.d/wsgate-kube-src.sources
readonly APT_LOCK_OPT=(-o DPkg::Lock::Timeout=900)
# Service cluster IPs are allocated from a loopback range: the API server dials a Service's cluster IP when it
# calls a webhook configured with `service:` (and for aggregated APIs), and such a dial must stay on this machine.
readonly SERVICE_CIDR="${WSGATE_KUBE_SERVICE_CIDR:-127.96.0.0/16}"

log() { printf '[kube-apiserver %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    printf '[kube-apiserver] ERROR: %s\n' "$*" >&2
    exit 1
}

# Runs a command as root (directly when we are root, through sudo otherwise).
as_root() {
    if [[ ${EUID} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root (or password-less sudo) to run: $*"
    fi
}

# ---------------------------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------------------------

APT_UPDATED=0
apt_update_once() {
    [[ ${APT_UPDATED} -eq 1 ]] && return 0
    log "apt-get update"
    as_root apt-get "${APT_LOCK_OPT[@]}" update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

pkg_has_candidate() {
    local cand
    cand="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [[ -n ${cand} && ${cand} != "(none)" ]]
}

# Installs the given Debian packages that are missing; runs apt-get update only when one has no candidate.
ensure_pkgs() {
    local missing=() p
    for p in "$@"; do pkg_installed "${p}" || missing+=("${p}"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    for p in "${missing[@]}"; do
        pkg_has_candidate "${p}" || apt_update_once
    done
    for p in "${missing[@]}"; do
        pkg_has_candidate "${p}" || die "Debian package '${p}' is not available from the configured apt sources"
    done
    log "installing ${missing[*]}"
    if ! apt_install "${missing[@]}"; then
        # Stale package lists name versions the mirror no longer has: refresh once and retry.
        [[ ${APT_UPDATED} -eq 1 ]] && die "apt-get install ${missing[*]} failed"
        apt_update_once
        apt_install "${missing[@]}" || die "apt-get install ${missing[*]} failed"
    fi
}

apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${APT_LOCK_OPT[@]}" install -y -qq --no-install-recommends \
        "$@" >&2
}

# The version of the `kubernetes` source package that carries upstream 1.20.2, or nothing.
kube_src_version() {
    apt-cache showsrc "${SRC_PKG}" 2>/dev/null |
        awk -v want="${KUBE_VERSION}" '/^Version:/ { v = $2; u = v; sub(/-[^-]*$/, "", u); sub(/^[0-9]+:/, "", u);
            if (u == want || u ~ ("really" want "$")) { print v; exit } }'
}

# The Debian mirror the machine already uses (first non-security URI of the apt sources).
debian_mirror() {
    local uri=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
        uri="$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/ && $i ~ /debian/) { print $i; exit } }' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
    fi
    if [[ -z ${uri} ]]; then
        uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { if ($i !~ /security/ && $i ~ /debian/) print $i; break } }' |
            head -n1)"
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# Makes `apt-get source kubernetes` find 1.20.2: adds a deb-src entry for the machine's own mirror, trying the
# machine's suite first and bullseye second (only source indexes are added: installed binaries are unaffected).
ensure_deb_src() {
    [[ -n "$(kube_src_version)" ]] && return 0
    local mirror codename suite
    mirror="$(debian_mirror)"
    # shellcheck disable=SC1091
    codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-bookworm}")"
    for suite in "${codename}" bullseye; do
        log "adding deb-src ${mirror} ${suite} main (${APT_SRC_FILE})"
        printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "${mirror}" "${suite}" | as_root tee "${APT_SRC_FILE}" >/dev/null || die "cannot write ${APT_SRC_FILE}"
        APT_UPDATED=0
        apt_update_once
        [[ -n "$(kube_src_version)" ]] && return 0
    done
    as_root rm -f "${APT_SRC_FILE}"
    die "no '${SRC_PKG}' source package for ${KUBE_VERSION} in ${mirror} (${codename}, bullseye)"
}

# ---------------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------------

# Fix 1: the vendored modern-go/reflect2 1.0.1 crashes at run time on Go >= 1.18 (it reads runtime internals that
# moved); Debian's 1.0.2 package is API-compatible and works.
fix_reflect2() {
    local tree=$1 dst="$1/vendor/github.com/modern-go/reflect2"
    [[ -f ${REFLECT2_SRC}/reflect2.go ]] || die "${REFLECT2_SRC} missing (package ${REFLECT2_APT_PKG})"
    rm -rf "${dst}"
    mkdir -p "${dst}"
    cp -a "${REFLECT2_SRC}/." "${dst}/"
    rm -f "${dst}/go.mod" "${dst}/go.sum"
}

# Fix 2: the release tarball does not ship pkg/generated/openapi/zz_generated.openapi.go; generate it exactly as
# Makefile.generated_files does (KUBE target): every package of the tree (staging as vendor/k8s.io/...) holding a
# `+k8s:openapi-gen=` tag, except code-generator and sample-apiserver, fed to the vendored openapi-gen.
# (Runs in a `nice` child bash, hence the SC2317 directive.)
# shellcheck disable=SC2317
fix_openapi() {
    local tree=$1 gobin=$2 report=$3
    (
        cd "${tree}"
        go install k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
        local dirs
        dirs="$(find -H . -not \( \( -path './_*' -o -path './.*' -o -path ./vendor -o -path ./debian \) -prune \) \
                -type f -name '*.go' |
            sed 's|^\./staging/src|vendor|; s|^\./||' |
            grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' |
            xargs grep --color=never -l '^// *+k8s:' |
            xargs grep --color=never -l '+k8s:openapi-gen=' |
            xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)"
        [[ -n ${dirs} ]] || die "openapi-gen: found no input packages"
        "${gobin}/openapi-gen" --logtostderr --v 1 \
            -i "${dirs}" \
            -p k8s.io/kubernetes/pkg/generated/openapi \
            -O zz_generated.openapi \
            -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
            -r "${report}"
        [[ -s pkg/generated/openapi/zz_generated.openapi.go ]] || die "openapi-gen wrote no zz_generated.openapi.go"
    )
}

# Builds cmd/kube-apiserver (that package only) from the GOPATH tree into $2 (in a `nice` child bash).
# shellcheck disable=SC2317
build_apiserver() {
    local tree=$1 out=$2 build_date=$3 ldflags="-s -w" key
    for key in client-go/pkg/version component-base/version; do
        ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/${key}.gitVersion=v${KUBE_VERSION}"
        ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/${key}.gitMajor=${KUBE_MAJOR}"
        ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/${key}.gitMinor=${KUBE_MINOR}"
        ldflags+=" -X k8s.io/kubernetes/vendor/k8s.io/${key}.buildDate=${build_date}"
    done
    (cd "${tree}" && go build -o "${out}" -ldflags "${ldflags}" k8s.io/kubernetes/cmd/kube-apiserver)
}

# Cache key: upstream version + Go toolchain + a hash of the fix and build functions above, so changing how the
# binary is made invalidates the cache.
cache_key() {
    local h
    h="$(declare -f fix_reflect2 fix_openapi build_apiserver | sha256sum | cut -c1-16)"
    printf 'kube-apiserver=%s go=%s reflect2=%s patches=%s\n' "${KUBE_VERSION}" "${GO_APT_PKG}" "${REFLECT2_APT_PKG}" "${h}"
}

cache_hit() {
    [[ -x ${APISERVER_BIN} && -f ${APISERVER_KEY} && "$(cat "${APISERVER_KEY}")" == "$(cache_key)" ]]
}

# kubectl of the same version, from Debian's binary package kubernetes-client, unpacked into the cache without
# installing it (it would clash with other kubectl packages owning /usr/bin/kubectl).
fetch_kubectl() {
    [[ -x ${KUBECTL_BIN} ]] && return 0
    ensure_deb_src
    local ver tmp
    ver="$(kube_src_version)"
    pkg_has_candidate kubernetes-client || apt_update_once
    tmp="$(mktemp -d)"
    log "fetching kubectl (kubernetes-client ${ver})"
    if ! (cd "${tmp}" && apt-get -o APT::Sandbox::User=root download "kubernetes-client=${ver}" >&2 2>&1); then
        rm -rf "${tmp}"
        log "WARNING: could not download kubernetes-client=${ver}; kubectl ${KUBE_VERSION} unavailable (curl still works)"
        return 0
    fi
    dpkg-deb -x "${tmp}"/kubernetes-client_*.deb "${tmp}/x" || die "cannot unpack kubernetes-client"
    install -m 0755 "${tmp}/x/usr/bin/kubectl" "${KUBECTL_BIN}.tmp" && mv -f "${KUBECTL_BIN}.tmp" "${KUBECTL_BIN}"
    rm -rf "${tmp}"
    log "kubectl: ${KUBECTL_BIN}"
}

cmd_build() {
    mkdir -p "${CACHE_DIR}" || die "cannot create ${CACHE_DIR}"
    if cache_hit; then
        log "cached: ${APISERVER_BIN} ($(cat "${APISERVER_KEY}"))"
        fetch_kubectl
        return 0
    fi
    # One build at a time per cache directory.
    exec 9>"${CACHE_DIR}/.build.lock"
    if ! flock -n 9; then
        log "another build holds ${CACHE_DIR}/.build.lock; waiting"
        flock 9
    fi
    if cache_hit; then
        log "cached (built concurrently): ${APISERVER_BIN}"
        fetch_kubectl
        return 0
    fi
    local t0=${SECONDS}
    log "step 1/6: packages (${GO_APT_PKG}, ${REFLECT2_APT_PKG}, dpkg-dev)"
    ensure_pkgs "${GO_APT_PKG}" "${REFLECT2_APT_PKG}" dpkg-dev
    [[ -x ${GO_ROOT}/bin/go ]] || die "${GO_ROOT}/bin/go missing after installing ${GO_APT_PKG}"

    log "step 2/6: source package"
    ensure_deb_src
    local ver srcdir="${CACHE_DIR}/src" dsc
    ver="$(kube_src_version)"
    mkdir -p "${srcdir}"
    dsc="${srcdir}/${SRC_PKG}_${ver#*:}.dsc"
    if [[ ! -f ${dsc} ]]; then
        log "apt-get source --download-only ${SRC_PKG}=${ver}"
        (cd "${srcdir}" && apt-get -o APT::Sandbox::User=root source --download-only "${SRC_PKG}=${ver}" >&2) ||
            die "apt-get source ${SRC_PKG}=${ver} failed"
    fi
    [[ -f ${dsc} ]] || die "expected ${dsc} after apt-get source"

    local work="${CACHE_DIR}/build" tree
    local gopath="${work}/gopath"
    tree="${gopath}/src/k8s.io/kubernetes"
    log "step 3/6: unpacking ${dsc##*/} (Debian patches applied)"
    rm -rf "${work}"
    mkdir -p "${gopath}/src/k8s.io" "${work}/bin"
    dpkg-source --no-check -x "${dsc}" "${tree}" >"${work}/dpkg-source.log" 2>&1 ||
        die "dpkg-source -x failed (see ${work}/dpkg-source.log)"

    # GOPATH mode with the vendored dependencies, no network, static binary; low priority.
    export GOROOT="${GO_ROOT}" PATH="${GO_ROOT}/bin:${PATH}" GOPATH="${gopath}" GOBIN="${work}/bin"
    export GO111MODULE=off GOPROXY=off GOFLAGS='' CGO_ENABLED=0 GOMAXPROCS=2
    export GOCACHE="${CACHE_DIR}/gocache" HOME="${work}"
    local nice_cmd=(nice -n 19)
    command -v ionice >/dev/null 2>&1 && nice_cmd+=(ionice -c3)
    log "$(go version) GOPATH=${gopath}"

    log "step 4/6: fix 1: vendor/github.com/modern-go/reflect2 <- ${REFLECT2_SRC}"
    fix_reflect2 "${tree}"

    log "step 5/6: fix 2: generating pkg/generated/openapi/zz_generated.openapi.go with the vendored openapi-gen"
    local t1=${SECONDS}
    "${nice_cmd[@]}" bash -c "set -eu; $(declare -f die fix_openapi); fix_openapi \"\$@\"" _ \
        "${tree}" "${GOBIN}" "${work}/openapi-violations.report" >"${work}/openapi-gen.log" 2>&1 ||
        die "openapi-gen failed (see ${work}/openapi-gen.log)"
    if ! diff -q "${work}/openapi-violations.report" "${tree}/api/api-rules/violation_exceptions.list" >/dev/null 2>&1; then
        log "note: openapi-gen API-rule report differs from the known list (informational only)"
    fi
    log "openapi-gen done in $((SECONDS - t1))s"

    log "step 6/6: go build k8s.io/kubernetes/cmd/kube-apiserver (nice 19, GOMAXPROCS=2; ~20 min cold; log ${work}/go-build.log)"
    t1=${SECONDS}
    local build_date
    build_date="$(date -u -d "@$(dpkg-parsechangelog -l "${tree}/debian/changelog" -S Timestamp)" +%Y-%m-%dT%H:%M:%SZ)"
    "${nice_cmd[@]}" bash -c "set -eu; $(declare -f build_apiserver); KUBE_VERSION=${KUBE_VERSION} KUBE_MAJOR=${KUBE_MAJOR} KUBE_MINOR=${KUBE_MINOR} build_apiserver \"\$@\"" _ \
        "${tree}" "${work}/kube-apiserver" "${build_date}" >"${work}/go-build.log" 2>&1 ||
        die "go build of kube-apiserver failed (see ${work}/go-build.log)"
    log "go build done in $((SECONDS - t1))s"

    local v
    v="$("${work}/kube-apiserver" --version 2>&1)" || die "built binary does not run: ${v}"
    [[ ${v} == "Kubernetes v${KUBE_VERSION}" ]] || die "unexpected version from built binary: ${v}"
    install -m 0755 "${work}/kube-apiserver" "${APISERVER_BIN}.tmp" && mv -f "${APISERVER_BIN}.tmp" "${APISERVER_BIN}"
    cache_key >"${APISERVER_KEY}"
    if [[ ${WSGATE_KUBE_KEEP_BUILD:-0} != 1 ]]; then rm -rf "${work}"; fi
    log "built ${APISERVER_BIN} (${v}) in $((SECONDS - t0))s"
    fetch_kubectl
}

# ---------------------------------------------------------------------------------------------------------------
# Start / stop
# ---------------------------------------------------------------------------------------------------------------

# A free TCP port on 127.0.0.1 (bind to port 0 and read back what the kernel picked).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops the process recorded in a pid file: TERM, then KILL after ~10 s.
stop_pidfile() {
    local f=$1 pid i
    [[ -f ${f} ]] || return 0
    pid="$(cat "${f}")"
    if kill -0 "${pid}" 2>/dev/null; then
        kill -TERM "${pid}" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "${pid}" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "${pid}" 2>/dev/null; then kill -KILL "${pid}" 2>/dev/null || true; fi
    fi
    rm -f "${f}"
}

# Polls a command until it succeeds or the deadline passes; prints the elapsed time.
wait_until() {
    local secs=$1 what=$2 pidfile=$3
    shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        pid_alive "${pidfile}" || return 2
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
    log "${what} ready"
}

gen_certs() {
    local dir=$1
    local pki="${dir}/pki"
    mkdir -p "${pki}"
    chmod 700 "${pki}"
    # Serving certificate: a throw-away CA plus a leaf for 127.0.0.1/localhost/kubernetes.default.svc.
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=wsgate-e2e-ca" \
        -keyout "${pki}/ca.key" -out "${pki}/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
        -keyout "${pki}/apiserver.key" -out "${pki}/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n' \
        "${SERVICE_CIDR%.*/*}.1" >"${pki}/apiserver.ext"
    openssl x509 -req -in "${pki}/apiserver.csr" -CA "${pki}/ca.crt" -CAkey "${pki}/ca.key" -CAcreateserial \
        -days 2 -extfile "${pki}/apiserver.ext" -out "${pki}/apiserver.crt" 2>/dev/null
    # Service-account token signing key pair.
    openssl genrsa -out "${pki}/sa.key" 2048 2>/dev/null
    openssl rsa -in "${pki}/sa.key" -pubout -out "${pki}/sa.pub" 2>/dev/null
    [[ -s ${pki}/apiserver.crt && -s ${pki}/sa.pub ]] || die "openssl failed to create certificates in ${pki}"
}

write_kubeconfig() {
    local dir=$1 url=$2 token=$3
    local ca
    ca="$(base64 -w0 <"${dir}/pki/ca.crt")"
    umask 077
    cat >"${dir}/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: wsgate-e2e
  cluster:
    server: ${url}
    certificate-authority-data: ${ca}
users:
- name: admin
  user:
    token: ${token}
contexts:
- name: wsgate-e2e
  context:
    cluster: wsgate-e2e
    user: admin
    namespace: default
current-context: wsgate-e2e
EOF
}

cmd_start() {
    local dir=${1:-}
    [[ -n ${dir} ]] || die "usage: $0 start DIR"
    mkdir -p "${dir}" || die "cannot create ${dir}"
    dir="$(cd "${dir}" && pwd)"
    if pid_alive "${dir}/kube-apiserver.pid" || pid_alive "${dir}/etcd.pid"; then
        die "${dir} already has a running etcd/kube-apiserver: run '$0 stop ${dir}' first"
    fi
    cache_hit || die "no cached kube-apiserver ${KUBE_VERSION} at ${APISERVER_BIN}: run '$0 build' first"
    # shellcheck disable=SC2064 # expand DIR now
    trap "cmd_stop '${dir}'; exit 130" INT TERM
    command -v etcd >/dev/null 2>&1 || ensure_pkgs etcd-server
    command -v openssl >/dev/null 2>&1 || ensure_pkgs openssl
    command -v curl >/dev/null 2>&1 || ensure_pkgs curl
    command -v python3 >/dev/null 2>&1 || die "python3 is needed to pick free ports"

    local etcd_port etcd_peer api_port token
    etcd_port="$(free_port)"
    etcd_peer="$(free_port)"
    api_port="$(free_port)"
    token="$(openssl rand -hex 24)"

    log "generating keys and certificates in ${dir}/pki"
    gen_certs "${dir}"
    umask 077
    printf '%s,admin,admin-uid,system:masters\n' "${token}" >"${dir}/tokens.csv"
    printf '%s\n' "${token}" >"${dir}/admin.token"
    umask 022

    log "starting etcd on 127.0.0.1:${etcd_port}"
    rm -rf "${dir}/etcd-data"
    (
        cd "${dir}"
        exec setsid etcd --name wsgate-e2e --data-dir "${dir}/etcd-data" \
            --listen-client-urls "http://127.0.0.1:${etcd_port}" --advertise-client-urls "http://127.0.0.1:${etcd_port}" \
            --listen-peer-urls "http://127.0.0.1:${etcd_peer}" --initial-advertise-peer-urls "http://127.0.0.1:${etcd_peer}" \
            --initial-cluster "wsgate-e2e=http://127.0.0.1:${etcd_peer}" \
            --listen-metrics-urls "" --unsafe-no-fsync --quota-backend-bytes 1073741824
    ) >"${dir}/etcd.log" 2>&1 </dev/null &
    echo $! >"${dir}/etcd.pid"
    if ! wait_until 60 etcd "${dir}/etcd.pid" curl -fsS "http://127.0.0.1:${etcd_port}/health"; then
        tail -n 20 "${dir}/etcd.log" >&2 || true
        cmd_stop "${dir}"
        die "etcd did not become healthy (log ${dir}/etcd.log)"
    fi

    log "starting kube-apiserver ${KUBE_VERSION} on https://127.0.0.1:${api_port}"
    (
        cd "${dir}"
        exec setsid "${APISERVER_BIN}" \
            --bind-address=127.0.0.1 --secure-port="${api_port}" --advertise-address=127.0.0.1 \
            --etcd-servers="http://127.0.0.1:${etcd_port}" \
            --tls-cert-file="${dir}/pki/apiserver.crt" --tls-private-key-file="${dir}/pki/apiserver.key" \
            --client-ca-file="${dir}/pki/ca.crt" \
            --token-auth-file="${dir}/tokens.csv" \
            --service-account-issuer=https://kubernetes.default.svc \
            --service-account-key-file="${dir}/pki/sa.pub" \
            --service-account-signing-key-file="${dir}/pki/sa.key" \
            --api-audiences=https://kubernetes.default.svc,wsgate \
            --authorization-mode=RBAC \
            --service-cluster-ip-range="${SERVICE_CIDR}" \
            --endpoint-reconciler-type=none \
            --enable-admission-plugins=NamespaceLifecycle,ServiceAccount,DefaultStorageClass,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota \
            --feature-gates=BoundServiceAccountTokenVolume=true \
            --allow-privileged=true \
            --profiling=false \
            --v=1
    ) >"${dir}/kube-apiserver.log" 2>&1 </dev/null &
    echo $! >"${dir}/kube-apiserver.pid"

    local url="https://127.0.0.1:${api_port}"
    local rc=0
    wait_until "${WSGATE_KUBE_READY_SECS:-180}" kube-apiserver "${dir}/kube-apiserver.pid" \
        curl -fsS --cacert "${dir}/pki/ca.crt" -H "Authorization: Bearer ${token}" "${url}/readyz" || rc=$?
    if [[ ${rc} -ne 0 ]]; then
        tail -n 30 "${dir}/kube-apiserver.log" >&2 || true
        cmd_stop "${dir}"
        if [[ ${rc} -eq 2 ]]; then die "kube-apiserver exited during start-up (log ${dir}/kube-apiserver.log)"; fi
        die "kube-apiserver not ready within ${WSGATE_KUBE_READY_SECS:-180}s (log ${dir}/kube-apiserver.log)"
    fi

    write_kubeconfig "${dir}" "${url}" "${token}"
    {
        printf 'KUBE_API_URL=%s\n' "${url}"
        printf 'KUBE_CA_FILE=%s\n' "${dir}/pki/ca.crt"
        printf 'KUBE_TOKEN_FILE=%s\n' "${dir}/admin.token"
        printf 'KUBECONFIG=%s\n' "${dir}/admin.kubeconfig"
        printf 'ETCD_URL=http://127.0.0.1:%s\n' "${etcd_port}"
        printf 'KUBE_SA_KEY=%s\n' "${dir}/pki/sa.key"
        printf 'KUBE_SERVICE_CIDR=%s\n' "${SERVICE_CIDR}"
        if [[ -x ${KUBECTL_BIN} ]]; then printf 'KUBECTL=%s\n' "${KUBECTL_BIN}"; fi
    } >"${dir}/env"
    trap - INT TERM
    log "kubeconfig: ${dir}/admin.kubeconfig; environment: ${dir}/env"
    printf '%s\n' "${url}"
}

cmd_stop() {
    local dir=${1:-}
    [[ -n ${dir} ]] || die "usage: $0 stop DIR"
    [[ -d ${dir} ]] || return 0
    stop_pidfile "${dir}/kube-apiserver.pid"
    stop_pidfile "${dir}/etcd.pid"
    log "stopped etcd and kube-apiserver of ${dir}"
}

cmd_status() {
    local dir=${1:-}
    [[ -n ${dir} && -f ${dir}/env ]] || die "usage: $0 status DIR (with a started DIR)"
    local url
    url="$(sed -n 's/^KUBE_API_URL=//p' "${dir}/env")"
    if ! curl -fs --max-time 10 --cacert "${dir}/pki/ca.crt" -H "Authorization: Bearer $(cat "${dir}/admin.token")" \
        "${url}/readyz" >/dev/null; then
        log "${url} is not ready"
        return 1
    fi
    log "${url} ready"
}

cmd_paths() {
    printf 'KUBE_APISERVER=%s\n' "${APISERVER_BIN}"
    if [[ -x ${KUBECTL_BIN} ]]; then printf 'KUBECTL=%s\n' "${KUBECTL_BIN}"; fi
}

main() {
    local cmd=${1:-}
    shift || true
    case "${cmd}" in
    build) cmd_build "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    paths) cmd_paths "$@" ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
        exit 2
        ;;
    esac
}

main "$@"
exit $?
