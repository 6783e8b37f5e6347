//! Agent directories made ahead of the spawns that take them.
//!
//! An agent needs its directory, its working directory, its output file and
//! its event journal before its process can start: file-system metadata
//! operations. On ext4 each of them may wait for the journal while an
//! `fsync` of the database (on the same disk) commits it, and in
//! `bench_agents` they were
//! the largest step of a spawn (about 0.4 ms of 1.1 ms). So the runtime keeps
//! a few made ahead, and a spawn takes one: the agent's id is the spare's.
//! The next ones are made on a blocking thread once the spawn is recorded.
//! With none ready (a burst of spawns), a spawn makes its own as before.
//!
//! A spare is `<agents>/<id>/` with `work/`, an empty `output.log` and an
//! empty `events.log`, plus a marker `<agents>/<id>.spare`, made before the
//! directory and removed only once the agent that took it is recorded. So
//! after a crash, the markers name every directory that may belong to no
//! agent: [`Spares::sweep`], at startup, removes those whose id has no
//! record. At shutdown the spares no spawn took are removed.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::store::{Store, StoreError};

/// Spares kept ready.
const READY: usize = 2;
/// The suffix of a spare's marker file, beside its directory.
const MARKER_SUFFIX: &str = ".spare";

/// A new agent's directory, ready for its process.
#[derive(Debug)]
pub(super) struct AgentDir {
    /// The agent's id, which names the directory.
    pub id: String,
    /// `<agents>/<id>/work`, the process's working directory.
    pub work_dir: PathBuf,
    /// `<agents>/<id>/output.log`, open for appending.
    pub output: File,
    /// `<agents>/<id>/events.log`, the event journal, open for appending.
    pub events: File,
    /// Made ahead: its marker goes once the agent is recorded.
    spare: bool,
}

/// The spares of one runtime.
pub(super) struct Spares {
    agents_dir: PathBuf,
    /// The runner whose tag new agent ids carry.
    runner_id: String,
    ready: Mutex<Vec<AgentDir>>,
    /// A refill is under way (at most one at a time).
    refilling: AtomicBool,
    /// Set at shutdown: no more spares.
    closed: AtomicBool,
}

