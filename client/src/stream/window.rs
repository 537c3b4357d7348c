//! How many bytes a stream may have sent and not yet had acknowledged: the
//! measured bandwidth-delay product, doubled, between a floor and a named
//! memory bound.
//!
//! A fixed window caps a stream at `window / round trip` whatever the link
//! can carry (4 MiB over a 200 ms path is 20 MiB/s). So the window follows
//! what the path delivers, as BBR sizes TCP's: every sampling interval it
//! becomes `2 × delivery rate × minimum round trip`. While the window is
//! the limit the rate is `window / round trip`, so the window doubles each
//! round trip until the path, not the window, limits the rate; then it
//! holds at twice the path's bandwidth-delay product (one product in
//! flight, about one queued), and shrinks when the path slows. Every byte in the window is kept for resending until it is
//! acknowledged, so the bound is memory: [`MAX_SEND_WINDOW_BYTES`] per
//! stream.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The smallest window: enough for full speed on loopback and short paths.
/// On a path of 0 ms (docs/BENCHMARKS.md, "distance") a stream reached
/// about 560, 620 and 700 MiB/s with floors of 4, 8 and 16 MiB, and no
/// more with 32 or 64: the relay's and the peers' socket buffers and
/// record queues hold that much in flight even where the round trip is
/// short.
pub const MIN_SEND_WINDOW_BYTES: u64 = 16 << 20;
/// The largest window, and so the most a stream keeps for resending.
pub const MAX_SEND_WINDOW_BYTES: u64 = 256 << 20;
/// A round trip sample is taken once per this many bytes sent.
const SAMPLE_EVERY_BYTES: u64 = 64 << 10;
/// Round trip samples waiting for their acknowledgement: one per
/// [`SAMPLE_EVERY_BYTES`] of the largest window.
const MAX_SAMPLES: usize = (MAX_SEND_WINDOW_BYTES / SAMPLE_EVERY_BYTES) as usize + 1;
/// The shortest interval a delivery rate is measured over.
const MIN_RATE_INTERVAL: Duration = Duration::from_millis(20);

/// A stream's send window (see the module's documentation).
#[derive(Debug)]
pub struct SendWindow {
    bytes: u64,
    /// Stream positions sent and when, oldest first, awaiting their
    /// acknowledgement.
    samples: VecDeque<(u64, Instant)>,
    next_sample_at: u64,
    /// The smallest round trip seen on the current link. It never
    /// expires while the link lasts: a sample is taken when data is
    /// queued for the link, so once the window keeps a queue every later
    /// sample is inflated by it, and letting the minimum age out would
    /// feed that inflation back into the window (doubling it each time).
    min_rtt: Option<Duration>,
    /// Where the current rate interval started: positions acknowledged, and when.
    interval_start: Option<(u64, Instant)>,
}

impl Default for SendWindow {
    fn default() -> SendWindow {
        SendWindow {
            bytes: MIN_SEND_WINDOW_BYTES,
            samples: VecDeque::new(),
            next_sample_at: 0,
            min_rtt: None,
            interval_start: None,
        }
    }
}

impl SendWindow {
    /// Bytes that may be sent and not acknowledged now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Data up to stream position `sent` went out on the link at `now`.
    pub fn sent(&mut self, sent: u64, now: Instant) {
        if sent >= self.next_sample_at && self.samples.len() < MAX_SAMPLES {
            self.samples.push_back((sent, now));
            self.next_sample_at = sent + SAMPLE_EVERY_BYTES;
        }
    }

    /// A new link: what was sent is being sent again, its send times no
    /// longer tell the round trip, and the new route's round trip is
    /// learnt afresh.
    pub fn resent(&mut self) {
        self.samples.clear();
        self.interval_start = None;
        self.min_rtt = None;
    }

