//! `selective serve` as a process, the way a deployment runs it: the real
//! binary on a free port, spoken to over TCP (hand-written HTTP/1.1), by
//! OpenAI's Python client, and stopped with SIGTERM.
//!
//! Every wait has a deadline, so that a server that misbehaves fails a test
//! instead of hanging it, and every server is killed when its test ends
//! (the [`Serve`] guard), passed or not.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// From start to "listening on", and from then to /health 200.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// One read from a socket at most (a stalled server fails the test).
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A `selective serve` process, killed when dropped. Its stderr is read by
/// a thread into `log` (shown when a test fails) and, line by line, into
/// `lines`.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
    lines: Receiver<String>,
    port: Option<u16>,
}

impl Serve {
    /// Spawns `selective serve --port 0 --threads 1 {args}`.
    fn spawn(args: &[&str]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_selective"))
            .args(["serve", "--port", "0", "--threads", "1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the selective binary");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = tx.send(line);
                }
            });
        }
        Serve {
            child,
            log,
            lines,
            port: None,
        }
    }

    /// Spawns a server and waits until it listens and /health answers 200.
    fn start(args: &[&str]) -> Serve {
        let mut serve = Self::spawn(args);
        serve.wait_listening();
        serve.wait_healthy();
        serve
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((
            [127, 0, 0, 1],
            self.port.expect("the server is not listening yet"),
        ))
    }

    /// Reads stderr until `selective serve: listening on http://HOST:PORT`.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        let marker = "listening on http://";
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(marker) {
                        let addr = line[at + marker.len()..].trim();
                        let port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
                        self.port = Some(port.unwrap_or_else(|| panic!("no port in {line:?}")));
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no \"listening on\" line within {START_DEADLINE:?}; stderr:\n{}",
                    self.log()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "the server ended ({status:?}) before listening; stderr:\n{}",
                        self.log()
                    )
                }
            }
        }
    }

    /// Polls GET /health until it answers 200 (503 while the model loads).
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the server ended ({status}) while loading; stderr:\n{}",
                    self.log()
                );
            }
            match request(self.addr(), "GET", "/health", None) {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = format!("{} {}", r.status, r.text()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "/health did not answer 200 within {START_DEADLINE:?} (last: {last}); stderr:\n{}",
            self.log()
        );
    }

    fn sigterm(&self) {
        sigterm(self.pid());
    }

    /// Waits for the process to end, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the server did not exit within {limit:?}; stderr:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- the server's stderr ---\n{}", self.log());
        }
    }
}

#[cfg(target_os = "linux")]
fn sigterm(pid: u32) {
    // SAFETY: kill(2) with a pid of a child this process started and has not reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, SIGTERM): {}",
        io::Error::last_os_error()
    );
}

#[cfg(not(target_os = "linux"))]
fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("cannot run kill");
    assert!(status.success(), "kill -TERM {pid}: {status}");
}

// ---------------------------------------------------------------- HTTP/1.1

/// A whole response.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Sends a request with `Connection: close` and reads the status line and
/// headers; the body is what is left to read.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> io::Result<(u16, Vec<(String, String)>, Box<dyn BufRead + Send>)> {
    let mut socket = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    socket.set_read_timeout(Some(READ_TIMEOUT))?;
    socket.set_write_timeout(Some(READ_TIMEOUT))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n");
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes())?;
    socket.write_all(body.as_bytes())?;
    socket.flush()?;

    let mut reader = BufReader::new(socket);
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed before a status line",
        ));
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("status line {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed in the headers",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let chunked =
        header(&headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length = header(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    let body: Box<dyn BufRead + Send> = if chunked {
        Box::new(BufReader::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        }))
    } else if let Some(length) = length {
        Box::new(BufReader::new(reader.take(length)))
    } else {
        Box::new(reader)
    };
    Ok((status, headers, body))
}

