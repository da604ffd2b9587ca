//! ssmfs: an AWS SSM Parameter Store hierarchy as a read-only FUSE filesystem.
//!
//! Layers, top to bottom: `cli` (flags) -> `daemon` (mount, signals, readiness)
//! -> `fuse` (thin fuser adapter, with `stream_pipes`, the write ends of the
//! `@changes` pipes it opens through the mount) -> `fs` (the async core, which owns
//! its passive containers `fs::cache`, `fs::inode`, `fs::views` and its error
//! `fs::error`) -> `store` (the SSM API, or an in-memory double). `events` (the
//! SQS/SNS transport) sits above `fs` and hands it `change`s, the model of a
//! change both share; `supervisor` holds FUSE connections above `daemon`, and
//! both read the fds and environment of a handover from `handoff`. `client`
//! (`ssmfs exec`, `ssmfs render`) stands apart: it reads a mount through the
//! filesystem and follows its `@changes` stream, never calling AWS. `csi` is
//! the Kubernetes driver on top of all of them: the root plugin (`node`: its
//! `registry` of shared mounts under one lock, its `link` to the serving
//! side; the tenant policy as pure functions in `policy`) mounts through `daemon`,
//! and the unprivileged serving side (`serve`) runs a `supervisor` holder per
//! mount; the two speak over `fd_link`.
//!
//! "Events" are three things, one per layer: `change` (the model), `events`
//! (the SQS/SNS transport) and `fs::apply_events` (the core applying them).
//! docs/DESIGN.md draws where a cold read and a publish go, file by file.

pub mod airflow;
pub mod change;
pub mod cli;
pub mod client;
pub mod config;
pub mod csi;
pub mod daemon;
pub mod events;
pub mod fd_link;
pub mod fs;
pub mod fuse;
pub mod handoff;
pub mod heap;
pub mod metrics;
pub mod names;
pub mod secret;
pub mod store;
pub mod stream_pipes;
pub mod supervisor;
