//! A [`kube::Client`] from the service's `kube` settings: an explicit kubeconfig (and context),
//! or, when none is given, what `kubectl` would use (`$KUBECONFIG`, in-cluster service account,
//! `~/.kube/config`).

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// How to reach the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeSettings {
    /// Kubeconfig file. Empty: `$KUBECONFIG`, then the in-cluster service account, then
    /// `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: String,
    /// Context in the kubeconfig. Empty: its current context.
    #[serde(default)]
    pub context: String,
    /// Deadline of each API call (watches excepted: they are long-lived and have their own
    /// idle timeout). An API server that accepts and never answers fails calls after this.
    #[serde(with = "humantime_serde", default = "default_request_timeout")]
    pub request_timeout: Duration,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            kubeconfig: String::new(),
            context: String::new(),
            request_timeout: default_request_timeout(),
        }
    }
}

impl KubeSettings {
    /// Adds problems with these settings, under `path`, to `errors`.
    pub fn validate(&self, path: &str, errors: &mut shoal_core::ValidationErrors) {
        if !self.kubeconfig.is_empty() && !PathBuf::from(&self.kubeconfig).is_file() {
            errors.add(
                format!("{path}.kubeconfig"),
                format!("{:?} is not a readable file", self.kubeconfig),
            );
        }
        if self.request_timeout < Duration::from_millis(100)
            || self.request_timeout > Duration::from_secs(600)
        {
            errors.add(
                format!("{path}.requestTimeout"),
                "must be between 100ms and 10m",
            );
        }
        if !self.context.is_empty() && self.kubeconfig.is_empty() {
            errors.add(
                format!("{path}.context"),
                "needs kubeconfig: a context names an entry of a kubeconfig file",
            );
        }
    }
}

/// Why no client could be built, or a Kubernetes call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No configuration could be inferred from the environment.
    #[error(
        "no Kubernetes configuration found (set kube.kubeconfig, KUBECONFIG, or run in a pod): {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// A call to the API server failed.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

impl KubeError {
    /// True when retrying the same call may succeed (the API server was unreachable, timed out,
    /// throttled, or answered with a 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            KubeError::Api(kube::Error::Api(status)) => status.code == 429 || status.code >= 500,
            KubeError::Api(kube::Error::Service(_) | kube::Error::HyperError(_)) => true,
            _ => false,
        }
    }
}

/// Builds a client for calls; it connects on first use. Every response must start within
/// `requestTimeout`; calls answered 429/503/504 are retried by kube's default policy. Not for
/// watches ([`connect_for_watch`]).
pub async fn connect(settings: &KubeSettings) -> Result<kube::Client, KubeError> {
    let mut config = config(settings).await?;
    with_deadline(&mut config, settings);
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// Like [`connect`], but no call is retried by the client: the caller sees a 429 at once. For
/// evictions, whose 429 means "a PodDisruptionBudget forbids it now" and which the drain loop
/// retries on its own schedule until its timeout.
pub async fn connect_direct(settings: &KubeSettings) -> Result<kube::Client, KubeError> {
    let mut config = config(settings).await?;
    with_deadline(&mut config, settings);
    config.default_retry = false;
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// A client for watches: no read deadline (a quiet watch is not a hung one; kube-runtime's
/// watcher has its own idle timeout and re-lists).
pub async fn connect_for_watch(settings: &KubeSettings) -> Result<kube::Client, KubeError> {
    let config = config(settings).await?;
    kube::Client::try_from(config).map_err(KubeError::Client)
}

fn with_deadline(config: &mut kube::Config, settings: &KubeSettings) {
    config.read_timeout = Some(settings.request_timeout);
    config.write_timeout = Some(settings.request_timeout);
    // Count from when a request is sent, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
}

async fn config(settings: &KubeSettings) -> Result<kube::Config, KubeError> {
    let config = if settings.kubeconfig.is_empty() {
        kube::Config::infer().await.map_err(KubeError::Infer)?
    } else {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&settings.kubeconfig).map_err(|source| {
                KubeError::Kubeconfig {
                    path: settings.kubeconfig.clone(),
                    source,
                }
            })?;
        let options = kube::config::KubeConfigOptions {
            context: (!settings.context.is_empty()).then(|| settings.context.clone()),
            ..Default::default()
        };
        kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|source| KubeError::Kubeconfig {
                path: settings.kubeconfig.clone(),
                source,
            })?
    };
    Ok(config)
}
