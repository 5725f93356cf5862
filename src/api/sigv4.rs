//! Server-side verification of AWS Signature Version 4, as AWS documents it
//! ("Create a signed AWS API request"): the canonical request rebuilt from what
//! arrived, the string to sign, the key derived from the secret of the request's access
//! key id, and a constant-time comparison. Requests more than five minutes away from
//! the server's clock are refused, as AWS refuses them.
//!
//! The path is canonicalised as botocore and the SDKs do for every service but S3: the
//! path as sent (already percent-encoded) is percent-encoded once more.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::ApiKey;

/// Largest difference between a request's X-Amz-Date and the server's clock.
pub const MAX_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Why a request's signature was refused: AWS's error code and message for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Missing Authentication Token")]
    Missing,
    #[error(
        "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters with an AWS4-HMAC-SHA256 algorithm"
    )]
    Malformed,
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    #[error(
        "Signature expired: {0} is now earlier or later than the server's time by more than 5 minutes."
    )]
    Expired(String),
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
    )]
    Mismatch,
}

impl Refusal {
    /// The `x-amzn-ErrorType` AWS answers with (HTTP 403 for all of them).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Missing => "MissingAuthenticationTokenException",
            Refusal::Malformed => "IncompleteSignatureException",
            Refusal::UnknownKey => "UnrecognizedClientException",
            Refusal::Expired(_) | Refusal::Mismatch => "InvalidSignatureException",
        }
    }
}

/// What a request is signed over: its method, raw path and query as they arrived, its
/// headers (names lower-case) and body.
pub struct Signed<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a BTreeMap<String, Vec<String>>,
    pub body: &'a [u8],
}

/// The access key id that signed `request` with one of `keys`, for `service`, within
/// [`MAX_SKEW`] of `now`.
pub fn verify<'k>(
    request: &Signed,
    keys: &'k [ApiKey],
    service: &str,
    now: DateTime<Utc>,
) -> Result<&'k ApiKey, Refusal> {
    let header = |name: &str| request.headers.get(name).and_then(|v| v.first());
    let auth = header("authorization").ok_or(Refusal::Missing)?;
    let params = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or(Refusal::Malformed)?;
    let mut credential = None;
    let mut signed_headers = None;
    let mut signature = None;
    for part in params.split(',') {
        match part.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed_headers = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    let (Some(credential), Some(signed_headers), Some(signature)) =
        (credential, signed_headers, signature)
    else {
        return Err(Refusal::Malformed);
    };
    // <key id>/<date>/<region>/<service>/aws4_request
    let scope: Vec<&str> = credential.splitn(5, '/').collect();
    let [key_id, date, region, scope_service, "aws4_request"] = scope[..] else {
        return Err(Refusal::Malformed);
    };
    let key = keys
        .iter()
        .find(|k| k.access_key_id == key_id)
        .ok_or(Refusal::UnknownKey)?;
    let amz_date = header("x-amz-date").ok_or(Refusal::Malformed)?;
    let when = NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|_| Refusal::Malformed)?
        .and_utc();
    if (now - when).abs() > MAX_SKEW {
        return Err(Refusal::Expired(amz_date.clone()));
    }
    if !amz_date.starts_with(date) || scope_service != service {
        return Err(Refusal::Mismatch);
    }
    let names: Vec<&str> = signed_headers.split(';').collect();
    if !names.contains(&"host") {
        return Err(Refusal::Mismatch);
    }
    let canonical = canonical_request(request, &names);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{scope_service}/aws4_request\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let mut k = hmac(
        format!("AWS4{}", key.secret_access_key.expose()).as_bytes(),
        date.as_bytes(),
    );
    for part in [region, scope_service, "aws4_request"] {
        k = hmac(&k, part.as_bytes());
    }
    let expected = hex::encode(hmac(&k, string_to_sign.as_bytes()));
    if constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        Ok(key)
    } else {
        Err(Refusal::Mismatch)
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The canonical request over the headers `names` (as the client listed them).
fn canonical_request(r: &Signed, names: &[&str]) -> String {
    let mut out = String::new();
    out.push_str(r.method);
    out.push('\n');
    out.push_str(&encode(if r.path.is_empty() { "/" } else { r.path }, false));
    out.push('\n');
    out.push_str(&canonical_query(r.query));
    out.push('\n');
    for name in names {
        let values = r.headers.get(*name).map_or(&[][..], |v| v.as_slice());
        let joined: Vec<String> = values
            .iter()
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        out.push_str(name);
        out.push(':');
        out.push_str(&joined.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&names.join(";"));
    out.push('\n');
    out.push_str(&hex::encode(Sha256::digest(r.body)));
    out
}

/// The query's parameters decoded, re-encoded and sorted by name then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(&decode(k), true), encode(&decode(v), true))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes all but the unreserved characters (and '/' unless `slash`).
pub fn encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (b == b'/' && !slash) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes ('+' is a '+', as in AWS's query strings).
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    /// AWS's documented example (the IAM ListUsers GET request of "Signature Version 4
    /// test suite"'s get-vanilla case), signed with its example key.
    #[test]
    fn the_aws_test_suite_vanilla_get_verifies_and_a_changed_byte_does_not() {
        let keys = [ApiKey {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        }];
        let mut headers = BTreeMap::new();
        headers.insert("host".into(), vec!["example.amazonaws.com".into()]);
        headers.insert("x-amz-date".into(), vec!["20150830T123600Z".into()]);
        headers.insert("authorization".into(), vec!["AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31".into()]);
        let request = Signed {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let now = "2015-08-30T12:38:00Z".parse().unwrap();
        assert!(verify(&request, &keys, "service", now).is_ok());
        assert_eq!(
            verify(&request, &keys, "lambda", now).unwrap_err(),
            Refusal::Mismatch
        );
        let later = "2015-08-30T12:42:00Z".parse().unwrap();
        assert!(matches!(
            verify(&request, &keys, "service", later),
            Err(Refusal::Expired(_))
        ));
        let tampered = Signed {
            body: b"x",
            ..request
        };
        assert_eq!(
            verify(&tampered, &keys, "service", now).unwrap_err(),
            Refusal::Mismatch
        );
        assert_eq!(
            verify(&tampered, &[], "service", now).unwrap_err(),
            Refusal::UnknownKey
        );
    }

    #[test]
    fn queries_are_canonical() {
        assert_eq!(
            canonical_query("b=2&a=x%3Ay&a=1"),
            "a=1&a=x%3Ay&b=2".to_owned()
        );
        assert_eq!(encode("/tags/arn%3Aaws", false), "/tags/arn%253Aaws");
    }
}
