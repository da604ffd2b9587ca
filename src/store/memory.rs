//! An in-memory parameter store for tests and the demo: a sorted map of
//! parameters, a counter per operation, and injectable faults (an error for
//! every call, for the next N calls, or for one name; and added latency).
//! It pages like SSM does (at most ten results, an opaque next token).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::{
    Batch, Page, PageContent, Parameter, ParameterKind, ParameterStore, StoreError, MAX_PAGE,
};
use crate::names;
use crate::secret::SecretBytes;

/// How many calls of each kind the store has answered (or failed).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CallCounts {
    pub get: u64,
    pub get_many: u64,
    pub list_page: u64,
}

impl CallCounts {
    pub fn total(&self) -> u64 {
        self.get + self.get_many + self.list_page
    }
}

#[derive(Default)]
struct Faults {
    every_call: Option<StoreError>,
    every_listing: Option<StoreError>,
    every_batch: Option<StoreError>,
    next_calls: Vec<StoreError>,
    by_name: HashMap<String, StoreError>,
    /// Names under a KMS key the caller may not use.
    undecryptable: std::collections::HashSet<String>,
    latency: Duration,
}

#[derive(Default)]
pub struct MemoryStore {
    parameters: Mutex<BTreeMap<String, Parameter>>,
    /// Every version ever put, and labels (name, label) -> version, for
    /// `NAME:VERSION` and `NAME:LABEL` selectors.
    versions: Mutex<HashMap<String, Vec<Parameter>>>,
    labels: Mutex<HashMap<(String, String), i64>>,
    /// Names asked for that SSM could not hold (`names::is_valid_request_name`):
    /// a real SSM would answer ValidationException; tests assert none.
    invalid_names: Mutex<Vec<String>>,
    faults: Mutex<Faults>,
    get: AtomicU64,
    get_many: AtomicU64,
    list_page: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates or overwrites a parameter, bumping its version like PutParameter.
    pub fn put(&self, name: &str, value: impl Into<Vec<u8>>, kind: ParameterKind) {
        let mut parameters = self.parameters.lock().unwrap();
        let mut versions = self.versions.lock().unwrap();
        let history = versions.entry(name.to_string()).or_default();
        let version = history.last().map_or(1, |p| p.version + 1);
        let parameter = Parameter {
            name: name.into(),
            value: SecretBytes::new(value.into()),
            version,
            last_modified: SystemTime::now().into(),
            kind,
            data_type: Default::default(),
        };
        history.push(parameter.clone());
        parameters.insert(name.to_string(), parameter);
    }

    /// Moves `label` to `version` of `name` (LabelParameterVersion).
    pub fn label(&self, name: &str, label: &str, version: i64) {
        self.labels
            .lock()
            .unwrap()
            .insert((name.to_string(), label.to_string()), version);
    }

    /// `name` as GetParameter reads it: the current version, or the version
    /// a `:VERSION` or `:LABEL` selector names, under the name as asked.
    fn read(&self, name: &str) -> Option<Parameter> {
        let Some((base, selector)) = name.split_once(':') else {
            return self.parameters.lock().unwrap().get(name).cloned();
        };
        self.parameters.lock().unwrap().get(base)?;
        let version = match selector.parse::<i64>() {
            Ok(version) => version,
            Err(_) => *self
                .labels
                .lock()
                .unwrap()
                .get(&(base.to_string(), selector.to_string()))?,
        };
        let versions = self.versions.lock().unwrap();
        let mut found = versions
            .get(base)?
            .iter()
            .find(|p| p.version == version)?
            .clone();
        found.name = name.into();
        Some(found)
    }

    pub fn put_string(&self, name: &str, value: &str) {
        self.put(name, value.as_bytes().to_vec(), ParameterKind::String);
    }

    pub fn delete(&self, name: &str) {
        self.parameters.lock().unwrap().remove(name);
        self.versions.lock().unwrap().remove(name);
    }

    pub fn counts(&self) -> CallCounts {
        CallCounts {
            get: self.get.load(Ordering::SeqCst),
            get_many: self.get_many.load(Ordering::SeqCst),
            list_page: self.list_page.load(Ordering::SeqCst),
        }
    }

    /// Every call fails with `error` until cleared with `None`.
    pub fn fail_every_call(&self, error: Option<StoreError>) {
        self.faults.lock().unwrap().every_call = error;
    }

    /// The next `count` calls fail with `error`, then calls succeed again.
    pub fn fail_next_calls(&self, count: usize, error: StoreError) {
        let mut faults = self.faults.lock().unwrap();
        faults.next_calls.extend(std::iter::repeat_n(error, count));
    }

    /// Any call that touches `name` fails with `error` (SSM's per-parameter
    /// failures: access denied on one ARN, a KMS key one may not use).
    pub fn fail_name(&self, name: &str, error: StoreError) {
        self.faults
            .lock()
            .unwrap()
            .by_name
            .insert(name.to_string(), error);
    }

    /// `name` is under a KMS key the caller may not use, as real SSM refuses
    /// it: every call that would decrypt it (GetParameter, a GetParameters
    /// batch that holds it, a decrypting GetParametersByPath page that holds
    /// it) is refused whole with AccessDenied; a page without decryption is not.
    pub fn deny_decrypting(&self, name: &str) {
        self.faults
            .lock()
            .unwrap()
            .undecryptable
            .insert(name.to_string());
    }

    /// Every listing fails with `error` until cleared with `None` (as
    /// AccessDenied does for a role granted ssm:GetParameter alone).
    pub fn fail_every_listing(&self, error: Option<StoreError>) {
        self.faults.lock().unwrap().every_listing = error;
    }

