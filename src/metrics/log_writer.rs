//! Where the log goes: stderr through a bounded queue that a thread of its
//! own writes (`tracing-appender`'s non-blocking writer), so no call ever
//! waits for stderr. When the queue is full (stderr slower than the log,
//! e.g. a stalled pipe), new lines are dropped, not waited for, and counted:
//! `mosaic_log_lines_dropped_total` on `/metrics`.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before it drops new ones.
pub const QUEUE_LINES: usize = 65_536;

/// The counter of the writer made by [`stderr`], once made.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Bytes of lines the writer thread gathers before it must write them.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A non-blocking writer to stderr, and the guard that flushes what is
/// queued when it is dropped (keep it until the process ends).
///
/// The thread writes the lines queued since its last turn with one system
/// call: it takes every line waiting in the queue, then flushes. So the
/// buffer in front of stderr (unbuffered on its own: a system call per
/// line) never keeps a line once the queue is empty.
pub fn stderr() -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("mosaicd-log")
        .finish(std::io::BufWriter::with_capacity(
            WRITE_BUFFER_BYTES,
            std::io::stderr(),
        ));
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Log lines dropped so far because the queue was full (0 when the log
/// does not go through [`stderr`], as in tests that run the daemon in
/// process).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}
