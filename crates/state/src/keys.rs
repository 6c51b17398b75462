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
