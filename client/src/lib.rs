//! The auditflow client library.
//!
//! ```no_run
//! # async fn demo(event: auditflow_protocol::Event) -> Result<(), Box<dyn std::error::Error>> {
//! use auditflow_client::{Client, ClientConfig};
//! let cfg = ClientConfig::load(std::path::Path::new("client.toml"))?;
//! let client = Client::connect(cfg).await?;
//! let ack = client.append(event).await?;
//! println!("stored at {}:{} with hash {}", ack.partition, ack.offset, ack.hash);
//! # Ok(()) }
//! ```
//!
//! - [`config`]: the `client.toml` file.
//! - [`client`]: routing, retries, the in-flight window, reads and tails.
//! - [`transport`]: frames over QUIC streams and the client TLS setup,
//!   shared with the broker.

pub mod client;
pub mod config;
mod error;
pub mod transport;

pub use client::{Client, Tail};
pub use config::ClientConfig;
pub use error::{AppendError, ClientError};
