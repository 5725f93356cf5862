//! Trace propagation end to end: messages published to the real brokers with trace
//! headers (or SQS attributes) are drained by the gateway binary, and each Invoke HTTP
//! request must carry the `X-Amzn-Trace-Id` derived from its batch's first record that
//! has a valid one.
//!
//! MiniStack does not hand an inbound `X-Amzn-Trace-Id` to the function (it synthesises
//! its own `_X_AMZN_TRACE_ID`, or none), so the requests are observed where they land:
//! Lambda's endpoint is a small HTTP listener of the test's own that records each
//! request's headers and answers as Invoke does. The gateway is pointed at it with the
//! SDK's service-specific `AWS_ENDPOINT_URL_LAMBDA`; SQS stays on MiniStack
//! (`AWS_ENDPOINT_URL`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use base64_simd::STANDARD as B64;
use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(120);

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// [`TRACEPARENT`] as X-Ray writes it.
const FROM_TRACEPARENT: &str =
    "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1";
const XRAY: &str = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=0";
const UNSAMPLED: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
const FROM_UNSAMPLED: &str =
    "Root=1-0af76519-16cd43dd8448eb211c80319c;Parent=b7ad6b7169203331;Sampled=0";

/// One test message: body, trace header (name, value), and the `X-Amzn-Trace-Id` it
/// stands for (None: no valid trace).
type Message = (
    &'static str,
    Option<(&'static str, &'static str)>,
    Option<&'static str>,
);

/// The messages each test publishes, in order.
const MESSAGES: [Message; 6] = [
    ("m0-none", None, None),
    ("m1-malformed", Some(("traceparent", "00-nope-01")), None),
    (
        "m2-traceparent",
        Some(("TraceParent", TRACEPARENT)),
        Some(FROM_TRACEPARENT),
    ),
    ("m3-xray", Some(("x-amzn-trace-id", XRAY)), Some(XRAY)),
    ("m4-none", None, None),
    (
        "m5-unsampled",
        Some(("traceparent", UNSAMPLED)),
        Some(FROM_UNSAMPLED),
    ),
];

/// One Invoke request as the listener received it.
#[derive(Debug, Clone)]
struct Invoke {
    function: String,
    trace: Option<String>,
    event: Value,
}

/// Lambda's Invoke endpoint, as far as a synchronous invoke needs it: records the
/// request and answers 200 with an empty object (a successful function).
struct FakeLambda {
    url: String,
    invokes: Arc<Mutex<Vec<Invoke>>>,
}

impl FakeLambda {
    async fn start() -> FakeLambda {
        async fn invoke(
            State(invokes): State<Arc<Mutex<Vec<Invoke>>>>,
            Path(function): Path<String>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> impl axum::response::IntoResponse {
            let trace = headers
                .get("x-amzn-trace-id")
                .map(|v| v.to_str().unwrap().to_owned());
            let event = serde_json::from_slice(&body).expect("the event is JSON");
            invokes.lock().unwrap().push(Invoke {
                function,
                trace,
                event,
            });
            ([("X-Amz-Executed-Version", "$LATEST")], "{}")
        }
        let invokes = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/2015-03-31/functions/{function}/invocations",
                axum::routing::post(invoke),
            )
            .with_state(invokes.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeLambda { url, invokes }
    }

    /// The invokes so far, once they hold all of `bodies` (as `bodies_of` reads them).
    async fn wait_bodies(
        &self,
        bodies: usize,
        bodies_of: impl Fn(&Value) -> Vec<String>,
    ) -> Vec<(Invoke, Vec<String>)> {
        wait_for("every message invoked", LONG, || {
            let got: Vec<(Invoke, Vec<String>)> = self
                .invokes
                .lock()
                .unwrap()
                .iter()
                .map(|i| (i.clone(), bodies_of(&i.event)))
                .collect();
            (got.iter().map(|(_, b)| b.len()).sum::<usize>() >= bodies).then_some(got)
        })
        .await
    }
}

/// Starts a gateway whose Lambda calls go to `lambda`, the rest (SQS) to MiniStack: the
/// config's `[aws] endpoint_url` (it would win over any environment) is taken out, and
/// the SDK's environment says where each service is.
fn start(config: &str, lambda: &FakeLambda, env: &[(&str, &str)]) -> Gateway {
    let line = format!("endpoint_url = \"{}\"\n", aws_endpoint());
    assert!(
        config.contains(&line),
        "the config names MiniStack's endpoint"
    );
    let config = config.replace(&line, "");
    let mut env = env.to_vec();
    let ministack = aws_endpoint();
    env.push(("AWS_ENDPOINT_URL", &ministack));
    env.push(("AWS_ENDPOINT_URL_LAMBDA", &lambda.url));
    Gateway::start_with_env(&config, &env)
}

/// Checks that every message was invoked, and that each invoke carried the trace of the
/// first of its records that has one (none if none has).
fn check(invokes: &[(Invoke, Vec<String>)], function: &str) {
    let expected = |body: &str| {
        MESSAGES
            .iter()
            .find(|(b, _, _)| *b == body)
            .unwrap_or_else(|| panic!("unexpected body {body:?}"))
            .2
    };
    let mut seen: Vec<&str> = Vec::new();
    for (invoke, bodies) in invokes {
        assert_eq!(invoke.function, function);
        let want = bodies.iter().find_map(|b| expected(b));
        assert_eq!(
            invoke.trace.as_deref(),
            want,
            "the invoke of {bodies:?} carries the trace of its first traced record"
        );
        seen.extend(bodies.iter().map(String::as_str));
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(
        seen.len(),
        MESSAGES.len(),
        "every message invoked: {seen:?}"
    );
    // The first traced record of some invoke is m2 (nothing before it has a valid trace).
    assert!(
        invokes
            .iter()
            .any(|(i, _)| i.trace.as_deref() == Some(FROM_TRACEPARENT)),
        "a traceparent reached an invoke"
    );
}

fn decoded(data: &Value) -> String {
    String::from_utf8(B64.decode_to_vec(data.as_str().unwrap()).unwrap()).unwrap()
}

/// One batch for all of them when the broker hands them over together; the check does
/// not depend on it.
const BATCH: &str = "[mapping.batch]\nsize = 10\nwindow = \"2s\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_headers_become_the_invoke_trace() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let lambda = FakeLambda::start().await;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("trace").await;
    for (body, header, _) in MESSAGES {
        let mut headers = FieldTable::default();
        headers.insert("other".into(), AMQPValue::LongString("x".into()));
        if let Some((name, value)) = header {
            headers.insert(name.into(), AMQPValue::LongString(value.into()));
        }
        rabbit
            .channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default().with_headers(headers),
            )
            .await
            .unwrap();
    }
    assert!(rabbit.channel.wait_for_confirms().await.unwrap().is_empty());

