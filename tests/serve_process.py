"""`python -m scaling.serve` as a child process on a free loopback port, for the HTTP tests."""

import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from conftest import REPO, child_env


class ServeProcess:
    """The server with `args`, on one CPU device; its port is read from its first lines.

    The language-model server binds its port before it loads the model, so a server that
    never comes up fails the test within `bind_timeout` (its imports' time), or at once when
    it exits, with its log; the model's loading and compiling then have `startup_timeout`."""

    def __init__(self, log_dir, *args, startup_timeout=180, bind_timeout=45):
        env = child_env()
        self.stderr = log_dir / "serve.stderr"
        with self.stderr.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scaling.serve", "--port=0", *args],
                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO, env=env)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first, self.port = self._wait_for(r"http://127\.0\.0\.1:(\d+)", bind_timeout)
        if first.startswith("listening"):
            self._wait_for(r"^serving ", startup_timeout)

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for(self, pattern, timeout) -> tuple[str, int | None]:
        """The first line that matches `pattern`, and the number its group holds; fails with
        the server's log when it exits or prints no such line within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                self.process.kill()
                raise AssertionError(f"the server printed no {pattern!r} within {timeout} s: "
                                     f"{self.stderr.read_text()[-2000:]}") from None
            if line is None:
                raise AssertionError(f"the server exited: {self.stderr.read_text()[-2000:]}")
            found = re.search(pattern, line)
            if found:
                return line, int(found.group(1)) if found.groups() else None

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
