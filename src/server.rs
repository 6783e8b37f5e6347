//! The server: one listener; the Mosaic services, `grpc.health.v1.Health` and
//! server reflection (v1 and v1alpha) served by a tonic server on each serving
//! thread (`serving.rs`), behind the front door (which records, rate-limits
//! and authenticates each call), over TLS unless `--plaintext` on loopback.
//!
//! [`run`] takes its listener and shutdown future as arguments (mini-redis style), so
//! tests bind `127.0.0.1:0` and stop the daemon when they like.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::Server;

use crate::agents::AgentRuntime;
use crate::agents::service::AgentControlService;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::coordinator::dispatch::remote::RemoteDispatch;
use crate::coordinator::health::HealthCheck;
use crate::coordinator::service::CoordinatorService;
use crate::federation::service::{FederationService, Rotation};
use crate::identity::IdentityManager;
use crate::proto::agent::agent_control_server::AgentControlServer;
use crate::proto::coordinator::coordinator_server::CoordinatorServer;
use crate::proto::federation::federation_server::FederationServer;
use crate::proto::replica::replica_server::ReplicaServer;
use crate::ratelimit::RateLimiter;
use crate::replicas::service::ReplicaService;
use crate::serving::{AbortOnDrop, ServingThreads};
use crate::store::Store;

