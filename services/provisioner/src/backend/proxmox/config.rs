//! `service.backends.proxmox`: where the Proxmox VE API is, how Shoal logs in and checks its
//! certificate, the VMID range Shoal may use, and the provider classes (templates) pools pick.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use shoal_core::ValidationErrors;
use shoal_runtime::secret::Secret;

/// `service.backends.proxmox`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxmoxBackend {
    /// The API's base address, `https://pve.example:8006`.
    pub url: String,
    /// An API token, `user@realm!tokenid=secret` (preferred: no ticket to renew).
    #[serde(default)]
    pub token: Option<Secret>,
    /// Ticket login: the user, e.g. `shoal@pve`.
    #[serde(default)]
    pub user: String,
    /// Ticket login: the password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// How the server's certificate is checked.
    #[serde(default)]
    pub tls: ProxmoxTls,
    /// The VMIDs Shoal may give its VMs (inclusive); each is reserved in the store first.
    pub vmid_range: VmidRange,
    /// Longest wait for one PVE task (clone, config, start, shutdown, destroy).
    #[serde(with = "humantime_serde", default = "default_task_timeout")]
    pub task_timeout: Duration,
    /// Time between two looks at a running task.
    #[serde(with = "humantime_serde", default = "default_poll")]
    pub task_poll_interval: Duration,
    /// A VM being deleted is asked to shut down for this long, then stopped.
    #[serde(with = "humantime_serde", default = "default_shutdown")]
    pub shutdown_timeout: Duration,
    /// Provider classes by name; a pool's `provider.class` picks one (`default` when empty).
    #[serde(default)]
    pub classes: BTreeMap<String, ProxmoxClass>,
}

fn default_task_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_poll() -> Duration {
    Duration::from_millis(500)
}
fn default_shutdown() -> Duration {
    Duration::from_secs(60)
}

/// `tls`: the CA that signed the server's certificate, or its pinned SHA-256 fingerprint.
/// Skipping verification needs `insecureSkipVerify: true`, said out loud.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxmoxTls {
    /// PEM file of the CA (PVE's own `/etc/pve/pve-root-ca.pem`, or your CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server certificate (DER), hex with or without colons, as PVE's
    /// "Certificates" page shows it.
    #[serde(default)]
    pub fingerprint: String,
    /// Accept any certificate (tests against a throwaway server only).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// An inclusive VMID range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmidRange {
    /// First VMID.
    pub first: u32,
    /// Last VMID.
    pub last: u32,
}

impl std::fmt::Display for VmidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// How a clone's PVE node is picked among the class's `nodes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Placement {
    /// The node with the most free memory (then CPU) left after the VMs Shoal placed.
    #[default]
    Balanced,
    /// The node holding the fewest VMs of the pool.
    Spread,
}

/// One provider class: how a VM of a pool is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxmoxClass {
    /// The template VM: its VMID, or its name.
    pub template: String,
    /// PVE nodes the VMs may run on; empty = the template's node.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// How a node is picked.
    #[serde(default)]
    pub placement: Placement,
    /// Storage of a full clone's disks (empty: the template's).
    #[serde(default)]
    pub storage: String,
    /// Full clone (independent disks) or linked clone (from the template's base disk).
    #[serde(default = "yes")]
    pub full_clone: bool,
    /// The boot disk, grown to `size` after the clone.
    #[serde(default)]
    pub disk: Option<Disk>,
    /// The first network interface.
    #[serde(default)]
    pub network: Option<Network>,
    /// cloud-init settings (the template must have a cloud-init drive).
    #[serde(default)]
    pub cloud_init: CloudInit,
    /// More PVE tags (besides Shoal's ownership tags).
    #[serde(default)]
    pub tags: Vec<String>,
    /// PVE resource pool to put the VMs in.
    #[serde(default)]
    pub resource_pool: String,
    /// Start the VM when its PVE node boots.
    #[serde(default = "yes")]
    pub onboot: bool,
}

fn yes() -> bool {
    true
}

/// The boot disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Disk {
    /// The drive, e.g. `scsi0`.
    #[serde(default = "default_disk")]
    pub name: String,
    /// Size to grow it to, PVE's form: `32G`.
    pub size: String,
}

fn default_disk() -> String {
    "scsi0".into()
}

