//! The real store: aws-sdk-ssm.
//!
//! Credentials and region come from aws-config's standard chain (environment,
//! profile, web identity, container and instance roles), optionally through an
//! assumed role. Retries, pacing and deadlines are owned by `resilient`, so the
//! SDK's own retry is turned off: one SDK call here is exactly one HTTP request,
//! which is what the call counters and the TPS budget must count.

use std::time::{Duration, SystemTime};

use aws_config::provider_config::ProviderConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::web_identity_token::{StaticConfiguration, WebIdentityTokenCredentialsProvider};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_ssm::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ssm::types::{Parameter as SdkParameter, ParameterType};
use aws_sdk_ssm::Client;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use aws_credential_types::provider::error::CredentialsError;

use std::sync::OnceLock;

use crate::names;

use super::{arn_for, Batch, DataType, Page, Parameter, ParameterKind, ParameterStore, StoreError};
use crate::secret::SecretBytes;

/// Where and as whom to talk to SSM; every field falls back to aws-config's chain.
#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
    pub role_arn: Option<String>,
    /// Assume `role_arn` with this token file (AssumeRoleWithWebIdentity).
    pub web_identity_token_file: Option<std::path::PathBuf>,
    /// EKS Pod Identity: (the pod's token file, the agent's URL).
    pub pod_identity: Option<(std::path::PathBuf, String)>,
    /// The STS session name (CloudTrail shows it): who assumed the role.
    pub session_name: Option<String>,
    /// Serve SecureString ciphertext as stored instead of decrypting it.
    pub no_decrypt: bool,
    /// Upper bound on one HTTP attempt; `resilient` bounds the whole call.
    pub attempt_timeout: Duration,
    /// A second region asked while this one fails (`store::failover`).
    pub failover: Option<FailoverOptions>,
}

/// The failover region: same credentials, another region.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub region: String,
    /// Its SSM endpoint; `None`: the region's own. `--endpoint-url` and
    /// `AWS_ENDPOINT_URL(_SSM)` name the primary's and do not apply here.
    pub endpoint_url: Option<String>,
    /// How long the failing primary rests before it is tried again.
    pub retry_after: Duration,
}

/// Where EKS Pod Identity's agent answers on every EKS node.
pub const POD_IDENTITY_AGENT_URL: &str = "http://169.254.170.23/v1/credentials";

/// Points the SDKs' container credentials provider at EKS Pod Identity's
/// agent, through the two variables it reads: call it before any thread
/// starts (the process's environment is not safe to change later).
pub fn use_pod_identity(options: &AwsOptions) {
    if let Some((token_file, agent_url)) = &options.pod_identity {
        std::env::set_var("AWS_CONTAINER_CREDENTIALS_FULL_URI", agent_url);
        std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file);
        std::env::remove_var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI");
    }
}

/// Why an SSM client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no AWS region: pass --region (or region_name in the Airflow kwargs), set AWS_REGION, or give the profile a region")]
    NoRegion,
}

pub struct SsmStore {
    client: Client,
    decrypt: bool,
    /// `arn:aws:ssm:REGION:ACCOUNT:parameter`, learnt from the first answer.
    arn_prefix: OnceLock<String>,
}

