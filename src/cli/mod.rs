//! The `mosaicd` command tree (clap). Offline commands work on the data dir or the
//! database directly; client commands talk gRPC to a running daemon.

pub mod agent;
pub mod apikey;
pub mod choices;
pub mod client;
pub mod config;
pub mod doctor;
pub mod environment;
pub mod exit;
pub mod federation;
pub mod help;
pub mod identity;
pub mod init;
pub mod job;
pub mod peer;
pub mod replicas;
pub mod serve;
pub mod times;

use clap::{Parser, Subcommand};

pub use self::client::ClientArgs;
pub use self::exit::CliError;
use crate::auth::Scope;
use crate::config::ConfigArgs;

/// What `mosaicd --version` prints after the name: the crate version, and the
/// platform and profile it was built for (a commit hash would need build.rs).
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} ({} {}, {} build)",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )
});

/// mosaicd: federate Mosaic instances; run agents and jobs.
#[derive(Debug, Parser)]
#[command(name = "mosaicd", version = VERSION.as_str(), about, max_term_width = 100)]
pub struct Cli {
    /// Configuration shared by every command.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// How client commands reach a daemon.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log filter (tracing `EnvFilter` syntax) [default: info].
    #[arg(long, env = "MOSAIC_LOG", global = true, value_name = "FILTER")]
    pub log: Option<String>,
    /// Log format.
    #[arg(long, env = "MOSAIC_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (creates the identity on first start).
    Serve,
    /// Create the data dir, database and identity, then exit (an existing
    /// instance is left as it is).
    Init,
    /// Run database migrations, then exit.
    Migrate,
    /// Check the configuration (file, `MOSAIC_*` environment, flags) without
    /// starting anything.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Check, in order, the configuration, the data dir's permissions, the
    /// database, Redis, the identity, the listen address and the peers'
    /// reachability (with an admin API key), and say what to do about each
    /// problem; exit code of the first failure.
    Doctor,
    /// Show, print or rotate the instance identity.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Create, list and revoke API keys (offline, on the database).
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Connect to peers and manage federation connections (admin API key).
    #[command(subcommand)]
    Peer(peer::PeerCommand),
    /// The audit log of signed commands exchanged with peers (admin API key).
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Spawn, inspect, stop and follow agents on the running daemon (API key
    /// with the `agents` scope), or with --peer on a peer (`admin` scope).
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Create, inspect, change and watch jobs on the running daemon
    /// (`coordinator` API key).
    #[command(subcommand)]
    Job(job::JobCommand),
    /// List the replicas of this instance: state, agents supervised, last
    /// heartbeat (offline, on the database).
    Replicas,
}

/// `mosaicd identity ...`
#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Show the instance id, name, URL, key id and fingerprint (offline).
    Show,
    /// Print the daemon's TLS certificate as PEM (offline, from the data dir).
    Cert,
    /// Print a PKCS#10 certificate signing request for the instance key, signed
    /// by it, for an operator CA to sign (CA mode; offline, needs the master key).
    Csr {
        /// DNS name the certificate should carry (repeatable) [default: the host
        /// of the public URL, when neither --dns nor --ip is given].
        #[arg(long, value_name = "NAME")]
        dns: Vec<String>,
        /// IP address the certificate should carry (repeatable).
        #[arg(long, value_name = "ADDR")]
        ip: Vec<std::net::IpAddr>,
    },
    /// Make a new key current on the running daemon (admin API key; refused in
    /// CA mode).
    Rotate {
        /// How long the old key stays valid, e.g. `24h` [default: from config].
        #[arg(long, value_name = "DURATION")]
        grace: Option<humantime::Duration>,
    },
}

/// `mosaicd apikey ...`
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; it is printed once and never again.
    Create {
        /// A name that says who uses the key.
        #[arg(long)]
        name: String,
        /// Scopes, comma separated: admin, agents, coordinator, webhook.
        #[arg(long = "scope", required = true, value_delimiter = ',', value_parser = choices::scopes())]
        scopes: Vec<Scope>,
    },
    /// List keys (never the secrets).
    List,
    /// Revoke a key by id.
    Revoke {
        /// The key id (from `apikey list`).
        id: String,
    },
}

/// Runs a parsed command line. Tracing is already set up.
pub async fn dispatch(cli: Cli) -> Result<(), CliError> {
    crate::tls::install_default_provider();
    let output = exit::Output { json: cli.json };
    // `config check` reports them itself, with the rest of its findings.
    if !matches!(cli.command, Command::Config(_)) {
        environment::warn_about_unknown_variables();
    }
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "mosaicd", &mut script);
            // A reader that stops early (`| head`) is no error of ours.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(
                    CliError::failure(format!("cannot write the completion script: {error}")),
                ),
                _ => Ok(()),
            }
        }
        Command::Serve => serve::serve(&cli.config).await,
        Command::Peer(command) => peer::run(command, &cli.config, &cli.client, output).await,
        Command::Federation(command) => {
            federation::run(command, &cli.config, &cli.client, output).await
        }
        Command::Init => init::init(&cli.config, output).await,
        Command::Config(command) => config::run(command, &cli.config, output),
        Command::Doctor => doctor::run(&cli.config, &cli.client, output).await,
        Command::Migrate => serve::migrate(&cli.config, output).await,
        Command::Identity(IdentityCommand::Show) => identity::show(&cli.config, output).await,
        Command::Identity(IdentityCommand::Cert) => identity::cert(&cli.config),
        Command::Identity(IdentityCommand::Csr { dns, ip }) => {
            identity::csr(&cli.config, &dns, &ip, output).await
        }
        Command::Identity(IdentityCommand::Rotate { grace }) => {
            identity::rotate(&cli.config, &cli.client, grace.map(Into::into), output).await
        }
        Command::Apikey(ApiKeyCommand::Create { name, scopes }) => {
            apikey::create(&cli.config, &name, &scopes, output).await
        }
        Command::Apikey(ApiKeyCommand::List) => apikey::list(&cli.config, output).await,
        Command::Apikey(ApiKeyCommand::Revoke { id }) => {
            apikey::revoke(&cli.config, &id, output).await
        }
        Command::Agent(command) => agent::run(command, &cli.config, &cli.client, output).await,
        Command::Job(command) => job::run(&cli.config, &cli.client, command, output).await,
        Command::Replicas => replicas::list(&cli.config, output).await,
    }
}
