//! The `proxmox` backend: one VM per node, cloned from a template over the Proxmox VE HTTP API.
//!
//! A create reserves a VMID in the store first (`ids/proxmox/vmid:<n>` → claim id, taken with
//! create-if-absent, so no two claims — on any replica, before or after a restart — get the
//! same one), skips ids PVE already uses, clones the template onto the node the placement
//! picks (the clone's description names the claim, so a VM is ours even before it has tags),
//! sets cores, memory (the pool's capacity + `template.overhead`), tags, network and cloud-init, grows the disk and
//! starts it, following every task (UPID) to its end. A failure at any step stops and purges
//! the VM and releases the VMID. A create retried for the same claim (after a timeout or a
//! crash) continues the VM its VMID already names instead of cloning another.
//!
//! Delete is shutdown (with a timeout) → stop → destroy with purge, then the VMID is released.
//! `list` reads `/cluster/resources` and picks VMs by their ownership tags
//! (`shoal-cluster-<id>`, `shoal-pool-<pool>`, `shoal-claim-<claim>`), plus VMs in the VMID range
//! whose description names a claim but which have no tags yet.

pub mod api;
pub mod config;

use std::{
    collections::{BTreeMap, HashSet},
    sync::Mutex,
};

use base64::Engine;
use reqwest::Method;
use serde_json::Value;
use shoal_proto::v1 as pb;
use shoal_state::{Compare, SharedStore, Txn, TxnOp, keys};

use self::{
    api::PveApi,
    config::{Placement, ProxmoxBackend, ProxmoxClass},
};
use super::{
    CLAIM_LABEL, CLUSTER_LABEL, InstanceSpec, NodeProvider, POOL_LABEL, ProviderError,
    with_ownership,
};

/// The backend's name.
pub const BACKEND: &str = "proxmox";
/// First line of the description of every VM Shoal makes; the next line is its labels (JSON).
const MARKER: &str = "Managed by Shoal (shoal.dev); do not edit. Owner:";
/// PVE caps the whole `smbios1` option at 512 bytes.
const MAX_SMBIOS: usize = 512;
/// What `encodeURIComponent` (and PVE's own UI, for `sshkeys`) leaves as it is.
const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// A VMID found taken outside Shoal is skipped; a create gives up after this many.
const MAX_TAKEN_RETRIES: usize = 8;

/// A VM as `/cluster/resources` lists it.
#[derive(Debug, Clone)]
struct Vm {
    vmid: u32,
    name: String,
    node: String,
    status: String,
    tags: Vec<String>,
    template: bool,
    lock: String,
    maxmem: i64,
}

impl Vm {
    fn from_json(v: &Value) -> Option<Vm> {
        Some(Vm {
            vmid: v["vmid"].as_u64()? as u32,
            name: v["name"].as_str().unwrap_or_default().to_string(),
            node: v["node"].as_str()?.to_string(),
            status: v["status"].as_str().unwrap_or_default().to_string(),
            tags: v["tags"]
                .as_str()
                .unwrap_or_default()
                .split([';', ',', ' '])
                .filter(|t| !t.is_empty())
                .map(|t| t.to_ascii_lowercase())
                .collect(),
            template: v["template"].as_u64() == Some(1) || v["template"] == Value::Bool(true),
            lock: v["lock"].as_str().unwrap_or_default().to_string(),
            maxmem: v["maxmem"].as_i64().unwrap_or(0),
        })
    }
}

/// A PVE tag for an ownership label: `shoal-<cluster|pool|claim>-<value>`, lower case, with
/// characters PVE does not allow in tags replaced by `-`.
pub fn ownership_tag(label: &str, value: &str) -> Option<String> {
    let kind = match label {
        CLUSTER_LABEL => "cluster",
        POOL_LABEL => "pool",
        CLAIM_LABEL => "claim",
        _ => return None,
    };
    let value: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    Some(format!("shoal-{kind}-{value}"))
}

