//! An error and its causes written on one line, for logs, statuses and the
//! CLI.

/// An error and its causes on one line. A cause whose words its error
/// already ends with (hyper's and tonic's errors often quote their source)
/// is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let words = cause.to_string();
        if !words.is_empty() && !text.ends_with(&words) {
            text.push_str(": ");
            text.push_str(&words);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose message quotes its source, as hyper's do.
    #[derive(Debug)]
    struct Quoting(std::io::Error);

    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transport error: {}", self.0)
        }
    }

    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_the_error_already_quotes_is_said_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let words = refused.to_string();
        let chain = error_chain(&Quoting(refused));
        assert_eq!(chain, format!("transport error: {words}"));
        let plain = anyhow::anyhow!("cannot read").context("cannot start");
        assert_eq!(error_chain(plain.as_ref()), "cannot start: cannot read");
    }
}
