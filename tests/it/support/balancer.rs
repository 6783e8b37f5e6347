//! A TCP pass-through (layer 4) balancer for replica tests: what an operator
//! puts in front of several replicas of one instance. It never touches TLS;
//! each new connection goes to the next backend in turn, or to the one the
//! test pinned.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Where new connections go.
#[derive(Default)]
struct Routing {
    backends: Vec<SocketAddr>,
    /// `Some(index)`: every new connection to that backend.
    pinned: Option<usize>,
    /// Connections handed to each backend so far.
    handed: Vec<usize>,
}

/// A running balancer. Dropping it stops it and cuts its connections.
pub struct Balancer {
    /// The address clients dial.
    pub address: SocketAddr,
    routing: Arc<Mutex<Routing>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// Starts a balancer on a free loopback port in front of `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the balancer");
        let address = listener.local_addr().expect("balancer address");
        let routing = Arc::new(Mutex::new(Routing {
            handed: vec![0; backends.len()],
            backends,
            pinned: None,
        }));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let next = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&routing),
            Arc::clone(&tasks),
            next,
        ));
        Balancer {
            address,
            routing,
            tasks,
            accept,
        }
    }

    /// The `https://` URL of the balancer, what `instance.public_url` names.
    pub fn url(&self) -> String {
        format!("https://{}", self.address)
    }

    /// Sends every new connection to backend `index` (`None`: round robin
    /// again). Open connections stay where they are.
    pub fn pin(&self, index: Option<usize>) {
        self.routing.lock().expect("routing").pinned = index;
    }

    /// Replaces backend `index` (a replica restarted on a new port).
    pub fn replace(&self, index: usize, backend: SocketAddr) {
        self.routing.lock().expect("routing").backends[index] = backend;
    }

    /// Cuts every open connection, as a balancer reloaded or a network cut
    /// would: clients connect again, to whichever backend is next.
    pub fn cut(&self) {
        self.tasks.lock().expect("tasks").abort_all();
    }

    /// How many connections each backend has been handed so far.
    pub fn handed(&self) -> Vec<usize> {
        self.routing.lock().expect("routing").handed.clone()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
        self.tasks.lock().expect("tasks").abort_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    routing: Arc<Mutex<Routing>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    next: Arc<AtomicUsize>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let backend = {
            let mut routing = routing.lock().expect("routing");
            let count = routing.backends.len();
            let index = routing
                .pinned
                .unwrap_or_else(|| next.fetch_add(1, Ordering::Relaxed) % count);
            routing.handed[index] += 1;
            routing.backends[index]
        };
        tasks.lock().expect("tasks").spawn(forward(client, backend));
    }
}

/// Copies bytes both ways until either side closes; a backend that refuses
/// closes the client's connection, as a real balancer with no healthy
/// backend would.
async fn forward(mut client: TcpStream, backend: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
