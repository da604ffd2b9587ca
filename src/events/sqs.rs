//! Events from SQS (aws-sdk-sqs), and the topic mode's queue of its own.
//!
//! Queue mode: `--events-queue URL` names a queue that only this host reads
//! (messages a host deletes are gone for every other reader of the queue).
//! Topic mode: `--events-topic ARN` makes this host a queue of its own,
//! `ssmfs-<host>-<mount hash>-<random>`, lets the topic (and only it) send to
//! it, subscribes it with raw delivery and a filter on the mounted prefixes,
//! and deletes both at unmount. A daemon killed before that leaves them
//! behind: the next start on the same host and mount point finds them by
//! their name's prefix and removes them first.
//!
//! Endpoints come from the standard configuration (`AWS_ENDPOINT_URL_SQS`,
//! `AWS_ENDPOINT_URL_SNS`, `AWS_ENDPOINT_URL`); region and credentials are the
//! mount's.

use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use aws_smithy_types::timeout::TimeoutConfig;

use crate::config::EventsSource;

use super::{EventQueue, QueueError, QueueMessage, RECEIVE_BATCH, RECEIVE_WAIT};

/// How long one receive may take beyond its long-poll wait before it counts
/// as a failure.
const RECEIVE_SLACK: Duration = Duration::from_secs(10);
/// How long an own queue keeps an event nobody received: events older than
/// this are worth nothing to a daemon that was away (its cache started empty).
const OWN_QUEUE_RETENTION: Duration = Duration::from_secs(3600);

/// Why the events source cannot be set up: one line, before anything is mounted.
#[derive(Debug, thiserror::Error)]
pub enum EventsSetupError {
    #[error("--events-queue {url}: {cause}")]
    Queue { url: String, cause: String },
    #[error("--events-topic {arn}: {cause}")]
    Topic { arn: String, cause: String },
}

/// AWS's code and message, or the chain of causes when there is none.
fn describe<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    if let (Some(code), message) = (error.code(), error.message()) {
        return match message {
            Some(message) => format!("{code}: {message}"),
            None => code.to_string(),
        };
    }
    let mut causes = vec![error.to_string()];
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    causes.dedup();
    causes.join(": ")
}

/// The endpoint and region a queue URL names (`https://sqs.REGION.amazonaws.com/...`,
/// or a test server's origin), used unless the standard configuration sets an
/// SQS endpoint: a queue URL says where the queue is.
fn queue_endpoint(url: &str) -> Option<(String, Option<String>)> {
    if std::env::var_os("AWS_ENDPOINT_URL_SQS").is_some()
        || std::env::var_os("AWS_ENDPOINT_URL").is_some()
    {
        return None;
    }
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next().filter(|h| !h.is_empty())?;
    let region = host
        .strip_prefix("sqs.")
        .and_then(|h| h.split('.').next())
        .filter(|r| r.contains('-'))
        .map(str::to_string);
    Some((format!("{scheme}://{host}"), region))
}

fn sqs_client(sdk_config: &SdkConfig, queue_url: Option<&str>) -> aws_sdk_sqs::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(RECEIVE_WAIT + RECEIVE_SLACK)
        .build();
    let mut config = aws_sdk_sqs::config::Builder::from(sdk_config).timeout_config(timeouts);
    if let Some((endpoint, region)) = queue_url.and_then(queue_endpoint) {
        config = config.endpoint_url(endpoint);
        if let Some(region) = region {
            config = config.region(aws_config::Region::new(region));
        }
    }
    aws_sdk_sqs::Client::from_conf(config.build())
}

#[derive(Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
    /// Topic mode: the topic, whose subscriptions count the hosts.
    topic: Option<(aws_sdk_sns::Client, String)>,
}

impl SqsQueue {
    /// Checks that the queue answers before the mount appears.
    pub async fn open(sdk_config: &SdkConfig, url: &str) -> Result<Self, EventsSetupError> {
        let queue = Self {
            client: sqs_client(sdk_config, Some(url)),
            url: url.to_string(),
            topic: None,
        };
        queue
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| EventsSetupError::Queue {
                url: url.to_string(),
                cause: describe(&e),
            })?;
        Ok(queue)
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl EventQueue for SqsQueue {
    /// The topic's confirmed subscriptions: one queue per host in topic mode.
    async fn hosts(&self) -> Option<u32> {
        let (sns, arn) = self.topic.as_ref()?;
        match sns.get_topic_attributes().topic_arn(arn).send().await {
            Ok(output) => output
                .attributes()
                .and_then(|a| a.get("SubscriptionsConfirmed"))
                .and_then(|count| count.parse().ok()),
            Err(error) => {
                tracing::debug!(error = %describe(&error), "could not count the topic's subscriptions");
                None
            }
        }
    }

    async fn receive(&self) -> Result<Vec<QueueMessage>, QueueError> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .wait_time_seconds(RECEIVE_WAIT.as_secs() as i32)
            .max_number_of_messages(RECEIVE_BATCH as i32)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
            .map_err(|e| QueueError(describe(&e)))?;
        Ok(output
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|message| {
                let sent = message
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
                Some(QueueMessage {
                    receipt: message.receipt_handle?,
                    body: message.body.unwrap_or_default(),
                    sent,
                })
            })
            .collect())
    }

    async fn delete(&self, receipts: Vec<String>) -> Result<(), QueueError> {
        for chunk in receipts.chunks(RECEIVE_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .build()
                        .map_err(|e| QueueError(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| QueueError(describe(&e)))?;
        }
        Ok(())
    }
}

