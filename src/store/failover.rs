//! Two regions behind one store: the primary, and the failover region
//! (`--failover-region`) that answers while the primary cannot.
//!
//! A call goes to the primary. When the primary fails the way a region fails
//! (SSM unavailable: a 5xx or no connection; no answer within the request
//! timeout; throttling that outlasted its retries), the same call goes to the
//! failover region, and the primary rests for `retry_after`: calls meanwhile
//! go straight to the failover region, without paying the primary's retries
//! and deadline first. When the rest is over, one call tries the primary
//! again (calls made while it is under way keep to the failover region); any
//! answer from it that is not such a failure (a value, NotFound, AccessDenied)
//! ends the failover. Answers about the request or the parameter (not found,
//! access denied, refused credentials, a rejected request) never fail over:
//! the other region would say the same, or has no business answering
//! instead.
//!
//! The two regions hold separate copies (SSM does not replicate across
//! regions; its user does), so what the failover region answers is its
//! replica's value, perhaps older. A pinned version (`NAME:3`) is asked of
//! the primary alone: SSM numbers versions per region, so the replica's
//! version 3 may be another value (and a version is cached for good). Each
//! region's store is its own
//! `Resilient`: its own pacing (each region has its own quota), retries and
//! call counts.
//!
//! A listing's page token is good only in the region that issued it: the
//! failover region's are marked, so a listing's next page goes where its first
//! page came from; a primary's token while the primary rests answers
//! `InvalidNextToken`, and the listing starts over (in the failover region).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Batch, Page, PageContent, Parameter, ParameterStore, StoreError};
use crate::names;

/// Marks a page token the failover region issued. SSM's tokens are base64,
/// which has no `:`, so no primary token starts with it.
const FAILOVER_TOKEN_MARK: &str = "failover:";

pub struct Failover<S> {
    primary: S,
    failover: Option<S>,
    retry_after: Duration,
    /// Until when the primary rests; `None` while it answers.
    resting_until: Mutex<Option<Instant>>,
}

/// A failure of the region rather than of the request: worth asking the
/// other region.
fn region_failed(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Unavailable(_) | StoreError::Timeout | StoreError::Throttled
    )
}

impl<S: ParameterStore> Failover<S> {
    /// The primary alone: every call goes to it.
    pub fn single(primary: S) -> Self {
        Self {
            primary,
            failover: None,
            retry_after: Duration::ZERO,
            resting_until: Mutex::new(None),
        }
    }

    /// The primary, and `failover` while the primary fails; the primary is
    /// tried again `retry_after` after its last failure.
    pub fn new(primary: S, failover: S, retry_after: Duration) -> Self {
        Self {
            failover: Some(failover),
            retry_after,
            ..Self::single(primary)
        }
    }

    pub fn primary(&self) -> &S {
        &self.primary
    }

    pub fn failover(&self) -> Option<&S> {
        self.failover.as_ref()
    }

    /// Whether calls go to the failover region now (the primary rests).
    pub fn on_failover(&self) -> bool {
        self.resting_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Whether this call goes to the primary: it is answering, or its rest is
    /// over and this call is the one that tries it again (the next rest is
    /// claimed at once, so calls made meanwhile keep to the failover region).
    fn to_primary(&self) -> bool {
        let mut resting = self.resting_until.lock().unwrap();
        match *resting {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *resting = Some(Instant::now() + self.retry_after);
                true
            }
        }
    }

    /// Records the primary's answer; true when the call should go to the
    /// failover region (the primary failed as a region does).
    fn primary_failed<T>(&self, result: &Result<T, StoreError>) -> bool {
        let mut resting = self.resting_until.lock().unwrap();
        match result {
            Err(error) if region_failed(error) => {
                if resting.is_none() {
                    tracing::warn!(
                        %error,
                        retry_after = ?self.retry_after,
                        "the primary region is failing: calls go to the failover region until it answers again"
                    );
                }
                *resting = Some(Instant::now() + self.retry_after);
                true
            }
            _ => {
                if resting.take().is_some() {
                    tracing::info!("the primary region answers again: calls go back to it");
                }
                false
            }
        }
    }

