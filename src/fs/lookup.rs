//! The lookup policy: what a name is, from what the cache knows, and what to
//! ask SSM when it does not know enough.
//!
//! The policy is two pure functions over `Knowledge` (the cached listing of
//! the parent, the name's own listing and value, and the refusals on record):
//! `plan` decides what to fetch, `conclude` decides what the answers mean.
//! `Fs::resolve` only executes the plan. In order of preference:
//!
//! - the cache answers (a fresh listing of the parent, or of the name). A
//!   listing that lacks the name says "no such parameter", and nothing below
//!   it, only while it is younger than the negative TTL (the TTL while change
//!   events are live): after that the name's value and the first page below
//!   it are asked for together, one round trip, and a name found so (a file
//!   or a new directory) joins the listing;
//! - in a directory not listed whole where a sibling was already probed, the
//!   parent's listing is read on (at most `PAGES_PER_LOOKUP` pages of names),
//!   once per directory and TTL: siblings read one after another then cost a
//!   page per ten names instead of two calls per name, in any order. A
//!   directory those pages do not complete is large: later lookups there
//!   probe their own names (one round trip) and never wait for pages that
//!   may not hold them;
//! - the value and the first page below the name are asked for together, one
//!   round trip ("is it a parameter?" and "is anything below it?");
//! - below a path SSM refuses to list, the value is asked for first: a found
//!   parameter is a file (the usual case, one call); only a miss costs a
//!   second round trip asking whether anything is below the name.
//!
//! Where SSM will not list, a name without a readable value of its own may
//! still have parameters below it (a refusal can come from one parameter
//! inside): it is served as a directory whose names resolve one by one.

use std::sync::Arc;

use tokio::time::Instant;

use super::cache::{ChildKind, DirEntry, Known, Validity, ValueEntry};
use super::error::FsError;
use super::filesystem::Fs;
use crate::metrics::Metrics;
use crate::names;
use crate::store::{Parameter, ParameterStore, StoreError};

/// After this many probes of names in one directory not listed whole, the
/// next lookup there reads the parent's listing on instead: one probe keeps a
/// one-off read at one round trip, and from the second sibling on a page of
/// ten names costs half a probe of one.
pub(super) const PROBES_BEFORE_LISTING: u32 = 1;
/// Pages of names of the parent's listing one lookup reads at most, once per
/// directory and TTL: a directory of up to a hundred names is listed whole at
/// once, and in a larger one a single lookup pays these pages once (random
/// reads there then cost one round trip each; reading on would cost a page
/// per ten names that random readers mostly never ask for). A name a partial
/// listing shows as a file still needs a probe of what lies below it
/// ("directory wins").
pub(super) const PAGES_PER_LOOKUP: usize = 10;

/// What a name turned out to be.
#[derive(Debug, Clone)]
pub(super) enum Resolved {
    Dir(Validity),
    /// A directory known only by SSM's refusal to list it: trusted for the
    /// negative TTL, as any answer inferred from a refusal.
    UnlistedDir,
    File(Arc<Parameter>, Validity),
    Missing,
    Denied,
}

/// What the cache holds about one name and its parent, for one decision.
#[derive(Default, Clone)]
pub(super) struct Knowledge {
    pub parent_dir: Option<DirEntry>,
    /// The parent's listing is past its TTL (of any age, while cached): trusted
    /// only to say that a name whose own value is fresh is a file. A name that
    /// gained parameters below it is seen as a directory at the parent's next
    /// listing (`ls`, or a lookup of a new name there).
    pub parent_stale: bool,
    /// The validity of a fresh value below the name (kept so by refreshes):
    /// the name is still a directory, whatever the age of the listings.
    pub fresh_value_below: Option<Validity>,
    pub own_dir: Option<DirEntry>,
    pub own_value: Option<ValueEntry>,
    /// SSM refused to list below the name within the TTL.
    pub name_unlistable: bool,
    /// SSM refused to list below the parent within the TTL.
    pub parent_unlistable: bool,
    /// Names below the parent probed one by one since its last listing.
    pub siblings_probed: u32,
    /// The parent's listing was read on lately and is still not complete.
    pub parent_large: bool,
    /// The parent's complete listing is young enough to say that a name it
    /// lacks is not a parameter (see `Fs::absence_window`).
    pub absence_trusted: bool,
}

/// What to do next for one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// The cache answers.
    Cached,
    /// Read the parent's listing on until the name shows up, then plan again.
    ExtendParent,
    /// Ask SSM for the value and/or the first page below the name, together.
    Ask { value: bool, dir: bool },
    /// Ask for the value alone; `conclude` says whether the directory probe follows.
    ValueFirst { value: bool },
}

