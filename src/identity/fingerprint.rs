//! The fingerprint: a short, human-checkable digest of a public key that operators
//! compare out of band (read aloud, pasted into `peer connect --fingerprint`).
//!
//! Format: SHA-256 over the SubjectPublicKeyInfo DER, base32 (RFC 4648 alphabet,
//! which has no 0/O or 1/I pairs to confuse), the first 32 characters (160 bits), in
//! eight groups of four: `ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ23-4567`.

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Characters kept from the base32 digest.
const FINGERPRINT_CHARS: usize = 32;
/// Characters per dash-separated group.
const GROUP_CHARS: usize = 4;

/// The fingerprint of a SubjectPublicKeyInfo DER.
pub fn fingerprint(spki_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let encoded = base32(digest.as_ref());
    let mut out = String::with_capacity(FINGERPRINT_CHARS + FINGERPRINT_CHARS / GROUP_CHARS);
    for (index, character) in encoded.chars().take(FINGERPRINT_CHARS).enumerate() {
        if index > 0 && index % GROUP_CHARS == 0 {
            out.push('-');
        }
        out.push(character);
    }
    out
}

/// Normalises what an operator typed: case, dashes and spaces do not matter.
/// Returns `None` if it cannot be a fingerprint.
pub fn normalize(typed: &str) -> Option<String> {
    let compact: String = typed
        .chars()
        .filter(|character| !matches!(character, '-' | ' ' | ':'))
        .map(|character| character.to_ascii_uppercase())
        .collect();
    let valid =
        compact.len() == FINGERPRINT_CHARS && compact.bytes().all(|byte| ALPHABET.contains(&byte));
    valid.then_some(compact)
}

/// True when `typed` (in any accepted spelling) names the key `spki_der`.
pub fn matches(typed: &str, spki_der: &[u8]) -> bool {
    match normalize(typed) {
        // Fingerprints are public values: a plain comparison is fine.
        Some(expected) => {
            normalize(&fingerprint(spki_der)).is_some_and(|actual| actual == expected)
        }
        None => false,
    }
}

fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 0x1f) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 0x1f) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc_4648_vectors() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fo"), "MZXQ");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn fingerprint_has_eight_groups_of_four() {
        let printed = fingerprint(b"some key");
        assert_eq!(printed.len(), 39);
        assert_eq!(printed.split('-').count(), 8);
        assert!(printed.split('-').all(|group| group.len() == 4));
    }

    #[test]
    fn matching_ignores_case_and_separators_but_not_content() {
        let printed = fingerprint(b"key one");
        assert!(matches(&printed, b"key one"));
        assert!(matches(
            &printed.to_lowercase().replace('-', ""),
            b"key one"
        ));
        assert!(!matches(&printed, b"key two"));
        assert!(!matches("not a fingerprint", b"key one"));
        assert!(!matches(&printed[..20], b"key one"));
    }
}
