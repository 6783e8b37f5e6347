//! Where the log goes: stderr, written by a thread of its own, so no call
//! ever waits for stderr. A line is appended to a bounded buffer in memory;
//! the thread writes what has gathered with one system call, then lets the
//! next lines gather for a moment. When the buffer is full (stderr slower
//! than the log, e.g. a stalled pipe), new lines are dropped, not waited
//! for, and counted: `mosaic_log_lines_dropped_total` on `/metrics`.
//!
//! Why not `tracing-appender`'s non-blocking writer, which this replaced: it
//! queues each line on a channel whose receiving thread wakes for every line
//! it finds the queue empty, which under load is nearly every line. That
//! wake (a futex call on the calling thread, a context switch and a write on
//! the log's) was most of the per-call cost of the access log: 14.6 µs of
//! process CPU per line against 4.8 µs here, formatting included
//! (BENCHMARKS.md, session 16). Here the thread sleeps between turns, so a
//! busy daemon pays a wake and a write per turn, not per line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes of lines the buffer holds before it drops new ones (about 60 000
/// access log lines).
pub const BUFFER_BYTES: usize = 16 * 1024 * 1024;

/// How long the thread lets lines gather after a write. The first line
/// after a quiet spell is written at once; under load a line waits at most
/// this long, and the thread wakes at most this often.
const GATHER: Duration = Duration::from_millis(10);

/// The capacity a write buffer keeps between turns; one a burst grew beyond
/// it gives the rest back.
const KEPT_CAPACITY: usize = 256 * 1024;

/// The writer made by [`stderr`], once made, for its count of dropped lines.
static STDERR: OnceLock<LogWriter> = OnceLock::new();

/// What the calling threads and the log's thread share.
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when a line arrives while the thread waits for one, and
    /// when the guard closes the log.
    wake: Condvar,
    dropped: AtomicU64,
    limit_bytes: usize,
}

/// Lines not yet taken by the log's thread.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// The thread waits on `wake` for a line: the next one must wake it.
    waiting: bool,
    /// The guard was dropped: write what is left, then stop.
    closing: bool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A thread that panicked while holding the lock left whole lines
        // behind (appends are single calls), so the buffer is still good.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle `tracing-subscriber` writes its lines through, and the access
/// line its own (`super::access_line::write_straight`); cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Appends one formatted line, or drops and counts it when the buffer
    /// is full or the log closed. Never waits for the log's thread.
    pub(crate) fn push(&self, line: &[u8]) {
        let mut pending = self.shared.pending();
        if pending.closing || pending.bytes.len() + line.len() > self.shared.limit_bytes {
            drop(pending);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.bytes.extend_from_slice(line);
        if std::mem::take(&mut pending.waiting) {
            self.shared.wake.notify_one();
        }
    }

    /// Lines dropped so far: the buffer was full, or no thread was left to
    /// write them (it could not start, or the log closed).
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { log: self }
    }
}

/// One event's writer. `tracing-subscriber` formats the whole line first
/// and hands it over in one `write_all`, so a line is kept or dropped whole.
pub struct LineWriter<'a> {
    log: &'a LogWriter,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.log.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keep it until the process ends: dropping it writes what is buffered and
/// stops the log's thread.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.pending().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread only writes; if it panicked, its lines are lost
            // either way and the process is ending.
            let _ = thread.join();
        }
    }
}

/// The log's writer to stderr and the guard that flushes it.
pub fn stderr() -> (LogWriter, LogGuard) {
    let (writer, guard) = spawn(std::io::stderr(), BUFFER_BYTES, "mosaicd-log");
    let _ = STDERR.set(writer.clone());
    (writer, guard)
}

/// Log lines dropped so far by [`stderr`]'s writer (0 when the log
/// does not go through [`stderr`], as in tests that run the daemon in
/// process).
pub fn dropped_lines() -> u64 {
    STDERR.get().map_or(0, LogWriter::dropped_lines)
}

/// A writer into `sink` holding at most `limit_bytes` of unwritten lines,
/// written by a thread named `thread_name`.
fn spawn<W: Write + Send + 'static>(
    sink: W,
    limit_bytes: usize,
    thread_name: &str,
) -> (LogWriter, LogGuard) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        dropped: AtomicU64::new(0),
        limit_bytes,
    });
    let for_thread = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || write_until_closed(&for_thread, sink))
        .ok();
    if thread.is_none() {
        // No thread, no log: calls must still never wait, so every line is
        // dropped and counted rather than buffered for nobody.
        shared.pending().closing = true;
    }
    let writer = LogWriter {
        shared: Arc::clone(&shared),
    };
    (writer, LogGuard { shared, thread })
}

/// The log's thread: take what has gathered, write it in one call, let the
/// next lines gather; wait for a line when there is none.
fn write_until_closed<W: Write>(shared: &Shared, mut sink: W) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.pending();
            while pending.bytes.is_empty() && !pending.closing {
                pending.waiting = true;
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if pending.bytes.is_empty() {
                return;
            }
            std::mem::swap(&mut pending.bytes, &mut batch);
            pending.closing
        };
        // stderr failing (closed, full disk) cannot be reported anywhere
        // but stderr: the lines are lost and the daemon goes on.
        let _ = sink.write_all(&batch).and_then(|()| sink.flush());
        batch.clear();
        batch.shrink_to(KEPT_CAPACITY);
        if !closing {
            std::thread::sleep(GATHER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// A sink that keeps what it is given, and can be made to block.
    #[derive(Clone, Default)]
    struct Kept {
        bytes: Arc<Mutex<Vec<u8>>>,
        /// While set, the next write first waits for a message on it.
        gate: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
    }

    impl Write for Kept {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let gate = self.gate.lock().unwrap().take();
            if let Some(gate) = gate {
                let _ = gate.recv();
            }
            self.bytes.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Kept {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    fn line(writer: &LogWriter, text: &str) {
        use tracing_subscriber::fmt::MakeWriter;
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_line_after_a_quiet_spell_is_written_at_once() {
        let sink = Kept::default();
        let (writer, _guard) = spawn(sink.clone(), 1024, "test-log");
        std::thread::sleep(Duration::from_millis(50));
        line(&writer, "one\n");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.text().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.text(), "one\n");
    }

    #[test]
    fn dropping_the_guard_writes_every_buffered_line_in_order() {
        let sink = Kept::default();
        let (writer, guard) = spawn(sink.clone(), 1 << 20, "test-log");
        let expected: String = (0..1000).map(|n| format!("line {n}\n")).collect();
        for n in 0..1000 {
            line(&writer, &format!("line {n}\n"));
        }
        drop(guard);
        assert_eq!(sink.text(), expected);
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_whole_lines_and_never_blocks_a_caller() {
        let (release, gate) = mpsc::channel();
        let sink = Kept::default();
        *sink.gate.lock().unwrap() = Some(gate);
        // 10 lines of 10 bytes fit.
        let (writer, guard) = spawn(sink.clone(), 100, "test-log");
        // The thread takes the first line and blocks writing it.
        line(&writer, "first    \n");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !writer.shared.pending().bytes.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for n in 0..30 {
            line(&writer, &format!("line {n:>4}\n"));
        }
        assert_eq!(writer.dropped_lines(), 20);
        // Unblocked, the log writes what it kept and nothing of the rest.
        release.send(()).unwrap();
        drop(guard);
        let expected: String = std::iter::once("first    \n".to_owned())
            .chain((0..10).map(|n| format!("line {n:>4}\n")))
            .collect();
        assert_eq!(sink.text(), expected);
    }
}
