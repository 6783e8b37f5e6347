//! Agent test support: a configuration with agent types, an AgentControl client
//! that sends its API key, polling with a deadline, process checks, and a data
//! dir set up for daemons run as the `mosaicd` binary.

use std::time::Duration;

use mosaic_mesh::config::{AgentType, Config};
use mosaic_mesh::proto::agent as pb;
use tonic::transport::Channel;

use crate::support::binary::mosaicd;
use crate::support::daemon::{TestDaemon, TestEnvironment, with_key};

/// How long a test waits for an agent to reach a state.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(20);

/// The agent types tests use, as a TOML `[agents]` section (for daemons run as
/// a separate process) — the same as [`with_agent_types`].
pub const AGENT_TYPES_TOML: &str = r#"
[agents]
kill_grace_secs = 1
max_prompt_bytes = 4096
[agents.types.sh]
command = ["/bin/sh", "-c", "{prompt}"]
timeout_secs = 600
[agents.types.printf]
command = ["/usr/bin/printf", "[%s]\n", "{prompt}"]
[agents.types.true]
command = ["true"]
"#;

/// `config` with the test agent types: `sh` (`/bin/sh -c {prompt}`, at most
/// 600 s), `printf` (`printf '[%s]\n' {prompt}`) and `true`; a 1 s kill grace
/// period and 4 KiB prompts.
pub fn with_agent_types(mut config: Config) -> Config {
    let mut sh = AgentType::new(&["/bin/sh", "-c", "{prompt}"]);
    sh.timeout = Duration::from_secs(600);
    config.agents.types.insert("sh".to_owned(), sh);
    config.agents.types.insert(
        "printf".to_owned(),
        AgentType::new(&["/usr/bin/printf", "[%s]\n", "{prompt}"]),
    );
    config
        .agents
        .types
        .insert("true".to_owned(), AgentType::new(&["true"]));
    config.agents.kill_grace = Duration::from_secs(1);
    config.agents.max_prompt_bytes = 4096;
    config
}

/// The environment's default test configuration with the test agent types.
pub fn agent_config(environment: &TestEnvironment) -> Config {
    with_agent_types(environment.config())
}

/// An AgentControl client that sends an API key with every call.
pub struct Agents {
    /// The generated client.
    pub client: pb::agent_control_client::AgentControlClient<Channel>,
    /// The API key (scope `agents`).
    pub key: String,
}

impl Agents {
    /// A client over `channel` sending `key`.
    pub fn new(channel: Channel, key: String) -> Self {
        Self {
            client: pb::agent_control_client::AgentControlClient::new(channel),
            key,
        }
    }

    /// Spawns `prompt` on `agent_type`.
    pub async fn spawn(
        &mut self,
        agent_type: &str,
        prompt: &str,
    ) -> Result<pb::Agent, tonic::Status> {
        self.spawn_request(pb::SpawnRequest {
            agent_type: agent_type.to_owned(),
            prompt: prompt.to_owned(),
            ..pb::SpawnRequest::default()
        })
        .await
    }

    /// Sends a spawn request.
    pub async fn spawn_request(
        &mut self,
        request: pb::SpawnRequest,
    ) -> Result<pb::Agent, tonic::Status> {
        let response = self.client.spawn(with_key(request, &self.key)).await?;
        Ok(response.into_inner().agent.expect("agent"))
    }

    /// GetAgent.
    pub async fn get(&mut self, agent_id: &str) -> Result<pb::Agent, tonic::Status> {
        let request = pb::GetAgentRequest {
            agent_id: agent_id.to_owned(),
        };
        let response = self.client.get_agent(with_key(request, &self.key)).await?;
        Ok(response.into_inner().agent.expect("agent"))
    }

    /// KillAgent.
    pub async fn kill(&mut self, agent_id: &str, reason: &str) -> Result<pb::Agent, tonic::Status> {
        let request = pb::KillAgentRequest {
            agent_id: agent_id.to_owned(),
            reason: reason.to_owned(),
        };
        let response = self.client.kill_agent(with_key(request, &self.key)).await?;
        Ok(response.into_inner().agent.expect("agent"))
    }

