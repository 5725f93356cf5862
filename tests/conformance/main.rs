//! Conformance suite (issue 14): every event and failure-record shape the gateway
//! renders, compared with AWS's published examples (`fixtures/aws/`, each named with its
//! source in `fixtures/SOURCES.md`) by field set, JSON type, nesting, array length,
//! null-versus-absent and string format, and parsed as `aws_lambda_events`' types where
//! they exist. Shapes AWS does not publish are the gateway's own: golden files in
//! `fixtures/gateway/` (`CONFORMANCE_BLESS=1` rewrites them).
//!
//! Needs nothing running: the shapes are rendered through the crate's public API, and
//! the fixtures are committed files (nothing is fetched).

mod compare;
mod events;
mod failures;
mod support;
