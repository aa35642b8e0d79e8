//! The sans-IO core: one direction of the link in caller-supplied time.
//!
//! Time is a [`Duration`] since the link started. Each accepted datagram is given its
//! departure from the bottleneck when it arrives. The link's capacity is a cumulative function
//! `C(t)`, the bits it can carry from its trace's start to `t`
//! ([`crate::BaseTrace::capacity_bits`]). A datagram of `b` bits that arrives at `a`
//! ends at capacity mark `end = max(end of the previous datagram, C(a)) + b` and leaves at the
//! first time `t` with `C(t) ≥ end`. For a Mahimahi trace `C` is a step of 12,000 bits per delivery opportunity,
//! so this is exactly `mm-link`'s packing of bytes into opportunities, with idle opportunities
//! (those up to `a`) wasted; for a rate trace it is a fluid FIFO. Outages and switches, which
//! can also come at run time, revise the departures of the datagrams still queued.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use anyhow::Context;

use crate::config::{Direction, LinkConfig, LoadedLinkModel, Loss};

/// Why a datagram was refused on arrival. (Random loss happens later, when it leaves the
/// bottleneck, and is only counted in [`DirectionStats::dropped_loss`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    QueueFull,
    Outage,
}

/// A datagram that has crossed the link.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery<P> {
    pub packet: P,
    /// When it arrives at the far end (since the link started).
    pub at: Duration,
}

/// Counters of one direction. Bytes are as given to [`Shaper::arrive`]: on the link, with
/// IP and UDP headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirectionStats {
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    pub dropped_queue: u64,
    pub dropped_loss: u64,
    pub dropped_outage: u64,
    /// Datagrams in the bottleneck now.
    pub queued_packets: u64,
}

impl DirectionStats {
    /// The counts since `earlier` (the queue length stays the current one).
    pub fn since(&self, earlier: &DirectionStats) -> DirectionStats {
        DirectionStats {
            delivered_packets: self.delivered_packets - earlier.delivered_packets,
            delivered_bytes: self.delivered_bytes - earlier.delivered_bytes,
            dropped_queue: self.dropped_queue - earlier.dropped_queue,
            dropped_loss: self.dropped_loss - earlier.dropped_loss,
            dropped_outage: self.dropped_outage - earlier.dropped_outage,
            queued_packets: self.queued_packets,
        }
    }
}

/// One direction of the emulated link, carrying payloads of type `P`.
pub struct Shaper<P> {
    model: LoadedLinkModel,
    /// When the current model became active: its trace's time 0 (ms since the start).
    origin_ms: f64,
    /// Capacity mark (bits of the current model) at which the last queued datagram ends.
    queue_end_bits: f64,
    bottleneck: VecDeque<Queued<P>>,
    queued_bytes: u64,
    propagating: BinaryHeap<Propagating<P>>,
    /// The latest delivery time given so far: without reordering, the next one's floor.
    last_delivery_ms: f64,
    /// Gilbert–Elliott state.
    in_bad_state: bool,
    rng: ChaCha8Rng,
    /// Outage starts and ends and model switches, by time.
    schedule: VecDeque<Scheduled>,
    scheduled_outages_active: u32,
    manual_outage: bool,
    /// The latest time seen; time never goes back.
    now_ms: f64,
    next_seq: u64,
    stats: DirectionStats,
}

struct Queued<P> {
    packet: P,
    bytes: u64,
    end_bits: f64,
    departs_ms: f64,
}

/// A datagram between the bottleneck and the far end, ordered for a min-heap on delivery
/// time, then on departure order.
struct Propagating<P> {
    at_ms: f64,
    seq: u64,
    packet: P,
    bytes: u64,
}

impl<P> PartialEq for Propagating<P> {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}

impl<P> Eq for Propagating<P> {}

impl<P> Ord for Propagating<P> {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at_ms
            .total_cmp(&self.at_ms)
            .then(other.seq.cmp(&self.seq))
    }
}

impl<P> PartialOrd for Propagating<P> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

struct Scheduled {
    at_ms: f64,
    event: Event,
}

enum Event {
    OutageStart,
    OutageEnd,
    Switch(LoadedLinkModel),
}

/// Through nanoseconds, so that round numbers of milliseconds stay exact.
fn ms(t: Duration) -> f64 {
    t.as_nanos() as f64 / 1e6
}

/// Rounded up: a datagram is never handed out before its time.
fn duration(ms: f64) -> Duration {
    Duration::from_nanos((ms * 1e6).ceil() as u64)
}

