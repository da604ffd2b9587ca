//! ssmfs: an AWS SSM Parameter Store hierarchy as a read-only FUSE filesystem.
//!
//! Layers, top to bottom: `cli` (flags) -> `daemon` (mount, signals, readiness)
//! -> `fuse` (thin fuser adapter) -> `fs` (the async core) -> `cache` and
//! `inode` -> `store` (the SSM API, or an in-memory double). Beside them,
//! `events` turns SSM's change events (through SQS) into refetches.

pub mod airflow;
pub mod cache;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod events;
pub mod fs;
pub mod fuse;
pub mod heap;
pub mod inode;
pub mod metrics;
pub mod names;
pub mod secret;
pub mod store;
pub mod supervisor;
pub mod views;