/// How long a starting replica waits for another that is migrating the
/// database or creating the identity.
const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// What the services share: storage, identity and configuration.
#[derive(Clone)]
pub struct Shared {
    /// The database.
    pub store: Store,
    /// The instance identity.
    pub identity: Arc<IdentityManager>,
    /// Peering: connections, notices, pings and the peer clients.
    pub federation: Arc<crate::federation::Federation>,
    /// The resolved configuration.
    pub config: Arc<Config>,
    /// The local agent runtime.
    pub agents: Arc<AgentRuntime>,
    /// The rate limiter in front of every service (also the hook for checks made
    /// inside handlers, such as the per-instance check of signed commands).
    pub rate_limiter: Arc<RateLimiter>,
    /// The job coordinator's in-process state (change feed, start time).
    pub coordinator: crate::coordinator::CoordinatorState,
    /// The job operations over the store and that state, built once here for
    /// the handlers and the restart's follow-up alike.
    pub jobs: crate::coordinator::jobs::Jobs,
    /// Call metrics, and the metrics listener's address once bound.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Opens the store, runs migrations and loads (or creates) the identity: what
/// `serve` and `init` both need before anything else.
pub async fn prepare(config: &Config) -> anyhow::Result<Shared> {
    crate::config::create_data_dir(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let store = Store::open(&config.database_url, &config.storage)
        .await
        .with_context(|| {
            format!(
                "cannot open the database at {}",
                crate::config::url_without_credentials(&config.database_url)
            )
        })?;
    // Replicas started together migrate and create the identity one at a
    // time; the others then find both done.
    let startup = Store::lock_for_startup(&config.database_url, STARTUP_PATIENCE)
        .await
        .context("cannot take the database's start-up lock")?;
    store
        .run_migrations()
        .await
        .context("cannot run database migrations")?;
    let mut identity = IdentityManager::load_or_create(
        store.clone(),
        &config.master_key_source(),
        &config.instance,
    )
    .await
    .context("cannot load the instance identity")?;
    drop(startup);
    identity.enable_ca_mode_if_configured(&config.tls, &config.instance)?;
    let agents = AgentRuntime::new(store.clone(), config.agents.clone(), &config.data_dir)
        .context("cannot prepare the agent runtime's directory")?;
    let rate_limiter = RateLimiter::new(config.rate_limit.clone(), config.redis_url.as_deref())
        .context("cannot configure rate limiting")?;
    let identity = Arc::new(identity);
    // Agents another replica supervises are killed and watched there.
    agents.route_elsewhere_through(Arc::new(crate::replicas::routing::Router::new(
        store.clone(),
        Arc::clone(&identity),
    )));
    let federation = Arc::new(
        crate::federation::Federation::new(
            store.clone(),
            Arc::clone(&identity),
            config.federation.clone(),
            config.max_message_bytes,
        )
        .with_peer_cache(config.auth_cache),
    );
    let coordinator = crate::coordinator::CoordinatorState::default();
    let jobs =
        crate::coordinator::jobs::Jobs::new(store.clone(), &coordinator, &config.coordinator);
    let shared = Shared {
        store,
        identity,
        config: Arc::new(config.clone()),
        federation,
        agents: Arc::new(agents),
        rate_limiter: Arc::new(rate_limiter),
        coordinator,
        jobs,
        metrics: Arc::new(crate::metrics::Metrics::default()),
    };
    write_certificate(&shared)?;
    Ok(shared)
}

/// Writes the current (public) certificate into the data dir, where local client
/// commands and tools such as `grpcurl -cacert` find it.
pub fn write_certificate(shared: &Shared) -> anyhow::Result<()> {
    let path = shared.config.certificate_path();
    crate::identity::certificate::write_pem_file(
        &path,
        &shared.identity.current().certificate().pem,
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs the daemon on `listener` until `shutdown` completes, then drains in-flight
/// calls for up to the configured grace period.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    crate::tls::install_default_provider();
    let shared = prepare(&config).await?;
    serve(listener, shared, shutdown).await
}

/// Serves already-prepared state on `listener`.
pub async fn serve(
    listener: TcpListener,
    shared: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // SQLite is one daemon's database: a second server of the file stops
    // here, before it touches any agent.
    let _serving = shared
        .store
        .lock_for_serving()
        .context("cannot serve this database")?;
    let config = Arc::clone(&shared.config);
    let max_message_bytes = config.max_message_bytes;
    // Before serving: no agent left unfinished by a previous run may be shown
    // RUNNING by this one.
    shared
        .agents
        .reconcile()
        .await
        .context("cannot settle the agents of the previous run")?;
    // Jobs whose agents ended while the daemon was down end now.
    crate::coordinator::dispatch::resume_following(&shared.jobs, &shared.agents)
        .await
        .context("cannot follow the agents of running jobs")?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Every service SERVING now, then in step with the database.
    let database_health =
        AbortOnDrop(crate::health::follow_database(shared.store.clone(), health_reporter).await);
    // The error details (`google.rpc.RetryInfo`, `QuotaFailure`,
    // `ErrorInfo`, ...) are described too, so grpcurl decodes them.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("cannot build the reflection service")?;

    // Jobs run by peers' agents: built once for the handlers and the
    // follow-up of this process alike.
    let remote_dispatch = RemoteDispatch::new(
        Arc::clone(&shared.federation),
        shared.store.clone(),
        &config,
        shared.coordinator.followers(),
    );
    let authenticator = Arc::new(Authenticator::new(shared.store.clone(), config.auth_cache));
    let _pruning = shared.rate_limiter.spawn_maintenance();
    let _metrics_endpoint = start_metrics_endpoint(&shared).await?;
    let router = Server::builder()
        .layer(crate::front_door::FrontDoorLayer::new(
            Arc::clone(&shared.rate_limiter),
            authenticator,
            Arc::clone(&shared.metrics),
            config.access_log,
        ))
        // A request over max_message_bytes is RESOURCE_EXHAUSTED, not tonic's
        // OUT_OF_RANGE (inside the front door, which logs and counts it).
        .layer(tower::util::MapResponseLayer::new(
            crate::error::size_limit_response::<tonic::body::Body>,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            FederationServer::new(FederationService::new(
                Arc::clone(&shared.federation),
                Arc::clone(&shared.agents),
                Arc::clone(&shared.rate_limiter),
                Rotation {
                    default_grace: config.rotation_grace,
                    certificate_path: config.certificate_path(),
                },
            ))
            .max_decoding_message_size(max_message_bytes),
        )
        .add_service(
            AgentControlServer::new(AgentControlService::new(Arc::clone(&shared.agents)))
                .max_decoding_message_size(max_message_bytes),
        )
        .add_service(
            CoordinatorServer::new(CoordinatorService::new(
                shared.jobs.clone(),
                Arc::clone(&shared.agents),
                remote_dispatch.clone(),
                HealthCheck::new(
                    shared.store.clone(),
                    Arc::clone(&shared.rate_limiter),
                    Arc::clone(&shared.agents),
                    &config,
                ),
                Arc::clone(&config),
            ))
            .max_decoding_message_size(max_message_bytes),
        )
        .add_service(ReplicaServer::new(ReplicaService::new(
            Arc::clone(&shared.agents),
            Arc::clone(&shared.identity),
        )));

    let local_address = listener.local_addr().context("listener has no address")?;
    // In the registry of replicas, with a lease this process renews.
    let scheme = if config.plaintext { "http" } else { "https" };
    let advertised = config
        .replicas
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local_address}"));
    if let Some(warning) = config.public_url_warning() {
        tracing::warn!(public_url = %config.instance.public_url, "{warning}");
    }
    if config.replicas.advertise_url.is_none() && local_address.ip().is_unspecified() {
        tracing::warn!(
            replica.address = %advertised,
            "listening on every address without replicas.advertise_url: other replicas of this instance cannot reach this one to kill or watch its agents; set replicas.advertise_url to an address they can dial"
        );
    }
    let registration = crate::replicas::registry::register(
        shared.store.clone(),
        shared.agents.runner_id(),
        &advertised,
        config.replicas.lease,
    )
    .await
    .context("cannot register this replica")?;
    let identity = shared.identity.current();
    tracing::info!(
        listen = %local_address,
        tls = !config.plaintext,
        tls.ca_mode = shared.identity.ca_trust().is_some(),
        instance.id = %identity.instance_id,
        fingerprint = %identity.public_key().fingerprint(),
        services = %crate::proto::SERVICE_NAMES.join(","),
        rate_limit.storage = ?config.rate_limit.storage,
        rate_limit.shadow = config.rate_limit.shadow,
        "serving with health and reflection (v1, v1alpha)"
    );
    // Everything before serving is done: a service manager may start what
    // depends on this daemon (connections wait in the listen backlog until
    // the server below accepts them).
    crate::notify::notify(&format!("READY=1\nSTATUS=serving on {}", config.listen)).await;

    let (stop_serving, stop_signal) = tokio::sync::oneshot::channel::<()>();
    let stop_signal = async {
        let _ = stop_signal.await;
    };
    let open_connections = shared.metrics.serving_thread_gauges(config.serving_threads);
    // Each serving thread runs a server of its own (a clone of this one) on
    // the connections handed to it.
    let mut threads = if config.plaintext {
        let serve = move |incoming, stop| router.serve_with_incoming_shutdown(incoming, stop);
        let handshake = |tcp: TcpStream, _remote| std::future::ready(Some(tcp));
        ServingThreads::start(listener, open_connections, handshake, serve, stop_signal)
    } else {
        let tls = crate::tls::server_config(Arc::clone(&shared.identity))
            .context("cannot configure TLS")?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let timeout = config.tls_handshake_timeout;
        let handshake = move |tcp, remote| tls_handshake(acceptor.clone(), tcp, remote, timeout);
        let serve = move |incoming, stop| router.serve_with_incoming_shutdown(incoming, stop);
        ServingThreads::start(listener, open_connections, handshake, serve, stop_signal)
    }
    .context("cannot start the serving threads")?;
    let serving = threads.finished();
    // Notice delivery, liveness pings and pruning run while the server does and
    // stop with it (the guard aborts the task when dropped).
    let _federation_background = shared.federation.start_background();
    // A replica that stops renewing its lease has its agents settled by
    // another.
    let _settling = AbortOnDrop(crate::replicas::settle::spawn(
        shared.store.clone(),
        shared.jobs.clone(),
        shared.agents.runner_id().to_owned(),
        config.replicas.lease,
    ));
    // Remote dispatches are followed by one replica at a time.
    let following = crate::coordinator::dispatch::following::spawn(
        shared.jobs.clone(),
        remote_dispatch,
        shared.federation.lease_holder().to_owned(),
    );
    let _retention = AbortOnDrop(crate::retention::spawn(
        shared.store.clone(),
        Arc::clone(&shared.agents),
        config.storage.clone(),
        shared.federation.lease_holder().to_owned(),
    ));
    // Job changes made through another replica reach this one's watchers.
    let _job_changes = crate::coordinator::events::follow_other_replicas(
        shared.store.clone(),
        shared.coordinator.events.clone(),
    )
    .map(AbortOnDrop);
    // A rotation made through another replica is taken up here too.
    let _rotations = crate::replicas::identity::follow_rotations(
        shared.store.clone(),
        Arc::clone(&shared.identity),
        {
            let shared = shared.clone();
            move || {
                if let Err(error) = write_certificate(&shared) {
                    tracing::warn!(error = %format!("{error:#}"), "cannot write the new certificate file");
                }
            }
        },
    )
    .map(AbortOnDrop);
    // Agents and job watchers are told as soon as shutdown begins, so watch
    // streams end instead of holding the drain open until the grace ends.
    let agents = Arc::clone(&shared.agents);
    let coordinator = shared.coordinator.clone();
    // A replica whose lease another replica took over (it was paused or cut
    // off past its lease, and its agents were settled there) stops as if
    // told to, and exits with an error so that its supervisor restarts it.
    let mut lost = registration.lost();
    let shutdown = async move {
        let taken_over = async move {
            // The guard `wait_for` returns is not `Send`; only the outcome
            // is kept.
            if lost.wait_for(|lost| *lost).await.is_ok() {
                tracing::error!("another replica took this replica's lease over; stopping");
            } else {
                // The heartbeat ended without a loss (it stops only with the
                // server): nothing to wait for.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = shutdown => {}
            () = taken_over => {}
        }
        agents.begin_shutdown();
        coordinator.begin_shutdown();
    };
    let drained = drain_on_shutdown(serving, shutdown, stop_serving, config.shutdown_grace).await;
    drop(database_health);
    // Another replica follows the remote dispatches from now on.
    following.stop().await;
    // The log entries of sent reads answered during the drain are written
    // behind their answers; they are committed before the daemon stops.
    shared.federation.flush_command_log().await;
    shared.agents.shutdown().await;
    let was_lost = *registration.lost().borrow();
    // Stopped cleanly: nobody waits for this replica's lease to run out.
    registration.stop().await;
    // Last: what calls spawned on the serving threads ran until now.
    threads.exit().await;
    if was_lost {
        anyhow::bail!(
            "another replica took this replica's lease over while it did not renew it, and settled its agents; start it again to rejoin"
        );
    }
    drained
}

/// Binds and serves `/metrics` if `metrics_listen` is set.
async fn start_metrics_endpoint(shared: &Shared) -> anyhow::Result<Option<AbortOnDrop>> {
    let Some(address) = shared.config.metrics_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address}"))?;
    let bound = listener
        .local_addr()
        .context("metrics listener has no address")?;
    shared.metrics.set_local_address(bound);
    tracing::info!(metrics.listen = %bound, "serving Prometheus metrics at /metrics");
    let sources = crate::metrics::endpoint::MetricsSources {
        metrics: Arc::clone(&shared.metrics),
        rate_limiter: Arc::clone(&shared.rate_limiter),
        store: shared.store.clone(),
        federation: Arc::clone(&shared.federation),
    };
    Ok(Some(AbortOnDrop(tokio::spawn(
        crate::metrics::endpoint::serve_metrics(listener, sources),
    ))))
}

/// Runs `serving`; when `shutdown` fires, stops accepting and gives in-flight calls
/// `grace` to finish.
async fn drain_on_shutdown(
    serving: impl Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: impl Future<Output = ()>,
    stop_serving: tokio::sync::oneshot::Sender<()>,
    grace: Duration,
) -> anyhow::Result<()> {
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result.context("the server stopped"),
        () = shutdown => {}
    }
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining in-flight calls"
    );
    let _ = stop_serving.send(());
    match tokio::time::timeout(grace, serving).await {
        Ok(result) => result.context("the server stopped")?,
        Err(_) => tracing::warn!("calls still in flight after the grace period were dropped"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// A client's TLS handshake on `tcp`, within `timeout`; `None` (logged at
/// debug) if it fails or takes longer.
async fn tls_handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::debug!(client.address = %remote, %error, "tls handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(client.address = %remote, "tls handshake timed out");
            None
        }
    }
}
