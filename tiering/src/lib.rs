//! stratus-tiering decides where a cache miss goes and what an upper node may trust:
//! the consistent-hash [`ring`], the membership + health [`view`] with its [`route`], the
//! authenticated [`context`] carried between tiers, and who is to blame for a [`failure`].
//!
//! It opens no sockets and reads no clock: time is always an argument (`now`), so the same
//! inputs give the same answers and properties are checked with thousands of cases in
//! milliseconds. The node crate does the connecting, the waiting and the probing.

pub mod context;
pub mod error;
pub mod failure;
pub mod ring;
pub mod view;

pub use context::{
    Acceptor, Blame, ControlContext, FleetSecret, GeneratedMark, Keyring, RequestIdentity,
    RequestLine,
};
pub use error::{ContextError, TierError};
pub use failure::{decide, Failure, HopKind, Party, Stage, Symptom, Verdict};
pub use ring::{Member, MemberId, Ring};
pub use view::{
    route, DownReason, Health, HealthBook, Outcome, Probe, ProbeFailure, Route, TierView,
};
