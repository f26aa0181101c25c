//! The hive proves itself: whatever answers at an `http` node's address without the node's key
//! is refused (exit 5) and nothing it sent is printed; a man in the middle who alters, drops or
//! reorders one event of a real hive's stream is caught at that event, and only the events
//! before it (the node's own) were printed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::{Env, Run, free_port, model_table};

/// A small HTTP server standing at the `http` node's address. `fake` answers everything itself,
/// like a hive but without the node's key; `fake-infer` passes everything to the real hive's
/// socket but answers `/v1/infer` itself; `pass`, `alter`, `drop` and `swap` pass everything
/// through and change the stream of `/v1/infer` at its token event number N.
const PROXY: &str = r#"
import http.client, json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode, port, upstream, n, version, protocol = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])

class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("hive", timeout=120)
        self.unix = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix)

def tokens():
    out = b'event: started\ndata: {}\n\n'
    for t in ["The", " answer", " is", " 42", "."]:
        out += b'event: token\ndata: ' + json.dumps({"text": t}).encode() + b'\n\n'
    done = {"tokens_in": 3, "tokens_out": 5, "stop_reason": "eos", "timings_ms": {},
            "decode_tokens_per_s": 100.0, "worker_pid": 1}
    return out + b'event: done\ndata: ' + json.dumps(done).encode() + b'\n\n'

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self): self.handle_request()
    def do_POST(self): self.handle_request()
    def do_DELETE(self): self.handle_request()

    def reply(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_request(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if mode == "fake" or (mode == "fake-infer" and self.path == "/v1/infer"):
            if self.path == "/health":
                health = {"status": "ok", "version": version, "protocol": protocol,
                          "node": "n2", "pid": 1, "uptime_s": 1.0}
                return self.reply(200, json.dumps(health).encode())
            if self.path == "/v1/infer":
                return self.reply(200, tokens(), "text/event-stream")
            return self.reply(200, b"[]")
        conn = Unix(upstream)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        if self.path != "/v1/infer" or r.status != 200:
            return self.reply_as(r, r.read())
        self.send_response(200)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True
        buf, token, held = b"", 0, None
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                event += b"\n\n"
                if event.startswith(b"event: token"):
                    if token == n:
                        if mode == "alter":
                            event = event.replace(b'"text":"', b'"text":"EVIL', 1)
                        elif mode == "drop":
                            event = b""
                        elif mode == "swap":
                            held, event = event, b""
                    elif token == n + 1 and held is not None:
                        event, held = event + held, None
                    token += 1
                self.wfile.write(event)
                self.wfile.flush()

    def reply_as(self, r, body):
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

/// The protocol this build's hive speaks (`protocol::PROTOCOL_VERSION`).
const PROTOCOL: u32 = 5;

/// The proxy (or fake hive) running in `mode`, at `port`, in front of `upstream`.
struct Proxy(Child);

impl Proxy {
    fn start(dir: &Path, mode: &str, port: u16, upstream: &Path, n: usize) -> Proxy {
        Proxy::speaking(dir, mode, port, upstream, n, PROTOCOL)
    }

    /// The same, claiming protocol `protocol` in its health.
    fn speaking(
        dir: &Path,
        mode: &str,
        port: u16,
        upstream: &Path,
        n: usize,
        protocol: u32,
    ) -> Proxy {
        let script = dir.join("proxy.py");
        std::fs::write(&script, PROXY).expect("write the proxy");
        let child = Command::new("python3")
            .arg(&script)
            .args([mode, &port.to_string()])
            .arg(upstream)
            .args([
                &n.to_string(),
                env!("CARGO_PKG_VERSION"),
                &protocol.to_string(),
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        let up = crate::support::eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "the proxy did not start listening on {port}");
        Proxy(child)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A local node `n1` (the real hive) and an `http` node `n2` whose address is `proxy`; `n2`'s
/// key on this machine is `n1`'s, as if the proxy were on the path to the node.
fn fleet(proxy: u16) -> Option<Env> {
    let model = crate::support::model()?;
    let env = Env::custom(|dir, port| {
        format!(
            "{}\n[nodes.n1]\ntransport = \"local\"\nremote_dir = {node:?}\nhive_port = {port}\n\
             models = [\"smollm2\"]\n\n[nodes.n2]\ntransport = \"http\"\nhost = \"127.0.0.1\"\n\
             hive_port = {proxy}\nmodels = [\"smollm2\"]\n",
            model_table(&model, crate::support::MODEL_SHA256),
            node = dir.join("node").display().to_string(),
        )
    });
    Some(env)
}

fn share_key(env: &Env) {
    use std::os::unix::fs::PermissionsExt;
    let keys = env.path().join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let copy = keys.join("n2.key");
    std::fs::write(&copy, env.node_key()).expect("copy the key");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

const ASK: [&str; 9] = [
    "--prompt",
    "Name three colours.",
    "--temperature",
    "0",
    "--max-tokens",
    "8",
    "--timeout",
    "60s",
    "--seed=1",
];

fn infer_on(env: &Env, node: &str, json: bool) -> Run {
    let mut args = vec![];
    if json {
        args.push("--json");
    }
    args.extend(["infer", "--node", node]);
    args.extend(ASK);
    env.run(&args)
}

fn tokens(run: &Run) -> Vec<String> {
    run.json_lines()
        .iter()
        .filter(|l| l["event"] == "token")
        .map(|l| l["text"].as_str().expect("text").to_string())
        .collect()
}

#[test]
fn a_fake_hive_without_the_node_key_is_refused_and_nothing_it_sent_is_printed() {
    let port = free_port();
    let Some(env) = fleet(port) else { return };
    env.run(&["hive", "start", "n1"]).expect(0);
    share_key(&env);
    for mode in ["fake", "fake-infer"] {
        let _proxy = Proxy::start(env.path(), mode, port, &env.socket(), 0);
        let run = infer_on(&env, "n2", false);
        run.expect(5);
        assert_eq!(run.stdout, "", "{mode}: the fake's text reached stdout");
        assert!(
            run.stderr.contains("did not verify"),
            "{mode}: {}",
            run.stderr
        );
        let json = infer_on(&env, "n2", true);
        json.expect(5);
        assert!(tokens(&json).is_empty(), "{mode}: {}", json.stdout);
        assert_eq!(
            json.json_lines().last().expect("error line")["exit_code"],
            5
        );
    }
}

#[test]
fn a_stream_with_one_event_altered_dropped_or_reordered_is_refused_at_that_event() {
    let port = free_port();
    let Some(env) = fleet(port) else { return };
    let direct = infer_on(&env, "n1", true);
    direct.expect(0);
    let genuine = tokens(&direct);
    assert_eq!(genuine.len(), 8, "{}", direct.stdout);
    share_key(&env);
    // The proxy itself changes nothing when asked to: what fails below fails by the change.
    {
        let _proxy = Proxy::start(env.path(), "pass", port, &env.socket(), 3);
        let run = infer_on(&env, "n2", true);
        run.expect(0);
        assert_eq!(tokens(&run), genuine);
    }
    for mode in ["alter", "drop", "swap"] {
        let _proxy = Proxy::start(env.path(), mode, port, &env.socket(), 3);
        let run = infer_on(&env, "n2", true);
        run.expect(5);
        assert_eq!(tokens(&run), genuine[..3], "{mode}: {}", run.stdout);
        let last = run.json_lines().last().cloned().expect("a line");
        assert_eq!(last["event"], "error", "{mode}: {}", run.stdout);
        assert_eq!(last["exit_code"], 5, "{mode}: {}", run.stdout);
        assert!(!run.stdout.contains("EVIL"), "{mode}: {}", run.stdout);
        // Plain text: the same verified prefix, then nothing but the newline rbee ends a cut
        // answer with.
        let plain = infer_on(&env, "n2", false);
        plain.expect(5);
        assert_eq!(
            plain.stdout,
            format!("{}\n", genuine[..3].concat()),
            "{mode}"
        );
    }
    // The node itself is fine: a direct request still works.
    infer_on(&env, "n1", true).expect(0);
}
