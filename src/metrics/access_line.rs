//! The access line's own formatter: the one log line per call (target
//! `mosaic_mesh::access`, recorded by [`super::call_record`]) is written field by
//! field straight into the line, byte for byte what `tracing-subscriber`'s
//! text and JSON formatters write for it, without their general machinery
//! (padding and styling per piece, a map serializer, a string per
//! timestamp). Every other event, and the access line itself on a terminal
//! (colours) or inside a span, goes to the formatter this one wraps.
//!
//! In `mosaicd` the line skips tracing altogether (`access_line/straight.rs`):
//! it is formatted from the call's typed values and appended to the log's
//! buffer, the same bytes; this formatter writes it where that path cannot.
//!
//! It is the only line written on every call, so its cost is paid per call:
//! BENCHMARKS.md, sessions 19 and 25.

use std::fmt::{self, Write as _};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

mod straight;

pub use straight::{AccessLine, ClientAddress, write_straight, write_straight_to};

/// The target of the access line.
pub const TARGET: &str = "mosaic_mesh::access";

/// Which of `tracing-subscriber`'s formats the line is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `Format<Full>` with `DefaultFields`.
    Text,
    /// `Format<Json>` with `JsonFields`.
    Json,
}

/// See the module documentation: the access line in `shape`, everything
/// else by `other`.
pub struct AccessLineFormat<F> {
    other: F,
    shape: Shape,
}

impl<F> AccessLineFormat<F> {
    /// Lines as `tracing-subscriber`'s default text format writes them;
    /// `other` is that format, for every other event.
    pub fn text(other: F) -> Self {
        Self {
            other,
            shape: Shape::Text,
        }
    }

    /// Lines as `tracing-subscriber`'s JSON format writes them (one object
    /// per line, the fields under `fields`); `other` is that format.
    pub fn json(other: F) -> Self {
        Self {
            other,
            shape: Shape::Json,
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for AccessLineFormat<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let styled = self.shape == Shape::Text && writer.has_ansi_escapes();
        let now = SystemTime::now();
        // A clock before 1970 is `humantime`'s panic and
        // `tracing-subscriber`'s negative year.
        let before_1970 = now < SystemTime::UNIX_EPOCH;
        if metadata.target() != TARGET || styled || before_1970 || context.event_scope().is_some() {
            return self.other.format_event(context, writer, event);
        }
        let now = humantime::format_rfc3339_micros(now);
        let level = metadata.level();
        // Pieces are written as they are, not through `write!`'s format
        // strings.
        match self.shape {
            Shape::Text => {
                write!(writer, "{now}")?;
                writer.write_str(padded(*level))?;
                writer.write_str(TARGET)?;
                writer.write_str(": ")?;
                let mut fields = TextFields {
                    writer: &mut writer,
                    first: true,
                    result: Ok(()),
                };
                event.record(&mut fields);
                fields.result?;
            }
            Shape::Json => {
                writer.write_str("{\"timestamp\":\"")?;
                write!(writer, "{now}")?;
                writer.write_str("\",\"level\":\"")?;
                writer.write_str(level.as_str())?;
                writer.write_str("\",\"fields\":{")?;
                let mut fields = JsonFields {
                    writer: &mut writer,
                    first: true,
                    result: Ok(()),
                };
                event.record(&mut fields);
                fields.result?;
                writer.write_str("},\"target\":")?;
                write_json_string(&mut writer, TARGET)?;
                writer.write_char('}')?;
            }
        }
        writer.write_char('\n')
    }
}

/// A level as `tracing-subscriber`'s `FmtLevel` writes it, padded to five
/// characters, between spaces.
fn padded(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::TRACE => " TRACE ",
        tracing::Level::DEBUG => " DEBUG ",
        tracing::Level::INFO => "  INFO ",
        tracing::Level::WARN => "  WARN ",
        tracing::Level::ERROR => " ERROR ",
    }
}

