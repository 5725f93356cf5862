//! How the gateway reaches AWS: the `[aws]` table and the SDK configuration every
//! client (Lambda, SQS) is built from.

use std::time::Duration;

use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use serde::Deserialize;

/// `[aws]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region. Default: the SDK's chain (AWS_REGION, profile), else us-east-1.
    pub region: Option<String>,
    /// Endpoint override for local emulators, e.g. "http://127.0.0.1:4566". Default: AWS.
    #[serde(default, deserialize_with = "crate::env::expand_opt")]
    pub endpoint_url: Option<String>,
    /// Named profile from ~/.aws/config. Default: the SDK's chain.
    pub profile: Option<String>,
    /// Role to assume (STS AssumeRole) on top of the base credentials. Default: none.
    pub assume_role_arn: Option<String>,
    /// Account id used in the synthetic ARNs the gateway builds. Default: "000000000000".
    pub account_id: Option<String>,
}

impl AwsConfig {
    /// The account id in the synthetic ARNs the gateway builds.
    pub fn account_id(&self) -> &str {
        self.account_id.as_deref().unwrap_or("000000000000")
    }
}

/// Idle time before the first TCP keepalive probe on an AWS connection: well under the
/// 5–6 minutes after which NATs and firewalls commonly forget an idle flow, so that a
/// long synchronous invoke keeps its connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The SDK's default HTTPS client (rustls, proxy settings from the environment) with TCP
/// keepalive, which the default client leaves off.
fn http_client() -> aws_smithy_http_client::pool::Client {
    use aws_smithy_http_client::{pool, proxy::ProxyConfig, tls};
    let pool = pool::ConnectionPool::builder()
        .tcp_keepalive(TCP_KEEPALIVE)
        .proxy_config(ProxyConfig::from_env())
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .build_https()
        .expect("a TLS connection pool with default settings builds");
    pool::Client::new(&pool).expect("a pool's anonymous partition exists")
}

/// The SDK's stalled-stream protection without its upload half. The upload check
/// wakes every request's task ten times a second until the response arrives, long after
/// the body went out: each of 1,000 idle SQS mappings' 20 s long polls took 200 wake-ups.
/// The gateway's request bodies are in memory and sent at once, so the check guards
/// nothing here. Responses keep the SDK's default check (5 s grace); Lambda's Invoke has
/// neither (the SDK leaves them off for it).
fn stalled_stream_protection() -> StalledStreamProtectionConfig {
    StalledStreamProtectionConfig::enabled()
        .upload_enabled(false)
        .grace_period(Duration::from_secs(5))
        .build()
}

/// Longest wait for one SQS call's answer: a 20 s long poll and 10 s more. Without it, a
/// call whose connection went silent (a NAT that forgot the flow, a peer gone without a
/// reset) waits until TCP gives up, which a keepalive-answering middlebox never lets
/// happen: the mapping would stop receiving for good.
pub const SQS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// An SQS client on the shared configuration, each attempt bounded by
/// [`SQS_ATTEMPT_TIMEOUT`] (Lambda's invokes have the mapping's `function_timeout`).
pub fn sqs_client(sdk: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::config::Builder::from(sdk)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(SQS_ATTEMPT_TIMEOUT)
                .build(),
        )
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// Builds the SDK configuration shared by every AWS client of the process.
pub async fn sdk_config(aws: &AwsConfig) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http_client())
        .stalled_stream_protection(stalled_stream_protection())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .build(),
        );
    if let Some(region) = &aws.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(profile) = &aws.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(url) = &aws.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let base = loader.load().await;
    let base = if base.region().is_none() {
        base.into_builder()
            .region(aws_config::Region::from_static("us-east-1"))
            .build()
    } else {
        base
    };
    match &aws.assume_role_arn {
        None => base,
        Some(arn) => {
            let provider = aws_config::sts::AssumeRoleProvider::builder(arn)
                .session_name("esm-gateway")
                .configure(&base)
                .build()
                .await;
            base.into_builder()
                .credentials_provider(aws_sdk_lambda::config::SharedCredentialsProvider::new(
                    provider,
                ))
                .build()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration that never reaches AWS (nothing is sent).
    fn local() -> AwsConfig {
        AwsConfig {
            region: Some("us-east-1".into()),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn clients_check_stalled_responses_but_not_uploads() {
        let ssp = sdk_config(&local())
            .await
            .stalled_stream_protection()
            .expect("the gateway sets stalled-stream protection");
        assert!(!ssp.upload_enabled(), "upload checks wake every request");
        assert!(ssp.download_enabled());
        assert_eq!(ssp.grace_period(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn sqs_calls_are_bounded_and_keep_the_connect_timeout() {
        let client = sqs_client(&sdk_config(&local()).await);
        let timeouts = client.config().timeout_config().expect("timeouts are set");
        assert_eq!(
            timeouts.operation_attempt_timeout(),
            Some(SQS_ATTEMPT_TIMEOUT)
        );
        assert_eq!(timeouts.connect_timeout(), Some(Duration::from_secs(5)));
    }
}
