//! Process groups: finding the program an agent starts, signalling a whole
//! group, telling whether any member still lives, recognising an agent's group
//! (or every group a runner started) after a restart, and a guard that kills a
//! group nobody supervises any more.
//!
//! Every agent runs as the leader of its own process group (the group id is
//! its pid), so one `kill(-pgid)` reaches the agent and everything it started
//! unless a descendant deliberately left the group (`setsid`), which we accept.

use std::io;
use std::path::PathBuf;

use rustix::process::{Pid, Signal};

/// The environment variable every agent process (and so every descendant that
/// keeps its environment) carries: how a restarted daemon recognises its
/// orphans among processes that merely reuse a pid.
pub const AGENT_ID_VARIABLE: &str = "MOSAIC_AGENT_ID";

/// The environment variable every agent process carries beside its agent id:
/// the runner id of the daemon that started it. A daemon records an agent
/// only after its process has started, so after a crash in between a process
/// may exist that no record names; this is how the restarted daemon finds it.
pub const RUNNER_ID_VARIABLE: &str = "MOSAIC_RUNNER_ID";

/// The signals the runtime sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSignal {
    /// SIGTERM: please stop.
    Terminate,
    /// SIGKILL: stop now.
    Kill,
}

/// Sends `signal` to every process in group `pgid`. `Ok(false)` when the
/// group no longer exists.
pub fn signal_group(pgid: u32, signal: GroupSignal) -> io::Result<bool> {
    let Some(pid) = group_pid(pgid) else {
        return Ok(false);
    };
    let signal = match signal {
        GroupSignal::Terminate => Signal::TERM,
        GroupSignal::Kill => Signal::KILL,
    };
    match rustix::process::kill_process_group(pid, signal) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::SRCH) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

/// True while some process of group `pgid` is alive.
///
/// Zombies do not count: a dead member that its parent has not reaped yet
/// still answers `kill(-pgid, 0)`, but holds no resources and runs nothing.
/// Where `/proc` cannot be read, `kill(-pgid, 0)` alone decides.
pub fn group_is_alive(pgid: u32) -> bool {
    let Some(pid) = group_pid(pgid) else {
        return false;
    };
    // One syscall settles the common case, an empty group; only a group that
    // still has members (live or zombie) needs the scan of /proc.
    if rustix::process::test_kill_process_group(pid).is_err() {
        return false;
    }
    match live_members(pgid) {
        Some(count) => count > 0,
        None => true,
    }
}

/// True when a live process of group `pgid` carries `MOSAIC_AGENT_ID=agent_id`:
/// the group is that agent's, not a stranger's that reuses the number.
/// False where `/proc` cannot be read (nothing is then killed on suspicion).
pub fn group_belongs_to_agent(pgid: u32, agent_id: &str) -> bool {
    let marker = format!("{AGENT_ID_VARIABLE}={agent_id}");
    live_processes(Some(pgid), Some(&marker)).is_some_and(|found| !found.is_empty())
}

/// True when a live process of group `pgid` carries
/// `MOSAIC_RUNNER_ID=runner_id`: the group was started by that runner.
/// False where `/proc` cannot be read.
pub fn group_belongs_to_runner(pgid: u32, runner_id: &str) -> bool {
    let marker = format!("{RUNNER_ID_VARIABLE}={runner_id}");
    live_processes(Some(pgid), Some(&marker)).is_some_and(|found| !found.is_empty())
}

/// A live process that carries a runner's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerProcess {
    /// Its process group.
    pub group: u32,
    /// The value of its `MOSAIC_AGENT_ID`, if it has one.
    pub agent_id: Option<String>,
}

/// The live processes that carry `MOSAIC_RUNNER_ID=runner_id`: every process
/// of the agents that runner started that still runs. Empty where `/proc`
/// cannot be read.
pub fn processes_of_runner(runner_id: &str) -> Vec<RunnerProcess> {
    let marker = format!("{RUNNER_ID_VARIABLE}={runner_id}");
    live_processes(None, Some(&marker))
        .unwrap_or_default()
        .into_iter()
        .map(|process| RunnerProcess {
            group: process.group,
            agent_id: process.agent_id,
        })
        .collect()
}

/// A live process found in `/proc`.
struct LiveProcess {
    group: u32,
    /// Its `MOSAIC_AGENT_ID`; read only when its environment was.
    agent_id: Option<String>,
}

/// Counts the live (non-zombie) members of group `pgid`. `None` when `/proc`
/// cannot be listed.
fn live_members(pgid: u32) -> Option<usize> {
    live_processes(Some(pgid), None).map(|found| found.len())
}

