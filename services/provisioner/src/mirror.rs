//! NodeClaim resources (`kubectl get nodeclaims`): a read-only mirror of the claim records,
//! kept by the leader when `service.nodeClaims` is on. A claim's resource is created when the
//! record appears, its status follows the record, it goes when the claim is Deleted (or its
//! record is gone), and a claim that fails gets a Warning Event on its NodeClaim.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use shoal_core::{
    ClaimPhase,
    crd::{NodeClaim, NodeClaimStatus},
};
use shoal_runtime::leader::LeaderWatch;
use shoal_state::PrefixCache;
use tokio_util::sync::CancellationToken;

/// Label on the mirrors (so foreign NodeClaims, e.g. Karpenter's of another group, are left
/// alone — they are a different resource anyway, but a list stays cheap).
const MANAGED: &str = "app.kubernetes.io/managed-by=shoal";

/// How often the mirror catches up when nothing changes (it also wakes on every claim change).
const RESYNC: Duration = Duration::from_secs(5);

/// Keeps the mirror while this replica leads, until `shutdown`.
pub async fn run(
    client: Client,
    claims: PrefixCache,
    leader: Option<LeaderWatch>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let Some(leader) = leader else {
        return Ok(());
    };
    shoal_runtime::leader::while_leading(leader, shutdown, |_, term| {
        let (client, claims) = (client.clone(), claims.clone());
        async move {
            let api: Api<NodeClaim> = Api::all(client.clone());
            let mut changes = claims.changes();
            let mut failed_seen: BTreeMap<String, ()> = BTreeMap::new();
            loop {
                if let Err(err) = sync(&api, &client, &claims, &mut failed_seen).await {
                    tracing::warn!(error = %err, "NodeClaim mirror not up to date");
                }
                tokio::select! {
                    _ = term.cancelled() => return Ok(()),
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(RESYNC) => {}
                }
                // Coalesce bursts (a scale-up of hundreds of claims is one pass, not hundreds).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    })
    .await
}

async fn sync(
    api: &Api<NodeClaim>,
    client: &Client,
    claims: &PrefixCache,
    failed_seen: &mut BTreeMap<String, ()>,
) -> Result<(), kube::Error> {
    let records = shoal_state::records::decode_claims(&claims.values());
    let existing: BTreeMap<String, NodeClaim> = api
        .list(&ListParams::default().labels(MANAGED))
        .await?
        .items
        .into_iter()
        .filter_map(|c| Some((c.metadata.name.clone()?, c)))
        .collect();
    let mut wanted = BTreeMap::new();
    for record in &records {
        if record.phase == ClaimPhase::Deleted {
            continue;
        }
        wanted.insert(record.id.clone(), ());
        let status = NodeClaimStatus::of(record);
        match existing.get(&record.id) {
            None => {
                let mirror = NodeClaim::mirror(record);
                match api.create(&PostParams::default(), &mirror).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(err) => return Err(err),
                }
                // Status is a subresource: create ignores it.
                let patch = serde_json::json!({ "status": status });
                api.patch_status(&record.id, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Some(current) if current.status.as_ref() != Some(&status) => {
                let patch = serde_json::json!({ "status": status });
                api.patch_status(&record.id, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Some(_) => {}
        }
        if record.phase == ClaimPhase::Failed && failed_seen.insert(record.id.clone(), ()).is_none()
        {
            failure_event(client, record).await;
        }
    }
    for name in existing.keys().filter(|n| !wanted.contains_key(*n)) {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err),
        }
    }
    failed_seen.retain(|id, _| wanted.contains_key(id));
    Ok(())
}

/// A Warning Event on the NodeClaim saying why its claim failed (cluster-scoped objects' Events
/// live in `default`).
async fn failure_event(client: &Client, record: &shoal_core::claim::NodeClaim) {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", record.id)),
            namespace: Some("default".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("shoal.dev/v1alpha1".into()),
            kind: Some("NodeClaim".into()),
            name: Some(record.id.clone()),
            ..Default::default()
        },
        reason: Some("LaunchFailed".into()),
        message: Some(format!(
            "claim for pool {} failed on backend {}: {}",
            record.pool, record.backend, record.failure_reason
        )),
        type_: Some("Warning".into()),
        count: Some(1),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        source: Some(EventSource {
            component: Some("shoal-provisioner".into()),
            host: None,
        }),
        reporting_component: Some("shoal.dev/provisioner".into()),
        ..Default::default()
    };
    if let Err(err) = Api::<Event>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &event)
        .await
    {
        tracing::warn!(claim = %record.id, error = %err, "failure Event not written");
    }
}
