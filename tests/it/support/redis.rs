//! Redis for tests: the shared CI Redis (`MOSAIC_TEST_REDIS_URL`, each test under
//! its own key prefix, deleted after), and private `redis-server` processes on a
//! free port that a test may pause, kill and restart.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Names the shared Redis the tests use.
pub const TEST_REDIS_URL_VARIABLE: &str = "MOSAIC_TEST_REDIS_URL";

/// The shared Redis [default: redis://127.0.0.1:6379].
pub fn shared_redis_url() -> String {
    std::env::var(TEST_REDIS_URL_VARIABLE)
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("mosaic:rl:test:{}:", uuid::Uuid::new_v4().simple())
}

/// A new connection to the Redis at `url`.
pub async fn connection(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// Keys under `prefix` on the Redis at `url`.
pub async fn keys_with_prefix(url: &str, prefix: &str) -> Vec<String> {
    let mut connection = connection(url).await.expect("connect to the test redis");
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .expect("KEYS")
}

/// Deletes every key under `prefix` on the Redis at `url`.
pub async fn delete_keys(url: &str, prefix: &str) {
    let keys = keys_with_prefix(url, prefix).await;
    if keys.is_empty() {
        return;
    }
    let mut connection = connection(url).await.expect("connect to the test redis");
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut connection)
        .await
        .expect("DEL");
}

/// A port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// A `redis-server` of our own, without persistence, killed when dropped.
pub struct PrivateRedis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one on a free port and waits until it answers PING.
    pub async fn start() -> PrivateRedis {
        let mut redis = PrivateRedis {
            port: free_port(),
            child: None,
        };
        redis.spawn().await;
        redis
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = connection(&self.url()).await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut connection).await;
                if pong.is_ok() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {} did not answer",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Freezes the server (SIGSTOP): connections open, nothing answers — a slow
    /// Redis as clients see it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running redis").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Kills the server (even a frozen one) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh, empty server on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
