//! Shoal's own binaries run as real processes, with logs captured for failure messages.

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::wait_for;

/// Path of a binary built from this workspace (`cargo build --workspace --bins`).
///
/// Looks in `SHOAL_BIN_DIR` when set, else next to the running test's target directory.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("SHOAL_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current exe: {e}"));
            // target/<profile>/deps/<test-binary> -> target/<profile>
            let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} does not exist; build the binaries first: `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running service process; killed on drop.
pub struct ServiceProcess {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts `binary` with `args` and extra environment, logging stdout+stderr to a temp file.
    pub fn start(binary: &str, args: &[String], env: &[(String, String)]) -> ServiceProcess {
        ServiceProcess::start_program(binary, &bin_path(binary), args, env)
    }

    /// Starts the program at `path` (a fixture that is not one of ours, e.g. a Python fake)
    /// under `name`, as [`ServiceProcess::start`] does.
    pub fn start_program(
        binary: &str,
        path: &std::path::Path,
        args: &[String],
        env: &[(String, String)],
    ) -> ServiceProcess {
        let log_dir = tempfile::Builder::new()
            .prefix("shoal-proc-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let log_path = log_dir.path().join(format!("{binary}.log"));
        let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("log file: {e}"));
        let err_log = log.try_clone().unwrap_or_else(|e| panic!("log file: {e}"));
        let mut command = Command::new(path);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        // Tests must not inherit a developer's telemetry or config settings by accident.
        for (key, _) in std::env::vars() {
            if key.starts_with("SHOAL_") && key != "SHOAL_BIN_DIR" || key.starts_with("OTEL_") {
                command.env_remove(&key);
            }
        }
        // Shoal's services refuse to serve without TLS unless told; tests that do not set up
        // TLS say plaintext (a test that does sets grpc.tls, which then wins for serving).
        if binary.starts_with("shoal-")
            && binary != "shoal-sim"
            && !env.iter().any(|(k, _)| k == "SHOAL_GRPC__PLAINTEXT")
        {
            command.env("SHOAL_GRPC__PLAINTEXT", "true");
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        ServiceProcess {
            name: binary.to_string(),
            child: Some(child),
            log_path,
            _log_dir: log_dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Everything the process wrote so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal (SIGKILL, SIGSTOP, SIGCONT, SIGTERM, …).
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.try_status())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The binary's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // Resume a stopped process first so that SIGKILL is delivered promptly.
        self.signal(Signal::SIGCONT);
        self.kill();
    }
}
