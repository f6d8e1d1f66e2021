//! Amazon SQS through aws-sdk-sqs. Region, credentials and endpoint come from the standard AWS
//! configuration chain (`AWS_REGION`, `AWS_ACCESS_KEY_ID`, profiles, instance roles, and
//! `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL` to point it at a local server).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;

use super::queue::{Error, Queue, QueueMessage};

/// Longest a message may be delayed or hidden by `send`'s delay (SQS's limit).
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// Longest visibility timeout SQS accepts.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

fn sqs_error(operation: &'static str, e: impl std::error::Error) -> Error {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Error::Sqs { operation, message }
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue, Error> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| sqs_error("build attribute", e))
}

/// One SQS queue and, where known, its dead-letter queue.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    url: String,
    dead_letter_url: Option<String>,
}

/// Builds an SQS client from the standard AWS configuration chain.
pub async fn client() -> Client {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    Client::new(&config)
}

impl SqsQueue {
    /// Opens `url`; the dead-letter queue is `dead_letter_url`, or the target of the queue's
    /// redrive policy.
    pub async fn open(
        client: Client,
        url: &str,
        dead_letter_url: Option<String>,
    ) -> Result<Self, Error> {
        let out = client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .attribute_names(QueueAttributeName::FifoQueue)
            .send()
            .await
            .map_err(|e| sqs_error("GetQueueAttributes", e))?;
        let attributes = out.attributes();
        let fifo = attributes
            .and_then(|a| a.get(&QueueAttributeName::FifoQueue))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || url.trim_end_matches('/').ends_with(".fifo");
        if fifo {
            return Err(Error::Invalid(format!(
                "queue {url} is a FIFO queue: bulkflow needs a standard queue. It delays its \
                 retry and hand-over messages per message (DelaySeconds), which FIFO queues do \
                 not allow, and it does not need FIFO's order or deduplication (a repeated \
                 message is harmless: the bulk change's events decide). Create a standard \
                 queue (with a standard dead-letter queue) and point the platform and \
                 bulkflow at it"
            )));
        }
        let dead_letter_url = match dead_letter_url {
            Some(u) => Some(u),
            None => redrive_target(&client, attributes).await?,
        };
        Ok(Self {
            client,
            url: url.to_string(),
            dead_letter_url,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn dead_letter_url(&self) -> Option<&str> {
        self.dead_letter_url.as_deref()
    }

    /// Creates (or finds) a queue, with a dead-letter queue and redrive policy when asked.
    pub async fn create(
        client: &Client,
        name: &str,
        visibility: Duration,
        dead_letter: Option<(&str, u32)>,
    ) -> Result<(String, Option<String>), Error> {
        let mut dlq_url = None;
        let mut request = client.create_queue().queue_name(name).attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility.as_secs().to_string(),
        );
        if let Some((dlq_name, max_receive_count)) = dead_letter {
            let dlq = client
                .create_queue()
                .queue_name(dlq_name)
                .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
                .send()
                .await
                .map_err(|e| sqs_error("CreateQueue", e))?;
            let url = dlq.queue_url().unwrap_or_default().to_string();
            let attrs = client
                .get_queue_attributes()
                .queue_url(&url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(|e| sqs_error("GetQueueAttributes", e))?;
            let arn = attrs
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn))
                .cloned()
                .ok_or_else(|| Error::Invalid(format!("queue {dlq_name} has no ARN")))?;
            let policy = serde_json::json!({
                "deadLetterTargetArn": arn,
                "maxReceiveCount": max_receive_count.to_string(),
            });
            request = request.attributes(QueueAttributeName::RedrivePolicy, policy.to_string());
            dlq_url = Some(url);
        }
        let created = request
            .send()
            .await
            .map_err(|e| sqs_error("CreateQueue", e))?;
        Ok((created.queue_url().unwrap_or_default().to_string(), dlq_url))
    }

    /// Messages visible, in flight and delayed.
    pub async fn counts(&self) -> Result<(u64, u64, u64), Error> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| sqs_error("GetQueueAttributes", e))?;
        let get = |name: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((
            get(QueueAttributeName::ApproximateNumberOfMessages),
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        ))
    }
}

