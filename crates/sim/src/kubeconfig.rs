//! The kubeconfig the simulator writes on start, so kubectl and the kube crate find it.

/// A kubeconfig for a simulator at `server` (`http://host:port`).
pub fn render(server: &str) -> String {
    render_with_ca(server, None)
}

/// A kubeconfig for a simulator at `server`, trusting `ca_pem` when it serves HTTPS.
pub fn render_with_ca(server: &str, ca_pem: Option<&str>) -> String {
    use base64::Engine;
    let ca = ca_pem
        .map(|pem| {
            format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            )
        })
        .unwrap_or_default();
    // Over HTTPS kubectl asks for a username when the user has no credentials; the simulator
    // takes any caller, so a placeholder token keeps kubectl quiet.
    let user = if ca_pem.is_some() {
        "{ token: shoal-sim }"
    } else {
        "{}"
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: shoal-sim\n  cluster:\n    server: {server}\n{ca}users:\n- name: shoal-sim\n  user: {user}\ncontexts:\n- name: shoal-sim\n  context:\n    cluster: shoal-sim\n    user: shoal-sim\n    namespace: default\ncurrent-context: shoal-sim\n"
    )
}

/// Writes the kubeconfig to `path`.
pub fn write(path: &std::path::Path, server: &str) -> std::io::Result<()> {
    write_with_ca(path, server, None)
}

/// Writes the kubeconfig, trusting `ca_pem` (an HTTPS simulator), to `path`.
pub fn write_with_ca(
    path: &std::path::Path,
    server: &str,
    ca_pem: Option<&str>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, render_with_ca(server, ca_pem))
}
