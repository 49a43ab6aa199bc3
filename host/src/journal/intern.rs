//! One shared copy of the values most devices hold alike: timer keys and device configs.
//!
//! A fleet is mostly many devices of a few kinds: a million thermostats provisioned with the
//! same config, each with a `heartbeat` timer. The journal's index keeps these per device,
//! and as separate allocations they were, after the entry itself, the largest parts of a
//! device's memory (a config of a few bytes costs 32 with its `Arc` header, a key 16). An
//! [`Interner`] hands out the copy it has seen last of a value instead, so a value most
//! devices share costs each of them a pointer.
//!
//! # A cache, not a table
//!
//! Values come from guests and clients, and nothing says they repeat: a config per device
//! with its serial number in it, a key per order. A table of every distinct value would make
//! those dearer (a slot per value on top of the value) and would have to be swept of values
//! nobody holds any more. This is a small direct-mapped cache instead: [`SLOTS`] slots, a
//! value goes to the slot its hash picks, replacing what was there. A value that keeps
//! coming back (the fleet's common config, its timer keys) stays and is shared; one that
//! does not costs nothing but its own allocation, as before; two common values that pick
//! the same slot take turns and share less, never wrongly. The cache holds at most [`SLOTS`]
//! values of at most [`MAX_BYTES`] each, whatever the fleet; larger values are not cached.
//!
//! Correctness never depends on sharing: values are compared by content everywhere.

use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

/// Slots of one cache.
const SLOTS: usize = 1024;

/// Largest value cached, in bytes: bounds what the cache keeps alive to 4 MiB.
const MAX_BYTES: usize = 4096;

/// See the module docs. Hands out `S`, a shared copy of a `T`.
pub(crate) struct Interner<T: ?Sized + 'static, S: 'static> {
    cache: LazyLock<Cache<S>>,
    of: PhantomData<fn(&T)>,
}

struct Cache<S> {
    hasher: std::hash::RandomState,
    slots: Mutex<Vec<Option<S>>>,
}

/// A shared copy of a `T`.
pub(crate) trait Shared<T: ?Sized>: Clone {
    fn new(value: &T) -> Self;
    fn value(&self) -> &T;
}

impl<T: ?Sized> Shared<T> for Arc<T>
where
    for<'a> Arc<T>: From<&'a T>,
{
    fn new(value: &T) -> Arc<T> {
        Arc::from(value)
    }
    fn value(&self) -> &T {
        self
    }
}

/// A string behind a thin pointer: 8 bytes where an `Arc<str>` takes 16, for values held
/// many times over (a timer key per pending timer); the second indirection is to a copy
/// most holders share.
impl Shared<str> for Arc<Box<str>> {
    fn new(value: &str) -> Arc<Box<str>> {
        Arc::new(Box::from(value))
    }
    fn value(&self) -> &str {
        self
    }
}

/// What an [`Interner`] can hold: a value with a size in bytes.
pub(crate) trait Internable: Hash + Eq {
    fn bytes(&self) -> usize;
}

impl Internable for str {
    fn bytes(&self) -> usize {
        self.len()
    }
}

impl Internable for [u8] {
    fn bytes(&self) -> usize {
        self.len()
    }
}

impl<T: ?Sized + Internable, S: Shared<T>> Interner<T, S> {
    pub(crate) const fn new() -> Interner<T, S> {
        Interner {
            cache: LazyLock::new(|| Cache {
                hasher: std::hash::RandomState::new(),
                slots: Mutex::new(vec![None; SLOTS]),
            }),
            of: PhantomData,
        }
    }

    /// A copy of `value`: the cached one when the cache has it.
    pub(crate) fn intern(&self, value: &T) -> S {
        if value.bytes() > MAX_BYTES {
            return S::new(value);
        }
        let cache = &*self.cache;
        let slot = cache.hasher.hash_one(value) as usize % SLOTS;
        let mut slots = cache.slots.lock();
        match &slots[slot] {
            Some(cached) if cached.value() == value => cached.clone(),
            _ => {
                let fresh = S::new(value);
                slots[slot] = Some(fresh.clone());
                fresh
            }
        }
    }
}

/// Device configs (see `DeviceInfo::config`).
pub(crate) static CONFIGS: Interner<[u8], Arc<[u8]>> = Interner::new();

/// Timer keys (see `effects::TimerKey`), behind thin pointers.
pub(crate) static TIMER_KEYS: Interner<str, Arc<Box<str>>> = Interner::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_different_ones_do_not() {
        let cache: Interner<str, Arc<Box<str>>> = Interner::new();
        let a = cache.intern("heartbeat");
        let b = cache.intern("heartbeat");
        let c = cache.intern("offline");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((a.value(), c.value()), ("heartbeat", "offline"));
    }

    #[test]
    fn the_cache_holds_a_bounded_number_of_values_and_keeps_sharing_what_recurs() {
        let cache: Interner<[u8], Arc<[u8]>> = Interner::new();
        let common = cache.intern(b"{}");
        // A client that gives every device its own config, each device removed later: the
        // cache keeps at most one value per slot alive.
        for i in 0..20 * SLOTS {
            let fresh = cache.intern(format!("config {i}").as_bytes());
            assert_eq!(&*fresh, format!("config {i}").as_bytes());
            // The common config keeps coming back, as in a fleet provisioned alike.
            assert_eq!(&*cache.intern(b"{}"), b"{}");
        }
        let held = cache.cache.slots.lock().iter().flatten().count();
        assert!(held <= SLOTS);
        // Whatever was evicted, the common value is shared again from its next use on.
        let again = cache.intern(b"{}");
        assert!(Arc::ptr_eq(&again, &cache.intern(b"{}")));
        assert_eq!(common, again);
        // A value over the size limit is a copy of its own, never cached.
        let big = vec![7u8; MAX_BYTES + 1];
        assert!(!Arc::ptr_eq(&cache.intern(&big), &cache.intern(&big)));
    }
}