/// The ownership labels a VM's tags carry back.
fn labels_from_tags(tags: &[String]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for tag in tags {
        for (prefix, label) in [
            ("shoal-cluster-", CLUSTER_LABEL),
            ("shoal-pool-", POOL_LABEL),
            ("shoal-claim-", CLAIM_LABEL),
        ] {
            if let Some(v) = tag.strip_prefix(prefix) {
                labels.insert(label.to_string(), v.to_string());
            }
        }
    }
    labels
}

/// The description of a VM made for `spec`: the marker, then its labels as JSON.
fn description(spec: &InstanceSpec) -> String {
    let labels = serde_json::to_string(&spec.labels).unwrap_or_default();
    format!("{MARKER}\n{labels}\n")
}

/// The labels a description written by [`description`] holds.
fn labels_from_description(text: &str) -> Option<BTreeMap<String, String>> {
    let mut lines = text.lines();
    lines.find(|l| l.trim() == MARKER)?;
    serde_json::from_str(lines.next()?.trim()).ok()
}

/// The node's registration flags, as the guest reads them from its SMBIOS serial
/// (`/sys/class/dmi/id/product_serial`): `--node-label k=v … --node-taint k=v:Effect …`,
/// the k3s agent's own flags.
pub fn registration_flags(spec: &InstanceSpec) -> String {
    let mut flags: Vec<String> = spec
        .labels
        .iter()
        .map(|(k, v)| format!("--node-label {k}={v}"))
        .collect();
    for t in &spec.taints {
        let effect = super::taint_json(t)["effect"]
            .as_str()
            .unwrap_or("NoSchedule")
            .to_string();
        if t.value.is_empty() {
            flags.push(format!("--node-taint {}:{effect}", t.key));
        } else {
            flags.push(format!("--node-taint {}={}:{effect}", t.key, t.value));
        }
    }
    flags.join(" ")
}

/// `smbios1` with `serial` set to `flags` (base64, as PVE wants free text), keeping the
/// clone's other fields (its fresh uuid above all).
fn smbios_with_serial(current: &str, flags: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts: Vec<String> = current
        .split(',')
        .filter(|p| !p.is_empty())
        .filter(|p| !p.starts_with("serial=") && !p.starts_with("base64="))
        .map(|p| {
            // Other free-text fields were plain; under base64=1 they must be encoded too.
            match p.split_once('=') {
                Some((k, v)) if k != "uuid" => format!("{k}={}", b64.encode(v)),
                _ => p.to_string(),
            }
        })
        .collect();
    parts.push("base64=1".into());
    parts.push(format!("serial={}", b64.encode(flags)));
    parts.join(",")
}

/// The Proxmox VE cluster behind one API address.
pub struct ProxmoxProvider {
    api: PveApi,
    store: SharedStore,
    settings: ProxmoxBackend,
    /// Memory (bytes) of VMs being placed per PVE node, so concurrent creates spread out
    /// before PVE's own figures show them.
    placing: Mutex<BTreeMap<String, i64>>,
}

/// Releases a VM's placement share when its create ends.
struct PlacementShare<'a> {
    provider: &'a ProxmoxProvider,
    node: String,
    memory: i64,
}

impl Drop for PlacementShare<'_> {
    fn drop(&mut self) {
        let mut placing = self
            .provider
            .placing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(m) = placing.get_mut(&self.node) {
            *m -= self.memory;
        }
    }
}

impl ProxmoxProvider {
    /// A provider for `settings`, reserving VMIDs in `store`.
    pub fn new(
        settings: ProxmoxBackend,
        store: SharedStore,
    ) -> Result<ProxmoxProvider, ProviderError> {
        Ok(ProxmoxProvider {
            api: PveApi::new(&settings)?,
            store,
            settings,
            placing: Mutex::new(BTreeMap::new()),
        })
    }

