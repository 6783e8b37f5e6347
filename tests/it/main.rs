//! Integration tests: real daemons on 127.0.0.1:0 over real TLS, on SQLite and on
//! PostgreSQL. One test binary (faster to link); nextest runs each test in its own
//! process.

/// Runs each named `async fn(Backend)` as two tests, in modules `sqlite` and
/// `postgres`. Defined before the modules so that all of them can use it.
macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(crate::support::Backend::Sqlite).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(crate::support::Backend::Postgres).await;
                }
            )+
        }
    };
}

mod agents;
mod api_keys;
mod ca_mode;
mod call_cost;
mod cli;
mod cli_day_one;
mod clients;
mod command_log;
mod commands;
mod coordinator;
mod coordinator_faults;
mod deploy;
mod dispatch_remote;
mod doctor;
mod faults;
mod following;
mod hostile_text;
mod identity;
mod key_encodings;
mod managed_services;
mod metrics;
mod peer_cli;
mod peering;
mod pending_requests;
mod python_peer;
mod rate_limit;
mod remote_cli;
mod remote_watch;
mod replica_registry;
mod replica_routing;
mod replicas;
mod server;
mod strangers;
mod stress_faults;
mod support;
mod tidy;
mod tidy_layout;
mod vectors;
mod walkthrough;
mod watch_tampering;
