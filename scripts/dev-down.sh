#!/usr/bin/env bash
# Stops what scripts/dev-up.sh started (SIGTERM, then SIGKILL after 10 s) and removes its state;
# logs are kept in .dev/logs/ (override the folder with SHOAL_DEV_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
dev="${SHOAL_DEV_DIR:-$PWD/.dev}"
[ -f "$dev/pids" ] || { echo "dev-down: nothing running ($dev/pids not found)"; exit 0; }
while read -r pid name; do
  kill -TERM "$pid" 2>/dev/null && echo "dev-down: stopping $name ($pid)" || true
done < "$dev/pids"
for _ in $(seq 1 100); do
  alive=0
  while read -r pid _; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$dev/pids"
  [ $alive -eq 0 ] && break
  sleep 0.1
done
while read -r pid name; do
  kill -KILL "$pid" 2>/dev/null && echo "dev-down: $name did not stop in 10 s; killed" || true
done < "$dev/pids"
rm -rf "$dev/pids" "$dev/etcd" "$dev/prometheus"
echo "dev-down: stopped; logs in $dev/logs/"
