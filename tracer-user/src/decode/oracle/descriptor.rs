//! A tolerant parser for Oracle Net name-value strings (connect descriptors, REDIRECT addresses,
//! REFUSE error descriptions).
//!
//! Input comes from captured packet prefixes, so it may be cut anywhere, come from any client
//! version, or be garbage. The parser never fails: it keeps every `(KEY=value)` it saw closed,
//! keeps lists that were cut off with the children completed so far, and drops a text value
//! whose closing paren is missing (its end is unknown, so reporting it would invent a value).
//! Keywords are matched case-insensitively; values keep their case. Keys and values borrow from
//! the input unless they had escapes or invalid UTF-8, so parsing allocates little more than the
//! lists.
use std::borrow::Cow;

/// Nesting deeper than this is skipped, not parsed: real descriptors nest 5-6 levels, and a
/// bound keeps hostile input from exhausting the stack.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Text(Cow<'a, str>),
    List(Vec<Param<'a>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param<'a> {
    /// The keyword as written (trimmed), e.g. `SERVICE_NAME` or `service_name`.
    pub key: Cow<'a, str>,
    pub value: Value<'a>,
}

impl<'a> Param<'a> {
    /// Case-insensitive keyword match.
    pub fn is(&self, key: &str) -> bool {
        self.key.eq_ignore_ascii_case(key)
    }

    pub fn text(&self) -> Option<&str> {
        match &self.value {
            Value::Text(t) => Some(t),
            Value::List(_) => None,
        }
    }

    pub fn children(&self) -> &[Param<'a>] {
        match &self.value {
            Value::List(l) => l,
            Value::Text(_) => &[],
        }
    }
}

/// One `(ADDRESS=...)` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Address {
    pub protocol: Option<String>,
    pub host: Option<String>,
    /// `None` when missing or not a port number.
    pub port: Option<u16>,
}

/// A parsed name-value string: the top-level parameters in input order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor<'a> {
    pub params: Vec<Param<'a>>,
}

impl<'a> Descriptor<'a> {
    pub fn parse(input: &'a str) -> Self {
        Self::parse_bytes(input.as_bytes())
    }

    /// Non-UTF-8 bytes inside values are replaced (U+FFFD), never rejected.
    pub fn parse_bytes(input: &'a [u8]) -> Self {
        let mut p = Parser { s: input, pos: 0 };
        let mut params = Vec::new();
        // The top level may hold several parameters and stray text (a REDIRECT's NUL, a CONNECT's
        // trailing bytes); closing parens without an opener are noise there.
        while p.pos < p.s.len() {
            params.extend(p.params(0));
            p.pos += 1;
        }
        Self { params }
    }