impl<P> Shaper<P> {
    /// A shaper running `model` from time 0; `seed` and `direction` pick its random stream.
    pub fn new(model: LoadedLinkModel, seed: u64, direction: Direction) -> anyhow::Result<Self> {
        model.check().map_err(anyhow::Error::msg)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(direction as u64);
        Ok(Shaper {
            model,
            origin_ms: 0.0,
            queue_end_bits: 0.0,
            bottleneck: VecDeque::new(),
            queued_bytes: 0,
            propagating: BinaryHeap::new(),
            last_delivery_ms: 0.0,
            in_bad_state: false,
            rng,
            schedule: VecDeque::new(),
            scheduled_outages_active: 0,
            manual_outage: false,
            now_ms: 0.0,
            next_seq: 0,
            stats: DirectionStats::default(),
        })
    }

    /// Cuts the link during `[at, at + length)`.
    pub fn schedule_outage(&mut self, at: Duration, length: Duration) {
        self.schedule_event(ms(at), Event::OutageStart);
        self.schedule_event(ms(at + length), Event::OutageEnd);
    }

    /// Runs `model` from `at` on.
    pub fn schedule_switch(&mut self, at: Duration, model: LoadedLinkModel) -> anyhow::Result<()> {
        model.check().map_err(anyhow::Error::msg)?;
        self.schedule_event(ms(at), Event::Switch(model));
        Ok(())
    }

    fn schedule_event(&mut self, at_ms: f64, event: Event) {
        let i = self.schedule.partition_point(|s| s.at_ms <= at_ms);
        self.schedule.insert(i, Scheduled { at_ms, event });
    }

    /// A datagram of `bytes` (on the link) arrives at `now`. `Ok`: it is queued and will come
    /// out of [`poll_delivery`](Self::poll_delivery), unless lost on the way.
    pub fn arrive(&mut self, now: Duration, bytes: u64, packet: P) -> Result<(), DropCause> {
        self.advance(ms(now));
        if self.is_cut() {
            self.stats.dropped_outage += 1;
            return Err(DropCause::Outage);
        }
        let queued = self.bottleneck.len() as u64;
        if !self.model.queue.admits(queued, self.queued_bytes, bytes) {
            self.stats.dropped_queue += 1;
            return Err(DropCause::QueueFull);
        }
        let (end_bits, departs_ms) = self.take_capacity(self.now_ms, 8.0 * bytes as f64);
        self.bottleneck.push_back(Queued {
            packet,
            bytes,
            end_bits,
            departs_ms,
        });
        self.queued_bytes += bytes;
        Ok(())
    }

    /// The next datagram delivered at or before `now`, in delivery order.
    pub fn poll_delivery(&mut self, now: Duration) -> Option<Delivery<P>> {
        self.advance(ms(now));
        if self.propagating.peek()?.at_ms > self.now_ms {
            return None;
        }
        let datagram = self.propagating.pop()?;
        self.stats.delivered_packets += 1;
        self.stats.delivered_bytes += datagram.bytes;
        Some(Delivery {
            packet: datagram.packet,
            at: duration(datagram.at_ms),
        })
    }

    /// When the shaper next has something to do (a departure, a delivery or a scheduled
    /// event); `None`: only an arrival can change anything.
    pub fn next_wakeup(&self) -> Option<Duration> {
        [
            self.propagating.peek().map(|d| d.at_ms),
            self.bottleneck.front().map(|q| q.departs_ms),
            self.schedule.front().map(|s| s.at_ms),
        ]
        .into_iter()
        .flatten()
        .min_by(f64::total_cmp)
        .map(duration)
    }

    /// Cuts the link from `now` until called with `false` (scheduled outages still apply).
    pub fn set_outage(&mut self, now: Duration, cut: bool) {
        self.advance(ms(now));
        let was_cut = self.is_cut();
        self.manual_outage = cut;
        if !was_cut && self.is_cut() {
            self.drop_queue();
        }
    }

    /// Runs `model` from `now` on.
    pub fn replace_model(&mut self, now: Duration, model: LoadedLinkModel) -> anyhow::Result<()> {
        model.check().map_err(anyhow::Error::msg)?;
        self.advance(ms(now));
        self.switch_model(model);
        Ok(())
    }

    pub fn stats(&self) -> DirectionStats {
        DirectionStats {
            queued_packets: self.bottleneck.len() as u64,
            ..self.stats
        }
    }

    fn is_cut(&self) -> bool {
        self.manual_outage || self.scheduled_outages_active > 0
    }

    /// Moves time to `now_ms` (never back), applying the scheduled events on the way.
    fn advance(&mut self, now_ms: f64) {
        self.now_ms = self.now_ms.max(now_ms);
        while let Some(next) = self.schedule.front()
            && next.at_ms <= self.now_ms
        {
            let Scheduled { at_ms, event } = self.schedule.pop_front().expect("peeked");
            self.depart_until(at_ms);
            match event {
                Event::OutageStart => {
                    if !self.is_cut() {
                        self.drop_queue();
                    }
                    self.scheduled_outages_active += 1;
                }
                Event::OutageEnd => self.scheduled_outages_active -= 1,
                Event::Switch(model) => self.switch_model_at(at_ms, model),
            }
        }
        self.depart_until(self.now_ms);
    }

