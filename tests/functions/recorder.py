"""Test function for esm-gateway's integration tests, run by MiniStack.

It parses its event with Powertools (RabbitMQEvent or ActiveMQEvent, touching every field
AWS sends, the KafkaSelfManagedEventModel parser model, or for a schedule's Scheduled Event the
EventBridgeModel), so a missing field fails the invoke; appends one JSON line per invoke
to $LOG_FILE, and then behaves as its environment says:
  POISON=b1,b2      raise if any of these bodies is in the batch (with $ERROR_MESSAGE
                    as the error message, when set)
  FAIL_ALL=1        raise on every batch (RabbitMQ, Kafka or SQS)
  FAIL_ONCE=b1,b2   report these bodies as batchItemFailures (by messageId) the first
                    time each is seen (marker files in $STATE_DIR)
  SLEEP_MS=n        sleep this long per invoke
  SLOW_ONCE=b1,b2   sleep SLOW_MS (default 10000) instead, the first time one of these
                    bodies is seen (its marker file, slow-<body> in $STATE_DIR, is made
                    as the sleep begins)
  FAIL_SCHEDULE=1   raise on every scheduled event
  FAIL_SCHEDULE_TIMES=n  raise on the first n invokes of each scheduled time (counted
                    in $STATE_DIR, so across gateways)
A scheduled event (anything that is neither RabbitMQ nor Kafka: the Scheduled Event or a
schedule's own input) is logged whole, with its "time" as the one body.
"""

import base64
import copy
import json
import os
import time

from aws_lambda_powertools.utilities.data_classes.rabbit_mq_event import RabbitMQEvent

PROPS = ("content_type", "content_encoding", "headers", "delivery_mode", "priority",
         "correlation_id", "reply_to", "expiration", "message_id", "timestamp",
         "get_type", "user_id", "app_id", "cluster_id", "body_size")


def _set(name):
    return {b for b in os.environ.get(name, "").split(",") if b}


def _poison(bodies):
    """The bodies this invoke fails on: every one with FAIL_ALL, else those in POISON."""
    if os.environ.get("FAIL_ALL"):
        return set(bodies)
    return _set("POISON") & set(bodies)


def _finish(line, what, poison, failures):
    """Logs the invoke, then fails on poison or returns the partial batch response."""
    with open(os.environ["LOG_FILE"], "a") as f:
        f.write(json.dumps(line) + "\n")
    # MiniStack waits for output after a silent invoke; a line keeps warm invokes fast.
    print(f"{len(line['bodies'])} {what}(s)")
    if poison:
        raise ValueError(os.environ.get("ERROR_MESSAGE") or f"poison {what}(s) {sorted(poison)}")
    return {"batchItemFailures": failures}


def _first_time(var, body, marker_prefix):
    """True the first time a body named in $var is seen (a marker file remembers)."""
    if body not in _set(var):
        return False
    marker = os.path.join(os.environ.get("STATE_DIR", ""), marker_prefix + body)
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


def _fail_first(time_):
    """True for the first FAIL_SCHEDULE_TIMES invokes of a scheduled time."""
    n = int(os.environ.get("FAIL_SCHEDULE_TIMES", "0"))
    if n == 0:
        return False
    counter = os.path.join(os.environ.get("STATE_DIR", ""), "tries-" + time_.replace(":", "-"))
    with open(counter, "a") as f:
        f.write("x")
    return os.path.getsize(counter) <= n


def _fail_once(body):
    return _first_time("FAIL_ONCE", body, "seen-")


def _sleep(bodies):
    """Sleeps SLEEP_MS, or SLOW_MS if this invoke is the first to see a SLOW_ONCE body."""
    ms = int(os.environ.get("SLEEP_MS", "0"))
    if any([_first_time("SLOW_ONCE", b, "slow-") for b in bodies]):
        ms = int(os.environ.get("SLOW_MS", "10000"))
    time.sleep(ms / 1000)


def kafka(event):
    """A self-managed Kafka event, validated by Powertools' parser model."""
    from aws_lambda_powertools.utilities.parser import parse
    from aws_lambda_powertools.utilities.parser.models import KafkaSelfManagedEventModel

    # The parser decodes headers in place: give it a copy, keep the event as received.
    model = parse(event=copy.deepcopy(event), model=KafkaSelfManagedEventModel)
    assert event["eventSource"] == "SelfManagedKafka", event["eventSource"]
    records = []
    for key, recs in model.records.items():
        for r in recs:
            assert key == f"{r.topic}-{r.partition}", key
            records.append(r)
    return records


def handler(event, context):
    if "requestContext" in event:
        # A failure record sent by an on-failure destination of type "lambda".
        with open(os.environ["LOG_FILE"], "a") as f:
            f.write(json.dumps({"bodies": [], "redelivered": [], "ok": True, "failed": [], "event": event}) + "\n")
        return None
    if "records" in event:
        return kafka_handler(event)
    if "Records" in event:
        return sqs_handler(event)
    if "rmqMessagesByQueue" in event:
        return rabbit_handler(event)
    if "messages" in event and str(event.get("eventSource")).startswith("aws:"):
        return activemq_handler(event)
    return schedule_handler(event)