    /// Every parameter, depth-first in input order.
    pub fn iter(&self) -> impl Iterator<Item = &Param<'a>> {
        let mut stack: Vec<&Param<'a>> = self.params.iter().rev().collect();
        std::iter::from_fn(move || {
            let p = stack.pop()?;
            stack.extend(p.children().iter().rev());
            Some(p)
        })
    }

    /// The first text value of `key` (any case) anywhere.
    pub fn find(&self, key: &str) -> Option<&str> {
        self.iter().filter(|p| p.is(key)).find_map(Param::text)
    }

    /// The first text value of `key` directly inside a `parent` list.
    pub fn find_in(&self, parent: &str, key: &str) -> Option<&str> {
        self.iter()
            .filter(|p| p.is(parent))
            .flat_map(|p| p.children())
            .filter(|c| c.is(key))
            .find_map(Param::text)
    }

    /// SERVICE_NAME from CONNECT_DATA, else from anywhere (some tools flatten descriptors).
    pub fn service_name(&self) -> Option<&str> {
        self.find_in("CONNECT_DATA", "SERVICE_NAME")
            .or_else(|| self.find("SERVICE_NAME"))
            .filter(|s| !s.is_empty())
    }

    pub fn sid(&self) -> Option<&str> {
        self.find_in("CONNECT_DATA", "SID")
            .or_else(|| self.find("SID"))
            .filter(|s| !s.is_empty())
    }

    /// The client program from CID (the client's own claim: `sqlplus`, `python`, a JDBC name).
    pub fn program(&self) -> Option<&str> {
        self.find_in("CID", "PROGRAM").filter(|s| !s.is_empty())
    }

    /// The client's host name from CID; not the ADDRESS HOST, which is the server.
    pub fn client_host(&self) -> Option<&str> {
        self.find_in("CID", "HOST").filter(|s| !s.is_empty())
    }

    /// The client's OS user from CID.
    pub fn client_user(&self) -> Option<&str> {
        self.find_in("CID", "USER").filter(|s| !s.is_empty())
    }

    /// Every ADDRESS, in input order (ADDRESS_LIST and DESCRIPTION_LIST are walked through).
    pub fn addresses(&self) -> Vec<Address> {
        self.iter()
            .filter(|p| p.is("ADDRESS"))
            .map(|p| {
                let get = |k: &str| {
                    p.children()
                        .iter()
                        .filter(|c| c.is(k))
                        .find_map(Param::text)
                };
                Address {
                    protocol: get("PROTOCOL").map(str::to_string),
                    host: get("HOST").map(str::to_string),
                    port: get("PORT").and_then(|s| s.trim().parse().ok()),
                }
            })
            .collect()
    }

    pub fn first_address(&self) -> Option<Address> {
        self.addresses().into_iter().next()
    }

    /// The listener's ERR code of a REFUSE (`(ERR=12514)`), else the first ERROR_STACK CODE.
    pub fn err(&self) -> Option<u32> {
        self.find("ERR")
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| {
                self.find_in("ERROR", "CODE")
                    .and_then(|s| s.trim().parse().ok())
            })
    }
}

/// The message of the listener errors a client can meet before the ACCEPT (TNS-NNNNN), for
/// human-readable output; `None` for others.
pub fn tns_error_text(code: u32) -> Option<&'static str> {
    Some(match code {
        12505 => "TNS:listener does not currently know of SID given in connect descriptor",
        12514 => "TNS:listener does not currently know of service requested in connect descriptor",
        12516 => "TNS:listener could not find available handler with matching protocol stack",
        12518 => "TNS:listener could not hand off client connection",
        12519 => "TNS:no appropriate service handler found",
        12520 => "TNS:listener could not find available handler for requested type of server",
        12521 => "TNS:listener does not currently know of instance requested in connect descriptor",
        12526 => "TNS:listener: all appropriate instances are in restricted mode",
        12527 => "TNS:listener: all instances are in restricted mode or blocking new connections",
        12528 => "TNS:listener: all appropriate instances are blocking new connections",
        12529 => "TNS:connect request rejected based on current filtering rules",
        12530 => "TNS:listener: rate limit reached",
        12533 => "TNS:illegal ADDRESS parameters",
        12564 => "TNS:connection refused",
        _ => return None,
    })
}

