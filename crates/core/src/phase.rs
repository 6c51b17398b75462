//! NodeClaim phases and the transitions between them that the provisioner may make.

use shoal_proto::v1::ClaimPhase as ProtoPhase;

/// Where a NodeClaim is in its life.
///
/// `Pending → Launched → Registered → Ready`, then `Draining → Terminating → Deleted`; any
/// non-terminal phase may fail. `Deleted` and `Failed` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum ClaimPhase {
    /// Recorded in the store; no backend call yet.
    Pending,
    /// The backend created the instance.
    Launched,
    /// The Node appeared in Kubernetes.
    Registered,
    /// The Node is Ready and its startup taints are gone.
    Ready,
    /// Cordoned; pods being evicted.
    Draining,
    /// Instance and Node being deleted.
    Terminating,
    /// Gone from the backend and from Kubernetes.
    Deleted,
    /// Gave up; see the claim's failure reason.
    Failed,
}

impl ClaimPhase {
    /// True for phases a claim never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, ClaimPhase::Deleted | ClaimPhase::Failed)
    }

    /// True while the claim holds (or may hold) a backend instance.
    pub fn holds_instance(self) -> bool {
        !matches!(
            self,
            ClaimPhase::Pending | ClaimPhase::Deleted | ClaimPhase::Failed
        )
    }

    /// Whether the provisioner may move a claim from `self` to `next`.
    pub fn can_become(self, next: ClaimPhase) -> bool {
        use ClaimPhase::*;
        match (self, next) {
            (a, b) if a == b => false,
            (Deleted | Failed, _) => false,
            (_, Failed) => true,
            (Pending, Launched) | (Launched, Registered) | (Registered, Ready) => true,
            // A node can register and be Ready before we see the intermediate phase.
            (Launched, Ready) => true,
            // Scale-down may start from any live phase; rollback of a never-ready node too.
            (Launched | Registered | Ready, Draining | Terminating) => true,
            (Draining, Terminating) | (Terminating, Deleted) => true,
            // A drain that times out returns the node to service.
            (Draining, Ready) => true,
            _ => false,
        }
    }
}

impl From<ClaimPhase> for ProtoPhase {
    fn from(p: ClaimPhase) -> Self {
        match p {
            ClaimPhase::Pending => ProtoPhase::Pending,
            ClaimPhase::Launched => ProtoPhase::Launched,
            ClaimPhase::Registered => ProtoPhase::Registered,
            ClaimPhase::Ready => ProtoPhase::Ready,
            ClaimPhase::Draining => ProtoPhase::Draining,
            ClaimPhase::Terminating => ProtoPhase::Terminating,
            ClaimPhase::Deleted => ProtoPhase::Deleted,
            ClaimPhase::Failed => ProtoPhase::Failed,
        }
    }
}

impl TryFrom<ProtoPhase> for ClaimPhase {
    type Error = ();
    fn try_from(p: ProtoPhase) -> Result<Self, ()> {
        Ok(match p {
            ProtoPhase::Unspecified => return Err(()),
            ProtoPhase::Pending => ClaimPhase::Pending,
            ProtoPhase::Launched => ClaimPhase::Launched,
            ProtoPhase::Registered => ClaimPhase::Registered,
            ProtoPhase::Ready => ClaimPhase::Ready,
            ProtoPhase::Draining => ClaimPhase::Draining,
            ProtoPhase::Terminating => ClaimPhase::Terminating,
            ProtoPhase::Deleted => ClaimPhase::Deleted,
            ProtoPhase::Failed => ClaimPhase::Failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimPhase::*;
    use super::*;

    const ALL: [ClaimPhase; 8] = [
        Pending,
        Launched,
        Registered,
        Ready,
        Draining,
        Terminating,
        Deleted,
        Failed,
    ];

    #[test]
    fn happy_paths_are_allowed() {
        for pair in [
            Pending,
            Launched,
            Registered,
            Ready,
            Draining,
            Terminating,
            Deleted,
        ]
        .windows(2)
        {
            assert!(
                pair[0].can_become(pair[1]),
                "{:?} -> {:?}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn terminal_phases_are_final_and_nothing_goes_back_to_pending() {
        for to in ALL {
            assert!(!Deleted.can_become(to));
            assert!(!Failed.can_become(to));
            assert!(!to.can_become(Pending));
        }
    }

    #[test]
    fn proto_mapping_round_trips() {
        for p in ALL {
            assert_eq!(ClaimPhase::try_from(ProtoPhase::from(p)), Ok(p));
        }
        assert!(ClaimPhase::try_from(ProtoPhase::Unspecified).is_err());
    }
}
