"""`helm test`: asks the gateway for /v1/models through its Service (run with the gateway image).

With an API key (LLMOPS_TEST_API_KEY, from the Secret helmTest.apiKeySecret names) the gateway
must answer 200 with an OpenAI model list holding every model of LLMOPS_TEST_EXPECT_MODELS.
Without one it must answer 401 with the OpenAI error shape and code invalid_api_key: only a
live gateway answers that, so the Service, the pods' readiness and authentication are checked
even before any tenant exists.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import NoReturn

URL = os.environ["LLMOPS_TEST_URL"].rstrip("/") + "/v1/models"
KEY = os.environ.get("LLMOPS_TEST_API_KEY", "")
EXPECTED = json.loads(os.environ.get("LLMOPS_TEST_EXPECT_MODELS", "[]"))
DEADLINE = time.monotonic() + float(os.environ.get("LLMOPS_TEST_TIMEOUT_S", "60"))


def fail(message: str) -> NoReturn:
    print(f"FAIL {URL}: {message}", file=sys.stderr)
    sys.exit(1)


def ask() -> tuple[int, bytes]:
    """(status, body) of GET /v1/models; retries refused connections until the deadline."""
    headers = {"Authorization": f"Bearer {KEY}"} if KEY else {}
    request = urllib.request.Request(URL, headers=headers)  # noqa: S310 (http checked below)
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError as error:
            if time.monotonic() > DEADLINE:
                fail(f"no answer: {error}")
            time.sleep(2)


if not URL.startswith(("http://", "https://")):
    fail("LLMOPS_TEST_URL must be an http(s) URL")
status, body = ask()
try:
    document = json.loads(body)
except ValueError:
    fail(f"HTTP {status}, not JSON: {body[:200]!r}")
if not KEY:
    error = document.get("error") if isinstance(document, dict) else None
    if status != 401 or not isinstance(error, dict) or error.get("code") != "invalid_api_key":
        fail(f"without a key, expected 401 invalid_api_key, got HTTP {status}: {body[:200]!r}")
    print(f"OK {URL}: 401 without a key ({error.get('message')})")
    sys.exit(0)
if status != 200:
    fail(f"expected 200 with the key, got HTTP {status}: {body[:200]!r}")
if document.get("object") != "list" or not isinstance(document.get("data"), list):
    fail(f"not an OpenAI model list: {body[:200]!r}")
listed = [model.get("id") for model in document["data"]]
missing = [name for name in EXPECTED if name not in listed]
if missing:
    fail(f"models {missing} are not listed (listed: {listed})")
print(f"OK {URL}: {len(listed)} models: {', '.join(listed)}")