    /// `ask` of the primary, or of the failover region while the primary
    /// fails; of the primary alone when `pinned` (a version number is a
    /// region's own).
    async fn call<'a, T, F, Fut>(&'a self, pinned: bool, ask: F) -> Result<T, StoreError>
    where
        F: Fn(&'a S) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let Some(failover) = self.failover.as_ref().filter(|_| !pinned) else {
            return ask(&self.primary).await;
        };
        if !self.to_primary() {
            return ask(failover).await;
        }
        let result = ask(&self.primary).await;
        match self.primary_failed(&result) {
            true => ask(failover).await,
            false => result,
        }
    }

    /// A listing page, from the region whose token it continues.
    async fn page<'a, F, Fut>(&'a self, token: Option<String>, ask: F) -> Result<Page, StoreError>
    where
        F: Fn(&'a S, Option<String>) -> Fut,
        Fut: Future<Output = Result<Page, StoreError>>,
    {
        let Some(failover) = &self.failover else {
            return ask(&self.primary, token).await;
        };
        let marked = |result: Result<Page, StoreError>| {
            result.map(|mut page| {
                page.next_token = page
                    .next_token
                    .map(|token| format!("{FAILOVER_TOKEN_MARK}{token}"));
                page
            })
        };
        if let Some(own) = token
            .as_deref()
            .and_then(|t| t.strip_prefix(FAILOVER_TOKEN_MARK))
        {
            return marked(ask(failover, Some(own.to_string())).await);
        }
        // A primary's token, or a first page.
        let primary_token = token.is_some();
        if !self.to_primary() {
            return match primary_token {
                true => Err(StoreError::InvalidNextToken),
                false => marked(ask(failover, None).await),
            };
        }
        let result = ask(&self.primary, token).await;
        match (self.primary_failed(&result), primary_token) {
            (false, _) => result,
            (true, true) => Err(StoreError::InvalidNextToken),
            (true, false) => marked(ask(failover, None).await),
        }
    }
}

impl<S: ParameterStore> ParameterStore for Failover<S> {
    async fn get(&self, name: &str) -> Result<Parameter, StoreError> {
        self.call(names::pins_version(name), |store| store.get(name))
            .await
    }

    async fn get_many(&self, names: &[&str]) -> Result<Batch, StoreError> {
        let pinned = names.iter().any(|name| crate::names::pins_version(name));
        self.call(pinned, |store| store.get_many(names)).await
    }

    async fn list_page(
        &self,
        path: &str,
        max_results: usize,
        next_token: Option<String>,
        content: PageContent,
    ) -> Result<Page, StoreError> {
        self.page(next_token, |store, token| {
            store.list_page(path, max_results, token, content)
        })
        .await
    }

