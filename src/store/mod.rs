//! The parameter store model: what ssmfs needs from SSM, and nothing more.
//!
//! Three reads: one name (`get`, one GetParameter call), up to ten known names
//! at once (`get_many`, one GetParameters call: how hot values are refreshed),
//! and one page of everything below a path (`list_page`, one
//! GetParametersByPath call: how directories are listed, ten names to a page,
//! with values).
//! Implementations: `ssm` (aws-sdk-ssm), `memory` (counted and fault-injected,
//! for tests and the demo), `resilient` (pacing, retries and deadlines
//! around any store) and `failover` (a second region while the first fails).

pub mod failover;
pub mod memory;
pub mod resilient;
pub mod ssm;

use std::future::Future;
use std::time::SystemTime;

use crate::secret::SecretBytes;

/// SSM's largest page for GetParametersByPath.
pub const MAX_PAGE: usize = 10;
/// SSM's most names in one GetParameters call.
pub const MAX_BATCH: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParameterKind {
    String,
    StringList,
    SecureString,
}

/// What a parameter's value is validated as (SSM's DataType).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataType {
    #[default]
    Text,
    Ec2Image,
    SsmIntegration,
}

impl DataType {
    pub fn parse(text: &str) -> Self {
        match text {
            "aws:ec2:image" => DataType::Ec2Image,
            "aws:ssm:integration" => DataType::SsmIntegration,
            _ => DataType::Text,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Text => "text",
            DataType::Ec2Image => "aws:ec2:image",
            DataType::SsmIntegration => "aws:ssm:integration",
        }
    }
}

impl ParameterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ParameterKind::String => "String",
            ParameterKind::StringList => "StringList",
            ParameterKind::SecureString => "SecureString",
        }
    }
}

/// One parameter as SSM returned it. `Debug` is safe: the value redacts itself.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// Shared with the cache's index, so a cached parameter holds its name once.
    pub name: std::sync::Arc<str>,
    pub value: SecretBytes,
    pub version: i64,
    pub last_modified: Modified,
    pub kind: ParameterKind,
    pub data_type: DataType,
}

/// LastModifiedDate in milliseconds since the epoch (SSM's own precision): 8
/// bytes where `SystemTime` takes 16, which keeps a cached parameter in a
/// smaller allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modified(i64);

impl From<SystemTime> for Modified {
    fn from(time: SystemTime) -> Self {
        match time.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => Self(i64::try_from(after.as_millis()).unwrap_or(i64::MAX)),
            Err(before) => Self(-i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }
}

impl From<Modified> for SystemTime {
    fn from(modified: Modified) -> Self {
        let millis = std::time::Duration::from_millis(modified.0.unsigned_abs());
        if modified.0 >= 0 {
            SystemTime::UNIX_EPOCH + millis
        } else {
            SystemTime::UNIX_EPOCH - millis
        }
    }
}

/// What a listing page is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageContent {
    /// Names, metadata and values (decrypted, where the store decrypts).
    Values,
    /// Names and metadata alone, listed without decryption.
    NamesOnly,
}

/// One page of a listing below a path.
#[derive(Debug, Default)]
pub struct Page {
    pub parameters: Vec<Parameter>,
    pub next_token: Option<String>,
    /// Listed without decryption (`PageContent::NamesOnly`): the names and metadata
    /// hold, the values do not (a SecureString's is ciphertext), so none is
    /// kept.
    pub names_only: bool,
}

impl Page {
    /// The parameters whose values hold (none of a names-only page).
    pub fn values(self) -> Vec<Parameter> {
        match self.names_only {
            true => Vec::new(),
            false => self.parameters,
        }
    }
}

/// What GetParameters answered: the parameters found, and the names asked
/// for that do not exist.
#[derive(Debug, Default)]
pub struct Batch {
    pub found: Vec<Parameter>,
    pub missing: Vec<String>,
}

/// Why a store call failed. Messages never carry a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("parameter not found")]
    NotFound,
    /// IAM or KMS refused; `reason` is AWS's own text (it names the caller and
    /// the resource, never a value).
    #[error("access denied: {reason}")]
    AccessDenied { reason: String },
    /// AWS rejected who we are (no, unknown, expired or mis-signed
    /// credentials), as opposed to what we asked for.
    #[error("no usable AWS credentials: {0}")]
    Credentials(String),
    /// STS refused to let this identity assume its role (the role's trust
    /// policy does not name it): who we are is known, and not allowed.
    #[error("AWS refused the identity: {0}")]
    IdentityRefused(String),
    #[error("throttled by SSM")]
    Throttled,
    #[error("SSM is unavailable: {0}")]
    Unavailable(String),
    #[error("no answer from SSM within the request timeout")]
    Timeout,
    /// A listing's continuation token SSM no longer accepts (it expired):
    /// the listing starts over from the first page.
    #[error("SSM no longer accepts this listing's page token")]
    InvalidNextToken,
    /// Any other refusal of the request itself (validation, an unknown code):
    /// asking again will not help.
    #[error("SSM refused the request ({code}): {message}")]
    Rejected { code: String, message: String },
}

impl StoreError {
    pub fn access_denied(reason: impl Into<String>) -> Self {
        StoreError::AccessDenied {
            reason: reason.into(),
        }
    }

    /// Errors worth trying again: the same request may well succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Throttled | StoreError::Unavailable(_))
    }

    /// Errors that say nothing about the parameter itself, only that SSM could
    /// not answer now: a cached value may be served stale through them. A
    /// credentials failure counts (an instance role's session that fails to
    /// refresh should not take cached secrets away).
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            StoreError::Throttled
                | StoreError::Unavailable(_)
                | StoreError::Timeout
                | StoreError::Credentials(_)
                | StoreError::IdentityRefused(_)
        )
    }
}

/// A source of parameters. Names are full SSM names (`/airflow/variables/x`).
pub trait ParameterStore: Send + Sync + 'static {
    /// GetParameter: one name; `NotFound` if it does not exist.
    fn get(&self, name: &str) -> impl Future<Output = Result<Parameter, StoreError>> + Send;

    /// GetParameters: up to `MAX_BATCH` names at once.
    fn get_many(&self, names: &[&str]) -> impl Future<Output = Result<Batch, StoreError>> + Send;

    /// GetParametersByPath with `Recursive=true`: one page of every parameter
    /// strictly below `path`, at most `max_results` (<= `MAX_PAGE`) of them,
    /// with their values, or without decryption (`PageContent::NamesOnly`):
    /// SSM refuses a decrypting page whole when one parameter on it is under
    /// a KMS key the caller may not use; a names-only page is not refused.
    fn list_page(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        content: PageContent,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// The ARN of the parameter `name`, once the store knows the account and
    /// region (from any answer); for `user.ssm.arn`, without a call.
    fn arn(&self, _name: &str) -> Option<String> {
        None
    }
}

/// `arn:...:parameter` + a name, with the `/` an ARN has before a name
/// that does not begin with one.
pub fn arn_for(prefix: &str, name: &str) -> String {
    if name.starts_with('/') {
        format!("{prefix}{name}")
    } else {
        format!("{prefix}/{name}")
    }
}