/// What SSM answered to a plan's questions (`None`: not asked).
#[derive(Default)]
pub(super) struct Answers {
    pub value: Option<Result<ValueEntry, StoreError>>,
    pub dir: Option<Result<DirEntry, StoreError>>,
}

/// What the answers mean.
#[derive(Debug)]
pub(super) enum Conclusion {
    Resolved(Resolved),
    /// The value-first step found no parameter: ask whether anything is below.
    ProbeDir,
    /// SSM could not answer now: fall back to what may be served stale.
    Outage(StoreError),
    Failed(StoreError),
}

impl Knowledge {
    /// Decides what `base` in the parent is, or `None` if more must be fetched.
    pub(super) fn decide(&self, base: &str) -> Option<Resolved> {
        if let Some(dir) = self.own_dir.as_ref().filter(|d| d.is_dir()) {
            return Some(Resolved::Dir(dir.validity));
        }
        if let Some(validity) = self.fresh_value_below {
            return Some(Resolved::Dir(validity));
        }
        let listed = self
            .parent_dir
            .as_ref()
            .and_then(|d| d.children.get(base).map(|k| (d, *k)));
        match listed {
            // Something below it was seen: a directory, even in a partial listing.
            Some((parent, ChildKind::Dir)) if !self.parent_stale => {
                return Some(Resolved::Dir(parent.validity))
            }
            // Only a complete listing rules out names below it on a later page.
            // A stale one still does for a value kept fresh by refreshes: a hot
            // file's directory listing is not re-read every TTL for it.
            // A stale one does not vouch for the absence of a value it
            // listed: that file may have become a directory since.
            Some((parent, ChildKind::File)) if parent.complete => {
                match self.own_value.as_ref().map(value_resolution) {
                    Some(Resolved::Missing) if self.parent_stale => {}
                    resolved => return resolved,
                }
            }
            None if self.parent_is_complete() && self.absence_trusted => {
                return Some(Resolved::Missing)
            }
            // Nothing is below the name; only its value is in question.
            None if self.parent_is_complete() => {
                return self.own_value.as_ref().map(value_resolution)
            }
            _ => {}
        }
        match (&self.own_dir, &self.own_value) {
            (Some(_), Some(value)) => Some(value_resolution(value)),
            _ => None,
        }
    }

    /// Whether anything must be asked about what lies below the name.
    fn needs_dir_probe(&self, base: &str) -> bool {
        let parent_says_file = self
            .parent_dir
            .as_ref()
            .is_some_and(|d| d.complete && d.children.get(base) == Some(&ChildKind::File));
        // A listing that lacks the name rules out names below it only as long
        // as it rules out the name itself: a new directory appears within the
        // negative TTL, as a new file does.
        let parent_says_nothing_below = self.parent_is_complete()
            && self.absence_trusted
            && self
                .parent_dir
                .as_ref()
                .is_some_and(|d| !d.children.contains_key(base));
        self.own_dir.is_none() && !parent_says_file && !parent_says_nothing_below
    }

    /// Whether a complete listing of the parent, fresh or stale, names `base`:
    /// then only its value is missing, and no sibling listing is needed.
    fn listed_in_complete_parent(&self, base: &str) -> bool {
        self.parent_dir
            .as_ref()
            .is_some_and(|d| d.complete && d.children.contains_key(base))
    }

    fn parent_is_complete(&self) -> bool {
        !self.parent_stale && self.parent_dir.as_ref().is_some_and(|d| d.complete)
    }

    fn has_value(&self) -> bool {
        self.own_value
            .as_ref()
            .is_some_and(|e| e.parameter().is_some())
    }
}

/// Whether an answer past its TTL may be served while SSM is out: anything
/// but "no such name", which is never trusted past the negative TTL (a
/// reader gets EIO, as for any name never fetched).
fn serves_stale(resolved: &Resolved) -> bool {
    !matches!(resolved, Resolved::Missing)
}

pub(super) fn value_resolution(entry: &ValueEntry) -> Resolved {
    match &entry.known {
        Known::Present(p) => Resolved::File(p.clone(), entry.validity),
        Known::Absent => Resolved::Missing,
        Known::Denied => Resolved::Denied,
    }
}

/// Decides what to fetch about `base`, given what is known.
pub(super) fn plan(known: &Knowledge, base: &str) -> Plan {
    if known.decide(base).is_some() {
        return Plan::Cached;
    }
    if !known.parent_is_complete()
        && !known.parent_unlistable
        && !known.parent_large
        && !known.listed_in_complete_parent(base)
        && known.siblings_probed >= PROBES_BEFORE_LISTING
    {
        return Plan::ExtendParent;
    }
    let value = known.own_value.is_none();
    let dir_unknown = known.needs_dir_probe(base) && !known.name_unlistable;
    if dir_unknown && known.parent_unlistable {
        Plan::ValueFirst { value }
    } else {
        Plan::Ask {
            value,
            dir: dir_unknown,
        }
    }
}