/// The dead-letter queue a queue's redrive policy (among its `attributes`) names.
async fn redrive_target(
    client: &Client,
    attributes: Option<&HashMap<QueueAttributeName, String>>,
) -> Result<Option<String>, Error> {
    let Some(policy) = attributes.and_then(|a| a.get(&QueueAttributeName::RedrivePolicy)) else {
        return Ok(None);
    };
    let arn = serde_json::from_str::<serde_json::Value>(policy)
        .ok()
        .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(str::to_string));
    let Some(name) = arn.as_deref().and_then(|a| a.rsplit(':').next()) else {
        return Ok(None);
    };
    let found = client
        .get_queue_url()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| sqs_error("GetQueueUrl", e))?;
    Ok(found.queue_url().map(str::to_string))
}

fn seconds(d: Duration, max: Duration) -> i32 {
    d.min(max).as_secs() as i32
}

impl Queue for SqsQueue {
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<QueueMessage>, Error> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(seconds(wait, Duration::from_secs(20)))
            .visibility_timeout(seconds(visibility, MAX_VISIBILITY))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| sqs_error("ReceiveMessage", e))?;
        Ok(out
            .messages()
            .iter()
            .map(|m| {
                let attributes: BTreeMap<String, String> = m
                    .message_attributes()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| {
                                let value = v
                                    .string_value()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| format!("<{}>", v.data_type()));
                                (k.clone(), value)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                QueueMessage {
                    id: m.message_id().unwrap_or_default().to_string(),
                    receipt: m.receipt_handle().unwrap_or_default().to_string(),
                    body: m.body().unwrap_or_default().to_string(),
                    attributes,
                    receive_count: m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                }
            })
            .collect())
    }

    async fn extend(&self, receipt: &str, visibility: Duration) -> Result<(), Error> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds(visibility, MAX_VISIBILITY))
            .send()
            .await
            .map_err(|e| sqs_error("ChangeMessageVisibility", e))?;
        Ok(())
    }

    async fn delete(&self, receipt: &str) -> Result<(), Error> {
        self.client
            .delete_message()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| sqs_error("DeleteMessage", e))?;
        Ok(())
    }

    async fn dead_letter(&self, message: &QueueMessage, reason: &str) -> Result<(), Error> {
        let dlq = self
            .dead_letter_url
            .as_deref()
            .ok_or(Error::NoDeadLetterQueue)?;
        let reason: String = reason.chars().take(1_000).collect();
        // SQS allows ten attributes: the original ones travel as one JSON attribute.
        let mut attributes = HashMap::from([
            ("DeadLetterReason".to_string(), string_attribute(&reason)?),
            ("SourceQueueUrl".to_string(), string_attribute(&self.url)?),
            (
                "SourceMessageId".to_string(),
                string_attribute(&message.id)?,
            ),
            (
                "ReceiveCount".to_string(),
                string_attribute(&message.receive_count.to_string())?,
            ),
        ]);
        if !message.attributes.is_empty() {
            let original = serde_json::to_string(&message.attributes).unwrap_or_default();
            attributes.insert("OriginalAttributes".into(), string_attribute(&original)?);
        }
        let body = if message.body.is_empty() {
            "(empty)"
        } else {
            message.body.as_str()
        };
        self.client
            .send_message()
            .queue_url(dlq)
            .message_body(body)
            .set_message_attributes(Some(attributes))
            .send()
            .await
            .map_err(|e| sqs_error("SendMessage", e))?;
        self.delete(&message.receipt).await
    }

    async fn send(
        &self,
        body: &str,
        attributes: &BTreeMap<String, String>,
        delay: Duration,
    ) -> Result<(), Error> {
        let attributes = attributes
            .iter()
            .map(|(k, v)| Ok((k.clone(), string_attribute(v)?)))
            .collect::<Result<HashMap<_, _>, Error>>()?;
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .set_message_attributes((!attributes.is_empty()).then_some(attributes))
            .delay_seconds(seconds(delay, MAX_DELAY))
            .send()
            .await
            .map_err(|e| sqs_error("SendMessage", e))?;
        Ok(())
    }

    async fn is_empty(&self) -> Result<bool, Error> {
        // SQS's counts are approximate (and a message whose delay just ended can be missing from
        // all three for a moment, as moto shows): empty only if it looks empty twice.
        for look in 0..2 {
            if look > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            let (visible, in_flight, delayed) = self.counts().await?;
            if visible + in_flight + delayed > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
