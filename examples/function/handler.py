"""Example function for config/example.toml: what a function written for Amazon MQ's
RabbitMQ trigger looks like. It runs unchanged behind esm-gateway."""

from aws_lambda_powertools.utilities.data_classes.rabbit_mq_event import RabbitMQEvent


def handler(event, context):
    event = RabbitMQEvent(event)
    count = 0
    for queue, messages in event.rmq_messages_by_queue.items():
        for message in messages:
            count += 1
            print(f"{queue}: {message.decoded_data!r} (message id {message.basic_properties.message_id})")
    return {"processed": count}
