//! Unit tests of `lookup`, apart so the module reads as its model.

use super::*;
use crate::secret::SecretBytes;
use crate::store::ParameterKind;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

const ASK_BOTH: Plan = Plan::Ask {
    value: true,
    dir: true,
};
const ASK_VALUE: Plan = Plan::Ask {
    value: true,
    dir: false,
};
const ASK_DIR: Plan = Plan::Ask {
    value: false,
    dir: true,
};

fn answers(
    value: Option<Result<ValueEntry, StoreError>>,
    dir: Option<Result<DirEntry, StoreError>>,
) -> Answers {
    Answers { value, dir }
}

fn validity() -> Validity {
    let hour = Duration::from_secs(3600);
    Validity::new(Instant::now(), hour, hour, hour)
}

fn listing(complete: bool, children: &[(&str, ChildKind)]) -> DirEntry {
    let children: BTreeMap<Box<str>, ChildKind> =
        children.iter().map(|(n, k)| (Box::from(*n), *k)).collect();
    DirEntry {
        complete,
        children: Arc::new(children),
        validity: validity(),
        resume: None,
        own_parameter: None,
    }
}

fn value(known: Known) -> ValueEntry {
    ValueEntry {
        known,
        previous: None,
        validity: validity(),
    }
}

fn present() -> ValueEntry {
    value(Known::Present(Arc::new(Parameter {
        name: "/p/a".into(),
        value: SecretBytes::new(b"v".to_vec()),
        version: 1,
        last_modified: SystemTime::now().into(),
        kind: ParameterKind::String,
        data_type: Default::default(),
    })))
}

fn is_file(r: &Resolved) -> bool {
    matches!(r, Resolved::File(..))
}

#[test]
fn the_cache_answers_when_it_can() {
    let complete = Knowledge {
        parent_dir: Some(listing(true, &[("d", ChildKind::Dir)])),
        absence_trusted: true,
        ..Default::default()
    };
    assert_eq!(plan(&complete, "d"), Plan::Cached);
    assert!(matches!(complete.decide("d"), Some(Resolved::Dir(_))));
    assert_eq!(plan(&complete, "gone"), Plan::Cached);
    assert!(matches!(complete.decide("gone"), Some(Resolved::Missing)));
    // A listed file still needs its value.
    let file = Knowledge {
        parent_dir: Some(listing(true, &[("a", ChildKind::File)])),
        ..Default::default()
    };
    assert_eq!(plan(&file, "a"), ASK_VALUE);
    let with_value = Knowledge {
        own_value: Some(present()),
        ..file
    };
    assert_eq!(plan(&with_value, "a"), Plan::Cached);
}

#[test]
fn a_listing_past_the_absence_window_asks_for_value_and_directory_together() {
    let older = Knowledge {
        parent_dir: Some(listing(true, &[("d", ChildKind::Dir)])),
        absence_trusted: false,
        ..Default::default()
    };
    assert_eq!(plan(&older, "d"), Plan::Cached, "directories are kept");
    assert_eq!(
        plan(&older, "new"),
        ASK_BOTH,
        "a new file or a new directory, in one round trip"
    );
    let mut found = older.clone();
    let c = conclude(
        &mut found,
        "new",
        ASK_BOTH,
        answers(Some(Ok(present())), Some(Ok(listing(true, &[])))),
    );
    assert!(
        matches!(c, Conclusion::Resolved(ref r) if is_file(r)),
        "{c:?}"
    );
    let mut new_dir = older.clone();
    let got = answers(
        Some(Ok(value(Known::Absent))),
        Some(Ok(listing(true, &[("cold", ChildKind::File)]))),
    );
    let c = conclude(&mut new_dir, "new", ASK_BOTH, got);
    assert!(matches!(c, Conclusion::Resolved(Resolved::Dir(_))), "{c:?}");
    let mut gone = older.clone();
    let got = answers(Some(Ok(value(Known::Absent))), Some(Ok(listing(true, &[]))));
    let c = conclude(&mut gone, "new", ASK_BOTH, got);
    assert!(
        matches!(c, Conclusion::Resolved(Resolved::Missing)),
        "{c:?}"
    );
    // That answer is then cached for the negative TTL.
    assert_eq!(plan(&gone, "new"), Plan::Cached);
}

#[test]
fn a_large_directory_is_not_read_on_again() {
    let large = Knowledge {
        parent_dir: Some(listing(false, &[("b", ChildKind::File)])),
        siblings_probed: PROBES_BEFORE_LISTING + 5,
        parent_large: true,
        ..Default::default()
    };
    assert_eq!(plan(&large, "a"), ASK_BOTH, "one round trip of its own");
}

#[test]
fn a_stale_listing_only_vouches_for_a_fresh_value_being_a_file() {
    let stale = Knowledge {
        parent_dir: Some(listing(
            true,
            &[("a", ChildKind::File), ("d", ChildKind::Dir)],
        )),
        parent_stale: true,
        own_value: Some(present()),
        ..Default::default()
    };
    assert_eq!(plan(&stale, "a"), Plan::Cached);
    assert!(matches!(stale.decide("a"), Some(ref r) if is_file(r)));
    let no_value = Knowledge {
        own_value: None,
        ..stale.clone()
    };
    assert_eq!(
        plan(&no_value, "a"),
        ASK_VALUE,
        "the listing still says it is a file"
    );
    assert_eq!(
        plan(&no_value, "d"),
        ASK_BOTH,
        "not trusted for directories"
    );
    assert_eq!(plan(&no_value, "gone"), ASK_BOTH, "nor for missing names");
}

