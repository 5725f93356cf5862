"""Deploys the example function into MiniStack and publishes a few messages to the
"orders" queue. Run by scripts/example with the stack's Python (boto3 and pika)."""

import io
import pathlib
import sys
import zipfile

import boto3
import pika

ROOT = pathlib.Path(__file__).resolve().parent.parent
AWS = dict(endpoint_url="http://127.0.0.1:4566", region_name="us-east-1",
           aws_access_key_id="test", aws_secret_access_key="test")


def deploy(name):
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as z:
        z.write(ROOT / "examples/function/handler.py", "handler.py")
    lam = boto3.client("lambda", **AWS)
    try:
        lam.delete_function(FunctionName=name)
    except lam.exceptions.ResourceNotFoundException:
        pass
    lam.create_function(FunctionName=name, Runtime="python3.12", Handler="handler.handler",
                        Role="arn:aws:iam::000000000000:role/example",
                        Code={"ZipFile": code.getvalue()})
    print(f"deployed function {name} in MiniStack")


def publish(queue, n):
    conn = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2f"))
    ch = conn.channel()
    ch.queue_declare(queue=queue, durable=True)
    ch.confirm_delivery()
    for i in range(n):
        ch.basic_publish("", queue, f'{{"order": {i}}}'.encode(),
                         pika.BasicProperties(delivery_mode=2, message_id=f"order-{i}"))
    conn.close()
    print(f"published {n} messages to queue {queue}")


if __name__ == "__main__":
    deploy("example-orders")
    publish("orders", int(sys.argv[1]) if len(sys.argv) > 1 else 25)
