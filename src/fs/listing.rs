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

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::{Fs, Invalidation, ListingFlight};
use crate::fs::cache::{ChildKind, DirEntry, Known, Resume};
use crate::fs::error::FsError;
use crate::fs::inode::Role;
use crate::metrics::Metrics;
use crate::names;
use crate::store::{Parameter, ParameterStore, StoreError, MAX_PAGE};

/// Whether SSM's refusal names the listing action itself (IAM does not
/// grant ssm:GetParametersByPath there): asking without decryption would
/// be refused too, so it is not asked.
fn refuses_listing_itself(refusal: &StoreError) -> bool {
    matches!(refusal, StoreError::AccessDenied { reason } if reason.contains("ssm:GetParametersByPath"))
}

impl<S: ParameterStore> Fs<S> {
    /// The first page below `path`: enough to tell whether it is a directory.
    pub(super) async fn probe_dir(self: &Arc<Self>, path: &str) -> Result<DirEntry, StoreError> {
        self.dir_flights
            .run((path.to_string(), ListingFlight::Probe), || async {
                let mut token = None;
                loop {
                    let page = self.page(path, token).await?;
                    // SSM may return an empty page that still has a next token.
                    if !page.parameters.is_empty() || page.next_token.is_none() {
                        let names = page.parameters.iter().map(|p| p.name.clone()).collect();
                        let next_token = page.next_token.clone();
                        let values = page.values();
                        return Ok(self.record_listing(path, names, values, next_token));
                    }
                    token = page.next_token;
                }
            })
            .await
            .inspect_err(|error| self.remember_refusal(path, error))
    }

    /// Every page below `path`, continuing a fresh partial listing if there is one.
    pub(super) async fn list_dir(self: &Arc<Self>, path: &str) -> Result<DirEntry, StoreError> {
        self.dir_flights
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
        self.dir_flights
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
                Ok(self.record_listing(path, names, parameters, token))
            })
            .await
            .inspect_err(|error| self.remember_refusal(path, error))
    }

    /// Where a fresh partial listing of `path` stopped.
    fn fresh_resume(&self, path: &str) -> Option<Resume> {
        let now = Instant::now();
        self.cache
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
                let listed = self.record_listing(path, names, parameters, None);
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
        let cached = self.cache.dir(path).filter(|d| d.complete);
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
                        self.cache.extend_stale_dir(path, self.outage_recheck());
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
        if !matches!(error, StoreError::AccessDenied { .. }) || !self.cache.refuse_listing(path) {
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
        names::is_secrets_manager(path) || self.cache.listing_refused(path, now)
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
        match self.store.list_page(path, MAX_PAGE, token.clone()).await {
            // One parameter on the page is under a KMS key this caller may not
            // use (SSM refuses the whole page then), or listing is not allowed
            // at all: the names alone tell which.
            Err(refused @ StoreError::AccessDenied { .. }) if !refuses_listing_itself(&refused) => {
                // Boxed: a rare path, kept out of every listing future's layout.
                let names_only = Box::pin(self.store.list_names_page(path, MAX_PAGE, token));
                match names_only.await {
                    Ok(page) => {
                        self.note_undecryptable_page(path);
                        Ok(page)
                    }
                    Err(_) => Err(refused),
                }
            }
            other => other,
        }
    }

    /// Logs once (while remembered) that a page below `path` could not be
    /// decrypted: its names are listed, and its values read one by one (the
    /// refused one then answers EACCES, and is logged by name). Listings are
    /// recursive, so a directory above or below a path already logged is the
    /// same refusal seen again: not logged.
    fn note_undecryptable_page(&self, path: &str) {
        let related = |logged: &str| {
            names::relative_to(logged, path).is_some()
                || names::relative_to(path, logged).is_some()
                || logged == path
        };
        let first = {
            let mut logged = self.undecryptable_logged.lock().unwrap();
            let seen = logged.iter().any(|(other, _)| related(other));
            logged.put(path.to_string(), ());
            !seen
        };
        if first {
            tracing::warn!(
                path,
                "SSM refused to decrypt a listing page below this path (a parameter under a KMS key this role may not use): listing its names without values; that parameter answers EACCES"
            );
        }
    }

    /// Caches the values just fetched, the listing of `path` (every name seen
    /// below it; complete unless SSM gave a next token) and, when complete, the
    /// listing of every directory below it.
    fn record_listing(
        &self,
        path: &str,
        names: Vec<Arc<str>>,
        fetched: Vec<Parameter>,
        next_token: Option<String>,
    ) -> DirEntry {
        let complete = next_token.is_none();
        // A partial listing says nothing complete about subdirectories.
        let mut tree = names::tree_below(path, names.iter().map(|n| &**n), complete);
        for parameter in fetched {
            let name = parameter.name.clone();
            self.record_value(&name, Known::Present(Arc::new(parameter)));
        }
        let own = tree.remove(path).unwrap_or_default();
        if complete {
            let parameters: HashSet<&str> = names.iter().map(|n| &**n).collect();
            for (dir, children) in tree {
                let own_parameter = Some(parameters.contains(dir.as_str()));
                self.record_dir(&dir, children, None, own_parameter);
            }
        }
        let resume = next_token.map(|next_token| Resume {
            next_token,
            names: Arc::new(names),
        });
        self.record_dir(path, own, resume, None)
    }

    fn record_dir(
        &self,
        path: &str,
        children: BTreeMap<Box<str>, ChildKind>,
        resume: Option<Resume>,
        own_parameter: Option<bool>,
    ) -> DirEntry {
        let complete = resume.is_none();
        let own_parameter =
            own_parameter.or_else(|| self.cache.dir(path).and_then(|d| d.own_parameter));
        if complete {
            if let Some(old) = self.cache.dir(path).filter(|d| d.complete) {
                let changed = old
                    .children
                    .iter()
                    .filter(|(n, k)| children.get(*n) != Some(k))
                    .map(|(n, _)| n)
                    .chain(
                        children
                            .iter()
                            .filter(|(n, k)| old.children.get(*n) != Some(k))
                            .map(|(n, _)| n),
                    );
                for parent in self.dir_inodes(path) {
                    for name in changed.clone() {
                        self.send(Invalidation::Entry {
                            parent,
                            name: name.to_string(),
                        });
                    }
                }
            }
        }
        self.cache
            .put_dir(path, complete, children, resume, own_parameter)
    }

    /// The inodes the kernel holds for the directory `path` (a plain
    /// directory, an area folder, or both).
    pub(super) fn dir_inodes(&self, path: &str) -> impl Iterator<Item = u64> + Clone {
        [Role::Dir, Role::Area]
            .into_iter()
            .filter_map(|role| self.inodes.find(path, role))
            .collect::<Vec<_>>()
            .into_iter()
    }
}
