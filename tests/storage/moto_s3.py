"""A real S3 API without network for tests: moto's server on 127.0.0.1, reached through the
usual AWS environment (endpoint, keys, region), so worker processes find it too."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

RUNNING: list = []
"""The moto servers ``s3_server`` is running (tests that stop and restart one find it here)."""

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server(*buckets: str) -> Iterator[str]:
    """Start moto's S3 server, point the AWS environment at it, create ``buckets``; yield the
    endpoint URL. The environment is restored and the server stopped on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    RUNNING.append(server)
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in {**ENV, "AWS_ENDPOINT_URL": endpoint}.items():
                env.setenv(key, value)
            _forget_filesystems()  # cached filesystems know another endpoint
            for bucket in buckets:
                s3_client().create_bucket(Bucket=bucket)  # s3fs's mkdir of a bucket fails on moto
            yield endpoint
    finally:
        _forget_filesystems()  # also after a failure: no later test may reuse this endpoint
        RUNNING.remove(server)
        server.stop()


def s3_client():
    """A boto3 S3 client for the environment's endpoint."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def object_keys(bucket: str, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Every object under ``prefix`` in ``bucket``: key -> (ETag, LastModified)."""
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"].isoformat())
            for page in pages for o in page.get("Contents", [])}


def _forget_filesystems() -> None:
    """Drop fsspec's cached S3 filesystems (and their listings) bound to this server."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