impl Spares {
    /// No spares yet for `agents_dir` of `runner_id`; [`Spares::refill`]
    /// makes them.
    pub(super) fn new(agents_dir: PathBuf, runner_id: String) -> Arc<Self> {
        Arc::new(Spares {
            agents_dir,
            runner_id,
            ready: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// A new agent id: a UUIDv7 carrying this runner's tag
    /// ([`crate::replicas::runner::agent_id_for`]).
    pub(super) fn new_agent_id(&self) -> String {
        crate::replicas::runner::agent_id_for(&self.runner_id)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<AgentDir>> {
        // The list is valid whatever panicked while it was held.
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A directory for a new agent: a spare if one is ready, otherwise one
    /// made now.
    pub(super) fn take(&self) -> io::Result<AgentDir> {
        let spare = self.lock().pop();
        match spare {
            Some(dir) => Ok(dir),
            None => make(&self.agents_dir, self.new_agent_id(), false),
        }
    }

    /// Tells that the agent in directory `id` (a spare if `spare`) is
    /// recorded: a spare's marker is removed and the spares are refilled, in
    /// the background. Only now, so that the file-system work of the next
    /// spares never competes with the spawn that took one (a crash before
    /// the marker goes is harmless: the sweep finds the record).
    pub(super) fn recorded(self: &Arc<Self>, id: &str, spare: bool) {
        if spare {
            let marker = marker_path(&self.agents_dir, id);
            tokio::task::spawn_blocking(move || {
                if let Err(error) = std::fs::remove_file(&marker)
                    && error.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(%error, marker = %marker.display(), "cannot remove a spare's marker");
                }
            });
        }
        self.refill();
    }

    /// Makes spares on a blocking thread until `READY` are ready, unless
    /// that is under way already or the runtime is closing.
    pub(super) fn refill(self: &Arc<Self>) {
        if self.closed.load(Ordering::SeqCst) || self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let spares = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            while !spares.closed.load(Ordering::SeqCst) && spares.lock().len() < READY {
                match make(&spares.agents_dir, spares.new_agent_id(), true) {
                    Ok(dir) => {
                        let mut ready = spares.lock();
                        if spares.closed.load(Ordering::SeqCst) {
                            drop(ready);
                            remove_spare(&spares.agents_dir, &dir.id);
                        } else {
                            ready.push(dir);
                        }
                    }
                    Err(error) => {
                        // Spawns make their own meanwhile; the next
                        // recorded spawn tries again.
                        tracing::warn!(%error, "cannot make a spare agent directory");
                        break;
                    }
                }
            }
            spares.refilling.store(false, Ordering::SeqCst);
        });
    }

    /// Removes the spares no spawn took, and makes no more.
    pub(super) fn discard(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let unused: Vec<AgentDir> = self.lock().drain(..).collect();
        for dir in unused {
            remove_spare(&self.agents_dir, &dir.id);
        }
    }

    /// At startup, before any spawn: removes every spare left by an earlier
    /// run whose id has no agent record (never taken, or taken by a spawn
    /// that was never recorded), and the markers of those that were
    /// recorded. Returns how many directories it removed.
    pub(super) async fn sweep(agents_dir: &Path, store: &Store) -> Result<usize, StoreError> {
        let ids: Vec<String> = match std::fs::read_dir(agents_dir) {
            Ok(entries) => entries
                .filter_map(|entry| {
                    let name = entry.ok()?.file_name();
                    Some(name.to_str()?.strip_suffix(MARKER_SUFFIX)?.to_owned())
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot list the agents directory for spares to remove");
                Vec::new()
            }
        };
        let mut removed = 0;
        for id in ids {
            if store.get_agent(&id).await?.is_none() {
                remove_spare(agents_dir, &id);
                removed += 1;
            } else if let Err(error) = std::fs::remove_file(marker_path(agents_dir, &id)) {
                tracing::warn!(%error, agent.id = %id, "cannot remove a spare's marker");
            }
        }
        Ok(removed)
    }
}

impl AgentDir {
    /// Whether this directory was made ahead (and has a marker).
    pub(super) fn is_spare(&self) -> bool {
        self.spare
    }
}

/// Makes the directory of agent `id` (after its marker, for a spare).
fn make(agents_dir: &Path, id: String, spare: bool) -> io::Result<AgentDir> {
    if spare {
        File::create(marker_path(agents_dir, &id))?;
    }
    let agent_dir = agents_dir.join(&id);
    let work_dir = agent_dir.join("work");
    std::fs::create_dir_all(&work_dir)?;
    let append = |name: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(agent_dir.join(name))
    };
    let output = append(super::OUTPUT_FILE)?;
    let events = append(super::journal::JOURNAL_FILE)?;
    Ok(AgentDir {
        id,
        work_dir,
        output,
        events,
        spare,
    })
}

/// True when `<agents>/<id>` is a spare (or was one that no spawn recorded).
pub(super) fn is_spare(agents_dir: &Path, id: &str) -> bool {
    marker_path(agents_dir, id).exists()
}

fn marker_path(agents_dir: &Path, id: &str) -> PathBuf {
    agents_dir.join(format!("{id}{MARKER_SUFFIX}"))
}

/// Removes a spare's directory, then its marker.
fn remove_spare(agents_dir: &Path, id: &str) {
    let removed = match std::fs::remove_dir_all(agents_dir.join(id)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => std::fs::remove_file(marker_path(agents_dir, id)),
    };
    if let Err(error) = removed
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(%error, agent.id = %id, "cannot remove a spare agent directory");
    }
}