/// The live (non-zombie) processes, only those in group `pgid` if one is
/// given and only those whose environment holds the entry `marker`
/// (`NAME=value`) if one is given. `None` when `/proc` cannot be listed.
fn live_processes(pgid: Option<u32>, marker: Option<&str>) -> Option<Vec<LiveProcess>> {
    let entries = std::fs::read_dir("/proc").ok()?;
    let agent_id_prefix = format!("{AGENT_ID_VARIABLE}=");
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|name| name.bytes().all(|byte| byte.is_ascii_digit()))
        else {
            continue;
        };
        // A process may exit between listing and reading: skip it.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((state, group)) = parse_stat(&stat) else {
            continue;
        };
        let Ok(group) = u32::try_from(group) else {
            continue;
        };
        if pgid.is_some_and(|pgid| pgid != group) || matches!(state, 'Z' | 'X' | 'x') {
            continue;
        }
        let mut agent_id = None;
        if let Some(marker) = marker {
            let Ok(environment) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            let mut marked = false;
            for entry in environment.split(|byte| *byte == 0) {
                if entry == marker.as_bytes() {
                    marked = true;
                } else if let Some(value) = entry.strip_prefix(agent_id_prefix.as_bytes()) {
                    agent_id = Some(String::from_utf8_lossy(value).into_owned());
                }
            }
            if !marked {
                continue;
            }
        }
        found.push(LiveProcess { group, agent_id });
    }
    Some(found)
}

/// The state letter and process group of a `/proc/PID/stat` line.
///
/// The command name (field 2) is in parentheses and may itself contain spaces
/// and parentheses, so fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, i64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _parent = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, group))
}

fn group_pid(pgid: u32) -> Option<Pid> {
    // Group 0 or 1 would mean "our own group" or init: never a target.
    if pgid <= 1 {
        return None;
    }
    Pid::from_raw(i32::try_from(pgid).ok()?)
}

/// Kills a process group with SIGKILL when dropped, unless disarmed.
///
/// The supervisor of an agent holds one; if the supervisor is dropped before
/// it saw the group gone (the runtime shutting down, a panic), the agent's
/// processes do not outlive it.
#[derive(Debug)]
pub struct GroupGuard {
    pgid: Option<u32>,
}

impl GroupGuard {
    /// Guards group `pgid`.
    pub fn new(pgid: u32) -> Self {
        Self { pgid: Some(pgid) }
    }

    /// The group is known to be gone: nothing to do on drop.
    pub fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take()
            && let Err(error) = signal_group(pgid, GroupSignal::Kill)
        {
            tracing::warn!(pgid, %error, "could not kill an unsupervised agent process group");
        }
    }
}

/// The program to execute for `name`: itself when it contains a `/`, else the
/// first executable file of that name in `path_variable`.
///
/// Resolving here, with the agent's PATH, lets the standard library start the
/// process with `posix_spawn`; given a bare name and a PATH of its own for the
/// child it falls back to fork and exec, which costs about half a millisecond
/// more per agent in a daemon of this size.
pub(super) fn resolve_program(name: &str, path_variable: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    std::env::split_paths(path_variable)
        .filter(|directory| directory.is_absolute())
        .map(|directory| directory.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|metadata| {
                metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_parsed_from_the_last_parenthesis() {
        assert_eq!(
            parse_stat("4242 (sleep) S 1 4240 4240 0 -1 4194560"),
            Some(('S', 4240))
        );
        assert_eq!(parse_stat("77 (a (weird) name) Z 5 77 77"), Some(('Z', 77)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) R"), None);
    }

    #[test]
    fn our_own_group_and_init_are_never_targets() {
        assert!(group_pid(0).is_none());
        assert!(group_pid(1).is_none());
        assert!(matches!(signal_group(0, GroupSignal::Kill), Ok(false)));
    }

    #[test]
    fn a_group_that_does_not_exist_is_not_alive() {
        // pid_max is at most 2^22 on Linux; this group cannot exist.
        let absent = 4_194_304 + 17;
        assert!(!group_is_alive(absent));
        assert!(!group_belongs_to_agent(absent, "x"));
        assert!(matches!(
            signal_group(absent, GroupSignal::Terminate),
            Ok(false)
        ));
    }

    #[test]
    fn a_runners_processes_are_found_by_its_id_in_their_environment() {
        use std::os::unix::process::CommandExt as _;
        let runner_id = format!("test-runner-{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(RUNNER_ID_VARIABLE, &runner_id)
            .env(AGENT_ID_VARIABLE, "agent-1")
            .process_group(0)
            .spawn()
            .expect("start sleep");
        let group = child.id();
        // The environment is the one given at exec: wait until it is there.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while processes_of_runner(&runner_id).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            processes_of_runner(&runner_id),
            [RunnerProcess {
                group,
                agent_id: Some("agent-1".to_owned()),
            }]
        );
        assert!(group_belongs_to_runner(group, &runner_id));
        assert!(!group_belongs_to_runner(group, "another-runner"));
        assert!(processes_of_runner("another-runner").is_empty());
        assert!(matches!(signal_group(group, GroupSignal::Kill), Ok(true)));
        child.wait().expect("reap sleep");
        assert!(processes_of_runner(&runner_id).is_empty());
    }

    #[test]
    fn programs_are_found_in_the_agents_path() {
        let path = std::ffi::OsString::from("relative/dir:/no/such/dir:/bin:/usr/bin");
        let found = resolve_program("sh", &path).expect("sh is in /bin or /usr/bin");
        assert!(found.is_absolute() && found.ends_with("sh"), "{found:?}");
        assert_eq!(
            resolve_program("./tool", &path),
            Some(PathBuf::from("./tool"))
        );
        assert_eq!(resolve_program("no-such-program-here", &path), None);
    }
}
