//! Listings: GetParametersByPath pages folded into the cached tree.
//!
//! A probe reads the first page below a path (enough to tell whether it is a
//! directory); a listing reads every page, continuing a fresh probe's pages
//! rather than reading page one again; an extension reads a bounded number of
//! further pages of a partial listing (siblings read one after another then
//! cost a page per ten names, not two calls per name). Every page's parameters are cached as
//! values, and a complete listing also caches the listing of every directory
//! below the path, so a following `find` or `diff -r` costs nothing. A listing
//! SSM refuses (a role with GetParameter alone) is remembered for a TTL and
//! logged once; a changed listing tells the kernel which entries to drop.

use std::sync::Arc;

use tokio::time::Instant;

use super::cache::{DirEntry, Resume};
use super::error::FsError;
use super::filesystem::Fs;
use super::superblock::ListingFlight;
use crate::metrics::Metrics;
use crate::names;
use crate::store::{PageContent, ParameterStore, StoreError, MAX_PAGE};

/// Whether SSM's refusal names the listing action itself (IAM does not
/// grant ssm:GetParametersByPath there): asking without decryption would
/// be refused too, so it is not asked.
fn refuses_listing_itself(refusal: &StoreError) -> bool {
    matches!(refusal, StoreError::AccessDenied { reason } if reason.contains("ssm:GetParametersByPath"))
}

impl<S: ParameterStore> Fs<S> {
    /// The first page below `path`: enough to tell whether it is a directory.
    pub(super) async fn probe_dir(self: &Arc<Self>, path: &str) -> Result<DirEntry, StoreError> {
        self.superblock
            .dir_flights()
            .run((path.to_string(), ListingFlight::Probe), || async {
                let mut token = None;
                loop {
                    let page = self.page(path, token).await?;
                    // SSM may return an empty page that still has a next token.
                    if !page.parameters.is_empty() || page.next_token.is_none() {
                        let names = page.parameters.iter().map(|p| p.name.clone()).collect();
                        let next_token = page.next_token.clone();
                        let values = page.values();
                        return Ok(self
                            .superblock
                            .record_listing(path, names, values, next_token));
                    }
                    token = page.next_token;
                }
            })
            .await
            .inspect_err(|error| self.remember_refusal(path, error))
    }

    /// Every page below `path`, continuing a fresh partial listing if there is one.
    pub(super) async fn list_dir(self: &Arc<Self>, path: &str) -> Result<DirEntry, StoreError> {
        self.superblock
            .dir_flights()
            .run((path.to_string(), ListingFlight::Whole), || async {
                if let Some(resume) = self.fresh_resume(path) {
                    let names = resume.names.as_ref().clone();
                    match self.read_pages(path, names, Some(resume.next_token)).await {
                        Err(StoreError::InvalidNextToken) => {} // expired: start over
                        other => return other,
                    }
                }
                self.read_pages(path, Vec::new(), None).await
            })
            .await
            .inspect_err(|error| self.remember_refusal(path, error))
    }

    /// More of `path`'s listing: from where a fresh partial listing stopped (or
    /// from the start), until it is complete or `max_pages` pages of names were
    /// read (an empty page with a next token does not count).
    pub(super) async fn extend_listing(
        self: &Arc<Self>,
        path: &str,
        max_pages: usize,
    ) -> Result<DirEntry, StoreError> {
        self.superblock
            .dir_flights()
            .run((path.to_string(), ListingFlight::Extend), || async {
                let (mut names, mut token) = match self.fresh_resume(path) {
                    Some(resume) => (resume.names.as_ref().clone(), Some(resume.next_token)),
                    None => (Vec::new(), None),
                };
                let mut parameters = Vec::new();
                let mut pages = 0;
                while pages < max_pages {
                    let page = match self.page(path, token.clone()).await {
                        Err(StoreError::InvalidNextToken) if token.is_some() => {
                            (names, token) = (Vec::new(), None); // expired: start over
                            continue;
                        }
                        other => other?,
                    };
                    pages += usize::from(!page.parameters.is_empty());
                    names.extend(page.parameters.iter().map(|p| p.name.clone()));
                    token = page.next_token.clone();
                    parameters.extend(page.values());
                    if token.is_none() {
                        break;
                    }
                }
                Ok(self
                    .superblock
                    .record_listing(path, names, parameters, token))
            })
            .await
            .inspect_err(|error| self.remember_refusal(path, error))
    }

    /// Where a fresh partial listing of `path` stopped.
    fn fresh_resume(&self, path: &str) -> Option<Resume> {
        let now = Instant::now();
        self.superblock
            .cache()
            .dir(path)
            .filter(|d| d.validity.is_fresh(now))
            .and_then(|d| d.resume)
    }

