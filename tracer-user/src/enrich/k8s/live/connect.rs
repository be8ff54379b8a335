//! Connecting to the API server: the `--k8s-api`/`--kubeconfig` flags, kubeconfig and
//! in-cluster configuration, and the one-line errors a bad configuration gets.
use std::{
    fmt::Debug,
    path::{Path, PathBuf},
    time::Duration,
};

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};

use crate::enrich::k8s::snapshot::one_line;

/// The command-line flags that select the live API (shared by `run` and `explain`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// Take pods, services, endpoint slices, namespaces, policies and nodes live from the
    /// Kubernetes API: in-cluster service account, or --kubeconfig.
    #[arg(long)]
    pub k8s_api: bool,
    /// Kubeconfig file for the Kubernetes API (its current context; implies --k8s-api).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

impl ApiArgs {
    pub fn enabled(&self) -> bool {
        self.k8s_api || self.kubeconfig.is_some()
    }

    pub async fn connect(&self) -> Result<Connection, LiveError> {
        connect(self.kubeconfig.as_deref()).await
    }
}

/// Why the live API cannot be used; every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// An unreadable or unusable kubeconfig: `<file>: <what>`.
    #[error("{path}: {what}")]
    Kubeconfig { path: String, what: String },
    #[error("Kubernetes API: no in-cluster service account ({0}); pass --kubeconfig PATH")]
    InCluster(String),
    #[error("Kubernetes API {server}: {what}")]
    Client { server: String, what: String },
    #[error("Kubernetes API {server}: caches not synced after {}: {what}", humantime::format_duration(*.timeout))]
    NotSynced {
        server: String,
        timeout: Duration,
        what: String,
    },
    #[error("Kubernetes API: {0}")]
    Runtime(String),
}

impl LiveError {
    /// Bad input (configuration) rather than a failure at run time: the CLI exits 2.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            LiveError::Kubeconfig { .. } | LiveError::InCluster(_) | LiveError::Client { .. }
        )
    }
}

/// A configured client and the server it talks to (for messages).
#[derive(Clone)]
pub struct Connection {
    pub client: Client,
    pub server: String,
    /// What the client was made from, for clients made on other threads (Kubernetes Events
    /// are written from the output thread).
    pub config: Config,
}

impl Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// A client from `kubeconfig` (its current context), or from the pod's service account.
/// Nothing is sent to the server yet.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Connection, LiveError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| kubeconfig_error(path, e))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| kubeconfig_error(path, e))?
        }
        None => Config::incluster().map_err(|e| LiveError::InCluster(chain(&e)))?,
    };
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let client = Client::try_from(config.clone()).map_err(|e| LiveError::Client {
        server: server.clone(),
        what: chain(&e),
    })?;
    Ok(Connection {
        client,
        server,
        config,
    })
}

fn kubeconfig_error(path: &Path, e: KubeconfigError) -> LiveError {
    let what = match &e {
        // Its message repeats the path.
        KubeconfigError::ReadConfig(io, _) => one_line(&io.to_string()),
        KubeconfigError::CurrentContextNotSet => {
            "no current-context (choose one with `kubectl config use-context NAME`)".into()
        }
        _ => chain(&e),
    };
    LiveError::Kubeconfig {
        path: path.display().to_string(),
        what,
    }
}

/// An error and its sources on one line, without the repeats of messages that already
/// quote their source.
pub(super) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}
