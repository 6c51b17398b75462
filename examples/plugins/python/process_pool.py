"""A Shoal backend plugin in Python: a "node pool" of processes.

Serves `shoal.v1.NodeProvider` (proto/shoal/v1/provider.proto) with grpcio. Each instance is a
process running the command given with --node-command (by default a `shoal-sim agent`, a
simulated kubelet that registers its Node with the simulator at --api), started with the node's
name, capacity, labels and taints. It keeps the contract in docs/plugins.md:

- Create is idempotent per claim id: a claim that has an instance gets the same one back.
- Every instance carries its ownership labels; List returns those carrying every label asked.
- Deleting an instance that is not there succeeds.
- A spec without a claim id or node name is INVALID_ARGUMENT; a process that cannot start is
  UNAVAILABLE (Shoal retries), a class this plugin does not have is FAILED_PRECONDITION.

Stubs are generated from proto/ at start with grpcio-tools (nothing generated is committed).

    python process_pool.py --listen 127.0.0.1:50070 --api http://127.0.0.1:6443 \
        --sim-binary target/debug/shoal-sim
"""

import argparse
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))


VERSION = "0.1.0"


def seconds(text):
    """A duration: "2s", "500ms" or plain seconds."""
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    return float(text[:-1] if text.endswith("s") else text)


def load_stubs(proto_root):
    """Compile provider.proto (and what it imports) into a temp dir and import the modules."""
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="shoal-stubs-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for name in ("common", "provider"):
        code = protoc.main([
            "protoc", "-I" + proto_root, "-I" + well_known, "--python_out=" + out,
            "--grpc_python_out=" + out, os.path.join(proto_root, "shoal/v1/%s.proto" % name)])
        if code != 0:
            sys.exit("protoc failed on %s.proto" % name)
    sys.path.insert(0, out)
    return (importlib.import_module("shoal.v1.provider_pb2"),
            importlib.import_module("shoal.v1.provider_pb2_grpc"),
            importlib.import_module("shoal.v1.common_pb2"))


def taint_flag(taint, common):
    effect = {common.TAINT_EFFECT_PREFER_NO_SCHEDULE: "PreferNoSchedule",
              common.TAINT_EFFECT_NO_EXECUTE: "NoExecute"}.get(taint.effect, "NoSchedule")
    if taint.value:
        return "%s=%s:%s" % (taint.key, taint.value, effect)
    return "%s:%s" % (taint.key, effect)


