//! `SecretBytes`: the only type that holds a parameter value.
//!
//! Values are secrets. This type never prints its contents (`Debug` shows
//! `<redacted>`, there is deliberately no `Display`), and it zeroes its buffer
//! when dropped, so an evicted or replaced value does not linger in freed memory.

use std::fmt;
use zeroize::Zeroizing;

/// The bytes of one parameter value.
/// A boxed slice rather than a `Vec`: no spare capacity, and 8 bytes less in
/// every cached parameter.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Box<[u8]>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        if bytes.len() == bytes.capacity() {
            // Exact size: the buffer is kept as is, nothing is reallocated.
            return Self(Zeroizing::new(bytes.into_boxed_slice()));
        }
        // Shrinking would reallocate and free the old buffer unzeroed: copy,
        // then zero the original (spare capacity included) as it drops.
        let bytes = Zeroizing::new(bytes);
        Self(Zeroizing::new(Box::from(&bytes[..])))
    }

    /// Takes ownership of a `String` from an SDK response without copying it,
    /// so no unzeroed duplicate is left behind.
    pub fn from_string(value: String) -> Self {
        Self::new(value.into_bytes())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = SecretBytes::new(b"hunter2".to_vec());
        let printed = format!("{secret:?} {:?}", Some(&secret));
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn spare_capacity_is_not_served() {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(b"abc");
        let secret = SecretBytes::new(bytes);
        assert_eq!(secret.expose(), b"abc");
        assert_eq!(SecretBytes::new(Vec::new()).expose(), b"");
    }

    #[test]
    fn exposes_exact_bytes() {
        let secret = SecretBytes::from_string("a\nb\u{e9}".to_string());
        assert_eq!(secret.expose(), "a\nb\u{e9}".as_bytes());
        assert_eq!(secret.len(), 5);
    }
}
