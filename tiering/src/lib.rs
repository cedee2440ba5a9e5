//! stratus-tiering decides where a cache miss goes: the consistent-hash ring over upper-tier
//! members, the membership + health view, the route, and the authenticated control context.
//! It opens no sockets and reads no clock; time is always an argument.
//!
//! Not built yet: tiering is the next issue. The crate exists so the dependency direction
//! (`node → tiering`, never back) is fixed from the start.