/// Folds SSM's answers to `plan` into `known` and says what `base` is.
pub(super) fn conclude(
    known: &mut Knowledge,
    base: &str,
    plan: Plan,
    answers: Answers,
) -> Conclusion {
    let value_failed = matches!(&answers.value, Some(Err(_)));
    let mut listing_refused = false;
    let mut outage = None;
    match answers.dir {
        Some(Ok(dir)) => known.own_dir = Some(dir),
        // SSM refuses a listing when IAM or KMS denies something below the
        // name: so something is there.
        Some(Err(StoreError::AccessDenied { .. })) => listing_refused = true,
        Some(Err(e)) if e.is_outage() => outage = Some(e),
        Some(Err(e)) => return Conclusion::Failed(e),
        None => {}
    }
    match answers.value {
        Some(Ok(value)) => known.own_value = Some(value),
        Some(Err(e)) if e.is_outage() => outage = Some(e),
        Some(Err(e)) => return Conclusion::Failed(e),
        None => {}
    }
    if let Some(error) = outage {
        return Conclusion::Outage(error);
    }
    let found = known.has_value();
    let value_first_done = matches!(plan, Plan::ValueFirst { .. });
    if value_first_done && !found && !value_failed && known.own_dir.is_none() && !listing_refused {
        return Conclusion::ProbeDir;
    }
    // A file a stale listing named is gone: ask whether it became a directory.
    let listed_file_gone = known.parent_stale
        && known.listed_in_complete_parent(base)
        && matches!(
            known.own_value.as_ref().map(value_resolution),
            Some(Resolved::Missing)
        );
    if listed_file_gone && known.own_dir.is_none() && !listing_refused && !known.name_unlistable {
        return Conclusion::ProbeDir;
    }
    let name_unlisted = known.name_unlistable && known.needs_dir_probe(base);
    if listing_refused || name_unlisted || (value_first_done && found) {
        return Conclusion::Resolved(match known.own_value.as_ref().map(value_resolution) {
            Some(Resolved::Missing) | None => Resolved::UnlistedDir,
            Some(resolved) => resolved,
        });
    }
    Conclusion::Resolved(known.decide(base).unwrap_or(Resolved::Missing))
}

impl<S: ParameterStore> Fs<S> {
    pub(super) fn knowledge(
        &self,
        parent: &str,
        name: &str,
        usable: impl Fn(&Validity) -> bool,
    ) -> Knowledge {
        let now = Instant::now();
        let parent_dir = self.superblock.cache().dir(parent);
        let parent_fresh = parent_dir.as_ref().is_some_and(|d| usable(&d.validity));
        let absence_trusted = parent_dir
            .as_ref()
            .is_some_and(|d| self.absence_still_trusted(&d.validity, now));
        let own_value = self
            .superblock
            .cache()
            .value(name)
            .filter(|v| usable(&v.validity));
        Knowledge {
            absence_trusted,
            parent_large: self.superblock.cache().extended_lately(parent, now),
            fresh_value_below: (!parent_fresh)
                .then(|| self.fresh_value_below(name, now))
                .flatten(),
            parent_stale: parent_dir.is_some() && !parent_fresh,
            parent_dir,
            own_dir: self.superblock.cache().dir(name).filter(|d| {
                // "Nothing below" is an absence like any other: beside a value
                // it holds for the TTL (a file stays a file), alone only for
                // the absence window, so a new directory shows up as a new
                // file does.
                usable(&d.validity)
                    && (d.is_dir()
                        || own_value.as_ref().is_some_and(|v| v.parameter().is_some())
                        || self.absence_still_trusted(&d.validity, now))
            }),
            own_value,
            name_unlistable: self.listing_refused(name, now),
            parent_unlistable: self.listing_refused(parent, now),
            siblings_probed: self.superblock.cache().probes_below(parent),
        }
    }

    /// Whether what a listing fetched with `validity` says is absent (a name,
    /// or anything below one) still holds at `now` (`Fs::absence_window`).
    fn absence_still_trusted(&self, validity: &Validity, now: Instant) -> bool {
        now < validity.fetched + self.absence_window(validity.fetched)
    }

