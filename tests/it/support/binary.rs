//! The `mosaicd` binary as a separate process: commands with a clean
//! environment, and `mosaicd serve` started on a free port.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::daemon::mosaicd_binary;

/// A `mosaicd` command on `data_dir`, with no `MOSAIC_*` variables inherited from
/// the developer's shell.
pub fn mosaicd(data_dir: &Path) -> Command {
    let mut command = Command::new(mosaicd_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MOSAIC_") {
            command.env_remove(name);
        }
    }
    command
        .arg("--data-dir")
        .arg(data_dir)
        .env("MOSAIC_LOG", "warn");
    command
}

/// Starts `mosaicd serve` on a free port and returns the child and its address.
pub async fn spawn_serve(data_dir: &Path) -> (tokio::process::Child, String) {
    spawn_serve_command(mosaicd(data_dir)).await
}

/// Starts `command` (a [`mosaicd`] command, with any extra flags or variables)
/// as `serve --listen 127.0.0.1:0`; returns the child and its address once it
/// serves. The child is killed when dropped.
pub async fn spawn_serve_command(command: Command) -> (tokio::process::Child, String) {
    let (child, address, mut lines) = spawn_serve_with_log(command).await;
    // Keep draining stderr so the daemon never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, address)
}

/// The daemon's log (stderr), line by line.
pub type LogLines = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;

/// [`spawn_serve_command`] that hands the rest of the daemon's log to the
/// caller, which reads it (or leaves the pipe to fill).
pub async fn spawn_serve_with_log(command: Command) -> (tokio::process::Child, String, LogLines) {
    let mut command = tokio::process::Command::from(command);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("MOSAIC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn mosaicd serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if let Some(address) = serving_address(&line) {
                return address;
            }
        }
        panic!("mosaicd exited before serving");
    })
    .await
    .expect("mosaicd starts within 30 s");
    (child, address, lines)
}

/// The address in the daemon's "serving" line, in either log format: the
/// `listen` field (not `metrics.listen`) of a text line or of a JSON one.
fn serving_address(line: &str) -> Option<String> {
    if line.starts_with('{') {
        let event: serde_json::Value = serde_json::from_str(line).ok()?;
        return event["fields"]["listen"].as_str().map(str::to_owned);
    }
    line.split(' ')
        .find_map(|field| field.strip_prefix("listen="))
        .map(str::to_owned)
}

/// A TLS channel to a `mosaicd serve` at `address`, pinning the key of the
/// certificate it wrote into `data_dir`.
pub async fn channel_to(address: &str, data_dir: &Path) -> tonic::transport::Channel {
    mosaic_mesh::tls::install_default_provider();
    let pem = std::fs::read_to_string(mosaic_mesh::config::certificate_path(data_dir))
        .expect("daemon certificate");
    let spki = crate::support::daemon::spki_of_pem(&pem);
    let key = mosaic_mesh::identity::PublicKey::from_spki_der(&spki).expect("p-256 key");
    let tls = std::sync::Arc::new(
        mosaic_mesh::tls::pinned_client_config(mosaic_mesh::tls::ServerPin::PublicKey(key))
            .expect("client tls"),
    );
    mosaic_mesh::tls::connect_channel(
        &format!("https://{address}"),
        Some(tls),
        mosaic_mesh::tls::ChannelTimeouts::default(),
    )
    .await
    .expect("connect to mosaicd")
}
