//! The `MOSAIC_*` environment as the command line sees it: which variables
//! mosaicd reads (derived from the clap tree, so the list cannot drift from the
//! flags), warnings about the others (a misspelled variable is otherwise
//! silently ignored), and parse errors that name the variable a bad value came
//! from instead of the flag it stands for.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};

use clap::CommandFactory as _;
use clap::error::{ContextKind, ContextValue, ErrorKind};

use super::Cli;

/// The prefix of the variables mosaicd owns.
const PREFIX: &str = "MOSAIC_";

/// Prefixes of variable families: one webhook secret per source
/// (`MOSAIC_WEBHOOK_SECRET_GITHUB`), and the test suite's own variables
/// (`MOSAIC_TEST_DATABASE_URL`, ...), which the binary never reads but which a
/// developer's shell carries.
const KNOWN_PREFIXES: [&str; 2] = [crate::config::ENV_WEBHOOK_SECRET_PREFIX, "MOSAIC_TEST_"];

/// Variables read outside clap: the master key (environment only, never a
/// flag), and those the agent runtime gives every agent process, which an
/// agent that runs `mosaicd` passes on to it.
fn variables_outside_clap() -> [&'static str; 5] {
    [
        crate::identity::sealing::MASTER_KEY_ENV,
        crate::agents::process::AGENT_ID_VARIABLE,
        crate::agents::process::RUNNER_ID_VARIABLE,
        // Set by `agents::runtime` as literals.
        "MOSAIC_TASK_ID",
        "MOSAIC_AGENT_WORKDIR",
    ]
}

/// Every `MOSAIC_*` variable mosaicd reads by its whole name.
pub fn known_variables() -> BTreeSet<String> {
    fn collect(command: &clap::Command, into: &mut BTreeSet<String>) {
        for argument in command.get_arguments() {
            if let Some(name) = argument.get_env() {
                into.insert(name.to_string_lossy().into_owned());
            }
        }
        for subcommand in command.get_subcommands() {
            collect(subcommand, into);
        }
    }
    let mut known = BTreeSet::new();
    collect(&Cli::command(), &mut known);
    known.extend(variables_outside_clap().map(str::to_owned));
    known
}

/// A `MOSAIC_*` variable that mosaicd does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVariable {
    /// Its name.
    pub name: String,
    /// The known variable it most likely misspells, if one is close.
    pub suggestion: Option<String>,
}

/// The `MOSAIC_*` names among `names` that mosaicd does not read, sorted.
pub fn unknown_variables(names: impl IntoIterator<Item = OsString>) -> Vec<UnknownVariable> {
    let known = known_variables();
    let mut unknown: Vec<UnknownVariable> = names
        .into_iter()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.starts_with(PREFIX))
        .filter(|name| !known.contains(name))
        .filter(|name| !KNOWN_PREFIXES.iter().any(|prefix| name.starts_with(prefix)))
        .map(|name| UnknownVariable {
            suggestion: closest(&name, &known),
            name,
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown
}

/// The unknown `MOSAIC_*` variables of this process's environment.
pub fn unknown_variables_here() -> Vec<UnknownVariable> {
    unknown_variables(std::env::vars_os().map(|(name, _)| name))
}

/// Logs one warning per unknown `MOSAIC_*` variable (names only: a misspelled
/// `MOSAIC_MASTER_KEY` holds a secret).
pub fn warn_about_unknown_variables() {
    for unknown in unknown_variables_here() {
        match &unknown.suggestion {
            Some(suggestion) => tracing::warn!(
                variable = %unknown.name,
                did_you_mean = %suggestion,
                "ignoring an environment variable mosaicd does not read"
            ),
            None => tracing::warn!(
                variable = %unknown.name,
                "ignoring an environment variable mosaicd does not read"
            ),
        }
    }
}

/// The known name closest to `name`, when it is a likely typo (at most two
/// edits, or three for long names).
fn closest(name: &str, known: &BTreeSet<String>) -> Option<String> {
    let allowed = if name.len() > 16 { 3 } else { 2 };
    known
        .iter()
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.clone())
}

/// Levenshtein distance over bytes (the names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, left) in a.bytes().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, right) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(left != *right);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Parses the process's command line like `Cli::parse`, except that a bad
/// value taken from a `MOSAIC_*` variable is reported under the variable's
/// name (the flag was never typed). Exits on errors, `--help` and `--version`.
pub fn parse_command_line() -> Cli {
    let arguments: Vec<OsString> = std::env::args_os().collect();
    match super::help::try_parse_from(&arguments) {
        Ok(cli) => cli,
        Err(error) => {
            if let Some(message) =
                from_environment(&error, &arguments, |name| std::env::var_os(name))
            {
                eprintln!("{}", crate::text::escape_for_terminal(&message));
                std::process::exit(2);
            }
            error.exit()
        }
    }
}

