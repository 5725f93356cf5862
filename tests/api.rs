//! The event source mapping API driven by the real AWS CLI (`aws lambda ...`, from the
//! stack's tools virtualenv) and boto3 (MiniStack's virtualenv) against the gateway
//! binary and the local stack: mappings created through the API deliver to a MiniStack
//! function, updates and deletes take effect, API mappings survive a restart, and
//! requests that are not properly signed are refused and change nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::amq::{Amq, amq_url, var};
use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(120);
const KEY_ID: &str = "AKIDESMGATEWAYTEST";
const SECRET: &str = "api-secret-5f1c9e0b7a2d4e6f8a";

/// The AWS CLI of the tools virtualenv.
fn aws_bin() -> std::path::PathBuf {
    let python =
        std::env::var("TOOLS_PYTHON").expect("TOOLS_PYTHON (eval \"$(scripts/stack env)\")");
    Path::new(&python).with_file_name("aws")
}

/// A gateway with the API enabled on a free port, keeping its mappings in `state`.
struct Api {
    gw: Gateway,
    url: String,
    /// The CA the CLI trusts (`--ca-bundle`), for an HTTPS listener.
    ca_bundle: Option<std::path::PathBuf>,
}

/// `[api]` with the test key pair (its secret from the environment) and `state_dir`.
fn api_table(port: u16, state: &Path) -> String {
    api_table_with(port, &format!("state_dir = \"{}\"", state.display()))
}

/// `[api]` with the test key pair, keeping its mappings as `storage` says (`state_dir`
/// or `store` and their options).
fn api_table_with(port: u16, storage: &str) -> String {
    format!(
        r#"
[api]
enabled = true
listen = "127.0.0.1:{port}"
{storage}

[[api.key]]
access_key_id = "{KEY_ID}"
secret_access_key = "${{ESM_API_SECRET}}"

[[broker]]
name = "local"
url = "amqp://127.0.0.1:5672"

[[secret]]
name = "rabbit"
username = "guest"
password = "${{RABBIT_PASSWORD}}"
"#
    )
}

impl Api {
    /// Starts a gateway on `config` (from [`api_table`] on) and waits for its API.
    async fn start(config: &str, port: u16) -> Api {
        let gw = Gateway::start_with_env(
            config,
            &[("ESM_API_SECRET", SECRET), ("RABBIT_PASSWORD", "guest")],
        );
        gw.wait_log("event source mapping API listening", LONG)
            .await;
        Api {
            gw,
            url: format!("http://127.0.0.1:{port}"),
            ca_bundle: None,
        }
    }

    /// Starts a gateway on a free port whose `[api]` keeps its mappings as `storage`
    /// says (see [`api_table_with`]).
    async fn start_on(storage: &str) -> Api {
        let port = free_port();
        Api::start(&(gateway_header() + &api_table_with(port, storage)), port).await
    }

    /// `aws lambda <args>` against the API: exit code, parsed stdout (Null when empty),
    /// stderr.
    fn cli(&self, args: &[&str]) -> (i32, Value, String) {
        self.cli_of("lambda", args)
    }

    /// `aws <service> <args>` against the API, as [`Api::cli`].
    fn cli_of(&self, service: &str, args: &[&str]) -> (i32, Value, String) {
        let out = Command::new(aws_bin())
            .arg(service)
            .args(args)
            .args([
                "--endpoint-url",
                &self.url,
                "--region",
                "us-east-1",
                "--output",
                "json",
            ])
            .args(
                self.ca_bundle
                    .iter()
                    .flat_map(|ca| [std::ffi::OsStr::new("--ca-bundle"), ca.as_os_str()]),
            )
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_PROFILE")
            .env("AWS_PAGER", "")
            .env("AWS_MAX_ATTEMPTS", "1")
            .output()
            .expect("run the AWS CLI (installed by scripts/stack into the tools virtualenv)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
        };
        (
            out.status.code().unwrap_or(-1),
            value,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `aws lambda <args>` that must succeed; its output.
    fn ok(&self, args: &[&str]) -> Value {
        let (code, value, err) = self.cli(args);
        assert_eq!(code, 0, "aws lambda {args:?}: {err}");
        value
    }

    /// `aws lambda create-event-source-mapping` from the queue at `url` into `function`,
    /// with `extra` arguments; its answer.
    fn create_sqs(&self, function: &str, url: &str, extra: &[&str]) -> Value {
        let arn = sqs_arn(url);
        let mut args = vec![
            "create-event-source-mapping",
            "--function-name",
            function,
            "--event-source-arn",
            &arn,
        ];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    /// `aws scheduler create-schedule` of `name`, at 03:00 every day, into `function`.
    fn nightly_schedule(&self, name: &str, function: &str) {
        let target = serde_json::json!({
            "Arn": function_arn(function),
            "RoleArn": "arn:aws:iam::000000000000:role/scheduler",
        })
        .to_string();
        let (code, _, err) = self.cli_of(
            "scheduler",
            &[
                "create-schedule",
                "--name",
                name,
                "--schedule-expression",
                "cron(0 3 * * ? *)",
                "--flexible-time-window",
                "Mode=OFF",
                "--target",
                &target,
            ],
        );
        assert_eq!(code, 0, "{err}");
    }

    /// How many schedule mappings the gateway runs.
    fn schedules_running(&self) -> usize {
        self.gw
            .mappings()
            .iter()
            .filter(|m| m["source"] == "schedule")
            .count()
    }

    /// Polls `get-event-source-mapping` until the mapping is in `state`.
    async fn wait_state(&self, uuid: &str, state: &str) -> Value {
        wait_for(&format!("mapping {uuid} to be {state}"), LONG, || {
            let v = self.ok(&["get-event-source-mapping", "--uuid", uuid]);
            (v["State"] == state).then_some(v)
        })
        .await
    }
}

fn sqs_arn(url: &str) -> String {
    let name = url.rsplit('/').next().unwrap();
    format!("arn:aws:sqs:us-east-1:000000000000:{name}")
}

fn function_arn(name: &str) -> String {
    format!("arn:aws:lambda:us-east-1:000000000000:function:{name}")
}

fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A new one-partition topic.
async fn kafka_topic() -> String {
    let topic = unique("api-kafka");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create()
            .unwrap();
    let made = admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &topic,
                1,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .expect("create the topic (is `scripts/stack up` running?)");
    assert!(made[0].is_ok(), "{made:?}");
    topic
}

/// Produces one record and waits for its delivery report.
async fn produce(topic: &str, body: &str) {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::<(), _>::to(topic).payload(body),
            Duration::from_secs(30),
        )
        .await
        .expect("produce");
}

/// The `--self-managed-event-source` of the local Kafka.
fn kafka_source() -> String {
    format!(
        r#"{{"Endpoints":{{"KAFKA_BOOTSTRAP_SERVERS":["{}"]}}}}"#,
        bootstrap()
    )
}

/// The arguments of `create-event-source-mapping` for `function` reading `topic` of the
/// cluster at `endpoints` from its start.
fn kafka_mapping<'a>(function: &'a str, endpoints: &'a str, topic: &'a str) -> Vec<&'a str> {
    vec![
        "create-event-source-mapping",
        "--function-name",
        function,
        "--self-managed-event-source",
        endpoints,
        "--topics",
        topic,
        "--starting-position",
        "TRIM_HORIZON",
    ]
}