/// `ERR=NNNNN` anywhere in `text` (case-insensitive), for refuse texts that are not a well-formed
/// descriptor.
pub fn scan_err(text: &[u8]) -> Option<u32> {
    text.windows(4)
        .enumerate()
        .filter(|(_, w)| w.eq_ignore_ascii_case(b"ERR="))
        .find_map(|(i, _)| {
            let digits: Vec<u8> = text
                .get(i + 4..)?
                .iter()
                .copied()
                .take_while(u8::is_ascii_digit)
                .take(9)
                .collect();
            std::str::from_utf8(&digits).ok()?.parse().ok()
        })
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// A run of `(param)`s up to an unmatched `)` (left for the caller) or the end.
    fn params(&mut self, depth: usize) -> Vec<Param<'a>> {
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None | Some(b')') => return out,
                Some(b'(') => {
                    self.pos += 1;
                    if let Some(p) = self.param(depth) {
                        out.push(p);
                    }
                }
                // Text between parameters carries nothing.
                Some(_) => self.pos += 1,
            }
        }
    }

    /// After a `(`: `KEY=text)`, `KEY=(...)...)`, `KEY)` or `KEY(...)...)`.
    fn param(&mut self, depth: usize) -> Option<Param<'a>> {
        if depth >= MAX_DEPTH {
            self.skip_balanced();
            return None;
        }
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| !matches!(b, b'=' | b'(' | b')'))
        {
            self.pos += 1;
        }
        let key = trim(text(self.s.get(start..self.pos)?));
        match self.peek()? {
            b')' => {
                self.pos += 1;
                Some(Param {
                    key,
                    value: Value::Text(Cow::Borrowed("")),
                })
            }
            b'(' => Some(self.list(key, depth)),
            _ => {
                // '='
                self.pos += 1;
                self.skip_ws();
                match self.peek()? {
                    b'(' => Some(self.list(key, depth)),
                    q @ (b'"' | b'\'') => {
                        self.pos += 1;
                        let v = self.until(|b| b == q)?;
                        self.pos += 1;
                        // Whatever sits between the closing quote and ')' is dropped.
                        self.until(|b| b == b')')?;
                        self.pos += 1;
                        Some(Param {
                            key,
                            value: Value::Text(v),
                        })
                    }
                    _ => {
                        let v = self.until(|b| b == b')' || b == b'(')?;
                        if self.peek() == Some(b'(') {
                            // `(KEY=text(...` is not Oracle syntax; treat what follows as children
                            // so the structure after it still parses.
                            return Some(self.list(key, depth));
                        }
                        self.pos += 1;
                        Some(Param {
                            key,
                            value: Value::Text(trim(v)),
                        })
                    }
                }
            }
        }
    }

    /// Children up to the closing paren; a list cut off by the end keeps what it has.
    fn list(&mut self, key: Cow<'a, str>, depth: usize) -> Param<'a> {
        let children = self.params(depth + 1);
        if self.peek() == Some(b')') {
            self.pos += 1;
        }
        Param {
            key,
            value: Value::List(children),
        }
    }

    /// Text up to (not including) the first byte matching `end`, honouring backslash escapes;
    /// `None` when the input ends first.
    fn until(&mut self, end: impl Fn(u8) -> bool) -> Option<Cow<'a, str>> {
        let start = self.pos;
        let rest = self.s.get(start..)?;
        let stop = rest.iter().position(|&b| end(b) || b == b'\\')?;
        self.pos += stop;
        if self.peek().is_some_and(|b| b != b'\\') {
            // No escapes: borrow.
            return Some(text(rest.get(..stop)?));
        }
        let mut out = rest.get(..stop)?.to_vec();
        loop {
            let b = self.peek()?;
            if end(b) {
                return Some(Cow::Owned(match String::from_utf8(out) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                }));
            }
            // Backslash escapes only the syntax characters: Windows paths in CID PROGRAM are sent
            // with bare backslashes.
            let next = self.s.get(self.pos + 1).copied();
            if b == b'\\' && next.is_some_and(|n| b"()=\\\"'".contains(&n)) {
                self.pos += 1;
                out.push(next?);
            } else {
                out.push(b);
            }
            self.pos += 1;
        }
    }

    /// Past the `)` matching an already consumed `(`, without building anything.
    fn skip_balanced(&mut self) {
        let mut open = 1usize;
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'(' => open += 1,
                b')' => {
                    open -= 1;
                    if open == 0 {
                        return;
                    }
                }
                _ => {}
            }
        }
    }
}