/// A request read to its end.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> io::Result<Response> {
    let (status, headers, mut reader) = send(addr, method, path, body)?;
    let mut body = Vec::new();
    reader.read_to_end(&mut body)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// A `Transfer-Encoding: chunked` body.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the body ended inside chunked encoding",
                ));
            }
            let size = line.trim_end().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size.trim(), 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("chunk size line {line:?}"),
                )
            })?;
            if self.left == 0 {
                // trailers, then the empty line
                loop {
                    let mut trailer = String::new();
                    if self.inner.read_line(&mut trailer)? == 0 || trailer.trim_end().is_empty() {
                        break;
                    }
                }
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the body ended inside a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(n)
    }
}

/// A server-sent-events answer, read one `data:` payload at a time.
struct EventStream {
    reader: Box<dyn BufRead + Send>,
}

impl EventStream {
    fn open(addr: SocketAddr, path: &str, body: &Value) -> EventStream {
        let (status, headers, reader) =
            send(addr, "POST", path, Some(body)).expect("the streamed request");
        let mut stream = EventStream { reader };
        if status != 200 {
            let mut rest = String::new();
            let _ = stream.reader.read_to_string(&mut rest);
            panic!("POST {path} {body}: expected 200, got {status}: {rest}");
        }
        let kind = header(&headers, "content-type").unwrap_or("");
        assert!(
            kind.starts_with("text/event-stream"),
            "content-type {kind:?}"
        );
        stream
    }

    /// The next `data:` payload; None at the end of the body.
    fn next_data(&mut self) -> io::Result<Option<String>> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            if let Some(data) = line.trim_end_matches(['\r', '\n']).strip_prefix("data:") {
                return Ok(Some(data.strip_prefix(' ').unwrap_or(data).to_string()));
            }
        }
    }

    /// The payloads left, until the end of the body or `deadline`.
    fn rest(&mut self, deadline: Instant) -> Vec<String> {
        let mut all = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "the stream had not ended by its deadline ({} more events read; last: {:?})",
                all.len(),
                all.last()
            );
            match self.next_data() {
                Ok(Some(data)) => all.push(data),
                Ok(None) => return all,
                Err(e) => panic!("reading the stream after {} more events: {e}", all.len()),
            }
        }
    }
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `command`, killing it if it takes longer than `limit`; returns its
/// status and its stdout and stderr.
fn output_within(command: &mut Command, limit: Duration) -> (ExitStatus, String, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the command");
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = r.read_to_string(&mut text);
            text
        })
    };
    let stdout = pipe(Box::new(child.stdout.take().unwrap()));
    let stderr = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not end within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, stdout.join().unwrap(), stderr.join().unwrap())
}

fn parse(data: &str) -> Value {
    serde_json::from_str(data)
        .unwrap_or_else(|e| panic!("a stream event that is not JSON ({e}): {data}"))
}

/// The finish_reason of a completions chunk, if it has one.
fn finish_reason(chunk: &Value) -> Option<&str> {
    chunk["choices"]
        .as_array()?
        .iter()
        .find_map(|c| c["finish_reason"].as_str())
}

// ------------------------------------------------------------------ tests

#[test]
fn the_openai_python_client_talks_to_the_server() {
    let required = std::env::var("SELECTIVE_PYTHON_TESTS").is_ok_and(|v| v == "require");
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        let why = match probe {
            Err(e) => format!("python3 cannot be run ({e})"),
            Ok(_) => "python3 cannot import openai".to_string(),
        };
        assert!(
            !required,
            "SELECTIVE_PYTHON_TESTS=require, but {why}: pip install openai"
        );
        eprintln!("skipped: {why} (pip install openai to run this test; SELECTIVE_PYTHON_TESTS=require makes it fail instead)");
        return;
    }
    let serve = Serve::start(&[]);
    let base_url = format!("http://{}/v1", serve.addr());
    let script = root().join("tests/python/openai_client_check.py");
    let (status, stdout, stderr) = output_within(
        Command::new("python3").arg(&script).args([
            "--base-url",
            &base_url,
            "--model",
            "shakespeare-char",
        ]),
        Duration::from_secs(180),
    );
    eprintln!("{stdout}{stderr}");
    assert!(
        status.success(),
        "{} --base-url {base_url}: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        script.display()
    );
    assert!(stdout.contains("checks passed"), "{stdout}");
}

