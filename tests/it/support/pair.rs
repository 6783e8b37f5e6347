//! The one two-daemon fixture: daemons A and B (each `start_peer`ed in its own
//! environment), an operator for each, their instance ids, and optionally A
//! connected to B in workspace `ws`. Either daemon can be stopped and started
//! again on its port, with its configuration, where its peer expects it.

use mosaic_mesh::config::Config;

use super::Backend;
use super::admin::{Admin, connect_and_accept_at};
use super::agents::with_agent_types;
use super::daemon::{TestDaemon, TestEnvironment};

/// Every capability a peer may grant (`agent.status` covers listing).
pub(crate) const ALL: &[&str] = &["agent.spawn", "agent.status", "agent.kill"];

/// What a daemon changes in `start_peer`'s configuration; kept to restart it
/// the same way. A closure that captures nothing will do.
pub(crate) type Configure = fn(&mut Config);

/// A [`Configure`] that adds the test agent types.
pub(crate) fn with_test_agents(config: &mut Config) {
    *config = with_agent_types(config.clone());
}

/// Daemons A and B and their operators. Index 0 is A, 1 is B.
pub(crate) struct Pair {
    /// A's and B's data dirs and databases.
    pub(crate) environments: [TestEnvironment; 2],
    /// A's operator: an admin key and a Federation client.
    pub(crate) admin_a: Admin,
    /// B's operator: an admin key and a Federation client.
    pub(crate) admin_b: Admin,
    pub(crate) a_id: String,
    pub(crate) b_id: String,
    /// The running daemons; `None` while stopped.
    daemons: [Option<TestDaemon>; 2],
    /// The ports they listen on, for restarts.
    ports: [u16; 2],
    configure: [Configure; 2],
    /// The `ws` connection's ids on A and on B, once `connected`.
    connection: Option<(String, String)>,
}

impl Pair {
    /// A and B running, each configured by its function, not connected.
    pub(crate) async fn start(
        backend: Backend,
        configure_a: Configure,
        configure_b: Configure,
    ) -> Pair {
        let environments = [
            TestEnvironment::new(backend).await,
            TestEnvironment::new(backend).await,
        ];
        let a = environments[0].start_peer(0, configure_a).await;
        let b = environments[1].start_peer(0, configure_b).await;
        let (admin_a, admin_b) = (Admin::of(&a).await, Admin::of(&b).await);
        let a_id = admin_a.instance().await.instance_id;
        let b_id = admin_b.instance().await.instance_id;
        Pair {
            ports: [a.address.port(), b.address.port()],
            daemons: [Some(a), Some(b)],
            configure: [configure_a, configure_b],
            environments,
            admin_a,
            admin_b,
            a_id,
            b_id,
            connection: None,
        }
    }

    /// [`Pair::start`], then A connected to B in `ws`, B granting [`ALL`].
    pub(crate) async fn connected(
        backend: Backend,
        configure_a: Configure,
        configure_b: Configure,
    ) -> Pair {
        let mut pair = Pair::start(backend, configure_a, configure_b).await;
        pair.connection = Some(pair.connect("ws", ALL).await);
        pair
    }

    /// A connects to B in `workspace` and B accepts with `grants`; the
    /// connection's ids on A and on B once it is ACTIVE.
    pub(crate) async fn connect(&self, workspace: &str, grants: &[&str]) -> (String, String) {
        self.connect_via(&self.b().url(), workspace, grants).await
    }

    /// [`Pair::connect`] with A dialling B at `b_url` (a proxy in between).
    pub(crate) async fn connect_via(
        &self,
        b_url: &str,
        workspace: &str,
        grants: &[&str],
    ) -> (String, String) {
        connect_and_accept_at(&self.admin_a, &self.admin_b, b_url, workspace, grants).await
    }

    /// The `ws` connection's id on A (after [`Pair::connected`]).
    pub(crate) fn connection_on_a(&self) -> &str {
        &self.connection.as_ref().expect("connected").0
    }

    /// The `ws` connection's id on B (after [`Pair::connected`]).
    pub(crate) fn connection_on_b(&self) -> &str {
        &self.connection.as_ref().expect("connected").1
    }

    pub(crate) fn a(&self) -> &TestDaemon {
        self.daemons[0].as_ref().expect("A runs")
    }

    pub(crate) fn b(&self) -> &TestDaemon {
        self.daemons[1].as_ref().expect("B runs")
    }

    pub(crate) async fn stop_a(&mut self) {
        self.daemons[0].take().expect("A runs").stop().await;
    }

    pub(crate) async fn stop_b(&mut self) {
        self.daemons[1].take().expect("B runs").stop().await;
    }

    /// Starts A again on its port, configured as before.
    pub(crate) async fn start_a(&mut self) {
        self.restart(0).await;
    }

    /// Starts B again on its port, configured as before.
    pub(crate) async fn start_b(&mut self) {
        self.restart(1).await;
    }

    async fn restart(&mut self, index: usize) {
        assert!(self.daemons[index].is_none(), "daemon {index} is stopped");
        let daemon = self.environments[index]
            .start_peer(self.ports[index], self.configure[index])
            .await;
        self.daemons[index] = Some(daemon);
    }

    /// Stops the daemons still running (A first) and drops their databases.
    pub(crate) async fn finish(self) {
        for daemon in self.daemons.into_iter().flatten() {
            daemon.stop().await;
        }
        for environment in self.environments {
            environment.cleanup().await;
        }
    }
}
