//! Token status lists (draft-ietf-oauth-status-list): the `status` claim of a task token,
//! the claims of a `statuslist+jwt`, and the `lst` encoding, both ways.
//!
//! Nothing here knows the broker: the broker encodes the lists it serves, and a resource
//! server's verifier decodes them with the same code. Bits are one per token (`bits: 1`);
//! index `i` is bit `i % 8` (least significant first) of byte `i / 8`, as the draft says.

use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

/// The media type of a served list, and its JWT `typ`.
pub const MEDIA_TYPE: &str = "application/statuslist+jwt";
pub const JWT_TYPE: &str = "statuslist+jwt";
/// Largest decoded list accepted: 16 Mi indexes at one bit each.
pub const MAX_DECODED_BYTES: usize = 2 * 1024 * 1024;

/// The `status` claim of a task token: `{"status_list": {"idx": N, "uri": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusClaim {
    pub status_list: StatusRef,
}

/// Where a token's status is: index `idx` of the list at `uri`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRef {
    pub idx: u64,
    pub uri: String,
}

/// The claims of a served list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusListClaims {
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    pub ttl: u64,
    pub status_list: EncodedList,
}

/// `{"bits": 1, "lst": base64url(zlib(bytes))}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedList {
    pub bits: u8,
    pub lst: String,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StatusListError {
    #[error("cannot compress the list")]
    Compress(#[source] std::io::Error),
    #[error("`lst` is not base64url of a zlib stream of at most 2 MiB")]
    Encoding,
    #[error("only lists of `bits: 1` are read")]
    Bits,
}

/// Encodes a list whose bytes hold index `i` at bit `i % 8`, least significant first.
pub fn encode(bytes: &[u8]) -> Result<EncodedList, StatusListError> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(bytes).map_err(StatusListError::Compress)?;
    let compressed = z.finish().map_err(StatusListError::Compress)?;
    Ok(EncodedList {
        bits: 1,
        lst: B64.encode(compressed),
    })
}

/// Decodes a list's bytes, refusing anything larger than [`MAX_DECODED_BYTES`].
pub fn decode(list: &EncodedList) -> Result<Vec<u8>, StatusListError> {
    if list.bits != 1 {
        return Err(StatusListError::Bits);
    }
    let compressed = B64
        .decode(&list.lst)
        .map_err(|_| StatusListError::Encoding)?;
    let mut out = Vec::new();
    let limit = u64::try_from(MAX_DECODED_BYTES).unwrap_or(u64::MAX) + 1;
    flate2::read::ZlibDecoder::new(compressed.as_slice())
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|_| StatusListError::Encoding)?;
    if out.len() > MAX_DECODED_BYTES {
        return Err(StatusListError::Encoding);
    }
    Ok(out)
}

/// The status at `idx` (0 valid, 1 revoked); `None` past the end of the list.
pub fn status_at(bytes: &[u8], idx: u64) -> Option<u8> {
    let byte = bytes.get(usize::try_from(idx / 8).ok()?)?;
    Some((byte >> (idx % 8)) & 1)
}

/// Converts bytes whose bit order is most significant first (Redis `SETBIT`) to the
/// draft's order, least significant first, in place. The same call converts back.
pub fn flip_bit_order(bytes: &mut [u8]) {
    for b in bytes {
        *b = b.reverse_bits();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bit_order() {
        let mut bytes = vec![0u8; 16];
        // Index 0 and 9 revoked.
        bytes[0] = 0b0000_0001;
        bytes[1] = 0b0000_0010;
        let list = encode(&bytes).unwrap();
        assert_eq!(list.bits, 1);
        let back = decode(&list).unwrap();
        assert_eq!(back, bytes);
        assert_eq!(status_at(&back, 0), Some(1));
        assert_eq!(status_at(&back, 1), Some(0));
        assert_eq!(status_at(&back, 9), Some(1));
        assert_eq!(status_at(&back, 128), None);
        let mut redis_order = vec![0b1000_0000u8];
        flip_bit_order(&mut redis_order);
        assert_eq!(status_at(&redis_order, 0), Some(1));
    }

    #[test]
    fn a_compression_bomb_is_refused() {
        let big = encode(&vec![0u8; MAX_DECODED_BYTES + 1]).unwrap();
        assert!(matches!(decode(&big), Err(StatusListError::Encoding)));
        let wrong = EncodedList {
            bits: 2,
            lst: big.lst,
        };
        assert!(matches!(decode(&wrong), Err(StatusListError::Bits)));
    }
}