/// The AWS configuration every client of the daemon shares (SSM, and SQS and
/// SNS for change events): region, profile and credentials, an assumed role's
/// included. Endpoints stay per service: `--endpoint-url` is SSM's alone, and
/// `AWS_ENDPOINT_URL_<SERVICE>` / `AWS_ENDPOINT_URL` apply through the SDK.
pub async fn load_aws_config(options: &AwsOptions) -> Result<SdkConfig, ConnectError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(options.attempt_timeout)
                .operation_attempt_timeout(options.attempt_timeout)
                .build(),
        );
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(profile) = &options.profile {
        loader = loader.profile_name(profile);
    }
    let sdk_config = loader.load().await;
    if sdk_config.region().is_none() {
        return Err(ConnectError::NoRegion);
    }
    if options.pod_identity.is_some() {
        // The agent's answer (the role associated with the pod's service
        // account), fetched again before it expires; the token file is read
        // at every fetch (a CSI republish rewrites it).
        let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
        return Ok(sdk_config
            .into_builder()
            .credentials_provider(SharedCredentialsProvider::new(provider))
            .build());
    }
    let Some(role_arn) = &options.role_arn else {
        return Ok(sdk_config);
    };
    // STS goes where SSM goes (`--endpoint-url`: a VPC endpoint host, or a
    // test server), as it always has; SQS and SNS do not.
    let sts_config = match &options.endpoint_url {
        Some(url) => sdk_config.to_builder().endpoint_url(url).build(),
        None => sdk_config.clone(),
    };
    if let Some(token_file) = &options.web_identity_token_file {
        // The token file is read at every refresh (a CSI republish rewrites
        // it); STS goes where AWS_ENDPOINT_URL_STS says, as for the SDKs.
        let provider = WebIdentityTokenCredentialsProvider::builder()
            .static_configuration(StaticConfiguration {
                web_identity_token_file: token_file.clone(),
                role_arn: role_arn.clone(),
                session_name: options
                    .session_name
                    .clone()
                    .unwrap_or_else(|| "ssmfs".into()),
            })
            .configure(&ProviderConfig::default().with_region(sdk_config.region().cloned()))
            .build();
        return Ok(sdk_config
            .into_builder()
            .credentials_provider(SharedCredentialsProvider::new(provider))
            .build());
    }
    // AssumeRoleProvider caches the session and refreshes it before expiry.
    let provider = AssumeRoleProvider::builder(role_arn)
        .session_name(options.session_name.as_deref().unwrap_or("ssmfs"))
        .configure(&sts_config)
        .build()
        .await;
    Ok(sdk_config
        .into_builder()
        .credentials_provider(SharedCredentialsProvider::new(provider))
        .build())
}

impl SsmStore {
    /// An SSM client on the shared configuration (see `load_aws_config`).
    pub fn new(sdk_config: &SdkConfig, options: &AwsOptions) -> Self {
        let mut ssm_config = aws_sdk_ssm::config::Builder::from(sdk_config);
        if let Some(url) = &options.endpoint_url {
            ssm_config = ssm_config.endpoint_url(url);
        }
        Self::with_config(ssm_config, options)
    }

    /// The failover region's client: built as `new` builds the primary's,
    /// with the same credentials, in `failover.region`, at
    /// `failover.endpoint_url` or else the region's own endpoint (never the
    /// primary's override, which names an endpoint of the primary region).
    pub fn failover(
        sdk_config: &SdkConfig,
        options: &AwsOptions,
        failover: &FailoverOptions,
    ) -> Self {
        let mut ssm_config = aws_sdk_ssm::config::Builder::from(sdk_config)
            .region(Region::new(failover.region.clone()));
        ssm_config.set_endpoint_url(failover.endpoint_url.clone());
        Self::with_config(ssm_config, options)
    }

    fn with_config(ssm_config: aws_sdk_ssm::config::Builder, options: &AwsOptions) -> Self {
        Self {
            client: Client::from_conf(ssm_config.build()),
            decrypt: !options.no_decrypt,
            arn_prefix: OnceLock::new(),
        }
    }

    /// Loads credentials and region; fails (before anything is mounted) when no
    /// region can be found, since every read would fail otherwise.
    pub async fn connect(options: &AwsOptions) -> Result<Self, ConnectError> {
        Ok(Self::new(&load_aws_config(options).await?, options))
    }
}

fn convert(parameter: SdkParameter, arn_prefix: &OnceLock<String>) -> Option<Parameter> {
    let kind = match parameter.r#type {
        Some(ParameterType::SecureString) => ParameterKind::SecureString,
        Some(ParameterType::StringList) => ParameterKind::StringList,
        _ => ParameterKind::String,
    };
    let last_modified = parameter
        .last_modified_date
        .and_then(|d| SystemTime::try_from(d).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let base = parameter.name?;
    if arn_prefix.get().is_none() {
        // `arn:aws:ssm:REGION:ACCOUNT:parameter/a/b` for `/a/b`, `.../parameter/x` for `x`.
        let suffix = arn_for("", &base);
        if let Some(prefix) = parameter
            .arn
            .as_deref()
            .and_then(|a| a.strip_suffix(&suffix))
        {
            let _ = arn_prefix.set(prefix.to_string());
        }
    }
    // Asked as `NAME:3` or `NAME:prod`, SSM answers NAME and the selector
    // apart: the store's parameters carry the name as it was asked.
    let name = match parameter.selector.as_deref() {
        Some(selector) if selector.starts_with(':') => format!("{base}{selector}"),
        _ => base,
    };
    Some(Parameter {
        name: name.into(),
        value: SecretBytes::from_string(parameter.value.unwrap_or_default()),
        version: parameter.version,
        last_modified: last_modified.into(),
        kind,
        data_type: DataType::parse(parameter.data_type.as_deref().unwrap_or("text")),
    })
}