/// The first network interface (`net0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    /// Bridge, e.g. `vmbr0`.
    pub bridge: String,
    /// VLAN tag (0: none).
    #[serde(default)]
    pub vlan: u16,
    /// NIC model.
    #[serde(default = "default_model")]
    pub model: String,
}

fn default_model() -> String {
    "virtio".into()
}

/// cloud-init. The k3s join (server URL, token) lives in the `cicustom` snippet on a PVE
/// storage: the PVE API cannot write snippets, so Shoal points VMs at one the operator put
/// there. Per-node registration flags (labels, taints) reach the guest through the VM's SMBIOS
/// serial (see docs/backends/proxmox.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInit {
    /// Default user.
    #[serde(default)]
    pub user: String,
    /// Its password (a secret; SSH keys are better).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Authorized SSH public keys.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// `ipconfig0`, e.g. `ip=dhcp`.
    #[serde(default)]
    pub ipconfig: String,
    /// DNS server.
    #[serde(default)]
    pub nameserver: String,
    /// `cicustom`, e.g. `user=local:snippets/k3s-join.yaml`.
    #[serde(default)]
    pub cicustom: String,
}

/// Whether `tag` is a tag PVE accepts.
pub fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.'))
}

impl ProxmoxBackend {
    /// Adds problems under `path` to `errors`.
    pub fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        match reqwest::Url::parse(&self.url) {
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
            Ok(u) => errors.add(
                format!("{path}.url"),
                format!("scheme {:?} is not https", u.scheme()),
            ),
            Err(e) => errors.add(format!("{path}.url"), format!("{:?}: {e}", self.url)),
        }
        let token = self.token.as_ref().is_some_and(|t| !t.is_empty());
        let login = !self.user.is_empty() || self.password.is_some();
        match (token, login) {
            (true, true) => errors.add(
                format!("{path}.token"),
                "give a token or user and password, not both",
            ),
            (false, false) => errors.add(
                format!("{path}.token"),
                "no credentials: give token (user@realm!id=secret) or user and password",
            ),
            (true, false) => {
                let t = self.token.as_ref().map(|t| t.expose()).unwrap_or_default();
                let well_formed = t
                    .split_once('!')
                    .and_then(|(user, rest)| {
                        rest.split_once('=').map(|(id, secret)| (user, id, secret))
                    })
                    .is_some_and(|(user, id, secret)| {
                        user.contains('@') && !id.is_empty() && !secret.is_empty()
                    });
                if !well_formed {
                    errors.add(
                        format!("{path}.token"),
                        "is not of the form user@realm!tokenid=secret",
                    );
                }
            }
            (false, true) => {
                if !self.user.contains('@') {
                    errors.add(
                        format!("{path}.user"),
                        format!("{:?} has no realm (user@realm, e.g. root@pam)", self.user),
                    );
                }
                if self.password.as_ref().is_none_or(|p| p.is_empty()) {
                    errors.add(format!("{path}.password"), "must be set with user");
                }
            }
        }
        let pins = [
            self.tls.ca_file.is_some(),
            !self.tls.fingerprint.is_empty(),
            self.tls.insecure_skip_verify,
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if pins > 1 {
            errors.add(
                format!("{path}.tls"),
                "give one of caFile, fingerprint and insecureSkipVerify",
            );
        }
        if !self.tls.fingerprint.is_empty()
            && super::api::parse_fingerprint(&self.tls.fingerprint).is_none()
        {
            errors.add(
                format!("{path}.tls.fingerprint"),
                "is not a SHA-256 fingerprint (64 hex digits, colons allowed)",
            );
        }
        if let Some(ca) = &self.tls.ca_file
            && !ca.exists()
        {
            errors.add(
                format!("{path}.tls.caFile"),
                format!("{} does not exist", ca.display()),
            );
        }
        let r = self.vmid_range;
        if r.first < 100 || r.last > 999_999_999 || r.first > r.last {
            errors.add(
                format!("{path}.vmidRange"),
                format!("{r} is not a range within 100-999999999 with first <= last"),
            );
        }
        if self.task_timeout < Duration::from_secs(1) {
            errors.add(format!("{path}.taskTimeout"), "must be at least 1s");
        }
        if self.task_poll_interval < Duration::from_millis(10) {
            errors.add(format!("{path}.taskPollInterval"), "must be at least 10ms");
        }
        for (name, class) in &self.classes {
            class.validate(&format!("{path}.classes.{name}"), errors);
        }
    }
}

