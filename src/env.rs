//! `${NAME}` interpolation and secret-bearing URLs.
//!
//! Expansion happens inside deserialization, per value, so the TOML parser's own error
//! messages (which quote the source line) only ever show the unexpanded `${NAME}`, and a
//! missing variable is reported at the line that names it.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

/// Why a value's `${NAME}` could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("unterminated ${{…}} in {0:?}")]
    Unterminated(String),
    #[error("invalid environment variable name {0:?}")]
    InvalidName(String),
    #[error("environment variable {0} is not set")]
    NotSet(String),
}

/// Why a URL is not an AMQP URL (the message never holds the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAmqp(String);

/// Expands every `${NAME}` in `raw` from the environment; `$${` is a literal `${`.
pub fn interpolate(raw: &str) -> Result<String, EnvError> {
    interpolate_with(raw, |name| std::env::var(name).ok())
}

fn interpolate_with(
    raw: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, EnvError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| EnvError::Unterminated(raw.to_owned()))?;
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(EnvError::InvalidName(name.to_owned()));
            }
            let value = lookup(name).ok_or_else(|| EnvError::NotSet(name.to_owned()))?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

pub fn expand<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = String::deserialize(d)?;
    interpolate(&raw).map_err(serde::de::Error::custom)
}

pub fn expand_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    expand(d).map(Some)
}

pub fn expand_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    expand(d).map(PathBuf::from)
}

pub fn expand_path_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    expand_path(d).map(Some)
}

/// A string with `${NAME}` expanded.
#[derive(Debug, Clone, PartialEq, Eq, schemars::JsonSchema)]
pub struct Expanded(pub String);

impl<'de> Deserialize<'de> for Expanded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expand(d).map(Expanded)
    }
}

/// A secret (password, token): expanded from `${ENV}` like any value, shown as `***`
/// by Debug so that it never reaches a log.
#[derive(Clone, PartialEq, Eq, schemars::JsonSchema)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expand(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A URL that may carry a password. Debug and Display show it with the password
/// replaced by `***`; only [`SecretUrl::expose`] gives the real text, for connecting.
#[derive(Clone, PartialEq, Eq, schemars::JsonSchema)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Parses as an AMQP URI; the error never contains the password.
    pub fn amqp(&self) -> Result<lapin::uri::AMQPUri, NotAmqp> {
        self.0
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| NotAmqp(e.replace(&self.0, &self.to_string())))
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expand(d).map(SecretUrl)
    }
}

/// `scheme://user:***@host/path?password=***`. The userinfo runs to the URL's last '@'
/// (a password may hold '/', '?', '#' or '@', and parsers take it up to an '@'), and
/// everything after the user name's ':' is hidden; so are the values of query parameters
/// that name a password, secret or token. A string that is not a URL (a key-value
/// connection string) shows as `***`. Hiding too much is harmless; too little is a leak.
impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.0;
        let Some(start) = s.find("://").map(|i| i + 3) else {
            return f.write_str("***");
        };
        f.write_str(&s[..start])?;
        let rest = &s[start..];
        let location = match rest.rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => write!(f, "{user}:***@")?,
                    None => write!(f, "{userinfo}@")?,
                }
                &rest[at + 1..]
            }
            None => rest,
        };
        let Some((path, query)) = location.split_once('?') else {
            return f.write_str(location);
        };
        write!(f, "{path}?")?;
        for (i, param) in query.split('&').enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            match param.split_once('=') {
                Some((key, _)) if is_secret_key(key) => write!(f, "{key}=***")?,
                _ => f.write_str(param)?,
            }
        }
        Ok(())
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "secret", "token"].iter().any(|k| key.contains(k))
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "PASS" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolates_known_variables_and_escapes() {
        assert_eq!(
            interpolate_with("amqp://u:${PASS}@h/${EMPTY}v", vars).unwrap(),
            "amqp://u:s3cret@h/v"
        );
        assert_eq!(
            interpolate_with("cost $5 $${PASS}", vars).unwrap(),
            "cost $5 ${PASS}"
        );
    }

    #[test]
    fn missing_or_malformed_variables_are_named() {
        assert_eq!(
            interpolate_with("${NOPE}", vars).unwrap_err().to_string(),
            "environment variable NOPE is not set"
        );
        assert!(
            interpolate_with("${PASS", vars)
                .unwrap_err()
                .to_string()
                .contains("unterminated")
        );
        assert!(
            interpolate_with("${A-B}", vars)
                .unwrap_err()
                .to_string()
                .contains("invalid")
        );
    }

    #[test]
    fn urls_hide_their_password() {
        let u = SecretUrl::new("amqps://admin:p@ss:w0rd@rabbit.example:5671/prod");
        assert_eq!(u.to_string(), "amqps://admin:***@rabbit.example:5671/prod");
        assert!(!format!("{u:?}").contains("w0rd"));
        assert_eq!(
            SecretUrl::new("amqp://host/%2f").to_string(),
            "amqp://host/%2f"
        );
        assert_eq!(
            SecretUrl::new("amqp://guest@h").to_string(),
            "amqp://guest@h"
        );
    }

    #[test]
    fn every_url_form_hides_its_credentials() {
        for (url, shown) in [
            // A '/' in the password: libpq and tokio-postgres take the userinfo up to
            // the '@', so the authority does not end at the first '/'.
            (
                "postgres://ledger:s3/cr@t@127.0.0.1:5432/postgres",
                "postgres://ledger:***@127.0.0.1:5432/postgres",
            ),
            (
                "postgres://ledger:a?b#c@db:5432/x",
                "postgres://ledger:***@db:5432/x",
            ),
            // Credentials as query parameters.
            (
                "postgres://db:5432/x?user=ledger&password=hunter2&sslmode=require",
                "postgres://db:5432/x?user=ledger&password=***&sslmode=require",
            ),
            (
                "amqps://h/v?auth_mechanism=plain&sslpassword=hunter2",
                "amqps://h/v?auth_mechanism=plain&sslpassword=***",
            ),
            // A key-value connection string is not a URL: shown as nothing but ***.
            ("host=db password=hunter2", "***"),
        ] {
            assert_eq!(SecretUrl::new(url).to_string(), shown, "{url}");
        }
    }

    #[test]
    fn amqp_parse_errors_hide_the_password() {
        let u = SecretUrl::new("amqp://user:hunter2@:bad:port/");
        let err = u.amqp().unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
