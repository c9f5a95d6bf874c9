//! The content address of a cached document.

use crate::Error;

/// The content address of a cached document: the hash of everything its KV depends on.
///
/// A document attends only to itself, so its keys (stored at position 0) and values depend on
/// the model, the model's configuration and the document's own tokens, and on nothing else.
/// Each part is length-prefixed before hashing, so no two different inputs share a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocKey([u8; 32]);

impl DocKey {
    /// Hashes the model id, the serialized model config and the document's token ids.
    pub fn new(model_id: &str, model_config: &[u8], tokens: &[u32]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"squid-doc-key-v1");
        for part in [model_id.as_bytes(), model_config] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(&(tokens.len() as u64).to_le_bytes());
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        Self(*h.finalize().as_bytes())
    }

    /// The 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from its 32 bytes (as read back from a file header).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key as 64 lowercase hex digits (the on-disk file name).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the form written by [`DocKey::to_hex`].
    pub fn from_hex(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidKey(s.to_string());
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_input_part_changes_the_key() {
        let base = DocKey::new("m", b"cfg", &[1, 2, 3]);
        assert_ne!(base, DocKey::new("m2", b"cfg", &[1, 2, 3]));
        assert_ne!(base, DocKey::new("m", b"cfg2", &[1, 2, 3]));
        assert_ne!(base, DocKey::new("m", b"cfg", &[1, 2, 4]));
        // Length prefixes keep a byte moved between parts from colliding.
        assert_ne!(DocKey::new("ab", b"c", &[]), DocKey::new("a", b"bc", &[]));
    }

    #[test]
    fn rejects_malformed_hex() {
        assert!(DocKey::from_hex("xyz").is_err());
        assert!(DocKey::from_hex(&"G".repeat(64)).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn hex_round_trips(model in "[a-z]{0,8}", tokens in proptest::collection::vec(any::<u32>(), 0..20)) {
            let key = DocKey::new(&model, b"", &tokens);
            prop_assert_eq!(DocKey::from_hex(&key.to_hex()).unwrap(), key);
        }
    }
}