    /// Every GetParameters fails with `error` until cleared with `None` (a
    /// role granted ssm:GetParameter but not ssm:GetParameters).
    pub fn fail_every_batch(&self, error: Option<StoreError>) {
        self.faults.lock().unwrap().every_batch = error;
    }

    pub fn set_latency(&self, latency: Duration) {
        self.faults.lock().unwrap().latency = latency;
    }

    fn check_asked(&self, name: &str) {
        if !names::is_valid_request_name(name) {
            self.invalid_names.lock().unwrap().push(name.to_string());
        }
    }

    /// Names asked for that SSM could not hold; empty unless there is a bug.
    pub fn invalid_names_asked(&self) -> Vec<String> {
        self.invalid_names.lock().unwrap().clone()
    }

    async fn enter(
        &self,
        counter: &AtomicU64,
        names: &[&str],
        decrypting: bool,
    ) -> Result<(), StoreError> {
        counter.fetch_add(1, Ordering::SeqCst);
        let (latency, fault) = {
            let mut faults = self.faults.lock().unwrap();
            let fault = if !faults.next_calls.is_empty() {
                Some(faults.next_calls.remove(0))
            } else if let Some(error) = &faults.every_call {
                Some(error.clone())
            } else if let Some(name) = names
                .iter()
                .find(|n| decrypting && faults.undecryptable.contains(**n))
            {
                Some(StoreError::access_denied(format!(
                    "not authorized to use the KMS key of {name}"
                )))
            } else {
                names.iter().find_map(|n| faults.by_name.get(*n).cloned())
            };
            (faults.latency, fault)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        fault.map_or(Ok(()), Err)
    }
}

impl ParameterStore for MemoryStore {
    async fn get(&self, name: &str) -> Result<Parameter, StoreError> {
        self.check_asked(name);
        self.enter(&self.get, &[name], true).await?;
        self.read(name).ok_or(StoreError::NotFound)
    }

    async fn get_many(&self, names: &[&str]) -> Result<Batch, StoreError> {
        assert!(
            names.len() <= super::MAX_BATCH,
            "SSM takes at most ten names"
        );
        names.iter().for_each(|name| self.check_asked(name));
        self.enter(&self.get_many, names, true).await?;
        if let Some(error) = self.faults.lock().unwrap().every_batch.clone() {
            return Err(error);
        }
        let mut batch = Batch::default();
        for name in names {
            match self.read(name) {
                Some(parameter) => batch.found.push(parameter),
                None => batch.missing.push(name.to_string()),
            }
        }
        Ok(batch)
    }

    async fn list_page(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        content: PageContent,
    ) -> Result<Page, StoreError> {
        let decrypting = content == PageContent::Values;
        let mut page = self
            .by_path(path, max_results, next_token, decrypting)
            .await?;
        page.names_only = !decrypting;
        Ok(page)
    }

    fn arn(&self, name: &str) -> Option<String> {
        let base = name.split(':').next().unwrap_or(name);
        Some(super::arn_for(
            "arn:aws:ssm:us-east-1:123456789012:parameter",
            base,
        ))
    }
}

impl MemoryStore {
    async fn by_path(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        decrypting: bool,
    ) -> Result<Page, StoreError> {
        if path != "/" {
            self.check_asked(path);
        }
        let max_results = max_results.clamp(1, MAX_PAGE);
        let below: Vec<Parameter> = {
            let parameters = self.parameters.lock().unwrap();
            let start = next_token.clone().unwrap_or_default();
            parameters
                .range(start..)
                .filter(|(name, _)| next_token.as_deref() != Some(name.as_str()))
                .filter(|(name, _)| names::relative_to(path, name).is_some())
                .take(max_results + 1)
                .map(|(_, p)| p.clone())
                .collect()
        };
        // The names on this page (not the one read ahead to tell whether
        // another page follows).
        let names: Vec<&str> = below.iter().take(max_results).map(|p| &*p.name).collect();
        self.enter(&self.list_page, &names, decrypting).await?;
        if let Some(error) = self.faults.lock().unwrap().every_listing.clone() {
            return Err(error);
        }
        let mut parameters = below;
        let next_token = if parameters.len() > max_results {
            parameters.truncate(max_results);
            parameters.last().map(|p| p.name.to_string())
        } else {
            None
        };
        Ok(Page {
            parameters,
            next_token,
            names_only: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_hold_ten_and_cover_everything() {
        let store = MemoryStore::new();
        for i in 0..25 {
            store.put_string(&format!("/d/p{i:02}"), "v");
        }
        store.put_string("/other", "v");
        let mut token = None;
        let mut seen = 0;
        loop {
            let page = store
                .list_page("/d", 10, token, PageContent::Values)
                .await
                .unwrap();
            assert!(page.parameters.len() <= 10);
            seen += page.parameters.len();
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        assert_eq!(seen, 25);
        assert_eq!(store.counts().list_page, 3);
    }

    #[tokio::test]
    async fn faults_apply_as_configured() {
        let store = MemoryStore::new();
        store.put_string("/a", "1");
        store.fail_next_calls(1, StoreError::Throttled);
        assert_eq!(store.get("/a").await.unwrap_err(), StoreError::Throttled);
        assert!(store.get("/a").await.is_ok());
        store.fail_name("/a", StoreError::access_denied("x"));
        assert!(matches!(
            store.get("/a").await,
            Err(StoreError::AccessDenied { .. })
        ));
        assert_eq!(store.counts().get, 3);
    }
}
