//! `shoal plugin check <addr>`: the NodeProvider contract (docs/plugins.md), run against any
//! plugin, one line per point. Creates one instance (labelled with a fresh cluster id, so it
//! touches nothing else) and deletes it again.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use shoal_proto::v1::{self as pb, node_provider_client::NodeProviderClient};
use shoal_runtime::tls::{Tls, TlsConfig};
use tonic::{Code, transport::Channel};

/// `shoal plugin check` flags.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// The plugin, `http://host:port` or `https://host:port`.
    pub address: String,
    /// Client certificate for an https:// plugin.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// Its key.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// CA the plugin's certificate is checked against.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Provider class to create the test instance with.
    #[arg(long, default_value = "")]
    pub class: String,
    /// Pool name the test instance carries.
    #[arg(long, default_value = "conformance")]
    pub pool: String,
    /// Every call must be answered within this.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

struct Report {
    failed: usize,
    slowest: Duration,
}

impl Report {
    fn point(&mut self, name: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => println!("PASS  {name:<22} {detail}"),
            Err(why) => {
                self.failed += 1;
                println!("FAIL  {name:<22} {why}");
            }
        }
    }
}

fn labels(cluster: &str, pool: &str, claim: &str) -> BTreeMap<String, String> {
    [
        ("shoal.dev/cluster", cluster),
        ("shoal.dev/pool", pool),
        ("shoal.dev/claim", claim),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Runs the kit; true when every point passed.
pub async fn check(args: CheckArgs) -> anyhow::Result<bool> {
    let tls = match (&args.cert_file, &args.key_file, &args.ca_file) {
        (None, None, None) => None,
        (cert, key, ca) => Some(Tls::load(&TlsConfig {
            cert_file: cert.clone().unwrap_or_default(),
            key_file: key.clone().unwrap_or_default(),
            ca_file: ca.clone().unwrap_or_default(),
            ..TlsConfig::default()
        })?),
    };
    let channel: Channel = shoal_runtime::layers::channel(&args.address, tls.as_ref())?;
    let mut client = NodeProviderClient::new(channel);
    let mut report = Report {
        failed: 0,
        slowest: Duration::ZERO,
    };
    let deadline = args.timeout;
    let suffix = format!("{:08x}", rand_suffix());
    let cluster = format!("shoal-conformance-{suffix}");
    let claim = format!("c-check-{suffix}");
    let owned = labels(&cluster, &args.pool, &claim);

    macro_rules! call {
        ($method:ident, $request:expr) => {{
            let mut request = tonic::Request::new($request);
            request.set_timeout(deadline);
            let started = Instant::now();
            let answer = client.$method(request).await;
            report.slowest = report.slowest.max(started.elapsed());
            answer.map(|r| r.into_inner())
        }};
    }

    // 1. Describe.
    let described = call!(describe, pb::DescribeProviderRequest {});
    report.point(
        "describe",
        match &described {
            Ok(info) if !info.name.is_empty() => Ok(format!(
                "{} (classes {:?}, capabilities {:?})",
                info.name, info.classes, info.capabilities
            )),
            Ok(_) => Err("Describe answered without a name".into()),
            Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
        },
    );
    if described.is_err() {
        println!("the plugin does not answer; stopping");
        return Ok(false);
    }

    // 2. Create.
    let spec = pb::InstanceSpec {
        claim_id: claim.clone(),
        node_name: format!("{}-check-{suffix}", args.pool),
        labels: owned.clone(),
        startup_taints: vec![],
        capacity: Some(pb::Resources {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            pods: 10,
            ..Default::default()
        }),
    };
    let create = pb::CreateInstancesRequest {
        pool: args.pool.clone(),
        class: args.class.clone(),
        instances: vec![spec.clone()],
    };
    let first = call!(create, create.clone());
    let first_id = match &first {
        Ok(a)
            if a.failures.is_empty() && a.instances.len() == 1 && !a.instances[0].id.is_empty() =>
        {
            Some(a.instances[0].id.clone())
        }
        _ => None,
    };
    report.point(
        "create",
        match (&first, &first_id) {
            (_, Some(id)) => Ok(format!("instance {id}")),
            (Ok(a), None) => Err(format!(
                "expected one instance with an id and no failures, got {} instance(s), failures {:?}",
                a.instances.len(),
                a.failures
            )),
            (Err(s), _) => Err(format!("{:?}: {}", s.code(), s.message())),
        },
    );

    // 3. The same claim again: the same instance, not a second one.
    let again = call!(create, create.clone());
    let listed_claim = call!(
        list,
        pb::ListOwnedInstancesRequest {
            owner_labels: owned.clone(),
        }
    );
    report.point(
        "create-is-idempotent",
        match (&again, &listed_claim, &first_id) {
            (Ok(a), Ok(l), Some(id))
                if a.instances.first().map(|i| &i.id) == Some(id) && l.instances.len() == 1 =>
            {
                Ok("one claim id → one instance".into())
            }
            (Ok(a), Ok(l), _) => Err(format!(
                "second Create answered {:?}, List by the claim label shows {} instance(s)",
                a.instances.iter().map(|i| &i.id).collect::<Vec<_>>(),
                l.instances.len()
            )),
            (Err(s), _, _) | (_, Err(s), _) => Err(format!("{:?}: {}", s.code(), s.message())),
        },
    );

    // 4. List filters by every label.
    let by_cluster = call!(
        list,
        pb::ListOwnedInstancesRequest {
            owner_labels: [("shoal.dev/cluster".to_string(), cluster.clone())].into(),
        }
    );
    let other = call!(
        list,
        pb::ListOwnedInstancesRequest {
            owner_labels: [(
                "shoal.dev/cluster".to_string(),
                format!("shoal-conformance-other-{suffix}"),
            )]
            .into(),
        }
    );
    report.point(
        "list-by-labels",
        match (&by_cluster, &other, &first_id) {
            (Ok(mine), Ok(theirs), Some(id)) => {
                let has = mine.instances.iter().any(|i| &i.id == id);
                let labelled = mine
                    .instances
                    .iter()
                    .all(|i| i.labels.get("shoal.dev/cluster") == Some(&cluster));
                if has && labelled && theirs.instances.is_empty() {
                    Ok("finds ours by label, nothing for another cluster".into())
                } else {
                    Err(format!(
                        "ours listed: {has}; all listed carry the label: {labelled}; another cluster's listing has {}",
                        theirs.instances.len()
                    ))
                }
            }
            (Err(s), _, _) | (_, Err(s), _) => Err(format!("{:?}: {}", s.code(), s.message())),
            _ => Err("no instance to list".into()),
        },
    );

    // 5. Errors carry the right code.
    let bad = call!(
        create,
        pb::CreateInstancesRequest {
            pool: args.pool.clone(),
            class: args.class.clone(),
            instances: vec![pb::InstanceSpec {
                claim_id: String::new(),
                ..spec.clone()
            }],
        }
    );
    report.point(
        "invalid-argument",
        match &bad {
            Err(s) if s.code() == Code::InvalidArgument => {
                Ok(format!("no claim id → INVALID_ARGUMENT ({})", s.message()))
            }
            Err(s) => Err(format!(
                "no claim id → {:?}, want INVALID_ARGUMENT",
                s.code()
            )),
            Ok(a) => Err(format!(
                "a spec without a claim id was accepted ({} instance(s))",
                a.instances.len()
            )),
        },
    );

    // 6. Delete, then it is gone.
    if let Some(id) = &first_id {
        let deleted = call!(
            delete,
            pb::DeleteInstancesRequest {
                instance_ids: vec![id.clone()],
            }
        );
        let gone = async {
            let until = Instant::now() + deadline;
            loop {
                let l = call!(
                    list,
                    pb::ListOwnedInstancesRequest {
                        owner_labels: owned.clone(),
                    }
                );
                match l {
                    Ok(l) if l.instances.iter().all(|i| &i.id != id) => return Ok(()),
                    Ok(_) if Instant::now() < until => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Ok(_) => {
                        return Err(format!(
                            "still listed {} after Delete",
                            humantime::format_duration(deadline)
                        ));
                    }
                    Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
                }
            }
        }
        .await;
        report.point(
            "delete",
            match (&deleted, gone) {
                (Ok(a), Ok(())) if a.failures.is_empty() => Ok(format!("instance {id} gone")),
                (Ok(a), Ok(())) => Err(format!("failures {:?}", a.failures)),
                (Ok(_), Err(why)) => Err(why),
                (Err(s), _) => Err(format!("{:?}: {}", s.code(), s.message())),
            },
        );
        // 7. Deleting what is not there is not an error.
        let twice = call!(
            delete,
            pb::DeleteInstancesRequest {
                instance_ids: vec![id.clone()],
            }
        );
        report.point(
            "delete-missing-is-ok",
            match &twice {
                Ok(a) if a.failures.is_empty() => Ok("a second Delete succeeds".into()),
                Ok(a) => Err(format!("a second Delete failed: {:?}", a.failures)),
                Err(s) => Err(format!("a second Delete: {:?}: {}", s.code(), s.message())),
            },
        );
    }

    // 8. Deadlines: every call above was answered within the timeout.
    let slowest = report.slowest;
    report.point(
        "deadlines",
        if slowest <= deadline {
            Ok(format!(
                "slowest call {} ms (limit {})",
                slowest.as_millis(),
                humantime::format_duration(deadline)
            ))
        } else {
            Err(format!(
                "a call took {} ms, over {}",
                slowest.as_millis(),
                humantime::format_duration(deadline)
            ))
        },
    );
    println!(
        "{}: {} point(s) failed",
        if report.failed == 0 {
            "conformant"
        } else {
            "NOT conformant"
        },
        report.failed
    );
    Ok(report.failed == 0)
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}
