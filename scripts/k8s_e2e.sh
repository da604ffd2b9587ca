#!/usr/bin/env bash
# End-to-end test of the CSI driver against a real one-node Kubernetes
# cluster on this machine (issue 27). Run by hand as root, never in CI:
#
#   scripts/k8s_e2e.sh            build what is missing, boot, run scenarios, stop
#   scripts/k8s_e2e.sh build      only build the Kubernetes binaries
#   K8S_E2E_KEEP=1 ...            leave the cluster up at the end (stop: scripts/k8s_e2e.sh down)
#   scripts/k8s_e2e.sh down       stop whatever a kept or interrupted run left
#   scripts/k8s_e2e.sh scenarios  run K8S_E2E_SCENARIOS again on a kept cluster
#   K8S_E2E_SCENARIOS="i a b c f g r e d" (the default, in that order)
#   K8S_E2E_VOLUME=auto|inline|pv  auto: inline volumes if scenario i mounts
#                                  one, else static PersistentVolumes
#   K8S_E2E_LINGER=30s            the chart's linger for the test
#   K8S_E2E_UPGRADE_FROM=b6fc9e0  the earlier release scenario d installs first,
#                                 upgrades from and rolls back to (built once
#                                 from a git worktree in .cache/k8s)
#   SSMFS_BINARY=PATH             the binary the ssmfs image carries (default:
#                                 target/debug/ssmfs, else target/release/ssmfs
#                                 as the README's demo builds it, else a debug
#                                 build made here)
#
# Scenarios: i an inline volume as docs/KUBERNETES.md shows it; a the pod's
# own identity (the token STS sees); b 30 task pods one after another on
# the same 20 secrets (SSM calls, create->Ready against emptyDir pods);
# c deletion (unpublish, target, linger); f refusals (a bad attribute, a
# role of another namespace); g two namespaces, two mounts; r a rotation
# followed in pods (@changes, ssmfs exec), put to pod log; e kubelet's
# republishes over 3 minutes; d a reader through a real upgrade: the
# earlier release installed, helm upgrade to this tree, kubelet and
# containerd restarts, the plugin pod's deletion, helm rollback.
#
# This machine's limits, handled here: root has no CAP_SYS_RESOURCE
# (containerd clamps oom_score_adj), the cgroups are v1 (kubelet 1.34 still
# runs on them; 1.35 refuses by default), and node-driver-registrar is not
# served by the Go module proxy (scripts/k8s_e2e/registrar stands in).
#
# What it does:
# - installs etcd, containerd, runc and the CNI plugins from Debian (apt);
# - builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet
#   and kubectl from k8s.io/kubernetes at $K8S_VERSION through a wrapper
#   go.mod (the root module's staging replaces point into its own tree, so
#   `go install ...@v1.X` fails), plus a registrar and a pause binary
#   (scripts/k8s_e2e/); outputs, GOCACHE and GOMODCACHE stay in
#   .cache/k8s so a second run builds nothing;
# - builds images FROM scratch with podman (pause, registrar, ssmfs via
#   scripts/image.sh, a busybox workload) and imports them into containerd;
# - boots etcd, the API server (Node,RBAC, NodeRestriction, a service-account
#   issuer), the controller manager, the scheduler and kubelet on containerd
#   with a bridge CNI, all on loopback;
# - starts moto (SSM, STS) and an STS gate that records every
#   AssumeRoleWithWebIdentity token and grants each role to one subject;
# - installs the chart with the local images and runs the scenarios, then
#   prints one table. A trap stops everything it started and unmounts
#   everything under its directories, even after a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
K8S_VERSION=${K8S_VERSION:-v1.34.4}
STAGING_VERSION=v0.${K8S_VERSION#v1.}
CACHE=$ROOT/.cache/k8s
BIN=$CACHE/bin/$K8S_VERSION
export GOMODCACHE=$CACHE/gomod GOCACHE=$CACHE/gocache
log() { printf '%s [k8s_e2e] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- build
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
build_k8s() {
	local have=1
	for c in "${K8S_CMDS[@]}" registrar pause; do [ -x "$BIN/$c" ] || have=0; done
	[ "$have" = 1 ] && { log "kubernetes $K8S_VERSION binaries are in $BIN"; return 0; }
	local src=$CACHE/src/$K8S_VERSION
	mkdir -p "$src" "$BIN"
	rm -rf "$src/registrar" "$src/pause"
	cp -r scripts/k8s_e2e/registrar scripts/k8s_e2e/pause "$src/"
	if [ ! -f "$src/go.sum" ]; then
		(
			cd "$src"
			go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
			local mod
			mod=$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod
			{
				echo "module k8se2e"
				echo
				echo "go 1.24.0"
				echo
				echo "require k8s.io/kubernetes $K8S_VERSION"
				echo
				# tool lines keep the commands' packages in the graph for tidy.
				for c in "${K8S_CMDS[@]}"; do echo "tool k8s.io/kubernetes/cmd/$c"; done
				echo
				echo "replace ("
				grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$mod" |
					awk -v v="$STAGING_VERSION" '{ printf "\t%s => %s %s\n", $1, $1, v }'
				echo ")"
			} >go.mod
			# Only kubernetes is named: tidy takes the registrar's imports
			# (grpc, the CSI spec) at the versions kubernetes itself pins.
			go get "k8s.io/kubernetes@$K8S_VERSION"
			go mod tidy
		) || { rm -f "$src/go.sum"; return 1; }
	fi
	local ld="-s -w"
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$(cut -d. -f2 <<<"$K8S_VERSION")"
		ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
	done
	# Low priority and few jobs: this machine's two cores are shared.
	local jobs=${K8S_BUILD_JOBS:-2}
	log "building kubernetes $K8S_VERSION (-p=$jobs, nice 19; 25-45 min cold)"
	local t0=$SECONDS
	(
		cd "$src"
		for c in registrar pause "${K8S_CMDS[@]}"; do
			[ -x "$BIN/$c" ] && continue
			local pkg=./$c
			case $c in kube*) pkg=k8s.io/kubernetes/cmd/$c ;; esac
			CGO_ENABLED=0 nice -n 19 go build -p "$jobs" -trimpath -ldflags "$ld" -o "$BIN/$c.tmp" "$pkg"
			mv "$BIN/$c.tmp" "$BIN/$c"
			log "built $c ($((SECONDS - t0)) s so far)"
		done
	)
	log "build took $((SECONDS - t0)) s"
}


# ---------------------------------------------------------------- layout
NODE=k8s-e2e
RUN=/run/k8s-e2e                  # pids, sockets, containerd's state
DATA=/var/lib/k8s-e2e             # etcd, containerd's root, certificates
LOGS=$CACHE/logs                  # every process's log, kept after a run
KUBELET_DIR=/var/lib/kubelet
SSMFS_STATE=/var/lib/ssmfs-csi
SSMFS_RUN=/run/ssmfs-csi
CTR_SOCK=$RUN/containerd.sock
ETCD_PORT=23790 API_PORT=6443 MOTO_PORT=5077 GATE_PORT=5078
POD_GATEWAY=10.244.0.1            # the bridge's address (host-local's first)
ISSUER=https://oidc.k8s-e2e.invalid
ACCOUNT=123456789012
ROLE_AIRFLOW=arn:aws:iam::$ACCOUNT:role/airflow-workers
ROLE_A=arn:aws:iam::$ACCOUNT:role/team-a
ROLE_B=arn:aws:iam::$ACCOUNT:role/team-b
DRIVER=ssmfs.csi.aws-ssm.dev
LINGER=${K8S_E2E_LINGER:-30s}
SSMFS_BINARY=${SSMFS_BINARY:-}
UPGRADE_FROM=${K8S_E2E_UPGRADE_FROM:-b6fc9e0}
OLD_SRC=$CACHE/src-$UPGRADE_FROM
OLD_CHART=$OLD_SRC/deploy/helm/ssmfs-csi
OLD_BINARY=$CACHE/bin/ssmfs-$UPGRADE_FROM
IMG_PAUSE=localhost/k8s-e2e/pause:1
IMG_REGISTRAR=localhost/k8s-e2e/registrar:1
IMG_BUSYBOX=localhost/k8s-e2e/busybox:1
KUBECONFIG=$DATA/pki/admin.kubeconfig
export KUBECONFIG
kubectl() { "$BIN/kubectl" "$@"; }
helm() { "$ROOT/.tools/bin/helm" "$@"; }
ctr_() { ctr -a "$CTR_SOCK" -n k8s.io "$@"; }
now_ms() { date +%s%3N; }

# ---------------------------------------------------------------- processes
start_bg() { # NAME CMD...
	local name=$1; shift
	mkdir -p "$RUN/pids"
	setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
	echo $! >"$RUN/pids/$name"
}
stop_bg() { # NAME [SECONDS]
	local f=$RUN/pids/$1 pid
	[ -f "$f" ] || return 0
	pid=$(cat "$f")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 $((${2:-15} * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}
wait_for() { # SECONDS DESCRIPTION CMD...
	local limit=$1 what=$2; shift 2
	local end=$((SECONDS + limit))
	until "$@" >/dev/null 2>&1; do
		[ $SECONDS -lt $end ] || { log "timed out waiting for $what"; return 1; }
		sleep 0.5
	done
}

# Mounts under the directories this script uses, deepest first.
our_mounts() {
	findmnt -rn -o TARGET | awk -v a="$KUBELET_DIR" -v b="$SSMFS_STATE" -v c="$SSMFS_RUN" \
		-v d="$RUN" -v e="$DATA" -v f=/run/netns -v g=/run/containerd \
		'index($0, a"/")==1 || $0==a || index($0, b"/")==1 || $0==b || index($0, c"/")==1 || $0==c ||
		 index($0, d"/")==1 || $0==d || index($0, e"/")==1 || $0==e || index($0, f"/cni-")==1' |
		awk '{ print length($0), $0 }' | sort -rn | cut -d' ' -f2-
}

down() {
	set +e
	log "stopping everything this script started"
	# The driver's and the workloads' container logs outlive the run.
	if [ -d /var/log/pods ]; then
		rm -rf "$LOGS/pods"; mkdir -p "$LOGS/pods"
		cp -r /var/log/pods/. "$LOGS/pods/" 2>/dev/null
	fi
	if [ -f "$RUN/pids/kube-apiserver" ] && [ -f "$RUN/pids/kubelet" ] && kubectl get --raw /readyz >/dev/null 2>&1; then
		# Workloads first, while kubelet and the driver can unpublish cleanly.
		kubectl delete namespace airflow team-a team-b --wait=false >/dev/null 2>&1
		local end=$((SECONDS + 60))
		while [ $SECONDS -lt $end ] && kubectl get pods -A --no-headers 2>/dev/null | grep -qvE '^kube-system'; do sleep 1; done
		kubectl delete pv -l k8s-e2e=1 --wait=false >/dev/null 2>&1
	fi
	stop_bg kubelet 20
	# Every container and sandbox of containerd's k8s.io namespace, then the
	# shims of this containerd (their -address names its socket).
	if [ -S "$CTR_SOCK" ]; then
		for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
		sleep 1
	fi
	local shim
	for shim in $(ps -eo pid=,args= | awk -v s="$CTR_SOCK" 'index($0, "containerd-shim") && index($0, "-address " s) { print $1 }'); do
		kill -KILL "$shim" 2>/dev/null
	done
	for name in containerd kube-scheduler kube-controller-manager kube-apiserver etcd sts-gate moto; do stop_bg $name 10; done
	# Processes left in our cgroups (a pod's FUSE daemon outliving its shim).
	local cg
	for cg in /sys/fs/cgroup/*/kubepods; do
		[ -d "$cg" ] || continue
		find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u | while read -r pid; do kill -KILL "$pid" 2>/dev/null; done
	done
	sleep 0.5
	local m
	our_mounts | while read -r m; do umount -l "$m" 2>/dev/null || umount -f "$m" 2>/dev/null; done
	for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ { print $1 }'); do ip netns delete "$ns" 2>/dev/null; done
	ip link delete k8se2e0 2>/dev/null
	for cg in /sys/fs/cgroup/*/kubepods; do
		[ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
	done
	if [ -n "$(our_mounts)" ]; then
		log "still mounted:"; our_mounts >&2
	else
		rm -rf "$KUBELET_DIR" "$SSMFS_STATE" "$SSMFS_RUN" "$RUN" "$DATA" /var/log/pods /var/log/containers
		rm -f /etc/cni/net.d/10-k8s-e2e.conflist
	fi
	if [ -f "$LOGS/.root-was-private" ]; then mount --make-rprivate /; rm -f "$LOGS/.root-was-private"; fi
	log "stopped"
}

# ---------------------------------------------------------------- certificates
pki() {
	local d=$DATA/pki
	mkdir -p "$d"
	openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout "$d/ca.key" \
		-out "$d/ca.crt" -days 2 -subj /CN=k8s-e2e-ca 2>/dev/null
	cert() { # NAME SUBJECT [SAN]
		openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout "$d/$1.key" \
			-subj "$2" -out "$d/$1.csr" 2>/dev/null
		{
			echo "keyUsage=critical,digitalSignature,keyEncipherment"
			echo "extendedKeyUsage=serverAuth,clientAuth"
			[ -n "${3:-}" ] && echo "subjectAltName=$3"
		} >"$d/$1.ext"
		openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
			-days 2 -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
	}
	cert apiserver /CN=kube-apiserver "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
	cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
	cert admin "/O=system:masters/CN=kubernetes-admin"
	cert kubelet "/O=system:nodes/CN=system:node:$NODE"
	cert kubelet-serving "/CN=$NODE" "IP:127.0.0.1,DNS:$NODE"
	cert controller-manager /CN=system:kube-controller-manager
	cert scheduler /CN=system:kube-scheduler
	# The service-account issuer's key: RSA, so tokens are RS256 as on EKS.
	openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
	openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
	local who
	for who in admin kubelet controller-manager scheduler; do
		kubectl config set-cluster e2e --server=https://127.0.0.1:$API_PORT --certificate-authority="$d/ca.crt" \
			--embed-certs --kubeconfig="$d/$who.kubeconfig" >/dev/null
		kubectl config set-credentials "$who" --client-certificate="$d/$who.crt" --client-key="$d/$who.key" \
			--embed-certs --kubeconfig="$d/$who.kubeconfig" >/dev/null
		kubectl config set-context e2e --cluster=e2e --user="$who" --kubeconfig="$d/$who.kubeconfig" >/dev/null
		kubectl config use-context e2e --kubeconfig="$d/$who.kubeconfig" >/dev/null
	done
}

# ---------------------------------------------------------------- images
build_images() {
	local ctx
	ctx=$(mktemp -d)
	mkdir -p "$ctx/pause" "$ctx/registrar" "$ctx/busybox/rootfs/bin"
	cp "$BIN/pause" "$ctx/pause/pause"
	printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$ctx/pause/Containerfile"
	# Root, as the upstream image (distroless/static): the socket is 0755 root.
	cp "$BIN/registrar" "$ctx/registrar/registrar"
	printf 'FROM scratch\nCOPY registrar /registrar\nENTRYPOINT ["/registrar"]\n' >"$ctx/registrar/Containerfile"
	cp /bin/busybox "$ctx/busybox/rootfs/bin/busybox"
	for a in sh cat sleep ls echo grep seq mount; do ln -s busybox "$ctx/busybox/rootfs/bin/$a"; done
	printf 'FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\nENTRYPOINT ["/bin/sh"]\n' >"$ctx/busybox/Containerfile"
	podman build --runtime runc --network none --quiet -t "$IMG_PAUSE" "$ctx/pause" >/dev/null
	podman build --runtime runc --network none --quiet -t "$IMG_REGISTRAR" "$ctx/registrar" >/dev/null
	podman build --runtime runc --network none --quiet -t "$IMG_BUSYBOX" "$ctx/busybox" >/dev/null
	# e2e-1: the earlier release scenario d upgrades from (and rolls back
	# to); e2e-2: this tree's binary, which every other scenario runs.
	scripts/image.sh --binary "$OLD_BINARY" --tag localhost/ssmfs:e2e-1 >/dev/null
	scripts/image.sh --binary "$SSMFS_BINARY" --tag localhost/ssmfs:e2e-2 >/dev/null
	local img
	for img in "$IMG_PAUSE" "$IMG_REGISTRAR" "$IMG_BUSYBOX" localhost/ssmfs:e2e-1 localhost/ssmfs:e2e-2; do
		podman save -q --format docker-archive -o "$ctx/image.tar" "$img" >/dev/null
		ctr_ images import "$ctx/image.tar" >/dev/null
		rm -f "$ctx/image.tar"
	done
	rm -rf "$ctx"
}

# ---------------------------------------------------------------- cluster
start_cluster() {
	mkdir -p "$RUN" "$DATA" "$LOGS" "$KUBELET_DIR" /etc/cni/net.d
	if [ "$(findmnt -n -o PROPAGATION /)" = private ]; then touch "$LOGS/.root-was-private"; fi
	mount --make-rshared /
	pki
	log "etcd"
	start_bg etcd etcd --name e2e --data-dir "$DATA/etcd" \
		--listen-client-urls http://127.0.0.1:$ETCD_PORT --advertise-client-urls http://127.0.0.1:$ETCD_PORT \
		--listen-peer-urls http://127.0.0.1:$((ETCD_PORT + 10)) --initial-advertise-peer-urls http://127.0.0.1:$((ETCD_PORT + 10)) \
		--initial-cluster e2e=http://127.0.0.1:$((ETCD_PORT + 10)) --listen-metrics-urls http://127.0.0.1:$((ETCD_PORT + 20))
	wait_for 30 etcd curl -sf http://127.0.0.1:$ETCD_PORT/health
	local p=$DATA/pki
	log "kube-apiserver"
	start_bg kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:$ETCD_PORT \
		--bind-address=127.0.0.1 --secure-port=$API_PORT \
		--tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" --client-ca-file="$p/ca.crt" \
		--kubelet-client-certificate="$p/apiserver-kubelet-client.crt" --kubelet-client-key="$p/apiserver-kubelet-client.key" \
		--kubelet-certificate-authority="$p/ca.crt" \
		--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
		--service-cluster-ip-range=10.96.0.0/24 --allow-privileged=true \
		--service-account-issuer=$ISSUER --service-account-key-file="$p/sa.pub" \
		--service-account-signing-key-file="$p/sa.key" --api-audiences=$ISSUER \
		--profiling=false --v=1
	wait_for 90 "the API server" kubectl get --raw /readyz
	log "kube-controller-manager, kube-scheduler"
	start_bg kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$p/controller-manager.kubeconfig" \
		--authentication-kubeconfig="$p/controller-manager.kubeconfig" --authorization-kubeconfig="$p/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
		--service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
		--cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" --v=1
	start_bg kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$p/scheduler.kubeconfig" \
		--authentication-kubeconfig="$p/scheduler.kubeconfig" --authorization-kubeconfig="$p/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --v=1
	log "containerd"
	configure_containerd
	start_containerd
	log "images"
	build_images
	log "kubelet"
	cat >"$RUN/kubelet.yaml" <<-YAML
	apiVersion: kubelet.config.k8s.io/v1beta1
	kind: KubeletConfiguration
	address: 127.0.0.1
	healthzBindAddress: 127.0.0.1
	readOnlyPort: 0
	containerRuntimeEndpoint: unix://$CTR_SOCK
	cgroupDriver: cgroupfs
	failCgroupV1: false
	failSwapOn: false
	oomScoreAdj: 0
	imageGCHighThresholdPercent: 100
	imageGCLowThresholdPercent: 99
	evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
	authentication:
	  anonymous: {enabled: false}
	  webhook: {enabled: true}
	  x509: {clientCAFile: $p/ca.crt}
	authorization: {mode: Webhook}
	tlsCertFile: $p/kubelet-serving.crt
	tlsPrivateKeyFile: $p/kubelet-serving.key
	resolvConf: /etc/resolv.conf
	YAML
	start_kubelet
	wait_for 120 "node $NODE Ready" node_ready
	wait_for 60 "the default service account" kubectl -n default get serviceaccount default
	log "cluster up"
}
configure_containerd() {
	# A bridge on a private /24 with no route out and no NAT: pods reach
	# each other and the host at the gateway (the STS gate listens there).
	cat >/etc/cni/net.d/10-k8s-e2e.conflist <<-JSON
	{"cniVersion": "0.4.0", "name": "k8s-e2e", "plugins": [
	  {"type": "bridge", "bridge": "k8se2e0", "isGateway": true, "ipMasq": false,
	   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]],
	            "dataDir": "$RUN/cni-ipam"}}]}
	JSON
	cat >"$RUN/containerd.toml" <<-TOML
	version = 2
	root = "$DATA/containerd"
	state = "$RUN/containerd"
	[grpc]
	  address = "$CTR_SOCK"
	[plugins."io.containerd.grpc.v1.cri"]
	  sandbox_image = "$IMG_PAUSE"
	  # This machine's root lacks CAP_SYS_RESOURCE: no process may lower its
	  # oom_score_adj below 0, and runc fails on kubelet's -998 for every
	  # sandbox. Clamped to containerd's own (0) instead.
	  restrict_oom_score_adj = true
	  [plugins."io.containerd.grpc.v1.cri".containerd]
	    snapshotter = "overlayfs"
	    default_runtime_name = "runc"
	    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
	      runtime_type = "io.containerd.runc.v2"
	      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
	        BinaryName = "/usr/sbin/runc"
	        SystemdCgroup = false
	  [plugins."io.containerd.grpc.v1.cri".cni]
	    bin_dir = "/usr/lib/cni"
	    conf_dir = "/etc/cni/net.d"
	TOML
}
start_containerd() {
	start_bg containerd containerd --config "$RUN/containerd.toml"
	wait_for 30 containerd ctr -a "$CTR_SOCK" version
}
start_kubelet() {
	start_bg kubelet "$BIN/kubelet" --config="$RUN/kubelet.yaml" --kubeconfig="$DATA/pki/kubelet.kubeconfig" \
		--hostname-override=$NODE --root-dir="$KUBELET_DIR" --v=2
}
node_ready() {
	[ "$(kubectl get node $NODE -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# ---------------------------------------------------------------- AWS side
start_aws() {
	log "moto and the STS gate"
	start_bg moto .venv/bin/moto_server -H 127.0.0.1 -p $MOTO_PORT
	wait_for 30 moto curl -sf http://127.0.0.1:$MOTO_PORT/moto-api/
	cat >"$RUN/trust.json" <<-JSON
	{"$ROLE_AIRFLOW": "system:serviceaccount:airflow:airflow-worker",
	 "$ROLE_A": "system:serviceaccount:team-a:app",
	 "$ROLE_B": "system:serviceaccount:team-b:app"}
	JSON
	# On every address: the driver's pods (on the pod network, not the
	# host's) reach it at the bridge's gateway, $POD_GATEWAY.
	GATE_HOST=0.0.0.0 start_bg sts-gate .venv/bin/python scripts/k8s_e2e/sts_gate.py $GATE_PORT http://127.0.0.1:$MOTO_PORT \
		"$RUN/trust.json" "$DATA/pki/sa.pub" $ISSUER
	wait_for 30 "the gate" curl -sf http://127.0.0.1:$GATE_PORT/records
	AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing .venv/bin/python - "http://127.0.0.1:$MOTO_PORT" <<-'PY'
	import sys, boto3
	ssm = boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1")
	for i in range(1, 21):
	    ssm.put_parameter(Name=f"/e2e/app/secret-{i:02d}", Value=f"app-value-{i:02d}",
	                      Type="SecureString" if i % 5 == 0 else "String")
	for team in ("team-a", "team-b"):
	    ssm.put_parameter(Name=f"/e2e/{team}/token", Value=f"{team}-value", Type="SecureString")
	PY
}
gate_records() { curl -sf http://127.0.0.1:$GATE_PORT/records; }
ssm_calls() { gate_records | .venv/bin/python -c 'import json,sys; print(sum(json.load(sys.stdin)["ssm"].values()))'; }

# The values this test sets; an upgrade passes them again (not
# --reuse-values, which would drop defaults the chart gained since).
helm_values() { # IMAGE_TAG
	echo --set image.repository=localhost/ssmfs --set image.tag="$1" --set image.pullPolicy=Never \
		--set registrar.image=$IMG_REGISTRAR --set registrar.pullPolicy=Never \
		--set linger=$LINGER --set logLevel=debug --set defaultAttributes.region=us-east-1 \
		--set awsEndpoints.ssm=http://$POD_GATEWAY:$GATE_PORT --set awsEndpoints.sts=http://$POD_GATEWAY:$GATE_PORT
}
install_driver() { # CHART IMAGE_TAG
	log "helm install ($1, image localhost/ssmfs:$2, linger $LINGER)"
	# shellcheck disable=SC2046
	helm install ssmfs-csi "$1" --namespace kube-system --wait --timeout 180s $(helm_values "$2") \
		>>"$LOGS/helm-install.log" 2>&1 || { cat "$LOGS/helm-install.log" >&2; return 1; }
	wait_for 120 "the driver registered (CSINode)" csinode_has_driver
}
csinode_has_driver() { kubectl get csinode $NODE -o jsonpath='{.spec.drivers[*].name}' | grep -qw $DRIVER; }


# ---------------------------------------------------------------- workloads
FILES=$(for i in $(seq -w 1 20); do printf '/mnt/s/secret-%s ' "$i"; done)
# A pod with one container (busybox) and the volume "s" at /mnt/s: ATTRS is
# a JSON object of volume attributes, or "emptyDir".
# VOLUME_MODE inline: a CSI inline (ephemeral) volume in the pod spec; pv: a
# static PersistentVolume (ReadOnlyMany) and its claim, made before the pod.
VOLUME_MODE=${K8S_E2E_VOLUME:-auto}
volume_source() { # NAME ATTRS: the pod's volume "s" as VOLUME_MODE has it
	if [ "$2" = emptyDir ]; then echo "emptyDir: {}"
	elif [ "$VOLUME_MODE" = pv ]; then echo "persistentVolumeClaim: {claimName: $1, readOnly: true}"
	else echo "csi: {driver: $DRIVER, readOnly: true, volumeAttributes: $2}"; fi
}
pod_yaml() { # NAME NAMESPACE SERVICE_ACCOUNT ATTRS SCRIPT
	local volume
	volume=$(volume_source "$1" "$4")
	cat <<-YAML
	apiVersion: v1
	kind: Pod
	metadata: {name: $1, namespace: $2}
	spec:
	  serviceAccountName: $3
	  automountServiceAccountToken: false
	  restartPolicy: Never
	  terminationGracePeriodSeconds: 5
	  containers:
	  - name: c
	    image: $IMG_BUSYBOX
	    imagePullPolicy: Never
	    command: [/bin/sh, -c]
	    args:
	    - |
	$(sed 's/^/      /' <<<"$5")
	    volumeMounts: [{name: s, mountPath: /mnt/s, readOnly: true}]
	  volumes:
	  - name: s
	    $volume
	YAML
}
pv_yaml() { # NAME NAMESPACE ATTRS: a PV bound ahead to the claim NAMESPACE/NAME
	cat <<-YAML
	apiVersion: v1
	kind: PersistentVolume
	metadata: {name: $2-$1, labels: {k8s-e2e: "1"}}
	spec:
	  capacity: {storage: 1Mi}
	  accessModes: [ReadOnlyMany]
	  persistentVolumeReclaimPolicy: Retain
	  storageClassName: ""
	  claimRef: {namespace: $2, name: $1}
	  csi: {driver: $DRIVER, volumeHandle: $2-$1, readOnly: true, volumeAttributes: $3}
	---
	apiVersion: v1
	kind: PersistentVolumeClaim
	metadata: {name: $1, namespace: $2}
	spec:
	  accessModes: [ReadOnlyMany]
	  storageClassName: ""
	  volumeName: $2-$1
	  resources: {requests: {storage: 1Mi}}
	YAML
}
pvc_bound() { [ "$(kubectl -n "$1" get pvc "$2" -o jsonpath='{.status.phase}' 2>/dev/null)" = Bound ]; }
# In pv mode, the volume exists and is bound before the pod is created.
prepare_volume() { # NAME NAMESPACE ATTRS
	[ "$VOLUME_MODE" = pv ] && [ "$3" != emptyDir ] || return 0
	pv_yaml "$1" "$2" "$3" | kubectl create -f - >/dev/null
	wait_for 60 "claim $2/$1 bound" pvc_bound "$2" "$1"
}
release_volume() { # NAME NAMESPACE: the claim and its PV, once the pod is gone
	[ "$VOLUME_MODE" = pv ] || return 0
	kubectl -n "$2" delete pvc "$1" --wait=false >/dev/null 2>&1 || true
	kubectl delete pv "$2-$1" --wait=false >/dev/null 2>&1 || true
}
attrs() { # ROLE PATH [MORE JSON MEMBERS]
	echo "{\"roleArn\": \"$1\", \"path\": \"$2\"${3:+, $3}}"
}
# Reads the 20 secrets once, says how it went, then waits to be deleted.
TASK_SCRIPT="trap 'exit 0' TERM
ok=0; fail=0
for f in $FILES; do v=; if read -r v < \$f || [ -n \"\$v\" ]; then ok=\$((ok+1)); else fail=\$((fail+1)); fi; done
echo \"READS ok=\$ok fail=\$fail\"
sleep 3600 & wait"
# Prints one file's value, then waits.
show_script() { echo "trap 'exit 0' TERM
v=; read -r v < /mnt/s/$1 || true; echo \"VALUE=\$v\"
sleep 3600 & wait"; }
# Reads the 20 secrets in a loop, without forking (the shell's read and
# /proc/uptime, 10 ms resolution), about 300 reads a second; each second a
# line: reads, failed reads, the longest read.
READER_SCRIPT="trap 'exit 0' TERM
now() { read up rest < /proc/uptime; t=\$(( \${up%.*}*100 + 1\${up#*.} - 100 )); }
ok=0; fail=0; max=0; now; mark=\$t
while :; do
  for f in $FILES; do
    now; a=\$t; v=
    if read -r v < \$f 2>/dev/null || [ -n \"\$v\" ]; then ok=\$((ok+1)); else fail=\$((fail+1)); fi
    now; d=\$((t-a)); [ \$d -gt \$max ] && max=\$d
    if [ \$((t-mark)) -ge 100 ]; then echo \"STAT ok=\$ok fail=\$fail max_ms=\$((max*10))\"; ok=0; fail=0; max=0; mark=\$t; fi
  done
  sleep 0.05
done"

create_pod_only() { pod_yaml "$@" | kubectl create -f - >/dev/null; }
create_pod() { prepare_volume "$1" "$2" "$4"; create_pod_only "$@"; }
pod_uid() { kubectl -n "$1" get pod "$2" -o jsonpath='{.metadata.uid}'; }
# The container's log, read on the host (kubectl logs would have the API
# server dial kubelet; everything here stays on loopback).
pod_log() { # NAMESPACE NAME
	local uid
	uid=$(pod_uid "$1" "$2")
	cat /var/log/pods/"$1_$2_$uid"/c/*.log 2>/dev/null | cut -d' ' -f4-
}
log_has() { pod_log "$1" "$2" | grep -q "$3"; }
wait_ready() { kubectl -n "$1" wait --for=condition=Ready "pod/$2" --timeout="${3:-120}s" >/dev/null; }
# Every plugin container's log on this node, old pods' included while kubelet keeps them.
plugin_log() { cat /var/log/pods/kube-system_ssmfs-csi-node-*/plugin/*.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'; }
mount_key_of() { # NAMESPACE/POD: the shared mount key of its last publish
	local key
	key=$(plugin_log | grep ' published' | grep "pod=$1 " | tail -1 | grep -o 'mount=[^ ]*' | cut -d= -f2)
	[ -n "$key" ] && echo "$key"
}
mounted() { findmnt -rn -o TARGET | grep -qxF -- "$1"; }
# The shared mount a pod's target is bound to, from the plugin's records
# (the key in its log lines is another hash than the directory's name).
shared_mount_of() { # POD_UID
	.venv/bin/python - "$1" "$SSMFS_STATE/mounts" <<-'PY'
	import glob, json, sys
	for path in glob.glob(sys.argv[2] + "/*.json"):
	    record = json.load(open(path))
	    if any(t["pod"]["uid"] == sys.argv[1] for t in record.get("targets", [])):
	        print(record["mountpoint"]); break
	else:
	    sys.exit(1)
	PY
}
target_of() { # POD_UID: the volume's target path (inline: the volume's name; pv: the PV's)
	local d
	for d in "$KUBELET_DIR/pods/$1/volumes/kubernetes.io~csi/"*; do echo "$d/mount"; return; done
}
shared_mounts() { findmnt -rn -t fuse.ssmfs -o TARGET | grep -c "^$SSMFS_STATE/" || true; }
result() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$LOGS/results.tsv"; log "scenario $1: $2 $3"; }
percentile() { # P < numbers
	sort -n | awk -v p="$1" '{ v[NR] = $1 } END { i = int((NR * p + 99) / 100); if (i < 1) i = 1; print v[i] }'
}
jq_() { .venv/bin/python -c "import json,sys; d=json.load(sys.stdin); $1"; }

setup_namespaces() {
	local ns
	for ns in airflow team-a team-b; do kubectl create namespace $ns >/dev/null; done
	kubectl -n airflow create serviceaccount airflow-worker >/dev/null
	kubectl -n team-a create serviceaccount app >/dev/null
	kubectl -n team-b create serviceaccount app >/dev/null
}

# i. An inline volume exactly as docs/KUBERNETES.md shows it (readOnly: true).
scenario_i() {
	VOLUME_MODE=inline
	# Its own ttl, so its shared mount is not scenario a's (a's publish must be cold).
	create_pod inline airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app '"ttl": "4m"')" "$(show_script secret-01)"
	if wait_ready airflow inline 60 && wait_for 20 "the pod's output" log_has airflow inline VALUE=app-value-01; then
		result i PASS "an inline volume (readOnly: true) mounts and reads $(pod_log airflow inline | grep -o 'VALUE=.*' | head -1)"
	else
		result i FAIL "an inline volume (readOnly: true) is refused: \"$(refusal airflow inline)\""
	fi
	kubectl -n airflow delete pod inline --wait=true --timeout=60s >/dev/null
}

# a. The pod's own identity: the gate sees its token.
scenario_a() {
	local before
	before=$(gate_records | jq_ 'print(len(d["assume"]))')
	create_pod own-identity airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app)" "$(show_script secret-01)"
	wait_ready airflow own-identity
	A_STARTED=$(date +%s); echo "$A_STARTED" >"$LOGS/a_started"
	wait_for 20 "the pod's output" log_has airflow own-identity VALUE=
	local value
	value=$(pod_log airflow own-identity | grep -o 'VALUE=.*' | head -1)
	gate_records | jq_ "
r = [x for x in d['assume'][$before:] if x['role'] == '$ROLE_AIRFLOW']
assert r, 'no AssumeRoleWithWebIdentity for the role'
x = r[-1]
print(json.dumps({k: x[k] for k in ('aud', 'sub', 'iss', 'session', 'pod', 'granted')}))
" >"$LOGS/a_token.json"
	local aud sub granted session published
	aud=$(jq_ 'print(",".join(d["aud"]) if isinstance(d["aud"], list) else d["aud"])' <"$LOGS/a_token.json")
	sub=$(jq_ 'print(d["sub"])' <"$LOGS/a_token.json")
	session=$(jq_ 'print(d["session"])' <"$LOGS/a_token.json")
	granted=$(jq_ 'print(d["granted"])' <"$LOGS/a_token.json")
	published=$(plugin_log | grep ' published' | grep 'pod=airflow/own-identity ' | tail -1 | grep -o 'elapsed_ms=[0-9]*' || true)
	local pod
	pod=$(jq_ 'print(d["pod"])' <"$LOGS/a_token.json")
	if [ "$value" = VALUE=app-value-01 ] && [ "$aud" = sts.amazonaws.com ] &&
		[ "$sub" = system:serviceaccount:airflow:airflow-worker ] && [ "$granted" = True ] && [ "$pod" = own-identity ]; then
		result a PASS "read $value; token aud=$aud sub=$sub bound to pod $pod, session=$session; cold publish $published"
	else
		result a FAIL "read '$value'; token aud=$aud sub=$sub pod=$pod granted=$granted"
	fi
}

# b. 30 task pods one after another, each reading the same 20 secrets.
scenario_b() {
	local i name t0 t1 calls0 calls1 bad=0
	: >"$LOGS/b_csi.ms"; : >"$LOGS/b_empty.ms"
	calls0=$(gate_records)
	# Each ssmfs pod is followed by the same pod on an emptyDir, so both see
	# the same node (deletions in flight, other load).
	for i in $(seq -w 1 30); do
		name=task-$i
		prepare_volume $name airflow "$(attrs $ROLE_AIRFLOW /e2e/app)"
		t0=$(now_ms)
		create_pod_only $name airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app)" "$TASK_SCRIPT"
		wait_ready airflow $name 120
		t1=$(now_ms)
		echo $((t1 - t0)) >>"$LOGS/b_csi.ms"
		wait_for 20 "task $i's reads" log_has airflow $name READS
		pod_log airflow $name | grep -q 'READS ok=20 fail=0' || { bad=$((bad + 1)); log "task $i: $(pod_log airflow $name)"; }
		kubectl -n airflow delete pod $name --wait=false >/dev/null
		release_volume $name airflow
		name=empty-$i
		t0=$(now_ms)
		create_pod $name airflow airflow-worker emptyDir "trap 'exit 0' TERM; echo READS; sleep 3600 & wait"
		wait_ready airflow $name 120
		t1=$(now_ms)
		echo $((t1 - t0)) >>"$LOGS/b_empty.ms"
		kubectl -n airflow delete pod $name --wait=false >/dev/null
	done
	calls1=$(gate_records)
	local calls
	calls=$(.venv/bin/python -c "import json, sys
a, b = [json.loads(x)['ssm'] for x in sys.argv[1:3]]
d = {k: b[k] - a.get(k, 0) for k in b if b[k] - a.get(k, 0)}
print(sum(d.values()), '(' + ', '.join(f'{k} {v}' for k, v in sorted(d.items())) + ')')" "$calls0" "$calls1")
	local c50 c95 e50 e95
	c50=$(percentile 50 <"$LOGS/b_csi.ms"); c95=$(percentile 95 <"$LOGS/b_csi.ms")
	e50=$(percentile 50 <"$LOGS/b_empty.ms"); e95=$(percentile 95 <"$LOGS/b_empty.ms")
	local verdict=PASS
	[ $bad = 0 ] || verdict=FAIL
	result b $verdict "30 pods x 20 secrets: $((30 - bad)) read all 20; SSM calls for all 30: $calls; create->Ready p50/p95: ssmfs ${c50}/${c95} ms, emptyDir ${e50}/${e95} ms"
	wait_for 120 "the task pods gone" no_pods_named airflow '^(task|empty)-'
}
no_pods_named() { ! kubectl -n "$1" get pods --no-headers 2>/dev/null | grep -qE "$2"; }


# c. Pod deletion: unpublish, the target gone, the shared mount lingers, then goes.
scenario_c() {
	create_pod linger airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app '"ttl": "61s"')" "$(show_script secret-02)"
	wait_ready airflow linger
	local uid key target shared t_del lingered=no gone_after=never unpub=no
	uid=$(pod_uid airflow linger)
	target=$(target_of "$uid")
	shared=$(shared_mount_of "$uid") || { result c FAIL "no shared mount records pod $uid"; return; }
	mounted "$target" || { result c FAIL "target $target not mounted after publish"; return; }
	mounted "$shared" || { result c FAIL "the shared mount $shared is not mounted"; return; }
	local since
	since=$(utc)
	kubectl -n airflow delete pod linger --wait=true --timeout=60s >/dev/null
	t_del=$SECONDS
	release_volume linger airflow
	wait_for 30 "the unpublish" eval "plugin_log | awk -v t=$since '\$1 >= t' | grep ' unpublished' | grep -q 'pod=airflow/linger '" && unpub=yes
	local target_gone=no
	if ! mounted "$target" && [ ! -e "$target" ]; then target_gone=yes; fi
	mounted "$shared" && lingered=yes
	local end=$((SECONDS + $(sed 's/s$//' <<<"$LINGER") + 90))
	while [ $SECONDS -lt $end ]; do
		if ! mounted "$shared"; then gone_after=$((SECONDS - t_del))s; break; fi
		sleep 1
	done
	local verdict=FAIL
	[ $unpub = yes ] && [ $target_gone = yes ] && [ $lingered = yes ] && [ "$gone_after" != never ] && verdict=PASS
	result c $verdict "unpublish reached the driver: $unpub; target gone: $target_gone; shared mount lingered: $lingered; gone ${gone_after} after the deletion (linger $LINGER)"
}

# e. kubelet's republish calls (requiresRepublish) over 3 minutes, on a quiet node.
kubelet_metric() { # the sum and count of kubelet's NodePublishVolume histogram
	curl -sf --cacert "$DATA/pki/ca.crt" --cert "$DATA/pki/admin.crt" --key "$DATA/pki/admin.key" \
		https://127.0.0.1:10250/metrics |
		awk '/^csi_operations_seconds_(sum|count)\{/ && /NodePublishVolume/ && /grpc_status_code="OK"/ {
			if ($1 ~ /_sum/) s += $2; else c += $2 } END { printf "%s %d\n", s + 0, c + 0 }'
}
scenario_e() {
	local t0 m0 m1 lines n
	t0=$(date -u +%Y-%m-%dT%H:%M:%S)
	m0=$(kubelet_metric)
	log "scenario e: watching republishes for 180 s"
	sleep 180
	m1=$(kubelet_metric)
	plugin_log | awk -v t="$t0" '$1 >= t' | grep 'republished' >"$LOGS/e_republish.log" || true
	n=$(wc -l <"$LOGS/e_republish.log")
	lines=$(awk '{ split($1, a, "T"); split($0, p, "pod="); split(p[2], q, " "); printf "%s %s; ", substr(a[2], 1, 8), q[1] }' "$LOGS/e_republish.log")
	local gaps
	gaps=$(grep 'pod=airflow/own-identity ' "$LOGS/e_republish.log" | awk '{ split($1, a, "T"); split(substr(a[2], 1, 8), h, ":"); t = h[1] * 3600 + h[2] * 60 + h[3]; if (NR > 1) printf "%s%d s", (NR > 2 ? ", " : ""), t - p; p = t }')
	lines+="intervals for airflow/own-identity: ${gaps:-none}; "
	local calls mean
	calls=$(awk -v a="$m0" -v b="$m1" 'BEGIN { split(a, x, " "); split(b, y, " "); print y[2] - x[2] }')
	mean=$(awk -v a="$m0" -v b="$m1" 'BEGIN { split(a, x, " "); split(b, y, " "); n = y[2] - x[2]; if (n > 0) printf "%.1f", (y[1] - x[1]) * 1000 / n; else print "-" }')
	local verdict=PASS
	[ "$n" -gt 0 ] || verdict=FAIL
	result e $verdict "$n republishes in 180 s (driver log, UTC): ${lines%; }; kubelet NodePublishVolume OK calls: $calls, mean ${mean} ms each"
}

# f. Refusals: a bad volume, a role of another namespace.
refusal() { # NAMESPACE POD: the FailedMount event's driver message
	kubectl -n "$1" get events --field-selector "involvedObject.name=$2,reason=FailedMount" \
		-o jsonpath='{range .items[*]}{.message}{"\n"}{end}' 2>/dev/null | grep -o 'desc = .*' | head -1 | cut -c8-
}
scenario_f() {
	local before uid1 uid2 msg1 msg2 left=""
	before=$(shared_mounts)
	create_pod bad-volume airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app '"ttl": "soon"')" "$(show_script secret-01)"
	create_pod foreign-role team-b app "$(attrs $ROLE_A /e2e/team-a)" "$(show_script token)"
	wait_for 90 "bad-volume's FailedMount" eval '[ -n "$(refusal airflow bad-volume)" ]' || true
	wait_for 90 "foreign-role's FailedMount" eval '[ -n "$(refusal team-b foreign-role)" ]' || true
	msg1=$(refusal airflow bad-volume); msg2=$(refusal team-b foreign-role)
	kubectl -n airflow describe pod bad-volume >"$LOGS/f_bad_volume.describe"
	kubectl -n team-b describe pod foreign-role >"$LOGS/f_foreign_role.describe"
	uid1=$(pod_uid airflow bad-volume); uid2=$(pod_uid team-b foreign-role)
	findmnt -rn -o TARGET | grep -e "$uid1" -e "$uid2" >/dev/null && left="target mounted; "
	[ "$(shared_mounts)" = "$before" ] || left+="shared mounts $before -> $(shared_mounts); "
	local refused
	refused=$(gate_records | jq_ "print(sum(1 for x in d['assume'] if x['role'] == '$ROLE_A' and x['sub'] == 'system:serviceaccount:team-b:app' and not x['granted']))")
	local phase1 phase2
	phase1=$(kubectl -n airflow get pod bad-volume -o jsonpath='{.status.phase}')
	phase2=$(kubectl -n team-b get pod foreign-role -o jsonpath='{.status.phase}')
	kubectl -n airflow delete pod bad-volume --wait=true --timeout=60s >/dev/null
	kubectl -n team-b delete pod foreign-role --wait=true --timeout=60s >/dev/null
	release_volume bad-volume airflow; release_volume foreign-role team-b
	local verdict=PASS
	[ -n "$msg1" ] && [ -n "$msg2" ] && [ -z "$left" ] && [ "$refused" -gt 0 ] && [ "$phase1" = Pending ] && [ "$phase2" = Pending ] || verdict=FAIL
	result f $verdict "bad volume ($phase1): \"$msg1\"; team-b naming team-a's role ($phase2, STS refusals $refused): \"$msg2\"; left mounted: ${left:-nothing}"
}

# g. Two namespaces, each with its own service account and role: separate mounts.
scenario_g() {
	create_pod team-a team-a app "$(attrs $ROLE_A /e2e/team-a)" "$(show_script token)"
	create_pod team-b team-b app "$(attrs $ROLE_B /e2e/team-b)" "$(show_script token)"
	wait_ready team-a team-a; wait_ready team-b team-b
	wait_for 20 "team-a's output" log_has team-a team-a VALUE=
	wait_for 20 "team-b's output" log_has team-b team-b VALUE=
	local va vb ka kb subs
	va=$(pod_log team-a team-a | grep -o 'VALUE=.*' | head -1)
	vb=$(pod_log team-b team-b | grep -o 'VALUE=.*' | head -1)
	ka=$(shared_mount_of "$(pod_uid team-a team-a)"); kb=$(shared_mount_of "$(pod_uid team-b team-b)")
	subs=$(gate_records | jq_ "print(','.join(sorted({x['role'].split('/')[-1] + '<-' + x['sub'].split(':')[2] for x in d['assume'] if x['granted'] and x['role'] in ('$ROLE_A', '$ROLE_B')})))")
	local verdict=FAIL
	[ "$va" = VALUE=team-a-value ] && [ "$vb" = VALUE=team-b-value ] && [ -n "$ka" ] && [ -n "$kb" ] && [ "$ka" != "$kb" ] &&
		mounted "$ka" && mounted "$kb" && verdict=PASS
	result g $verdict "team-a read $va via shared mount ${ka##*/}, team-b read $vb via ${kb##*/}; roles granted: $subs"
	kubectl -n team-a delete pod team-a --wait=false >/dev/null
	kubectl -n team-b delete pod team-b --wait=false >/dev/null
	release_volume team-a team-a; release_volume team-b team-b
}

# r. A rotation followed in pods (docs/KUBERNETES.md, "When a secret rotates,
# in a pod"): a busybox pod reads its volume's @changes and, on each line,
# the file again; a second pod has `ssmfs exec` (the project's image) as its
# entrypoint, its child's environment from the volume, restarted on each
# change. Three new versions are put in moto; each pod must show each, and
# the time from the put's answer to the line in the pod's log (the
# container runtime's timestamp) is measured. The volume's TTL is 2 s: with
# a stream open, the daemon refreshes what the stream covers before the TTL
# runs out, so a rotation shows within about the TTL and a second.
ROTATED=/e2e/rotate/db
put_param() { # NAME VALUE: the time (ms) moto answered the put, and the new version
	AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing .venv/bin/python - "http://127.0.0.1:$MOTO_PORT" "$1" "$2" <<-'PY'
	import sys, time, boto3
	ssm = boto3.client("ssm", endpoint_url=sys.argv[1], region_name="us-east-1")
	answer = ssm.put_parameter(Name=sys.argv[2], Value=sys.argv[3], Type="SecureString", Overwrite=True)
	print(int(time.time() * 1000), answer["Version"])
	PY
}
log_line_ms() { # NAMESPACE POD PATTERN: when the pod's first log line matching PATTERN was logged (ms)
	local ts
	ts=$(pod_log_raw "$1" "$2" | grep -m1 -- "$3" | cut -d' ' -f1)
	[ -n "$ts" ] && date -d "$ts" +%s%3N
}
# Opens the stream before it says WATCHING; the host puts only after that.
WATCH_SCRIPT="trap 'exit 0' TERM
v=; read -r v < /mnt/s/db || true; echo \"VALUE=\$v\"
exec 3< /mnt/s/@changes
echo WATCHING
while read -r path version <&3; do
  v=; read -r v < \"/mnt/s/\$path\" || true
  echo \"CHANGE \$path \$version VALUE=\$v\"
done
echo 'STREAM ENDED'
sleep 3600 & wait"
exec_pod_yaml() { # NAME NAMESPACE SERVICE_ACCOUNT ATTRS
	# The ssmfs image holds ssmfs alone: an init container copies busybox
	# (static) into an emptyDir for the child to be.
	cat <<-YAML
	apiVersion: v1
	kind: Pod
	metadata: {name: $1, namespace: $2}
	spec:
	  serviceAccountName: $3
	  automountServiceAccountToken: false
	  restartPolicy: Never
	  terminationGracePeriodSeconds: 5
	  initContainers:
	  - name: tools
	    image: $IMG_BUSYBOX
	    imagePullPolicy: Never
	    command: [/bin/busybox, cp, /bin/busybox, /tools/busybox]
	    volumeMounts: [{name: tools, mountPath: /tools}]
	  containers:
	  - name: c
	    image: localhost/ssmfs:e2e-1
	    imagePullPolicy: Never
	    securityContext: {runAsUser: 0}
	    args: [exec, --env, DB=/mnt/s/db, --on-change, restart, --grace, 2s, --,
	           /tools/busybox, sh, -c, 'echo "CHILD DB=\$DB"; exec /tools/busybox sleep 3600']
	    volumeMounts: [{name: s, mountPath: /mnt/s, readOnly: true}, {name: tools, mountPath: /tools, readOnly: true}]
	  volumes:
	  - name: s
	    $(volume_source "$1" "$4")
	  - name: tools
	    emptyDir: {}
	YAML
}
scenario_r() {
	local attrs_r t v ts n lat_watch="" lat_exec="" missed=""
	attrs_r=$(attrs $ROLE_AIRFLOW /e2e/rotate '"ttl": "2s"')
	put_param $ROTATED initial >/dev/null
	create_pod rotation-watch airflow airflow-worker "$attrs_r" "$WATCH_SCRIPT"
	prepare_volume rotation-exec airflow "$attrs_r"
	exec_pod_yaml rotation-exec airflow airflow-worker "$attrs_r" | kubectl create -f - >/dev/null
	wait_ready airflow rotation-watch; wait_ready airflow rotation-exec
	wait_for 20 "the watcher's stream" log_has airflow rotation-watch WATCHING
	wait_for 20 "exec's first child" log_has airflow rotation-exec 'CHILD DB=initial'
	local first
	first="$(pod_log airflow rotation-watch | grep -o 'VALUE=.*' | head -1), exec's child $(pod_log airflow rotation-exec | grep -o 'CHILD DB=.*' | head -1)"
	for n in 1 2 3; do
		read -r t v < <(put_param $ROTATED "rotated-$n")
		if wait_for 20 "the watcher's line for version $v" log_has airflow rotation-watch "CHANGE db $v VALUE=rotated-$n"; then
			ts=$(log_line_ms airflow rotation-watch "CHANGE db $v VALUE=rotated-$n")
			lat_watch+="$((ts - t)) "
		else
			missed+="watcher v$v; "
		fi
		if wait_for 30 "exec's child with version $v" log_has airflow rotation-exec "CHILD DB=rotated-$n"; then
			ts=$(log_line_ms airflow rotation-exec "CHILD DB=rotated-$n")
			lat_exec+="$((ts - t)) "
		else
			missed+="exec v$v; "
		fi
	done
	pod_log airflow rotation-watch >"$LOGS/r_watch.log"
	pod_log airflow rotation-exec >"$LOGS/r_exec.log"
	local ended=""
	log_has airflow rotation-watch 'STREAM ENDED' && ended="the watcher's stream ended; "
	kubectl -n airflow delete pod rotation-watch rotation-exec --wait=true --timeout=60s >/dev/null
	release_volume rotation-watch airflow; release_volume rotation-exec airflow
	local verdict=PASS
	[ -z "$missed" ] && [ -z "$ended" ] || verdict=FAIL
	result r $verdict "started with $first; 3 puts: @changes line + new value in the watcher after ${lat_watch% } ms (put answered -> pod log), exec restarted its child with the new env after ${lat_exec% } ms (ttl 2s, debounce 500ms)${missed:+; missed: ${missed%; }}${ended:+; ${ended%; }}"
}

# d. A reader through the driver's upgrade and restarts.
phase_stats() { # POD FROM TO (UTC ISO times): reads, failed reads, longest read
	pod_log_raw airflow "$1" | awk -v a="$2" -v b="$3" '
		$1 >= a && $1 <= b && /STAT/ { for (i = 1; i <= NF; i++) { split($i, kv, "=");
			if (kv[1] == "ok") ok += kv[2]; if (kv[1] == "fail") f += kv[2]; if (kv[1] == "max_ms" && kv[2] > m) m = kv[2] } }
		END { printf "%d %d %d\n", ok, f, m }'
}
pod_log_raw() { local uid; uid=$(pod_uid "$1" "$2"); cat /var/log/pods/"$1_$2_$uid"/c/*.log 2>/dev/null; }
utc() { date -u +%Y-%m-%dT%H:%M:%S.%NZ; }
ds_pods() { kubectl -n kube-system get pods -l app.kubernetes.io/component="$1" -o jsonpath='{.items[*].metadata.name}'; }
ds_ready() { # both DaemonSets rolled out and ready
	kubectl -n kube-system rollout status ds/ssmfs-csi-node --timeout=5s &&
		kubectl -n kube-system rollout status ds/ssmfs-csi-serve --timeout=5s
}
# Scenario d starts from an earlier release: its binary and its chart, from
# a git worktree of that commit (the commit before issue 32, which changed
# the control socket's messages, the holder's fd contract and the chart).
old_release() { # builds $OLD_BINARY once (its own target directory)
	[ -x "$OLD_BINARY" ] && [ -d "$OLD_CHART" ] && return 0
	git cat-file -e "$UPGRADE_FROM^{commit}" 2>/dev/null ||
		{ echo "k8s_e2e: commit $UPGRADE_FROM (K8S_E2E_UPGRADE_FROM) is not in this clone: fetch it, or set another" >&2; return 1; }
	git worktree prune
	[ -d "$OLD_SRC" ] || git worktree add --detach "$OLD_SRC" "$UPGRADE_FROM" >/dev/null
	log "building the earlier release's ssmfs ($UPGRADE_FROM, a worktree in $OLD_SRC)"
	(cd "$OLD_SRC" && CARGO_TARGET_DIR=$CACHE/target-old cargo build --quiet --bin ssmfs)
	mkdir -p "$(dirname "$OLD_BINARY")"
	cp "$CACHE/target-old/debug/ssmfs" "$OLD_BINARY"
}
volume_pods() { kubectl get pods -A --no-headers 2>/dev/null | awk '$1 ~ /^(airflow|team-a|team-b)$/' | wc -l; }
no_volume_pods() { [ "$(volume_pods)" = 0 ]; }
no_shared_mounts() { [ "$(shared_mounts)" = 0 ]; }
no_driver_pods() { [ -z "$(ds_pods node)$(ds_pods serve)" ]; }
# Every mount gone, then the driver: the earlier release starts on a node
# with nothing of this tree's on it.
install_earlier_release() {
	local ns
	for ns in airflow team-a team-b; do kubectl -n $ns delete pods --all --wait=false >/dev/null 2>&1 || true; done
	wait_for 120 "the earlier scenarios' pods gone" no_volume_pods
	wait_for 120 "their shared mounts gone (linger $LINGER)" no_shared_mounts
	helm uninstall ssmfs-csi --namespace kube-system --wait --timeout 120s >>"$LOGS/helm-upgrade.log" 2>&1
	wait_for 120 "this tree's driver pods gone" no_driver_pods
	install_driver "$OLD_CHART" e2e-1
}
# One driver change under the reader: helm upgrade or rollback, then both
# DaemonSets rolled out and the driver registered. Prints the phase's name.
driver_change() { # NAME HELM-ARGS...
	local name=$1 node0 serve0 node1 serve1
	shift
	node0=$(ds_pods node); serve0=$(ds_pods serve)
	helm "$@" >>"$LOGS/helm-upgrade.log" 2>&1
	wait_for 240 "$name rolled out" ds_ready
	wait_for 60 "the driver registered" csinode_has_driver
	sleep 5
	node1=$(ds_pods node); serve1=$(ds_pods serve)
	echo "$name (node pod $([ "$node0" != "$node1" ] && echo replaced || echo KEPT), serve pod $([ "$serve0" != "$serve1" ] && echo replaced || echo KEPT))"
}
new_pod_reads() { # NAME: a pod created now gets a volume and reads all 20
	create_pod "$1" airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app)" "$TASK_SCRIPT"
	wait_ready airflow "$1" 120 && wait_for 20 "$1's reads" log_has airflow "$1" 'READS ok=20 fail=0'
}
scenario_d() {
	install_earlier_release
	create_pod reader airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app)" "$READER_SCRIPT"
	wait_ready airflow reader
	sleep 10
	local phases=() a b name
	a=$(utc); sleep 10; b=$(utc); phases+=("steady 10 s on $UPGRADE_FROM|$a|$b")
	a=$(utc)
	# shellcheck disable=SC2046
	name=$(driver_change "helm upgrade to this tree (e2e-2)" upgrade ssmfs-csi deploy/helm/ssmfs-csi --namespace kube-system $(helm_values e2e-2))
	b=$(utc); phases+=("$name|$a|$b")
	local upgraded=no
	new_pod_reads after-upgrade && upgraded=yes
	# A second reader on a mount this tree makes (a TTL variant, so not the
	# first reader's): the rollback's earlier plugin must adopt it too.
	create_pod reader-new airflow airflow-worker "$(attrs $ROLE_AIRFLOW /e2e/app '"ttl": "5s"')" "$READER_SCRIPT"
	wait_ready airflow reader-new
	a=$(utc)
	stop_bg kubelet 20; start_kubelet
	wait_for 120 "node Ready after the kubelet restart" node_ready
	sleep 15; b=$(utc); phases+=("kubelet restart|$a|$b")
	a=$(utc)
	stop_bg containerd 20; start_containerd
	wait_for 120 "node Ready after the containerd restart" node_ready
	sleep 15; b=$(utc); phases+=("containerd restart|$a|$b")
	local node1 node2
	node1=$(ds_pods node)
	a=$(utc)
	kubectl -n kube-system delete pod -l app.kubernetes.io/component=node --wait=true --timeout=60s >/dev/null
	wait_for 120 "the new plugin pod" ds_ready
	wait_for 60 "the driver registered" csinode_has_driver
	sleep 5; b=$(utc)
	node2=$(ds_pods node)
	phases+=("plugin pod deleted ($([ "$node1" != "$node2" ] && echo replaced || echo KEPT))|$a|$b")
	a=$(utc)
	name=$(driver_change "helm rollback to $UPGRADE_FROM (e2e-1)" rollback ssmfs-csi 1 --namespace kube-system)
	b=$(utc); phases+=("$name|$a|$b")
	a=$(utc); sleep 10; b=$(utc); phases+=("steady 10 s after|$a|$b")
	local p from to ok f m ok2 f2 m2 total_f=0 detail="" new_read_through_rollback=no
	for p in "${phases[@]}"; do
		IFS='|' read -r name from to <<<"$p"
		read -r ok f m < <(phase_stats reader "$from" "$to")
		read -r ok2 f2 m2 < <(phase_stats reader-new "$from" "$to")
		total_f=$((total_f + f + f2))
		detail+="$name: $ok reads, $f failed, longest ${m} ms"
		[ "$ok2$f2" = 00 ] || detail+=" (this tree's mount: $ok2 reads, $f2 failed, longest ${m2} ms)"
		detail+="; "
		case $name in "helm rollback"*) [ "$ok2" -gt 0 ] && new_read_through_rollback=yes ;; esac
	done
	# A pod started after everything: the rolled-back driver still publishes.
	local after=no
	new_pod_reads after-rollback && after=yes
	local verdict=PASS
	[ $total_f = 0 ] && [ $upgraded = yes ] && [ $after = yes ] && [ $new_read_through_rollback = yes ] || verdict=FAIL
	result d $verdict "${detail}a new pod reads after the upgrade: $upgraded, after the rollback: $after"
}

run_scenarios() {
	local sc
	for sc in ${K8S_E2E_SCENARIOS:-i a b c f g r e d}; do
		log "scenario $sc"
		( set -e; scenario_$sc ) &
		wait $! || result $sc FAIL "aborted (see $LOGS and the lines above)"
		if [ $sc = i ] && [ "$VOLUME_MODE" = auto ]; then
			if grep -q $'^i\tPASS' "$LOGS/results.tsv"; then VOLUME_MODE=inline; else VOLUME_MODE=pv; fi
			log "the other scenarios use $VOLUME_MODE volumes"
			[ $VOLUME_MODE = inline ] || result - NOTE "inline volumes refused: scenarios a-g use static PersistentVolumes (ReadOnlyMany) with the same attributes"
		fi
	done
}
print_table() {
	echo
	echo "Kubernetes $K8S_VERSION on containerd $(containerd --version | awk '{print $3}'), one node; ssmfs volumes: $VOLUME_MODE"
	echo
	awk -F'\t' '{ printf "%-3s %-5s %s\n", $1, $2, $3 }' "$LOGS/results.tsv"
}
main() {
	[ "$(id -u)" = 0 ] || { echo "k8s_e2e: run as root" >&2; exit 1; }
	local t_start=$SECONDS
	scripts/setup.sh --k8s-e2e >/dev/null
	if [ -z "$SSMFS_BINARY" ]; then
		# Whichever build is there (the README's demo makes a release one);
		# with none, a debug build (the image is stripped either way).
		for candidate in target/debug/ssmfs target/release/ssmfs; do
			if [ -x "$candidate" ]; then SSMFS_BINARY=$candidate; break; fi
		done
		if [ -z "$SSMFS_BINARY" ]; then
			echo "k8s_e2e: building target/debug/ssmfs" >&2
			cargo build --quiet --bin ssmfs
			SSMFS_BINARY=target/debug/ssmfs
		fi
	fi
	[ -x "$SSMFS_BINARY" ] || { echo "k8s_e2e: no binary at $SSMFS_BINARY (SSMFS_BINARY)" >&2; exit 1; }
	build_k8s
	old_release
	down >/dev/null 2>&1 || true
	mkdir -p "$LOGS"; rm -f "$LOGS"/*.log "$LOGS"/*.tsv "$LOGS"/*.ms
	if [ -z "${K8S_E2E_KEEP:-}" ]; then trap 'down' EXIT; fi
	trap 'exit 130' INT TERM
	start_cluster
	start_aws
	install_driver deploy/helm/ssmfs-csi e2e-2
	log "driver registered; cluster and driver up in $((SECONDS - t_start)) s"
	setup_namespaces
	run_scenarios
	print_table
	echo "(whole run: $((SECONDS - t_start)) s; logs in $LOGS)"
	! grep -q $'\tFAIL\t' "$LOGS/results.tsv"
}

case ${1:-run} in
build) build_k8s ;;
down) down ;;
run) main ;;
scenarios) # against a cluster a K8S_E2E_KEEP=1 run left up (VOLUME_MODE from K8S_E2E_VOLUME)
	: >"$LOGS/results.tsv"; run_scenarios; print_table ;;
functions) ;; # `source scripts/k8s_e2e.sh functions`: the functions, for trying one step by hand
*) echo "usage: k8s_e2e.sh [run|build|down]" >&2; exit 2 ;;
esac
