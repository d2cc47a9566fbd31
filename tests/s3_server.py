"""An S3-compatible server on 127.0.0.1 for the tests: moto's server application (moto[server],
test-only) in a thread of the test process, behind a small WSGI layer that counts the
requests per object and can answer 503 for a while.

`stop()` shuts the listening socket, so clients get "connection refused", as from a server
that is down; `start()` listens again on the same port. moto keeps its buckets in this
process's memory, not in the server thread, so the data survives a stop and start (checked
by `tests/data_pipeline/test_remote.py`), as a real store's would.
"""

from __future__ import annotations

import collections
import os
import threading
import time

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

ACCESS_KEY, SECRET_KEY, REGION = "rtdspeed-test", "rtdspeed-test-secret", "us-east-1"


class S3Server:
    def __init__(self):
        self._app = DomainDispatcherApplication(create_backend_app)
        self.gets: collections.Counter[str] = collections.Counter()  # "bucket/key" -> GETs
        self.puts: list[str] = []  # "bucket/key" of every PUT, in order
        self._lock = threading.Lock()
        self._fail_until, self._fail_only = 0.0, ""
        self.port = 0
        self._server = None
        self._thread = None

    def __call__(self, environ, start_response):  # WSGI
        path = environ.get("PATH_INFO", "").lstrip("/")
        if time.monotonic() < self._fail_until and self._fail_only in path:
            start_response("503 Service Unavailable", [("Content-Type", "application/xml")])
            return [b"<Error><Code>ServiceUnavailable</Code><Message>test outage</Message></Error>"]
        method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        with self._lock:
            if method == "GET" and "list-type" not in query:
                self.gets[path] += 1
            elif method == "PUT" and "partNumber" not in query:
                self.puts.append(path)
        return self._app(environ, start_response)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = make_server(
            "127.0.0.1", self.port, self, threaded=True, request_handler=MotoRequestHandler
        )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()  # refused from now on, not accepted and left hanging
        self._thread.join()

    def fail_for(self, seconds: float, only: str = "") -> None:
        """Answer every request (whose path contains `only`) with 503 ServiceUnavailable for
        `seconds`."""
        self._fail_until, self._fail_only = time.monotonic() + seconds, only

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (boto3, the aws CLI) at it."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