def make_servicer(pb, pb_grpc, common, args):
    class ProcessPool(pb_grpc.NodeProviderServicer):
        def __init__(self):
            self.lock = threading.Lock()
            self.by_claim = {}  # claim id -> instance record
            self.logs = tempfile.mkdtemp(prefix="process-pool-")

        def Describe(self, request, context):
            return pb.ProviderInfo(name="process-pool/" + VERSION, classes=["default"],
                                   capabilities=["node-names", "idempotent-by-claim"])

        def _instance(self, rec):
            code = rec["proc"].poll()
            state = "running" if code is None else "exited"
            if code is not None and not rec.get("reported"):
                rec["reported"] = True
                with open(rec["log"], errors="replace") as f:
                    tail = f.read()[-2000:]
                print("instance %s (node %s) exited with %s:\n%s" % (rec["id"], rec["name"], code, tail),
                      flush=True)
            return common.Instance(id=rec["id"], pool=rec["pool"], claim_id=rec["claim"], state=state,
                                   labels=rec["labels"], node_name=rec["name"])

        def Create(self, request, context):
            cls = getattr(request, "class")
            if cls not in ("", "default"):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this plugin has no class %r" % cls)
            out = pb.CreateInstancesResponse()
            for spec in request.instances:
                if args.misbehave:
                    break
                if not spec.claim_id or not spec.node_name:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  "instances[].claim_id and node_name are required")
            for spec in request.instances:
                with self.lock:
                    rec = None if args.misbehave else self.by_claim.get(spec.claim_id)
                    if rec is None:
                        print("creating %s for claim %s" % (spec.node_name, spec.claim_id), flush=True)
                        time.sleep(args.create_delay)
                        cpu = "%dm" % (spec.capacity.cpu_millis or 1000)
                        memory = "%d" % (spec.capacity.memory_bytes or (1 << 30))
                        # --exit-with-parent: the node dies with this plugin, even on SIGKILL.
                        cmd = [args.sim_binary, "agent", "--api", args.api, "--name", spec.node_name,
                               "--cpu", cpu, "--memory", memory, "--heartbeat-interval", "2s",
                               "--exit-with-parent"]
                        for key, value in sorted(spec.labels.items()):
                            cmd += ["--label", "%s=%s" % (key, value)]
                        for taint in spec.startup_taints:
                            cmd += ["--taint", taint_flag(taint, common)]
                        instance_id = "proc-" + uuid.uuid4().hex[:12]
                        log = os.path.join(self.logs, instance_id + ".log")
                        try:
                            with open(log, "wb") as out_file:
                                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_file,
                                                        stderr=subprocess.STDOUT)
                        except OSError as e:
                            context.abort(grpc.StatusCode.UNAVAILABLE, "cannot start the node process: %s" % e)
                        rec = {"id": instance_id, "claim": spec.claim_id, "pool": request.pool,
                               "name": spec.node_name, "labels": dict(spec.labels), "proc": proc, "log": log}
                        key = spec.claim_id + ("/" + rec["id"] if args.misbehave else "")
                        self.by_claim[key] = rec
                    out.instances.append(self._instance(rec))
            return out

        def Delete(self, request, context):
            with self.lock:
                known = {rec["id"] for rec in self.by_claim.values()}
                if args.misbehave and any(i not in known for i in request.instance_ids):
                    context.abort(grpc.StatusCode.NOT_FOUND, "no such instance")
                for instance_id in request.instance_ids:
                    for claim, rec in list(self.by_claim.items()):
                        if rec["id"] == instance_id:
                            rec["proc"].terminate()
                            try:
                                rec["proc"].wait(timeout=5)
                            except subprocess.TimeoutExpired:
                                rec["proc"].kill()
                            del self.by_claim[claim]
            return pb.DeleteInstancesResponse()

        def List(self, request, context):
            want = dict(request.owner_labels)
            with self.lock:
                found = [self._instance(rec) for rec in self.by_claim.values()
                         if all(rec["labels"].get(k) == v for k, v in want.items())]
            return pb.ListOwnedInstancesResponse(instances=found)

        def stop_all(self):
            with self.lock:
                for rec in self.by_claim.values():
                    rec["proc"].kill()

    return ProcessPool()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50070")
    parser.add_argument("--api", required=True, help="the simulator's API, http://host:port")
    parser.add_argument("--sim-binary", default="shoal-sim")
    parser.add_argument("--proto-root", default=os.path.join(HERE, "..", "..", "..", "proto"))
    parser.add_argument("--create-delay", type=seconds, default=0.0,
                        help="how long (e.g. 2s, 500ms) to wait before starting each new node process (a slow cloud API)")
    parser.add_argument("--misbehave", action="store_true",
                        help="break the contract on purpose (to see `shoal plugin check` fail): a new "
                             "instance per Create, no INVALID_ARGUMENT, deleting a missing instance fails")
    args = parser.parse_args()
    pb, pb_grpc, common = load_stubs(os.path.abspath(args.proto_root))
    servicer = make_servicer(pb, pb_grpc, common, args)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_NodeProviderServicer_to_server(servicer, server)
    server.add_insecure_port(args.listen)
    server.start()
    print("process-pool plugin listening on %s" % args.listen, flush=True)

    def stop(*_):
        servicer.stop_all()
        server.stop(0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
