"""`python -m scaling.serve` as a child process on a free loopback port, for the HTTP tests."""

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from conftest import REPO


class ServeProcess:
    """The server with `args`, on one CPU device; its port is read from its first lines."""

    def __init__(self, log_dir, *args, startup_timeout=180):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        self.stderr = log_dir / "serve.stderr"
        with self.stderr.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scaling.serve", "--port=0", *args],
                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_for_port(startup_timeout)

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for_port(self, timeout) -> int:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                raise AssertionError(f"the server exited: {self.stderr.read_text()[-2000:]}")
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if found:
                return int(found.group(1))

    def request(self, method, path, body=None):
        """(status, decoded JSON) of one request; `body` may be a dict or raw bytes."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            connection.request(method, path, body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        """The exit code. A second SIGTERM would race the event loop's handler removal."""
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def output(self) -> str:
        """Everything printed after the first line, once the process has closed stdout."""
        lines = []
        while (line := self.lines.get(timeout=60)) is not None:
            lines.append(line)
        return "".join(lines)
