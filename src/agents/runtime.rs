//! [`AgentRuntime`]: the in-process API of the agent runtime — spawn, get,
//! list, kill, watch, status — used by the AgentControl handlers and by the
//! federation's signed commands alike.
//!
//! The database is the record; this module adds what only a live process has:
//! the agents this daemon supervises (`tracked`), each with its current record,
//! a broadcast of its events and a stop request. An agent is tracked from just
//! before its process starts until its terminal state is persisted.
//!
//! An agent is recorded once, after its process has started: RUNNING with its
//! pid, its SPAWNING step and the step into RUNNING in one transaction, before
//! Spawn answers. Its process carries the agent id and this runner's id in its
//! environment, so a crash between the start and that commit leaves nothing
//! that a restarted daemon cannot find ([`AgentRuntime::reconcile`], in
//! `reconcile.rs`). The agents it supervises are in `registry.rs`, the
//! streams of `watch` in `watch.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::command::{self, Substitutions};
use super::elsewhere::Elsewhere;
use super::error::AgentError;
use super::journal::Journal;
use super::model::{
    AgentEvent, AgentFilter, AgentRecord, AgentState, Origin, RuntimeStatus, SpawnSpec,
};
use super::paging;
use super::process::{self, AGENT_ID_VARIABLE, GroupGuard, RUNNER_ID_VARIABLE};
use super::registry::{Registry, StopRequest, Tracked};
use super::spare::{AgentDir, Spares};
use super::supervisor::{self, Supervision};
use crate::clock::now_ms;
use crate::config::{AgentType, AgentsConfig};
use crate::store::{Store, StoreError};

/// Environment variables an agent inherits from the daemon; everything else
/// (the master key above all) stays out unless the agent type sets it.
const INHERITED_VARIABLES: [&str; 10] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "TERM", "SHELL",
];
/// PATH for agents when the daemon has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Longest accepted kill reason, in bytes.
pub const MAX_KILL_REASON_BYTES: usize = 1024;

/// The agent runtime of this daemon. Cheap to share behind an `Arc`.
pub struct AgentRuntime {
    pub(super) store: Store,
    pub(super) settings: Arc<AgentsConfig>,
    /// `<data_dir>/agents`: one directory per agent.
    pub(super) agents_dir: PathBuf,
    /// Names this daemon in agent records (see [`AgentRuntime::runner_id`]).
    pub(super) runner_id: String,
    /// One permit per running agent: the concurrency cap, enforced atomically.
    slots: Arc<Semaphore>,
    pub(super) registry: Arc<Registry>,
    /// Set when the daemon begins to shut down: no new agents.
    closing: AtomicBool,
    /// Agent directories made ahead of the spawns that take them.
    pub(super) spares: Arc<Spares>,
    /// The other replicas, for agents another one supervises; unset in a
    /// runtime that serves no calls (tests, `init`).
    elsewhere: OnceLock<Arc<dyn Elsewhere>>,
}

impl AgentRuntime {
    /// A runtime over `store` with `settings`, keeping agent directories under
    /// `<data_dir>/agents`. Creates that directory and the runner id file.
    pub fn new(store: Store, settings: AgentsConfig, data_dir: &Path) -> std::io::Result<Self> {
        let agents_dir = data_dir.join("agents");
        std::fs::create_dir_all(&agents_dir)?;
        let runner_id = crate::replicas::runner::load_or_create_runner_id(&agents_dir)?;
        Ok(Self {
            store,
            slots: Arc::new(Semaphore::new(settings.max_concurrent)),
            settings: Arc::new(settings),
            spares: Spares::new(agents_dir.clone(), runner_id.clone()),
            agents_dir,
            runner_id,
            registry: Arc::new(Registry::default()),
            closing: AtomicBool::new(false),
            elsewhere: OnceLock::new(),
        })
    }

    /// Routes the kills and watches of agents that another replica
    /// supervises through `elsewhere`. Set once, before serving.
    pub fn route_elsewhere_through(&self, elsewhere: Arc<dyn Elsewhere>) {
        if self.elsewhere.set(elsewhere).is_err() {
            tracing::warn!("the routing to other replicas was already set");
        }
    }

