//! The change-event transport (one of three "events" things: `crate::change`
//! is the model of a change, `fs::apply_events` applies changes inside the
//! core, and this module receives them). Parameter change events: SSM's "Parameter Store Change" events, delivered
//! by EventBridge to an SQS queue (directly, or through an SNS topic, raw or in
//! SNS's envelope), turned into refreshes of exactly the names that changed.
//!
//! Model: events are hints, never data. They carry a name and an operation
//! (no value, no version), and delivery is at-least-once, unordered and
//! lossy. So an event never writes an answer into the cache: it makes the
//! filesystem ask SSM again about a name this host knows (`Fs::apply_events`),
//! which is correct whatever order events come in, costs at most one call per
//! name (ten names share a GetParameters), and costs nothing for names this
//! host never looked at. The TTL stays the bound on staleness when an event is
//! lost; with events it can be long.
//!
//! The listener (`listen`) long-polls the queue (20 s waits: about three
//! receives a minute when idle), applies what it received, then deletes the
//! messages, malformed ones included, so none comes back. When the queue does
//! not answer it backs off, says so once, and freshness falls back to the TTL
//! until it answers again.

pub mod sqs;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::Value;

pub use crate::change::{Operation, ParameterEvent};
use crate::fs::Fs;
use crate::metrics::Metrics;
use crate::store::ParameterStore;

/// The longest wait of one receive (SQS's maximum): an idle host makes three
/// receives a minute, each answered as soon as an event arrives.
pub const RECEIVE_WAIT: Duration = Duration::from_secs(20);
/// SQS's most messages per receive.
pub const RECEIVE_BATCH: usize = 10;
/// First pause after a failed receive, doubled per failure in a row.
const QUEUE_RETRY: Duration = Duration::from_secs(1);
/// Longest pause between receives while the queue fails: how soon events
/// resume after the queue answers again.
const QUEUE_RETRY_MAX: Duration = Duration::from_secs(60);

/// What one queue message turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Event(ParameterEvent),
    /// Well formed, but not a parameter change (another source, an SNS
    /// subscription notice): ignored.
    Foreign,
}

/// Why a message is not a usable event. Never carries the message's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("not JSON")]
    NotJson,
    #[error("not an EventBridge event or an SNS notification")]
    UnknownShape,
    #[error("an SNS notification whose Message is not an event")]
    BadEnvelope,
    #[error("a Parameter Store Change event without detail.name or detail.operation")]
    NoDetail,
}

const SSM_SOURCE: &str = "aws.ssm";
const CHANGE_DETAIL_TYPE: &str = "Parameter Store Change";

/// Reads a message body in any of the three shapes a queue can hold: the
/// EventBridge event itself (a rule targeting the queue, or SNS with raw
/// delivery), or an SNS notification whose `Message` is that event.
pub fn parse(body: &str) -> Result<Message, Malformed> {
    let value: Value = serde_json::from_str(body).map_err(|_| Malformed::NotJson)?;
    if value.get("Type").and_then(Value::as_str).is_some() && value.get("TopicArn").is_some() {
        if value["Type"] != "Notification" {
            return Ok(Message::Foreign); // SubscriptionConfirmation and the like
        }
        let inner = value
            .get("Message")
            .and_then(Value::as_str)
            .ok_or(Malformed::BadEnvelope)?;
        let inner: Value = serde_json::from_str(inner).map_err(|_| Malformed::BadEnvelope)?;
        return parse_event(&inner).map_err(|error| match error {
            Malformed::UnknownShape | Malformed::NotJson => Malformed::BadEnvelope,
            other => other,
        });
    }
    parse_event(&value)
}

fn parse_event(value: &Value) -> Result<Message, Malformed> {
    let (Some(source), Some(detail_type)) = (
        value.get("source").and_then(Value::as_str),
        value.get("detail-type").and_then(Value::as_str),
    ) else {
        return Err(Malformed::UnknownShape);
    };
    if source != SSM_SOURCE || detail_type != CHANGE_DETAIL_TYPE {
        return Ok(Message::Foreign);
    }
    let detail = value.get("detail").ok_or(Malformed::NoDetail)?;
    let (Some(name), Some(operation)) = (
        detail.get("name").and_then(Value::as_str),
        detail.get("operation").and_then(Value::as_str),
    ) else {
        return Err(Malformed::NoDetail);
    };
    let operation = match operation {
        "Create" => Operation::Create,
        "Update" => Operation::Update,
        "Delete" => Operation::Delete,
        "LabelParameterVersion" => Operation::Label,
        _ => Operation::Other,
    };
    Ok(Message::Event(ParameterEvent {
        id: value.get("id").and_then(Value::as_str).map(str::to_string),
        name: name.to_string(),
        operation,
        time: value
            .get("time")
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok()),
    }))
}

