//! The key layout under the store namespace (`/shoal/v1/` by default). Every key Shoal writes is
//! built here, so the layout lives in one place.

/// Default namespace of every key.
pub const DEFAULT_NAMESPACE: &str = "/shoal/v1/";

/// `pools/<name>`: a NodePool spec.
pub fn pool(name: &str) -> String {
    format!("pools/{name}")
}

/// `claims/<id>`: a NodeClaim.
pub fn claim(id: &str) -> String {
    format!("claims/{id}")
}

/// `ops/<id>`: a provisioner operation.
pub fn operation(id: &str) -> String {
    format!("ops/{id}")
}

/// `election/<service>`: the key whose holder leads `service`.
pub fn election(service: &str) -> String {
    format!("election/{service}")
}

/// `leaders/<service>`: the current leader's status record, written (fenced) by the leader.
pub fn leader_record(service: &str) -> String {
    format!("leaders/{service}")
}

/// `pools/`: every NodePool.
pub const POOLS: &str = "pools/";

/// `claims/`: every NodeClaim.
pub const CLAIMS: &str = "claims/";

/// `ops/`: every provisioner operation.
pub const OPERATIONS: &str = "ops/";

/// `decisions/`: decision history, oldest first.
pub const DECISIONS: &str = "decisions/";

/// `decisions/<unix ms, 13 digits>-<id>`: one decision; keys sort by time.
pub fn decision(unix_ms: u64, id: &str) -> String {
    format!("decisions/{unix_ms:013}-{id}")
}

/// `decider/history`: cooldowns and unneeded-node timers (fenced, leader only).
pub const DECIDER_HISTORY: &str = "decider/history";

/// `decider/paused`: whether the decider acts on its decisions.
pub const DECIDER_PAUSED: &str = "decider/paused";

/// `ids/`: every reserved backend id.
pub const IDS: &str = "ids/";

/// `ids/<backend>/<id>`: a reserved backend id (e.g. a Proxmox VMID or a node name).
pub fn reserved_id(backend: &str, id: &str) -> String {
    format!("ids/{backend}/{id}")
}

/// `backends/<backend>/<key>`: what a backend must remember itself (e.g. which instance of a
/// Cluster Autoscaler node group realises which claim).
pub fn backend_record(backend: &str, key: &str) -> String {
    format!("backends/{backend}/{key}")
}

/// `idempotency/<key>`: the operation created for a caller's idempotency key.
pub fn idempotency(key: &str) -> String {
    format!("idempotency/{key}")
}

/// `audit/<unix ms, 13 digits>-<id>`: one mutating call, append-only.
pub fn audit(unix_ms: u64, id: &str) -> String {
    format!("audit/{unix_ms:013}-{id}")
}

/// `drifts/`: detected drifts, oldest first.
pub const DRIFTS: &str = "drifts/";

/// `drifts/<unix ms, 13 digits>-<id>`: one detected drift and its repair.
pub fn drift(unix_ms: u64, id: &str) -> String {
    format!("drifts/{unix_ms:013}-{id}")
}

/// `ledgers/<pool>`: the pool ledger every create in the pool bumps (see `records::PoolLedger`).
pub fn ledger(pool: &str) -> String {
    format!("ledgers/{pool}")
}

/// `capacity/`: capacity requests (ProvisioningRequests and `RequestCapacity` calls).
pub const CAPACITY: &str = "capacity/";

/// `capacity/<id>`: one capacity request and its conditions (protobuf `CapacityRequest`).
pub fn capacity_request(id: &str) -> String {
    format!("capacity/{id}")
}

/// `cluster`: this store's cluster identity.
pub const CLUSTER: &str = "cluster";

/// `idempotency/`: every idempotency key.
pub const IDEMPOTENCY: &str = "idempotency/";

/// The time (Unix ms) in a time-ordered history key (`decisions/…`, `drifts/…`, `audit/…`).
pub fn history_time(key: &str) -> Option<u64> {
    let (_, rest) = key.split_once('/')?;
    rest.get(..13)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn history_keys_carry_their_time() {
        assert_eq!(
            super::history_time(&super::decision(1_700_000_000_123, "d1")),
            Some(1_700_000_000_123)
        );
        assert_eq!(super::history_time(&super::drift(42, "x")), Some(42));
        assert_eq!(super::history_time("claims/c-1"), None);
    }
}