    /// ListAgents.
    pub async fn list(
        &mut self,
        request: pb::ListAgentsRequest,
    ) -> Result<pb::ListAgentsResponse, tonic::Status> {
        let response = self
            .client
            .list_agents(with_key(request, &self.key))
            .await?;
        Ok(response.into_inner())
    }

    /// Polls the agent until `done` holds, failing the test after
    /// [`AGENT_DEADLINE`] with what it was waiting for.
    pub async fn wait_until(
        &mut self,
        agent_id: &str,
        what: &str,
        done: impl Fn(&pb::Agent) -> bool,
    ) -> pb::Agent {
        let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
        loop {
            let agent = self.get(agent_id).await.expect("get agent");
            if done(&agent) {
                return agent;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {agent_id} never became {what}: {agent:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the agent until it is in `state`.
    pub async fn wait_for_state(&mut self, agent_id: &str, state: pb::AgentState) -> pb::Agent {
        self.wait_until(agent_id, state.as_str_name(), |agent| {
            agent.state == state as i32
        })
        .await
    }
}

/// True while process `pid` exists and is not a zombie.
pub fn process_is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next())
        .unwrap_or("");
    !matches!(state, "Z" | "X")
}

/// Waits until process `pid` is gone (or a zombie), up to [`AGENT_DEADLINE`].
pub async fn wait_until_dead(pid: u32) {
    let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
    while process_is_alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The number after `name=` in the agent's output tail, e.g. a pid the agent
/// printed as `child=1234`.
pub fn number_in_tail(agent: &pb::Agent, name: &str) -> Option<u32> {
    let prefix = format!("{name}=");
    agent
        .output_tail
        .iter()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
}

/// A daemon with the test agent types (and `adjust` applied) and a client
/// with an API key of scope `agents`.
pub async fn start_agents(
    environment: &TestEnvironment,
    adjust: impl FnOnce(&mut Config),
) -> (TestDaemon, Agents) {
    let mut config = agent_config(environment);
    adjust(&mut config);
    let daemon = environment.start_with(config).await.expect("daemon starts");
    let key = daemon.api_key(&[mosaic_mesh::auth::Scope::Agents]).await;
    let agents = Agents::new(daemon.channel().await, key);
    (daemon, agents)
}

/// A data dir with the test agent types in a config file, and an API key
/// with the `agents` scope, for daemons run as the `mosaicd` binary.
pub struct BinarySetup {
    /// The data dir (shared with the environment).
    pub data_dir: std::path::PathBuf,
    /// The config file with the test agent types.
    pub config_file: std::path::PathBuf,
    /// The environment's database.
    pub database_url: String,
    /// An API key with the `agents` scope.
    pub key: String,
}

impl BinarySetup {
    pub fn new(environment: &TestEnvironment) -> BinarySetup {
        let data_dir = environment.data_dir.path().to_path_buf();
        let config_file = data_dir.join("mosaic.toml");
        std::fs::write(&config_file, AGENT_TYPES_TOML).expect("write config");
        let mut setup = BinarySetup {
            data_dir,
            config_file,
            database_url: environment.database.url.clone(),
            key: String::new(),
        };
        let created = setup
            .command()
            .args([
                "apikey", "create", "--name", "t", "--scope", "agents", "--json",
            ])
            .output()
            .expect("apikey create");
        assert!(created.status.success(), "{created:?}");
        let created: serde_json::Value = serde_json::from_slice(&created.stdout).expect("json");
        setup.key = created["key"].as_str().expect("key").to_owned();
        setup
    }

    /// `mosaicd` with this data dir, config file and database.
    pub fn command(&self) -> std::process::Command {
        let mut command = mosaicd(&self.data_dir);
        command
            .arg("--config")
            .arg(&self.config_file)
            .arg("--database-url")
            .arg(&self.database_url);
        command
    }

    /// A client command (`agent ...`) for the daemon at `address`.
    pub fn client(&self, address: &str) -> std::process::Command {
        let mut command = self.command();
        command
            .args(["--server", &format!("https://{address}")])
            .env("MOSAIC_API_KEY", &self.key);
        command
    }
}
