//! A clap value parser for a closed set of names (scopes, job states) that
//! tells clap the names, so `--help` lists them and shell completion offers
//! them instead of file names, while the type's own parser (and its message)
//! decides what is accepted.

use std::ffi::OsStr;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;

/// Parses with `parse`; offers `names` to help and completion.
#[derive(Clone)]
pub struct Choices<T> {
    names: Vec<&'static str>,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Choices<T> {
    /// `names` are what completion offers; `parse` says what is accepted.
    pub fn new(
        names: impl IntoIterator<Item = &'static str>,
        parse: fn(&str) -> Result<T, String>,
    ) -> Self {
        Self {
            names: names.into_iter().collect(),
            parse,
        }
    }
}

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Choices<T> {
    type Value = T;

    fn parse_ref(
        &self,
        command: &clap::Command,
        argument: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let shown = argument.map_or_else(|| "the value".to_owned(), ToString::to_string);
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                ErrorKind::InvalidUtf8,
                format!("{shown}: the value is not UTF-8\n"),
            )
            .with_cmd(command)
        })?;
        (self.parse)(text).map_err(|message| {
            clap::Error::raw(ErrorKind::InvalidValue, format!("{shown}: {message}\n"))
                .with_cmd(command)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            self.names.iter().map(|name| PossibleValue::new(*name)),
        ))
    }
}

/// `--scope`: the API key scopes, as `auth::Scope` parses them.
pub fn scopes() -> Choices<crate::auth::Scope> {
    Choices::new(
        crate::auth::Scope::ALL.map(crate::auth::Scope::as_str),
        |text| text.parse(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_offered_and_parsed_by_the_scope_parser() {
        let parser = scopes();
        let offered: Vec<String> = parser
            .possible_values()
            .expect("names")
            .map(|value| value.get_name().to_owned())
            .collect();
        assert_eq!(offered, ["admin", "agents", "coordinator", "webhook"]);
        let command = clap::Command::new("test");
        assert_eq!(
            parser
                .parse_ref(&command, None, OsStr::new(" agents"))
                .expect("trimmed like before"),
            crate::auth::Scope::Agents
        );
        let error = parser
            .parse_ref(&command, None, OsStr::new("root"))
            .expect_err("unknown");
        assert!(error.to_string().contains("unknown scope"), "{error}");
    }
}
