//! What leaked blocks hold (`--peek N`, `--dump DIR`): their bytes, read
//! from the traced process at report time, and shown only if the block
//! was still outstanding when the read ended. A block freed meanwhile has
//! been handed back to the allocator, which writes its own pointers into
//! it (glibc's tcache: the first 16 bytes): shown, it would be a lie.

use std::fmt::Write as _;

use super::aggregate::{Block, Peek};

/// Blocks peeked per stack, oldest first: the oldest have leaked longest,
/// and a few show whether they hold the same kind of thing.
pub const BLOCKS: usize = 3;

/// Most bytes peeked per block.
pub const MAX_BYTES: u32 = 4096;

/// Where a process's blocks are read, and whether one is still the block
/// a report saw.
pub trait Memory {
    /// `len` bytes at `addr` of process `tgid`, all or none.
    fn read(&self, tgid: u32, addr: u64, len: usize) -> Option<Vec<u8>>;
    /// Whether `block` of `tgid` is outstanding now, the same block (its
    /// size and time), not one allocated at its address since.
    fn live(&self, tgid: u32, block: &Block) -> bool;
}

/// The first `len` bytes of `block`, if it was outstanding until the read
/// ended: the kernel's record is looked up again after the read. A free
/// takes a block out of the kernel's maps at its entry, before the
/// allocator touches it; so a block still there after the read was not
/// handed back while it was read.
pub fn read_live(memory: &dyn Memory, tgid: u32, block: &Block, len: usize) -> Option<Vec<u8>> {
    let bytes = memory.read(tgid, block.addr, len)?;
    memory.live(tgid, block).then_some(bytes)
}

/// The first `n` bytes (at most the block's size) of each of `oldest`
/// that is still outstanding, in their order.
pub fn peek(memory: &dyn Memory, tgid: u32, oldest: &[Block], n: u32) -> Vec<Peek> {
    oldest
        .iter()
        .filter_map(|b| {
            let len = b.size.min(u64::from(n)) as usize;
            read_live(memory, tgid, b, len).map(|bytes| Peek { addr: b.addr, size: b.size, bytes })
        })
        .collect()
}

/// Bytes as text a terminal shows as is: printable ASCII stays, `\` and
/// `"` are escaped, NUL is `\0`, tab, newline and carriage return are
/// `\t`, `\n`, `\r`, and any other byte `\xNN` (an escape sequence in a
/// leaked block never reaches the terminal).
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            b'"' => s.push_str("\\\""),
            0 => s.push_str("\\0"),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// Standard base64 (RFC 4648), padded: JSON's `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::HashMap};

    use super::*;

    /// A process whose blocks may be freed while they are read.
    struct Fake {
        bytes: HashMap<u64, Vec<u8>>,
        /// Addresses whose block is freed by the time a read of it ends.
        freed_while_read: Vec<u64>,
        freed: RefCell<Vec<u64>>,
    }

    impl Memory for Fake {
        fn read(&self, _: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
            if self.freed_while_read.contains(&addr) {
                self.freed.borrow_mut().push(addr);
            }
            self.bytes.get(&addr).map(|b| b[..len].to_vec())
        }
        fn live(&self, _: u32, block: &Block) -> bool {
            !self.freed.borrow().contains(&block.addr)
        }
    }

    fn block(addr: u64, size: u64) -> Block {
        Block { addr, size, born_ns: 0 }
    }

    #[test]
    fn peeks_the_first_bytes_and_never_a_block_freed_while_read() {
        let fake = Fake {
            bytes: HashMap::from([(0x10, b"channelid=4099&".to_vec()), (0x20, b"ab".to_vec()), (0x30, b"xyz".to_vec())]),
            freed_while_read: vec![0x30],
            freed: RefCell::default(),
        };
        // 0x40 cannot be read at all (unmapped).
        let got = peek(&fake, 7, &[block(0x10, 15), block(0x20, 2), block(0x30, 3), block(0x40, 8)], 9);
        assert_eq!(
            got,
            [
                Peek { addr: 0x10, size: 15, bytes: b"channelid".to_vec() },
                Peek { addr: 0x20, size: 2, bytes: b"ab".to_vec() },
            ]
        );
    }

    #[test]
    fn escapes_everything_a_terminal_would_act_on() {
        assert_eq!(escape(b"channelid=4099 application/x-www-form-urlencoded\0\0"),
                   "channelid=4099 application/x-www-form-urlencoded\\0\\0");
        assert_eq!(escape(b"a\\b\"c\td\ne\rf\x1b[31m\x7f\xff"), "a\\\\b\\\"c\\td\\ne\\rf\\x1b[31m\\x7f\\xff");
    }

    #[test]
    fn base64_as_rfc_4648_says() {
        // RFC 4648, section 10.
        for (plain, encoded) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="),
                                 ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0, 0xff, 0xfe]), "AP/+");
    }
}
