//! Oracle Net (TNS): packet decoders, a tolerant descriptor parser, and per-connection
//! reassembly of the connection handshake from captured segment payloads.
//!
//! The daemon keeps one [`TnsStream`] per watched flow, feeds it each captured payload with
//! [`TnsStream::feed`], and turns the [`Message`]s into `tns` events with
//! [`Message::to_oracle`].
pub mod descriptor;
pub mod stream;
pub mod tns;

pub use stream::{
    ConnectInfo, Direction, Message, RedirectInfo, RefuseInfo, Segment, Stats, TnsStream,
};
pub use tns::TnsError;
