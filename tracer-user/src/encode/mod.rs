//! Event -> bytes. `native` is the droptrace.v1 JSON as documented in docs/events.md.
use crate::event::Event;

/// One NDJSON line (without the newline).
pub fn native(event: &Event, buf: &mut Vec<u8>) {
    buf.clear();
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_writer(&mut *buf, event).expect("event serialises");
}
