//! Deployment: the real binary speaking systemd's readiness protocol
//! (`NOTIFY_SOCKET`), the shipped unit read by systemd's own verifier, and the
//! container image's health check and build context.

use std::ffi::OsStr;
use std::os::unix::net::SocketAddr as UnixAddress;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mosaic_mesh::config::{Config, ConfigArgs, FileConfig};
use mosaic_mesh::store::Store;
use mosaic_mesh::store::testing::TestDatabase;
use tokio::net::UnixDatagram;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::binary::{channel_to, mosaicd, spawn_serve_command};
use crate::support::daemon::mosaicd_binary;

/// How long a first start (a new identity, migrations) may take.
const START: Duration = Duration::from_secs(30);

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/deploy")
        .join(name)
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `command` (a [`mosaicd`] command) as `serve` on 127.0.0.1:`port`, telling
/// `notify_socket`.
fn serve_notifying(command: Command, port: u16, notify_socket: &OsStr) -> tokio::process::Child {
    let mut command = tokio::process::Command::from(command);
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("NOTIFY_SOCKET", notify_socket)
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command.spawn().expect("spawn mosaicd serve")
}

/// The next message the "service manager" receives, within `within`.
async fn next_message(manager: &UnixDatagram, within: Duration) -> String {
    let mut buffer = vec![0_u8; 4096];
    let length = tokio::time::timeout(within, manager.recv(&mut buffer))
        .await
        .unwrap_or_else(|_| panic!("no message to the service manager within {within:?}"))
        .expect("receive a notification");
    String::from_utf8(buffer[..length].to_vec()).expect("a UTF-8 notification")
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|found| found == line)
}

