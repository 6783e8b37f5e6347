//! The one rule for identifiers that come from outside: instance ids,
//! workspaces, message ids, key ids, capability names and agent types are
//! 1 to 64 characters of `A-Z a-z 0-9 . _ : -`; a label key is 1 to 128 of
//! the same characters and `/`. `docs/PROTOCOL.md` (header rules) documents
//! it for other implementations.
//!
//! Identifiers are compared exactly, printed in tables and written into log
//! fields, so they never hold a space, a control character or anything a
//! terminal could act on. Everything `mosaicd` makes fits: instance and
//! message ids are UUIDs, key ids 32 hexadecimal digits.

/// Longest identifier, in characters (a UUID is 36).
pub const MAX_CHARS: usize = 64;
/// Longest label key, in characters.
pub const MAX_LABEL_KEY_CHARS: usize = 128;
/// The rule, as refusals state it.
pub const RULE: &str = "1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'";

/// Whether `c` may appear in an identifier.
pub fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// Whether `value` is an identifier.
pub fn is_identifier(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_CHARS && value.chars().all(is_identifier_char)
}

/// `Ok` for an identifier; else the refusal, naming `field`.
pub fn check(field: &str, value: &str) -> Result<(), String> {
    if is_identifier(value) {
        Ok(())
    } else {
        Err(format!("{field} must be {RULE}"))
    }
}

/// `Ok` for a label key: 1 to 128 characters of the identifier characters
/// and `/` (for keys such as `team.example/owner`); else the refusal.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let valid = !key.is_empty()
        && key.len() <= MAX_LABEL_KEY_CHARS
        && key.chars().all(|c| is_identifier_char(c) || c == '/');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "label keys must be 1 to {MAX_LABEL_KEY_CHARS} characters of A-Z, a-z, 0-9, '.', '_', ':', '-' or '/', not {key:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_mosaicd_makes_is_an_identifier() {
        for value in [
            "0b9f6c2e-5d1a-4c47-9a43-3f0e5f3b2a11",
            "00112233445566778899aabbccddeeff",
            "ws",
            "team-1.prod_eu:blue",
            "agent.spawn",
            &"a".repeat(MAX_CHARS),
        ] {
            assert!(is_identifier(value), "{value:?}");
            assert!(check("workspace", value).is_ok());
        }
    }

    #[test]
    fn spaces_controls_and_other_characters_are_not() {
        for value in [
            "",
            "with space",
            "line\nbreak",
            "esc\u{1b}[2J",
            "nul\0",
            "slash/inside",
            "é",
            "rtl\u{202e}",
            &"a".repeat(MAX_CHARS + 1),
        ] {
            assert!(!is_identifier(value), "{value:?}");
        }
        let refusal = check("header.workspace", "a b").expect_err("a space");
        assert!(
            refusal.starts_with("header.workspace must be 1 to 64"),
            "{refusal}"
        );
    }

    #[test]
    fn a_label_key_may_have_slashes_and_is_longer() {
        assert!(check_label_key("team.example/owner").is_ok());
        assert!(check_label_key(&"k".repeat(MAX_LABEL_KEY_CHARS)).is_ok());
        for key in ["", "a b", "tab\t", &"k".repeat(MAX_LABEL_KEY_CHARS + 1)] {
            assert!(check_label_key(key).is_err(), "{key:?}");
        }
    }
}
