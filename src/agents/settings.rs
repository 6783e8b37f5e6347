//! `[agents]` and `[agents.types.NAME]`: the agent runtime's settings as
//! written in the file, and as resolved and checked.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::error::ConfigError;

/// `[agents]` in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsFileConfig {
    /// Agents that may run at once (default 16).
    pub max_concurrent: Option<usize>,
    /// Seconds between SIGTERM and SIGKILL when stopping an agent (default 10).
    pub kill_grace_secs: Option<u64>,
    /// Bytes of output kept on disk per agent (default 8 MiB).
    pub output_cap_bytes: Option<u64>,
    /// Lines of output kept with the agent record (default 50).
    pub tail_lines: Option<usize>,
    /// Largest accepted prompt in bytes (default 256 KiB).
    pub max_prompt_bytes: Option<usize>,
    /// `[agents.types.NAME]`: the agent types that may be spawned.
    #[serde(default)]
    pub types: BTreeMap<String, AgentTypeFileConfig>,
}

/// `[agents.types.NAME]` in the file.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTypeFileConfig {
    /// Program and arguments; `{prompt}`, `{task_id}`, `{agent_id}` and
    /// `{workdir}` are replaced when they are a whole argument. Required.
    pub command: Vec<String>,
    /// Default and largest timeout in seconds (default 3600).
    pub timeout_secs: Option<u64>,
    /// Extra environment variables for the agent process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl std::fmt::Debug for AgentTypeFileConfig {
    /// Shows the names of the environment variables, never their values
    /// (they often hold API tokens).
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AgentTypeFileConfig")
            .field("command", &self.command)
            .field("timeout_secs", &self.timeout_secs)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The agent runtime's settings, resolved.
#[derive(Debug, Clone)]
pub struct AgentsConfig {
    /// Agents that may run at once; a spawn beyond it is refused (default 16).
    pub max_concurrent: usize,
    /// Time between SIGTERM and SIGKILL when an agent is stopped (default 10 s).
    pub kill_grace: Duration,
    /// Bytes of output kept on disk per agent; the rest is counted, not kept
    /// (default 8 MiB).
    pub output_cap_bytes: u64,
    /// Lines of output kept with the agent record (default 50).
    pub tail_lines: usize,
    /// Largest accepted prompt (default 256 KiB).
    pub max_prompt_bytes: usize,
    /// The agent types by name; none unless configured.
    pub types: BTreeMap<String, AgentType>,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            kill_grace: Duration::from_secs(10),
            output_cap_bytes: 8 * 1024 * 1024,
            tail_lines: 50,
            max_prompt_bytes: 256 * 1024,
            types: BTreeMap::new(),
        }
    }
}

/// One agent type: the command it runs, its timeout and its environment.
#[derive(Clone)]
pub struct AgentType {
    /// Program and arguments with whole-argument placeholders.
    pub command: Vec<String>,
    /// The default timeout, and the largest a spawn may ask for (default 1 h).
    pub timeout: Duration,
    /// Extra environment variables (values may be secrets: never logged).
    pub env: BTreeMap<String, String>,
}

impl AgentType {
    /// A type running `command` with the default timeout and no extra
    /// environment.
    pub fn new(command: &[&str]) -> Self {
        Self {
            command: command.iter().map(|part| (*part).to_owned()).collect(),
            timeout: Duration::from_secs(DEFAULT_AGENT_TIMEOUT_SECS),
            env: BTreeMap::new(),
        }
    }
}

impl std::fmt::Debug for AgentType {
    /// Environment values are left out: they often hold API tokens.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AgentType")
            .field("command", &self.command)
            .field("timeout", &self.timeout)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// An agent type's timeout when its `timeout_secs` is not set: one hour.
pub const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 60 * 60;

/// Resolves and checks `[agents]`.
pub(crate) fn resolve(
    file: AgentsFileConfig,
    max_message_bytes: usize,
) -> Result<AgentsConfig, ConfigError> {
    let defaults = AgentsConfig::default();
    let max_concurrent = file.max_concurrent.unwrap_or(defaults.max_concurrent);
    if !(1..=10_000).contains(&max_concurrent) {
        return Err(crate::config::error::invalid(
            "agents.max_concurrent",
            "must be between 1 and 10000".into(),
        ));
    }
    let kill_grace = file
        .kill_grace_secs
        .map_or(defaults.kill_grace, Duration::from_secs);
    if kill_grace > Duration::from_secs(600) {
        return Err(crate::config::error::invalid(
            "agents.kill_grace_secs",
            "must be at most 600".into(),
        ));
    }
    let output_cap_bytes = file.output_cap_bytes.unwrap_or(defaults.output_cap_bytes);
    if output_cap_bytes < 1024 {
        return Err(crate::config::error::invalid(
            "agents.output_cap_bytes",
            "must be at least 1024".into(),
        ));
    }
    let tail_lines = file.tail_lines.unwrap_or(defaults.tail_lines);
    if !(1..=1000).contains(&tail_lines) {
        return Err(crate::config::error::invalid(
            "agents.tail_lines",
            "must be between 1 and 1000".into(),
        ));
    }
    let max_prompt_bytes = file.max_prompt_bytes.unwrap_or(defaults.max_prompt_bytes);
    if max_prompt_bytes == 0 || max_prompt_bytes > max_message_bytes {
        return Err(crate::config::error::invalid(
            "agents.max_prompt_bytes",
            format!("must be between 1 and server.max_message_bytes ({max_message_bytes})"),
        ));
    }
    let mut types = BTreeMap::new();
    for (name, agent_type) in file.types {
        crate::agents::command::check_type_name(&name)
            .map_err(|message| crate::config::error::invalid("agents.types", message))?;
        crate::agents::command::check_template(&agent_type.command).map_err(|message| {
            crate::config::error::invalid(
                "agents.types.NAME.command",
                format!("[agents.types.{name}] {message}"),
            )
        })?;
        let timeout_secs = agent_type
            .timeout_secs
            .unwrap_or(DEFAULT_AGENT_TIMEOUT_SECS);
        if !(1..=u64::from(u32::MAX)).contains(&timeout_secs) {
            return Err(crate::config::error::invalid(
                "agents.types.NAME.timeout_secs",
                format!("[agents.types.{name}] must be at least 1"),
            ));
        }
        if let Some(bad) = agent_type
            .env
            .keys()
            .find(|key| key.is_empty() || key.contains(['=', '\0']))
        {
            return Err(crate::config::error::invalid(
                "agents.types.NAME.env",
                format!("[agents.types.{name}] {bad:?} is not an environment variable name"),
            ));
        }
        if agent_type.env.values().any(|value| value.contains('\0')) {
            return Err(crate::config::error::invalid(
                "agents.types.NAME.env",
                format!("[agents.types.{name}] a value contains a NUL byte"),
            ));
        }
        types.insert(
            name,
            AgentType {
                command: agent_type.command,
                timeout: Duration::from_secs(timeout_secs),
                env: agent_type.env,
            },
        );
    }
    Ok(AgentsConfig {
        max_concurrent,
        kill_grace,
        output_cap_bytes,
        tail_lines,
        max_prompt_bytes,
        types,
    })
}
