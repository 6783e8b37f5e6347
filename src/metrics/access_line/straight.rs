//! The access line written straight into the log's buffer: in `mosaicd`
//! the line skips tracing's dispatch and its field visitors, which format
//! each value through a `dyn Debug`. It is formatted from the call's typed
//! values, the same bytes [`super::AccessLineFormat`] and
//! `tracing-subscriber` write, and appended to the log's buffer. Tracing
//! still decides whether the line is written (the `--log` filter), and
//! still writes it where this path cannot (a terminal, a span, a process
//! that never set it up). BENCHMARKS.md, session 25.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::SystemTime;

use super::{JsonEscaped, Shape, TARGET, padded, write_json_string};
use crate::auth::Caller;
use crate::metrics::log_writer::LogWriter;

/// One call's access line as [`crate::metrics::call_record`] knows it: the values
/// of the tracing event it would otherwise be.
pub struct AccessLine<'a> {
    /// The called service (`rpc.service`).
    pub service: &'a str,
    /// The called method (`rpc.method`).
    pub method: &'a str,
    /// Who called.
    pub caller: &'a Caller,
    /// The client's address and port, when the server knows it.
    pub client: Option<SocketAddr>,
    /// The answer's gRPC code, by name (`crate::error::code_name`).
    pub code: &'static str,
    /// How long the call took.
    pub duration_ms: u64,
}

/// A client's address as the line shows it: `-` when the server does not
/// know it.
pub struct ClientAddress(pub Option<SocketAddr>);

impl fmt::Display for ClientAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(address) => address.fmt(formatter),
            None => formatter.write_str("-"),
        }
    }
}

/// The log's writer and format, once `mosaicd` has set them up
/// ([`write_straight_to`]).
static STRAIGHT: OnceLock<(LogWriter, Shape)> = OnceLock::new();

/// The capacity a thread's line buffer keeps between lines.
const KEPT_LINE_CAPACITY: usize = 4096;

thread_local! {
    static LINE: RefCell<LineBuffer> = const { RefCell::new(LineBuffer::new()) };
}

/// Lets access lines skip tracing: `writer` is the one the global
/// subscriber writes through and `shape` its format, without colours. Set
/// once; a second call changes nothing.
pub fn write_straight_to(writer: LogWriter, shape: Shape) {
    let _ = STRAIGHT.set((writer, shape));
}

/// Appends `line` at `level` to the log's buffer, as tracing would have
/// written it, if it may; `false` when it must go through tracing instead:
/// the straight path was never set up, or a span is current (its context
/// belongs on the line). The caller has checked that tracing's filter lets
/// the line through.
pub fn write_straight(level: tracing::Level, line: &AccessLine<'_>) -> bool {
    let Some((writer, shape)) = STRAIGHT.get() else {
        return false;
    };
    if !tracing::Span::current().is_none() {
        return false;
    }
    LINE.with(|buffer| {
        let Ok(mut buffer) = buffer.try_borrow_mut() else {
            return false;
        };
        let written = buffer
            .format(*shape, level, SystemTime::now(), line)
            .is_ok();
        if written {
            writer.push(buffer.text.as_bytes());
        }
        buffer.text.shrink_to(KEPT_LINE_CAPACITY);
        written
    })
}

