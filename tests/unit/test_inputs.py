"""Large inputs through S3: inline below the threshold, uploaded above, refused over a maximum."""

from __future__ import annotations

import json
from dataclasses import replace

import boto3
import pytest

from nanogrid_celery.config import Limits
from nanogrid_celery.errors import RunRejected
from nanogrid_celery.execution.inputs import (
    check_inputs,
    fetch_input,
    prepare_inputs,
    resolve_cases,
    resolve_stdin,
)
from nanogrid_celery.execution.request import RunRequest


def _req(**kw) -> RunRequest:
    return RunRequest(request_id="r", runtime="python", s3_bucket="code", s3_key="k", **kw)


def test_small_inputs_stay_inline(s3):
    kwargs = prepare_inputs(s3, "code", "hello", [{"stdin": "1"}])
    assert kwargs == {"stdin": "hello", "cases": [{"stdin": "1"}]}


def test_large_stdin_goes_through_s3_and_comes_back(s3):
    stdin = "x" * (2 << 20)  # 2 MB: the size that made client.run fail inside botocore
    kwargs = prepare_inputs(s3, "code", stdin, None)
    assert set(kwargs) == {"stdin_s3_key"}
    assert kwargs["stdin_s3_key"].startswith("inputs/sha256-")
    assert resolve_stdin(s3, _req(**kwargs)) == stdin.encode()


def test_the_documented_maximum_works_and_one_byte_more_is_refused(s3):
    top = "y" * s3.limits.max_stdin_bytes
    kwargs = prepare_inputs(s3, "code", top, None)
    assert len(resolve_stdin(s3, _req(**kwargs))) == s3.limits.max_stdin_bytes
    with pytest.raises(RunRejected, match="stdin is 8388609 bytes; at most 8388608"):
        check_inputs(s3, top + "y", None)


def test_large_cases_go_through_s3(s3):
    cases = [{"stdin": "z" * 10_000, "expected_stdout": "ok"} for _ in range(100)]
    kwargs = prepare_inputs(s3, "code", None, cases)
    assert set(kwargs) == {"cases_s3_key"}
    assert resolve_cases(s3, _req(**kwargs)) == cases


def test_too_many_cases_and_too_large_a_document_are_refused(s3):
    with pytest.raises(RunRejected, match="101 cases; at most 100"):
        check_inputs(s3, None, [{}] * 101)
    small = replace(s3, limits=Limits(max_cases_bytes=1000))
    with pytest.raises(RunRejected, match="as JSON; at most 1000"):
        check_inputs(small, None, [{"stdin": "a" * 1000}])


def test_worker_refuses_a_tampered_or_oversized_input(s3):
    client = boto3.client("s3", region_name="us-east-1")
    key = "inputs/sha256-" + "0" * 64 + "/stdin"
    client.put_object(Bucket="code", Key=key, Body=b"not what the name says")
    with pytest.raises(RunRejected, match="does not match"):
        fetch_input(s3, "code", key, 100)
    with pytest.raises(RunRejected, match="at most 5"):
        fetch_input(s3, "code", key, 5)
    with pytest.raises(RunRejected, match="not under inputs/"):
        fetch_input(s3, "code", "code/sha256-abc/main.py", 100)
    with pytest.raises(RunRejected, match="does not exist"):
        fetch_input(s3, "code", "inputs/sha256-" + "1" * 64 + "/stdin", 100)


def test_both_inline_and_s3_is_rejected(s3):
    kwargs = prepare_inputs(s3, "code", None, [{"stdin": "q" * 200_000}])
    with pytest.raises(RunRejected, match="not both"):
        resolve_cases(s3, _req(cases=[{}], **kwargs))
    assert json.loads(json.dumps(kwargs))  # task kwargs stay JSON


def test_stdin_and_cases_together_are_refused(s3):
    with pytest.raises(RunRejected, match="give stdin or cases"):
        check_inputs(s3, "x", [{}])
    with pytest.raises(RunRejected, match="give stdin or cases"):
        resolve_cases(s3, _req(stdin="x", cases=[{}]))
