//! Tracepoint record layouts from tracefs `format` files. The layout of
//! `tcp:tcp_send_reset` changed in 6.10 (addresses became sockaddrs, ports
//! and family went away, `reason` arrived); reading the format at run time
//! lets one eBPF program handle every kernel.

use std::collections::HashMap;

use ktrace_common::{TpFields, NO_FIELD};

/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub offset: u16,
    pub size: u16,
}

/// A parsed format file: fields by name, and value names of
/// `__print_symbolic(REC->x, ...)` tables by field.
#[derive(Debug, Clone, Default)]
pub struct Format {
    pub fields: HashMap<String, Field>,
    pub symbols: HashMap<String, HashMap<u32, String>>,
}

impl Format {
    pub fn parse(text: &str) -> Format {
        let mut f = Format::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("field:") {
                if let Some((name, field)) = parse_field(rest) {
                    f.fields.insert(name, field);
                }
            } else if let Some(fmt) = line.strip_prefix("print fmt:") {
                f.symbols = parse_symbolic(fmt);
            }
        }
        f
    }

    fn off(&self, name: &str) -> u16 {
        self.fields.get(name).map_or(NO_FIELD, |f| f.offset)
    }

    /// The offsets the reset programs read.
    pub fn tp_fields(&self) -> TpFields {
        TpFields {
            skbaddr: self.off("skbaddr"),
            skaddr: self.off("skaddr"),
            state: self.off("state"),
            reason: self.off("reason"),
            sport: self.off("sport"),
            dport: self.off("dport"),
            family: self.off("family"),
            saddr: self.off("saddr"),
            daddr: self.off("daddr"),
            addr_size: self.fields.get("saddr").map_or(0, |f| f.size),
            saddr_v6: self.off("saddr_v6"),
            daddr_v6: self.off("daddr_v6"),
            sock_cookie: self.off("sock_cookie"),
            _pad: 0,
        }
    }
}

/// `"const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;"` -> ("skbaddr", 8, 8).
fn parse_field(rest: &str) -> Option<(String, Field)> {
    let mut parts = rest.split(';').map(str::trim);
    let decl = parts.next()?;
    let mut name = decl.rsplit([' ', '*']).next()?.to_string();
    if let Some(i) = name.find('[') {
        name.truncate(i);
    }
    let mut offset = None;
    let mut size = None;
    for p in parts {
        if let Some(v) = p.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    Some((
        name,
        Field {
            offset: offset?,
            size: size?,
        },
    ))
}

/// Extracts `__print_symbolic(REC->field, { 0, "NAME" }, ...)` tables with
/// numeric values (tables keyed by macros such as TCP_ESTABLISHED are skipped).
fn parse_symbolic(fmt: &str) -> HashMap<String, HashMap<u32, String>> {
    let mut out = HashMap::new();
    let mut rest = fmt;
    while let Some(i) = rest.find("__print_symbolic(REC->") {
        rest = &rest[i + "__print_symbolic(REC->".len()..];
        let Some(comma) = rest.find(',') else { break };
        let field = rest[..comma].trim().to_string();
        let mut table = HashMap::new();
        let mut body = &rest[comma..];
        // Entries run until the closing parenthesis of the macro.
        let end = body.find(')').unwrap_or(body.len());
        body = &body[..end];
        for entry in body.split('{').skip(1) {
            let entry = entry.split('}').next().unwrap_or("");
            let mut kv = entry.splitn(2, ',');
            let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                continue;
            };
            if let Ok(k) = k.trim().parse::<u32>() {
                table.insert(k, v.trim().trim_matches('"').to_string());
            }
        }
        if !table.is_empty() {
            out.insert(field, table);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND_RESET_6_18: &str = "name: tcp_send_reset
ID: 2280
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;

print fmt: \"skbaddr=%p state=%s reason=%s\", REC->skbaddr, REC->state ? __print_symbolic(REC->state, { TCP_ESTABLISHED, \"TCP_ESTABLISHED\" }) : \"UNKNOWN\", __print_symbolic(REC->reason, { 0, \"NOT_SPECIFIED\" }, { 1, \"NO_SOCKET\" }, { 2, \"TCP_INVALID_ACK_SEQUENCE\" })
";

    const SEND_RESET_6_1: &str = "format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
";

    #[test]
    fn parses_the_6_10_plus_layout_and_reason_names() {
        let f = Format::parse(SEND_RESET_6_18);
        let t = f.tp_fields();
        assert_eq!((t.skbaddr, t.skaddr, t.state, t.reason), (8, 16, 24, 28));
        assert_eq!((t.saddr, t.daddr, t.addr_size), (32, 60, 28));
        assert_eq!((t.sport, t.family), (NO_FIELD, NO_FIELD));
        assert_eq!(f.symbols["reason"][&1], "NO_SOCKET");
        assert_eq!(f.symbols["reason"].len(), 3);
        assert!(
            !f.symbols.contains_key("state"),
            "macro-keyed tables are skipped"
        );
    }

    #[test]
    fn parses_the_pre_6_10_layout() {
        let t = Format::parse(SEND_RESET_6_1).tp_fields();
        assert_eq!((t.sport, t.dport, t.family), (28, 30, 32));
        assert_eq!((t.saddr, t.addr_size, t.saddr_v6), (34, 4, 42));
        assert_eq!(t.reason, NO_FIELD);
    }

    #[test]
    fn garbage_gives_no_fields_and_no_panic() {
        let f =
            Format::parse("field:\nfield:int;offset:x;size:;\nprint fmt: __print_symbolic(REC->");
        assert!(f.fields.is_empty());
        assert_eq!(f.tp_fields().skbaddr, NO_FIELD);
    }
}