/// A thread's line as it is put together (appended to the log's buffer
/// in one piece), and the date and time to the second of the last one:
/// lines of the same second write it again rather than work it out.
struct LineBuffer {
    text: String,
    /// Seconds since the epoch of `second_text`.
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`; empty before the first line.
    second_text: String,
}

impl LineBuffer {
    const fn new() -> LineBuffer {
        LineBuffer {
            text: String::new(),
            second: 0,
            second_text: String::new(),
        }
    }

    /// `line` at `level` as of `now`, in `shape`, newline included, in
    /// place of the last one.
    fn format(
        &mut self,
        shape: Shape,
        level: tracing::Level,
        now: SystemTime,
        line: &AccessLine<'_>,
    ) -> fmt::Result {
        self.text.clear();
        match shape {
            Shape::Text => {
                self.timestamp(now)?;
                let out = &mut self.text;
                out.push_str(padded(level));
                out.push_str(TARGET);
                // Strings bare (they are displayed), the code quoted (a
                // string field), as `DefaultFields` writes them.
                out.push_str(": call rpc.service=");
                out.push_str(line.service);
                out.push_str(" rpc.method=");
                out.push_str(line.method);
                out.push_str(" caller=");
                write!(out, "{}", line.caller)?;
                out.push_str(" client=");
                write_client(out, line.client)?;
                out.push_str(" code=\"");
                out.push_str(line.code);
                out.push_str("\" duration_ms=");
                out.push_str(itoa::Buffer::new().format(line.duration_ms));
            }
            Shape::Json => {
                self.text.push_str("{\"timestamp\":\"");
                self.timestamp(now)?;
                let out = &mut self.text;
                out.push_str("\",\"level\":\"");
                out.push_str(level.as_str());
                out.push_str("\",\"fields\":{\"message\":\"call\",\"rpc.service\":");
                write_json_string(out, line.service)?;
                out.push_str(",\"rpc.method\":");
                write_json_string(out, line.method)?;
                out.push_str(",\"caller\":\"");
                write!(JsonEscaped(&mut *out), "{}", line.caller)?;
                // An address needs no escaping.
                out.push_str("\",\"client\":\"");
                write_client(out, line.client)?;
                out.push_str("\",\"code\":\"");
                out.push_str(line.code);
                out.push_str("\",\"duration_ms\":");
                out.push_str(itoa::Buffer::new().format(line.duration_ms));
                out.push_str("},\"target\":");
                write_json_string(out, TARGET)?;
                out.push('}');
            }
        }
        self.text.push('\n');
        Ok(())
    }

    /// `now` as `humantime::format_rfc3339_micros` writes it
    /// (`2026-12-06T20:41:18.018829Z`), its second from the last line's
    /// when they are the same; an error before 1970 (where `humantime`
    /// panics) and after 9999, which tracing's formatter then writes.
    fn timestamp(&mut self, now: SystemTime) -> fmt::Result {
        let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) else {
            return Err(fmt::Error);
        };
        let second = since_epoch.as_secs();
        if self.second_text.is_empty() || self.second != second {
            self.second_text.clear();
            let whole = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(whole);
            if write!(self.second_text, "{text}").is_err() {
                self.second_text.clear();
                return Err(fmt::Error);
            }
            // Without the `Z`.
            self.second_text.pop();
            self.second = second;
        }
        self.text.push_str(&self.second_text);
        self.text.push('.');
        // Six digits, leading zeros kept: those of a seven-digit number.
        let micros = 1_000_000 + u64::from(since_epoch.subsec_micros());
        self.text.push_str(&itoa::Buffer::new().format(micros)[1..]);
        self.text.push('Z');
        Ok(())
    }
}

/// A client's address as [`ClientAddress`] displays it; an IPv4 one (the
/// usual case) written digit by digit, which costs a tenth of `Display`'s
/// nested format strings.
fn write_client(out: &mut String, client: Option<SocketAddr>) -> fmt::Result {
    let Some(SocketAddr::V4(address)) = client else {
        return write!(out, "{}", ClientAddress(client));
    };
    let mut digits = itoa::Buffer::new();
    for (at, octet) in address.ip().octets().into_iter().enumerate() {
        if at > 0 {
            out.push('.');
        }
        out.push_str(digits.format(octet));
    }
    out.push(':');
    out.push_str(digits.format(address.port()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{lines, untimed};
    use super::*;

    /// Lines of `LineBuffer::format` for each of `calls`, beside what
    /// `tracing-subscriber` itself writes for the same calls as tracing
    /// events (`builder` its settings, `format` its format).
    macro_rules! straight_and_theirs {
        ($shape:expr, $builder:expr, $format:expr, $calls:expr) => {{
            let calls: &[AccessLine<'_>] = $calls;
            let theirs = lines!($builder, $format, || {
                for line in calls {
                    tracing::event!(
                        target: TARGET,
                        tracing::Level::INFO,
                        rpc.service = %line.service, rpc.method = %line.method,
                        caller = %line.caller, client = %ClientAddress(line.client),
                        code = line.code, duration_ms = line.duration_ms,
                        "call"
                    );
                }
            });
            let ours: Vec<String> = calls
                .iter()
                .map(|line| {
                    let mut buffer = LineBuffer::new();
                    buffer
                        .format($shape, tracing::Level::INFO, SystemTime::now(), line)
                        .expect("format");
                    buffer.text.strip_suffix('\n').expect("one line").to_owned()
                })
                .collect();
            (ours, theirs)
        }};
    }

    /// Calls with awkward callers, both kinds of address, none, and codes
    /// with an underscore.
    fn awkward_calls(callers: &[Caller]) -> Vec<AccessLine<'_>> {
        let clients = [
            Some("127.0.0.1:4040".parse().expect("v4")),
            Some("[2001:db8::1]:443".parse().expect("v6")),
            None,
        ];
        let codes = ["OK", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"];
        callers
            .iter()
            .enumerate()
            .map(|(at, caller)| AccessLine {
                service: "mosaic.coordinator.v1.Coordinator",
                method: "GetJob",
                caller,
                client: clients[at % clients.len()],
                code: codes[at % codes.len()],
                duration_ms: [0, 12, u64::MAX][at % 3],
            })
            .collect()
    }

    fn awkward_callers() -> Vec<Caller> {
        let awkward = "\"quoted\"\\\u{1b}[31m\ttab\u{7f}é";
        vec![
            Caller::Anonymous,
            Caller::ApiKey {
                id: std::sync::Arc::from(format!("key{awkward}").as_str()),
                name: std::sync::Arc::from("bots"),
            },
            Caller::ApiKey {
                id: std::sync::Arc::from("k_0123456789abcdef"),
                name: std::sync::Arc::from("n"),
            },
        ]
    }

    #[test]
    fn straight_text_lines_are_tracing_subscribers_own() {
        let callers = awkward_callers();
        let calls = awkward_calls(&callers);
        let plain = || tracing_subscriber::fmt().with_ansi(false);
        let (ours, theirs) = straight_and_theirs!(
            Shape::Text,
            plain(),
            tracing_subscriber::fmt::format(),
            &calls
        );
        assert_eq!(theirs.len(), calls.len(), "{theirs:?}");
        for (ours, theirs) in ours.iter().zip(&theirs) {
            assert_eq!(untimed(ours, ""), untimed(theirs, ""));
        }
        assert!(
            ours[0].ends_with("client=127.0.0.1:4040 code=\"OK\" duration_ms=0"),
            "{ours:?}"
        );
    }

    #[test]
    fn straight_json_lines_are_tracing_subscribers_own() {
        let callers = awkward_callers();
        let calls = awkward_calls(&callers);
        let (ours, theirs) = straight_and_theirs!(
            Shape::Json,
            tracing_subscriber::fmt().json(),
            tracing_subscriber::fmt::format().json(),
            &calls
        );
        assert_eq!(theirs.len(), calls.len(), "{theirs:?}");
        let opening = "{\"timestamp\":\"";
        for (ours, theirs) in ours.iter().zip(&theirs) {
            assert_eq!(untimed(ours, opening), untimed(theirs, opening));
            let parsed: serde_json::Value = serde_json::from_str(ours).expect("JSON");
            assert_eq!(parsed["target"], TARGET, "{ours}");
        }
        let second: serde_json::Value = serde_json::from_str(&ours[1]).expect("JSON");
        assert_eq!(
            second["fields"]["caller"],
            "api_key:key\"quoted\"\\\u{1b}[31m\ttab\u{7f}é"
        );
        assert_eq!(second["fields"]["client"], "[2001:db8::1]:443");
    }

    #[test]
    fn a_time_before_1970_or_after_9999_is_left_to_tracing_without_a_panic() {
        use std::time::Duration;
        let callers = awkward_callers();
        let calls = awkward_calls(&callers);
        let times = [
            SystemTime::UNIX_EPOCH - Duration::from_secs(1),
            humantime::parse_rfc3339("9999-12-31T23:59:59Z").expect("time")
                + Duration::from_secs(1),
        ];
        for now in times {
            for shape in [Shape::Text, Shape::Json] {
                let mut buffer = LineBuffer::new();
                let written = buffer.format(shape, tracing::Level::INFO, now, &calls[0]);
                assert!(written.is_err(), "{now:?} {shape:?}: {}", buffer.text);
            }
        }
    }

    #[test]
    fn timestamps_are_humantimes_own_within_a_second_and_across_seconds() {
        use std::time::Duration;
        let start = humantime::parse_rfc3339("2026-12-31T23:59:58.999999Z").expect("time");
        let mut buffer = LineBuffer::new();
        for micros in [
            0,
            1,
            2,
            500_000,
            999_999,
            1_000_000,
            1_000_001,
            2_000_000,
            86_400_000_000,
        ] {
            let now = start + Duration::from_micros(micros);
            buffer.text.clear();
            buffer.timestamp(now).expect("timestamp");
            assert_eq!(
                buffer.text,
                humantime::format_rfc3339_micros(now).to_string(),
                "{micros} µs after the start"
            );
        }
    }
}