/// One message as a queue delivered it.
#[derive(Debug, Clone)]
pub struct QueueMessage {
    pub body: String,
    /// What deleting the message takes.
    pub receipt: String,
    /// When the queue received it (SQS's SentTimestamp): the event's time
    /// when the event has none.
    pub sent: Option<SystemTime>,
}

/// Why the queue did not answer; logged, never fatal.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct QueueError(pub String);

/// Where events come from: SQS (`sqs::SqsQueue`) or, in tests, `MemoryQueue`.
pub trait EventQueue: Send + Sync + 'static {
    /// How many hosts receive each event, where the queue can tell (a topic's
    /// subscriptions); `None`: the daemon's `--events-hosts` stands.
    fn hosts(&self) -> impl std::future::Future<Output = Option<u32>> + Send {
        async { None }
    }
    /// Up to ten messages, waiting up to `RECEIVE_WAIT` for the first.
    fn receive(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<QueueMessage>, QueueError>> + Send;
    fn delete(
        &self,
        receipts: Vec<String>,
    ) -> impl std::future::Future<Output = Result<(), QueueError>> + Send;
}

/// The longest sleep between looks for paced refetches that came due (see
/// `fs::apply_events`); a refetch due sooner is made when it is due.
const PACING_TICK: Duration = Duration::from_millis(250);
/// How often the fleet's size is counted again (one GetTopicAttributes).
const HOSTS_RECOUNT: Duration = Duration::from_secs(3600);

/// Receives, applies and deletes until the task is dropped; meanwhile makes
/// the paced refetches as they come due, and keeps the fleet's size current.
pub async fn listen<S: ParameterStore, Q: EventQueue>(fs: Arc<Fs<S>>, queue: Q) {
    let queue = Arc::new(queue);
    tokio::join!(
        receive_and_apply(fs.clone(), queue.clone()),
        make_paced_refetches(fs.clone()),
        count_hosts(fs, queue),
    );
}

async fn make_paced_refetches<S: ParameterStore>(fs: Arc<Fs<S>>) {
    loop {
        let now = tokio::time::Instant::now();
        let wake = fs
            .next_event_due()
            .map_or(now + PACING_TICK, |due| due.clamp(now, now + PACING_TICK));
        tokio::time::sleep_until(wake).await;
        fs.retry_pending_events().await;
    }
}

async fn count_hosts<S: ParameterStore, Q: EventQueue>(fs: Arc<Fs<S>>, queue: Arc<Q>) {
    loop {
        if let Some(counted) = queue.hosts().await {
            let hosts = fs.set_event_hosts(counted);
            tracing::debug!(
                counted,
                hosts,
                spread_ms = fs.event_spread_now().as_millis() as u64,
                "hosts receiving change events counted"
            );
        }
        tokio::time::sleep(HOSTS_RECOUNT).await;
    }
}

