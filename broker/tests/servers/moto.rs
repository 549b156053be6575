//! A real S3-compatible server for tests: moto (PyPI `moto[server]`,
//! listed in ops/pip-packages.txt) on a free loopback port, with helpers
//! that set it up and read it back through an independent client (boto3).
//! Shared by the sink test and the cluster delivery test (`#[path]`).

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long moto may take to start (Python imports on a loaded machine).
pub const SERVER_DEADLINE: Duration = Duration::from_secs(90);
pub const BUCKET: &str = "audit";

pub fn python() -> String {
    std::env::var("AUDITFLOW_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A moto server; killed on drop. Its state lives in memory only.
pub struct Moto {
    pub port: u16,
    pub child: Option<Child>,
}

impl Moto {
    /// A server on a free port, not started.
    pub fn new() -> Moto {
        Moto {
            port: free_port(),
            child: None,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it and waits until it answers HTTP.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(python())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto (pip install 'moto[server]')");
        self.child = Some(child);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + SERVER_DEADLINE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("moto exited with {status}: is moto[server] installed?");
                }
            }
            if http
                .get(format!("{}/moto-api/", self.endpoint()))
                .send()
                .await
                .is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs a Python snippet with the endpoint as `sys.argv[1]` (and more
    /// arguments after), returning its stdout parsed as JSON.
    pub async fn python(&self, script: &str, args: &[&str]) -> Value {
        let out = tokio::process::Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(self.endpoint())
            .args(args)
            .output()
            .await
            .expect("run python");
        assert!(
            out.status.success(),
            "python failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("python printed JSON")
    }

    /// Creates the bucket with throwaway credentials (auth still off).
    pub async fn create_bucket(&self) {
        self.python(CREATE_BUCKET, &[BUCKET]).await;
    }

    /// Makes IAM users `writer` (s3:*) and `reader` (no PutObject), creates
    /// the bucket, then switches signature and policy checks on. Returns
    /// the two (access key id, secret) pairs.
    pub async fn setup_with_auth(&self) -> (Keys, Keys) {
        let v = self.python(SETUP_AUTH, &[BUCKET]).await;
        let keys = |name: &str| Keys {
            id: v[name][0].as_str().expect("id").to_string(),
            secret: v[name][1].as_str().expect("secret").to_string(),
        };
        (keys("writer"), keys("reader"))
    }

    /// Every object of the bucket, read back with boto3.
    pub async fn objects(&self, keys: &Keys) -> Vec<Object> {
        let v = self
            .python(READ_ALL, &[BUCKET, &keys.id, &keys.secret])
            .await;
        serde_json::from_value(v).expect("objects")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone)]
pub struct Keys {
    pub id: String,
    pub secret: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct Object {
    pub key: String,
    pub body: String,
    pub content_type: String,
    pub metadata: std::collections::BTreeMap<String, String>,
}

pub const CREATE_BUCKET: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="setup", aws_secret_access_key="setup")
s3.create_bucket(Bucket=sys.argv[2])
print("{}")
"#;

pub const SETUP_AUTH: &str = r#"
import json, sys, urllib.request, boto3
ep, bucket = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=ep, region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
def user(name, actions):
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    k = iam.create_access_key(UserName=name)["AccessKey"]
    return [k["AccessKeyId"], k["SecretAccessKey"]]
out = {"writer": user("writer", ["s3:*"]),
       "reader": user("reader", ["s3:GetObject", "s3:ListBucket"])}
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
# From now on moto checks signatures and IAM policies on every request.
urllib.request.urlopen(urllib.request.Request(
    ep + "/moto-api/reset-auth", data=b"0", method="POST",
    headers={"Content-Type": "text/plain"})).read()
print(json.dumps(out))
"#;

pub const READ_ALL: &str = r#"
import json, sys, boto3
ep, bucket, key_id, secret = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id=key_id, aws_secret_access_key=secret)
out = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
    for o in page.get("Contents", []):
        got = s3.get_object(Bucket=bucket, Key=o["Key"])
        out.append({"key": o["Key"], "body": got["Body"].read().decode(),
                    "content_type": got["ContentType"], "metadata": got["Metadata"]})
print(json.dumps(out))
"#;
