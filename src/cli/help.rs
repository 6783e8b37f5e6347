//! Which of the global flags each command's `--help` shows. Every flag is
//! accepted everywhere (a shared environment or a wrapper script may set any
//! of them), but a leaf's help lists the flags that change what it does:
//! the daemon's own settings under `serve`, `init`, `migrate`, `doctor` and
//! `config`, how to reach the daemon under the client commands, and where
//! the data lives under the offline ones.

use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _};

use super::Cli;

/// Flags only the daemon reads (listening, serving, what it tells peers).
const DAEMON_ONLY: &[&str] = &[
    "listen",
    "redis_url",
    "plaintext",
    "name",
    "public_url",
    "metrics_listen",
    "mode",
    "cert_chain",
    "ca_bundle",
];

/// Flags that say how a client command reaches a running daemon.
const CLIENT_ONLY: &[&str] = &["server", "api_key", "server_fingerprint"];

/// Where the data lives: read by the daemon and by the offline commands.
const STORAGE: &[&str] = &["data_dir", "database_url"];

/// What a top-level command reads, for its help.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// The daemon's whole configuration: it runs, sets up or checks it.
    Everything,
    /// A running daemon, over gRPC.
    Daemon,
    /// The data dir or the database directly.
    Storage,
    /// Nothing but the command line.
    Nothing,
}

fn reads(command: &str) -> Reads {
    match command {
        "serve" | "init" | "migrate" | "doctor" | "config" => Reads::Everything,
        "peer" | "federation" | "agent" | "job" => Reads::Daemon,
        "apikey" | "replicas" => Reads::Storage,
        // `identity rotate` talks to the daemon; show, cert and csr read the
        // data dir. Its leaves are sorted out below.
        "identity" => Reads::Storage,
        _ => Reads::Nothing,
    }
}

/// Hidden from a command's help, given what it reads.
fn hidden(reads: Reads) -> Vec<&'static str> {
    match reads {
        Reads::Everything => CLIENT_ONLY.to_vec(),
        Reads::Daemon => [DAEMON_ONLY, &["database_url"]].concat(),
        Reads::Storage => [DAEMON_ONLY, CLIENT_ONLY].concat(),
        Reads::Nothing => [DAEMON_ONLY, CLIENT_ONLY, STORAGE].concat(),
    }
}

/// The command tree with each command's help trimmed to what it reads.
pub fn command() -> clap::Command {
    let root = without_empty_defaults(Cli::command());
    // When the tree is built, a global flag is copied into each subcommand
    // that has no flag of that id yet; a hidden copy put there first is kept
    // (and handed down to the subcommand's own subcommands), and its value
    // still reaches the top level like any global flag's.
    let globals: Vec<clap::Arg> = root
        .get_arguments()
        .filter(|argument| argument.is_global_set())
        .cloned()
        .collect();
    let copy = |ids: &[&str], hide: bool| -> Vec<clap::Arg> {
        globals
            .iter()
            .filter(|argument| ids.contains(&argument.get_id().as_str()))
            .map(|argument| argument.clone().hide(hide))
            .collect()
    };
    let names: Vec<String> = root
        .get_subcommands()
        .map(|command| command.get_name().to_owned())
        .collect();
    let mut root = root;
    for name in names {
        let hidden = copy(&hidden(reads(&name)), true);
        root = root.mut_subcommand(&name, |command| {
            let command = if name == "identity" {
                command.mut_subcommand("rotate", |rotate| {
                    rotate
                        .args(copy(CLIENT_ONLY, false))
                        .args(copy(&["database_url"], true))
                })
            } else {
                command
            };
            command.args(hidden)
        });
    }
    root
}

/// `command` and its subcommands without `[default: ""]` or `[default: 0]`
/// in their help: an empty string or a zero there means "not given", which
/// each flag's own text already says.
fn without_empty_defaults(mut command: clap::Command) -> clap::Command {
    let empty: Vec<String> = command
        .get_arguments()
        .filter(|argument| {
            matches!(
                argument.get_default_values(),
                [value] if value.is_empty() || value == "0"
            )
        })
        .map(|argument| argument.get_id().to_string())
        .collect();
    for id in empty {
        command = command.mut_arg(id, |argument| argument.hide_default_value(true));
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .collect();
    for name in names {
        command = command.mut_subcommand(&name, without_empty_defaults);
    }
    command
}

/// Parses `arguments` with the trimmed tree.
pub fn try_parse_from<I, T>(arguments: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut matches: ArgMatches = command().try_get_matches_from(arguments)?;
    Cli::from_arg_matches_mut(&mut matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help_of(path: &[&str]) -> String {
        let mut command = command();
        let mut arguments = vec!["mosaicd"];
        arguments.extend_from_slice(path);
        arguments.push("--help");
        match command.try_get_matches_from_mut(arguments) {
            Err(error) => error.render().to_string(),
            Ok(_) => panic!("--help does not parse as a command"),
        }
    }

    #[test]
    fn a_client_leaf_shows_how_to_reach_the_daemon_not_how_to_serve() {
        let help = help_of(&["job", "list"]);
        for shown in ["--server", "--api-key", "--state", "--config", "--json"] {
            assert!(help.contains(shown), "{shown} missing from:\n{help}");
        }
        assert!(!help.contains("[default: \"\"]"), "{help}");
        for hidden in [
            "--tls-cert-chain",
            "--metrics-listen",
            "--public-url",
            "--redis-url",
            "--database-url",
            "--plaintext",
        ] {
            assert!(!help.contains(hidden), "{hidden} shown in:\n{help}");
        }
    }

    #[test]
    fn serve_shows_the_daemons_settings_and_not_the_clients() {
        let help = help_of(&["serve"]);
        for shown in ["--listen", "--tls-cert-chain", "--redis-url", "--data-dir"] {
            assert!(help.contains(shown), "{shown} missing from:\n{help}");
        }
        assert!(!help.contains("--api-key"), "{help}");
    }

    #[test]
    fn offline_and_mixed_commands_show_what_they_read() {
        let list = help_of(&["apikey", "list"]);
        assert!(list.contains("--database-url") && !list.contains("--server"));
        let rotate = help_of(&["identity", "rotate"]);
        assert!(rotate.contains("--api-key") && !rotate.contains("--database-url"));
        let show = help_of(&["identity", "show"]);
        assert!(show.contains("--data-dir") && !show.contains("--api-key"));
        let completions = help_of(&["completions"]);
        assert!(!completions.contains("--data-dir"), "{completions}");
    }

    #[test]
    fn a_hidden_flag_is_still_accepted() {
        let cli = try_parse_from(["mosaicd", "job", "list", "--public-url", "https://a:1"])
            .expect("a daemon flag on a client command parses");
        assert_eq!(cli.config.public_url.as_deref(), Some("https://a:1"));
        let cli = try_parse_from(["mosaicd", "serve", "--server", "https://b:2"])
            .expect("a client flag on serve parses");
        assert_eq!(cli.client.server.as_deref(), Some("https://b:2"));
    }
}
