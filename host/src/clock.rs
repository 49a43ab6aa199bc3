//! The host clock. Guests never read it: the actor stamps each event with it once, the stamp
//! is journaled, and replay reuses the stamp.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The per-event seed a guest sees: a pure function of device id and seq, so replaying or
/// re-handling an event gives the guest the same seed (SplitMix64 over FNV-1a).
pub fn seed(device: &str, seq: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `at` as milliseconds since this process first asked: a cheap monotonic scale for recency
/// that reuses an instant the caller already read.
pub fn mono_ms(at: std::time::Instant) -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    at.saturating_duration_since(*START.get_or_init(std::time::Instant::now))
        .as_millis() as u64
}

/// A number in `[0, 1)` that differs from call to call: host-side jitter for backoffs.
/// Never given to guests (their seeds come from [`seed`]).
pub fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (seed("jitter", nanos ^ n.rotate_left(32)) >> 11) as f64 / (1u64 << 53) as f64
}
