//! The journal index's devices, by device number.
//!
//! Device numbers are handed out in order and never reused, so they are dense: a table indexed
//! by number holds a device in the size of its [`DeviceInfo`] (88 B), where the hash map it
//! replaces held ~190 B a device at a million of them (a table that doubles is up to half
//! empty, plus a control byte a slot). The table is cut into chunks of [`CHUNK`] slots
//! allocated as numbers reach them, so it never copies itself whole to grow, and a number far
//! beyond the others (a damaged or hand-made journal) costs one chunk and a pointer per
//! skipped chunk, not a slot per skipped number. A removed device leaves an empty slot.

use super::index::DeviceInfo;

/// Slots per chunk: 88 KiB of `DeviceInfo`s, small next to a fleet and large next to the
/// pointer that finds it.
const CHUNK: usize = 1024;

/// Devices by number, with the part of `HashMap<u32, DeviceInfo>`'s interface the index
/// uses. Iteration is in number order.
#[derive(Debug, Default, Clone)]
pub struct DeviceTable {
    chunks: Vec<Option<Box<[Option<DeviceInfo>]>>>,
    len: usize,
}

fn place(num: u32) -> (usize, usize) {
    let n = num as usize;
    (n / CHUNK, n % CHUNK)
}

impl DeviceTable {
    pub fn get(&self, num: &u32) -> Option<&DeviceInfo> {
        let (c, i) = place(*num);
        self.chunks.get(c)?.as_ref()?[i].as_ref()
    }

    pub fn get_mut(&mut self, num: &u32) -> Option<&mut DeviceInfo> {
        let (c, i) = place(*num);
        self.chunks.get_mut(c)?.as_mut()?[i].as_mut()
    }

    pub fn contains_key(&self, num: &u32) -> bool {
        self.get(num).is_some()
    }

    /// Puts `info` in slot `num` (which must be `info.num`), returning what was there.
    pub fn insert(&mut self, num: u32, info: DeviceInfo) -> Option<DeviceInfo> {
        debug_assert_eq!(num, info.num, "a device is filed under its own number");
        let (c, i) = place(num);
        if self.chunks.len() <= c {
            self.chunks.resize_with(c + 1, || None);
        }
        let chunk = self.chunks[c].get_or_insert_with(|| (0..CHUNK).map(|_| None).collect());
        let old = chunk[i].replace(info);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, num: &u32) -> Option<DeviceInfo> {
        let (c, i) = place(*num);
        let old = self.chunks.get_mut(c)?.as_mut()?[i].take();
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn values(&self) -> impl Iterator<Item = &DeviceInfo> {
        self.chunks
            .iter()
            .flatten()
            .flat_map(|chunk| chunk.iter().flatten())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut DeviceInfo> {
        self.chunks
            .iter_mut()
            .flatten()
            .flat_map(|chunk| chunk.iter_mut().flatten())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &DeviceInfo)> {
        self.values().map(|d| (&d.num, d))
    }

    pub fn keys(&self) -> impl Iterator<Item = &u32> {
        self.values().map(|d| &d.num)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn device(num: u32) -> DeviceInfo {
        DeviceInfo::new(
            num,
            Arc::from(format!("d{num}")),
            0,
            Arc::from(&b"{}"[..]),
            0,
        )
    }

    #[test]
    fn files_finds_replaces_and_removes_by_number() {
        let mut t = DeviceTable::default();
        assert!(t.len() == 0 && t.get(&0).is_none() && t.remove(&7).is_none());
        for num in [0, 5, 1023, 1024, 3000] {
            assert!(t.insert(num, device(num)).is_none());
        }
        assert_eq!(t.len(), 5);
        assert_eq!(t.get(&1024).map(|d| &*d.id), Some("d1024"));
        assert!(t.get(&6).is_none() && t.get(&2048).is_none() && t.get(&9999).is_none());
        t.get_mut(&5).unwrap().seq = 9;
        assert_eq!(t.get(&5).unwrap().seq, 9);
        let mut again = device(5);
        again.version = 3;
        assert_eq!(t.insert(5, again).map(|d| d.seq), Some(9));
        assert_eq!((t.len(), t.get(&5).unwrap().version), (5, 3));
        assert_eq!(t.remove(&1023).map(|d| d.num), Some(1023));
        assert!(t.remove(&1023).is_none() && !t.contains_key(&1023));
        assert_eq!(t.len(), 4);
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [0, 5, 1024, 3000]);
        assert!(t.iter().all(|(n, d)| *n == d.num));
        for d in t.values_mut() {
            d.seq = 1;
        }
        assert!(t.values().all(|d| d.seq == 1));
    }

    #[test]
    fn a_number_far_beyond_the_others_costs_one_chunk() {
        let mut t = DeviceTable::default();
        t.insert(u32::MAX, device(u32::MAX));
        assert_eq!(t.len(), 1);
        assert_eq!(t.chunks.iter().flatten().count(), 1);
        assert_eq!(t.keys().copied().collect::<Vec<_>>(), [u32::MAX]);
    }
}