impl ProxmoxClass {
    /// Adds problems under `path` to `errors`.
    pub fn validate(&self, path: &str, errors: &mut ValidationErrors) {
        if self.template.trim().is_empty() {
            errors.add(
                format!("{path}.template"),
                "must name a template VM (VMID or name)",
            );
        }
        if !self.full_clone && !self.storage.is_empty() {
            errors.add(
                format!("{path}.storage"),
                "a linked clone keeps the template's storage (set fullClone: true to choose one)",
            );
        }
        if let Some(disk) = &self.disk {
            let digits = disk.size.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty() || digits.parse::<u64>().is_err() {
                errors.add(
                    format!("{path}.disk.size"),
                    format!("{:?} is not a PVE size such as 32G", disk.size),
                );
            }
            if !disk.name.starts_with(['s', 'v', 'i']) {
                errors.add(
                    format!("{path}.disk.name"),
                    format!("{:?} is not a drive such as scsi0 or virtio0", disk.name),
                );
            }
        }
        if let Some(net) = &self.network {
            if net.bridge.is_empty() {
                errors.add(format!("{path}.network.bridge"), "must not be empty");
            }
            if net.vlan > 4094 {
                errors.add(
                    format!("{path}.network.vlan"),
                    format!("{} is not a VLAN tag (1-4094)", net.vlan),
                );
            }
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if !valid_tag(tag) {
                errors.add(
                    format!("{path}.tags[{i}]"),
                    format!("{tag:?} is not a PVE tag (letters, digits, _ - + .)"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(yaml: &str) -> Result<ValidationErrors, serde_yaml_ng::Error> {
        let b: ProxmoxBackend = serde_yaml_ng::from_str(yaml)?;
        let mut errors = ValidationErrors::default();
        b.validate("service.backends.proxmox", &mut errors);
        Ok(errors)
    }

    #[test]
    fn a_full_backend_validates_and_bad_fields_are_named() {
        let good = backend(
            "url: https://pve:8006\ntoken: root@pam!shoal=abc\nvmidRange: { first: 9000, last: 9099 }\nclasses:\n  default:\n    template: k3s-template\n    nodes: [pve1, pve2]\n    disk: { size: 32G }\n    network: { bridge: vmbr0, vlan: 20 }\n    cloudInit: { user: k3s, sshKeys: ['ssh-ed25519 AAAA x'], ipconfig: ip=dhcp, cicustom: 'user=local:snippets/k3s.yaml' }\n",
        )
        .expect("parses");
        assert!(good.errors.is_empty(), "{good}");

        let bad = backend(
            "url: ftp://pve\ntoken: nonsense\nvmidRange: { first: 50, last: 10 }\ntls: { fingerprint: zz, insecureSkipVerify: true }\nclasses:\n  small:\n    template: ''\n    fullClone: false\n    storage: fast\n    disk: { size: big }\n    network: { bridge: vmbr0, vlan: 5000 }\n    tags: ['bad tag']\n",
        )
        .expect("parses");
        let paths: Vec<&str> = bad.errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "service.backends.proxmox.url",
            "service.backends.proxmox.token",
            "service.backends.proxmox.vmidRange",
            "service.backends.proxmox.tls",
            "service.backends.proxmox.tls.fingerprint",
            "service.backends.proxmox.classes.small.template",
            "service.backends.proxmox.classes.small.storage",
            "service.backends.proxmox.classes.small.disk.size",
            "service.backends.proxmox.classes.small.network.vlan",
            "service.backends.proxmox.classes.small.tags[0]",
        ] {
            assert!(paths.contains(&want), "{want} not reported: {bad}");
        }
    }

    #[test]
    fn credentials_are_one_kind_and_never_printed() {
        let both = backend(
            "url: https://pve:8006\ntoken: a@pam!b=c\nuser: root@pam\npassword: pw\nvmidRange: { first: 100, last: 200 }\n",
        )
        .expect("parses");
        assert!(both.to_string().contains("not both"), "{both}");
        let b: ProxmoxBackend = serde_yaml_ng::from_str(
            "url: https://pve:8006\nuser: root@pam\npassword: hunter2\nvmidRange: { first: 100, last: 200 }\n",
        )
        .expect("parses");
        let printed = serde_yaml_ng::to_string(&b).expect("prints");
        assert!(
            !printed.contains("hunter2") && printed.contains("<redacted>"),
            "{printed}"
        );
        assert!(!format!("{b:?}").contains("hunter2"));
    }
}