    async fn read_pages(
        &self,
        path: &str,
        mut names: Vec<Arc<str>>,
        mut token: Option<String>,
    ) -> Result<DirEntry, StoreError> {
        let mut parameters = Vec::new();
        let mut started_over = false;
        loop {
            let page = match self.page(path, token.clone()).await {
                // The token no longer holds (it expired, or the region that
                // issued it is failing: `store::failover`): start over, once.
                Err(StoreError::InvalidNextToken) if token.is_some() && !started_over => {
                    started_over = true;
                    (names, parameters, token) = (Vec::new(), Vec::new(), None);
                    continue;
                }
                other => other?,
            };
            names.extend(page.parameters.iter().map(|p| p.name.clone()));
            token = page.next_token.clone();
            parameters.extend(page.values());
            if token.is_none() {
                let many = names.len() >= crate::heap::TRIM_AFTER_LISTING_OF;
                let listed = self
                    .superblock
                    .record_listing(path, names, parameters, None);
                if many {
                    crate::heap::release_freed();
                }
                return Ok(listed);
            }
        }
    }

    /// The complete listing of `path`: cached, fetched, or served stale
    /// through an outage.
    pub(super) async fn listing(self: &Arc<Self>, path: &str) -> Result<DirEntry, FsError> {
        let now = Instant::now();
        let cached = self.superblock.cache().dir(path).filter(|d| d.complete);
        if let Some(dir) = cached.as_ref().filter(|d| d.validity.is_fresh(now)) {
            Metrics::inc(&self.metrics.cache_hits);
            return Ok(dir.clone());
        }
        if self.listing_refused(path, now) {
            return Err(FsError::ListingRefused {
                path: path.to_string(),
            });
        }
        Metrics::inc(&self.metrics.cache_misses);
        match self.list_dir(path).await {
            Ok(dir) => Ok(dir),
            Err(StoreError::AccessDenied { .. }) => Err(FsError::ListingRefused {
                path: path.to_string(),
            }),
            Err(error) if error.is_outage() => {
                match cached.filter(|d| d.validity.may_serve_stale(now)) {
                    Some(dir) => {
                        Metrics::inc(&self.metrics.stale_serves);
                        self.superblock
                            .cache()
                            .extend_stale_dir(path, self.superblock.outage_recheck());
                        tracing::warn!(path, %error, "SSM is not answering; serving the cached listing past its TTL");
                        Ok(dir)
                    }
                    None => Err(error.into()),
                }
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Remembers a refused listing of `path` for a TTL, wherever a listing is
    /// asked for; a refusal not already on record is logged.
    fn remember_refusal(&self, path: &str, error: &StoreError) {
        if !matches!(error, StoreError::AccessDenied { .. })
            || !self.superblock.cache().refuse_listing(path)
        {
            return;
        }
        if names::is_secrets_manager(path) {
            tracing::info!(
                path,
                "Secrets Manager secrets are read one by one through SSM, which cannot list them: listing this directory answers EACCES"
            );
        } else {
            tracing::warn!(
                path,
                "SSM denied listing below this path: serving it as a directory of names resolved one by one (listing it answers EACCES)"
            );
        }
    }

    /// Whether listing `path` is known to be refused: by SSM (remembered for
    /// a TTL), or always (SSM lists nothing under Secrets Manager's tree).
    pub(super) fn listing_refused(&self, path: &str, now: Instant) -> bool {
        names::is_secrets_manager(path) || self.superblock.cache().listing_refused(path, now)
    }

    /// One page below `path`, or SSM's refusal where it never lists (only
    /// GetParameter and GetParameters reach Secrets Manager's secrets), as a
    /// refusal without a call.
    async fn page(
        &self,
        path: &str,
        token: Option<String>,
    ) -> Result<crate::store::Page, StoreError> {
        if names::is_secrets_manager(path) {
            return Err(StoreError::access_denied(
                "GetParametersByPath is not supported for Secrets Manager references",
            ));
        }
        match self
            .store
            .list_page(path, MAX_PAGE, token.clone(), PageContent::Values)
            .await
        {
            // One parameter on the page is under a KMS key this caller may not
            // use (SSM refuses the whole page then), or listing is not allowed
            // at all: the names alone tell which.
            Err(refused @ StoreError::AccessDenied { .. }) if !refuses_listing_itself(&refused) => {
                // Boxed: a rare path, kept out of every listing future's layout.
                let names_only =
                    Box::pin(
                        self.store
                            .list_page(path, MAX_PAGE, token, PageContent::NamesOnly),
                    );
                match names_only.await {
                    Ok(page) => {
                        self.superblock.note_undecryptable_page(path);
                        Ok(page)
                    }
                    Err(_) => Err(refused),
                }
            }
            other => other,
        }
    }
}
