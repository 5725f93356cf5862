//! Trace context carried by a message, and the `X-Amzn-Trace-Id` it gives the invoke.
//!
//! A producer's trace rides in a message header (Kafka, AMQP, STOMP), an SQS message
//! attribute, or SQS's `AWSTraceHeader` system attribute, as a W3C `traceparent`
//! (`00-<trace-id>-<parent-id>-<flags>`) or an X-Ray `X-Amzn-Trace-Id`
//! (`Root=1-<8 hex>-<24 hex>;Parent=<16 hex>;Sampled=<0|1>`). Sources look it up once,
//! when they build a record, and keep the parsed [`TraceContext`] (no allocation); the
//! invoke renders it as `X-Amzn-Trace-Id`, so that the function's X-Ray segment joins
//! the producer's trace (AWS does this for SQS only).
//!
//! Parsing is strict and total: a value that is not exactly one of the two shapes is
//! ignored, never an error (a record's delivery does not depend on its trace).

use std::fmt;

/// The header names read (compared case-insensitively), in order of preference.
pub const HEADER_NAMES: [&str; 2] = ["X-Amzn-Trace-Id", "traceparent"];

/// A trace to continue: its 128-bit id, the producer's span (X-Ray's Parent) and its
/// sampling decision, if it made one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent_id: Option<[u8; 8]>,
    pub sampled: Option<bool>,
}

impl TraceContext {
    /// The context in a header named `name`, if `name` is one of [`HEADER_NAMES`] and
    /// its value is valid.
    pub fn from_header(name: &str, value: &[u8]) -> Option<TraceContext> {
        let value = std::str::from_utf8(value).ok()?;
        if name.eq_ignore_ascii_case("traceparent") {
            TraceContext::from_traceparent(value)
        } else if name.eq_ignore_ascii_case("X-Amzn-Trace-Id") {
            TraceContext::from_xray(value)
        } else {
            None
        }
    }

    /// The first valid context among `headers`, by [`HEADER_NAMES`] order; `get` finds
    /// a header's value by name, case-insensitively.
    pub fn find<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Option<TraceContext> {
        HEADER_NAMES
            .iter()
            .find_map(|name| TraceContext::from_header(name, get(name)?))
    }

    /// A W3C `traceparent`: version 00 exactly as specified; a later version's first
    /// four fields (the spec's forward compatibility); version ff never. Lowercase hex
    /// only, and neither id all zeros.
    pub fn from_traceparent(value: &str) -> Option<TraceContext> {
        let value = value.trim_matches([' ', '\t']);
        let b = value.as_bytes();
        if b.len() < 55 || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let version = hex::<1>(&b[0..2])?[0];
        if version == 0xff || (version == 0 && b.len() != 55) {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = hex::<16>(&b[3..35])?;
        let parent_id = hex::<8>(&b[36..52])?;
        let flags = hex::<1>(&b[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            parent_id: Some(parent_id),
            sampled: Some(flags & 1 == 1),
        })
    }

    /// An X-Ray trace header: `Root=1-<8 hex>-<24 hex>` with optional `Parent=<16 hex>`
    /// and `Sampled=0|1|?`, in any order, other fields (Self, Lineage, custom) skipped.
    pub fn from_xray(value: &str) -> Option<TraceContext> {
        let (mut root, mut parent_id, mut sampled) = (None, None, None);
        for field in value.split(';') {
            let (key, v) = field.trim_matches([' ', '\t']).split_once('=')?;
            match key {
                "Root" if root.is_none() => root = Some(xray_root(v)?),
                "Parent" if parent_id.is_none() => parent_id = Some(hex::<8>(v.as_bytes())?),
                "Sampled" if sampled.is_none() => {
                    sampled = Some(match v {
                        "1" => Some(true),
                        "0" => Some(false),
                        "?" => None,
                        _ => return None,
                    })
                }
                "Root" | "Parent" | "Sampled" => return None,
                _ => {}
            }
        }
        Some(TraceContext {
            trace_id: root?,
            parent_id,
            sampled: sampled.flatten(),
        })
    }
}

/// `1-<8 hex>-<24 hex>`: the trace id's 16 bytes.
fn xray_root(v: &str) -> Option<[u8; 16]> {
    let rest = v.strip_prefix("1-")?;
    let (time, random) = rest.split_once('-')?;
    if time.len() != 8 || random.len() != 24 {
        return None;
    }
    let mut id = [0; 16];
    id[..4].copy_from_slice(&hex::<4>(time.as_bytes())?);
    id[4..].copy_from_slice(&hex::<12>(random.as_bytes())?);
    (id != [0; 16]).then_some(id)
}

/// Exactly `2 * N` lowercase hex digits as bytes (byte-wise: any other byte, or a
/// multi-byte character, is not a digit).
fn hex<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// The `X-Amzn-Trace-Id` value: `Root=1-<8 hex>-<24 hex>`, then `;Parent=<16 hex>` and
/// `;Sampled=<0|1>` when known.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |f: &mut fmt::Formatter<'_>, bytes: &[u8]| {
            bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
        };
        f.write_str("Root=1-")?;
        hex(f, &self.trace_id[..4])?;
        f.write_str("-")?;
        hex(f, &self.trace_id[4..])?;
        if let Some(p) = &self.parent_id {
            f.write_str(";Parent=")?;
            hex(f, p)?;
        }
        if let Some(s) = self.sampled {
            f.write_str(if s { ";Sampled=1" } else { ";Sampled=0" })?;
        }
        Ok(())
    }
}