    /// The peer acknowledged stream position `acked` at `now`.
    pub fn acked(&mut self, acked: u64, now: Instant) {
        let mut newest = None;
        while let Some(&(position, at)) = self.samples.front() {
            if position > acked {
                break;
            }
            newest = Some(at);
            self.samples.pop_front();
        }
        if let Some(at) = newest {
            let rtt = now.saturating_duration_since(at);
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |min| min.min(rtt)));
        }
        let Some(min_rtt) = self.min_rtt else { return };
        let Some((start_acked, start)) = self.interval_start else {
            self.interval_start = Some((acked, now));
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < min_rtt.max(MIN_RATE_INTERVAL) {
            return;
        }
        let rate = acked.saturating_sub(start_acked) as f64 / elapsed.as_secs_f64();
        let product = 2.0 * rate * min_rtt.as_secs_f64();
        // Saturating casts: a float beyond u64 becomes u64::MAX, then clamped.
        self.bytes = (product as u64).clamp(MIN_SEND_WINDOW_BYTES, MAX_SEND_WINDOW_BYTES);
        self.interval_start = Some((acked, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender that always fills its window over a path with round trip
    /// `rtt_ms` and bandwidth `link_bytes_per_sec`, simulated in 1 ms steps
    /// for `seconds`; returns the window at the end and the largest seen.
    /// With `queueing`, the sender queues its whole window at once (as the
    /// stream queues records for its link) and the sample is taken when a
    /// record is queued, not when the link takes it.
    fn simulate(rtt_ms: u64, link_bytes_per_sec: u64, seconds: u64) -> (u64, u64) {
        simulate_with(rtt_ms, link_bytes_per_sec, seconds, false)
    }

    fn simulate_with(
        rtt_ms: u64,
        link_bytes_per_sec: u64,
        seconds: u64,
        queueing: bool,
    ) -> (u64, u64) {
        const CHUNK: u64 = 64 << 10;
        let mut window = SendWindow::default();
        let start = Instant::now();
        let step = Duration::from_millis(1);
        let rtt = Duration::from_millis(rtt_ms);
        let (mut sent, mut acked, mut largest) = (0u64, 0u64, 0u64);
        // Sent positions and when their acknowledgement comes back.
        let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
        let mut link_free_at = start;
        for tick in 0..seconds * 1000 {
            let now = start + step * u32::try_from(tick).unwrap();
            while let Some(&(position, ack_at)) = in_flight.front() {
                if ack_at > now {
                    break;
                }
                in_flight.pop_front();
                acked = position;
                window.acked(position, now);
            }
            // Send while the window has room and (without a queue) the
            // link takes it this step.
            while sent - acked + CHUNK <= window.bytes() && (queueing || link_free_at < now + step)
            {
                sent += CHUNK;
                let busy = Duration::from_secs_f64(CHUNK as f64 / link_bytes_per_sec as f64);
                link_free_at = link_free_at.max(now) + busy;
                window.sent(sent, now);
                in_flight.push_back((sent, link_free_at + rtt));
            }
            largest = largest.max(window.bytes());
        }
        (window.bytes(), largest)
    }

    #[test]
    fn on_a_long_fast_path_the_window_grows_to_twice_the_bandwidth_delay_product() {
        // 1 GB/s over 200 ms: a product of 200 MB, twice that is beyond the bound.
        let (window, largest) = simulate(200, 1_000_000_000, 5);
        assert_eq!(window, MAX_SEND_WINDOW_BYTES);
        assert_eq!(largest, MAX_SEND_WINDOW_BYTES, "never beyond the bound");
        // 100 MB/s over 100 ms: a product of 10 MB, so about 20 MB.
        let (window, _) = simulate(100, 100_000_000, 5);
        assert!((16_000_000..=24_000_000).contains(&window), "{window}");
    }

    #[test]
    fn a_queue_before_the_link_does_not_inflate_the_window() {
        // 100 MB/s over 100 ms, for 60 s, with the whole window queued:
        // every sample after the first includes the queue, yet the window
        // stays near twice the product (20 MB) instead of doubling.
        let (window, largest) = simulate_with(100, 100_000_000, 60, true);
        assert!(window <= 32_000_000 && largest <= 48_000_000, "{window} {largest}");
        // 10 MB/s over 20 ms: a product of 200 KB, so the floor.
        let (window, _) = simulate_with(20, 10_000_000, 60, true);
        assert_eq!(window, MIN_SEND_WINDOW_BYTES);
    }

    #[test]
    fn on_a_short_path_the_window_stays_at_the_floor() {
        let (window, largest) = simulate(1, 1_000_000_000, 2);
        assert_eq!(window, MIN_SEND_WINDOW_BYTES);
        assert_eq!(largest, MIN_SEND_WINDOW_BYTES);
    }

    #[test]
    fn samples_are_bounded_and_resending_forgets_them() {
        let mut window = SendWindow::default();
        let now = Instant::now();
        for position in 0..(MAX_SAMPLES as u64 * 4) {
            window.sent(position * SAMPLE_EVERY_BYTES, now);
        }
        assert_eq!(window.samples.len(), MAX_SAMPLES);
        window.resent();
        assert!(window.samples.is_empty());
        // An acknowledgement beyond every sample, or of nothing sampled, is harmless.
        window.acked(u64::MAX, now);
        assert_eq!(window.bytes(), MIN_SEND_WINDOW_BYTES);
    }
}