/// A request on a new connection after SIGTERM: "503" or "refused" (the
/// listener is closed). A 200 only means the signal has not been handled
/// yet, so it is retried for a while.
fn new_request_after_sigterm(addr: SocketAddr) -> &'static str {
    let (answer, answered_200) = new_request_after_sigterm_counting(addr);
    if answered_200 > 0 {
        eprintln!("{answered_200} new request(s) got 200 before the server had handled SIGTERM");
    }
    answer
}

fn new_request_after_sigterm_counting(addr: SocketAddr) -> (&'static str, usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = json!({"prompt": "ROMEO:", "max_tokens": 2, "temperature": 0});
    let mut answered_200 = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "10 s after SIGTERM new requests still get 200 ({answered_200} of them)"
        );
        match request(addr, "POST", "/v1/completions", Some(&body)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return ("refused", answered_200)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                ) =>
            {
                eprintln!("a new request after SIGTERM: the connection was closed ({e})");
                return ("closed", answered_200);
            }
            Err(e) => panic!("a new request after SIGTERM: {e}"),
            Ok(r) if r.status == 503 => {
                let text = r.text();
                assert!(text.contains("shutting down"), "503 body: {text}");
                assert_eq!(r.header("retry-after"), Some("1"), "the 503's Retry-After");
                return ("503", answered_200);
            }
            Ok(r) if r.status == 200 => {
                answered_200 += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(r) => panic!("a new request after SIGTERM: {} {}", r.status, r.text()),
        }
    }
}

#[cfg(unix)]
#[test]
fn sigterm_lets_a_running_request_finish_and_exits_cleanly() {
    // Long enough that the request is still running when SIGTERM comes
    // (about 3 s at 7000 tokens/s), far within the drain time.
    let max_tokens = 20_000;
    let mut serve = Serve::start(&["--drain-seconds", "30", "--max-tokens", "20000"]);
    let addr = serve.addr();
    let mut stream = EventStream::open(
        addr,
        "/v1/completions",
        &json!({"prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0, "stream": true}),
    );
    let first = stream
        .next_data()
        .expect("the first event")
        .expect("an event before the end");
    assert_eq!(parse(&first)["object"], "text_completion", "{first}");

    serve.sigterm();
    let sent = Instant::now();
    let answer = new_request_after_sigterm(addr);
    eprintln!(
        "a new request {:.0} ms after SIGTERM: {answer}",
        sent.elapsed().as_secs_f64() * 1e3
    );
    // and once the shutdown has settled (the stream still runs)
    std::thread::sleep(Duration::from_millis(200));
    let later = new_request_after_sigterm(addr);
    eprintln!(
        "a new request {:.0} ms after SIGTERM: {later}",
        sent.elapsed().as_secs_f64() * 1e3
    );

    let rest = stream.rest(sent + Duration::from_secs(60));
    let ended = sent.elapsed();
    eprintln!(
        "the running stream ended {:.2} s after SIGTERM, {} events after the first",
        ended.as_secs_f64(),
        rest.len()
    );
    assert_eq!(
        rest.last().map(String::as_str),
        Some("[DONE]"),
        "the last event"
    );
    let chunks: Vec<Value> = rest[..rest.len() - 1].iter().map(|d| parse(d)).collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "an error in the stream: {:?}",
        chunks.iter().find(|c| c.get("error").is_some())
    );
    let finishes: Vec<&str> = chunks.iter().filter_map(finish_reason).collect();
    assert_eq!(finishes, vec!["length"], "the finish reasons");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"], max_tokens,
        "the usage chunk: {usage}"
    );

    let status = serve.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "the exit status: {status}; stderr:\n{}",
        serve.log()
    );
    eprintln!("exited {:.2} s after SIGTERM", sent.elapsed().as_secs_f64());
    assert!(
        serve.log().contains("shutting down"),
        "stderr:\n{}",
        serve.log()
    );
}