/// The trace a batch's invoke continues: the first record's, in event order, that has
/// one (a Lambda invoke carries one trace header).
pub fn of_batch<'a>(
    traces: impl IntoIterator<Item = &'a Option<TraceContext>>,
) -> Option<TraceContext> {
    traces.into_iter().find_map(|t| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn xray(s: &str) -> String {
        TraceContext::from_traceparent(s).unwrap().to_string()
    }

    #[test]
    fn a_traceparent_becomes_an_xray_header() {
        assert_eq!(
            xray(TP),
            "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1"
        );
    }

    #[test]
    fn unsampled_flags_say_sampled_0() {
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(xray(t).ends_with(";Sampled=0"), "{}", xray(t));
        // Only bit 0 is the sampled flag; the others are reserved or "random".
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02";
        assert!(xray(t).ends_with(";Sampled=0"));
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03";
        assert!(xray(t).ends_with(";Sampled=1"));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            // Uppercase hex is not W3C's HEXDIGLC.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0é736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn later_traceparent_versions_are_read_forward_compatibly() {
        let t = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert_eq!(
            TraceContext::from_traceparent(t),
            TraceContext::from_traceparent(TP)
        );
        let t = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceContext::from_traceparent(t), None);
    }

    #[test]
    fn an_xray_header_passes_through() {
        for h in [
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=0",
            "Root=1-5759e988-bd862e3fe1be46a994272793",
        ] {
            assert_eq!(TraceContext::from_xray(h).unwrap().to_string(), h);
        }
        // Order, spaces, deferred sampling and other fields: the same trace.
        let h = "Sampled=?; Lineage=a87bd80c:1|68fd508a:5; Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8";
        assert_eq!(
            TraceContext::from_xray(h).unwrap().to_string(),
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8"
        );
    }

    #[test]
    fn malformed_xray_headers_are_ignored() {
        for bad in [
            "",
            "Parent=53995c3f42cd8ad8;Sampled=1",
            "Root=2-5759e988-bd862e3fe1be46a994272793",
            "Root=1-5759e98-8bd862e3fe1be46a994272793",
            "Root=1-5759E988-BD862E3FE1BE46A994272793",
            "Root=1-00000000-000000000000000000000000",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=yes",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Root=1-5759e988-bd862e3fe1be46a994272794",
            "Root=1-5759e988-bd862e3fe1be46a994272793;garbage",
        ] {
            assert_eq!(TraceContext::from_xray(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_names_are_case_insensitive_and_x_ray_comes_first() {
        let x = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        for name in ["TRACEPARENT", "traceparent", "TraceParent"] {
            assert!(TraceContext::from_header(name, TP.as_bytes()).is_some());
        }
        for name in ["x-amzn-trace-id", "X-AMZN-TRACE-ID"] {
            assert!(TraceContext::from_header(name, x.as_bytes()).is_some());
        }
        assert_eq!(TraceContext::from_header("tracestate", TP.as_bytes()), None);
        assert_eq!(TraceContext::from_header("traceparent", b"\xff\xfe"), None);
        let headers = [("TraceParent", TP), ("x-amzn-trace-id", x)];
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        };
        assert_eq!(TraceContext::find(get).unwrap().to_string(), x);
        // A malformed X-Ray header falls back to a valid traceparent.
        let headers = [("traceparent", TP), ("X-Amzn-Trace-Id", "Root=nope")];
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        };
        assert_eq!(TraceContext::find(get), TraceContext::from_traceparent(TP));
    }

    #[test]
    fn a_batch_takes_the_first_record_trace() {
        let a = TraceContext::from_traceparent(TP);
        let b = TraceContext::from_xray("Root=1-5759e988-bd862e3fe1be46a994272793");
        assert_eq!(of_batch(&[None, b, a]), b);
        assert_eq!(of_batch(&[None, None]), None);
    }
}