    let gw = start(&rabbit_config("traced", &queue, BATCH), &lambda, &[]);
    let invokes = lambda
        .wait_bodies(MESSAGES.len(), |e| {
            e["rmqMessagesByQueue"]
                .as_object()
                .unwrap()
                .values()
                .flat_map(|msgs| msgs.as_array().unwrap())
                .map(|m| decoded(&m["data"]))
                .collect()
        })
        .await;
    check(&invokes, "traced");
    gw.terminate().await;
    rabbit.delete(&queue).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_headers_become_the_invoke_trace() {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let lambda = FakeLambda::start().await;
    let topic = unique("trace");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic (is `scripts/stack up` running?)");
    assert!(created[0].is_ok(), "{created:?}");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "false")
        .create()
        .unwrap();
    for (body, header, _) in MESSAGES {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "other",
            value: Some("x"),
        });
        if let Some((key, value)) = header {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        producer
            .send(
                FutureRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(body)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("record delivered");
    }

    let config = gateway_header()
        + &mapping(
            "traced",
            "traced",
            BATCH,
            &format!(
                "type = \"kafka\"\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"{topic}\"]\n\
                 group_id = \"{}\"\nstarting_position = \"trim_horizon\"\n",
                unique("trace")
            ),
        );
    let gw = start(&config, &lambda, &[]);
    let invokes = lambda
        .wait_bodies(MESSAGES.len(), |e| {
            e["records"]
                .as_object()
                .unwrap()
                .values()
                .flat_map(|recs| recs.as_array().unwrap())
                .map(|r| decoded(&r["value"]))
                .collect()
        })
        .await;
    check(&invokes, "traced");
    gw.terminate().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqs_attributes_and_aws_trace_header_become_the_invoke_trace() {
    use aws_sdk_sqs::types::{
        MessageAttributeValue, MessageSystemAttributeNameForSends, MessageSystemAttributeValue,
    };
    let lambda = FakeLambda::start().await;
    let sqs = sqs_client().await;
    let url = sqs_queue(&sqs, "trace").await;
    for (body, header, _) in MESSAGES {
        let mut send = sqs.send_message().queue_url(&url).message_body(body);
        match header {
            // An X-Ray header rides in AWSTraceHeader, as AWS's SDKs send it.
            Some((name, value)) if name.eq_ignore_ascii_case("x-amzn-trace-id") => {
                send = send.message_system_attributes(
                    MessageSystemAttributeNameForSends::AwsTraceHeader,
                    MessageSystemAttributeValue::builder()
                        .data_type("String")
                        .string_value(value)
                        .build()
                        .unwrap(),
                );
            }
            Some((name, value)) => {
                send = send.message_attributes(
                    name,
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(value)
                        .build()
                        .unwrap(),
                );
            }
            None => {}
        }
        send.send().await.unwrap();
    }

    let gw = start(&sqs_config("traced", &url, BATCH), &lambda, &[]);
    let invokes = lambda
        .wait_bodies(MESSAGES.len(), |e| {
            e["Records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["body"].as_str().unwrap().to_owned())
                .collect()
        })
        .await;
    // Standard queues do not keep order, so the batches' first records vary: the rule
    // is checked per invoke all the same.
    check(&invokes, "traced");
    gw.terminate().await;
    sqs.delete_queue().queue_url(&url).send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn activemq_headers_become_the_invoke_trace() {
    use common::amq::{Amq, amq_url, var};
    use esm_gateway::source::activemq::stomp::Frame;
    let url = amq_url();
    let (user, password) = (
        var("ESM_ACTIVEMQ_USER", "esm"),
        var("ESM_ACTIVEMQ_PASSWORD", "esm-stack"),
    );
    let lambda = FakeLambda::start().await;
    let queue = unique("trace");
    let mut amq = Amq::connect().await;
    let destination = format!("/queue/{queue}");
    let frames = MESSAGES
        .iter()
        .map(|(body, header, _)| {
            let mut f = Frame::new(
                "SEND",
                &[("destination", &destination), ("persistent", "true")],
            );
            if let Some((name, value)) = header {
                f.headers.push(((*name).into(), (*value).into()));
            }
            f.body = body.as_bytes().to_vec();
            f
        })
        .collect();
    amq.confirmed(frames).await;

    let config = gateway_header()
        + &mapping(
            "traced",
            "traced",
            BATCH,
            &format!(
                "type = \"activemq\"\nurl = \"{url}\"\nusername = \"${{ESM_ACTIVEMQ_USER}}\"\n\
                 password = \"${{ESM_ACTIVEMQ_PASSWORD}}\"\nqueue = \"{queue}\"\n"
            ),
        );
    let gw = start(
        &config,
        &lambda,
        &[
            ("ESM_ACTIVEMQ_USER", &user),
            ("ESM_ACTIVEMQ_PASSWORD", &password),
        ],
    );
    let invokes = lambda
        .wait_bodies(MESSAGES.len(), |e| {
            e["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| decoded(&m["data"]))
                .collect()
        })
        .await;
    check(&invokes, "traced");
    gw.terminate().await;
}

/// An OTLP/HTTP collector, as far as protobuf trace exports need one: keeps each
/// request's spans and answers with an empty ExportTraceServiceResponse.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>,
}

impl Collector {
    async fn start() -> Collector {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        type Spans = Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>;
        async fn export(
            State(spans): State<Spans>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> impl axum::response::IntoResponse {
            assert_eq!(headers["content-type"], "application/x-protobuf");
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            for resource in request.resource_spans {
                let service = resource
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| format!("{:?}", kv.value));
                assert!(
                    service.is_some_and(|s| s.contains("esm-gateway")),
                    "service.name is esm-gateway"
                );
                for scope in resource.scope_spans {
                    spans.lock().unwrap().extend(scope.spans);
                }
            }
            ([("content-type", "application/x-protobuf")], Vec::new())
        }
        let spans: Spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(export))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { url, spans }
    }
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            V::StringValue(s) => s.clone(),
            V::IntValue(n) => n.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn otlp_spans_of_a_batch_continue_the_record_trace() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let lambda = FakeLambda::start().await;
    let collector = Collector::start().await;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("trace-otlp").await;
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(TRACEPARENT.into()),
    );
    rabbit
        .channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"traced",
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    assert!(rabbit.channel.wait_for_confirms().await.unwrap().is_empty());

    let config = rabbit_config("traced", &queue, "")
        + &format!("\n[telemetry]\notlp_endpoint = \"{}\"\n", collector.url);
    let gw = start(&config, &lambda, &[]);
    lambda
        .wait_bodies(1, |e| {
            e["rmqMessagesByQueue"]
                .as_object()
                .unwrap()
                .values()
                .flat_map(|msgs| msgs.as_array().unwrap())
                .map(|m| decoded(&m["data"]))
                .collect()
        })
        .await;
    // Shutdown flushes the spans not yet exported before the process exits.
    assert!(gw.terminate().await.success());

    let spans = collector.spans.lock().unwrap().clone();
    let named = |name: &str| {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no {name} span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let (batch, invoke, ack) = (named("batch"), named("invoke"), named("ack"));
    // The batch continues the producer's trace, as a child of its span.
    assert_eq!(hex(&batch.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&batch.parent_span_id), "00f067aa0ba902b7");
    for child in [invoke, ack] {
        assert_eq!(child.trace_id, batch.trace_id);
        assert_eq!(child.parent_span_id, batch.span_id);
    }
    for span in [batch, invoke, ack] {
        assert_eq!(
            attribute(span, "esm_gateway.mapping").as_deref(),
            Some("test")
        );
    }
    assert_eq!(
        attribute(batch, "esm_gateway.source").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(invoke, "esm_gateway.function").as_deref(),
        Some("traced")
    );
    assert_eq!(
        attribute(invoke, "esm_gateway.attempt").as_deref(),
        Some("1")
    );
    assert_eq!(
        attribute(invoke, "esm_gateway.batch.records").as_deref(),
        Some("1")
    );
    assert_eq!(
        attribute(invoke, "esm_gateway.outcome").as_deref(),
        Some("success")
    );
    assert!(invoke.start_time_unix_nano >= batch.start_time_unix_nano);
    assert!(invoke.end_time_unix_nano <= ack.start_time_unix_nano);
    rabbit.delete(&queue).await;
}