/// The queue to read for `source`, and, in topic mode, the queue made for
/// this host (to `remove` at unmount). `mount_key` names the mount (prefix
/// and mount point) so a crashed daemon's queue is found again.
pub async fn connect(
    sdk_config: &SdkConfig,
    source: &EventsSource,
    mount_key: &str,
    prefixes: &[String],
) -> Result<(SqsQueue, Option<OwnQueue>), EventsSetupError> {
    match source {
        EventsSource::Queue(url) => Ok((SqsQueue::open(sdk_config, url).await?, None)),
        EventsSource::Topic(arn) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "host".into());
            let prefix = own_queue_prefix(&host, mount_key);
            let (own, queue) = OwnQueue::create(sdk_config, arn, &prefix, prefixes).await?;
            Ok((queue, Some(own)))
        }
    }
}

/// The topic mode's queue and subscription, removed by `remove`.
pub struct OwnQueue {
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    topic_arn: String,
    queue_url: String,
    subscription_arn: Option<String>,
}

/// `ssmfs-<host>-<hash of the mount>-`: what this host's queues for this mount
/// are called, so a crashed daemon's queue is found by the next one.
pub fn own_queue_prefix(host: &str, mount_key: &str) -> String {
    let host: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    let hash = crate::fs::inode::stable_hash(mount_key.bytes());
    format!("ssmfs-{host}-{:08x}-", hash as u32)
}

/// The SNS filter policy that admits only events below `prefixes`.
pub fn filter_policy(prefixes: &[String]) -> Option<String> {
    if prefixes.iter().any(|p| p == "/") {
        return None;
    }
    let matches: Vec<_> = prefixes
        .iter()
        .map(|p| serde_json::json!({"prefix": format!("{p}/")}))
        .collect();
    Some(serde_json::json!({"detail": {"name": matches}}).to_string())
}

impl OwnQueue {
    /// Removes queues a crashed daemon left for this mount, then makes, allows
    /// and subscribes a new one.
    pub async fn create(
        sdk_config: &SdkConfig,
        topic_arn: &str,
        queue_prefix: &str,
        prefixes: &[String],
    ) -> Result<(Self, SqsQueue), EventsSetupError> {
        let fail = |cause: String| EventsSetupError::Topic {
            arn: topic_arn.to_string(),
            cause,
        };
        let sqs = sqs_client(sdk_config, None);
        let sns = aws_sdk_sns::Client::new(sdk_config);
        reap(&sqs, &sns, topic_arn, queue_prefix)
            .await
            .map_err(fail)?;
        let name = format!("{queue_prefix}{:08x}", rand::random::<u32>());
        let created = sqs
            .create_queue()
            .queue_name(&name)
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                OWN_QUEUE_RETENTION.as_secs().to_string(),
            )
            .send()
            .await
            .map_err(|e| fail(format!("creating queue {name}: {}", describe(&e))))?;
        let queue_url = created.queue_url.unwrap_or_default();
        let mut own = OwnQueue {
            sns: sns.clone(),
            sqs: sqs.clone(),
            topic_arn: topic_arn.to_string(),
            queue_url: queue_url.clone(),
            subscription_arn: None,
        };
        if let Err(cause) = own.subscribe(prefixes).await {
            own.remove().await;
            return Err(fail(cause));
        }
        tracing::info!(queue = %queue_url, topic = topic_arn, "created this host's event queue and subscribed it to the topic");
        Ok((
            own,
            SqsQueue {
                client: sqs,
                url: queue_url,
                topic: Some((sns, topic_arn.to_string())),
            },
        ))
    }

    async fn subscribe(&mut self, prefixes: &[String]) -> Result<(), String> {
        let queue_arn = queue_arn(&self.sqs, &self.queue_url).await?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": self.topic_arn}},
            }],
        });
        self.sqs
            .set_queue_attributes()
            .queue_url(&self.queue_url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| format!("allowing the topic to send to the queue: {}", describe(&e)))?;
        let mut subscribe = self
            .sns
            .subscribe()
            .topic_arn(&self.topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true);
        if let Some(policy) = filter_policy(prefixes) {
            subscribe = subscribe
                .attributes("FilterPolicyScope", "MessageBody")
                .attributes("FilterPolicy", policy);
        }
        let subscribed = subscribe
            .send()
            .await
            .map_err(|e| format!("subscribing the queue: {}", describe(&e)))?;
        self.subscription_arn = subscribed.subscription_arn;
        Ok(())
    }

    /// Unsubscribes and deletes the queue (at unmount); failures are logged.
    pub async fn remove(&self) {
        if let Some(arn) = &self.subscription_arn {
            if let Err(e) = self.sns.unsubscribe().subscription_arn(arn).send().await {
                tracing::warn!(error = %describe(&e), "could not unsubscribe this host's event queue from the topic");
            }
        }
        match self
            .sqs
            .delete_queue()
            .queue_url(&self.queue_url)
            .send()
            .await
        {
            Ok(_) => tracing::info!(queue = %self.queue_url, "deleted this host's event queue"),
            Err(e) => {
                tracing::warn!(queue = %self.queue_url, error = %describe(&e), "could not delete this host's event queue")
            }
        }
    }
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<String, String> {
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| format!("reading the queue's ARN: {}", describe(&e)))?;
    attributes
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .ok_or_else(|| "SQS did not say the queue's ARN".to_string())
}

