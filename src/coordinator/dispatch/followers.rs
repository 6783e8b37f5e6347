//! The follow-up tasks of remote dispatches this process runs (sending an
//! unanswered spawn again, polling a remote agent), one per job and kind, and
//! whether this process holds the lease that lets it run them
//! (`following.rs` takes and renews it; `remote.rs` starts the tasks).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// What a follow-up task does for its job.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Work {
    /// Sends the job's unanswered signed spawn again.
    Spawn,
    /// Polls the job's remote agent until it ends.
    Follow,
}

/// The follow-up tasks this process runs, one per (work, job), and whether
/// it holds the lease. Shared by the dispatch handlers and the scan.
#[derive(Clone, Debug, Default)]
pub struct Followers {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    held: bool,
    /// The tasks, and whether each runs only while the lease is held.
    tasks: HashMap<(Work, String), (tokio::task::JoinHandle<()>, bool)>,
}

impl Followers {
    /// Runs `task` as `work` for `job_id` unless such a task runs already.
    /// With `only_if_held`, only while this process holds the lease (the
    /// holder's scan picks the job up otherwise). True if it was started.
    pub fn start(
        &self,
        work: Work,
        job_id: &str,
        only_if_held: bool,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> bool {
        let mut inner = self.lock();
        if only_if_held && !inner.held {
            return false;
        }
        let key = (work, job_id.to_owned());
        if inner
            .tasks
            .get(&key)
            .is_some_and(|(running, _)| !running.is_finished())
        {
            return false;
        }
        inner.tasks.insert(key, (tokio::spawn(task), only_if_held));
        true
    }

    /// Records whether this process holds the lease; without it, every task
    /// that needs it stops (a dispatch's own retry goes on). True when it was
    /// just taken (not held before).
    pub(super) fn set_held(&self, held: bool) -> bool {
        let mut inner = self.lock();
        let taken = held && !inner.held;
        inner.held = held;
        inner.tasks.retain(|_, (task, needs_lease)| {
            if *needs_lease && !held {
                task.abort();
            }
            !task.is_finished() && (held || !*needs_lease)
        });
        taken
    }

    /// Stops every task, those that do not need the lease too.
    pub(super) fn stop_all(&self) {
        let mut inner = self.lock();
        inner.held = false;
        for (_, (task, _)) in inner.tasks.drain() {
            task.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many tasks of `work` run now.
    pub fn running(&self, work: Work) -> usize {
        let inner = self.lock();
        inner
            .tasks
            .iter()
            .filter(|((kind, _), (task, _))| *kind == work && !task.is_finished())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_task_per_job_and_none_without_the_lease() {
        let followers = Followers::default();
        let forever = || std::future::pending::<()>();
        assert!(
            !followers.start(Work::Follow, "j1", true, forever()),
            "started without the lease"
        );
        assert!(followers.set_held(true), "the lease was just taken");
        assert!(!followers.set_held(true), "renewed, not taken");
        assert!(followers.start(Work::Follow, "j1", true, forever()));
        assert!(!followers.start(Work::Follow, "j1", true, forever()));
        assert!(followers.start(Work::Spawn, "j1", true, forever()));
        // A dispatch's own retry runs whether the lease is held or not.
        assert!(followers.start(Work::Spawn, "j2", false, forever()));
        assert_eq!(followers.running(Work::Follow), 1);
        // Losing the lease stops the tasks that need it, not the retry.
        followers.set_held(false);
        followers.set_held(false);
        assert_eq!(followers.running(Work::Follow), 0);
        assert_eq!(followers.running(Work::Spawn), 1);
        followers.stop_all();
        assert_eq!(followers.running(Work::Spawn), 0);
        // A finished task makes room for a new one.
        followers.set_held(true);
        assert!(followers.start(Work::Follow, "j2", false, async {}));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(followers.start(Work::Follow, "j2", false, async {}));
    }
}