#[test]
fn a_fresh_value_below_vouches_for_a_directory() {
    let stale = Knowledge {
        parent_dir: Some(listing(true, &[("d", ChildKind::Dir)])),
        parent_stale: true,
        ..Default::default()
    };
    assert_eq!(plan(&stale, "d"), ASK_BOTH);
    let vouched = Knowledge {
        fresh_value_below: Some(validity()),
        parent_dir: None,
        parent_stale: false,
        ..stale
    };
    assert_eq!(plan(&vouched, "d"), Plan::Cached);
    assert!(matches!(vouched.decide("d"), Some(Resolved::Dir(_))));
}

#[test]
fn nothing_known_asks_value_and_directory_together() {
    assert_eq!(plan(&Knowledge::default(), "a"), ASK_BOTH);
    // A partial listing that lacks the name says nothing about it.
    let partial = Knowledge {
        parent_dir: Some(listing(false, &[("b", ChildKind::File)])),
        siblings_probed: PROBES_BEFORE_LISTING - 1,
        ..Default::default()
    };
    assert_eq!(plan(&partial, "a"), ASK_BOTH);
}

#[test]
fn after_a_sibling_was_probed_the_parent_listing_is_read_on() {
    let partial = Knowledge {
        parent_dir: Some(listing(false, &[("b", ChildKind::File)])),
        siblings_probed: PROBES_BEFORE_LISTING,
        ..Default::default()
    };
    assert_eq!(plan(&partial, "a"), Plan::ExtendParent);
    // Also when the parent is known only as a name in its own parent's page.
    let unlisted = Knowledge {
        siblings_probed: PROBES_BEFORE_LISTING,
        ..Default::default()
    };
    assert_eq!(plan(&unlisted, "a"), Plan::ExtendParent);
    // Not where SSM refuses listings.
    let refused = Knowledge {
        parent_unlistable: true,
        ..unlisted
    };
    assert_eq!(plan(&refused, "a"), Plan::ValueFirst { value: true });
}

#[test]
fn below_an_unlistable_parent_the_value_comes_first() {
    let mut known = Knowledge {
        parent_unlistable: true,
        ..Default::default()
    };
    let step = plan(&known, "a");
    assert_eq!(step, Plan::ValueFirst { value: true });
    // Found: a file, one call.
    let mut found = known.clone();
    let got = answers(Some(Ok(present())), None);
    let c = conclude(&mut found, "a", step, got);
    assert!(
        matches!(c, Conclusion::Resolved(ref r) if is_file(r)),
        "{c:?}"
    );
    // Missing: then ask below it.
    let got = answers(Some(Ok(value(Known::Absent))), None);
    let c = conclude(&mut known, "a", step, got);
    assert!(matches!(c, Conclusion::ProbeDir), "{c:?}");
    let probe = ASK_DIR;
    let mut empty = known.clone();
    let got = answers(None, Some(Ok(listing(false, &[]))));
    let c = conclude(&mut empty, "a", probe, got);
    assert!(
        matches!(c, Conclusion::Resolved(Resolved::Missing)),
        "{c:?}"
    );
    let got = answers(None, Some(Err(StoreError::access_denied("no"))));
    let c = conclude(&mut known, "a", probe, got);
    assert!(
        matches!(c, Conclusion::Resolved(Resolved::UnlistedDir)),
        "{c:?}"
    );
}

#[test]
fn a_name_ssm_will_not_list_is_its_value_or_a_directory() {
    let mut known = Knowledge {
        name_unlistable: true,
        ..Default::default()
    };
    let step = plan(&known, "a");
    assert_eq!(step, ASK_VALUE);
    let mut with_value = known.clone();
    let got = answers(Some(Ok(present())), None);
    assert!(matches!(
        conclude(&mut with_value, "a", step, got),
        Conclusion::Resolved(ref r) if is_file(r)
    ));
    let got = answers(Some(Ok(value(Known::Absent))), None);
    assert!(matches!(
        conclude(&mut known, "a", step, got),
        Conclusion::Resolved(Resolved::UnlistedDir)
    ));
}

#[test]
fn directory_wins_over_a_value() {
    let mut known = Knowledge::default();
    let step = plan(&known, "a");
    let got = answers(
        Some(Ok(present())),
        Some(Ok(listing(false, &[("x", ChildKind::File)]))),
    );
    assert!(matches!(
        conclude(&mut known, "a", step, got),
        Conclusion::Resolved(Resolved::Dir(_))
    ));
    let mut file = Knowledge::default();
    let got = answers(Some(Ok(present())), Some(Ok(listing(true, &[]))));
    assert!(matches!(
        conclude(&mut file, "a", step, got),
        Conclusion::Resolved(ref r) if is_file(r)
    ));
}

#[test]
fn failures_are_outages_or_errors_and_never_a_guess() {
    let step = plan(&Knowledge::default(), "a");
    let got = answers(
        Some(Err(StoreError::Throttled)),
        Some(Ok(listing(true, &[]))),
    );
    assert!(matches!(
        conclude(&mut Knowledge::default(), "a", step, got),
        Conclusion::Outage(StoreError::Throttled)
    ));
    let rejected = StoreError::Rejected {
        code: "ValidationException".into(),
        message: "m".into(),
    };
    let got = answers(Some(Ok(present())), Some(Err(rejected)));
    assert!(matches!(
        conclude(&mut Knowledge::default(), "a", step, got),
        Conclusion::Failed(StoreError::Rejected { .. })
    ));
    let got = answers(Some(Ok(value(Known::Denied))), Some(Ok(listing(true, &[]))));
    assert!(matches!(
        conclude(&mut Knowledge::default(), "a", step, got),
        Conclusion::Resolved(Resolved::Denied)
    ));
}
