//! A closed-loop load generator: `callers` concurrent tasks, each making one
//! call after another until the request budget or the time limit runs out.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::stats::Samples;

/// Failed calls by gRPC code name (`UNAVAILABLE`, ...).
pub type Errors = BTreeMap<&'static str, u64>;

/// Runs `call` `requests` times in total over `callers` concurrent tasks (fewer
/// if `time_limit` passes first). Each task gets its own clone of `client`.
/// Returns the latencies of the calls that succeeded and the failed calls'
/// counts by gRPC code.
pub async fn closed_loop<C, F, Fut>(
    callers: usize,
    requests: usize,
    time_limit: Duration,
    client: C,
    call: F,
) -> (Samples, Errors)
where
    C: Clone + Send + 'static,
    F: Fn(C) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let issued = Arc::clone(&issued);
        let client = client.clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Errors::new();
            while issued.fetch_add(1, Ordering::Relaxed) < requests
                && started.elapsed() < time_limit
            {
                let call_started = Instant::now();
                match call(client.clone()).await {
                    Ok(()) => latencies.push(call_started.elapsed()),
                    Err(status) => *errors.entry(code_name(status.code())).or_default() += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut samples = Samples::default();
    let mut errors = Errors::new();
    for task in tasks {
        if let Ok((latencies, task_errors)) = task.await {
            samples.latencies.extend(latencies);
            for (code, count) in task_errors {
                *errors.entry(code).or_default() += count;
            }
        }
    }
    samples.wall = started.elapsed();
    (samples, errors)
}

/// "none" or the error counts, e.g. "UNAVAILABLE ×3".
pub fn describe_errors(errors: &Errors) -> String {
    if errors.is_empty() {
        return "none".to_owned();
    }
    errors
        .iter()
        .map(|(code, count)| format!("{code} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The canonical upper-case name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