    fn class(&self, name: &str) -> Result<&ProxmoxClass, ProviderError> {
        let key = if name.is_empty() { "default" } else { name };
        self.settings.classes.get(key).ok_or_else(|| {
            ProviderError::Permanent(format!(
                "proxmox backend has no provider class {key:?} (known: {})",
                self.settings
                    .classes
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    async fn vms(&self) -> Result<Vec<Vm>, ProviderError> {
        let data = self
            .api
            .call(
                Method::GET,
                "/cluster/resources",
                &[("type", "vm".to_string())],
            )
            .await?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["type"] == "qemu")
            .filter_map(Vm::from_json)
            .collect())
    }

    async fn vm(&self, vmid: u32) -> Result<Option<Vm>, ProviderError> {
        Ok(self.vms().await?.into_iter().find(|v| v.vmid == vmid))
    }

    async fn vm_config(&self, vm: &Vm) -> Result<Value, ProviderError> {
        self.api
            .call(
                Method::GET,
                &format!("/nodes/{}/qemu/{}/config", vm.node, vm.vmid),
                &[],
            )
            .await
    }

    // ---------------------------------------------------------------- VMIDs

    fn vmid_key(vmid: u32) -> String {
        keys::reserved_id(BACKEND, &format!("vmid:{vmid}"))
    }

    fn store_error(e: shoal_state::StoreError) -> ProviderError {
        if e.is_transient() {
            ProviderError::Transient(format!("state store: {e}"))
        } else {
            ProviderError::Permanent(format!("state store: {e}"))
        }
    }

    /// VMIDs reserved in the store, with the claim holding each.
    async fn reservations(&self) -> Result<BTreeMap<u32, String>, ProviderError> {
        let prefix = keys::reserved_id(BACKEND, "vmid:");
        let range = self.store.range(&prefix).await.map_err(Self::store_error)?;
        Ok(range
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let id = kv.key.strip_prefix(&prefix)?.parse().ok()?;
                Some((id, String::from_utf8_lossy(&kv.value).into_owned()))
            })
            .collect())
    }

    /// The VMID `claim` holds, reserving the lowest free one of the range when it holds none.
    /// `skip`: ids found taken outside Shoal since.
    async fn reserve(&self, claim: &str, skip: &HashSet<u32>) -> Result<u32, ProviderError> {
        let reserved = self.reservations().await?;
        if let Some((id, _)) = reserved.iter().find(|(_, c)| c.as_str() == claim) {
            return Ok(*id);
        }
        let taken: HashSet<u32> = self.vms().await?.iter().map(|v| v.vmid).collect();
        let range = self.settings.vmid_range;
        for id in range.first..=range.last {
            if reserved.contains_key(&id) || taken.contains(&id) || skip.contains(&id) {
                continue;
            }
            let key = Self::vmid_key(id);
            let outcome = self
                .store
                .txn(Txn {
                    compares: vec![Compare::CreateRevision {
                        key: key.clone(),
                        revision: 0,
                    }],
                    success: vec![TxnOp::Put {
                        key,
                        value: claim.as_bytes().to_vec(),
                        lease: None,
                    }],
                    failure: vec![],
                })
                .await
                .map_err(Self::store_error)?;
            if outcome.succeeded {
                return Ok(id);
            }
            // Another claim (here or on another replica) took it first: try the next.
        }
        Err(ProviderError::Permanent(format!(
            "VMID range {range} exhausted ({} reserved by Shoal, {} more used in PVE)",
            reserved.len(),
            taken
                .iter()
                .filter(|id| (range.first..=range.last).contains(*id) && !reserved.contains_key(id))
                .count()
        )))
    }

    async fn release(&self, vmid: u32) -> Result<(), ProviderError> {
        self.store
            .delete(&Self::vmid_key(vmid))
            .await
            .map(|_| ())
            .map_err(Self::store_error)
    }

    // ------------------------------------------------------------- placement

    /// The template VM of `class`.
    fn template<'a>(&self, class: &ProxmoxClass, vms: &'a [Vm]) -> Result<&'a Vm, ProviderError> {
        let by_id = class.template.parse::<u32>().ok();
        let found = vms.iter().find(|v| match by_id {
            Some(id) => v.vmid == id,
            None => v.name == class.template && v.template,
        });
        match found {
            Some(t) if t.template => Ok(t),
            Some(t) => Err(ProviderError::Permanent(format!(
                "proxmox template {:?} (VM {}) is not a template",
                class.template, t.vmid
            ))),
            None => Err(ProviderError::Permanent(format!(
                "proxmox template {:?} not found",
                class.template
            ))),
        }
    }

    /// Picks the PVE node of a new VM of `memory` bytes and takes its placement share.
    async fn place(
        &self,
        class: &ProxmoxClass,
        template: &Vm,
        pool: &str,
        vms: &[Vm],
        memory: i64,
    ) -> Result<PlacementShare<'_>, ProviderError> {
        let candidates: Vec<String> = if class.nodes.is_empty() {
            vec![template.node.clone()]
        } else {
            class.nodes.clone()
        };
        let node = if candidates.len() == 1 {
            candidates[0].clone()
        } else {
            let listed = self.api.call(Method::GET, "/nodes", &[]).await?;
            let online: BTreeMap<String, (i64, f64)> = listed
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| n["status"] == "online")
                .filter_map(|n| {
                    let name = n["node"].as_str()?;
                    // Memory promised to the node's VMs counts even while they use less.
                    let committed: i64 = vms
                        .iter()
                        .filter(|v| v.node == name && !v.template)
                        .map(|v| v.maxmem)
                        .sum();
                    let used = n["mem"].as_i64().unwrap_or(0).max(committed);
                    let free = n["maxmem"].as_i64()? - used;
                    let cpu_free = n["maxcpu"].as_f64().unwrap_or(0.0)
                        * (1.0 - n["cpu"].as_f64().unwrap_or(0.0));
                    Some((name.to_string(), (free, cpu_free)))
                })
                .collect();
            let placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
            let pool_tag = ownership_tag(POOL_LABEL, pool).unwrap_or_default();
            let score = |node: &String| -> Option<(i64, i64)> {
                let (free, cpu) = online.get(node)?;
                let pending = placing.get(node).copied().unwrap_or(0);
                Some(match class.placement {
                    Placement::Balanced => (free - pending, (*cpu * 1000.0) as i64),
                    Placement::Spread => {
                        let here = vms
                            .iter()
                            .filter(|v| &v.node == node && v.tags.contains(&pool_tag))
                            .map(|v| v.maxmem.max(1))
                            .sum::<i64>();
                        // Fewest of the pool's VMs (by memory, counting those being placed).
                        (-(here + pending), free - pending)
                    }
                })
            };
            candidates
                .iter()
                .filter_map(|n| score(n).map(|s| (s, n.clone())))
                .max_by(|a, b| a.0.cmp(&b.0))
                .map(|(_, n)| n)
                .ok_or_else(|| {
                    ProviderError::Transient(format!(
                        "proxmox: none of the class's nodes ({}) is online",
                        candidates.join(", ")
                    ))
                })?
        };
        *self
            .placing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.clone())
            .or_default() += memory;
        Ok(PlacementShare {
            provider: self,
            node,
            memory,
        })
    }

    // ----------------------------------------------------------------- steps

    /// The config a new VM gets after its clone.
    fn vm_config_params(
        &self,
        class: &ProxmoxClass,
        spec: &InstanceSpec,
        smbios: String,
    ) -> Vec<(&'static str, String)> {
        let cores = (spec.capacity.cpu_millis + spec.overhead.cpu_millis + 999) / 1000;
        let memory_mib =
            (spec.capacity.memory_bytes + spec.overhead.memory_bytes + (1 << 20) - 1) / (1 << 20);
        let mut tags: Vec<String> = spec
            .labels
            .iter()
            .filter_map(|(k, v)| ownership_tag(k, v))
            .collect();
        tags.extend(class.tags.iter().map(|t| t.to_ascii_lowercase()));
        let mut params = vec![
            ("cores", cores.max(1).to_string()),
            ("memory", memory_mib.max(16).to_string()),
            ("tags", tags.join(";")),
            ("smbios1", smbios),
            ("onboot", if class.onboot { "1" } else { "0" }.to_string()),
        ];
        if let Some(net) = &class.network {
            let mut value = format!("{},bridge={}", net.model, net.bridge);
            if net.vlan > 0 {
                value.push_str(&format!(",tag={}", net.vlan));
            }
            params.push(("net0", value));
        }
        let ci = &class.cloud_init;
        if !ci.user.is_empty() {
            params.push(("ciuser", ci.user.clone()));
        }
        if let Some(p) = &ci.password
            && !p.is_empty()
        {
            params.push(("cipassword", p.expose().to_string()));
        }
        if !ci.ssh_keys.is_empty() {
            // PVE wants the keys URL-encoded inside the (form-encoded) parameter.
            let keys = ci.ssh_keys.join("\n");
            params.push((
                "sshkeys",
                percent_encoding::utf8_percent_encode(&keys, URL_COMPONENT).to_string(),
            ));
        }
        if !ci.ipconfig.is_empty() {
            params.push(("ipconfig0", ci.ipconfig.clone()));
        }
        if !ci.nameserver.is_empty() {
            params.push(("nameserver", ci.nameserver.clone()));
        }
        if !ci.cicustom.is_empty() {
            params.push(("cicustom", ci.cicustom.clone()));
        }
        params
    }

    /// Clones the template into `vmid` on the placed node. Returns the new VM's node.
    async fn clone_vm(
        &self,
        class: &ProxmoxClass,
        spec: &InstanceSpec,
        vmid: u32,
        vms: &[Vm],
    ) -> Result<(), CloneError> {
        let template = self.template(class, vms).map_err(CloneError::Failed)?;
        let memory = spec.capacity.memory_bytes + spec.overhead.memory_bytes;
        let share = self
            .place(class, template, &spec.pool, vms, memory)
            .await
            .map_err(CloneError::Failed)?;
        let mut params = vec![
            ("newid", vmid.to_string()),
            ("name", spec.node_name.clone()),
            ("description", description(spec)),
            ("full", if class.full_clone { "1" } else { "0" }.to_string()),
        ];
        if share.node != template.node {
            params.push(("target", share.node.clone()));
        }
        if !class.storage.is_empty() {
            params.push(("storage", class.storage.clone()));
        }
        if !class.resource_pool.is_empty() {
            params.push(("pool", class.resource_pool.clone()));
        }
        let path = format!("/nodes/{}/qemu/{}/clone", template.node, template.vmid);
        let upid = match self.api.call(Method::POST, &path, &params).await {
            Ok(v) => v.as_str().unwrap_or_default().to_string(),
            Err(ProviderError::Permanent(m)) if m.contains("already exists") => {
                return Err(CloneError::Taken);
            }
            Err(e) => return Err(CloneError::Failed(e)),
        };
        shoal_runtime::supervise::pause_point("proxmox-mid-clone").await;
        self.api
            .wait_task(&upid, &format!("clone of {} into VM {vmid}", template.vmid))
            .await
            .map_err(CloneError::Failed)
    }

    /// Waits until VM `vmid` carries no lock (a clone still running, after a restart).
    async fn unlocked(&self, vmid: u32) -> Result<Option<Vm>, ProviderError> {
        let deadline = tokio::time::Instant::now() + self.settings.task_timeout;
        loop {
            let vm = self.vm(vmid).await?;
            match vm {
                Some(vm) if !vm.lock.is_empty() => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ProviderError::Transient(format!(
                            "proxmox VM {vmid} still locked ({})",
                            vm.lock
                        )));
                    }
                    tokio::time::sleep(self.settings.task_poll_interval).await;
                }
                other => return Ok(other),
            }
        }
    }

    /// Everything after the clone: config, disk, start.
    async fn finish(
        &self,
        class: &ProxmoxClass,
        spec: &InstanceSpec,
        vm: &Vm,
    ) -> Result<(), ProviderError> {
        let base = format!("/nodes/{}/qemu/{}", vm.node, vm.vmid);
        let config = self.vm_config(vm).await?;
        let flags = registration_flags(spec);
        let smbios = smbios_with_serial(config["smbios1"].as_str().unwrap_or_default(), &flags);
        if smbios.len() > MAX_SMBIOS {
            return Err(ProviderError::Permanent(format!(
                "the node's labels and taints ({} bytes) do not fit the VM's SMBIOS settings ({MAX_SMBIOS} bytes with the base64 serial)",
                flags.len()
            )));
        }
        let params = self.vm_config_params(class, spec, smbios);
        self.api
            .run_task(
                Method::POST,
                &format!("{base}/config"),
                &params,
                &format!("config of VM {}", vm.vmid),
            )
            .await?;
        if let Some(disk) = &class.disk {
            self.api
                .run_task(
                    Method::PUT,
                    &format!("{base}/resize"),
                    &[("disk", disk.name.clone()), ("size", disk.size.clone())],
                    &format!("resize of VM {} {}", vm.vmid, disk.name),
                )
                .await?;
        }
        if vm.status != "running" {
            self.api
                .run_task(
                    Method::POST,
                    &format!("{base}/status/start"),
                    &[],
                    &format!("start of VM {}", vm.vmid),
                )
                .await?;
        }
        Ok(())
    }

    /// Whose VM this is: the labels its tags or (before it has tags) its description carry.
    async fn owner_of(&self, vm: &Vm) -> Result<Option<BTreeMap<String, String>>, ProviderError> {
        let labels = labels_from_tags(&vm.tags);
        if labels.contains_key(CLAIM_LABEL) {
            return Ok(Some(labels));
        }
        let config = self.vm_config(vm).await?;
        Ok(labels_from_description(
            config["description"].as_str().unwrap_or(""),
        ))
    }

    /// Stops and purges VM `vmid` (if it exists and is Shoal's — of `claim` when given), then
    /// releases the VMID. A VM that is not Shoal's is never touched.
    async fn destroy(
        &self,
        vmid: u32,
        graceful: bool,
        claim: Option<&str>,
    ) -> Result<(), ProviderError> {
        let Some(vm) = self.unlocked(vmid).await? else {
            return self.release(vmid).await;
        };
        let owner = self.owner_of(&vm).await?;
        let ours = owner.as_ref().is_some_and(|labels| match claim {
            Some(c) => labels.get(CLAIM_LABEL).map(String::as_str) == Some(c),
            None => labels.contains_key(CLAIM_LABEL),
        });
        if !ours {
            if claim.is_some() {
                // Our reservation, someone else's VM: let go of the id, leave the VM alone.
                return self.release(vmid).await;
            }
            return Err(ProviderError::Permanent(format!(
                "proxmox VM {vmid} ({}) is not Shoal's; not deleting it",
                vm.name
            )));
        }
        let base = format!("/nodes/{}/qemu/{}", vm.node, vm.vmid);
        if vm.status == "running" {
            let mut stopped = false;
            if graceful {
                let timeout = self.settings.shutdown_timeout;
                let shutdown = self
                    .api
                    .call(
                        Method::POST,
                        &format!("{base}/status/shutdown"),
                        &[("timeout", timeout.as_secs().max(1).to_string())],
                    )
                    .await;
                if let Ok(Value::String(upid)) = shutdown {
                    stopped = self
                        .api
                        .wait_task_for(
                            &upid,
                            &format!("shutdown of VM {vmid}"),
                            timeout + self.settings.task_poll_interval * 4,
                        )
                        .await
                        .is_ok();
                }
            }
            if !stopped {
                self.api
                    .run_task(
                        Method::POST,
                        &format!("{base}/status/stop"),
                        &[],
                        &format!("stop of VM {vmid}"),
                    )
                    .await?;
            }
        }
        match self
            .api
            .call(
                Method::DELETE,
                &base,
                &[
                    ("purge", "1".to_string()),
                    ("destroy-unreferenced-disks", "1".to_string()),
                ],
            )
            .await
        {
            Ok(Value::String(upid)) => {
                self.api
                    .wait_task(&upid, &format!("destroy of VM {vmid}"))
                    .await?
            }
            Ok(_) => {}
            Err(ProviderError::Permanent(m)) if m.contains("does not exist") => {}
            Err(e) => return Err(e),
        }
        self.release(vmid).await
    }

    /// The whole create, once a VMID is reserved; on error the caller destroys what is left.
    async fn build(
        &self,
        class: &ProxmoxClass,
        spec: &InstanceSpec,
        vmid: u32,
    ) -> Result<Vm, CloneError> {
        let vms = self.vms().await.map_err(CloneError::Failed)?;
        match vms.iter().find(|v| v.vmid == vmid) {
            None => self.clone_vm(class, spec, vmid, &vms).await?,
            Some(existing) => {
                // Ours from an earlier attempt (its description names this claim), or a VM
                // made outside Shoal after the reservation.
                let config = self.vm_config(existing).await.map_err(CloneError::Failed)?;
                let owner = labels_from_description(config["description"].as_str().unwrap_or(""));
                if owner.and_then(|l| l.get(CLAIM_LABEL).cloned()).as_deref()
                    != Some(spec.claim_id.as_str())
                {
                    return Err(CloneError::Taken);
                }
                tracing::info!(vmid, claim = %spec.claim_id, "proxmox: continuing the VM an earlier attempt cloned");
            }
        }
        let vm = self
            .unlocked(vmid)
            .await
            .map_err(CloneError::Failed)?
            .ok_or_else(|| {
                CloneError::Failed(ProviderError::Transient(format!(
                    "proxmox VM {vmid} vanished after its clone"
                )))
            })?;
        self.finish(class, spec, &vm)
            .await
            .map_err(CloneError::Failed)?;
        Ok(vm)
    }
}

