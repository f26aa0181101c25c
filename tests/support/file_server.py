#!/usr/bin/env python3
"""A model server for the download tests (stdlib only).

Serves one file at /files/NAME with Range support, and redirects every other GET path ending in
/NAME (a Hugging Face resolve URL, /redirect/NAME) there, on another host name (localhost instead
of 127.0.0.1) as a CDN would. Each request is logged as one JSON line: method, path, host, range,
whether it carried an Authorization header, status. Prints its port on stdout once it listens.

  file_server.py FILE LOG [--rate BYTES_PER_S] [--corrupt] [--stall-after BYTES [--stall-ranged]]

--rate throttles whole-file answers (those without a Range); --corrupt serves other bytes of the
same length; --stall-after sends that many bytes of a whole-file answer and then nothing more,
holding the connection open (a stalled transfer), while ranged answers are served whole;
--stall-ranged stalls ranged answers the same way (a server that always stalls).
"""

import http.server
import json
import os
import sys
import threading
import time

args = sys.argv[1:]
FILE, LOG = args[0], args[1]
RATE = int(args[args.index("--rate") + 1]) if "--rate" in args else 0
CORRUPT = "--corrupt" in args
STALL_AFTER = int(args[args.index("--stall-after") + 1]) if "--stall-after" in args else None
STALL_RANGED = "--stall-ranged" in args
NAME = os.path.basename(FILE)
SIZE = os.path.getsize(FILE)
lock = threading.Lock()


def log(entry):
    with lock, open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def entry(self, status):
        log({
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "range": self.headers.get("Range"),
            "authorization": self.headers.get("Authorization") is not None,
            "status": status,
        })

    def do_GET(self):
        port = self.server.server_address[1]
        path = self.path.split("?")[0]
        if path != "/files/" + NAME:
            if path.endswith("/" + NAME):
                self.entry(302)
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/files/{NAME}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.entry(404)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
            return
        start, end = 0, SIZE - 1
        ranged = self.headers.get("Range")
        if ranged:
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start = int(first)
            if last:
                end = min(int(last), SIZE - 1)
            if start >= SIZE:
                self.entry(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{SIZE}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        status = 206 if ranged else 200
        self.entry(status)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{SIZE}")
        self.end_headers()
        chunk = 64 * 1024
        stall_at = None
        if STALL_AFTER is not None and (STALL_RANGED or not ranged):
            stall_at = STALL_AFTER
        sent = 0
        with open(FILE, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                if stall_at is not None and sent >= stall_at:
                    # Nothing more, the connection kept open: the client must give up on it.
                    self.wfile.flush()
                    time.sleep(3600)
                    return
                want = min(chunk, left)
                if stall_at is not None:
                    want = min(want, stall_at - sent)
                data = f.read(want)
                if not data:
                    break
                if CORRUPT:
                    data = bytes(b ^ 0x5A for b in data)
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(data)
                sent += len(data)
                if RATE and not ranged:
                    time.sleep(len(data) / RATE)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
