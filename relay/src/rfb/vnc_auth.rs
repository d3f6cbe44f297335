//! VNC authentication (security type 2): DES of a 16-byte challenge, keyed by the
//! password with each byte's bits reversed, as every VNC implementation does it.

use des::Des;
use des::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};
use subtle::ConstantTimeEq;

pub use crate::auth::passwords::MAX_PASSWORD_LEN;

pub const CHALLENGE_LEN: usize = 16;

fn key(password: &[u8]) -> [u8; 8] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    key
}

/// The response a client sends for `challenge` with `password`.
pub fn response(password: &[u8], challenge: &[u8; CHALLENGE_LEN]) -> [u8; CHALLENGE_LEN] {
    let cipher = Des::new(GenericArray::from_slice(&key(password)));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// Checks a viewer's response in constant time.
pub fn verify(password: &[u8], challenge: &[u8; CHALLENGE_LEN], answer: &[u8]) -> bool {
    response(password, challenge).ct_eq(answer).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_openssl_des_with_bit_reversed_key() {
        // Expected bytes from `openssl enc -des-ecb -nopad -K 0e86ceceeef64e26`
        // ("password" with each byte's bits reversed) over this challenge.
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8);
        let expected = [0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5, 0x38, 0xe2];
        assert_eq!(response(b"password", &challenge), expected);
        assert!(verify(b"password", &challenge, &expected));
        assert!(!verify(b"passwore", &challenge, &expected));
        assert!(!verify(b"password", &challenge, &expected[..15]));
    }
}