/// clap's message for `error`, rewritten to name the variable, when the bad
/// value came from a variable rather than a flag on `arguments`.
pub fn from_environment(
    error: &clap::Error,
    arguments: &[OsString],
    lookup: impl Fn(&OsStr) -> Option<OsString>,
) -> Option<String> {
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(shown)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let Some(ContextValue::String(value)) = error.get(ContextKind::InvalidValue) else {
        return None;
    };
    // Arguments render (`--listen <ADDR>`) only once their command is built.
    let mut command = super::help::command();
    command.build();
    let argument = argument_shown_as(&command, shown)?;
    let variable = argument.get_env()?;
    let long = argument.get_long()?;
    let typed = arguments.iter().skip(1).any(|argument| {
        let argument = argument.to_string_lossy();
        argument
            .strip_prefix("--")
            .and_then(|rest| rest.strip_prefix(long))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    });
    if typed || lookup(variable).as_deref() != Some(OsStr::new(value)) {
        return None;
    }
    let rendered = error.render().to_string();
    let message = rendered
        .split("\n\nFor more information")
        .next()
        .unwrap_or(&rendered)
        .trim_end();
    Some(message.replace(
        &format!("'{shown}'"),
        &format!(
            "{} (the environment variable for --{long})",
            variable.to_string_lossy()
        ),
    ))
}

/// The argument of `command` or its subcommands that clap shows as `shown`
/// (e.g. `--listen <ADDR>`) in its errors.
fn argument_shown_as(command: &clap::Command, shown: &str) -> Option<clap::Arg> {
    command
        .get_arguments()
        .find(|argument| argument.to_string() == shown)
        .cloned()
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|subcommand| argument_shown_as(subcommand, shown))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<OsString> {
        names.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_known_variables_come_from_the_flags_and_the_rest() {
        let known = known_variables();
        for name in [
            crate::config::ENV_LISTEN,
            crate::config::ENV_DATABASE_URL,
            super::super::client::ENV_API_KEY,
            super::super::peer::ENV_WORKSPACE,
            crate::ratelimit::settings::ENV_TTL,
            crate::tls::ca::ENV_TLS_MODE,
            "MOSAIC_LOG",
            "MOSAIC_MASTER_KEY",
        ] {
            assert!(known.contains(name), "{name} in {known:?}");
        }
    }

    #[test]
    fn misspelled_variables_are_found_with_a_suggestion() {
        let unknown = unknown_variables(names(&[
            "MOSAIC_LISTN",
            "MOSAIC_LISTEN",
            "MOSAIC_WEBHOOK_SECRET_GITHUB",
            "MOSAIC_TEST_DATABASE_URL",
            "MOSAIC_AGENT_ID",
            "MOSAIC_SOMETHING_ELSE_ENTIRELY",
            "PATH",
        ]));
        assert_eq!(
            unknown,
            [
                UnknownVariable {
                    name: "MOSAIC_LISTN".to_owned(),
                    suggestion: Some("MOSAIC_LISTEN".to_owned()),
                },
                UnknownVariable {
                    name: "MOSAIC_SOMETHING_ELSE_ENTIRELY".to_owned(),
                    suggestion: None,
                },
            ]
        );
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("MOSAIC_LISTN", "MOSAIC_LISTEN"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_bad_value_from_a_variable_names_the_variable() {
        let arguments = names(&["mosaicd", "init"]);
        let error = crate::cli::help::try_parse_from(&arguments).err();
        assert!(error.is_none(), "init parses without the variable");
        let lookup = |name: &OsStr| (name == "MOSAIC_LISTEN").then(|| OsString::from("bogus"));
        let error = Cli::command()
            .mut_arg("listen", |argument| argument.default_value("bogus"))
            .try_get_matches_from(&arguments)
            .expect_err("bogus does not parse");
        let message = from_environment(&error, &arguments, lookup).expect("rewritten");
        assert!(
            message.contains("MOSAIC_LISTEN (the environment variable for --listen)")
                && message.contains("'bogus'")
                && !message.contains("'--listen <ADDR>'"),
            "{message}"
        );

        // Typed on the command line: clap's own message stands.
        let typed = names(&["mosaicd", "--listen", "bogus", "init"]);
        let error = crate::cli::help::try_parse_from(&typed).expect_err("bogus does not parse");
        assert_eq!(from_environment(&error, &typed, lookup), None);
        let typed = names(&["mosaicd", "--listen=bogus", "init"]);
        let error = crate::cli::help::try_parse_from(&typed).expect_err("bogus does not parse");
        assert_eq!(from_environment(&error, &typed, lookup), None);
    }
}
