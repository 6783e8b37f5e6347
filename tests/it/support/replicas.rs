//! Replicas of one instance as real `mosaicd serve` processes: one
//! PostgreSQL database, one master key, a data dir each, and a TCP
//! pass-through balancer in front, as the README's "Several replicas"
//! section tells operators to run them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use mosaic_mesh::auth::Scope;
use mosaic_mesh::identity::MasterKey;
use mosaic_mesh::proto::federation::federation_client::FederationClient;
use mosaic_mesh::store::testing::TestDatabase;
use tokio::process::Child;

use crate::support::admin::Admin;
use crate::support::balancer::Balancer;
use crate::support::binary::{channel_to, mosaicd, spawn_serve_command};

/// Rate limits out of the tests' reach (production allows 100 calls a
/// minute per caller).
const GENEROUS_LIMITS: &str = "[rate_limit]
global_limit = 1000000
webhook_limit = 1000000
coordinator_limit = 1000000
health_limit = 1000000
federation_limit = 1000000
";

/// Replicas of one instance behind a balancer.
pub struct Replicas {
    /// The instance's database (empty until the first replica starts).
    pub database: TestDatabase,
    /// What clients and peers dial.
    pub balancer: Balancer,
    master_key: String,
    data_dirs: Vec<tempfile::TempDir>,
    children: Vec<Option<Child>>,
    addresses: Vec<String>,
    extra_toml: String,
}

impl Replicas {
    /// Starts `count` replicas at the same instant on a new, empty
    /// PostgreSQL database, each with `extra_toml` in its configuration.
    /// Panics if one of them does not come up.
    pub async fn start(count: usize, extra_toml: &str) -> Replicas {
        let database = TestDatabase::postgres()
            .await
            .expect("create a PostgreSQL test database (is MOSAIC_TEST_DATABASE_URL reachable?)");
        // The balancer's address is every replica's public URL; its backends
        // are filled in once the replicas listen.
        let placeholder: SocketAddr = "127.0.0.1:9".parse().expect("address");
        let balancer = Balancer::start(vec![placeholder; count]).await;
        let mut replicas = Replicas {
            database,
            balancer,
            master_key: MasterKey::generate()
                .expect("master key")
                .to_base64()
                .to_string(),
            data_dirs: (0..count)
                .map(|_| tempfile::tempdir().expect("data dir"))
                .collect(),
            children: (0..count).map(|_| None).collect(),
            addresses: vec![String::new(); count],
            extra_toml: extra_toml.to_owned(),
        };
        let commands: Vec<Command> = (0..count).map(|index| replicas.command(index)).collect();
        let started =
            futures::future::join_all(commands.into_iter().map(spawn_serve_command)).await;
        for (index, (child, address)) in started.into_iter().enumerate() {
            replicas.serving(index, child, address);
        }
        replicas
    }

    /// `count` replicas with the test agent types (`agents_toml` added to
    /// their `[agents]` section) and a lease of `lease_secs`, a store on
    /// their database and an API key with `scopes`.
    pub async fn with_agents(
        count: usize,
        lease_secs: u64,
        agents_toml: &str,
        scopes: &[Scope],
    ) -> (Replicas, mosaic_mesh::store::Store, String) {
        let agents = crate::support::agents::AGENT_TYPES_TOML
            .replace("[agents]\n", &format!("[agents]\n{agents_toml}"));
        let replicas = Replicas::start(
            count,
            &format!("[replicas]\nlease_secs = {lease_secs}\n{agents}"),
        )
        .await;
        let store = mosaic_mesh::store::Store::connect(&replicas.database.url)
            .await
            .expect("connect");
        let key = mosaic_mesh::auth::create_api_key(&store, "test", scopes)
            .await
            .expect("create an API key")
            .secret
            .to_string();
        (replicas, store, key)
    }

