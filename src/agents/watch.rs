//! The event streams of `AgentRuntime::watch`: live from the registry for an
//! agent this daemon supervises, re-read from the store for one that has
//! ended or that this daemon no longer tracks while its end is recorded. (An
//! agent another replica supervises is watched through that replica:
//! `replicas::routing`.)

use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use super::error::AgentError;
use super::model::{AgentEvent, AgentRecord};
use crate::store::Store;

/// How often a watch of an agent this daemon does not track re-reads it.
const REMOTE_WATCH_POLL: Duration = Duration::from_millis(500);

/// The watch of an agent this daemon supervises.
pub(super) fn tracked_watch(
    current: AgentRecord,
    receiver: broadcast::Receiver<AgentEvent>,
    include_output: bool,
) -> BoxStream<'static, Result<AgentEvent, AgentError>> {
    let first = AgentEvent::StateChanged {
        from: None,
        agent: Box::new(current.clone()),
    };
    if current.state.is_terminal() {
        return futures::stream::iter([Ok(first)]).boxed();
    }
    let rest = futures::stream::unfold(Some(receiver), move |receiver| async move {
        let mut receiver = receiver?;
        loop {
            match receiver.recv().await {
                Ok(AgentEvent::Output { .. }) if !include_output => continue,
                Ok(event) => {
                    let next = (!event.is_final()).then_some(receiver);
                    return Some((Ok(event), next));
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    // Only a watcher far behind gets here; it loses the oldest
                    // events, never the final one (which is sent last).
                    tracing::debug!(skipped, "a slow agent watcher skipped events");
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Some((Err(AgentError::Interrupted), None));
                }
            }
        }
    });
    futures::stream::iter([Ok(first)]).chain(rest).boxed()
}

/// The watch of an agent this daemon does not supervise: its stored record,
/// re-read until it ends (another replica's agent; no output lines).
pub(super) fn polled_watch(
    store: Store,
    current: AgentRecord,
) -> BoxStream<'static, Result<AgentEvent, AgentError>> {
    let first = AgentEvent::StateChanged {
        from: None,
        agent: Box::new(current.clone()),
    };
    if current.state.is_terminal() {
        return futures::stream::iter([Ok(first)]).boxed();
    }
    let rest = futures::stream::unfold(Some(current), move |last| {
        let store = store.clone();
        async move {
            let last = last?;
            loop {
                tokio::time::sleep(REMOTE_WATCH_POLL).await;
                let fresh = match store.get_agent(&last.id).await {
                    Ok(Some(fresh)) => fresh,
                    Ok(None) => return Some((Err(AgentError::NotFound(last.id.clone())), None)),
                    Err(error) => return Some((Err(error.into()), None)),
                };
                if fresh.state != last.state {
                    let event = AgentEvent::StateChanged {
                        from: Some(last.state),
                        agent: Box::new(fresh.clone()),
                    };
                    let next = (!fresh.state.is_terminal()).then_some(fresh);
                    return Some((Ok(event), next));
                }
            }
        }
    });
    futures::stream::iter([Ok(first)]).chain(rest).boxed()
}