/// Bodies the function received, in order.
fn bodies(f: &Function) -> Vec<String> {
    f.invocations().into_iter().flat_map(|i| i.bodies).collect()
}

#[tokio::test]
async fn an_sqs_mapping_is_created_listed_updated_and_deleted_with_the_aws_cli() {
    let sqs = sqs_client().await;
    let url = create_queue(&sqs, "api-sqs", false, 30).await;
    let f = Function::deploy("api-sqs", &[]).await;
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = Api::start(&(gateway_header() + &api_table(port, state.path())), port).await;

    let created = api.create_sqs(&f.name, &url, &["--batch-size", "5"]);
    let uuid = created["UUID"].as_str().unwrap().to_owned();
    assert_eq!(created["State"], "Creating");
    assert_eq!(created["BatchSize"], 5);
    assert_eq!(created["FunctionArn"], function_arn(&f.name));
    assert_eq!(created["EventSourceArn"], sqs_arn(&url));
    assert_eq!(
        created["EventSourceMappingArn"],
        format!("arn:aws:lambda:us-east-1:000000000000:event-source-mapping:{uuid}")
    );
    // Fields AWS does not return for SQS are not returned (Terraform would replace the
    // mapping on every apply otherwise).
    for absent in [
        "StartingPosition",
        "MaximumRetryAttempts",
        "Topics",
        "Queues",
    ] {
        assert!(created.get(absent).is_none(), "{absent} in {created}");
    }

    send(
        &sqs,
        &url,
        &[(None, "a".into()), (None, "b".into()), (None, "c".into())],
    )
    .await;
    let mut got = f.wait_delivered(3, LONG).await;
    got.sort();
    assert_eq!(got, ["a", "b", "c"]);
    let enabled = api.wait_state(&uuid, "Enabled").await;
    assert!(enabled["LastModified"].is_number(), "{enabled}");

    let listed = api.ok(&["list-event-source-mappings", "--function-name", &f.name]);
    let uuids: Vec<&str> = listed["EventSourceMappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["UUID"].as_str().unwrap())
        .collect();
    assert_eq!(uuids, [uuid.as_str()]);

    // Disable and shrink the batch: the runtime follows.
    let updated = api.ok(&[
        "update-event-source-mapping",
        "--uuid",
        &uuid,
        "--batch-size",
        "2",
        "--no-enabled",
    ]);
    assert_eq!(updated["BatchSize"], 2);
    api.wait_state(&uuid, "Disabled").await;
    assert_eq!(api.gw.mapping(&uuid)["state"], "disabled");
    let before = f.invocations().len();
    let bodies: Vec<_> = (0..6).map(|i| (None, format!("late-{i}"))).collect();
    send(&sqs, &url, &bodies).await;
    api.ok(&["update-event-source-mapping", "--uuid", &uuid, "--enabled"]);
    f.wait_delivered(9, LONG).await;
    let after = &f.invocations()[before..];
    assert!(
        after.iter().all(|i| i.bodies.len() <= 2),
        "batch size 2 applies"
    );

    let deleted = api.ok(&["delete-event-source-mapping", "--uuid", &uuid]);
    assert_eq!(deleted["State"], "Deleting");
    let (code, _, err) = api.cli(&["get-event-source-mapping", "--uuid", &uuid]);
    assert_ne!(code, 0);
    assert!(err.contains("ResourceNotFoundException"), "{err}");
    wait_for("the mapping to stop", LONG, || {
        (!api.gw.mappings().iter().any(|m| m["name"] == uuid.as_str())).then_some(())
    })
    .await;
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn kafka_and_rabbitmq_mappings_take_aws_fields_and_deliver() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("api-rmq").await;
    let topic = kafka_topic().await;
    let f = Function::deploy("api-brokers", &[]).await;
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = Api::start(&(gateway_header() + &api_table(port, state.path())), port).await;

    let broker = "arn:aws:mq:us-east-1:000000000000:broker:local:b-0001";
    let mq = api.ok(&[
        "create-event-source-mapping",
        "--function-name",
        &f.name,
        "--event-source-arn",
        broker,
        "--queues",
        &queue,
        "--source-access-configurations",
        "Type=VIRTUAL_HOST,URI=/",
        // The broker's credentials: a [[secret]] of the file, named as AWS names a
        // Secrets Manager secret.
        "Type=BASIC_AUTH,URI=arn:aws:secretsmanager:us-east-1:000000000000:secret:rabbit-AbCdEf",
        "--batch-size",
        "10",
    ]);
    assert_eq!(mq["Queues"], serde_json::json!([queue]));
    assert!(mq.get("StartingPosition").is_none(), "{mq}");
    let endpoints = kafka_source();
    let kafka = api.ok(&kafka_mapping(&f.name, &endpoints, &topic));
    let kafka_uuid = kafka["UUID"].as_str().unwrap();
    assert_eq!(kafka["StartingPosition"], "TRIM_HORIZON");
    assert_eq!(kafka["Topics"], serde_json::json!([topic]));
    // AWS's default consumer group is the mapping's UUID.
    assert_eq!(
        kafka["SelfManagedKafkaEventSourceConfig"]["ConsumerGroupId"],
        kafka_uuid
    );
    api.wait_state(mq["UUID"].as_str().unwrap(), "Enabled")
        .await;
    api.wait_state(kafka_uuid, "Enabled").await;

    rabbit.publish(&queue, [b"from-rabbit".to_vec()]).await;
    produce(&topic, "from-kafka").await;
    let got = wait_for("both records", LONG, || {
        let bodies: Vec<String> = f.invocations().into_iter().flat_map(|i| i.bodies).collect();
        (bodies.iter().any(|b| b == "from-rabbit") && bodies.iter().any(|b| b == "from-kafka"))
            .then_some(bodies)
    })
    .await;
    assert!(got.len() >= 2, "{got:?}");

    // A broker the file does not define is refused, naming the registry.
    let (code, _, err) = api.cli(&[
        "create-event-source-mapping",
        "--function-name",
        &f.name,
        "--event-source-arn",
        "arn:aws:mq:us-east-1:000000000000:broker:elsewhere:b-2",
        "--queues",
        &queue,
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("InvalidParameterValueException") && err.contains("[[broker]]"),
        "{err}"
    );
    assert_eq!(api.gw.terminate().await.code(), Some(0));
    rabbit.delete(&queue).await;
}

#[tokio::test]
async fn api_mappings_survive_a_restart_and_file_mappings_are_read_only() {
    let sqs = sqs_client().await;
    let url = create_queue(&sqs, "api-restart", false, 30).await;
    let file_url = create_queue(&sqs, "api-file", false, 30).await;
    let f = Function::deploy("api-restart", &[]).await;
    let state = tempfile::tempdir().unwrap();
    let config = |port| {
        gateway_header()
            + &api_table(port, state.path())
            + &mapping(
                "from-file",
                &f.name,
                "",
                &format!("type = \"sqs\"\nqueue_url = \"{file_url}\"\n"),
            )
    };
    let port = free_port();
    let api = Api::start(&config(port), port).await;
    let created = api.create_sqs(&f.name, &url, &[]);
    let uuid = created["UUID"].as_str().unwrap().to_owned();
    let topic = kafka_topic().await;
    let kafka = api.ok(&[
        "create-event-source-mapping",
        "--function-name",
        &f.name,
        "--self-managed-event-source",
        &kafka_source(),
        "--topics",
        &topic,
        "--starting-position",
        "TRIM_HORIZON",
    ]);
    let kafka_uuid = kafka["UUID"].as_str().unwrap().to_owned();
    let schedule = unique("api-keep");
    api.nightly_schedule(&schedule, &f.name);
    produce(&topic, "kafka-before").await;
    wait_for("the record before the restart", LONG, || {
        bodies(&f)
            .contains(&"kafka-before".to_owned())
            .then_some(())
    })
    .await;
    let listed = api.ok(&["list-event-source-mappings"]);
    let file_uuid = listed["EventSourceMappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["EventSourceArn"] == sqs_arn(&file_url))
        .expect("the file's mapping is listed")["UUID"]
        .as_str()
        .unwrap()
        .to_owned();
    // The file's mapping: read-only but for Enabled.
    let (code, _, err) = api.cli(&[
        "update-event-source-mapping",
        "--uuid",
        &file_uuid,
        "--batch-size",
        "3",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("ResourceConflictException") && err.contains("configuration file"),
        "{err}"
    );
    let (code, _, err) = api.cli(&["delete-event-source-mapping", "--uuid", &file_uuid]);
    assert!(
        code != 0 && err.contains("ResourceConflictException"),
        "{err}"
    );
    api.ok(&[
        "update-event-source-mapping",
        "--uuid",
        &file_uuid,
        "--no-enabled",
    ]);
    api.wait_state(&file_uuid, "Disabled").await;
    assert_eq!(api.gw.terminate().await.code(), Some(0));

    // The state file names no credential.
    let stored = std::fs::read_to_string(state.path().join("api-mappings.json")).unwrap();
    assert!(stored.contains(&uuid) && !stored.contains("guest:guest") && !stored.contains(SECRET));

    let port = free_port();
    let api = Api::start(&config(port), port).await;
    let listed = api.ok(&["list-event-source-mappings"]);
    let uuids: Vec<&str> = listed["EventSourceMappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["UUID"].as_str().unwrap())
        .collect();
    assert!(
        uuids.contains(&uuid.as_str()) && uuids.contains(&file_uuid.as_str()),
        "{uuids:?}"
    );
    assert!(uuids.contains(&kafka_uuid.as_str()), "{uuids:?}");
    // The schedule is back, and runs.
    let (code, got, err) = api.cli_of("scheduler", &["get-schedule", "--name", &schedule]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(got["ScheduleExpression"], "cron(0 3 * * ? *)");
    assert_eq!(api.schedules_running(), 1);
    send(&sqs, &url, &[(None, "after-restart".into())]).await;
    produce(&topic, "kafka-after").await;
    // The Kafka mapping resumes from its committed offset: by the time the record
    // after the restart arrives, the one before it has not come again (the partition
    // is delivered in order, so a restart from the beginning would have).
    let got = wait_for("both records after the restart", LONG, || {
        let b = bodies(&f);
        (b.contains(&"after-restart".to_owned()) && b.contains(&"kafka-after".to_owned()))
            .then_some(b)
    })
    .await;
    assert_eq!(
        got.iter().filter(|b| *b == "kafka-before").count(),
        1,
        "{got:?}"
    );
    api.wait_state(&uuid, "Enabled").await;
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

/// boto3: a wrong secret, an unknown key, a clock 10 minutes off and no signature are
/// each refused with AWS's error, and nothing is created; a signed request passes.
const REFUSALS: &str = r#"
import datetime, json, sys
import boto3, botocore, botocore.auth
from botocore import UNSIGNED
from botocore.config import Config
endpoint, key, secret, arn, function = sys.argv[1:6]
def client(k, s, **extra):
    return boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=k, aws_secret_access_key=s,
        config=Config(retries={"max_attempts": 1}, **extra))
out = {}
def attempt(name, c):
    try:
        c.create_event_source_mapping(FunctionName=function, EventSourceArn=arn)
        out[name] = "accepted"
    except botocore.exceptions.ClientError as e:
        out[name] = [e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]]
attempt("wrong_secret", client(key, "x" * 40))
attempt("unknown_key", client("AKIDUNKNOWN0000000", secret))
real = botocore.auth.get_current_datetime
botocore.auth.get_current_datetime = lambda: real() - datetime.timedelta(minutes=10)
attempt("skewed", client(key, secret))
botocore.auth.get_current_datetime = real
attempt("unsigned", client(key, secret, signature_version=UNSIGNED))
out["after_refusals"] = client(key, secret).list_event_source_mappings()["EventSourceMappings"]
created = client(key, secret).create_event_source_mapping(FunctionName=function, EventSourceArn=arn, BatchSize=3)
del created["ResponseMetadata"]
out["created"] = created
print(json.dumps(out, default=str))
"#;

#[tokio::test]
async fn unsigned_wrongly_signed_and_skewed_requests_are_refused_and_change_nothing() {
    let sqs = sqs_client().await;
    let url = create_queue(&sqs, "api-auth", false, 30).await;
    let f = Function::deploy("api-auth", &[]).await;
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = Api::start(&(gateway_header() + &api_table(port, state.path())), port).await;
    let python =
        std::env::var("STACK_PYTHON").expect("STACK_PYTHON (eval \"$(scripts/stack env)\")");
    let out = Command::new(python)
        .arg("-c")
        .arg(REFUSALS)
        .args([&api.url, KEY_ID, SECRET, &sqs_arn(&url), &f.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        r["wrong_secret"],
        serde_json::json!(["InvalidSignatureException", 403])
    );
    assert_eq!(
        r["unknown_key"],
        serde_json::json!(["UnrecognizedClientException", 403])
    );
    assert_eq!(
        r["skewed"],
        serde_json::json!(["InvalidSignatureException", 403])
    );
    assert_eq!(
        r["unsigned"],
        serde_json::json!(["MissingAuthenticationTokenException", 403])
    );
    assert_eq!(
        r["after_refusals"],
        serde_json::json!([]),
        "nothing was created"
    );
    assert_eq!(r["created"]["BatchSize"], 3);
    // The secret is in no response and no log line.
    assert!(!stdout.contains(SECRET));
    let uuid = r["created"]["UUID"].as_str().unwrap().to_owned();
    api.wait_state(&uuid, "Enabled").await;
    assert!(!api.gw.log_contains(SECRET));
    assert!(api.gw.log_count("API request refused") >= 4);
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

/// Terraform's `aws_lambda_event_source_mapping` sequence, replayed with boto3 (the
/// provider's calls, in its order): create with tags, poll Get until Enabled, read back
/// (Get, ListTags on the mapping ARN), update, poll, read back, delete, poll until 404.
/// Every read-back field equals what was configured (no drift); pagination pages.
const TERRAFORM: &str = r#"
import json, sys, time
import boto3, botocore
from botocore.config import Config
endpoint, key, secret, function = sys.argv[1:5]
arns = sys.argv[5:]
c = boto3.client("lambda", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id=key, aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1}))
def wait(uuid, states):
    for _ in range(600):
        try:
            m = c.get_event_source_mapping(UUID=uuid)
        except c.exceptions.ResourceNotFoundException:
            if states is None:
                return None
            raise
        if states is not None and m["State"] in states:
            return m
        time.sleep(0.1)
    raise SystemExit("timed out waiting for %s to be %s" % (uuid, states))
drift = []
def expect(m, field, want):
    if m.get(field) != want:
        drift.append([field, m.get(field), want])
created = c.create_event_source_mapping(FunctionName=function, EventSourceArn=arns[0],
    BatchSize=4, MaximumBatchingWindowInSeconds=2, Enabled=True, Tags={"team": "orders"})
uuid = created["UUID"]
m = wait(uuid, ["Enabled", "Disabled"])
tags = c.list_tags(Resource=m["EventSourceMappingArn"])["Tags"]
for field, want in [("BatchSize", 4), ("MaximumBatchingWindowInSeconds", 2),
        ("EventSourceArn", arns[0]), ("State", "Enabled"),
        ("FunctionArn", "arn:aws:lambda:us-east-1:000000000000:function:" + function),
        ("EventSourceMappingArn", created["EventSourceMappingArn"])]:
    expect(m, field, want)
if tags != {"team": "orders"}:
    drift.append(["Tags", tags])
for absent in ["StartingPosition", "StartingPositionTimestamp", "MaximumRetryAttempts",
        "MaximumRecordAgeInSeconds", "BisectBatchOnFunctionError", "ParallelizationFactor"]:
    if absent in m:
        drift.append([absent, m[absent], None])
c.tag_resource(Resource=m["EventSourceMappingArn"], Tags={"env": "test"})
c.untag_resource(Resource=m["EventSourceMappingArn"], TagKeys=["team"])
if c.list_tags(Resource=m["EventSourceMappingArn"])["Tags"] != {"env": "test"}:
    drift.append(["Tags after tag/untag"])
c.update_event_source_mapping(UUID=uuid, BatchSize=8, Enabled=False)
m = wait(uuid, ["Disabled"])
expect(m, "BatchSize", 8)
expect(m, "MaximumBatchingWindowInSeconds", 2)
# Pagination over the others.
others = [c.create_event_source_mapping(FunctionName=function, EventSourceArn=a)["UUID"] for a in arns[1:]]
page = c.list_event_source_mappings(FunctionName=function, MaxItems=2)
seen = [x["UUID"] for x in page["EventSourceMappings"]]
pages = 1
while "NextMarker" in page:
    page = c.list_event_source_mappings(FunctionName=function, MaxItems=2, Marker=page["NextMarker"])
    seen += [x["UUID"] for x in page["EventSourceMappings"]]
    pages += 1
c.delete_event_source_mapping(UUID=uuid)
wait(uuid, None)
for o in others:
    c.delete_event_source_mapping(UUID=o)
print(json.dumps({"drift": drift, "seen": sorted(seen), "all": sorted([uuid] + others), "pages": pages}))
"#;

#[tokio::test]
async fn terraforms_sequence_replayed_with_boto3_succeeds_without_drift() {
    let sqs = sqs_client().await;
    let mut arns = Vec::new();
    for _ in 0..3 {
        arns.push(sqs_arn(&create_queue(&sqs, "api-tf", false, 30).await));
    }
    let f = Function::deploy("api-tf", &[]).await;
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = Api::start(&(gateway_header() + &api_table(port, state.path())), port).await;
    let python =
        std::env::var("STACK_PYTHON").expect("STACK_PYTHON (eval \"$(scripts/stack env)\")");
    let out = Command::new(python)
        .arg("-c")
        .arg(TERRAFORM)
        .args([api.url.as_str(), KEY_ID, SECRET, &f.name])
        .args(&arns)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["drift"], serde_json::json!([]), "{r}");
    assert_eq!(
        r["seen"], r["all"],
        "every mapping listed once across pages"
    );
    assert_eq!(r["pages"], 2);
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn aws_scheduler_create_schedule_fires_the_function() {
    let f = Function::deploy("api-sched", &[]).await;
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = Api::start(&(gateway_header() + &api_table(port, state.path())), port).await;
    let name = unique("api-schedule");
    let target = serde_json::json!({
        "Arn": function_arn(&f.name),
        "RoleArn": "arn:aws:iam::000000000000:role/scheduler",
        "Input": r#"{"from":"scheduler"}"#,
    })
    .to_string();
    let (code, created, err) = api.cli_of(
        "scheduler",
        &[
            "create-schedule",
            "--name",
            &name,
            // The gateway's own seconds rate (AWS's smallest is a minute).
            "--schedule-expression",
            "rate(2 seconds)",
            "--flexible-time-window",
            "Mode=OFF",
            "--target",
            &target,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        created["ScheduleArn"],
        format!("arn:aws:scheduler:us-east-1:000000000000:schedule/default/{name}")
    );
    let fired = f.wait_invocations(1, LONG).await;
    assert_eq!(
        fired[0].event.as_ref().map(|e| e["from"].clone()),
        Some("scheduler".into()),
        "{:?}",
        fired[0].event
    );
    let (code, got, err) = api.cli_of("scheduler", &["get-schedule", "--name", &name]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(got["State"], "ENABLED");
    assert_eq!(got["ScheduleExpression"], "rate(2 seconds)");
    let (code, _, err) = api.cli_of("scheduler", &["delete-schedule", "--name", &name]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = api.cli_of("scheduler", &["get-schedule", "--name", &name]);
    assert!(
        code != 0 && err.contains("ResourceNotFoundException"),
        "{err}"
    );
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

/// `aws scheduler <args>` that must succeed; its output.
fn scheduler_ok(api: &Api, args: &[&str]) -> Value {
    let (code, value, err) = api.cli_of("scheduler", args);
    assert_eq!(code, 0, "aws scheduler {args:?}: {err}");
    value
}

/// The names a `list-schedules` page holds.
fn schedule_names(page: &Value) -> Vec<&str> {
    page["Schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn aws_scheduler_updates_lists_and_dead_letters_schedules() {
    let sqs = sqs_client().await;
    let dlq = sqs_queue(&sqs, "api-sched-dlq").await;
    let f = Function::deploy("api-sched-dlq", &[("FAIL_SCHEDULE", "1")]).await;
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = Api::start(&(gateway_header() + &api_table(port, state.path())), port).await;
    let prefix = unique("api-sched");
    let (a, b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let target = |input: &str, dead_letter: bool| {
        let mut t = serde_json::json!({
            "Arn": function_arn(&f.name),
            "RoleArn": "arn:aws:iam::000000000000:role/scheduler",
            "Input": input,
            "RetryPolicy": {"MaximumRetryAttempts": 0, "MaximumEventAgeInSeconds": 60},
        });
        if dead_letter {
            t["DeadLetterConfig"] = serde_json::json!({"Arn": sqs_arn(&dlq)});
        }
        t.to_string()
    };
    let schedule = |op: &str, name: &str, expression: &str, target: &str, state: &str| {
        scheduler_ok(
            &api,
            &[
                op,
                "--name",
                name,
                "--schedule-expression",
                expression,
                "--flexible-time-window",
                "Mode=OFF",
                "--target",
                target,
                "--state",
                state,
            ],
        )
    };
    schedule(
        "create-schedule",
        &a,
        "rate(2 seconds)",
        &target(r#"{"v":1}"#, true),
        "ENABLED",
    );
    schedule(
        "create-schedule",
        &b,
        "rate(1 hour)",
        &target("{}", false),
        "DISABLED",
    );

    // No retries: the failed fire goes straight to the dead-letter queue.
    let record: Value = wait_for_message(&sqs, &dlq).await;
    assert_eq!(
        record["requestContext"]["condition"], "RetryAttemptsExhausted",
        "{record}"
    );
    assert_eq!(record["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(record["payload"]["v"], 1, "{record}");

    // ListSchedules filters by prefix and state, and pages with NextToken.
    let all = scheduler_ok(&api, &["list-schedules", "--name-prefix", &prefix]);
    assert_eq!(schedule_names(&all), [a.as_str(), b.as_str()]);
    assert_eq!(all["Schedules"][0]["Target"]["Arn"], function_arn(&f.name));
    assert_eq!(all["Schedules"][1]["State"], "DISABLED");
    let disabled = scheduler_ok(
        &api,
        &[
            "list-schedules",
            "--name-prefix",
            &prefix,
            "--state",
            "DISABLED",
        ],
    );
    assert_eq!(schedule_names(&disabled), [b.as_str()]);
    let first = scheduler_ok(
        &api,
        &[
            "list-schedules",
            "--name-prefix",
            &prefix,
            "--max-results",
            "1",
            "--no-paginate",
        ],
    );
    assert_eq!(schedule_names(&first), [a.as_str()]);
    assert_eq!(first["NextToken"], a.as_str(), "{first}");
    // The CLI follows NextToken through pages of one.
    let paged = scheduler_ok(
        &api,
        &[
            "list-schedules",
            "--name-prefix",
            &prefix,
            "--page-size",
            "1",
        ],
    );
    assert_eq!(schedule_names(&paged), [a.as_str(), b.as_str()]);

    // UpdateSchedule replaces the schedule, and the runtime fires the new one.
    let before = f.invocations().len();
    let updated = schedule(
        "update-schedule",
        &a,
        "rate(3 seconds)",
        &target(r#"{"v":2}"#, false),
        "ENABLED",
    );
    assert_eq!(
        updated["ScheduleArn"],
        format!("arn:aws:scheduler:us-east-1:000000000000:schedule/default/{a}")
    );
    wait_for("an invoke of the updated schedule", LONG, || {
        f.invocations()[before..]
            .iter()
            .any(|i| i.event.as_ref().is_some_and(|e| e["v"] == 2))
            .then_some(())
    })
    .await;
    let got = scheduler_ok(&api, &["get-schedule", "--name", &a]);
    assert_eq!(got["ScheduleExpression"], "rate(3 seconds)");
    assert!(got["Target"].get("DeadLetterConfig").is_none(), "{got}");
    // The update (seconds after the creation) moved LastModificationDate only.
    assert!(
        got["LastModificationDate"].as_f64() > got["CreationDate"].as_f64(),
        "{got}"
    );

    // Out of Scheduler's limits, or naming no schedule: refused.
    let mut bad: Value = serde_json::from_str(&target("{}", false)).unwrap();
    bad["RetryPolicy"]["MaximumRetryAttempts"] = 186.into();
    let (code, _, err) = api.cli_of(
        "scheduler",
        &[
            "update-schedule",
            "--name",
            &a,
            "--schedule-expression",
            "rate(1 hour)",
            "--flexible-time-window",
            "Mode=OFF",
            "--target",
            &bad.to_string(),
        ],
    );
    assert!(
        code != 0 && err.contains("ValidationException") && err.contains("MaximumRetryAttempts"),
        "{err}"
    );
    let (code, _, err) = api.cli_of(
        "scheduler",
        &[
            "update-schedule",
            "--name",
            &format!("{prefix}-none"),
            "--schedule-expression",
            "rate(1 hour)",
            "--flexible-time-window",
            "Mode=OFF",
            "--target",
            &target("{}", false),
        ],
    );
    assert!(
        code != 0 && err.contains("ResourceNotFoundException"),
        "{err}"
    );
    for name in [&a, &b] {
        scheduler_ok(&api, &["delete-schedule", "--name", name]);
    }
    let none = scheduler_ok(&api, &["list-schedules", "--name-prefix", &prefix]);
    assert_eq!(schedule_names(&none), Vec::<&str>::new());
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

/// The first message of an SQS queue, parsed as JSON (polled with long waits).
async fn wait_for_message(sqs: &aws_sdk_sqs::Client, url: &str) -> Value {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let got = sqs
            .receive_message()
            .queue_url(url)
            .wait_time_seconds(5)
            .send()
            .await
            .unwrap();
        if let Some(m) = got.messages().first() {
            return serde_json::from_str(m.body().unwrap()).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message in {url}"
        );
    }
}

#[tokio::test]
async fn an_api_mapping_parks_into_a_destination_the_file_names_and_follows_a_reload() {
    let topic = kafka_topic().await;
    let f = Function::deploy("api-named-dest", &[("FAIL_ALL", "1")]).await;
    let state = tempfile::tempdir().unwrap();
    let parked = state.path().join("parked.jsonl");
    let port = free_port();
    let config = format!(
        "{}{}\n[[destination]]\nname = \"parked\"\ntype = \"file\"\npath = \"{}\"\n",
        gateway_header(),
        api_table(port, state.path()),
        parked.display()
    );
    let api = Api::start(&config, port).await;
    let endpoints = kafka_source();
    let create = |destination: &str| {
        let on_failure = format!("OnFailure={{Destination={destination}}}");
        let mut args = kafka_mapping(&f.name, &endpoints, &topic);
        args.extend([
            "--maximum-retry-attempts",
            "0",
            "--destination-config",
            &on_failure,
        ]);
        api.cli(&args)
    };
    let (code, created, err) = create("esm-gateway:destination:parked");
    assert_eq!(code, 0, "{err}");
    let uuid = created["UUID"].as_str().unwrap().to_owned();
    // The name is kept as sent (no path leaks into the API).
    assert_eq!(
        created["DestinationConfig"]["OnFailure"]["Destination"],
        "esm-gateway:destination:parked"
    );
    api.wait_state(&uuid, "Enabled").await;
    produce(&topic, "doomed").await;
    let records = wait_for("the parked record", LONG, || {
        let r = failure_records(&parked);
        (!r.is_empty()).then_some(r)
    })
    .await;
    let r = &records[0];
    assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(r["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(r["KafkaBatchInfo"]["bootstrapServers"], bootstrap(), "{r}");

    // One file takes one mapping's records; an unknown name is refused.
    let (code, _, err) = create("esm-gateway:destination:parked");
    assert!(
        code != 0 && err.contains("ResourceConflictException") && err.contains(&uuid),
        "{err}"
    );
    let (code, _, err) = create("esm-gateway:destination:nowhere");
    assert!(
        code != 0
            && err.contains("InvalidParameterValueException")
            && err.contains("[[destination]]"),
        "{err}"
    );

    // A reload that moves the destination reaches the API's mapping: it restarts
    // (subscribing again) and parks into the new file.
    let moved = state.path().join("moved.jsonl");
    api.gw.rewrite_config(
        &config.replace(&parked.display().to_string(), &moved.display().to_string()),
    );
    api.gw.signal("HUP");
    api.gw.wait_log_count("consumer subscribed", 2, LONG).await;
    produce(&topic, "doomed-too").await;
    wait_for("the record in the moved file", LONG, || {
        (!failure_records(&moved).is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        failure_records(&parked).len(),
        1,
        "nothing more in the old file"
    );
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

#[tokio::test]
async fn an_activemq_mapping_is_made_by_amazon_mq_arn_with_basic_auth() {
    let mut amq = Amq::connect().await;
    let queue = unique("api-amq");
    let f = Function::deploy("api-amq", &[("LOG_EVENT", "1")]).await;
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let password = var("ESM_ACTIVEMQ_PASSWORD", "esm-stack");
    let config = format!(
        "{}{}\n[[broker]]\nname = \"amq\"\nurl = \"{}\"\n\n[[secret]]\nname = \"amq-login\"\nusername = \"{}\"\npassword = \"{password}\"\n\n\
         [[broker]]\nname = \"amq-tls\"\nurl = \"{}\"\n\n[[secret]]\nname = \"amq-ca\"\nca_file = \"{}\"\n",
        gateway_header(),
        api_table(port, state.path()),
        amq_url(),
        var("ESM_ACTIVEMQ_USER", "esm"),
        std::env::var("ESM_ACTIVEMQ_TLS_URL")
            .expect("ESM_ACTIVEMQ_TLS_URL (eval \"$(scripts/stack env)\")"),
        std::env::var("ESM_ACTIVEMQ_CA_FILE")
            .expect("ESM_ACTIVEMQ_CA_FILE (eval \"$(scripts/stack env)\")"),
    );
    let api = Api::start(&config, port).await;
    let arn = "arn:aws:mq:us-east-1:000000000000:broker:amq:b-0002";
    let create = |access: &str| {
        api.cli(&[
            "create-event-source-mapping",
            "--function-name",
            &f.name,
            "--event-source-arn",
            arn,
            "--queues",
            &queue,
            "--source-access-configurations",
            access,
            "--batch-size",
            "5",
        ])
    };
    // AWS's ActiveMQ mappings have no virtual hosts.
    let (code, _, err) = create("Type=VIRTUAL_HOST,URI=/");
    assert!(
        code != 0 && err.contains("VIRTUAL_HOST") && err.contains("ActiveMQ"),
        "{err}"
    );
    let (code, created, err) = create(
        "Type=BASIC_AUTH,URI=arn:aws:secretsmanager:us-east-1:000000000000:secret:amq-login-AbCdEf",
    );
    assert_eq!(code, 0, "{err}");
    let uuid = created["UUID"].as_str().unwrap().to_owned();
    assert_eq!(created["EventSourceArn"], arn);
    assert_eq!(created["Queues"], serde_json::json!([queue]));
    assert!(!created.to_string().contains(&password), "{created}");
    api.wait_state(&uuid, "Enabled").await;
    assert_eq!(api.gw.mapping(&uuid)["source"], "activemq");

    amq.publish(&queue, &[b"from-activemq".to_vec()]).await;
    assert_eq!(f.wait_delivered(1, LONG).await, ["from-activemq"]);
    let event = f.invocations()[0].event.clone();
    assert_eq!(
        event.as_ref().map(|e| e["eventSourceArn"].clone()),
        Some(arn.into()),
        "{event:?}"
    );
    amq.wait_depth(&queue, 0, LONG).await;

    // Over stomp+ssl, trusting the stack's CA through SERVER_ROOT_CA_CERTIFICATE.
    let tls_queue = unique("api-amq-tls");
    let secure = api.ok(&[
        "create-event-source-mapping",
        "--function-name",
        &f.name,
        "--event-source-arn",
        "arn:aws:mq:us-east-1:000000000000:broker:amq-tls:b-0003",
        "--queues",
        &tls_queue,
        "--source-access-configurations",
        "Type=BASIC_AUTH,URI=amq-login",
        "Type=SERVER_ROOT_CA_CERTIFICATE,URI=amq-ca",
    ]);
    api.wait_state(secure["UUID"].as_str().unwrap(), "Enabled")
        .await;
    amq.publish(&tls_queue, &[b"over-stomp-ssl".to_vec()]).await;
    let mut got = f.wait_delivered(2, LONG).await;
    got.sort();
    assert_eq!(got, ["from-activemq", "over-stomp-ssl"]);
    let state_file = std::fs::read_to_string(state.path().join("api-mappings.json")).unwrap();
    assert!(!state_file.contains(&password), "{state_file}");
    assert!(
        !api.gw.log_contains(&password),
        "the password is in the log"
    );
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

/// Runs openssl with `args` in `dir`; panics with its stderr if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 it signs (`server.pem`,
/// `server.key`), made in `dir`.
fn test_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=esm-gateway API test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
}

#[tokio::test]
async fn the_api_is_served_over_https_to_a_cli_that_trusts_its_ca() {
    let sqs = sqs_client().await;
    let url = create_queue(&sqs, "api-tls", false, 30).await;
    let f = Function::deploy("api-tls", &[]).await;
    let state = tempfile::tempdir().unwrap();
    test_ca(state.path());
    let port = free_port();
    let config = gateway_header()
        + &api_table(port, state.path()).replace(
            "[[api.key]]",
            &format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n\n[[api.key]]",
                state.path().join("server.pem").display(),
                state.path().join("server.key").display()
            ),
        );
    let mut api = Api::start(&config, port).await;
    api.url = format!("https://127.0.0.1:{port}");

    // A client that does not trust the CA gets no answer, and changes nothing.
    let (code, _, err) = api.cli(&["list-event-source-mappings"]);
    assert!(
        code != 0 && err.contains("CERTIFICATE_VERIFY_FAILED"),
        "{err}"
    );
    api.ca_bundle = Some(state.path().join("ca.pem"));
    let created = api.create_sqs(&f.name, &url, &[]);
    let uuid = created["UUID"].as_str().unwrap();
    send(&sqs, &url, &[(None, "over-tls".into())]).await;
    assert_eq!(f.wait_delivered(1, LONG).await, ["over-tls"]);
    let listed = api.ok(&["list-event-source-mappings"]);
    assert_eq!(listed["EventSourceMappings"][0]["UUID"], uuid);
    // Plain HTTP on the HTTPS port is refused.
    api.url = format!("http://127.0.0.1:{port}");
    let (code, _, _) = api.cli(&["list-event-source-mappings"]);
    assert_ne!(code, 0);
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

/// A PostgreSQL `[api] store` of its own, with a password the server does not ask for
/// (trust authentication), which must never reach a log; re-read every second.
async fn shared_store(prefix: &str) -> String {
    let (_, url) = postgres_schema(prefix).await;
    let url = url.replacen(
        "postgres://postgres@",
        "postgres://postgres:pg-secret-7d3e9a@",
        1,
    );
    assert!(url.contains("pg-secret-7d3e9a"), "{url}");
    format!("store = \"{url}\"\nstore_refresh = \"1s\"")
}

/// Whether the gateway runs the mapping `name`.
fn runs(gw: &Gateway, name: &str) -> bool {
    gw.mappings().iter().any(|m| m["name"] == name)
}

/// Two gateways on one `[api] store`: a mapping created through one is listed, run and
/// changed through the other, and a delete through either stops it on both; schedules
/// are shared the same way.
#[tokio::test]
async fn two_gateways_on_one_postgres_store_share_their_api_mappings() {
    let sqs = sqs_client().await;
    let url = create_queue(&sqs, "api-shared", false, 30).await;
    let f = Function::deploy("api-shared", &[]).await;
    let store = shared_store("api_shared").await;
    let a = Api::start_on(&store).await;
    let b = Api::start_on(&store).await;

    let created = a.create_sqs(&f.name, &url, &[]);
    let uuid = created["UUID"].as_str().unwrap().to_owned();
    let get = ["get-event-source-mapping", "--uuid", &uuid];
    // A change through B builds on what A just stored, without waiting for B to hear of
    // it.
    let arn = created["EventSourceMappingArn"].as_str().unwrap();
    b.ok(&["tag-resource", "--resource", arn, "--tags", "team=orders"]);
    wait_for("A to see B's tag", LONG, || {
        (a.ok(&["list-tags", "--resource", arn])["Tags"]["team"] == "orders").then_some(())
    })
    .await;
    let on_b = wait_for("B to know the mapping A created", LONG, || {
        let (code, v, _) = b.cli(&get);
        (code == 0).then_some(v)
    })
    .await;
    assert_eq!(on_b["EventSourceArn"], sqs_arn(&url));
    let listed = b.ok(&["list-event-source-mappings", "--function-name", &f.name]);
    assert_eq!(listed["EventSourceMappings"][0]["UUID"], uuid.as_str());
    wait_for("B to run it", LONG, || runs(&b.gw, &uuid).then_some(())).await;
    assert!(runs(&a.gw, &uuid));
    b.wait_state(&uuid, "Enabled").await;
    send(&sqs, &url, &[(None, "a".into()), (None, "b".into())]).await;
    f.wait_delivered(2, LONG).await;

    // Changed through B: A answers with the change, and its runtime follows.
    b.ok(&[
        "update-event-source-mapping",
        "--uuid",
        &uuid,
        "--batch-size",
        "2",
        "--no-enabled",
    ]);
    wait_for("A to see B's update", LONG, || {
        (a.ok(&get)["BatchSize"] == 2).then_some(())
    })
    .await;
    a.wait_state(&uuid, "Disabled").await;

    // A schedule created through B is known to A, and run there.
    let schedule = unique("api-shared");
    b.nightly_schedule(&schedule, &f.name);
    wait_for("A to run B's schedule", LONG, || {
        (a.schedules_running() == 1).then_some(())
    })
    .await;
    let (code, got, err) = a.cli_of("scheduler", &["get-schedule", "--name", &schedule]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(got["ScheduleExpression"], "cron(0 3 * * ? *)");
    let (code, _, err) = a.cli_of("scheduler", &["delete-schedule", "--name", &schedule]);
    assert_eq!(code, 0, "{err}");
    wait_for("B to stop the schedule A deleted", LONG, || {
        (b.schedules_running() == 0).then_some(())
    })
    .await;

    // Deleted through A: B answers 404 and stops running it.
    a.ok(&["delete-event-source-mapping", "--uuid", &uuid]);
    wait_for("B to forget the mapping A deleted", LONG, || {
        let (code, _, err) = b.cli(&get);
        (code != 0 && err.contains("ResourceNotFoundException")).then_some(())
    })
    .await;
    wait_for("B to stop running it", LONG, || {
        (!runs(&b.gw, &uuid)).then_some(())
    })
    .await;
    assert!(!runs(&a.gw, &uuid));
    for gw in [&a.gw, &b.gw] {
        assert!(
            !gw.log_contains("pg-secret-7d3e9a"),
            "the store's password in a log"
        );
    }
    assert_eq!(a.gw.terminate().await.code(), Some(0));
    assert_eq!(b.gw.terminate().await.code(), Some(0));
}

/// A gateway on a PostgreSQL `[api] store` comes back from a restart with the mappings
/// created through its API, and runs them.
#[tokio::test]
async fn a_gateway_on_a_postgres_store_comes_back_with_its_mappings() {
    let sqs = sqs_client().await;
    let url = create_queue(&sqs, "api-pg-restart", false, 30).await;
    let f = Function::deploy("api-pg-restart", &[]).await;
    let store = shared_store("api_pg_restart").await;
    let port = free_port();
    let config = gateway_header() + &api_table_with(port, &store);
    let api = Api::start(&config, port).await;
    let created = api.create_sqs(&f.name, &url, &["--batch-size", "3"]);
    let uuid = created["UUID"].as_str().unwrap().to_owned();
    api.wait_state(&uuid, "Enabled").await;
    assert_eq!(api.gw.terminate().await.code(), Some(0));

    let api = Api::start(&config, port).await;
    let got = api.ok(&["get-event-source-mapping", "--uuid", &uuid]);
    assert_eq!(got["BatchSize"], 3);
    assert!(runs(&api.gw, &uuid), "it runs from the start");
    send(&sqs, &url, &[(None, "after-restart".into())]).await;
    assert_eq!(f.wait_delivered(1, LONG).await, ["after-restart"]);
    assert!(!api.gw.log_contains("pg-secret-7d3e9a"));
    assert_eq!(api.gw.terminate().await.code(), Some(0));
}

/// A TCP proxy to the local PostgreSQL on `port`, to cut a store's connections. It runs
/// on a runtime of its own: the tests block theirs while the AWS CLI runs.
struct PgProxy {
    runtime: tokio::runtime::Runtime,
    accept: tokio::task::JoinHandle<()>,
    links: Arc<std::sync::Mutex<Vec<Link>>>,
}

/// One connection through a [`PgProxy`]: its task, and whether it is frozen.
struct Link {
    task: tokio::task::JoinHandle<()>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

/// Copies `from` to `to`, holding the bytes back while `frozen`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

impl PgProxy {
    async fn start(port: u16) -> PgProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let links = Arc::<std::sync::Mutex<Vec<Link>>>::default();
        let held = links.clone();
        let accept = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((inbound, _)) = listener.accept().await {
                let frozen = Arc::<std::sync::atomic::AtomicBool>::default();
                let flag = frozen.clone();
                let task = tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = out.into_split();
                    let _ = tokio::try_join!(pipe(ri, wo, flag.clone()), pipe(ro, wi, flag));
                });
                held.lock().unwrap().push(Link { task, frozen });
            }
        });
        PgProxy {
            runtime,
            accept,
            links,
        }
    }

    /// The connections open now stop carrying bytes, and stay open: a peer that
    /// vanished. Connections made later are not frozen.
    fn freeze(&self) {
        for link in self.links.lock().unwrap().iter() {
            link.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Closes the listener and every connection through it; returns once they are.
    async fn stop(self) {
        self.accept.abort();
        let _ = self.accept.await;
        let links: Vec<_> = self.links.lock().unwrap().drain(..).collect();
        for link in links {
            link.task.abort();
            let _ = link.task.await;
        }
        self.runtime.shutdown_background();
    }
}

/// The store itself, on PostgreSQL: a change one replica makes is what another's reload
/// reports; while the database is unreachable a change fails and changes nothing, the
/// records stay readable, and once it is back the store reconnects by itself.
#[tokio::test]
async fn a_postgres_store_reports_other_replicas_changes_and_refuses_changes_while_unreachable() {
    use esm_gateway::api::store::postgres::{Db, MAPPINGS};
    use esm_gateway::api::store::{Change, Store};
    use esm_gateway::api::wire::{Record, Spec};
    use esm_gateway::config::SecretUrl;

    let (_, direct) = postgres_schema("api_store").await;
    let port = free_port();
    let proxied = direct.replacen("127.0.0.1:5432", &format!("127.0.0.1:{port}"), 1);
    assert_ne!(proxied, direct, "the test proxies the stack's PostgreSQL");
    let record = |uuid: &str, batch| Record {
        uuid: uuid.into(),
        spec: Spec {
            function_name: "f".into(),
            batch_size: Some(batch),
            ..Spec::default()
        },
        last_modified: 1.5,
        tags: Default::default(),
    };
    let mine: Store = Store::open_postgres(Arc::new(Db::new(&SecretUrl::new(&direct))), MAPPINGS)
        .await
        .unwrap();
    let proxy = PgProxy::start(port).await;
    let theirs: Store =
        Store::open_postgres(Arc::new(Db::new(&SecretUrl::new(&proxied))), MAPPINGS)
            .await
            .unwrap();
    assert!(theirs.reload().await.unwrap().is_empty());

    mine.put(record("a", 1)).await.unwrap();
    mine.put(record("b", 1)).await.unwrap();
    mine.put(record("a", 2)).await.unwrap();
    let mut changes = theirs.reload().await.unwrap();
    changes.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(
        changes,
        [
            Change {
                key: "a".into(),
                before: None,
                after: Some(record("a", 2)),
            },
            Change {
                key: "b".into(),
                before: None,
                after: Some(record("b", 1)),
            },
        ]
    );
    assert_eq!(theirs.get("a"), Some(record("a", 2)));
    mine.remove("b").await.unwrap();
    assert_eq!(
        theirs.reload().await.unwrap(),
        [Change {
            key: "b".into(),
            before: Some(record("b", 1)),
            after: None,
        }]
    );

    // The database goes away: changes fail and change nothing; reads still answer.
    proxy.stop().await;
    let err = theirs.put(record("c", 1)).await.unwrap_err().to_string();
    assert!(err.contains("the API's store"), "{err}");
    assert!(theirs.remove("a").await.is_err());
    assert!(theirs.reload().await.is_err());
    assert_eq!(theirs.get("a"), Some(record("a", 2)));
    assert_eq!(theirs.get("c"), None);
    assert_eq!(mine.reload().await.unwrap(), []);
    assert_eq!(mine.all(), [record("a", 2)]);

    // It comes back: the next change reconnects.
    let proxy = PgProxy::start(port).await;
    theirs.put(record("c", 1)).await.unwrap();
    assert_eq!(mine.reload().await.unwrap().len(), 1);

    // Its connection goes silent without closing: the change waits out the deadline and
    // fails, and the next one opens a new connection instead of waiting on the dead one.
    proxy.freeze();
    let err = theirs.put(record("d", 1)).await.unwrap_err().to_string();
    assert!(err.contains("no answer within"), "{err}");
    theirs.put(record("d", 2)).await.unwrap();
    assert_eq!(theirs.get("d"), Some(record("d", 2)));
    proxy.stop().await;
}

/// A gateway whose store goes away: its mappings keep running, a change through its API
/// is refused with a ServiceException and changes nothing, and once the store is back it
/// reconnects by itself and picks up what another replica changed meanwhile.
#[tokio::test]
async fn a_gateway_that_loses_its_postgres_store_keeps_running_and_catches_up() {
    let sqs = sqs_client().await;
    let url = create_queue(&sqs, "api-pg-down", false, 30).await;
    let later = create_queue(&sqs, "api-pg-later", false, 30).await;
    let f = Function::deploy("api-pg-down", &[]).await;
    let (_, direct) = postgres_schema("api_pg_down").await;
    let port = free_port();
    let proxied = direct.replacen("127.0.0.1:5432", &format!("127.0.0.1:{port}"), 1);
    assert_ne!(proxied, direct, "the test proxies the stack's PostgreSQL");
    let proxy = PgProxy::start(port).await;
    let store = |url: &str| format!("store = \"{url}\"\nstore_refresh = \"1s\"");
    let a = Api::start_on(&store(&proxied)).await;
    let uuid = a.create_sqs(&f.name, &url, &[])["UUID"]
        .as_str()
        .unwrap()
        .to_owned();
    a.wait_state(&uuid, "Enabled").await;

    proxy.stop().await;
    let shrink = [
        "update-event-source-mapping",
        "--uuid",
        &uuid,
        "--batch-size",
        "7",
    ];
    let (code, _, err) = a.cli(&shrink);
    assert_ne!(code, 0);
    assert!(err.contains("ServiceException"), "{err}");
    assert_ne!(
        a.ok(&["get-event-source-mapping", "--uuid", &uuid])["BatchSize"],
        7
    );
    send(&sqs, &url, &[(None, "while-down".into())]).await;
    assert_eq!(f.wait_delivered(1, LONG).await, ["while-down"]);

    // Another replica, still reaching the store, makes a mapping meanwhile.
    let b = Api::start_on(&store(&direct)).await;
    let other = b.create_sqs(&f.name, &later, &[])["UUID"]
        .as_str()
        .unwrap()
        .to_owned();
    let proxy = PgProxy::start(port).await;
    wait_for(
        "A to run the mapping B made while A was cut off",
        LONG,
        || runs(&a.gw, &other).then_some(()),
    )
    .await;
    let updated = a.ok(&shrink);
    assert_eq!(updated["BatchSize"], 7);
    assert!(a.gw.log_contains("the API's store is reachable again"));
    assert_eq!(a.gw.terminate().await.code(), Some(0));
    assert_eq!(b.gw.terminate().await.code(), Some(0));
    proxy.stop().await;
}