#[cfg(unix)]
#[test]
fn sigterm_cancels_what_does_not_finish_within_the_drain_time() {
    // A million tokens take minutes: only the drain deadline ends it.
    let drain = Duration::from_millis(500);
    let mut serve = Serve::start(&["--drain-seconds", "0.5", "--max-tokens", "1000000"]);
    let mut stream = EventStream::open(
        serve.addr(),
        "/v1/completions",
        &json!({"prompt": "ROMEO:", "max_tokens": 1_000_000, "temperature": 0, "stream": true}),
    );
    stream
        .next_data()
        .expect("the first event")
        .expect("an event before the end");

    serve.sigterm();
    let sent = Instant::now();
    let rest = stream.rest(sent + Duration::from_secs(20));
    let ended = sent.elapsed();
    let last = rest.last().cloned().unwrap_or_default();
    let how = match serde_json::from_str::<Value>(&last) {
        Ok(v) if v.get("error").is_some() => {
            let message = v["error"]["message"].as_str().unwrap_or("");
            assert!(
                message.contains("shutting down"),
                "the stream's error: {last}"
            );
            format!("an error event: {message:?}")
        }
        _ => format!("closing (last event: {last:.200})"),
    };
    eprintln!(
        "the stream ended {:.2} s after SIGTERM, by {how}, {} events after the first",
        ended.as_secs_f64(),
        rest.len()
    );
    assert_ne!(
        last, "[DONE]",
        "the stream was not cancelled: it ended normally"
    );
    for data in &rest {
        if let Ok(chunk) = serde_json::from_str::<Value>(data) {
            assert_eq!(
                finish_reason(&chunk),
                None,
                "a finished chunk in a cancelled stream: {data}"
            );
        }
    }
    // It may not be cut before the drain time is up.
    assert!(
        ended + Duration::from_millis(50) >= drain,
        "the stream ended {ended:?} after SIGTERM, before the drain time {drain:?}"
    );

    let status = serve.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "the exit status: {status}; stderr:\n{}",
        serve.log()
    );
    let exited = sent.elapsed();
    eprintln!("exited {:.2} s after SIGTERM", exited.as_secs_f64());
    assert!(
        exited < Duration::from_secs(10),
        "exited {exited:?} after SIGTERM"
    );
}

#[test]
fn a_bad_model_directory_fails_with_a_clear_error() {
    let missing = "/nonexistent/selective-serve-test-model";
    let mut serve = Serve::spawn(&["--model", missing]);
    let status = serve.wait_exit(Duration::from_secs(60));
    // the stderr thread may still be reading the last lines
    let deadline = Instant::now() + Duration::from_secs(5);
    while serve
        .lines
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
    {}
    let log = serve.log();
    eprintln!("{status}; stderr:\n{log}");
    assert!(
        !status.success(),
        "serve --model {missing} succeeded: {status}; stderr:\n{log}"
    );
    assert!(
        status.code().is_some(),
        "serve --model {missing} was killed: {status}"
    );
    assert!(
        log.contains(missing),
        "stderr does not name {missing}:\n{log}"
    );
}

/// The value of the metric line `name value` in a /metrics body.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let response = request(addr, "GET", "/metrics", None).expect("GET /metrics");
    let text = response.text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn a_client_that_hangs_up_cancels_its_sequence() {
    let serve = Serve::start(&["--max-tokens", "1000000"]);
    let addr = serve.addr();
    let mut stream = EventStream::open(
        addr,
        "/v1/completions",
        &json!({"prompt": "ROMEO:", "max_tokens": 1_000_000, "stream": true}),
    );
    stream
        .next_data()
        .expect("the first event")
        .expect("an event");
    // the client goes away mid-stream (about 150 s of tokens were asked)
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(addr, "selective_sequences_cancelled_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the sequence was not cancelled; stderr:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(addr, "selective_sequences_running"), 0.0);
    // and the server goes on serving
    let answer = request(
        addr,
        "POST",
        "/v1/completions",
        Some(&json!({"prompt": "KING:", "max_tokens": 5})),
    )
    .expect("a request after the hang-up");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(parse(&answer.text())["usage"]["completion_tokens"], 5);
}