/// One standard health check, no retries.
async fn health_status(address: &str, data_dir: &Path) -> i32 {
    let mut health = HealthClient::new(channel_to(address, data_dir).await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

fn terminate(child: &tokio::process::Child) {
    let pid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw)
        .expect("the daemon's pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_only_once_the_daemon_answers_and_stopping_on_sigterm() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let database = TestDatabase::postgres()
        .await
        .expect("create a PostgreSQL test database (is MOSAIC_TEST_DATABASE_URL reachable?)");
    let socket_path = data_dir.path().join("notify");
    let manager = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    // A replica that is still starting up holds the start-up lock: the
    // daemon has bound its port but waits, and must not say it is ready.
    let other_replica = Store::lock_for_startup(&database.url, Duration::from_secs(5))
        .await
        .expect("take the start-up lock");
    let port = free_loopback_port();
    let mut command = mosaicd(data_dir.path());
    command.args(["--database-url", &database.url]);
    let mut daemon = serve_notifying(command, port, socket_path.as_os_str());
    let early = tokio::time::timeout(Duration::from_secs(2), next_message(&manager, START)).await;
    assert!(
        early.is_err(),
        "told the service manager too early: {early:?}"
    );

    drop(other_replica);
    let ready = next_message(&manager, START).await;
    assert!(has_line(&ready, "READY=1"), "{ready:?}");
    // READY=1 is what `systemctl start` waits for: from then on the daemon
    // answers, with no retry and no wait.
    let status = tokio::time::timeout(
        Duration::from_secs(2),
        health_status(&format!("127.0.0.1:{port}"), data_dir.path()),
    )
    .await
    .expect("the daemon answered at once after READY=1");
    assert_eq!(status, ServingStatus::Serving as i32);

    terminate(&daemon);
    let stopping = next_message(&manager, Duration::from_secs(10)).await;
    assert!(has_line(&stopping, "STOPPING=1"), "{stopping:?}");
    let exit = tokio::time::timeout(START, daemon.wait())
        .await
        .expect("the daemon stopped")
        .expect("wait for the daemon");
    assert!(exit.success(), "the daemon exited with {exit}");
    database.cleanup().await.expect("drop the test database");
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_on_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt as _;

    let data_dir = tempfile::tempdir().expect("data dir");
    let port = free_loopback_port();
    let name = format!("mosaic-test-notify-{}-{port}", std::process::id());
    let address = UnixAddress::from_abstract_name(name.as_bytes()).expect("abstract name");
    let manager = std::os::unix::net::UnixDatagram::bind_addr(&address).expect("bind");
    manager.set_nonblocking(true).expect("non-blocking");
    let manager = UnixDatagram::from_std(manager).expect("tokio socket");
    let _daemon = serve_notifying(
        mosaicd(data_dir.path()),
        port,
        OsStr::new(&format!("@{name}")),
    );

    let ready = next_message(&manager, START).await;
    assert!(has_line(&ready, "READY=1"), "{ready:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notify_socket_nobody_reads_does_not_stop_the_daemon() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let nowhere = data_dir.path().join("no-manager-here");
    let mut command = mosaicd(data_dir.path());
    command.env("NOTIFY_SOCKET", &nowhere);
    let (mut daemon, address, mut log) =
        crate::support::binary::spawn_serve_with_log(command).await;
    let warned = tokio::time::timeout(START, async {
        while let Some(line) = log.next_line().await.expect("read the log") {
            if line.contains("cannot tell the service manager") {
                return;
            }
        }
        panic!("the daemon exited without warning");
    })
    .await;
    assert!(warned.is_ok(), "no warning that READY=1 was not delivered");
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    assert_eq!(
        health_status(&address, data_dir.path()).await,
        ServingStatus::Serving as i32
    );
    assert!(daemon.try_wait().expect("poll the daemon").is_none());
}

/// `[Service]` settings of the shipped unit, as `(key, value)` in order.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && !line.starts_with('#')
            && let Some((key, value)) = line.split_once('=')
        {
            settings.push((key.to_owned(), value.to_owned()));
        }
    }
    settings
}

fn seconds(value: &str) -> u64 {
    humantime::parse_duration(value)
        .map(|duration| duration.as_secs())
        .or_else(|_| value.parse())
        .unwrap_or_else(|_| panic!("{value:?} is not a duration"))
}

#[test]
fn the_systemd_unit_waits_for_ready_stops_the_daemon_first_and_never_restarts_a_configuration_error()
 {
    let path = deploy_file("mosaicd.service");
    let text = std::fs::read_to_string(&path).expect("read the unit");
    let settings = unit_settings(&text);
    let value = |key: &str| {
        settings
            .iter()
            .rev()
            .find(|(found, _)| found == key)
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("the unit sets no {key}="))
    };
    assert_eq!(value("Type"), "notify");
    assert_eq!(value("NotifyAccess"), "main");
    assert_eq!(value("KillMode"), "mixed");
    assert_eq!(value("Restart"), "on-failure");
    // Exit code 2: configuration (cli/exit.rs).
    assert!(
        value("RestartPreventExitStatus")
            .split_whitespace()
            .any(|status| status == "2")
    );
    assert!(value("LimitNOFILE").parse::<u64>().expect("a number") >= 65536);
    assert_eq!(value("OOMPolicy"), "continue");
    assert!(
        settings
            .iter()
            .any(|(key, value)| key == "Environment" && value.starts_with("MOSAIC_PUBLIC_URL=")),
        "the unit sets the public URL explicitly"
    );

    // The stop timeout covers the daemon's own stop with the default settings.
    let data_dir = tempfile::tempdir().expect("data dir");
    let defaults = Config::resolve(
        FileConfig::default(),
        &ConfigArgs {
            data_dir: Some(data_dir.path().to_path_buf()),
            ..ConfigArgs::default()
        },
    )
    .expect("default configuration");
    let own_stop = defaults
        .shutdown_grace
        .max(defaults.agents.kill_grace + Duration::from_secs(5));
    assert!(
        Duration::from_secs(seconds(value("TimeoutStopSec"))) > own_stop,
        "TimeoutStopSec must exceed {own_stop:?}"
    );

    // systemd's own reading, where it is installed: unknown keys and values it
    // cannot parse are only warnings to systemd, so any output fails.
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed; the unit was not verified");
        return;
    };
    assert!(version.status.success());
    let unit_dir = tempfile::tempdir().expect("unit dir");
    let unit = unit_dir.path().join("mosaicd.service");
    // verify checks that ExecStart's program exists: point it at this build.
    let installed = text.replace(
        "/usr/local/bin/mosaicd",
        mosaicd_binary().to_str().expect("a UTF-8 path"),
    );
    std::fs::write(&unit, installed).expect("write the unit");
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&verified.stderr);
    assert!(
        verified.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        verified.status
    );
}