/// The event's fields as `DefaultFields` writes them: the message bare,
/// then `name=value` (strings quoted, displays bare), space-separated.
struct TextFields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl TextFields<'_, '_> {
    fn field(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        let writer = &mut *self.writer;
        self.result = (|| {
            writer.write_str(separator)?;
            if field.name() == "message" {
                // As `tracing-subscriber` does: a message cannot steer the
                // terminal, unless the writer was told not to care.
                if writer.sanitizes_ansi_escapes() {
                    return write!(TerminalEscaped(writer), "{value:?}");
                }
                return write!(writer, "{value:?}");
            }
            writer.write_str(field.name())?;
            writer.write_char('=')?;
            write!(writer, "{value:?}")
        })();
    }
}

/// Writes what it is given with the characters that could start a terminal
/// sequence spelled out, as `tracing-subscriber` writes a message.
struct TerminalEscaped<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for TerminalEscaped<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for character in text.chars() {
            match character {
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                    write!(self.0, "\\x{:02x}", u32::from(character))?;
                }
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(character))?,
                _ => self.0.write_char(character)?,
            }
        }
        Ok(())
    }
}

impl Visit for TextFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, &format_args!("{value}"));
        } else {
            self.field(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, value);
    }
}

/// The event's fields as `JsonFields` writes them into `"fields"`: numbers
/// and booleans bare, everything else a string.
struct JsonFields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    /// A number or a boolean.
    fn bare(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        self.entry(field, |writer| writer.write_fmt(value));
    }

    /// Anything else, as a string.
    fn quoted(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        self.entry(field, |writer| {
            writer.write_char('"')?;
            JsonEscaped(&mut *writer).write_fmt(value)?;
            writer.write_char('"')
        });
    }

    /// `"name":` and the value `write` writes, after a comma but for the
    /// first.
    fn entry(&mut self, field: &Field, write: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let writer = &mut *self.writer;
        let first = std::mem::take(&mut self.first);
        self.result = (|| {
            if !first {
                writer.write_char(',')?;
            }
            write_json_string(writer, field.name())?;
            writer.write_char(':')?;
            write(writer)
        })();
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, format_args!("{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.quoted(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.quoted(field, format_args!("{value:?}"));
    }
}

/// `text` as a JSON string, quotes included.
fn write_json_string<W: fmt::Write>(writer: &mut W, text: &str) -> fmt::Result {
    writer.write_char('"')?;
    JsonEscaped(&mut *writer).write_str(text)?;
    writer.write_char('"')
}

/// Writes what it is given escaped for the inside of a JSON string, as
/// `serde_json` escapes it: `"`, `\` and control characters.
struct JsonEscaped<W>(W);