/// `from_utf8_lossy` without its slower chunked scan in the usual all-valid case.
fn text(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

fn trim(s: Cow<'_, str>) -> Cow<'_, str> {
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
        Cow::Owned(o) if o.trim().len() == o.len() => Cow::Owned(o),
        Cow::Owned(o) => Cow::Owned(o.trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYTHON_CONNECT: &str = "(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=ORCLPDB1)\
        (CID=(PROGRAM=sqlplus)(HOST=app-7d9f)(USER=scott))(CONNECTION_ID=abc==))\
        (ADDRESS=(PROTOCOL=tcp)(HOST=10.0.0.5)(PORT=1521)))";

    #[test]
    fn extracts_connect_fields() {
        let d = Descriptor::parse(PYTHON_CONNECT);
        assert_eq!(d.service_name(), Some("ORCLPDB1"));
        assert_eq!(d.sid(), None);
        assert_eq!(d.program(), Some("sqlplus"));
        assert_eq!(d.client_host(), Some("app-7d9f"));
        assert_eq!(d.client_user(), Some("scott"));
        assert_eq!(
            d.first_address(),
            Some(Address {
                protocol: Some("tcp".into()),
                host: Some("10.0.0.5".into()),
                port: Some(1521)
            })
        );
        assert_eq!(d.find("CONNECTION_ID"), Some("abc=="));
    }

    #[test]
    fn case_whitespace_quotes_and_sid() {
        let d = Descriptor::parse(
            " ( description = ( address_list = \n (address=(protocol=TCP)(host = db1 )(port= 1522 ))\
             (Address=(Protocol=tcp)(Host=\"db2.example\")(Port=1523)))\
             (connect_data=(sid = ORCL)(cid=(program='C:\\app\\x.exe')(host=w\\(1\\))(user=\"a b\"))))",
        );
        assert_eq!(d.sid(), Some("ORCL"));
        assert_eq!(d.service_name(), None);
        assert_eq!(d.program(), Some("C:\\app\\x.exe"));
        assert_eq!(d.client_user(), Some("a b"));
        assert_eq!(d.client_host(), Some("w(1)"));
        let a = d.addresses();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].host.as_deref(), Some("db1"));
        assert_eq!(a[0].port, Some(1522));
        assert_eq!(a[1].host.as_deref(), Some("db2.example"));
        assert_eq!(a[1].port, Some(1523));
    }

    #[test]
    fn redirect_data_with_nul_and_connect_data() {
        let d = Descriptor::parse(
            "(ADDRESS=(PROTOCOL=TCP)(HOST=10.1.2.3)(PORT=40123))\0(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=S)))",
        );
        let a = d.first_address().unwrap();
        assert_eq!((a.host.as_deref(), a.port), (Some("10.1.2.3"), Some(40123)));
        assert_eq!(d.service_name(), Some("S"));
    }

    #[test]
    fn refuse_err() {
        let d = Descriptor::parse(
            "(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=12514)(ERROR_STACK=(ERROR=(CODE=12514)(EMFI=4))))",
        );
        assert_eq!(d.err(), Some(12514));
        assert_eq!(d.find("TMP"), Some(""));
        let d = Descriptor::parse("(ERROR_STACK=(ERROR=(CODE=12505)(EMFI=4)))");
        assert_eq!(d.err(), Some(12505));
        assert_eq!(scan_err(b"xx err=12528)"), Some(12528));
        assert_eq!(scan_err(b"ERR="), None);
        assert!(tns_error_text(12514).unwrap().contains("service"));
    }

    #[test]
    fn truncated_keeps_closed_values_only() {
        let cut = &PYTHON_CONNECT[..PYTHON_CONNECT.find("app-7d").unwrap() + 3];
        let d = Descriptor::parse(cut);
        assert_eq!(d.service_name(), Some("ORCLPDB1"));
        assert_eq!(d.program(), Some("sqlplus"));
        assert_eq!(d.client_host(), None, "cut value must not be reported");
        // Before its closing parenthesis the value is absent, never cut; after it, always there.
        let closed = PYTHON_CONNECT.find("ORCLPDB1)").unwrap() + "ORCLPDB1)".len();
        for n in 0..PYTHON_CONNECT.len() {
            let d = Descriptor::parse(&PYTHON_CONNECT[..n]);
            let want = (n >= closed).then_some("ORCLPDB1");
            assert_eq!(d.service_name(), want, "prefix of {n} bytes");
        }
    }

    #[test]
    fn hostile_nesting_and_garbage() {
        let deep = "(".repeat(100_000) + &")".repeat(3);
        let _ = Descriptor::parse(&deep);
        let deep = "(A=".repeat(10_000) + "(SERVICE_NAME=X)";
        assert_eq!(Descriptor::parse(&deep).service_name(), None);
        let d = Descriptor::parse(")))(SERVICE_NAME=Y)((=)(\\");
        assert_eq!(d.service_name(), Some("Y"));
        let _ = Descriptor::parse_bytes(&[0xff, b'(', 0xfe, b'=', 0x80, b')']);
    }
}