def schedule_handler(event):
    if event.get("detail-type") == "Scheduled Event":
        from aws_lambda_powertools.utilities.parser import parse
        from aws_lambda_powertools.utilities.parser.models import EventBridgeModel

        model = parse(event=copy.deepcopy(event), model=EventBridgeModel)
        assert model.source == "aws.events", model.source
        assert model.detail_type == "Scheduled Event", model.detail_type
    fail = bool(os.environ.get("FAIL_SCHEDULE")) or _fail_first(str(event.get("time")))
    line = {
        "bodies": [str(event.get("time"))],
        "redelivered": [],
        "ok": not fail,
        "failed": [],
        "event": event,
        "received": time.time(),
    }
    with open(os.environ["LOG_FILE"], "a") as f:
        f.write(json.dumps(line) + "\n")
    print("scheduled event")
    if fail:
        raise RuntimeError(f"scheduled event at {event.get('time')} failed on purpose")
    return {}


def sqs_handler(event):
    """An SQS event, validated by Powertools' SqsModel."""
    from aws_lambda_powertools.utilities.parser import parse
    from aws_lambda_powertools.utilities.parser.models import SqsModel

    model = parse(event=copy.deepcopy(event), model=SqsModel)
    bodies = [r.body for r in model.Records]
    poison = _poison(bodies)
    for r in model.Records:
        assert r.eventSource == "aws:sqs" and r.eventSourceARN.startswith("arn:aws:sqs:"), r
    failures = [{"itemIdentifier": r.messageId} for r in model.Records if _fail_once(r.body)]
    time.sleep(int(os.environ.get("SLEEP_MS", "0")) / 1000)
    line = {
        "bodies": bodies,
        "redelivered": [int(r.attributes.ApproximateReceiveCount) > 1 for r in model.Records],
        "ok": not poison,
        "failed": [f["itemIdentifier"] for f in failures],
        "ids": [r.messageId for r in model.Records],
        "groups": [r.attributes.MessageGroupId for r in model.Records],
        "event": event if os.environ.get("LOG_EVENT") else None,
    }
    return _finish(line, "message", poison, failures)


def kafka_handler(event):
    records = kafka(event)
    bodies = [r.value.decode("utf-8", errors="replace") if isinstance(r.value, bytes) else str(r.value)
              for r in records]
    poison = _poison(bodies)
    failures = [{"itemIdentifier": {"partition": f"{r.topic}-{r.partition}", "offset": r.offset}}
                for body, r in zip(bodies, records) if _fail_once(body)]
    _sleep(bodies)
    line = {
        "bodies": bodies,
        "redelivered": [False for _ in records],
        "ok": not poison,
        "failed": [f"{f['itemIdentifier']['offset']}" for f in failures],
        "partitions": [r.partition for r in records],
        "offsets": [r.offset for r in records],
        "event": event if os.environ.get("LOG_EVENT") else None,
    }
    return _finish(line, "record", poison, failures)


def rabbit_handler(event):
    parsed = RabbitMQEvent(event)
    assert parsed.event_source == "aws:rmq", parsed.event_source
    assert parsed.event_source_arn.startswith("arn:aws:mq:"), parsed.event_source_arn
    messages = []
    for _queue, msgs in parsed.rmq_messages_by_queue.items():
        for m in msgs:
            props = m.basic_properties
            for p in PROPS:
                getattr(props, p)
            raw = base64.b64decode(m.data)
            assert len(raw) == props.body_size, (len(raw), props.body_size)
            messages.append((raw.decode("utf-8", errors="replace"), props.message_id, m.redelivered))
    bodies = [b for b, _, _ in messages]

    poison = _poison(bodies)
    failures = [{"itemIdentifier": message_id} for body, message_id, _ in messages if _fail_once(body)]

    time.sleep(int(os.environ.get("SLEEP_MS", "0")) / 1000)
    line = {
        "bodies": bodies,
        "redelivered": [r for _, _, r in messages],
        "ok": not poison,
        "failed": [f["itemIdentifier"] for f in failures],
        "event": event if os.environ.get("LOG_EVENT") else None,
    }
    return _finish(line, "message", poison, failures)


AMQ_FIELDS = ("message_id", "message_type", "data", "connection_id", "redelivered", "timestamp",
              "broker_in_time", "broker_out_time", "properties", "destination_physicalname",
              "delivery_mode", "correlation_id", "reply_to", "get_type", "expiration", "priority")


def activemq_handler(event):
    """An Amazon MQ (ActiveMQ) event, read with Powertools' ActiveMQEvent."""
    from aws_lambda_powertools.utilities.data_classes.active_mq_event import ActiveMQEvent

    parsed = ActiveMQEvent(event)
    assert parsed.event_source in ("aws:mq", "aws:amq"), parsed.event_source
    assert parsed.event_source_arn.startswith("arn:aws:mq:"), parsed.event_source_arn
    messages = []
    for m in parsed.messages:
        for field in AMQ_FIELDS:
            getattr(m, field)
        assert m.message_type in ("jms/text-message", "jms/bytes-message"), m.message_type
        assert isinstance(m.properties, dict), m.properties
        raw = base64.b64decode(m.data)
        messages.append((raw.decode("utf-8", errors="replace"), m.message_id, m.redelivered, m.message_type))
    bodies = [b for b, _, _, _ in messages]

    poison = _poison(bodies)
    failures = [{"itemIdentifier": message_id} for body, message_id, _, _ in messages if _fail_once(body)]
    _sleep(bodies)
    line = {
        "bodies": bodies,
        "redelivered": [r for _, _, r, _ in messages],
        "ok": not poison,
        "failed": [f["itemIdentifier"] for f in failures],
        "ids": [i for _, i, _, _ in messages],
        "types": [t for _, _, _, t in messages],
        "event": event if os.environ.get("LOG_EVENT") else None,
    }
    return _finish(line, "message", poison, failures)
