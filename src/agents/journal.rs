//! The journal of an agent's events: every state change and output line,
//! numbered from 1 in the order they happened, appended to
//! `<agents>/<id>/events.log` before any watcher hears of them. A watcher
//! that starts from an earlier sequence, or falls behind the live broadcast,
//! reads what it missed here, so it sees every event once and in order.
//!
//! The file is a sequence of length-delimited `mosaic.agent.v1.
//! WatchAgentResponse` messages (the wire's own shape: `sequence` and one
//! event). State changes are always kept; output lines only while the kept
//! output stays within `agents.output_cap_bytes`, as in `output.log`: past
//! the cap a line is still numbered and sent live, and a replay skips its
//! sequence (the agent then says `output_truncated`). One writer at a time
//! (the spawn, then the agent's supervisor), so the file is in sequence order.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use super::convert::{event_from_proto, event_to_proto};
use super::model::{AgentEvent, SequencedEvent};
use crate::proto::agent as pb;

/// The journal's file name in an agent's directory.
pub(super) const JOURNAL_FILE: &str = "events.log";

/// A record longer than this is not one the writer made (a state change
/// carries at most the tail, a line at most 4 KiB): the file is damaged.
const MAX_RECORD_BYTES: u64 = 4 * 1024 * 1024;

/// The path of the journal of agent `id` under `agents_dir`.
pub(super) fn path(agents_dir: &Path, id: &str) -> PathBuf {
    agents_dir.join(id).join(JOURNAL_FILE)
}

/// The writing end of an agent's journal.
pub(super) struct Journal {
    /// `None` when the agent has no directory, or once a write failed (the
    /// events are still numbered and sent live; a replay ends early).
    file: Option<tokio::fs::File>,
    next: u64,
    output_bytes: u64,
    output_cap: u64,
    buffer: Vec<u8>,
}

impl Journal {
    /// A journal appending to `file` (none: numbering only), keeping output
    /// lines up to `output_cap` bytes.
    pub(super) fn new(file: Option<std::fs::File>, output_cap: u64) -> Self {
        Self {
            file: file.map(tokio::fs::File::from_std),
            next: 1,
            output_bytes: 0,
            output_cap,
            buffer: Vec::new(),
        }
    }

    /// Numbers `events`, writes those it keeps and waits until the file has
    /// them; returns them numbered, to be published.
    pub(super) async fn append(&mut self, events: Vec<AgentEvent>) -> Vec<SequencedEvent> {
        self.buffer.clear();
        let mut numbered = Vec::with_capacity(events.len());
        for event in events {
            let sequence = self.next;
            self.next += 1;
            if self.keeps(&event) {
                let message = pb::WatchAgentResponse {
                    sequence,
                    event: Some(event_to_proto(event.clone())),
                };
                // Encoding into a Vec cannot fail.
                let _ = message.encode_length_delimited(&mut self.buffer);
            }
            numbered.push(SequencedEvent { sequence, event });
        }
        if !self.buffer.is_empty()
            && let Some(file) = self.file.as_mut()
            && let Err(error) = write_all(file, &self.buffer).await
        {
            tracing::warn!(%error, "cannot write to an agent's event journal; a later watch from an earlier sequence ends early");
            self.file = None;
        }
        numbered
    }

    fn keeps(&mut self, event: &AgentEvent) -> bool {
        match event {
            AgentEvent::StateChanged { .. } => true,
            AgentEvent::Output { line, .. } => {
                let length = u64::try_from(line.len()).unwrap_or(u64::MAX);
                if self.output_bytes.saturating_add(length) > self.output_cap {
                    return false;
                }
                self.output_bytes += length;
                true
            }
        }
    }
}

async fn write_all(file: &mut tokio::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes).await?;
    // tokio's file writes in the background; a watcher reads the file as
    // soon as the event is published, so the write must be done by then.
    file.flush().await
}

/// The reading end: the events of a journal, oldest first.
pub(super) struct JournalReader {
    reader: BufReader<tokio::fs::File>,
    /// Bytes of the file read as whole records: where the next one starts.
    offset: u64,
}

