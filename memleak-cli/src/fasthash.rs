//! The hash maps of a report, keyed by (process, stack id or totals entry). A stack id is
//! already a 64-bit hash of the frames, so SipHash's resistance to chosen
//! keys buys nothing, and at a million allocations it took a fifth of a
//! report. This is FxHash's step (multiply, rotate), one per word.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

#[derive(Default, Clone, Copy)]
pub struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_apart() {
        let mut map: FastMap<(u32, u64), u32> = FastMap::default();
        for tgid in 0..50u32 {
            for stack in 0..200u64 {
                *map.entry((tgid, stack)).or_default() += 1;
                *map.entry((tgid, stack)).or_default() += 1;
            }
        }
        assert_eq!(map.len(), 50 * 200);
        assert!(map.values().all(|&n| n == 2));
        let h = |k: (u32, u64)| {
            let mut s = WordHasher::default();
            std::hash::Hash::hash(&k, &mut s);
            s.finish()
        };
        assert_ne!(h((1, 2)), h((2, 1)));
    }
}
