//! One call's record: its count and duration by gRPC code, and its log line,
//! made by the front door (`crate::front_door`), which sits outside every
//! service, so refused and unauthenticated calls are counted too.
//!
//! The code comes from the `grpc-status` header for trailers-only answers
//! (errors, refusals) and otherwise from the trailers, which is why the response
//! body is wrapped: the call is recorded when its body ends (or is dropped).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::Frame;

use super::Metrics;
use super::access_line::{self, AccessLine, ClientAddress};
use super::settings::AccessLog;
use crate::auth::Caller;

/// The header or trailer a call's code is in. A constant, so that reading
/// it on every call parses no name.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// A call as it arrives: what its record will need, taken before anything
/// else runs (the duration starts here).
pub struct CallStart {
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    labels: Labels,
    started: Instant,
    /// What the log line says beyond the call; `None` when the access log
    /// is off.
    line: Option<LineFields>,
}

impl CallStart {
    /// The start of a call to `path`, whose served method is `method` (see
    /// [`crate::served::lookup`]), on a connection described by
    /// `extensions`, to be recorded in `metrics` and logged at
    /// `access_log`. The client's address is looked up only for the log
    /// line.
    pub fn new(
        metrics: &Arc<Metrics>,
        access_log: AccessLog,
        method: Option<&'static crate::served::Method>,
        path: &str,
        extensions: &http::Extensions,
    ) -> CallStart {
        CallStart {
            metrics: Arc::clone(metrics),
            access_log,
            labels: Labels::of(method, path),
            started: Instant::now(),
            line: (access_log != AccessLog::Off).then(|| LineFields {
                caller: None,
                client: crate::auth::remote_address(extensions),
            }),
        }
    }

    /// Records who made the call, for the log line (anonymous when not
    /// set): a clone of `caller`, made only when the line is written.
    pub fn set_caller(&mut self, caller: &Caller) {
        if let Some(line) = &mut self.line {
            line.caller = Some(caller.clone());
        }
    }

    /// The call's response, recorded now if it carries its code in its
    /// headers (trailers-only), else when its body ends or is dropped.
    pub fn finish(
        self,
        response: http::Response<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let mut recorder = CallRecorder {
            metrics: self.metrics,
            access_log: self.access_log,
            labels: self.labels,
            line: self.line,
            started: self.started,
            recorded: false,
        };
        if let Some(code) = response
            .headers()
            .get(GRPC_STATUS)
            .and_then(|value| value.to_str().ok())
        {
            // Trailers-only: the call is over, whatever the body holds.
            recorder.record(code);
        }
        response.map(|body| {
            tonic::body::Body::new(RecordingBody {
                inner: body,
                recorder,
            })
        })
    }
}

/// The (service, method) labels of a call: a served method's own, else
/// `unknown` in place of whatever a client made up, so that scanners cannot
/// grow the label set (a made-up method of one of our services keeps the
/// service's name).
enum Labels {
    Served(&'static crate::served::Method),
    /// A path no service of ours serves: the service's name if it is ours.
    Unserved(Option<Box<str>>),
}

impl Labels {
    fn of(method: Option<&'static crate::served::Method>, path: &str) -> Labels {
        if let Some(method) = method {
            return Labels::Served(method);
        }
        let ours = path
            .trim_start_matches('/')
            .split_once('/')
            .filter(|_| crate::auth::requirement_for(path).is_some());
        Labels::Unserved(ours.map(|(service, _)| service.into()))
    }

    fn service(&self) -> &str {
        match self {
            Labels::Served(method) => method.service(),
            Labels::Unserved(service) => service.as_deref().unwrap_or("unknown"),
        }
    }

