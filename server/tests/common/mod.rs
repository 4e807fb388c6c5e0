//! Starts the real `mantissa` binary on port 0 and hands tests a connected client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use mantissa_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::transport::Channel;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

pub fn example_store() -> PathBuf {
    repo_root().join("examples/models")
}

pub fn fixture_store() -> PathBuf {
    repo_root().join("tests/fixtures/store")
}

/// Models whose metadata leaves dimensions other than the batch variable.
pub fn variable_store() -> PathBuf {
    repo_root().join("tests/fixtures/variable_store")
}

pub fn mantissa_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mantissa"))
}

/// A running server; killed on drop if the test did not stop it.
pub struct TestServer {
    pub child: Child,
    pub grpc_addr: String,
    pub metrics_addr: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl TestServer {
    pub fn start(store: &Path) -> Self {
        Self::start_with(store, &[], &[])
    }

    /// Starts `mantissa serve` with extra flags and environment, and waits until it listens.
    pub fn start_with(store: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = mantissa_command();
        command
            .args(["--log-format", "json", "serve", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .arg("--model-store")
            .arg(store)
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn mantissa");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        {
            let logs = Arc::clone(&logs);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(addrs) = listening_addresses(&line) {
                        let _ = addr_tx.send(addrs);
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let (grpc_addr, metrics_addr) = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not report its address; logs:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Self { child, grpc_addr, metrics_addr, logs }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("connect to server")
    }

    pub async fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel().await)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// Waits until ServerReady says true.
    pub async fn wait_ready(&self) -> GrpcInferenceServiceClient<Channel> {
        let mut client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = client
                .server_ready(mantissa_proto::inference::ServerReadyRequest {})
                .await
                .map(|r| r.into_inner().ready)
                .unwrap_or(false);
            if ready {
                return client;
            }
            assert!(Instant::now() < deadline, "server not ready in time; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn terminate(&mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (bounded).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("server did not exit within {limit:?}; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn listening_addresses(line: &str) -> Option<(String, String)> {
    if !line.contains("\"listening\"") {
        return None;
    }
    let field = |name: &str| -> Option<String> {
        let key = format!("\"{name}\":\"");
        let start = line.find(&key)? + key.len();
        let end = line[start..].find('"')? + start;
        Some(line[start..end].to_owned())
    };
    Some((field("grpc_addr")?, field("metrics_addr")?))
}

/// Runs `mantissa` to completion (for startup-failure tests) with a time limit.
pub fn run_to_exit(mut command: Command, limit: Duration) -> (ExitStatus, String) {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn mantissa");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mantissa did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A digits_cnn request for `version`: `pixels` holds whole 8x8 images (64 values each).
pub fn digits_cnn_request(version: &str, pixels: &[f32]) -> mantissa_proto::inference::ModelInferRequest {
    use mantissa_proto::inference::ModelInferRequest;
    use mantissa_proto::inference::model_infer_request::InferInputTensor;
    ModelInferRequest {
        model_name: "digits_cnn".into(),
        model_version: version.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![(pixels.len() / 64) as i64, 1, 8, 8],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(pixels)],
        ..Default::default()
    }
}

pub fn f32_values(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The Prometheus text served at `GET /metrics` on `addr`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The variant name a response's `variant` parameter gives (its `model_version` is the number).
pub fn served_variant(response: &mantissa_proto::inference::ModelInferResponse) -> String {
    use mantissa_proto::inference::infer_parameter::ParameterChoice;
    match response.parameters.get("variant").and_then(|p| p.parameter_choice.as_ref()) {
        Some(ParameterChoice::StringParam(name)) => name.clone(),
        other => panic!("response has no string parameter 'variant': {other:?}"),
    }
}

/// A temporary store holding `model`'s ONNX file from the store `from`, under `policy`.
pub fn store_with(model: &str, from: &Path, policy: &str) -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let directory = store.path().join(model);
    std::fs::create_dir(&directory).unwrap();
    std::fs::copy(from.join(model).join("model.onnx"), directory.join("model.onnx")).unwrap();
    std::fs::write(directory.join("policy.yaml"), policy).unwrap();
    store
}