/// Deletes the queues (and their subscriptions to the topic) that an earlier
/// daemon of this mount left behind.
async fn reap(
    sqs: &aws_sdk_sqs::Client,
    sns: &aws_sdk_sns::Client,
    topic_arn: &str,
    queue_prefix: &str,
) -> Result<(), String> {
    let listed = sqs
        .list_queues()
        .queue_name_prefix(queue_prefix)
        .send()
        .await
        .map_err(|e| format!("listing queues: {}", describe(&e)))?;
    let orphans = listed.queue_urls.unwrap_or_default();
    if orphans.is_empty() {
        return Ok(());
    }
    let mut orphan_arns = Vec::new();
    for url in &orphans {
        if let Ok(arn) = queue_arn(sqs, url).await {
            orphan_arns.push(arn);
        }
    }
    let mut token = None;
    loop {
        let page = sns
            .list_subscriptions_by_topic()
            .topic_arn(topic_arn)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| format!("listing the topic's subscriptions: {}", describe(&e)))?;
        for subscription in page.subscriptions.unwrap_or_default() {
            let ours = subscription
                .endpoint
                .as_ref()
                .is_some_and(|e| orphan_arns.contains(e));
            if let (true, Some(arn)) = (ours, subscription.subscription_arn) {
                let _ = sns.unsubscribe().subscription_arn(arn).send().await;
            }
        }
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    for url in &orphans {
        sqs.delete_queue()
            .queue_url(url)
            .send()
            .await
            .map_err(|e| format!("deleting the orphaned queue {url}: {}", describe(&e)))?;
        tracing::warn!(queue = %url, "removed an event queue a previous daemon of this mount left behind");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_valid_and_per_mount() {
        let a = own_queue_prefix("ip-10-0-0-1.ec2.internal", "/airflow /mnt/a");
        let b = own_queue_prefix("ip-10-0-0-1.ec2.internal", "/airflow /mnt/b");
        assert_ne!(a, b);
        assert!(a.starts_with("ssmfs-ip-10-0-0-1-ec2-internal-"));
        let long = own_queue_prefix(&"h".repeat(300), "/x /y");
        // SQS: at most 80 characters, alphanumerics, hyphens and underscores.
        assert!(long.len() + 8 <= 80);
        assert!(long.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }

    #[test]
    fn a_queue_url_names_its_endpoint_and_region() {
        // The tests of this module never set AWS_ENDPOINT_URL*.
        assert_eq!(
            queue_endpoint("https://sqs.eu-west-1.amazonaws.com/123456789012/q"),
            Some((
                "https://sqs.eu-west-1.amazonaws.com".into(),
                Some("eu-west-1".into())
            ))
        );
        assert_eq!(
            queue_endpoint("http://127.0.0.1:4566/000000000000/q"),
            Some(("http://127.0.0.1:4566".into(), None))
        );
        assert_eq!(queue_endpoint("not a url"), None);
    }

    #[test]
    fn the_filter_admits_the_mounted_prefixes() {
        assert_eq!(filter_policy(&["/".into()]), None);
        let policy =
            filter_policy(&["/airflow/variables".into(), "/airflow/connections".into()]).unwrap();
        assert_eq!(
            policy,
            r#"{"detail":{"name":[{"prefix":"/airflow/variables/"},{"prefix":"/airflow/connections/"}]}}"#
        );
    }
}