    /// The validity of a fresh value directly below `dir`, or one level deeper,
    /// as the last listing of `dir` (of any age) names them: `dir` is still a
    /// directory, without listing anything again.
    fn fresh_value_below(&self, dir: &str, now: Instant) -> Option<Validity> {
        let listing = self.superblock.cache().dir(dir)?;
        listing.children.iter().find_map(|(child, kind)| {
            let name = names::join(dir, child);
            match kind {
                ChildKind::File => self
                    .superblock
                    .cache()
                    .value(&name)
                    .filter(|v| v.parameter().is_some() && v.validity.is_fresh(now))
                    .map(|v| v.validity),
                ChildKind::Dir => self.superblock.cache().dir(&name).and_then(|sub| {
                    sub.children.iter().find_map(|(leaf, kind)| {
                        (*kind == ChildKind::File)
                            .then(|| self.superblock.cache().value(&names::join(&name, leaf)))
                            .flatten()
                            .filter(|v| v.parameter().is_some() && v.validity.is_fresh(now))
                            .map(|v| v.validity)
                    })
                }),
            }
        })
    }

    /// Executes the lookup policy for `name` in the directory `parent`.
    pub(super) async fn resolve(
        self: &Arc<Self>,
        parent: &str,
        name: &str,
    ) -> Result<Resolved, FsError> {
        let base = names::base_name(name);
        let now = Instant::now();
        let mut known = self.knowledge(parent, name, |v| v.is_fresh(now));
        let mut step = plan(&known, base);
        if step == Plan::Cached {
            Metrics::inc(&self.metrics.cache_hits);
            self.refresh_if_due(&known.own_value, name);
            return Ok(known.decide(base).expect("planned from the cache"));
        }
        // While SSM keeps failing, what may be served stale is, and the value
        // is retried with the next refresh batch instead of by a call now.
        if self.superblock.in_outage() {
            let stale = self.knowledge(parent, name, |v| v.may_serve_stale(now));
            if let Some(resolved) = stale.decide(base).filter(serves_stale) {
                match resolved {
                    Resolved::File(..) => self.retry_later(name),
                    _ => Metrics::inc(&self.metrics.stale_serves),
                }
                return Ok(resolved);
            }
        }
        Metrics::inc(&self.metrics.cache_misses);
        if step == Plan::ExtendParent {
            if let Ok(listing) = self.extend_listing(parent, PAGES_PER_LOOKUP).await {
                if !listing.complete {
                    self.superblock.cache().note_extended(parent);
                }
                known.absence_trusted = listing.complete;
                known.parent_dir = Some(listing);
            }
            // Still unknown (or SSM failed): this lookup probes the name itself.
            known.siblings_probed = 0;
            step = plan(&known, base);
            if step == Plan::Cached {
                return Ok(known.decide(base).expect("planned from the cache"));
            }
        }
        if !known.parent_is_complete() && !known.listed_in_complete_parent(base) {
            self.superblock.cache().count_probe(parent);
        }
        let (value, dir) = match step {
            Plan::Ask { value, dir } => (value, dir),
            Plan::ValueFirst { value } => (value, false),
            Plan::Cached | Plan::ExtendParent => unreachable!("handled above"),
        };
        let (dir, value) = tokio::join!(
            async {
                match dir {
                    true => Some(self.probe_dir(name).await),
                    false => None,
                }
            },
            async {
                match value {
                    true => Some(self.fetch_value(name).await),
                    false => None,
                }
            },
        );
        let mut conclusion = conclude(&mut known, base, step, Answers { value, dir });
        if let Conclusion::ProbeDir = conclusion {
            let dir = Some(self.probe_dir(name).await);
            conclusion = conclude(
                &mut known,
                base,
                Plan::Ask {
                    value: false,
                    dir: true,
                },
                Answers { value: None, dir },
            );
        }
        match conclusion {
            Conclusion::Resolved(resolved) => {
                let created_since_listing =
                    known.parent_is_complete() && !known.listed_in_complete_parent(base);
                if created_since_listing {
                    // `ls` shows it from now on.
                    match resolved {
                        Resolved::File(..) => self.add_to_listings(name, ChildKind::File),
                        Resolved::Dir(_) => self.add_to_listings(name, ChildKind::Dir),
                        _ => {}
                    }
                }
                Ok(resolved)
            }
            Conclusion::Outage(error) => {
                let stale = self.knowledge(parent, name, |v| v.may_serve_stale(now));
                match stale.decide(base).filter(serves_stale) {
                    Some(resolved) => {
                        self.superblock.note_stale(name, &error);
                        Ok(resolved)
                    }
                    None => Err(error.into()),
                }
            }
            Conclusion::Failed(error) => Err(error.into()),
            Conclusion::ProbeDir => unreachable!("a directory probe was just made"),
        }
    }
}

#[cfg(test)]
mod tests;
