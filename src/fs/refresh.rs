//! Refreshing hot values ahead of expiry, in batches, and backing off while
//! SSM fails.
//!
//! A value a reader used past its refresh point (80-90% of its TTL, jittered
//! per entry, so hosts do not refresh in step) is refreshed in the background;
//! readers keep the cached value meanwhile. The refresh takes along up to nine
//! other values read since they were fetched whose refresh falls within the
//! next quarter of the TTL, and asks for all of them in one GetParameters call:
//! a host keeping K values hot costs about ceil(K/10) calls per TTL instead of
//! K, whatever directories they are in. A reader of a value that expired (read
//! too rarely to be refreshed) fetches it the same way, with the same companions. Values nobody reads are not refreshed:
//! they expire and are fetched again only if read.
//!
//! Why GetParameters and not GetParametersByPath pages per directory: a page
//! carries every name below a path, hot or not (a directory of 1,000 names
//! with 5 hot ones would cost 100 pages instead of one call), and with higher
//! throughput enabled GetParameters gets thousands of TPS per account while
//! GetParametersByPath stays at 100. A role without ssm:GetParameters falls
//! back to GetParameter per name; that is remembered for an hour (the stale
//! TTL) and logged once.
//!
//! While SSM fails (throttling, outage), every further failure in a row
//! doubles how long stale values are served before the next attempt, up to
//! the TTL, with jitter: a throttled fleet stretches its refresh cycle instead
//! of retrying harder.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::cache::{Known, ValueEntry};
use super::filesystem::Fs;
use crate::metrics::Metrics;
use crate::names;
use crate::store::resilient::in_background;
use crate::store::{ParameterStore, StoreError};

impl<S: ParameterStore> Fs<S> {
    /// Called on every reader's cache hit: notes the read, and starts a
    /// refresh once the value is due.
    pub(super) fn refresh_if_due(self: &Arc<Self>, entry: &Option<ValueEntry>, name: &str) {
        let Some(entry) = entry.as_ref().filter(|e| e.parameter().is_some()) else {
            return;
        };
        self.superblock.cache().mark_read(name);
        if entry.validity.wants_refresh(Instant::now()) {
            self.refresh_soon(name);
        }
    }

    pub(super) fn refresh_soon(self: &Arc<Self>, name: &str) {
        let mut batch = vec![Arc::<str>::from(name)];
        if !self.superblock.start_refresh(&batch[0]) {
            return;
        }
        if !names::has_selector(name) {
            batch.extend(self.superblock.take_companions(&batch));
        }
        let fs = self.clone();
        tokio::spawn(async move {
            in_background(fs.refresh(&batch)).await;
            fs.superblock.release(&batch);
        });
    }

    /// While SSM keeps failing: `name`'s cached value is being served past its
    /// TTL, and is retried with the next refresh batch, not by a call now.
    pub(super) fn retry_later(self: &Arc<Self>, name: &str) {
        Metrics::inc(&self.metrics.stale_serves);
        self.superblock.cache().mark_read(name);
        self.refresh_soon(name);
    }

    async fn refresh(self: &Arc<Self>, batch: &[Arc<str>]) {
        if batch.len() > 1 {
            match self.get_batch(batch).await {
                Ok(()) => return,
                Err(error) if error.is_outage() => {
                    let recheck = self.superblock.outage_recheck();
                    for name in batch {
                        self.superblock.note_stale_for(name, &error, recheck);
                    }
                    return;
                }
                Err(_) => {} // refused or rejected: name by name
            }
        }
        for name in batch {
            if let Err(error) = self.fetch_value(name).await {
                if error.is_outage() {
                    self.superblock.note_stale(name, &error);
                }
            }
        }
    }

    /// A reader needs the expired value of a name known to exist: fetch it
    /// together with up to nine read values due soon, in one GetParameters.
    /// `None` when there is nothing to take along (or batches are refused):
    /// then the caller makes its GetParameter.
    pub(super) async fn fetch_with_companions(
        self: &Arc<Self>,
        name: &str,
    ) -> Option<Result<ValueEntry, StoreError>> {
        let now = Instant::now();
        let known = self
            .superblock
            .cache()
            .value(name)
            .is_some_and(|e| e.parameter().is_some());
        if !known || self.superblock.cache().batches_refused(now) || names::has_selector(name) {
            return None;
        }
        let mut batch = vec![Arc::<str>::from(name)];
        let companions = self.superblock.take_companions(&batch);
        if companions.is_empty() {
            return None;
        }
        batch.extend(companions);
        let fetched = self.get_batch(&batch).await;
        self.superblock.release(&batch[1..]);
        match fetched {
            Ok(()) => self.superblock.cache().value(name).map(Ok),
            Err(error) if error.is_outage() => Some(Err(error)),
            Err(_) => None,
        }
    }

    /// One GetParameters for `batch`, its answers recorded. A refusal is
    /// remembered (and logged once): later refreshes go name by name.
    pub(super) async fn get_batch(&self, batch: &[Arc<str>]) -> Result<(), StoreError> {
        if self.superblock.cache().batches_refused(Instant::now()) {
            return Err(StoreError::access_denied("GetParameters refused earlier"));
        }
        let names: Vec<&str> = batch.iter().map(|n| &**n).collect();
        match self.store.get_many(&names).await {
            Ok(answer) => {
                self.superblock.note_answer();
                Metrics::inc(&self.metrics.refresh_batches);
                self.metrics
                    .refreshed_values
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for parameter in answer.found {
                    let name = parameter.name.clone();
                    self.superblock
                        .record_value(&name, Known::Present(Arc::new(parameter)));
                }
                for name in answer.missing {
                    self.superblock.record_value(&name, Known::Absent);
                }
                Ok(())
            }
            // IAM denies GetParameters (or one name in it).
            Err(error @ StoreError::AccessDenied { .. }) => {
                self.superblock.refuse_batches();
                Err(error)
            }
            Err(error) => Err(error),
        }
    }
}