    /// Takes `bits` of capacity for a datagram ready at `ready_ms`, behind the queue; returns
    /// its end mark and departure time.
    fn take_capacity(&mut self, ready_ms: f64, bits: f64) -> (f64, f64) {
        let Some(trace) = &self.model.rate else {
            return (0.0, ready_ms);
        };
        let start = self
            .queue_end_bits
            .max(trace.capacity_bits(ready_ms - self.origin_ms));
        let end_bits = start + bits;
        self.queue_end_bits = end_bits;
        let departs_ms = self.origin_ms + trace.time_of_capacity(end_bits);
        (end_bits, departs_ms.max(ready_ms))
    }

    /// Datagrams that left the bottleneck by `t_ms` draw their loss and delay.
    fn depart_until(&mut self, t_ms: f64) {
        while let Some(head) = self.bottleneck.front()
            && head.departs_ms <= t_ms
        {
            let Queued {
                packet,
                bytes,
                departs_ms,
                ..
            } = self.bottleneck.pop_front().expect("peeked");
            self.queued_bytes -= bytes;
            if self.draw_loss() {
                self.stats.dropped_loss += 1;
                continue;
            }
            let mut at_ms = departs_ms + self.draw_delay_ms();
            if !self.model.reorder {
                at_ms = at_ms.max(self.last_delivery_ms);
            }
            self.last_delivery_ms = self.last_delivery_ms.max(at_ms);
            self.propagating.push(Propagating {
                at_ms,
                seq: self.next_seq,
                packet,
                bytes,
            });
            self.next_seq += 1;
        }
    }

    fn draw_loss(&mut self) -> bool {
        match self.model.loss {
            None => false,
            Some(Loss::Bernoulli { p }) => self.rng.random_bool(p),
            Some(Loss::GilbertElliott(ge)) => {
                let (loss, leave) = if self.in_bad_state {
                    (ge.loss_bad, ge.p_bad_to_good)
                } else {
                    (ge.loss_good, ge.p_good_to_bad)
                };
                let lost = self.rng.random_bool(loss);
                if self.rng.random_bool(leave) {
                    self.in_bad_state = !self.in_bad_state;
                }
                lost
            }
        }
    }

    fn draw_delay_ms(&mut self) -> f64 {
        let jitter = self.model.jitter_ms;
        if jitter > 0.0 {
            self.model.delay_ms + self.rng.random_range(-jitter..=jitter)
        } else {
            self.model.delay_ms
        }
    }

    /// The link is cut: everything in the bottleneck is lost.
    fn drop_queue(&mut self) {
        self.stats.dropped_outage += self.bottleneck.len() as u64;
        self.bottleneck.clear();
        self.queued_bytes = 0;
        self.queue_end_bits = 0.0;
    }

    fn switch_model(&mut self, model: LoadedLinkModel) {
        self.switch_model_at(self.now_ms, model);
    }

    /// From `at_ms` on, `model` carries what is still queued (the datagram being sent keeps its
    /// progress) and everything after.
    fn switch_model_at(&mut self, at_ms: f64, model: LoadedLinkModel) {
        let head_bits_left = match (self.bottleneck.front(), &self.model.rate) {
            (Some(head), Some(trace)) => {
                let carried = trace.capacity_bits(at_ms - self.origin_ms);
                (head.end_bits - carried).clamp(0.0, 8.0 * head.bytes as f64)
            }
            _ => 0.0,
        };
        self.model = model;
        self.origin_ms = at_ms;
        self.queue_end_bits = 0.0;
        let mut queued = std::mem::take(&mut self.bottleneck);
        for (i, datagram) in queued.iter_mut().enumerate() {
            let bits = if i == 0 {
                head_bits_left
            } else {
                8.0 * datagram.bytes as f64
            };
            (datagram.end_bits, datagram.departs_ms) = self.take_capacity(at_ms, bits);
        }
        self.bottleneck = queued;
    }
}

impl LinkConfig {
    /// The shaper of one direction, with the config's outages and switches scheduled; reads
    /// the traces.
    pub fn shaper<P>(&self, direction: Direction) -> anyhow::Result<Shaper<P>> {
        self.check().map_err(anyhow::Error::msg)?;
        let name = direction.name();
        let model = self.model(direction).load().context(name)?;
        let mut shaper = Shaper::new(model, self.seed, direction)?;
        for outage in self
            .outages
            .iter()
            .filter(|o| o.direction.includes(direction))
        {
            shaper.schedule_outage(
                Duration::from_secs_f64(outage.at_s),
                Duration::from_secs_f64(outage.duration_s),
            );
        }
        for (i, switch) in self.switches.iter().enumerate() {
            if let Some(model) = switch.model(direction) {
                let model = model
                    .load()
                    .with_context(|| format!("switches[{i}].{name}"))?;
                shaper.schedule_switch(Duration::from_secs_f64(switch.at_s), model)?;
            }
        }
        Ok(shaper)
    }
}
