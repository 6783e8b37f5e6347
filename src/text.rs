//! Text that comes from outside and is shown to people: what counts as
//! printable, the check made at the boundary, and the escaping the CLI
//! applies to everything it prints for a human. The rule for identifiers
//! (ids, workspaces, agent types, label keys) is in [`identifier`].
//!
//! A peer, an agent or a caller can put escape sequences, carriage returns
//! or invisible reordering characters into a name, a reason or an output
//! line. Shown as they are, they move the cursor, recolour or clear an
//! operator's terminal, or forge and hide rows of a listing.

use std::borrow::Cow;

mod error_chain;
pub mod identifier;

pub use error_chain::error_chain;

/// Whether `c` may be shown as it is: not a control character (C0, DEL,
/// C1) and not an invisible format character that reorders or hides text
/// (zero-width characters, bidirectional embeddings, overrides and
/// isolates, the byte order mark).
pub fn is_printable(c: char) -> bool {
    !c.is_control()
        && !matches!(
            c,
            '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// Whether every character of `text` is printable (one line of it).
pub fn is_printable_line(text: &str) -> bool {
    text.chars().all(is_printable)
}

/// `text` for a terminal: every character that is not printable written as
/// an escape (`\u{1b}`, `\r`, `\u{202e}`), except the newlines and tabs
/// that lay out what the CLI itself prints.
pub fn escape_for_terminal(text: &str) -> Cow<'_, str> {
    if text
        .chars()
        .all(|c| is_printable(c) || c == '\n' || c == '\t')
    {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_printable(c) || c == '\n' || c == '\t' {
            escaped.push(c);
        } else {
            escaped.extend(c.escape_default());
        }
    }
    Cow::Owned(escaped)
}

/// One field of a row or a line (a name, a reason, a peer's detail) for a
/// terminal: like [`escape_for_terminal`], and newlines and tabs are escaped
/// too, so that a field can never start a row of its own.
pub fn escape_field(text: &str) -> Cow<'_, str> {
    if is_printable_line(text) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_printable(c) {
            escaped.push(c);
        } else {
            escaped.extend(c.escape_default());
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_moves_or_hides_text_is_not_printable() {
        for c in [
            '\u{1b}', '\r', '\0', '\u{7f}', '\u{9b}', '\u{202e}', '\u{200b}', '\u{feff}',
        ] {
            assert!(!is_printable(c), "{c:?}");
        }
        for c in ['a', 'é', '漢', '🙂', ' ', '\\'] {
            assert!(is_printable(c), "{c:?}");
        }
        assert!(is_printable_line("alpha (eu-west)"));
        assert!(!is_printable_line("alpha\r\nbravo"));
        assert!(!is_printable_line("alpha\n"));
    }

    #[test]
    fn a_terminal_gets_escapes_and_keeps_the_layout() {
        assert!(matches!(
            escape_for_terminal("plain\ttext\n"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_for_terminal("evil\u{1b}[2J\rname\u{202e}gpj.exe\n"),
            "evil\\u{1b}[2J\\rname\\u{202e}gpj.exe\n"
        );
    }

    #[test]
    fn a_field_cannot_start_a_row_of_its_own() {
        assert!(matches!(escape_field("alpha (eu-west)"), Cow::Borrowed(_)));
        assert_eq!(
            escape_field("ok\nbravo  ACTIVE\t\u{1b}[1m"),
            "ok\\nbravo  ACTIVE\\t\\u{1b}[1m"
        );
    }
}