    /// The id that names this daemon (its data dir) as the supervisor of the
    /// agents it starts. Kept in `<data_dir>/agents/runner-id`, so it survives
    /// restarts, and differs between replicas sharing a database.
    pub fn runner_id(&self) -> &str {
        &self.runner_id
    }

    /// How many agents run and how many may.
    pub fn status(&self) -> RuntimeStatus {
        let capacity = self.settings.max_concurrent;
        RuntimeStatus {
            running: capacity.saturating_sub(self.slots.available_permits()),
            capacity,
        }
    }

    /// Starts an agent. Returns it RUNNING (with its pid), or FAILED when its
    /// process could not be started.
    ///
    /// Refused, with nothing recorded or started: a malformed spec
    /// ([`AgentError::Invalid`]) and a full runtime ([`AgentError::AtCapacity`]).
    /// When the database does not record the start, the process is stopped
    /// before the error is returned.
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<AgentRecord, AgentError> {
        let (agent_type, timeout_secs) = Self::check_spec(&self.settings, &spec)?;
        if self.closing.load(Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let permit =
            Arc::clone(&self.slots)
                .try_acquire_owned()
                .map_err(|_| AgentError::AtCapacity {
                    running: self.status().running,
                    max: self.settings.max_concurrent,
                })?;

        // The agent's directory names it: a spare made ahead, or one made
        // now. One that cannot be made fails the agent (below).
        let dir = self.spares.take();
        let id = dir
            .as_ref()
            .map_or_else(|_| self.spares.new_agent_id(), |dir| dir.id.clone());
        let now = now_ms();
        let record = AgentRecord {
            id,
            agent_type: spec.agent_type,
            state: AgentState::Spawning,
            state_reason: String::new(),
            prompt: spec.prompt,
            task_id: spec.task_id,
            labels: spec.labels,
            origin: spec.origin,
            runner_id: self.runner_id.clone(),
            pid: None,
            exit_code: None,
            signal: None,
            output_tail: Vec::new(),
            output_bytes: 0,
            output_truncated: false,
            timeout_secs,
            created_at_ms: now,
            started_at_ms: None,
            ended_at_ms: None,
            updated_at_ms: now,
        };
        // Tracked (not yet recorded) before its process starts: the process
        // knows its id and may ask about itself, and a kill or shutdown that
        // comes meanwhile reaches the supervisor.
        let tracked = Arc::new(Tracked::new(record.clone()));
        self.registry
            .insert(record.id.clone(), Arc::clone(&tracked));
        self.start(record, agent_type, dir, tracked, permit).await
    }

    /// Starts the process of a new agent, records it RUNNING and hands it to
    /// a supervisor.
    async fn start(
        &self,
        record: AgentRecord,
        agent_type: AgentType,
        dir: std::io::Result<AgentDir>,
        tracked: Arc<Tracked>,
        permit: OwnedSemaphorePermit,
    ) -> Result<AgentRecord, AgentError> {
        let (work_dir, output_file, events_file, spare) = match dir {
            Ok(dir) => {
                let spare = dir.is_spare();
                (dir.work_dir, dir.output, dir.events, spare)
            }
            Err(error) => {
                let reason = format!("cannot prepare the agent's directory: {error}");
                let mut journal = Journal::new(None, self.settings.output_cap_bytes);
                Self::journal_recorded(&mut journal, &tracked, &record).await;
                return self
                    .fail_to_start(record, &tracked, &mut journal, reason, permit)
                    .await;
            }
        };
        // Event 1: the agent as recorded (SPAWNING).
        let mut journal = Journal::new(Some(events_file), self.settings.output_cap_bytes);
        Self::journal_recorded(&mut journal, &tracked, &record).await;

        let arguments = command::render(
            &agent_type.command,
            Substitutions {
                prompt: &record.prompt,
                task_id: &record.task_id,
                agent_id: &record.id,
                workdir: &work_dir.to_string_lossy(),
            },
        );
        let path_variable = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
        let path_variable = agent_type
            .env
            .get("PATH")
            .map_or(path_variable, std::ffi::OsString::from);
        // A configured command is never empty (config checks it), but a Config
        // built in code could be: fail the agent rather than panic.
        let Some((program_name, program_arguments)) = arguments.split_first() else {
            let reason = format!("agent type {:?} has an empty command", record.agent_type);
            return self
                .fail_to_start(record, &tracked, &mut journal, reason, permit)
                .await;
        };
        let Some(program) = process::resolve_program(program_name, &path_variable) else {
            let reason = format!("cannot start {program_name:?}: not found in PATH");
            return self
                .fail_to_start(record, &tracked, &mut journal, reason, permit)
                .await;
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(program_arguments)
            .current_dir(&work_dir)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own process group, so one signal reaches all it starts.
            .process_group(0);
        for name in INHERITED_VARIABLES {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.env("PATH", &path_variable);
        command
            .envs(&agent_type.env)
            .env(AGENT_ID_VARIABLE, &record.id)
            .env(RUNNER_ID_VARIABLE, &self.runner_id)
            .env("MOSAIC_TASK_ID", &record.task_id)
            .env("MOSAIC_AGENT_WORKDIR", &work_dir);

        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                let reason = format!("cannot start {program_name:?}: {error}");
                return self
                    .fail_to_start(record, &tracked, &mut journal, reason, permit)
                    .await;
            }
        };
        let Some(pid) = child.id() else {
            // The child was reaped already; it cannot be supervised.
            let reason = "the process exited before it could be supervised".to_owned();
            return self
                .fail_to_start(record, &tracked, &mut journal, reason, permit)
                .await;
        };
        let guard = GroupGuard::new(pid);

        let mut running = record.clone();
        running.state = AgentState::Running;
        running.pid = Some(pid);
        running.started_at_ms = Some(now_ms());
        running.updated_at_ms = running.started_at_ms.unwrap_or(running.created_at_ms);
        // The one commit before Spawn answers: the record, RUNNING with its
        // pid, and its history. Until it is committed the process is found
        // after a crash by the runner id in its environment (see `reconcile`).
        if let Err(error) = self.store.insert_agent(&running).await {
            // Unrecorded, the process must not run: the guard kills its group
            // when dropped here, and the agent is failed if the database lets us.
            drop(guard);
            let _ = child.wait().await;
            let reason =
                "the database did not record the start; the process was stopped".to_owned();
            let _ = self
                .fail_to_start(running, &tracked, &mut journal, reason, permit)
                .await;
            return Err(error.into());
        }
        self.spares.recorded(&running.id, spare);
        let event = AgentEvent::StateChanged {
            from: Some(AgentState::Spawning),
            agent: Box::new(running.clone()),
        };
        tracked.publish(journal.append(vec![event]).await);
        tracing::info!(
            agent.id = %running.id,
            agent.r#type = %running.agent_type,
            origin = running.origin.kind().as_str(),
            pid,
            "agent running"
        );

        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        tokio::spawn(supervisor::supervise(Supervision {
            store: self.store.clone(),
            settings: Arc::clone(&self.settings),
            registry: Arc::clone(&self.registry),
            tracked,
            child,
            stdout,
            stderr,
            output_file: tokio::fs::File::from_std(output_file),
            journal,
            guard,
            permit,
            timeout: Duration::from_secs(u64::from(running.timeout_secs)),
        }));
        Ok(running)
    }

    /// Records that an agent's process could not be started (or was stopped
    /// because its start could not be recorded): FAILED with `reason`.
    async fn fail_to_start(
        &self,
        record: AgentRecord,
        tracked: &Tracked,
        journal: &mut Journal,
        reason: String,
        permit: OwnedSemaphorePermit,
    ) -> Result<AgentRecord, AgentError> {
        tracing::warn!(agent.id = %record.id, %reason, "agent failed to start");
        let mut failed = record;
        let now = now_ms();
        failed.state = AgentState::Failed;
        failed.state_reason = reason;
        failed.ended_at_ms = Some(now);
        failed.updated_at_ms = now;
        let persisted = match self.store.insert_agent(&failed).await {
            // A commit reported as failed may still have happened (the
            // connection was lost after COMMIT was sent): then the record
            // says RUNNING, and the agent moves on from there.
            Err(StoreError::Conflict(_)) => {
                self.store
                    .record_agent_transition(AgentState::Running, &failed)
                    .await
            }
            other => other,
        };
        drop(permit);
        let event = AgentEvent::StateChanged {
            from: Some(AgentState::Spawning),
            agent: Box::new(failed.clone()),
        };
        tracked.publish(journal.append(vec![event]).await);
        self.registry.remove(&failed.id);
        persisted?;
        // Recorded: a spare it took (if any) is one no more.
        self.spares.recorded(&failed.id, true);
        Ok(failed)
    }

    /// Journals and publishes event 1, the agent as recorded.
    async fn journal_recorded(journal: &mut Journal, tracked: &Tracked, record: &AgentRecord) {
        let event = AgentEvent::StateChanged {
            from: None,
            agent: Box::new(record.clone()),
        };
        tracked.publish(journal.append(vec![event]).await);
    }

    /// Checks a spawn spec against the configuration `settings`; returns the
    /// agent type and the timeout in seconds. Pure (no I/O, nothing recorded);
    /// public so the fuzz targets in `fuzz/` can run a peer's spawn command
    /// through the same checks.
    pub fn check_spec(
        settings: &AgentsConfig,
        spec: &SpawnSpec,
    ) -> Result<(AgentType, u32), AgentError> {
        let invalid = AgentError::Invalid;
        if spec.agent_type.is_empty() {
            return Err(invalid("agent_type is required".to_owned()));
        }
        command::check_type_name(&spec.agent_type).map_err(invalid)?;
        let Some(agent_type) = settings.types.get(&spec.agent_type) else {
            let known: Vec<&str> = settings.types.keys().map(String::as_str).collect();
            return Err(invalid(format!(
                "unknown agent type {:?}; configured types: {}",
                spec.agent_type,
                if known.is_empty() {
                    "none (add [agents.types.NAME] to the config)".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        };
        if spec.prompt.len() > settings.max_prompt_bytes {
            return Err(invalid(format!(
                "the prompt is {} bytes, more than the maximum of {} (agents.max_prompt_bytes)",
                spec.prompt.len(),
                settings.max_prompt_bytes
            )));
        }
        if spec.prompt.contains('\0') {
            return Err(invalid("the prompt contains a NUL byte".to_owned()));
        }
        command::check_labels(&spec.labels).map_err(invalid)?;
        command::check_task_id(&spec.task_id).map_err(invalid)?;
        if let Origin::Peer {
            instance_id,
            workspace,
        } = &spec.origin
            && (instance_id.is_empty() || workspace.is_empty())
        {
            return Err(invalid(
                "a peer origin needs its instance id and workspace".to_owned(),
            ));
        }
        let maximum = agent_type.timeout;
        let timeout = match spec.timeout {
            None => maximum,
            Some(timeout) if timeout.is_zero() => {
                return Err(invalid("timeout_seconds must be at least 1".to_owned()));
            }
            Some(timeout) if timeout > maximum => {
                return Err(invalid(format!(
                    "timeout_seconds {} is above the maximum of {} for agent type {:?}",
                    timeout.as_secs(),
                    maximum.as_secs(),
                    spec.agent_type
                )));
            }
            Some(timeout) => timeout,
        };
        let timeout_secs = u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX);
        Ok((agent_type.clone(), timeout_secs))
    }

    /// One agent, as fresh as this daemon knows it.
    pub async fn get(&self, id: &str) -> Result<AgentRecord, AgentError> {
        if let Some(tracked) = self.registry.get(id) {
            return Ok(tracked.snapshot());
        }
        self.store
            .get_agent(id)
            .await?
            .ok_or_else(|| AgentError::NotFound(id.to_owned()))
    }

    /// A page of agents matching `filter`, newest first, and the token of the
    /// next page (empty on the last).
    pub async fn list(
        &self,
        filter: &AgentFilter,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<AgentRecord>, String), AgentError> {
        let cursor = if page_token.is_empty() {
            None
        } else {
            Some(paging::decode_token(page_token, filter).map_err(AgentError::Invalid)?)
        };
        let page_size = paging::effective_page_size(page_size);
        // One more than asked for says whether another page follows.
        let limit = i64::try_from(page_size + 1).unwrap_or(i64::MAX);
        let mut agents = self
            .store
            .list_agents(filter, cursor.as_ref(), limit)
            .await?;
        let next_page_token = if agents.len() > page_size {
            agents.truncate(page_size);
            agents.last().map_or_else(String::new, |last| {
                paging::encode_token(
                    &crate::store::AgentCursor {
                        created_at_ms: last.created_at_ms,
                        id: last.id.clone(),
                    },
                    filter,
                )
            })
        } else {
            String::new()
        };
        for agent in &mut agents {
            if let Some(tracked) = self.registry.get(&agent.id) {
                let fresh = tracked.snapshot();
                // A record that changed state since the query would no longer
                // match a state filter; keep the stored one then.
                if fresh.state == agent.state {
                    *agent = fresh;
                }
            }
        }
        Ok((agents, next_page_token))
    }

    /// Stops an agent: SIGTERM to its process group, SIGKILL after the grace
    /// period. Returns the agent as it is when the stop has begun; an agent
    /// that has already ended is returned unchanged. An agent another replica
    /// supervises is stopped there.
    pub async fn kill(&self, id: &str, reason: &str) -> Result<AgentRecord, AgentError> {
        self.kill_routed(id, reason, true).await
    }

    /// [`AgentRuntime::kill`] of an agent this replica supervises, for
    /// another replica that routed the kill here; never routes it on.
    pub async fn kill_here(&self, id: &str, reason: &str) -> Result<AgentRecord, AgentError> {
        self.kill_routed(id, reason, false).await
    }

    async fn kill_routed(
        &self,
        id: &str,
        reason: &str,
        route: bool,
    ) -> Result<AgentRecord, AgentError> {
        if reason.len() > MAX_KILL_REASON_BYTES {
            return Err(AgentError::Invalid(format!(
                "the kill reason is longer than {MAX_KILL_REASON_BYTES} bytes"
            )));
        }
        if !crate::text::is_printable_line(reason) {
            return Err(AgentError::Invalid(
                "the kill reason must be printable text (no control or invisible formatting characters)"
                    .to_owned(),
            ));
        }
        if let Some(tracked) = self.registry.get(id) {
            let reason = if reason.trim().is_empty() {
                "killed on request".to_owned()
            } else {
                reason.to_owned()
            };
            tracing::info!(agent.id = %id, %reason, "agent kill requested");
            tracked.request_stop(StopRequest::Kill(reason));
            return Ok(tracked.snapshot());
        }
        if route && let Some(answer) = self.kill_where_tagged(id, reason).await {
            return answer;
        }
        let record = self
            .store
            .get_agent(id)
            .await?
            .ok_or_else(|| AgentError::NotFound(id.to_owned()))?;
        if record.state.is_terminal() {
            return Ok(record);
        }
        self.elsewhere(&record, route)?.kill(&record, reason).await
    }

    /// The kill of an agent this replica does not track, sent straight to
    /// the replica its id's runner tag names, when that is another one this
    /// replica has reached before: without reading the agent's record here.
    /// Its answer (the agent, or NOT_FOUND) is final; `None` when there is
    /// no such replica or it could not answer for the agent, and the kill
    /// goes the long way.
    async fn kill_where_tagged(
        &self,
        id: &str,
        reason: &str,
    ) -> Option<Result<AgentRecord, AgentError>> {
        use crate::replicas::runner::{agent_runner_tag, runner_tag};
        let tag = agent_runner_tag(id)?;
        if runner_tag(&self.runner_id) == Some(tag) {
            return None;
        }
        match self.elsewhere.get()?.kill_tagged(id, tag, reason)?.await {
            Ok(agent) => Some(Ok(agent)),
            Err(AgentError::Forwarded(status)) if status.code() == tonic::Code::NotFound => {
                Some(Err(AgentError::Forwarded(status)))
            }
            Err(error) => {
                tracing::debug!(agent.id = %id, %error, "the replica the agent id names did not kill it; looking the agent up");
                None
            }
        }
    }

    /// Where an unfinished agent this replica does not track is reached:
    /// the replica that supervises it, when `route` allows it.
    pub(super) fn elsewhere(
        &self,
        record: &AgentRecord,
        route: bool,
    ) -> Result<&dyn Elsewhere, AgentError> {
        if !route || record.runner_id == self.runner_id {
            // Ours but not tracked: it is being settled (or was asked
            // here by a replica that looked the owner up before a restart).
            return Err(AgentError::NotSupervisedHere {
                agent_id: record.id.clone(),
                runner_id: self.runner_id.clone(),
            });
        }
        self.elsewhere
            .get()
            .map(AsRef::as_ref)
            .ok_or_else(|| AgentError::SupervisedElsewhere {
                agent_id: record.id.clone(),
                runner_id: record.runner_id.clone(),
            })
    }

    /// Refuses new agents from now on and asks every running one to stop
    /// (they end FAILED, "the daemon shut down"). Does not wait: watchers see
    /// their agents end while the server drains its calls.
    pub fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.spares.discard();
        let tracked = self.registry.all();
        if !tracked.is_empty() {
            tracing::info!(count = tracked.len(), "stopping running agents");
        }
        for agent in &tracked {
            agent.request_stop(StopRequest::Shutdown);
        }
    }

    /// [`AgentRuntime::begin_shutdown`], then waits, up to the kill grace
    /// period and a little more, for the supervisors to record the ends.
    pub async fn shutdown(&self) {
        self.begin_shutdown();
        if self.registry.is_empty() {
            return;
        }
        let deadline =
            tokio::time::Instant::now() + self.settings.kill_grace + Duration::from_secs(5);
        while !self.registry.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.registry.is_empty() {
            tracing::warn!("some agents were not recorded as stopped before shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::process;
    use crate::store::testing::test_on_both_backends;

    async fn a_start_the_database_does_not_record_leaves_no_process(store: Store) {
        let data_dir = tempfile::tempdir().expect("data dir");
        let mut settings = AgentsConfig::default();
        settings
            .types
            .insert("sleep".to_owned(), AgentType::new(&["sleep", "300"]));
        let runtime = AgentRuntime::new(store.clone(), settings, data_dir.path()).expect("runtime");
        // Every agent record now fails to commit, after its first rows.
        store
            .execute_for_test("DROP TABLE agent_events")
            .await
            .expect("drop the events table");
        let outcome = runtime
            .spawn(SpawnSpec {
                agent_type: "sleep".to_owned(),
                prompt: String::new(),
                task_id: String::new(),
                labels: Default::default(),
                timeout: None,
                origin: Origin::Local,
            })
            .await;
        assert!(matches!(outcome, Err(AgentError::Store(_))), "{outcome:?}");
        // The process was started, then stopped before Spawn answered.
        assert!(process::processes_of_runner(runtime.runner_id()).is_empty());
        assert_eq!(runtime.status().running, 0);
        assert!(runtime.registry.is_empty());
        let recorded = store
            .list_agents(&AgentFilter::default(), None, 10)
            .await
            .expect("list");
        assert!(recorded.is_empty(), "{recorded:?}");
    }

    fn spec(agent_type: &str) -> SpawnSpec {
        SpawnSpec {
            agent_type: agent_type.to_owned(),
            prompt: String::new(),
            task_id: String::new(),
            labels: Default::default(),
            timeout: None,
            origin: Origin::Local,
        }
    }

    /// The ids of the spares in `agents_dir` (those with a marker).
    fn marked(agents_dir: &Path) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(agents_dir)
            .expect("agents dir")
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                Some(name.strip_suffix(".spare")?.to_owned())
            })
            .collect();
        ids.sort();
        ids
    }

    /// `marked(agents_dir)` once `done` holds of it (within ten seconds).
    async fn marked_when(agents_dir: &Path, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        for _ in 0..1000 {
            let ids = marked(agents_dir);
            if done(&ids) {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("spares never settled: {:?}", marked(agents_dir));
    }

    /// The agent once it has ended.
    async fn ended(runtime: &AgentRuntime, id: &str) -> AgentRecord {
        for _ in 0..1000 {
            let agent = runtime.get(id).await.expect("get");
            if agent.state.is_terminal() {
                return agent;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("agent {id} never ended");
    }

    async fn a_spawn_takes_a_directory_made_ahead(store: Store) {
        let data_dir = tempfile::tempdir().expect("data dir");
        let agents_dir = data_dir.path().join("agents");
        let mut settings = AgentsConfig::default();
        settings
            .types
            .insert("pwd".to_owned(), AgentType::new(&["/bin/sh", "-c", "pwd"]));
        let runtime = AgentRuntime::new(store, settings, data_dir.path()).expect("runtime");
        runtime.reconcile().await.expect("reconcile");
        let spares = marked_when(&agents_dir, |ids| ids.len() == 2).await;

        let agent = runtime.spawn(spec("pwd")).await.expect("spawn");
        assert!(spares.contains(&agent.id), "{} not in {spares:?}", agent.id);
        let agent = ended(&runtime, &agent.id).await;
        assert_eq!(agent.state, AgentState::Completed, "{agent:?}");
        let work_dir = agents_dir.join(&agent.id).join("work");
        assert_eq!(agent.output_tail, [work_dir.to_string_lossy()]);
        // Recorded, it is a spare no more; two new ones are made.
        let now = marked_when(&agents_dir, |ids| {
            ids.len() == 2 && !ids.contains(&agent.id)
        })
        .await;

        // At shutdown the spares go; the agent's directory stays.
        runtime.begin_shutdown();
        assert_eq!(marked(&agents_dir), Vec::<String>::new());
        for id in &now {
            assert!(!agents_dir.join(id).exists(), "{id}");
        }
        assert!(agents_dir.join(&agent.id).join("output.log").is_file());
    }

    async fn spares_a_crash_left_behind_are_removed_at_the_next_start(store: Store) {
        let data_dir = tempfile::tempdir().expect("data dir");
        let agents_dir = data_dir.path().join("agents");
        let mut settings = AgentsConfig::default();
        settings
            .types
            .insert("true".to_owned(), AgentType::new(&["true"]));
        let first =
            AgentRuntime::new(store.clone(), settings.clone(), data_dir.path()).expect("runtime");
        first.reconcile().await.expect("reconcile");
        marked_when(&agents_dir, |ids| ids.len() == 2).await;
        let agent = first.spawn(spec("true")).await.expect("spawn");
        ended(&first, &agent.id).await;
        let unused = marked_when(&agents_dir, |ids| {
            ids.len() == 2 && !ids.contains(&agent.id)
        })
        .await;
        // The daemon dies (no shutdown) just after the agent was recorded,
        // before its spare's marker was removed.
        std::fs::File::create(agents_dir.join(format!("{}.spare", agent.id))).expect("marker");
        drop(first);

        let second = AgentRuntime::new(store, settings, data_dir.path()).expect("runtime");
        second.reconcile().await.expect("reconcile");
        for id in &unused {
            assert!(!agents_dir.join(id).exists(), "{id} was left");
        }
        assert!(agents_dir.join(&agent.id).join("output.log").is_file());
        let fresh = marked_when(&agents_dir, |ids| ids.len() == 2).await;
        assert!(
            fresh
                .iter()
                .all(|id| !unused.contains(id) && *id != agent.id),
            "{fresh:?}"
        );
    }

    test_on_both_backends!(
        a_start_the_database_does_not_record_leaves_no_process,
        a_spawn_takes_a_directory_made_ahead,
        spares_a_crash_left_behind_are_removed_at_the_next_start,
    );
}
