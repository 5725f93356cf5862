//! Builds a running mapping from its configuration: the process-wide clients ([`Env`]),
//! the mapping's [`Deliverer`] (invoker, event shape, retry policy, destination,
//! filter) and its source's [`Context`]. No kind of source is special here: each says
//! through `SourceConfig` what it needs.

use std::sync::Arc;

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{Config, InvocationType, Mapping};
use crate::destination::Destination;
use crate::invoke::lambda::Invoker;
use crate::pipeline::batcher::BatchLimits;
use crate::pipeline::retry::{Deliverer, Policy};
use crate::source::{Context, schedule};
use crate::status::MappingStatus;

/// What every mapping is built from; rebuilt when `[aws]` or `[schedules]` changes.
pub(super) struct Env {
    /// What sources share: AWS settings, the schedules' ledger and timer.
    source: Arc<crate::source::Env>,
    /// Stops the ledger's prune loop when this configuration is replaced.
    _prune: Option<DropGuard>,
    /// One Lambda client (and connection pool) for every mapping: 10,000 schedules
    /// would otherwise build 10,000 clients.
    lambda: aws_sdk_lambda::Client,
}

impl Env {
    pub(super) async fn new(config: &Config, amqp: &crate::amqp::Pool) -> Arc<Env> {
        let sdk = crate::aws::sdk_config(&config.aws).await;
        let region = sdk
            .region()
            .map_or_else(|| "us-east-1".to_owned(), ToString::to_string);
        let store = config
            .schedules
            .store
            .as_ref()
            .map(|url| Arc::new(schedule::store::Store::new(url, config.schedules.lease)));
        // One prune loop per process and ledger, whatever the number of schedules.
        let prune = store.clone().map(|store| {
            let stop = CancellationToken::new();
            tokio::spawn(schedule::prune(store, stop.clone()));
            stop.drop_guard()
        });
        Arc::new(Env {
            lambda: aws_sdk_lambda::Client::new(&sdk),
            _prune: prune,
            source: Arc::new(crate::source::Env {
                sdk,
                region,
                account: config.account_id().to_owned(),
                schedule_store: store,
                schedule_timer: schedule::Timer::start(schedule::Clock::System),
                amqp: amqp.clone(),
            }),
        })
    }
}

impl Env {
    /// The process's AMQP pool, handed on to the next `Env`.
    pub(super) fn amqp(&self) -> &crate::amqp::Pool {
        &self.source.amqp
    }
}

/// The mapping's deliverer: everything its batches are delivered with.
pub(super) fn deliverer(
    mapping: &Mapping,
    env: &Env,
    status: Arc<MappingStatus>,
) -> Arc<Deliverer> {
    let asynchronous = mapping.invocation_type == InvocationType::Event;
    let (region, account) = (env.source.region.as_str(), env.source.account.as_str());
    let function = mapping
        .checked
        .function
        .as_ref()
        .expect("a mapping comes from Config::parse, which checked its function");
    let r = &mapping.retry;
    Arc::new(Deliverer {
        mapping: status,
        invoker: Invoker::with_client(
            env.lambda.clone(),
            &mapping.function,
            asynchronous,
            mapping.function_timeout(),
        ),
        function_arn: function.arn(region, account),
        shape: mapping.source.shape(&mapping.name, region, account),
        policy: Policy {
            retries: mapping.retries(),
            max_age: mapping.max_record_age(),
            backoff_min: r.backoff_min,
            backoff_max: r.backoff_max,
            bisect: r.bisect_on_error,
            report_item_failures: mapping.report_batch_item_failures,
            max_payload: mapping.max_payload(),
            exhausted: mapping.source.defaults().exhausted,
        },
        destination: mapping.on_failure.as_ref().map(|d| {
            let d = Arc::new(Destination::new(
                d,
                &mapping.name,
                &env.source.sdk,
                &env.source.amqp,
            ));
            // In the background: a slow answer must not hold up the mapping's start.
            let (check, name) = (d.clone(), mapping.name.clone());
            tokio::spawn(async move { check.check_retention(&name).await });
            d
        }),
        filter: mapping.checked.filter.clone(),
    })
}

/// Runs the mapping's source until `shutdown`.
pub(super) async fn run_mapping(
    mapping: Mapping,
    deliverer: Arc<Deliverer>,
    env: Arc<Env>,
    shutdown: CancellationToken,
) {
    let limits = BatchLimits {
        size: mapping.batch_size(),
        window: mapping.batch_window(),
        // The byte cap covers the whole event; the batcher counts only the records.
        max_bytes: mapping
            .max_payload()
            .saturating_sub(deliverer.shape.overhead() + 256),
        buffer_bytes: mapping.buffer_bytes(),
    };
    let context = Context {
        limits,
        deliverer,
        env: env.source.clone(),
        function_timeout: mapping.function_timeout,
        shutdown,
    };
    mapping.source.run(context).await
}
