//! A JSON object written member by member straight into the output buffer, for the ECS and
//! OCSF mappings: no `serde_json::Value` tree per event. Callers write members in sorted key
//! order (what the `Value` maps these mappings used to build put out), absent values are
//! left out and objects left empty are taken back, so lines never carry `null` or `{}`
//! (the same rule as droptrace.v1).
use serde::Serialize;

pub(super) struct Obj<'b> {
    buf: &'b mut Vec<u8>,
    empty: bool,
}

impl<'b> Obj<'b> {
    /// Starts an object at the end of `buf`; `close` ends it.
    pub(super) fn open(buf: &'b mut Vec<u8>) -> Self {
        buf.push(b'{');
        Self { buf, empty: true }
    }

    pub(super) fn close(self) {
        self.buf.push(b'}');
    }

    /// Writes `"key":` (after a comma unless first); the value must follow.
    pub(super) fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.buf.push(b',');
        }
        self.empty = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
        self.buf
    }

    /// A member of any serialisable value (strings escaped, numbers and addresses as serde
    /// writes them).
    pub(super) fn val<T: Serialize + ?Sized>(&mut self, key: &str, v: &T) {
        let buf = self.key(key);
        // Serialising plain strings, numbers and maps into a Vec cannot fail.
        let _ = serde_json::to_writer(buf, v);
    }

    pub(super) fn opt<T: Serialize>(&mut self, key: &str, v: Option<T>) {
        if let Some(v) = v {
            self.val(key, &v);
        }
    }

    /// A string known to need no escaping (the mappings' own constants).
    pub(super) fn lit(&mut self, key: &str, v: &str) {
        let buf = self.key(key);
        buf.push(b'"');
        buf.extend_from_slice(v.as_bytes());
        buf.push(b'"');
    }

    /// A string of constant pieces known to need no escaping.
    pub(super) fn lit_parts(&mut self, key: &str, parts: &[&str]) {
        let buf = self.key(key);
        buf.push(b'"');
        for p in parts {
            buf.extend_from_slice(p.as_bytes());
        }
        buf.push(b'"');
    }

    pub(super) fn num(&mut self, key: &str, v: i64) {
        self.val(key, &v);
    }

    /// An array of constant strings (never empty in the mappings).
    pub(super) fn lits(&mut self, key: &str, items: &[&str]) {
        let buf = self.key(key);
        buf.push(b'[');
        for (i, s) in items.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.push(b'"');
            buf.extend_from_slice(s.as_bytes());
            buf.push(b'"');
        }
        buf.push(b']');
    }

    /// A nested object; left out when `f` writes no member into it.
    pub(super) fn obj(&mut self, key: &str, f: impl FnOnce(&mut Obj)) {
        let mark = self.buf.len();
        let was_empty = self.empty;
        self.key(key).push(b'{');
        let mut child = Obj {
            buf: &mut *self.buf,
            empty: true,
        };
        f(&mut child);
        if child.empty {
            self.buf.truncate(mark);
            self.empty = was_empty;
        } else {
            self.buf.push(b'}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_objects_and_absent_values_are_left_out() {
        let mut buf = Vec::new();
        let mut o = Obj::open(&mut buf);
        o.obj("a", |a| a.opt::<&str>("x", None));
        o.val("b", "q\"uote");
        o.obj("c", |c| {
            c.obj("d", |_| {});
            c.num("e", -3);
        });
        o.obj("f", |_| {});
        o.close();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"{"b":"q\"uote","c":{"e":-3}}"#
        );
    }
}