/// Maps every SDK failure onto the store's error. Messages carry names and AWS's
/// own text, never a value (SSM never echoes values in errors).
fn classify<E, R>(error: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + 'static,
{
    if let Some(credentials) =
        source_chain(&error).find_map(|e| e.downcast_ref::<CredentialsError>())
    {
        if source_chain(credentials).any(sts_refused_the_role) {
            return StoreError::IdentityRefused(error_chain(credentials));
        }
        return StoreError::Credentials(error_chain(credentials));
    }
    match &error {
        SdkError::TimeoutError(_) => StoreError::Timeout,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable(error_chain(&error))
        }
        SdkError::ServiceError(context) => {
            let service_error = context.err();
            let message = one_line(service_error.message().unwrap_or(""));
            match service_error.code().unwrap_or("") {
                "ParameterNotFound"
                | "ParameterVersionNotFound"
                | "ParameterVersionLabelNotFound" => StoreError::NotFound,
                "AccessDeniedException"
                | "AccessDenied"
                | "InvalidKeyId"
                | "KMSAccessDeniedException"
                | "KMS.AccessDeniedException" => StoreError::AccessDenied { reason: message },
                "UnrecognizedClientException"
                | "ExpiredTokenException"
                | "InvalidSignatureException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch" => StoreError::Credentials(message),
                "ThrottlingException" | "TooManyRequestsException" | "RequestLimitExceeded" => {
                    StoreError::Throttled
                }
                "InternalServerError" | "InternalFailure" | "ServiceUnavailable" => {
                    StoreError::Unavailable(message)
                }
                "InvalidNextToken" => StoreError::InvalidNextToken,
                code => StoreError::Rejected {
                    code: code.to_string(),
                    message,
                },
            }
        }
        _ => StoreError::Unavailable(error_chain(&error)),
    }
}

/// `error` and its sources, outermost first (the SDK wraps a credentials
/// failure in a dispatch failure in a connector error).
/// Whether `error` is STS's AccessDenied to AssumeRoleWithWebIdentity or
/// AssumeRole: the role does not trust this identity (a network failure or
/// an expired token is not a refusal).
fn sts_refused_the_role(error: &(dyn std::error::Error + 'static)) -> bool {
    use aws_sdk_ssm::config::http::HttpResponse;
    use aws_sdk_sts::operation::assume_role::AssumeRoleError;
    use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;
    let code = error
        .downcast_ref::<SdkError<AssumeRoleWithWebIdentityError, HttpResponse>>()
        .and_then(|e| e.code())
        .or_else(|| {
            error
                .downcast_ref::<SdkError<AssumeRoleError, HttpResponse>>()
                .and_then(|e| e.code())
        });
    code == Some("AccessDenied")
}

fn source_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// Every message in the source chain on one line, without the SDK's Debug
/// dump (which `DisplayErrorContext` appends and which can hold raw bodies).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in source_chain(error) {
        // An AWS error's metadata prints as a Rust structure: its code and
        // message read better (STS's refusal of a role, say).
        let text = match e.downcast_ref::<aws_smithy_types::error::ErrorMetadata>() {
            Some(meta) => one_line(&format!(
                "{}: {}",
                meta.code().unwrap_or("error"),
                meta.message().unwrap_or("")
            )),
            None => one_line(&e.to_string()),
        };
        if !text.is_empty() && !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl ParameterStore for SsmStore {
    async fn get(&self, name: &str) -> Result<Parameter, StoreError> {
        let output = self
            .client
            .get_parameter()
            .name(name)
            .with_decryption(self.decrypt)
            .send()
            .await
            .map_err(classify)?;
        let mut parameter = output
            .parameter
            .and_then(|p| convert(p, &self.arn_prefix))
            .ok_or(StoreError::NotFound)?;
        if names::has_selector(name) {
            // Some SSM implementations answer a selector without `Selector`.
            parameter.name = name.into();
        }
        Ok(parameter)
    }

    async fn get_many(&self, names: &[&str]) -> Result<Batch, StoreError> {
        let output = self
            .client
            .get_parameters()
            .set_names(Some(names.iter().map(|n| n.to_string()).collect()))
            .with_decryption(self.decrypt)
            .send()
            .await
            .map_err(classify)?;
        Ok(Batch {
            found: output
                .parameters
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| convert(p, &self.arn_prefix))
                .collect(),
            missing: output.invalid_parameters.unwrap_or_default(),
        })
    }

    async fn list_page(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        content: super::PageContent,
    ) -> Result<Page, StoreError> {
        let names_only = content == super::PageContent::NamesOnly;
        let decrypt = self.decrypt && !names_only;
        let mut page = self.by_path(path, max_results, next_token, decrypt).await?;
        page.names_only = names_only;
        Ok(page)
    }

    fn arn(&self, name: &str) -> Option<String> {
        let base = name.split(':').next().unwrap_or(name);
        Some(arn_for(self.arn_prefix.get()?, base))
    }
}