enum CloneError {
    /// The VMID is used by a VM that is not ours: pick another.
    Taken,
    Failed(ProviderError),
}

#[async_trait::async_trait]
impl NodeProvider for ProxmoxProvider {
    async fn create(&self, spec: &InstanceSpec) -> Result<pb::Instance, ProviderError> {
        let class = self.class(&spec.class)?;
        let mut skip = HashSet::new();
        for _ in 0..MAX_TAKEN_RETRIES {
            let vmid = self.reserve(&spec.claim_id, &skip).await?;
            match self.build(class, spec, vmid).await {
                Ok(vm) => {
                    return Ok(with_ownership(
                        pb::Instance {
                            id: vmid.to_string(),
                            state: "running".into(),
                            labels: spec.labels.clone(),
                            node_name: vm.name,
                            ..Default::default()
                        },
                        BACKEND,
                    ));
                }
                Err(CloneError::Taken) => {
                    tracing::warn!(vmid, "proxmox: VMID taken outside Shoal; trying another");
                    skip.insert(vmid);
                    self.release(vmid).await?;
                }
                Err(CloneError::Failed(e)) => {
                    tracing::warn!(vmid, claim = %spec.claim_id, error = %e, "proxmox: create failed; destroying the VM");
                    return match self.destroy(vmid, false, Some(&spec.claim_id)).await {
                        Ok(()) => Err(e),
                        // Left for the retry (it continues or destroys the same VMID).
                        Err(cleanup) => Err(ProviderError::Transient(format!(
                            "{e}; cleaning up VM {vmid} failed too: {cleanup}"
                        ))),
                    };
                }
            }
        }
        Err(ProviderError::Transient(format!(
            "proxmox: {MAX_TAKEN_RETRIES} VMIDs in a row were taken outside Shoal"
        )))
    }