impl<W: fmt::Write> fmt::Write for JsonEscaped<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut plain = 0;
        for (at, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&text[plain..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = at + 1;
        }
        self.0.write_str(&text[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    pub(super) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub(super) fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// An access line as the layer writes it, and one event of another
    /// target, with awkward values.
    fn emit() {
        let caller = "api_key:\"quoted\"\\\u{1b}[31m\ttab\u{7f}é";
        let client = "127.0.0.1:4040";
        tracing::event!(
            target: TARGET,
            tracing::Level::INFO,
            rpc.service = %"mosaic.coordinator.v1.Coordinator", rpc.method = %"GetJob",
            caller = %caller, client = %client, code = "OK", duration_ms = 12_u64,
            "call"
        );
        tracing::event!(
            target: TARGET,
            tracing::Level::DEBUG,
            rpc.service = %"grpc.health.v1.Health", rpc.method = %"Check",
            caller = %"anonymous", client = %"-", code = "UNAVAILABLE", duration_ms = 0_u64,
            "call"
        );
        tracing::info!(answer = 42, "another line");
        let span = tracing::info_span!("inside", job = 7);
        span.in_scope(|| {
            tracing::event!(
                target: TARGET,
                tracing::Level::INFO,
                rpc.service = %"s", rpc.method = %"m", caller = %"c", client = %"-",
                code = "OK", duration_ms = 1_u64, "call"
            );
        });
        tracing::info!(target: TARGET, "call");
        tracing::warn!(target: TARGET, code = "INTERNAL", "call");
        tracing::error!(target: TARGET, duration_ms = 3_u64, "call");
        tracing::info!(target: TARGET, "call \u{1b}[2J\u{7}\u{9b}2J plain é");
    }

    /// What a `tracing-subscriber` of `builder`'s settings writes with
    /// `format` for the events `emit` makes ([`emit`] here), split into
    /// lines.
    macro_rules! lines {
        ($builder:expr, $format:expr, $emit:expr) => {{
            let captured = $crate::metrics::access_line::tests::Captured::default();
            let subscriber = $builder
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(captured.clone())
                .event_format($format)
                .finish();
            tracing::subscriber::with_default(subscriber, $emit);
            let lines: Vec<String> = captured.text().lines().map(str::to_owned).collect();
            lines
        }};
    }
    pub(super) use lines;

    /// A line without its timestamp, after checking the timestamp's shape
    /// (`2026-12-06T20:41:18.018829Z`), which comes after `opening`.
    pub(super) fn untimed(line: &str, opening: &str) -> String {
        let rest = line.strip_prefix(opening).expect("the line's opening");
        let (timestamp, rest) = rest.split_at(27);
        humantime::parse_rfc3339(timestamp).expect("an RFC 3339 timestamp");
        format!("{opening}{rest}")
    }

    #[test]
    fn text_lines_are_tracing_subscribers_own() {
        let format = tracing_subscriber::fmt::format;
        let plain = || tracing_subscriber::fmt().with_ansi(false);
        let written = lines!(plain(), AccessLineFormat::text(format()), emit);
        let expected = lines!(plain(), format(), emit);
        assert_eq!(written.len(), 8, "{written:?}");
        assert_eq!(expected.len(), 8, "{expected:?}");
        for (ours, theirs) in written.iter().zip(&expected) {
            assert_eq!(untimed(ours, ""), untimed(theirs, ""));
        }
        let access = &written[0];
        assert!(
            access.contains(" INFO mosaic_mesh::access: call rpc.service="),
            "{access}"
        );
        assert!(access.ends_with("code=\"OK\" duration_ms=12"), "{access}");
        assert!(
            written[1].contains("DEBUG mosaic_mesh::access: call "),
            "{written:?}"
        );
    }

    #[test]
    fn coloured_text_is_left_to_tracing_subscriber() {
        let format = tracing_subscriber::fmt::format;
        let coloured = || tracing_subscriber::fmt().with_ansi(true);
        let written = lines!(coloured(), AccessLineFormat::text(format()), emit);
        let expected = lines!(coloured(), format(), emit);
        assert_eq!(written.len(), 8, "{written:?}");
        for (ours, theirs) in written.iter().zip(&expected) {
            // The timestamp is dimmed: it follows the style's opening.
            assert_eq!(untimed(ours, "\u{1b}[2m"), untimed(theirs, "\u{1b}[2m"));
        }
    }

    #[test]
    fn json_lines_are_tracing_subscribers_own() {
        let format = || tracing_subscriber::fmt::format().json();
        let json = || tracing_subscriber::fmt().json();
        let written = lines!(json(), AccessLineFormat::json(format()), emit);
        let expected = lines!(json(), format(), emit);
        assert_eq!(written.len(), 8, "{written:?}");
        assert_eq!(expected.len(), 8, "{expected:?}");
        for (ours, theirs) in written.iter().zip(&expected) {
            let opening = "{\"timestamp\":\"";
            assert_eq!(untimed(ours, opening), untimed(theirs, opening));
            let parsed: serde_json::Value = serde_json::from_str(ours).expect("JSON");
            assert!(parsed["fields"].is_object(), "{ours}");
        }
        let access: serde_json::Value = serde_json::from_str(&written[0]).expect("JSON");
        let caller = "api_key:\"quoted\"\\\u{1b}[31m\ttab\u{7f}é";
        assert_eq!(access["fields"]["caller"], caller);
        assert_eq!(access["fields"]["duration_ms"], 12);
        assert_eq!(access["target"], TARGET);
    }
}
