//! The `/metrics` endpoint, with `/healthz` (the process answers) and
//! `/readyz` (it can serve: the database answers; migrations and the
//! identity are done before this listener opens) for orchestrators: a
//! minimal HTTP/1.1 responder on its own plain-TCP listener. Each connection
//! gets one answer and is closed; scrapers and probes need no more, and no
//! request body is ever read.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::{Metrics, StoreGauges};
use crate::ratelimit::RateLimiter;
use crate::store::Store;

/// Largest request head read; scrapers send a few hundred bytes.
const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
/// Time a client has to send its request line and headers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// What a scrape reads.
#[derive(Clone)]
pub struct MetricsSources {
    /// Call metrics.
    pub metrics: Arc<Metrics>,
    /// The rate limiter's counters.
    pub rate_limiter: Arc<RateLimiter>,
    /// Gauges read at scrape time.
    pub store: Store,
    /// Commands received and sent.
    pub federation: Arc<crate::federation::Federation>,
}

/// Serves `/metrics` on `listener` until the task is dropped or aborted.
pub async fn serve_metrics(listener: TcpListener, sources: MetricsSources) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, &sources).await {
                tracing::debug!(client.address = %remote, %error, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, sources: &MetricsSources) -> std::io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET is served\n".to_owned())
    } else if path == "/healthz" {
        ("200 OK", "alive\n".to_owned())
    } else if path == "/readyz" {
        match tokio::time::timeout(READY_TIMEOUT, sources.store.ping()).await {
            Ok(Ok(())) => ("200 OK", "ready\n".to_owned()),
            // Store errors never carry the URL's password.
            Ok(Err(error)) => (
                "503 Service Unavailable",
                format!("not ready: the database: {error}\n"),
            ),
            Err(_) => (
                "503 Service Unavailable",
                format!(
                    "not ready: the database did not answer within {} s\n",
                    READY_TIMEOUT.as_secs()
                ),
            ),
        }
    } else if path != "/metrics" {
        (
            "404 Not Found",
            "metrics are at /metrics; probes at /healthz and /readyz\n".to_owned(),
        )
    } else {
        let mut gauges = read_store_gauges(&sources.store).await;
        gauges.commands = sources.federation.command_counts();
        (
            "200 OK",
            sources
                .metrics
                .render(&sources.rate_limiter.metrics().snapshot(), &gauges),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0_u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(buffer.get(..read).unwrap_or_default());
        if head.len() > MAX_REQUEST_HEAD_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Store gauges; a failing query leaves its series out of this scrape (and is
/// logged) rather than failing the whole scrape.
async fn read_store_gauges(store: &Store) -> StoreGauges {
    let agents_by_state = store
        .count_agents_by_state()
        .await
        .inspect_err(|error| tracing::warn!(%error, "metrics: cannot count agents"))
        .ok();
    let jobs_by_state = store
        .count_jobs_by_state()
        .await
        .inspect_err(|error| tracing::warn!(%error, "metrics: cannot count jobs"))
        .ok();
    let peers_by_state = store
        .count_connections_by_state()
        .await
        .inspect_err(|error| tracing::warn!(%error, "metrics: cannot count peers"))
        .ok();
    let now_ms = crate::clock::now_ms();
    let replicas = match store.list_replicas().await {
        Ok(replicas) => replicas
            .into_iter()
            .map(|(replica, agents)| {
                let state = replica.state_at(now_ms).to_owned();
                (replica.runner_id, state, agents)
            })
            .collect(),
        Err(error) => {
            tracing::warn!(%error, "metrics: cannot list the replicas");
            Vec::new()
        }
    };
    StoreGauges {
        agents_by_state,
        jobs_by_state,
        peers_by_state,
        commands: Vec::new(),
        sqlite_wal: store.sqlite_wal(),
        replicas,
    }
}
