#!/usr/bin/env python3
"""A stand-in for the ngrok v3 agent, enough for pyngrok 9.1 (stdlib only, never leaves 127.0.0.1).

pyngrok runs `ngrok start --none --log stdout [--config PATH] [--authtoken T]`, reads stdout until it
has seen `starting web service ... addr=HOST:PORT`, `tunnel session started` and `client session
established`, probes `GET /api/endpoints` on that address, then `POST /api/endpoints` to open a
tunnel and `DELETE <uri>` to close it.

Environment:
- FAKE_NGROK_MODE: `normal` (default); `silent` (prints nothing and sleeps: the start hang);
  `error` (prints an ngrok-style error that echoes the authtoken, like ERR_NGROK_105, and exits 1).
- FAKE_NGROK_URL: the public URL to hand out (default https://babl-test.ngrok.example).
- FAKE_NGROK_STATE_DIR: when set, writes `pid`, `argv.json`, `env_token` (whether NGROK_AUTHTOKEN
  was in its environment) and `events.jsonl` (the tunnel requests) there, for tests to inspect.
- NGROK_AUTHTOKEN: required, as ngrok requires a token (ERR_NGROK_4018 otherwise).
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE_DIR = os.environ.get("FAKE_NGROK_STATE_DIR")
PUBLIC_URL = os.environ.get("FAKE_NGROK_URL", "https://babl-test.ngrok.example")


def emit(text):
    print(f"t={time.strftime('%Y-%m-%dT%H:%M:%S+0000', time.gmtime())} {text}", flush=True)


def record(name, text, append=False):
    if STATE_DIR:
        with open(os.path.join(STATE_DIR, name), "a" if append else "w") as handle:
            handle.write(text)


def event(kind, **fields):
    record("events.jsonl", json.dumps({"event": kind, **fields}) + "\n", append=True)


ENDPOINTS = {}


class AgentApi(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def reply(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path in ("/api/endpoints", "/api/tunnels"):
            key = self.path.rsplit("/", 1)[1]
            self.reply(200, {key: list(ENDPOINTS.values()), "uri": self.path})
        else:
            self.reply(404, {"error_code": 100, "msg": "not found"})

    def do_POST(self):
        if self.path != "/api/endpoints":
            self.reply(404, {"error_code": 100, "msg": "not found"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        name = body.get("name") or "endpoint"
        endpoint = {
            "id": f"ep_{len(ENDPOINTS) + 1}",
            "name": name,
            "uri": f"/api/endpoints/{name}",
            "url": PUBLIC_URL,
            "upstream": body.get("upstream", {}),
        }
        ENDPOINTS[name] = endpoint
        event("open", name=name, upstream=body.get("upstream"))
        self.reply(201, endpoint)

    def do_DELETE(self):
        prefix = "/api/endpoints/"
        name = self.path[len(prefix) :]
        if self.path.startswith(prefix) and ENDPOINTS.pop(name, None) is not None:
            event("close", name=name)
            self.reply(204)
        else:
            self.reply(404, {"error_code": 100, "msg": "not found"})


def main():
    mode = os.environ.get("FAKE_NGROK_MODE", "normal")
    record("pid", str(os.getpid()))
    record("argv.json", json.dumps(sys.argv[1:]))
    token = os.environ.get("NGROK_AUTHTOKEN", "")
    record("env_token", "yes" if token else "no")
    if sys.argv[1:2] == ["--version"]:
        print("ngrok version 3.99.0-fake", flush=True)
        return 0
    if mode == "silent":
        time.sleep(3600)
        return 0
    if not token and "--authtoken" not in sys.argv:
        emit(
            'lvl=eror msg="session closing" obj=tunnels.session err="authentication failed: '
            'Usage of ngrok requires a verified account and authtoken.\\n\\nERR_NGROK_4018"'
        )
        return 1
    if mode == "error":
        emit(
            'lvl=eror msg="session closing" obj=tunnels.session err="authentication failed: The authtoken '
            f"you specified does not look like a proper ngrok authtoken.\\nYour authtoken: {token}\\n"
            'Instructions to install your authtoken are on your ngrok dashboard.\\n\\nERR_NGROK_105"'
        )
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), AgentApi)
    host, port = server.server_address[:2]
    emit('lvl=info msg="no configuration paths supplied" obj=config')
    emit(f'lvl=info msg="starting web service" obj=web addr={host}:{port} allow_hosts=[]')
    emit('lvl=info msg="tunnel session started" obj=tunnels.session')
    emit('lvl=info msg="client session established" obj=csess id=fake0001')
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
