"""Schemathesis hooks for ferry's registry: sign every request as
docs/PROTOCOL.md ("Signed API requests") says, with the key whose 32-byte
seed is in FERRY_FUZZ_SEED (hex), so that signed operations are exercised
too, not only refused as unsigned.

Requests are signed where they leave: in the HTTP adapter, over the exact
method, path and query, and body bytes that are sent. Paths that name a key
name this key, so the signature is the account's own.
"""

import os
import sys
import re
import secrets
import struct
import time

import blake3
import requests.adapters
import schemathesis
from nacl.signing import SigningKey

SIGNING_KEY = SigningKey(bytes.fromhex(os.environ["FERRY_FUZZ_SEED"]))
PUBLIC_KEY = SIGNING_KEY.verify_key.encode().hex()
TAG = b"ferry/request/v1\0"

# CPython 3.11's ast.parse can fail with "AST constructor recursion depth
# mismatch" when called deep in a stack (hypothesis parses lambda sources to
# name strategies); a higher limit keeps it clear of that.
sys.setrecursionlimit(10_000)


def signing_bytes(method: str, path_and_query: str, timestamp: int, nonce: bytes, body: bytes) -> bytes:
    method_bytes = method.encode()
    path_bytes = path_and_query.encode()
    return (
        TAG
        + struct.pack(">I", len(method_bytes))
        + method_bytes
        + struct.pack(">I", len(path_bytes))
        + path_bytes
        + struct.pack(">Q", timestamp)
        + nonce
        + blake3.blake3(body).digest()
    )


_send = requests.adapters.HTTPAdapter.send


# What each signature header looks like when well formed. A header that the
# fuzzer left out, or filled with a value of the wrong form to test the
# refusal, is sent as the fuzzer made it; a well-formed one is replaced by
# the real value, so that a request meant to pass is signed.
WELL_FORMED = {
    "ferry-key": re.compile(r"[0-9a-f]{64}"),
    "ferry-timestamp": re.compile(r"0|[1-9][0-9]*"),
    "ferry-nonce": re.compile(r"[0-9a-f]{32}"),
    "ferry-signature": re.compile(r"[0-9a-f]{128}"),
}


def _signed_send(self, request, *args, **kwargs):
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    timestamp = int(time.time())
    nonce = secrets.token_bytes(16)
    message = signing_bytes(request.method, request.path_url, timestamp, nonce, body)
    real = {
        "ferry-key": PUBLIC_KEY,
        "ferry-timestamp": str(timestamp),
        "ferry-nonce": nonce.hex(),
        "ferry-signature": SIGNING_KEY.sign(message).signature.hex(),
    }
    for name, value in real.items():
        sent = request.headers.get(name)
        if sent is not None and WELL_FORMED[name].fullmatch(sent):
            request.headers[name] = value
    return _send(self, request, *args, **kwargs)


requests.adapters.HTTPAdapter.send = _signed_send


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.path_parameters and "key" in case.path_parameters:
        case.path_parameters["key"] = PUBLIC_KEY
