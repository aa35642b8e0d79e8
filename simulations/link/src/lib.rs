//! splitee's link models, sans I/O: what a network link between an edge and the cloud does to
//! the bytes on it, in time given as an input. One vocabulary of traces ([`TraceSource`],
//! [`BaseTrace`]: `trace.rs`) is read by both models that use it:
//!
//! * the simulator's fluid uplink ([`Link`]: a base trace, capacity [`StepChange`]s and
//!   [`CapacitySpells`], an [`Rtt`]; `uplink.rs`), in simulated milliseconds;
//! * [`Shaper`]: the link emulator's per-datagram model of one direction (datagram arrival time
//!   and size in, delivery time or drop out), driven by the UDP relay of `splitee-testbed`,
//!   for kernels without netem. Configs are TOML ([`LinkConfig`], `configs/links/*.toml`).
//!
//! [`InputError`] names the file, line and column of a malformed trace or matrix.
//!
//! # One direction of the link
//!
//! A datagram goes through three stages:
//!
//! 1. **Bottleneck** (`rate`, `queue`): a FIFO drained by a capacity trace. Datagrams count
//!    with their IP and UDP headers (28 bytes over IPv4, 48 over IPv6), as `mm-link` counts
//!    whole IP packets.
//!    * `rate` omitted: unlimited; a datagram leaves the bottleneck when it arrives.
//!    * `{ kind = "mahimahi", path }` (`*.up` / `*.down`): each line an integer millisecond
//!      timestamp, one delivery opportunity of 1500 bytes; a repeated stamp is several
//!      opportunities; the trace loops with a period equal to its last stamp. The rule is
//!      `mm-link`'s: each opportunity carries up to 1500 bytes from as many queued datagrams
//!      as fit, a datagram may straddle opportunities and leaves with the one that carries its
//!      last byte; a datagram can only use opportunities strictly after its arrival
//!      (`mm-link` burns the opportunities of the current millisecond before it enqueues), and
//!      the unused rest of an opportunity is lost when the queue runs empty. A datagram larger
//!      than 1500 bytes (possible on loopback) uses as many opportunities as it needs.
//!    * `{ kind = "constant", rate_mbps }`, `{ kind = "norway", path }` (`time_s Mbit/s` per
//!      line), `{ kind = "fivegophers", path, column }` (one CSV row per second): a fluid
//!      link; a datagram of `B` bytes leaves when the link has carried `8·B` bits since the
//!      previous one left (or since it arrived, if the link was idle).
//!
//!    The trace files are read by [`BaseTrace`]; a trace's time 0 is the
//!    moment its model becomes active (the emulator's start, or a switch).
//!
//!    `queue = { packets = N, bytes = B }` (either or both; omitted: unbounded) is a drop-tail
//!    limit on the datagrams accepted and not yet out of the bottleneck, counting the one being
//!    transmitted (`mm-link`'s `droptail` does not count that one). A datagram that would
//!    exceed a limit is dropped on arrival.
//! 2. **Loss**, applied as a datagram leaves the bottleneck: a lost datagram has used its share
//!    of the capacity, as on a radio link.
//!    * `{ kind = "bernoulli", p }`: each datagram is lost with probability `p`.
//!    * `{ kind = "gilbert-elliott", p_good_to_bad, p_bad_to_good, loss_good = 0,
//!      loss_bad = 1 }`: per datagram, as netem's `gemodel`: the datagram is lost with the
//!      current state's loss probability, then the state changes with the current state's
//!      transition probability. The stationary loss rate is
//!      `(p_bad_to_good·loss_good + p_good_to_bad·loss_bad) / (p_good_to_bad + p_bad_to_good)`
//!      ([`Loss::mean_rate`]); a bad spell lasts `1 / p_bad_to_good` datagrams on average.
//! 3. **Propagation**: `delay_ms` plus a jitter drawn uniformly from `±jitter_ms` (netem's
//!    default distribution; `jitter_ms ≤ delay_ms`). Unless `reorder = true`, a datagram never
//!    overtakes an earlier one: its delivery is held back to the previous one's, so when
//!    datagrams follow each other closer than `2·jitter_ms` their delays are skewed upwards;
//!    with `reorder = true` each datagram keeps its own draw.
//!
//! Draws come from a ChaCha8 generator seeded by `seed` (one stream per direction), so a run
//! with the same arrivals is reproducible.
//!
//! # Scheduled events
//!
//! * `[[outages]]` (`at_s`, `duration_s`, `direction` = `"both"` (default), `"uplink"` or
//!   `"downlink"`): the link is cut. The datagrams in the bottleneck at its start and every
//!   datagram arriving during it are dropped (a QUIC sender sees loss and retransmits after
//!   it, as on a real radio outage); datagrams already propagating still arrive. Trace time
//!   keeps running.
//! * `[[switches]]` (`at_s`, `uplink = { … }`, `downlink = { … }`, each optional): the named
//!   direction takes a new model (rate, queue, delay, loss) from then on, e.g. LTE → 3G. The
//!   queued datagrams stay and drain at the new rate (a partly sent one keeps its progress);
//!   the new trace starts at its beginning.
//!
//! At run time, the relay's `LinkHandle::set_outage` and `LinkHandle::replace_link` do the same
//! ([`Shaper::set_outage`], [`Shaper::replace_model`]).
//!
//! # Config file
//!
//! ```toml
//! seed = 1                       # optional, default 0
//!
//! [uplink]                       # client → server
//! rate = { kind = "mahimahi", path = "../../simulations/data/traces/verizon-lte-60s.up" }
//! queue = { packets = 200 }
//! delay_ms = 20
//! jitter_ms = 5
//! loss = { kind = "bernoulli", p = 0.01 }
//!
//! [downlink]                     # server → client
//! rate = { kind = "constant", rate_mbps = 20 }
//! delay_ms = 20
//!
//! [[outages]]
//! at_s = 30
//! duration_s = 5
//!
//! [[switches]]
//! at_s = 40
//! uplink = { rate = { kind = "norway", path = "norway_bus_1" }, delay_ms = 60 }
//! ```
//!
//! Relative trace paths are resolved against the config file's directory, so a config works
//! from any current directory. Unknown keys are errors.
//!

mod config;
mod input;
mod shaper;
mod trace;
mod uplink;

pub use config::{
    BurstLoss, Direction, Directions, LinkConfig, LinkModel, LoadedLinkModel, Loss, Outage,
    QueueLimit, Switch,
};
pub use input::{HeaderCsv, InputError};
pub use shaper::{Delivery, DirectionStats, DropCause, Shaper};
pub use trace::{BaseTrace, MTU_BYTES, TraceSource, packets};
pub use uplink::{CapacitySpells, Link, LinkQueue, Rtt, StepChange};
