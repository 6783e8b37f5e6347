//! The `mosaicd` binary: parse the command line, start tracing, dispatch.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use mosaic_mesh::cli::{LogFormat, dispatch};
use mosaic_mesh::metrics::access_line::{self, AccessLineFormat, Shape};

/// jemalloc, which gives freed memory back to the system, so the daemon's
/// resident size follows its live heap under sustained load (see Cargo.toml).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // A bad value from a `MOSAIC_*` variable is reported under its name.
    let cli = mosaic_mesh::cli::environment::parse_command_line();
    // Flushes the queued log lines when main returns.
    let _log = match init_tracing(cli.log.as_deref(), cli.log_format) {
        Ok(guard) => guard,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The message may quote a peer's or the database's words.
            eprintln!(
                "error: {}",
                mosaic_mesh::text::escape_for_terminal(&error.message)
            );
            error.exit_code()
        }
    }
}

/// Starts logging, to stderr through a non-blocking writer
/// (`metrics::log_writer`); a `--log` / `MOSAIC_LOG` filter that does not
/// parse is a usage error, not a silent fallback.
fn init_tracing(
    filter: Option<&str>,
    format: LogFormat,
) -> Result<mosaic_mesh::metrics::log_writer::LogGuard, String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or("info")).map_err(
        |error| {
            format!(
                "--log / MOSAIC_LOG is not a valid tracing filter ({error}); e.g. `info` or `mosaic_mesh=debug,info`"
            )
        },
    )?;
    let (writer, guard) = mosaic_mesh::metrics::log_writer::stderr();
    let coloured = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_ansi(coloured);
    // The access line, written on every call, by a formatter of its own,
    // and where the log has no colours, straight into the log's buffer.
    let standard = tracing_subscriber::fmt::format;
    match format {
        LogFormat::Text => {
            builder
                .event_format(AccessLineFormat::text(standard()))
                .init();
            if !coloured {
                access_line::write_straight_to(writer, Shape::Text);
            }
        }
        LogFormat::Json => {
            builder
                .json()
                .event_format(AccessLineFormat::json(standard().json()))
                .init();
            access_line::write_straight_to(writer, Shape::Json);
        }
    }
    Ok(guard)
}