impl SsmStore {
    async fn by_path(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        decrypt: bool,
    ) -> Result<Page, StoreError> {
        let output = self
            .client
            .get_parameters_by_path()
            .path(path)
            .recursive(true)
            .with_decryption(decrypt)
            .max_results(max_results as i32)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(classify)?;
        Ok(Page {
            parameters: output
                .parameters
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| convert(p, &self.arn_prefix))
                .collect(),
            next_token: output.next_token.filter(|t| !t.is_empty()),
            names_only: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ssm::config::http::HttpResponse;
    use aws_sdk_ssm::operation::get_parameter::GetParameterError;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    /// An AWS service error with `code` and `message`, as the SDK gives it.
    fn answered<E>(
        generic: fn(ErrorMetadata) -> E,
        code: &str,
        message: &str,
        status: u16,
    ) -> SdkError<E, HttpResponse> {
        let error = ErrorMetadata::builder().code(code).message(message).build();
        let response = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        SdkError::service_error(generic(error), response)
    }

    fn service_error(code: &str) -> StoreError {
        classify(answered(
            GetParameterError::generic,
            code,
            "some   AWS\n text",
            400,
        ))
    }

    #[test]
    fn sts_refusing_the_role_is_told_from_other_credentials_failures() {
        use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;
        let sts = |code: &str| {
            let refusal = answered(
                AssumeRoleWithWebIdentityError::generic,
                code,
                "Not authorized to perform sts:AssumeRoleWithWebIdentity",
                403,
            );
            let credentials = CredentialsError::provider_error(refusal);
            classify::<GetParameterError, HttpResponse>(SdkError::construction_failure(credentials))
        };
        assert!(matches!(
            sts("AccessDenied"),
            StoreError::IdentityRefused(_)
        ));
        assert!(matches!(
            sts("ExpiredTokenException"),
            StoreError::Credentials(_)
        ));
    }

    #[test]
    fn every_denial_is_access_denied_never_a_value_or_ciphertext() {
        for code in [
            "AccessDeniedException",
            "InvalidKeyId",
            "KMSAccessDeniedException",
            "KMS.AccessDeniedException",
        ] {
            assert!(
                matches!(service_error(code), StoreError::AccessDenied { ref reason } if reason == "some AWS text"),
                "{code}"
            );
        }
    }

    #[test]
    fn identity_failures_throttling_and_outages_are_classified() {
        for code in [
            "UnrecognizedClientException",
            "ExpiredTokenException",
            "InvalidSignatureException",
        ] {
            assert!(
                matches!(service_error(code), StoreError::Credentials(_)),
                "{code}"
            );
        }
        assert!(matches!(
            service_error("ParameterNotFound"),
            StoreError::NotFound
        ));
        assert!(matches!(
            service_error("ThrottlingException"),
            StoreError::Throttled
        ));
        assert!(matches!(
            service_error("InternalServerError"),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            service_error("ValidationException"),
            StoreError::Rejected { ref code, .. } if code == "ValidationException"
        ));
        assert!(matches!(
            service_error("InvalidNextToken"),
            StoreError::InvalidNextToken
        ));
    }
}