    /// A `mosaicd` command for replica `index`: its data dir and config, the
    /// instance's database and master key.
    pub fn command(&self, index: usize) -> Command {
        let data_dir = self.data_dirs[index].path();
        let config = data_dir.join("mosaic.toml");
        std::fs::write(
            &config,
            format!(
                "database_url = \"{}\"\n\n[instance]\nname = \"replicated\"\npublic_url = \"{}\"\n\n{GENEROUS_LIMITS}\n{}",
                self.database.url,
                self.balancer.url(),
                self.extra_toml
            ),
        )
        .expect("write the replica's config");
        let mut command = mosaicd(data_dir);
        command
            .arg("--config")
            .arg(&config)
            .env("MOSAIC_MASTER_KEY", &self.master_key);
        command
    }

    fn serving(&mut self, index: usize, child: Child, address: String) {
        self.balancer
            .replace(index, address.parse().expect("replica address"));
        self.children[index] = Some(child);
        self.addresses[index] = address;
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.data_dirs.len()
    }

    /// Replica `index`'s own address (not through the balancer).
    pub fn address(&self, index: usize) -> &str {
        &self.addresses[index]
    }

    /// Replica `index`'s data dir.
    pub fn data_dir(&self, index: usize) -> &Path {
        self.data_dirs[index].path()
    }

    /// The certificate replica `index` wrote for local clients.
    pub fn certificate_pem(&self, index: usize) -> String {
        std::fs::read_to_string(mosaic_mesh::config::certificate_path(self.data_dir(index)))
            .expect("the replica's certificate")
    }

    /// A TLS channel straight to replica `index`, pinning the key of the
    /// certificate it wrote.
    pub async fn channel(&self, index: usize) -> tonic::transport::Channel {
        channel_to(self.address(index), self.data_dir(index)).await
    }

    /// An operator of replica `index` (straight to it), with an admin API
    /// key made in the instance's database.
    pub async fn admin(&self, index: usize) -> Admin {
        let store = mosaic_mesh::store::Store::connect(&self.database.url)
            .await
            .expect("connect to the instance's database");
        let created = mosaic_mesh::auth::create_api_key(&store, "test admin", &[Scope::Admin])
            .await
            .expect("create an API key");
        Admin {
            client: FederationClient::new(self.channel(index).await),
            key: created.secret.to_string(),
        }
    }

    /// Stops replica `index` with SIGKILL and waits for it to be gone.
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.children[index].take() {
            child.kill().await.expect("kill the replica");
        }
    }

    /// Stops replica `index` with SIGTERM (a clean stop) and waits for it to
    /// exit.
    pub async fn terminate(&mut self, index: usize) {
        if self.children[index].is_some() {
            self.signal(index, rustix::process::Signal::TERM);
            let status = self.exited(index, std::time::Duration::from_secs(30)).await;
            assert!(status.success(), "the replica exited with {status}");
        }
    }

    /// Sends `signal` to replica `index`'s process.
    pub fn signal(&self, index: usize, signal: rustix::process::Signal) {
        let child = self.children[index].as_ref().expect("the replica runs");
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw)
            .expect("the replica's pid");
        rustix::process::kill_process(pid, signal).expect("signal the replica");
    }

    /// Waits (at most `within`) for replica `index` to exit by itself, and
    /// returns how it did.
    pub async fn exited(
        &mut self,
        index: usize,
        within: std::time::Duration,
    ) -> std::process::ExitStatus {
        let mut child = self.children[index].take().expect("the replica runs");
        tokio::time::timeout(within, child.wait())
            .await
            .unwrap_or_else(|_| panic!("replica {index} did not exit within {within:?}"))
            .expect("wait for the replica")
    }

    /// Starts replica `index` again (after `kill`) and points the balancer
    /// at its new address.
    pub async fn restart(&mut self, index: usize) {
        self.kill(index).await;
        let (child, address) = spawn_serve_command(self.command(index)).await;
        self.serving(index, child, address);
    }

    /// Stops every replica and drops the database.
    pub async fn cleanup(mut self) {
        for index in 0..self.len() {
            self.kill(index).await;
        }
        self.database
            .cleanup()
            .await
            .expect("drop the test database");
    }
}
