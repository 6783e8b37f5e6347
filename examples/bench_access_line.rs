//! The cost of the access line alone (issue 23): the one log line per call,
//! formatted by `tracing-subscriber`'s own text and JSON formatters and by
//! `metrics::access_line` (the daemon's), in this process, on one thread,
//! into a writer that keeps nothing. The event is the one the front door
//! writes, with a caller and a client as a `GetJob` has them. Rounds alternate
//! the formatters; the medians of the rounds are shown, in ns per line, with
//! the ratio to `tracing-subscriber`'s formatter of the same format.
//!
//! `cargo run --release --example bench_access_line` (`BENCH_LINES` per
//! measurement, default 200 000; `BENCH_ROUNDS`, default 5). Markdown on
//! stdout.

#![forbid(unsafe_code)]

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::stats::{median, ratio, setting};
use mosaic_mesh::metrics::access_line::{AccessLineFormat, TARGET};
use tracing_subscriber::fmt::MakeWriter;

/// Takes every line and keeps none, as a buffer that is never full would.
#[derive(Clone, Copy)]
struct Discard;

impl std::io::Write for Discard {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        std::hint::black_box(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Discard {
    type Writer = Discard;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Formatter {
    TextTheirs,
    TextOurs,
    JsonTheirs,
    JsonOurs,
}

impl Formatter {
    const ALL: [Formatter; 4] = [
        Formatter::TextTheirs,
        Formatter::TextOurs,
        Formatter::JsonTheirs,
        Formatter::JsonOurs,
    ];

    fn name(self) -> &'static str {
        match self {
            Formatter::TextTheirs => "text, `tracing-subscriber`'s formatter",
            Formatter::TextOurs => "text, `access_line` (the daemon's)",
            Formatter::JsonTheirs => "JSON, `tracing-subscriber`'s formatter",
            Formatter::JsonOurs => "JSON, `access_line` (the daemon's)",
        }
    }

    /// What this one is compared with.
    fn theirs(self) -> Formatter {
        match self {
            Formatter::TextTheirs | Formatter::TextOurs => Formatter::TextTheirs,
            Formatter::JsonTheirs | Formatter::JsonOurs => Formatter::JsonTheirs,
        }
    }

    /// A subscriber as `mosaicd` installs it (filter `info`, no colours),
    /// writing into [`Discard`].
    fn dispatch(self) -> tracing::Dispatch {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(Discard);
        let text = tracing_subscriber::fmt::format;
        let json = || tracing_subscriber::fmt::format().json();
        match self {
            Formatter::TextTheirs => builder.event_format(text()).finish().into(),
            Formatter::TextOurs => builder
                .event_format(AccessLineFormat::text(text()))
                .finish()
                .into(),
            Formatter::JsonTheirs => builder.json().event_format(json()).finish().into(),
            Formatter::JsonOurs => builder
                .json()
                .event_format(AccessLineFormat::json(json()))
                .finish()
                .into(),
        }
    }
}

/// The front door's line for one `GetJob`.
fn access_line(client: &SocketAddr, duration_ms: u64) {
    let (service, method) = ("mosaic.coordinator.v1.Coordinator", "GetJob");
    let caller = "api_key:0193a4f2-7c1e-7b55-9a3d-5e2f1c0b8d47";
    tracing::event!(
        target: TARGET,
        tracing::Level::INFO,
        rpc.service = %service, rpc.method = %method, caller = %caller, client = %client,
        code = "OK", duration_ms,
        "call"
    );
}

/// Nanoseconds per line for `lines` lines through `formatter`.
fn measure(formatter: Formatter, lines: u64) -> f64 {
    let client: SocketAddr = ([127, 0, 0, 1], 51_234).into();
    tracing::dispatcher::with_default(&formatter.dispatch(), || {
        let started = Instant::now();
        for line in 0..lines {
            access_line(&client, line % 7);
        }
        started.elapsed().as_nanos() as f64 / lines as f64
    })
}

fn main() {
    let lines = setting("BENCH_LINES", 200_000_u64).max(1);
    let rounds = setting("BENCH_ROUNDS", 5_u64).max(1);
    for formatter in Formatter::ALL {
        measure(formatter, lines / 10 + 1);
    }
    let mut results = std::collections::BTreeMap::<Formatter, Vec<f64>>::new();
    for _ in 0..rounds {
        for formatter in Formatter::ALL {
            let nanos = measure(formatter, lines);
            results.entry(formatter).or_default().push(nanos);
        }
    }
    let medians: std::collections::BTreeMap<Formatter, f64> = results
        .into_iter()
        .map(|(formatter, rounds)| (formatter, median(rounds)))
        .collect();
    println!("Machine: {}.", common::machine::description());
    println!("{lines} lines per measurement, {rounds} rounds, medians shown.\n");
    println!("| access line | ns per line | × `tracing-subscriber`'s |");
    println!("|---|---|---|");
    for (formatter, nanos) in &medians {
        let theirs = medians
            .get(&formatter.theirs())
            .copied()
            .unwrap_or(f64::NAN);
        println!(
            "| {} | {nanos:.0} | {:.2} |",
            formatter.name(),
            ratio(*nanos, theirs)
        );
    }
}