    fn method(&self) -> &str {
        match self {
            Labels::Served(method) => method.name(),
            Labels::Unserved(_) => "unknown",
        }
    }
}

/// The gRPC code of a `grpc-status` value (UNKNOWN when it is not one).
fn code_of(code: &str) -> tonic::Code {
    code.trim()
        .parse::<i32>()
        .map_or(tonic::Code::Unknown, tonic::Code::from)
}

/// Records one call once, with its duration and a log line.
struct CallRecorder {
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    /// The called method's labels.
    labels: Labels,
    /// What the log line says beyond the call; `None` when the access log
    /// is off.
    line: Option<LineFields>,
    started: Instant,
    recorded: bool,
}

/// Who made a call and from where, for its log line.
struct LineFields {
    /// Who called, once the front door knows; anonymous until then.
    caller: Option<Caller>,
    /// The client's address and port, when the server knows it.
    client: Option<std::net::SocketAddr>,
}

/// Writes an access line at `$level` if tracing's filter lets it through:
/// straight into the log where it can, else as a tracing event with the
/// same fields. A macro because a tracing call site's level is part of it.
macro_rules! log_access {
    ($level:expr, $line:expr) => {{
        let line: &AccessLine<'_> = $line;
        if tracing::event_enabled!(
            target: access_line::TARGET,
            $level,
            message, rpc.service, rpc.method, caller, client, code, duration_ms
        ) && !access_line::write_straight($level, line)
        {
            tracing::event!(
                target: access_line::TARGET,
                $level,
                rpc.service = %line.service, rpc.method = %line.method, caller = %line.caller,
                client = %ClientAddress(line.client), code = line.code, duration_ms = line.duration_ms,
                "call"
            );
        }
    }};
}

impl CallRecorder {
    fn record(&mut self, code: &str) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let code = code_of(code);
        let duration = self.started.elapsed();
        match &self.labels {
            Labels::Served(method) => self.metrics.record_served(method, code, duration),
            labels => self.metrics.record_call(
                labels.service(),
                labels.method(),
                crate::error::code_name(code),
                duration,
            ),
        }
        let Some(line) = &self.line else {
            return;
        };
        let line = AccessLine {
            service: self.labels.service(),
            method: self.labels.method(),
            caller: line.caller.as_ref().unwrap_or(&Caller::Anonymous),
            client: line.client,
            code: crate::error::code_name(code),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        };
        match self.access_log {
            AccessLog::Info => log_access!(tracing::Level::INFO, &line),
            AccessLog::Debug => log_access!(tracing::Level::DEBUG, &line),
            AccessLog::Off => {}
        }
    }
}

impl Drop for CallRecorder {
    fn drop(&mut self) {
        // A body dropped before its trailers: the client went away.
        self.record("1");
    }
}

/// The response body, passed through, watching for the trailers.
struct RecordingBody {
    inner: tonic::body::Body,
    recorder: CallRecorder,
}

impl http_body::Body for RecordingBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame
                    .trailers_ref()
                    .and_then(|trailers| trailers.get(GRPC_STATUS))
                    .and_then(|value| value.to_str().ok())
                {
                    this.recorder.record(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                this.recorder.record(&(status.code() as i32).to_string());
            }
            Poll::Ready(None) => this.recorder.record("2"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels_for(path: &str) -> (String, String) {
        let labels = Labels::of(crate::served::lookup(path), path);
        (labels.service().to_owned(), labels.method().to_owned())
    }

    #[test]
    fn only_served_methods_keep_their_labels() {
        let pair = |service: &str, method: &str| (service.to_owned(), method.to_owned());
        assert_eq!(
            labels_for("/grpc.health.v1.Health/Check"),
            pair("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            labels_for("/mosaic.federation.v1.Federation/MadeUp"),
            pair("mosaic.federation.v1.Federation", "unknown")
        );
        assert_eq!(
            labels_for("/scanner.Probe/Anything"),
            pair("unknown", "unknown")
        );
        assert_eq!(labels_for("/"), pair("unknown", "unknown"));
    }

    #[test]
    fn numeric_codes_get_their_names() {
        let name = |code: &str| crate::error::code_name(code_of(code));
        assert_eq!(name("0"), "OK");
        assert_eq!(name("16"), "UNAUTHENTICATED");
        assert_eq!(name("8"), "RESOURCE_EXHAUSTED");
        assert_eq!(name("not a number"), "UNKNOWN");
    }
}