/// The instruction starting with `keyword` in a Containerfile, continuation
/// lines joined.
fn instruction(containerfile: &str, keyword: &str) -> String {
    let mut lines = containerfile.lines();
    let mut joined = String::new();
    for line in lines.by_ref() {
        if line.starts_with(keyword) && line[keyword.len()..].starts_with(' ') {
            joined.push_str(line);
            break;
        }
    }
    assert!(!joined.is_empty(), "no {keyword} instruction");
    while joined.ends_with('\\') {
        joined.pop();
        joined.push_str(lines.next().expect("a continued line").trim_start());
    }
    joined
}

/// The container's HEALTHCHECK command, run here by the same shell (bash).
fn container_health_check(containerfile: &str, metrics_listen: &str) -> bool {
    let healthcheck = instruction(containerfile, "HEALTHCHECK");
    let json = &healthcheck[healthcheck.find(" CMD ").expect("CMD in HEALTHCHECK") + 5..];
    let argv: Vec<String> = serde_json::from_str(json.trim()).expect("HEALTHCHECK CMD in JSON");
    Command::new(&argv[0])
        .args(&argv[1..])
        .env("MOSAIC_METRICS_LISTEN", metrics_listen)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the health check")
        .success()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_container_health_check_passes_while_the_daemon_answers_and_fails_after() {
    let containerfile =
        std::fs::read_to_string(deploy_file("Containerfile")).expect("read the Containerfile");
    let data_dir = tempfile::tempdir().expect("data dir");
    let metrics_listen = format!("127.0.0.1:{}", free_loopback_port());
    let mut command = mosaicd(data_dir.path());
    command.args(["--metrics-listen", &metrics_listen]);
    // Returns at the first log line with `listen=`; the metrics listener's own
    // line is one, and it comes once /healthz answers.
    let (mut daemon, _address) = spawn_serve_command(command).await;
    assert!(container_health_check(&containerfile, &metrics_listen));
    daemon.kill().await.expect("kill the daemon");
    daemon.wait().await.expect("wait for the daemon");
    assert!(!container_health_check(&containerfile, &metrics_listen));
}

#[test]
fn the_container_build_context_holds_what_the_build_copies_and_nothing_else() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let containerfile =
        std::fs::read_to_string(deploy_file("Containerfile")).expect("read the Containerfile");
    let ignore = std::fs::read_to_string(deploy_file("Containerfile.dockerignore"))
        .expect("read Containerfile.dockerignore beside the Containerfile");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(patterns.first(), Some(&"*"), "an allowlist starts with `*`");
    let copied: Vec<&str> = containerfile
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter(|arguments| !arguments.starts_with("--from"))
        .flat_map(|arguments| {
            let mut words: Vec<&str> = arguments.split_whitespace().collect();
            words.pop(); // the destination
            words
        })
        .collect();
    assert!(!copied.is_empty(), "the build copies sources");
    for source in copied {
        assert_ne!(source, ".", "the whole context is copied");
        assert!(
            patterns.contains(&format!("!{source}").as_str()),
            "{source} is copied but left out of the build context"
        );
        assert!(root.join(source).exists(), "{source} does not exist");
    }
    // A numeric user: runAsNonRoot can check it, and volumes keep their owner.
    let user = instruction(&containerfile, "USER");
    let uid = user["USER ".len()..].split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER {uid} is not a numeric non-root user"
    );
}
