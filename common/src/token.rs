//! Random tokens: default worker ids and per-process instance ids.

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A random token of `len` characters of `[0-9a-zA-Z]`.
pub fn random_token(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    fill(&mut bytes);
    bytes.iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect()
}

/// A random `u32`.
pub fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    fill(&mut bytes);
    u32::from_le_bytes(bytes)
}

fn fill(bytes: &mut [u8]) {
    // The OS random source failing is not recoverable in any useful way; fall
    // back to the clock so ids stay distinct across processes anyway.
    if getrandom::fill(bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id());
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_length_and_alphabet_asked_for() {
        let t = random_token(12);
        assert_eq!(t.len(), 12);
        assert!(t.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(random_token(12), t);
    }
}
