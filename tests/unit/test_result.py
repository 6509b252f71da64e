import json

from nanogrid_celery.result import ExecutionResult, Status
from nanogrid_celery.sandbox.output import CappedBuffer, decode


def test_round_trip_through_json():
    result = ExecutionResult(
        request_id="r1",
        runtime="python",
        status=Status.TIMEOUT,
        message="too slow",
        exit_code=137,
        signal=9,
        stdout="out",
        duration_ms=1000.5,
        limits={"timeout_ms": 1000},
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["status"] == "timeout"
    back = ExecutionResult.from_dict(data)
    assert back == result
    assert back.status is Status.TIMEOUT and not back.ok


def test_unknown_fields_are_ignored():
    data = ExecutionResult("r", "cpp", Status.SUCCESS).to_dict() | {"from_the_future": 1}
    assert ExecutionResult.from_dict(data).ok


def test_capped_buffer_counts_everything_keeps_prefix():
    buf = CappedBuffer(5)
    for chunk in (b"abc", b"defg", b"hij"):
        buf.write(chunk)
    assert bytes(buf.data) == b"abcde" and buf.total == 10 and buf.truncated
    assert not CappedBuffer(5).truncated


def test_decode_is_lossless():
    assert decode(b"caf\xc3\xa9") == ("café", "utf-8")
    text, enc = decode(b"\xff\xfe")
    assert enc == "base64" and text == "//4="
    # a cap that cuts a multi-byte character keeps the text UTF-8
    assert decode(b"ab\xc3", truncated=True) == ("ab", "utf-8")
    assert decode(b"ab\xc3", truncated=False)[1] == "base64"
