//! Output bookkeeping: splitting a byte stream into bounded lines, the tail of
//! recent lines kept with the agent record, and the accounting of the capped
//! output file. Pure: the supervisor does the reading and writing.

use std::collections::VecDeque;

/// A line longer than this is cut into pieces of this size, so a process that
/// never writes a newline cannot make the daemon buffer without bound.
pub const MAX_LINE_BYTES: usize = 4096;

/// Splits chunks of bytes into lines (without their `\n`, and without a `\r`
/// before it), each at most [`MAX_LINE_BYTES`].
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `chunk`; returns the lines it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in chunk {
            if byte == b'\n' {
                lines.push(self.take());
            } else {
                self.pending.push(byte);
                if self.pending.len() >= MAX_LINE_BYTES {
                    lines.push(self.take());
                }
            }
        }
        lines
    }

    /// The unterminated last line, if any, at end of stream.
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        let line = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        line
    }
}

/// The last `capacity` lines.
#[derive(Debug, Clone)]
pub struct Tail {
    lines: VecDeque<String>,
    capacity: usize,
}

impl Tail {
    /// An empty tail keeping at most `capacity` lines (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            lines: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds a line, dropping the oldest beyond the capacity.
    pub fn push(&mut self, line: String) {
        if self.lines.len() == self.capacity {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The lines, oldest first.
    pub fn to_vec(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}

/// How much of a chunk fits in the output file, and the running totals.
#[derive(Debug, Clone, Copy)]
pub struct OutputBudget {
    cap_bytes: u64,
    /// Bytes written by the process so far, kept or not.
    pub total_bytes: u64,
    /// Bytes written to the file so far.
    pub kept_bytes: u64,
}

impl OutputBudget {
    /// A budget of `cap_bytes` for the file.
    pub fn new(cap_bytes: u64) -> Self {
        Self {
            cap_bytes,
            total_bytes: 0,
            kept_bytes: 0,
        }
    }

    /// Accounts for a chunk of `length` bytes; returns how many of its first
    /// bytes to write to the file.
    pub fn admit(&mut self, length: usize) -> usize {
        let length_u64 = u64::try_from(length).unwrap_or(u64::MAX);
        self.total_bytes = self.total_bytes.saturating_add(length_u64);
        let room = self.cap_bytes.saturating_sub(self.kept_bytes);
        let kept = room.min(length_u64);
        self.kept_bytes += kept;
        usize::try_from(kept).unwrap_or(length)
    }

    /// True once output went past the cap.
    pub fn truncated(&self) -> bool {
        self.total_bytes > self.kept_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_chunks_and_bounded() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"one\ntw"), ["one"]);
        assert_eq!(splitter.push(b"o\r\n\nthree"), ["two", ""]);
        assert_eq!(splitter.finish().as_deref(), Some("three"));
        assert_eq!(splitter.finish(), None);

        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let lines = splitter.push(&long);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|line| line.len() == MAX_LINE_BYTES));
        assert_eq!(splitter.finish().map(|line| line.len()), Some(10));

        assert_eq!(splitter.push(b"\xff ok\n"), ["\u{fffd} ok"]);
    }

    #[test]
    fn the_tail_keeps_the_newest_lines() {
        let mut tail = Tail::new(2);
        for line in ["a", "b", "c"] {
            tail.push(line.to_owned());
        }
        assert_eq!(tail.to_vec(), ["b", "c"]);
    }

    #[test]
    fn the_budget_keeps_up_to_the_cap_and_counts_everything() {
        let mut budget = OutputBudget::new(10);
        assert_eq!(budget.admit(6), 6);
        assert!(!budget.truncated());
        assert_eq!(budget.admit(6), 4);
        assert_eq!(budget.admit(6), 0);
        assert_eq!(budget.total_bytes, 18);
        assert_eq!(budget.kept_bytes, 10);
        assert!(budget.truncated());
    }
}