    async fn delete(&self, instance_id: &str) -> Result<(), ProviderError> {
        let vmid: u32 = instance_id.parse().map_err(|_| {
            ProviderError::Permanent(format!("{instance_id:?} is not a Proxmox VMID"))
        })?;
        self.destroy(vmid, true, None).await
    }

    async fn list_owned(
        &self,
        owner: &BTreeMap<String, String>,
    ) -> Result<Vec<pb::Instance>, ProviderError> {
        let range = self.settings.vmid_range;
        let mut out = Vec::new();
        for vm in self.vms().await? {
            if vm.template {
                continue;
            }
            let mut labels = labels_from_tags(&vm.tags);
            if !labels.contains_key(CLAIM_LABEL) {
                if !(range.first..=range.last).contains(&vm.vmid) {
                    continue;
                }
                // Cloned but not configured yet: the description says whose it is.
                let config = self.vm_config(&vm).await?;
                match labels_from_description(config["description"].as_str().unwrap_or("")) {
                    Some(l) => labels = l,
                    None => continue,
                }
            }
            let matches = owner.iter().all(|(k, v)| match ownership_tag(k, v) {
                Some(_) => {
                    labels.get(k).map(|l| l.to_ascii_lowercase()) == Some(v.to_ascii_lowercase())
                }
                None => labels.get(k) == Some(v),
            });
            if !matches {
                continue;
            }
            let state = if !vm.lock.is_empty() {
                format!("locked ({})", vm.lock)
            } else {
                vm.status.clone()
            };
            out.push(with_ownership(
                pb::Instance {
                    id: vm.vmid.to_string(),
                    state,
                    labels,
                    node_name: vm.name.clone(),
                    ..Default::default()
                },
                BACKEND,
            ));
        }
        Ok(out)
    }