    fn arn(&self, name: &str) -> Option<String> {
        self.primary
            .arn(name)
            .or_else(|| self.failover.as_ref()?.arn(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    const REST: Duration = Duration::from_secs(10);

    /// `/a` is "east" in the primary and "west" in the failover region.
    fn regions() -> Failover<MemoryStore> {
        let (east, west) = (MemoryStore::new(), MemoryStore::new());
        east.put_string("/a", "east");
        west.put_string("/a", "west");
        Failover::new(east, west, REST)
    }

    fn gets(store: &Failover<MemoryStore>) -> (u64, u64) {
        (
            store.primary().counts().get,
            store.failover().unwrap().counts().get,
        )
    }

    async fn value(store: &Failover<MemoryStore>) -> String {
        let parameter = store.get("/a").await.unwrap();
        String::from_utf8(parameter.value.expose().to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_fails_over_and_the_primary_is_tried_again_after_its_rest() {
        let store = regions();
        assert_eq!(value(&store).await, "east");
        assert_eq!(gets(&store), (1, 0));

        store
            .primary()
            .fail_every_call(Some(StoreError::Unavailable("503".into())));
        assert_eq!(value(&store).await, "west", "failed over");
        assert_eq!(gets(&store), (2, 1));
        for _ in 0..5 {
            assert_eq!(value(&store).await, "west");
        }
        assert_eq!(gets(&store), (2, 6), "straight to the failover region");
        assert!(store.on_failover());

        // The rest is over: one call tries the primary, which still fails.
        tokio::time::advance(REST).await;
        assert_eq!(value(&store).await, "west");
        assert_eq!(gets(&store), (3, 7));
        assert_eq!(value(&store).await, "west");
        assert_eq!(gets(&store), (3, 8), "resting again");

        // It answers after the next rest: calls go back to it.
        store.primary().fail_every_call(None);
        tokio::time::advance(REST).await;
        assert_eq!(value(&store).await, "east");
        assert_eq!(value(&store).await, "east");
        assert_eq!(gets(&store), (5, 8));
        assert!(!store.on_failover());
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_and_throttling_fail_over_and_answers_about_the_parameter_do_not() {
        for error in [StoreError::Timeout, StoreError::Throttled] {
            let store = regions();
            store.primary().fail_next_calls(1, error.clone());
            assert_eq!(value(&store).await, "west", "{error}");
        }
        for error in [
            StoreError::NotFound,
            StoreError::access_denied("not allowed"),
            StoreError::Credentials("expired".into()),
            StoreError::Rejected {
                code: "ValidationException".into(),
                message: "bad".into(),
            },
        ] {
            let store = regions();
            store.primary().fail_every_call(Some(error.clone()));
            assert_eq!(store.get("/a").await.unwrap_err(), error);
            assert_eq!(gets(&store), (1, 0), "{error}: not failed over");
            assert!(!store.on_failover());
        }
        let store = regions();
        assert_eq!(
            store.get("/missing").await.unwrap_err(),
            StoreError::NotFound
        );
        assert_eq!(gets(&store), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_version_is_asked_of_the_primary_alone() {
        let store = regions();
        store
            .primary()
            .fail_every_call(Some(StoreError::Unavailable("503".into())));
        assert!(matches!(
            store.get("/a:1").await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(store.get_many(&["/a", "/a:1"]).await.is_err());
        assert_eq!(gets(&store), (1, 0));
        assert_eq!(store.failover().unwrap().counts().total(), 0);
        // A label is the user's name, replicated with the value: it fails over.
        store.failover().unwrap().label("/a", "prod", 1);
        assert_eq!(store.get("/a:prod").await.unwrap().value.expose(), b"west");
    }

    #[tokio::test(start_paused = true)]
    async fn batches_fail_over_too() {
        let store = regions();
        store.primary().fail_every_call(Some(StoreError::Timeout));
        let batch = store.get_many(&["/a", "/b"]).await.unwrap();
        assert_eq!(batch.found[0].value.expose(), b"west");
        assert_eq!(batch.missing, vec!["/b".to_string()]);
        assert_eq!(store.primary().counts().get_many, 1);
        assert_eq!(store.failover().unwrap().counts().get_many, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_keeps_to_the_region_of_its_first_page() {
        let (east, west) = (MemoryStore::new(), MemoryStore::new());
        for i in 0..25 {
            east.put_string(&format!("/d/p{i:02}"), "east");
            west.put_string(&format!("/d/p{i:02}"), "west");
        }
        let store = Failover::new(east, west, REST);
        let lists = |store: &Failover<MemoryStore>| {
            (
                store.primary().counts().list_page,
                store.failover().unwrap().counts().list_page,
            )
        };
        let first = store
            .list_page("/d", 10, None, PageContent::Values)
            .await
            .unwrap();
        let primary_token = first.next_token.clone();
        assert!(primary_token.is_some());

        // The primary fails on the second page: its token is no good in the
        // other region, so the listing has to start over.
        store
            .primary()
            .fail_every_call(Some(StoreError::Unavailable("503".into())));
        let error = store
            .list_page("/d", 10, primary_token.clone(), PageContent::Values)
            .await
            .unwrap_err();
        assert_eq!(error, StoreError::InvalidNextToken);
        assert_eq!(lists(&store), (2, 0));
        let again = store
            .list_page("/d", 10, primary_token, PageContent::Values)
            .await
            .unwrap_err();
        assert_eq!(again, StoreError::InvalidNextToken, "resting: not asked");
        assert_eq!(lists(&store), (2, 0));

        let mut page = store
            .list_page("/d", 10, None, PageContent::Values)
            .await
            .unwrap();
        let mut seen = page.parameters.len();
        // The primary is back, and its rest over: the failover region's
        // listing still ends there.
        store.primary().fail_every_call(None);
        tokio::time::advance(REST).await;
        while let Some(token) = page.next_token.take() {
            assert!(token.starts_with(FAILOVER_TOKEN_MARK), "{token}");
            page = store
                .list_page("/d", 10, Some(token), PageContent::Values)
                .await
                .unwrap();
            assert!(page.parameters.iter().all(|p| p.value.expose() == b"west"));
            seen += page.parameters.len();
        }
        assert_eq!(seen, 25);
        assert_eq!(lists(&store), (2, 3));
        // A new listing goes to the primary.
        let page = store
            .list_page("/d", 10, None, PageContent::Values)
            .await
            .unwrap();
        assert_eq!(page.parameters[0].value.expose(), b"east");
        assert_eq!(lists(&store), (3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_failover_region_every_call_goes_to_the_primary() {
        let east = MemoryStore::new();
        east.put_string("/a", "east");
        let store = Failover::single(east);
        store
            .primary()
            .fail_every_call(Some(StoreError::Unavailable("503".into())));
        assert!(store.get("/a").await.is_err());
        assert!(store.get("/a").await.is_err());
        assert_eq!(store.primary().counts().get, 2);
        assert!(!store.on_failover());
    }
}
