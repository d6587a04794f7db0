//! The byte-level primitives of ktrace's binary encodings (the recording
//! format and the name records it carries): LEB128 varints, zigzag for
//! signed values, and a bounds-checked reader that fails with
//! [`Malformed`] instead of panicking.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[inline]
pub fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[inline]
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Why bytes do not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// A bounds-checked reader over a byte slice.
#[derive(Debug, Clone, Copy)]
pub struct Cursor<'a> {
    pub b: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Cursor { b }
    }

    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }

    #[inline]
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        let (&v, rest) = self.b.split_first().ok_or(Malformed("record ends early"))?;
        self.b = rest;
        Ok(v)
    }

    #[inline]
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.b.len() < n {
            return Err(Malformed("record ends early"));
        }
        let (v, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(v)
    }

    #[inline]
    pub fn u16_be(&mut self) -> Result<u16, Malformed> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    #[inline]
    pub fn varint(&mut self) -> Result<u64, Malformed> {
        // Most varints of a recording (tags, lengths, dictionary
        // references, small deltas) are one byte: no loop for those.
        if let Some((&byte, rest)) = self.b.split_first() {
            if byte & 0x80 == 0 {
                self.b = rest;
                return Ok(u64::from(byte));
            }
        }
        self.varint_long()
    }

    /// A varint of any length (up to 10 bytes).
    fn varint_long(&mut self) -> Result<u64, Malformed> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            if i == 9 && byte > 1 {
                return Err(Malformed("varint overflows 64 bits"));
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed("varint overflows 64 bits"))
    }

    /// An address: family (4 or 6), then 4 or 16 bytes.
    pub fn ip(&mut self) -> Result<IpAddr, Malformed> {
        Ok(match self.u8()? {
            4 => {
                let o = self.bytes(4)?;
                IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
            }
            6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(self.bytes(16)?);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(Malformed("unknown address family")),
        })
    }

    pub fn varint_u32(&mut self) -> Result<u32, Malformed> {
        u32::try_from(self.varint()?).map_err(|_| Malformed("value exceeds 32 bits"))
    }

    /// A zigzag varint that must fit an i32 (`what` says which otherwise).
    pub fn varint_i32(&mut self, what: &'static str) -> Result<i32, Malformed> {
        i32::try_from(unzigzag(self.varint()?)).map_err(|_| Malformed(what))
    }
}