async fn receive_and_apply<S: ParameterStore, Q: EventQueue>(fs: Arc<Fs<S>>, queue: Arc<Q>) {
    let metrics = fs.metrics().clone();
    let mut failures: u32 = 0;
    let mut malformed_logged = false;
    loop {
        let messages = match queue.receive().await {
            Ok(messages) => {
                fs.note_queue_answered(true);
                if failures > 0 {
                    tracing::info!("the event queue answers again; change events resumed");
                }
                failures = 0;
                messages
            }
            Err(error) => {
                fs.note_queue_answered(false);
                Metrics::inc(&metrics.event_queue_errors);
                if failures == 0 {
                    tracing::warn!(%error, "the event queue does not answer; values stay fresh by their TTL, and missing names by the negative TTL, until it does");
                }
                let pause = QUEUE_RETRY
                    .saturating_mul(1 << failures.min(6))
                    .min(QUEUE_RETRY_MAX);
                failures += 1;
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let mut events = Vec::with_capacity(messages.len());
        let mut receipts = Vec::with_capacity(messages.len());
        for message in messages {
            Metrics::inc(&metrics.events_received);
            receipts.push(message.receipt);
            match parse(&message.body) {
                Ok(Message::Event(mut event)) => {
                    event.time = event.time.or(message.sent);
                    events.push(event);
                }
                Ok(Message::Foreign) => Metrics::inc(&metrics.events_ignored),
                Err(cause) => {
                    Metrics::inc(&metrics.events_malformed);
                    if !std::mem::replace(&mut malformed_logged, true) {
                        tracing::warn!(%cause, "deleting a queue message that is not a parameter change event (logged once; counted in ssmfs_events_malformed_total)");
                    }
                }
            }
        }
        fs.apply_events(events).await;
        if !receipts.is_empty() {
            if let Err(error) = queue.delete(receipts).await {
                // They come back after the visibility timeout; applying them
                // again is harmless.
                tracing::warn!(%error, "could not delete received events from the queue");
            }
        }
    }
}

/// A queue in memory, for tests: messages go in with `push`, and the queue
/// can be made to fail. Counts receives and deletes.
#[derive(Clone, Default)]
pub struct MemoryQueue {
    inner: Arc<MemoryQueueInner>,
}

#[derive(Default)]
struct MemoryQueueInner {
    messages: Mutex<VecDeque<QueueMessage>>,
    arrived: tokio::sync::Notify,
    down: AtomicBool,
    receives: std::sync::atomic::AtomicU64,
    deleted: std::sync::atomic::AtomicU64,
}

impl MemoryQueue {
    pub fn push(&self, body: impl Into<String>) {
        let mut messages = self.inner.messages.lock().unwrap();
        let receipt = format!("receipt-{}", messages.len());
        messages.push_back(QueueMessage {
            body: body.into(),
            receipt,
            sent: Some(SystemTime::now()),
        });
        self.inner.arrived.notify_one();
    }

    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::Relaxed);
        self.inner.arrived.notify_one();
    }

    pub fn receives(&self) -> u64 {
        self.inner.receives.load(Ordering::Relaxed)
    }

    pub fn deleted(&self) -> u64 {
        self.inner.deleted.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> usize {
        self.inner.messages.lock().unwrap().len()
    }
}

impl EventQueue for MemoryQueue {
    async fn receive(&self) -> Result<Vec<QueueMessage>, QueueError> {
        self.inner.receives.fetch_add(1, Ordering::Relaxed);
        let wait = async {
            loop {
                if self.inner.down.load(Ordering::Relaxed) {
                    return Err(QueueError("the queue is down (injected)".into()));
                }
                let batch: Vec<QueueMessage> = {
                    let mut messages = self.inner.messages.lock().unwrap();
                    let n = messages.len().min(RECEIVE_BATCH);
                    messages.drain(..n).collect()
                };
                if !batch.is_empty() {
                    return Ok(batch);
                }
                self.inner.arrived.notified().await;
            }
        };
        tokio::time::timeout(RECEIVE_WAIT, wait)
            .await
            .unwrap_or(Ok(Vec::new()))
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), QueueError> {
        self.inner
            .deleted
            .fetch_add(receipts.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// An EventBridge "Parameter Store Change" event as EventBridge writes it,
/// for tests, the demo and the fleet simulation.
pub fn event_json(name: &str, operation: &str, time: SystemTime) -> String {
    serde_json::json!({
        "version": "0",
        "id": format!("{:016x}", rand::random::<u64>()),
        "detail-type": CHANGE_DETAIL_TYPE,
        "source": SSM_SOURCE,
        "account": "123456789012",
        "time": humantime::format_rfc3339_seconds(time).to_string(),
        "region": "us-east-1",
        "resources": [format!("arn:aws:ssm:us-east-1:123456789012:parameter{name}")],
        "detail": {"name": name, "type": "String", "operation": operation},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &str) -> ParameterEvent {
        match parse(body) {
            Ok(Message::Event(event)) => event,
            other => panic!("not an event: {other:?}"),
        }
    }

    #[test]
    fn reads_all_three_shapes() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let raw = event_json("/app/db/password", "Update", time);
        let direct = event(&raw);
        assert_eq!(direct.name, "/app/db/password");
        assert_eq!(direct.operation, Operation::Update);
        assert_eq!(direct.time, Some(time));
        let envelope = serde_json::json!({
            "Type": "Notification",
            "MessageId": "m-1",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:ssm-changes",
            "Message": raw,
            "Timestamp": "2023-11-14T22:13:20.000Z",
        })
        .to_string();
        assert_eq!(event(&envelope), direct);
    }

    #[test]
    fn operations_and_foreign_messages() {
        let now = SystemTime::now();
        for (text, operation) in [
            ("Create", Operation::Create),
            ("Delete", Operation::Delete),
            ("LabelParameterVersion", Operation::Label),
            ("SomethingNew", Operation::Other),
        ] {
            assert_eq!(event(&event_json("/a", text, now)).operation, operation);
        }
        let other_source = event_json("/a", "Update", now).replace("aws.ssm", "aws.s3");
        assert_eq!(parse(&other_source), Ok(Message::Foreign));
        let confirmation =
            r#"{"Type":"SubscriptionConfirmation","TopicArn":"arn:aws:sns:x","Message":"confirm"}"#;
        assert_eq!(parse(confirmation), Ok(Message::Foreign));
    }

    #[test]
    fn malformed_messages_say_why_without_their_text() {
        assert_eq!(parse("hunter2"), Err(Malformed::NotJson));
        assert_eq!(parse(r#"{"a":1}"#), Err(Malformed::UnknownShape));
        let no_detail = r#"{"source":"aws.ssm","detail-type":"Parameter Store Change"}"#;
        assert_eq!(parse(no_detail), Err(Malformed::NoDetail));
        let bad_envelope = r#"{"Type":"Notification","TopicArn":"t","Message":"hunter2"}"#;
        assert_eq!(parse(bad_envelope), Err(Malformed::BadEnvelope));
        for error in [Malformed::NotJson, Malformed::BadEnvelope] {
            assert!(!error.to_string().contains("hunter2"));
        }
    }
}