    fn describe(&self) -> pb::ProviderInfo {
        pb::ProviderInfo {
            name: BACKEND.into(),
            classes: self.settings.classes.keys().cloned().collect(),
            capabilities: vec!["node-names".into(), "idempotent-by-claim".into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            claim_id: "c-1".into(),
            pool: "workers".into(),
            class: String::new(),
            node_name: "workers-1".into(),
            labels: [
                (CLUSTER_LABEL.to_string(), "shoal-1a2b".to_string()),
                (POOL_LABEL.to_string(), "workers".to_string()),
                (CLAIM_LABEL.to_string(), "c-1".to_string()),
            ]
            .into(),
            taints: vec![pb::Taint {
                key: "gpu".into(),
                value: "yes".into(),
                effect: pb::TaintEffect::NoSchedule as i32,
            }],
            capacity: shoal_core::Resources::default(),
            overhead: shoal_core::Resources::default(),
        }
    }

    #[test]
    fn ownership_survives_tags_and_descriptions() {
        let s = spec();
        let tags: Vec<String> = s
            .labels
            .iter()
            .filter_map(|(k, v)| ownership_tag(k, v))
            .collect();
        assert!(tags.iter().all(|t| config::valid_tag(t)), "{tags:?}");
        assert_eq!(labels_from_tags(&tags), s.labels);
        assert_eq!(labels_from_description(&description(&s)), Some(s.labels));
        assert_eq!(labels_from_description("some VM of someone else"), None);
    }

    #[test]
    fn the_serial_carries_the_k3s_flags_and_keeps_the_uuid() {
        let s = spec();
        let flags = registration_flags(&s);
        assert!(
            flags.contains("--node-label shoal.dev/claim=c-1"),
            "{flags}"
        );
        assert!(flags.contains("--node-taint gpu=yes:NoSchedule"), "{flags}");
        let smbios = smbios_with_serial("uuid=1234-5678,manufacturer=QEMU", &flags);
        assert!(
            smbios.starts_with("uuid=1234-5678,manufacturer=UUVNVQ==,base64=1,serial="),
            "{smbios}"
        );
        let serial = smbios
            .rsplit_once("serial=")
            .map(|(_, s)| s)
            .unwrap_or_default();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(serial)
            .expect("base64");
        assert_eq!(String::from_utf8_lossy(&decoded), flags);
    }
}
