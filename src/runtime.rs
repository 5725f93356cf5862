//! Starts one task tree per enabled mapping and owns shutdown.
//!
//! Shutdown is a cancellation token: sources stop taking new batches, the batch in
//! flight finishes (or is abandoned unacknowledged if it is still retrying), what
//! finished is acknowledged, and the process exits. Past the grace period the remaining
//! tasks are dropped, with nothing acknowledged that was not delivered.
//!
//! Schedules are the exception to one task per mapping: every schedule mapping goes to
//! one timer task, so that thousands of them cost one sleeping task.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, Mapping, ScheduleSource, Source};
use crate::destination::Destination;
use crate::invoke::event::Envelope;
use crate::invoke::lambda::{FunctionRef, Invoker};
use crate::pipeline::batcher::BatchLimits;
use crate::pipeline::retry::{Deliverer, Policy};
use crate::source::schedule::Scheduled;
use crate::status::{MappingStatus, State};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "shutdown grace period of {0:?} expired with batches still in flight; they were not acknowledged and the broker will redeliver them"
    )]
    GraceExpired(Duration),
    #[error("mapping task {0} panicked")]
    Panicked(String),
}

/// Runs every enabled mapping of `config` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
) -> Result<Vec<Arc<MappingStatus>>, RuntimeError> {
    let sdk = crate::invoke::lambda::sdk_config(&config.aws).await;
    let region = sdk
        .region()
        .map_or_else(|| "us-east-1".to_owned(), ToString::to_string);
    // One Lambda client (and connection pool) for every mapping.
    let lambda = aws_sdk_lambda::Client::new(&sdk);
    let mut tasks = JoinSet::new();
    let mut statuses = Vec::new();
    let account = config.account_id().to_owned();
    let mut schedules = Vec::new();
    for mapping in config.mappings {
        let status = Arc::new(MappingStatus::new(&mapping.name));
        statuses.push(status.clone());
        if !mapping.enabled {
            status.set(State::Disabled);
            tracing::info!(mapping = %mapping.name, "mapping disabled");
            continue;
        }
        let deliverer = deliverer(&mapping, &lambda, &region, &account, status);
        if let Source::Schedule(s) = &mapping.source {
            schedules.push(scheduled(&mapping, s, deliverer, &region, &account));
            continue;
        }
        let token = shutdown.clone();
        let span =
            tracing::info_span!("mapping", name = %mapping.name, source = mapping.source.kind());
        tasks.spawn(run_mapping(mapping, deliverer, token).instrument(span));
    }
    if !schedules.is_empty() {
        let store = config
            .schedules
            .store
            .as_ref()
            .map(|url| Arc::new(crate::source::schedule::store::Store::new(url)));
        let span = tracing::info_span!("schedules");
        tasks.spawn(
            crate::source::schedule::run(
                schedules,
                store,
                crate::source::schedule::Clock::System,
                shutdown.clone(),
            )
            .instrument(span),
        );
    }
    tracing::info!(tasks = tasks.len(), "gateway running");
    shutdown.cancelled().await;
    tracing::info!(grace = ?config.gateway.shutdown_grace, "shutting down");
    let drain = async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                return Err(RuntimeError::Panicked(e.to_string()));
            }
        }
        Ok(())
    };
    match tokio::time::timeout(config.gateway.shutdown_grace, drain).await {
        Ok(r) => r.map(|()| statuses),
        Err(_) => Err(RuntimeError::GraceExpired(config.gateway.shutdown_grace)),
    }
}

fn deliverer(
    mapping: &Mapping,
    lambda: &aws_sdk_lambda::Client,
    region: &str,
    account: &str,
    status: Arc<MappingStatus>,
) -> Arc<Deliverer> {
    let function = FunctionRef::parse(&mapping.function).expect("validated at load");
    let envelope = match &mapping.source {
        Source::Rabbitmq(s) => {
            let (vhost, event_source_arn) =
                crate::source::rabbitmq::vhost_and_arn(s, region, account);
            Envelope::Rabbit {
                event_source_arn,
                queue: s.queue.clone(),
                vhost,
            }
        }
        // Each partition task sets its own topic and partition.
        Source::Kafka(k) => Envelope::Kafka {
            bootstrap_servers: k.bootstrap_servers.clone(),
            topic: String::new(),
            partition: -1,
        },
        Source::Schedule(s) => Envelope::Schedule {
            name: mapping.name.clone(),
            arn: if s.input.is_some() {
                schedule_arn(&mapping.name, region, account)
            } else {
                rule_arn(&mapping.name, region, account)
            },
            expression: s.expression.0.to_string(),
        },
    };
    let r = &mapping.retry;
    Arc::new(Deliverer {
        mapping: status,
        invoker: Invoker::with_client(lambda.clone(), &mapping.function),
        function_arn: function.arn(region, account),
        envelope,
        policy: Policy {
            retries: mapping.retries(),
            max_age: mapping.max_record_age(),
            backoff_min: r.backoff_min,
            backoff_max: r.backoff_max,
            bisect: r.bisect_on_error,
            report_item_failures: mapping.report_batch_item_failures,
            max_payload: mapping.batch.max_bytes(),
        },
        destination: mapping
            .on_failure
            .as_ref()
            .map(|d| Arc::new(Destination::new(d, &mapping.name))),
    })
}

async fn run_mapping(mapping: Mapping, deliverer: Arc<Deliverer>, shutdown: CancellationToken) {
    let limits = BatchLimits {
        size: mapping.batch.size(),
        window: mapping.batch.window(),
        // The byte cap covers the whole event; the batcher counts only the records.
        max_bytes: mapping
            .batch
            .max_bytes()
            .saturating_sub(deliverer.envelope.overhead() + 256),
    };
    match &mapping.source {
        Source::Rabbitmq(s) => crate::source::rabbitmq::run(s, limits, deliverer, shutdown).await,
        Source::Kafka(k) => crate::source::kafka::run(k, limits, deliverer, shutdown).await,
        Source::Schedule(_) => unreachable!("schedules run in the one timer task"),
    }
}

/// The ARN a Scheduled Event names in `resources`: an EventBridge rule's.
fn rule_arn(name: &str, region: &str, account: &str) -> String {
    format!("arn:aws:events:{region}:{account}:rule/{name}")
}

/// The ARN `<aws.scheduler.schedule-arn>` stands for: a Scheduler schedule's, in the
/// default group.
fn schedule_arn(name: &str, region: &str, account: &str) -> String {
    format!("arn:aws:scheduler:{region}:{account}:schedule/default/{name}")
}

fn scheduled(
    mapping: &Mapping,
    source: &ScheduleSource,
    deliverer: Arc<Deliverer>,
    region: &str,
    account: &str,
) -> Scheduled {
    use crate::source::schedule::{Payload, Timing, When};
    let payload = match &source.input {
        Some(input) => Payload::Input {
            template: input.0.clone(),
            schedule_arn: schedule_arn(&mapping.name, region, account),
        },
        None => Payload::Event {
            account: account.to_owned(),
            region: region.to_owned(),
            rule_arn: rule_arn(&mapping.name, region, account),
        },
    };
    Scheduled {
        when: When {
            name: mapping.name.clone(),
            timing: Timing::new(source),
            window: source.flexible_window.map_or(Duration::ZERO, |w| w.0),
        },
        missed: source.missed,
        payload,
        max_age: mapping
            .max_record_age()
            .unwrap_or(crate::config::SCHEDULE_MAX_EVENT_AGE),
        deliverer,
    }
}
