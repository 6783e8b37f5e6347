//! The README's "Federate two instances on one machine" walkthrough, run as
//! written: its shell block is taken from README.md and run by bash against the
//! real `mosaicd` binary, with only the data dir and the two ports given through
//! the variables the block defines at its top. The docs cannot rot unseen.

use std::process::Stdio;
use std::time::Duration;

use crate::support::daemon::mosaicd_binary;

/// The README, read when the tests are built.
const README: &str = include_str!("../../README.md");

/// The marker before the walkthrough's fenced shell block.
const MARKER: &str = "<!-- walkthrough: federate-two-instances -->";

/// How long the whole walkthrough may take before the test fails.
const WALKTHROUGH_DEADLINE: Duration = Duration::from_secs(120);

/// The shell block right after `marker` in `markdown`.
fn shell_block<'a>(markdown: &'a str, marker: &str) -> &'a str {
    let after = markdown
        .split_once(marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after
        .trim_start()
        .strip_prefix("```sh\n")
        .expect("a ```sh block right after the marker");
    let end = body.find("\n```").expect("the block is closed");
    &body[..=end]
}

/// Two free loopback ports (released just before the daemons bind them).
fn free_ports() -> (u16, u16) {
    let first = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let second = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    (
        first.local_addr().expect("address").port(),
        second.local_addr().expect("address").port(),
    )
}

/// The README's block as bash runs it in the tests: failing on the first
/// failing command, never leaving a daemon behind, with `mosaicd` on the
/// path, no `MOSAIC_*` variable from the developer's shell, and its output
/// captured.
fn walkthrough(demo: &std::path::Path, port_a: u16, port_b: u16) -> tokio::process::Command {
    let block = shell_block(README, MARKER);
    let binary_dir = mosaicd_binary().parent().expect("binary dir");
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2> /dev/null || true' EXIT\n{block}");
    let mut command = tokio::process::Command::new("bash");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MOSAIC_") {
            command.env_remove(name);
        }
    }
    command
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .env("DEMO", demo)
        .env("PORT_A", port_a.to_string())
        .env("PORT_B", port_b.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[test]
fn the_walkthrough_block_is_found_and_starts_with_its_variables() {
    let block = shell_block(README, MARKER);
    for variable in ["DEMO=${DEMO:-", "PORT_A=${PORT_A:-", "PORT_B=${PORT_B:-"] {
        assert!(block.contains(variable), "the block defines {variable}");
    }
    assert!(
        block
            .trim_end()
            .ends_with("kill \"$ALPHA_PID\" \"$BRAVO_PID\"")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_walkthrough_federates_two_instances() {
    let demo = tempfile::tempdir().expect("temporary dir");
    let (port_a, port_b) = free_ports();
    let mut command = walkthrough(demo.path(), port_a, port_b);
    command.process_group(0);
    let child = command.spawn().expect("run bash");
    let group = child.id().expect("pid");
    let output = match tokio::time::timeout(WALKTHROUGH_DEADLINE, child.wait_with_output()).await {
        Ok(output) => output.expect("bash output"),
        Err(_) => {
            // The script and the daemons it started share its process group.
            if let Some(pid) = rustix::process::Pid::from_raw(group as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let log =
                |name: &str| std::fs::read_to_string(demo.path().join(name)).unwrap_or_default();
            panic!(
                "the walkthrough did not finish within {WALKTHROUGH_DEADLINE:?}\nalpha log:\n{}\nbravo log:\n{}",
                log("alpha.log"),
                log("bravo.log")
            );
        }
    };
    // The output closed, so no daemon the walkthrough started (they inherit
    // its stdout) outlives it.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walkthrough failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    // What a reader would look for: the connection, the agent on bravo with
    // its output, its end, and both sides' command logs.
    for expected in [
        "state:        PENDING",
        "peer:    bravo",
        "  hello from bravo",
        "state:   RUNNING",
        "state:   KILLED (demo over)",
        "agent.spawn",
        "agent.kill",
    ] {
        assert!(
            stdout.contains(expected),
            "the walkthrough's output lacks {expected:?}:\n{stdout}"
        );
    }
    let agent_id = stdout
        .lines()
        .find_map(|line| line.strip_prefix("agent:   "))
        .expect("an agent was printed");
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with(agent_id) && line.contains("RUNNING")),
        "`agent list --peer` showed the agent running:\n{stdout}"
    );
    let log_rows = |direction: &str| {
        stdout
            .lines()
            .filter(|line| {
                line.split_whitespace().nth(1) == Some(direction) && line.contains("agent.spawn")
            })
            .count()
    };
    assert_eq!(log_rows("out"), 1, "alpha logged one spawn sent:\n{stdout}");
    assert_eq!(
        log_rows("in"),
        1,
        "bravo logged one spawn received:\n{stdout}"
    );
}

/// The walkthrough with alpha's port already taken stops within seconds and
/// says why, instead of waiting for a daemon that will never answer.
#[tokio::test(flavor = "multi_thread")]
async fn the_walkthrough_with_its_port_taken_fails_fast_saying_why() {
    let demo = tempfile::tempdir().expect("temporary dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port_a = taken.local_addr().expect("address").port();
    let (_, port_b) = free_ports();
    let mut command = walkthrough(demo.path(), port_a, port_b);
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        command.spawn().expect("run bash").wait_with_output(),
    )
    .await
    .expect("the walkthrough stops on its own")
    .expect("bash output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "it took {:?}",
        started.elapsed()
    );
    assert!(stderr.contains("alpha did not start:"), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port_a}")),
        "the reason names the address: {stderr}"
    );
    drop(taken);
}
