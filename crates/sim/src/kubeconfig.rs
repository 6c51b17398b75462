//! The kubeconfig the simulator writes on start, so kubectl and the kube crate find it.

/// A kubeconfig for a simulator at `server` (`http://host:port`).
pub fn render(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: shoal-sim\n  cluster:\n    server: {server}\nusers:\n- name: shoal-sim\n  user: {{}}\ncontexts:\n- name: shoal-sim\n  context:\n    cluster: shoal-sim\n    user: shoal-sim\n    namespace: default\ncurrent-context: shoal-sim\n"
    )
}

/// Writes the kubeconfig to `path`.
pub fn write(path: &std::path::Path, server: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, render(server))
}
