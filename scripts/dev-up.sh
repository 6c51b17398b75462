#!/usr/bin/env bash
# The distributed setup on one machine: etcd, the simulated cluster (playing a scenario), Prometheus
# scraping the simulator and every service, the metrics service, two deciders, two provisioners
# and the reconciler, each its own process on loopback. State, logs and pids under .dev/
# (override with SHOAL_DEV_DIR). Stop everything with scripts/dev-down.sh. The services speak mTLS
# with certificates from scripts/dev-certs.sh (in .dev/certs); etcd stays plaintext on loopback.
#
#   scripts/dev-up.sh [scenario.yaml]      # default deploy/scenarios/ramp.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dev="${SHOAL_DEV_DIR:-$root/.dev}"
scenario="${1:-deploy/scenarios/ramp.yaml}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"

if [ -f "$dev/pids" ]; then
  echo "dev-up: already running (see $dev/pids); run scripts/dev-down.sh first" >&2
  exit 1
fi
for tool in etcd prometheus; do
  command -v "$tool" >/dev/null || { echo "dev-up: $tool is missing; run scripts/install-deps.sh" >&2; exit 1; }
done
cargo build --workspace --bins --quiet
bin="$CARGO_TARGET_DIR/debug"
mkdir -p "$dev/logs" "$dev/etcd" "$dev/prometheus"
: > "$dev/pids"

start() { # name, command...
  local name=$1; shift
  "$@" > "$dev/logs/$name.log" 2>&1 &
  echo "$! $name" >> "$dev/pids"
}
wait_port() { # port, what
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "dev-up: $2 did not open port $1; see $dev/logs/" >&2
  exit 1
}

start etcd etcd --data-dir "$dev/etcd" --listen-client-urls http://127.0.0.1:22379 \
  --advertise-client-urls http://127.0.0.1:22379 --listen-peer-urls http://127.0.0.1:22380
wait_port 22379 etcd
start sim "$bin/shoal-sim" serve --addr 127.0.0.1:26443 --kubeconfig "$dev/kubeconfig" --scenario "$scenario"
wait_port 26443 simulator

cat > "$dev/pool-general.yaml" <<'POOL'
apiVersion: shoal.dev/v1alpha1
kind: NodePool
metadata: { name: general }
spec:
  provider: { backend: sim }
  template:
    capacity: { cpu: "2", memory: 4Gi }
  limits: { minNodes: 1, maxNodes: 8 }
  scaleDown: { unneededFor: 30s, cooldown: 10s, maxConcurrent: 2, drainTimeout: 30s }
POOL

cat > "$dev/prometheus.yml" <<PROM
global: { scrape_interval: 5s, evaluation_interval: 5s }
rule_files: [ "$root/deploy/k8s/prometheus/rules.yaml" ]
scrape_configs:
- job_name: simulator
  static_configs: [ { targets: [ "127.0.0.1:26443" ] } ]
- job_name: shoal
  static_configs:
  - targets: [ "127.0.0.1:29091", "127.0.0.1:29092", "127.0.0.1:29192", "127.0.0.1:29093", "127.0.0.1:29193", "127.0.0.1:29094" ]
PROM
start prometheus prometheus --config.file="$dev/prometheus.yml" --storage.tsdb.path="$dev/prometheus" \
  --web.listen-address=127.0.0.1:29090
wait_port 29090 prometheus

bash scripts/dev-certs.sh "$dev/certs" >/dev/null
certs="$dev/certs"
tls() { # service: its certificate (mTLS), roles for the operator certificate
  echo "--set=grpc.tls.certFile=$certs/$1.crt --set=grpc.tls.keyFile=$certs/$1.key" \
    "--set=grpc.tls.caFile=$certs/ca.crt --set=grpc.auth.identities.shoal-operator=admin"
}
common=(--etcd-endpoints=http://127.0.0.1:22379 --set=telemetry.logLevel=info)
kube="--set=service.kube.kubeconfig=$dev/kubeconfig"
# shellcheck disable=SC2046 # tls prints flags to split
start metrics "$bin/shoal-metrics" --grpc-addr=127.0.0.1:25051 --admin-addr=127.0.0.1:29091 "${common[@]}" "$kube" \
  --set=service.prometheus.url=http://127.0.0.1:29090 $(tls metrics) --set=grpc.auth.identities.shoal-decider=viewer
cat > "$dev/provisioner.yaml" <<PROV
service:
  kube: { kubeconfig: $dev/kubeconfig }
  backends: { sim: { url: "http://127.0.0.1:26443" } }
PROV
for i in 1 2; do
  start "provisioner-$i" "$bin/shoal-provisioner" --grpc-addr=127.0.0.1:2$((5 + (i - 1)))053 \
    --admin-addr=127.0.0.1:29$((0 + i - 1))93 --instance-id="provisioner-$i" "${common[@]}" \
    --config="$dev/provisioner.yaml" $(tls provisioner) \
    --set=grpc.auth.identities.shoal-decider=admin --set=grpc.auth.identities.shoal-reconciler=admin
done
for i in 1 2; do
  start "decider-$i" "$bin/shoal-decider" --grpc-addr=127.0.0.1:2$((5 + (i - 1)))052 \
    --admin-addr=127.0.0.1:29$((0 + i - 1))92 --instance-id="decider-$i" "${common[@]}" \
    --set=service.metricsAddr=https://127.0.0.1:25051 --set=service.provisionerAddr=https://127.0.0.1:25053 \
    --set=service.poolFiles="$dev/pool-general.yaml" $(tls decider)
done
start reconciler "$bin/shoal-reconciler" --grpc-addr=127.0.0.1:25054 --admin-addr=127.0.0.1:29094 \
  --instance-id=reconciler-1 "${common[@]}" "$kube" --set=service.provisionerAddr=https://127.0.0.1:25053 \
  $(tls reconciler)
for port in 25051 25052 26052 25053 26053 25054; do wait_port "$port" "a service"; done

cat <<INFO
Shoal is up (logs: $dev/logs/, stop: scripts/dev-down.sh)
  metrics      grpc 127.0.0.1:25051   admin http://127.0.0.1:29091/metrics
  decider      grpc 127.0.0.1:25052, 127.0.0.1:26052 (two replicas, one leads)
  provisioner  grpc 127.0.0.1:25053, 127.0.0.1:26053 (two replicas, one leads)
  reconciler   grpc 127.0.0.1:25054
  Prometheus   http://127.0.0.1:29090   etcd http://127.0.0.1:22379
  kubectl --kubeconfig $dev/kubeconfig get nodes,pods
  grpcurl -cacert $certs/ca.crt -cert $certs/operator.crt -key $certs/operator.key \
    127.0.0.1:25052 shoal.v1.DeciderService/ListDecisions
INFO