impl JournalReader {
    /// Opens the journal at `path` to read from byte `offset`, where a record
    /// starts (0, or an earlier reader's [`JournalReader::offset`]); `None` if
    /// there is none.
    pub(super) async fn open_at(path: &Path, offset: u64) -> std::io::Result<Option<Self>> {
        use tokio::io::AsyncSeekExt as _;
        match tokio::fs::File::open(path).await {
            Ok(mut file) => {
                if offset > 0 {
                    file.seek(std::io::SeekFrom::Start(offset)).await?;
                }
                Ok(Some(Self {
                    reader: BufReader::new(file),
                    offset,
                }))
            }
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Where the next record starts.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    /// The next event; `None` at the end (a record cut short by a crash
    /// ends the journal too).
    pub(super) async fn next(&mut self) -> std::io::Result<Option<SequencedEvent>> {
        loop {
            let Some(length) = self.length().await? else {
                return Ok(None);
            };
            if length > MAX_RECORD_BYTES {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("an event journal record of {length} bytes"),
                ));
            }
            let mut bytes = vec![0; usize::try_from(length).unwrap_or(usize::MAX)];
            match self.reader.read_exact(&mut bytes).await {
                Ok(_) => {}
                Err(error) if error.kind() == ErrorKind::UnexpectedEof => return Ok(None),
                Err(error) => return Err(error),
            }
            self.offset += varint_length(length) + length;
            let message = pb::WatchAgentResponse::decode(bytes.as_slice())
                .map_err(|error| std::io::Error::new(ErrorKind::InvalidData, error))?;
            // A record this version cannot read (a newer kind of event) is
            // skipped, as a watcher of the wire would.
            if let Some(event) = event_from_proto(message.event) {
                return Ok(Some(SequencedEvent {
                    sequence: message.sequence,
                    event,
                }));
            }
        }
    }

    /// A record's length prefix (a varint); `None` at the end of the file.
    async fn length(&mut self) -> std::io::Result<Option<u64>> {
        let mut value = 0u64;
        for index in 0..10 {
            let byte = match self.reader.read_u8().await {
                Ok(byte) => byte,
                Err(error) if error.kind() == ErrorKind::UnexpectedEof => return Ok(None),
                Err(error) => return Err(error),
            };
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(Some(value));
            }
        }
        Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "an event journal record with a malformed length",
        ))
    }
}

/// Bytes of the varint that encodes `value`.
fn varint_length(value: u64) -> u64 {
    u64::from((64 - (value | 1).leading_zeros()).div_ceil(7))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::model::OutputStream;

    fn line(text: &str) -> AgentEvent {
        AgentEvent::Output {
            stream: OutputStream::Stdout,
            line: text.to_owned(),
            at_ms: 7,
        }
    }

    async fn read_all(path: &Path) -> Vec<SequencedEvent> {
        let mut reader = JournalReader::open_at(path, 0)
            .await
            .unwrap()
            .expect("a journal");
        let mut events = Vec::new();
        while let Some(event) = reader.next().await.unwrap() {
            events.push(event);
        }
        events
    }

    #[tokio::test]
    async fn events_are_numbered_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let file = std::fs::File::create(&path).unwrap();
        let mut journal = Journal::new(Some(file), 1024);
        let first = journal.append(vec![line("one"), line("two")]).await;
        let second = journal.append(vec![line("three")]).await;
        let sequences: Vec<u64> = first.iter().chain(&second).map(|e| e.sequence).collect();
        assert_eq!(sequences, [1, 2, 3]);
        assert_eq!(read_all(&path).await, [first, second].concat());
    }

    #[tokio::test]
    async fn a_reader_resumes_at_the_offset_another_reached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let file = std::fs::File::create(&path).unwrap();
        let mut journal = Journal::new(Some(file), 1 << 20);
        let long = "x".repeat(300);
        journal.append(vec![line("one"), line(&long)]).await;
        let mut first = JournalReader::open_at(&path, 0)
            .await
            .unwrap()
            .expect("a journal");
        assert_eq!(first.next().await.unwrap().map(|e| e.sequence), Some(1));
        journal.append(vec![line("three")]).await;
        let mut second = JournalReader::open_at(&path, first.offset())
            .await
            .unwrap()
            .expect("a journal");
        let mut rest = Vec::new();
        while let Some(event) = second.next().await.unwrap() {
            rest.push(event.sequence);
        }
        assert_eq!(rest, [2, 3]);
        assert_eq!(second.offset(), std::fs::metadata(&path).unwrap().len());
    }

    #[tokio::test]
    async fn output_past_the_cap_is_numbered_but_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let file = std::fs::File::create(&path).unwrap();
        let mut journal = Journal::new(Some(file), 6);
        let numbered = journal
            .append(vec![line("abc"), line("def"), line("g")])
            .await;
        assert_eq!(numbered.len(), 3);
        let kept: Vec<u64> = read_all(&path).await.iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [1, 2]);
    }

    #[tokio::test]
    async fn a_record_cut_short_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let file = std::fs::File::create(&path).unwrap();
        let mut journal = Journal::new(Some(file), 1024);
        journal.append(vec![line("whole")]).await;
        journal.append(vec![line("cut short")]).await;
        let length = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(length - 3).unwrap();
        let kept: Vec<u64> = read_all(&path).await.iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [1]);
        assert!(
            JournalReader::open_at(&dir.path().join("none"), 0)
                .await
                .unwrap()
                .is_none()
        );
    }
}
