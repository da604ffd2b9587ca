//! The inode table: which inode number stands for which SSM name.
//!
//! A node is keyed by (SSM name, role): the same name can be a directory and,
//! when shadowed, also the `@value` file inside it. A node's number is a hash
//! of (role, name), so a directory listing can report, without storing
//! anything, the very number a later lookup gives (`d_ino` == `st_ino`), the
//! same name gets the same number again after the kernel forgets it, and a
//! restarted daemon numbers the tree as its predecessor did. A name whose role
//! changes (a file that became a directory) gets another number. The table
//! holds only the nodes the kernel has looked up, with the kernel's lookup
//! count, so `forget` can drop them. Nodes hold no values: the cache bounds those.
//!
//! Two keys whose hashes collide (about one chance in 2^63 a pair) are told
//! apart by probing: the later one takes the next free number of its own
//! sequence. Listings then agree with lookups for every name but, at worst,
//! such a pair while both are held.

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroI64, NonZeroU64};
use std::sync::{Arc, Mutex, MutexGuard};

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Dir,
    File,
    /// The `@value` file showing a directory's own shadowed parameter.
    ShadowedValue,
    /// A folder of the Airflow layout (`variables`, ...): a directory whose
    /// keys are filtered by its lookup pattern. A role of its own, so the same
    /// SSM path reached as a plain subdirectory is another node.
    Area,
    /// `NAME@json` or `NAME@conn`: a directory of fields of a value, looked
    /// up on demand, never listed in its parent.
    View,
    /// One field of a view (`NAME@json/key`).
    Field,
}

impl Role {
    pub fn is_dir(self) -> bool {
        matches!(self, Role::Dir | Role::Area | Role::View)
    }

    fn tag(self) -> u8 {
        match self {
            Role::Dir => b'd',
            Role::File => b'f',
            Role::ShadowedValue => b'v',
            Role::Area => b'a',
            Role::View => b'w',
            Role::Field => b'k',
        }
    }
}

/// The candidate numbers for (name, role), first choice first: FNV-1a over
/// the role and the name, mixed (splitmix64's finaliser) so similar names
/// spread over the whole range, then re-mixed for each further candidate.
/// Kept below 2^63 (some tools read `st_ino` as signed) and above the root's.
/// Fixed here, not `std`'s hasher, so numbers survive a rebuild or upgrade.
fn candidates(name: &str, role: Role) -> impl Iterator<Item = u64> {
    let seed = stable_hash(std::iter::once(role.tag()).chain(name.bytes()));
    std::iter::successors(Some(seed), |previous| Some(mix(*previous)))
        .map(|hash| hash >> 1)
        .filter(|ino| *ino > ROOT_INO)
}

/// FNV-1a over `bytes`, mixed: the same on every build and every host.
pub fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let fnv = bytes.into_iter().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    });
    mix(fnv)
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug, Clone)]
pub struct Node {
    pub ino: u64,
    /// The full SSM name (for the root, the mount prefix); shared with the
    /// name index, so a node costs one copy of its name.
    pub name: Arc<str>,
    pub role: Role,
    pub parent: u64,
    /// The value version whose size the kernel was last given.
    pub reported_version: Option<i64>,
}

/// The further inodes of a name that has more than one role (a directory and
/// its `@value`, or a file that became a directory while the kernel still
/// holds the file). Indexing by name alone lets lookups borrow a `&str`.
#[derive(Debug, Default, Clone, Copy)]
struct RoleInos {
    dir: Option<NonZeroU64>,
    file: Option<NonZeroU64>,
    shadowed_value: Option<NonZeroU64>,
    area: Option<NonZeroU64>,
    view: Option<NonZeroU64>,
    field: Option<NonZeroU64>,
}

impl RoleInos {
    fn slot(&mut self, role: Role) -> &mut Option<NonZeroU64> {
        match role {
            Role::Dir => &mut self.dir,
            Role::File => &mut self.file,
            Role::ShadowedValue => &mut self.shadowed_value,
            Role::Area => &mut self.area,
            Role::View => &mut self.view,
            Role::Field => &mut self.field,
        }
    }

    fn get(mut self, role: Role) -> Option<u64> {
        self.slot(role).map(NonZeroU64::get)
    }

    fn is_empty(&self) -> bool {
        self.dir.is_none()
            && self.file.is_none()
            && self.shadowed_value.is_none()
            && self.area.is_none()
            && self.view.is_none()
            && self.field.is_none()
    }
}

/// What the table stores per inode: `Node` without the number (the map's key)
/// and with the version in 8 bytes (SSM versions start at 1).
#[derive(Debug)]
struct Record {
    name: Arc<str>,
    parent: u64,
    lookups: u64,
    reported_version: Option<NonZeroI64>,
    role: Role,
}

impl Record {
    fn node(&self, ino: u64) -> Node {
        Node {
            ino,
            name: self.name.clone(),
            role: self.role,
            parent: self.parent,
            reported_version: self.reported_version.map(NonZeroI64::get),
        }
    }
}

struct Table {
    nodes: HashMap<u64, Record>,
    /// One inode per name covers nearly every name in 24 bytes a slot...
    by_name: HashMap<Arc<str>, u64>,
    /// ...and the few names with a second role are indexed here.
    other_roles: HashMap<Arc<str>, RoleInos>,
    /// How far the journal has been read (whole records only).
    journal_read: u64,
    /// The numbers the journal already names (under `--supervise` only): a
    /// node the kernel forgot and looks up again is not recorded twice, so
    /// the journal grows with the names looked up, not with the lookups.
    journaled: HashSet<u64>,
}

impl Table {
    fn find(&self, name: &str, role: Role) -> Option<u64> {
        if let Some(&ino) = self.by_name.get(name) {
            if self.nodes.get(&ino).is_some_and(|r| r.role == role) {
                return Some(ino);
            }
        }
        self.other_roles.get(name).and_then(|inos| inos.get(role))
    }

    /// The number (name, role) has, or would get if looked up now.
    fn number(&self, name: &str, role: Role) -> u64 {
        self.find(name, role).unwrap_or_else(|| {
            candidates(name, role)
                .find(|ino| !self.nodes.contains_key(ino))
                .expect("an endless sequence of candidates")
        })
    }
}

pub struct InodeTable {
    table: Mutex<Table>,
    /// Under `--supervise`: every node ever created, shared with the next
    /// daemon of the same mount, so the numbers the kernel holds keep their
    /// names across a restart.
    journal: Option<std::fs::File>,
}

/// How many references a node restored from the journal holds: unknown (the
/// kernel may hold any number), so it is never forgotten.
const RESTORED_LOOKUPS: u64 = u64::MAX / 2;

fn encode_record(ino: u64, parent: u64, role: Role, name: &str) -> Vec<u8> {
    let mut record = Vec::with_capacity(21 + name.len());
    record.extend_from_slice(&ino.to_le_bytes());
    record.extend_from_slice(&parent.to_le_bytes());
    record.push(role.tag());
    record.extend_from_slice(&(name.len() as u32).to_le_bytes());
    record.extend_from_slice(name.as_bytes());
    record
}

fn role_of(tag: u8) -> Option<Role> {
    [
        Role::Dir,
        Role::File,
        Role::ShadowedValue,
        Role::Area,
        Role::View,
        Role::Field,
    ]
    .into_iter()
    .find(|role| role.tag() == tag)
}

impl InodeTable {
    pub fn new(prefix: &str) -> Self {
        let mut table = Table {
            nodes: HashMap::new(),
            by_name: HashMap::new(),
            other_roles: HashMap::new(),
            journal_read: 0,
            journaled: HashSet::new(),
        };
        Self::insert(&mut table, ROOT_INO, ROOT_INO, prefix, None, Role::Dir);
        Self {
            journal: None,
            table: Mutex::new(table),
        }
    }

    fn insert(
        table: &mut Table,
        ino: u64,
        parent: u64,
        name: &str,
        shared: Option<&Arc<str>>,
        role: Role,
    ) -> u64 {
        // One copy of a name: the index's, else the caller's, else a new one.
        let indexed = table
            .by_name
            .get_key_value(name)
            .map(|(key, _)| key)
            .or_else(|| table.other_roles.get_key_value(name).map(|(key, _)| key));
        let name: Arc<str> = indexed
            .or(shared)
            .cloned()
            .unwrap_or_else(|| Arc::from(name));
        let primary_role = table
            .by_name
            .get(&*name)
            .and_then(|existing| table.nodes.get(existing))
            .map(|r| r.role);
        match primary_role {
            Some(other) if other != role => {
                *table
                    .other_roles
                    .entry(name.clone())
                    .or_default()
                    .slot(role) = NonZeroU64::new(ino);
            }
            _ => {
                table.by_name.insert(name.clone(), ino);
            }
        }
        let record = Record {
            name,
            role,
            parent,
            lookups: 1,
            reported_version: None,
        };
        table.nodes.insert(ino, record);
        ino
    }

    /// Restores the nodes an earlier daemon of this mount recorded in
    /// `journal` (read without moving its shared offset), and records new
    /// ones there from now on. `sole_writer`: no other daemon of the mount
    /// is alive (a restart, not an upgrade), so a record cut short at the end
    /// (its writer killed mid-write) is cut off, or the records appended after
    /// it would be misread.
    pub fn with_journal(
        mut self,
        mut journal: std::fs::File,
        sole_writer: bool,
    ) -> std::io::Result<Self> {
        use std::io::Seek;
        let mut table = self.table.lock().unwrap();
        let restored = Self::read_journal(&mut table, &journal)?;
        if sole_writer && journal.metadata()?.len() > table.journal_read {
            tracing::warn!(
                "the previous daemon died while recording an inode; that record is dropped"
            );
            journal.set_len(table.journal_read)?;
            // The offset is shared by every daemon of the mount: the next
            // record must follow the last whole one, not leave a gap.
            journal.seek(std::io::SeekFrom::Start(table.journal_read))?;
        }
        drop(table);
        if restored > 0 {
            tracing::info!(
                restored,
                "inode numbers restored from the previous daemon of this mount"
            );
        }
        self.journal = Some(journal);
        Ok(self)
    }

    /// Adds the nodes recorded in `journal` since the table last read it,
    /// and returns how many were new here. Only whole records are consumed:
    /// one cut short (a daemon killed mid-write, or still writing) is read
    /// again next time.
    fn read_journal(table: &mut Table, journal: &std::fs::File) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let length = journal.metadata()?.len();
        let Some(unread) = length.checked_sub(table.journal_read).filter(|n| *n > 0) else {
            return Ok(0);
        };
        let mut bytes = vec![0; usize::try_from(unread).unwrap_or(0)];
        journal.read_exact_at(&mut bytes, table.journal_read)?;
        let mut restored = 0;
        let mut rest = bytes.as_slice();
        while rest.len() >= 21 {
            let ino = u64::from_le_bytes(rest[0..8].try_into().unwrap());
            let parent = u64::from_le_bytes(rest[8..16].try_into().unwrap());
            let role = role_of(rest[16]);
            let len = u32::from_le_bytes(rest[17..21].try_into().unwrap()) as usize;
            let Some(name) = rest.get(21..21 + len) else {
                break;
            };
            if let (Some(role), Ok(name)) = (role, std::str::from_utf8(name)) {
                // A number already journaled is one this daemon recorded
                // (or read) itself: held or forgotten, it knows its count.
                if table.journaled.insert(ino) && !table.nodes.contains_key(&ino) {
                    Self::insert(table, ino, parent, name, None, role);
                    // Another daemon replied with it: the kernel may hold any
                    // number of references, so it is never forgotten.
                    if let Some(node) = table.nodes.get_mut(&ino) {
                        node.lookups = RESTORED_LOOKUPS;
                    }
                    restored += 1;
                }
            }
            rest = &rest[21 + len..];
            table.journal_read += (21 + len) as u64;
        }
        Ok(restored)
    }

    /// Reads the nodes the daemon this one replaced recorded after this one
    /// started: an upgrade's daemon starts while the current one serves on
    /// (it is adopted only once its handshake agrees), and a daemon can be
    /// killed just after recording a node its successor started too early to
    /// read. Called when a number or name is missing, before it is called
    /// unknown: the kernel may hold it.
    fn catch_up(&self, table: &mut Table) {
        let Some(journal) = &self.journal else {
            return;
        };
        match Self::read_journal(table, journal) {
            Ok(0) => {}
            Ok(restored) => tracing::info!(
                restored,
                "inode numbers the previous daemon gave out after this one started, read from the journal"
            ),
            Err(error) => tracing::warn!(%error, "could not read the inode journal"),
        }
    }

    /// The table, with the journal's new records read first if `missing`
    /// says what the caller looks for is not there.
    fn table_with(&self, missing: impl FnOnce(&Table) -> bool) -> MutexGuard<'_, Table> {
        let mut table = self.table.lock().unwrap();
        if missing(&table) {
            self.catch_up(&mut table);
        }
        table
    }

    /// The node numbered `ino`.
    pub fn get(&self, ino: u64) -> Option<Node> {
        self.table_with(|table| !table.nodes.contains_key(&ino))
            .nodes
            .get(&ino)
            .map(|r| r.node(ino))
    }

    fn record(&self, ino: u64, parent: u64, role: Role, name: &str) {
        use std::io::Write;
        if let Some(mut journal) = self.journal.as_ref() {
            // One write per record: the offset is shared with every daemon
            // of the mount, and a write moves it atomically.
            if let Err(error) = journal.write_all(&encode_record(ino, parent, role, name)) {
                tracing::warn!(%error, "could not record an inode for the next daemon");
            }
        }
    }

    /// The inode for `name` in `role`, created if needed, with one more kernel
    /// reference (every successful lookup reply is one reference).
    pub fn remember(&self, parent: u64, name: &str, role: Role) -> u64 {
        self.remember_sharing(parent, name, None, role)
    }

    /// Like `remember`, keeping the caller's copy of the name (a cached
    /// parameter's) instead of making another.
    pub fn remember_shared(&self, parent: u64, name: &Arc<str>, role: Role) -> u64 {
        self.remember_sharing(parent, name, Some(name), role)
    }

    fn remember_sharing(
        &self,
        parent: u64,
        name: &str,
        shared: Option<&Arc<str>>,
        role: Role,
    ) -> u64 {
        let mut table = self.table_with(|table| table.find(name, role).is_none());
        if let Some(ino) = table.find(name, role) {
            if let Some(node) = table.nodes.get_mut(&ino) {
                node.lookups += 1;
                return ino;
            }
        }
        let ino = table.number(name, role);
        let ino = Self::insert(&mut table, ino, parent, name, shared, role);
        // A number names the same node every time unless a collision made
        // it probe on: only a probed number is recorded again.
        let already_recorded = self.journal.is_some()
            && !table.journaled.insert(ino)
            && candidates(name, role).next() == Some(ino);
        drop(table);
        if !already_recorded {
            self.record(ino, parent, role, name);
        }
        ino
    }

    /// The number a listing reports for (name, role): the held node's, or the
    /// one a lookup would create. Nothing is stored.
    pub fn number(&self, name: &str, role: Role) -> u64 {
        self.table.lock().unwrap().number(name, role)
    }

    /// The inode of `name` in `role` if the kernel holds one.
    pub fn find(&self, name: &str, role: Role) -> Option<u64> {
        self.table_with(|table| table.find(name, role).is_none())
            .find(name, role)
    }

    pub fn set_reported_version(&self, ino: u64, version: Option<i64>) {
        if let Some(node) = self.table.lock().unwrap().nodes.get_mut(&ino) {
            node.reported_version = version.and_then(NonZeroI64::new);
        }
    }

    pub fn forget(&self, ino: u64, count: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut table = self.table.lock().unwrap();
        let Some(node) = table.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups > 0 {
            return;
        }
        let Some(node) = table.nodes.remove(&ino) else {
            return;
        };
        if table.by_name.get(&*node.name) == Some(&ino) {
            table.by_name.remove(&*node.name);
        } else if let Some(inos) = table.other_roles.get_mut(&*node.name) {
            let slot = inos.slot(node.role);
            if *slot == NonZeroU64::new(ino) {
                *slot = None;
            }
            if inos.is_empty() {
                table.other_roles.remove(&*node.name);
            }
        }
    }

    /// A snapshot of every node the kernel holds.
    pub fn all(&self) -> Vec<Node> {
        let table = self.table.lock().unwrap();
        table.nodes.iter().map(|(ino, r)| r.node(*ino)).collect()
    }

    pub fn len(&self) -> usize {
        self.table.lock().unwrap().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_forgets_balance() {
        let table = InodeTable::new("/p");
        let a = table.remember(ROOT_INO, "/p/a", Role::File);
        assert_eq!(table.remember(ROOT_INO, "/p/a", Role::File), a);
        let dir = table.remember(ROOT_INO, "/p/a", Role::Dir);
        assert_ne!(a, dir, "a role change gets a new inode");
        table.forget(a, 1);
        assert!(table.get(a).is_some());
        table.forget(a, 1);
        assert!(table.get(a).is_none());
        assert_eq!(table.find("/p/a", Role::File), None);
        let again = table.remember(ROOT_INO, "/p/a", Role::File);
        assert_eq!(
            again, a,
            "a name forgotten and looked up again keeps its number"
        );
        table.forget(ROOT_INO, 100);
        assert!(table.get(ROOT_INO).is_some());
    }

    #[test]
    fn one_name_in_three_roles_keeps_three_inodes() {
        let table = InodeTable::new("/p");
        let dir = table.remember(ROOT_INO, "/p/a", Role::Dir);
        let value = table.remember(dir, "/p/a", Role::ShadowedValue);
        let file = table.remember(ROOT_INO, "/p/a", Role::File);
        assert!(dir != value && value != file && dir != file);
        for (role, ino) in [
            (Role::Dir, dir),
            (Role::ShadowedValue, value),
            (Role::File, file),
        ] {
            assert_eq!(table.find("/p/a", role), Some(ino));
            assert_eq!(table.remember(ROOT_INO, "/p/a", role), ino);
        }
        table.forget(dir, 2);
        assert_eq!(table.find("/p/a", Role::Dir), None);
        assert_eq!(table.find("/p/a", Role::ShadowedValue), Some(value));
        assert_eq!(table.find("/p/a", Role::File), Some(file));
        let dir_again = table.remember(ROOT_INO, "/p/a", Role::Dir);
        assert_eq!(dir_again, dir);
        assert_eq!(table.find("/p/a", Role::Dir), Some(dir_again));
        table.forget(value, 2);
        table.forget(file, 2);
        table.forget(dir_again, 1);
        assert_eq!(table.len(), 1, "only the root is left");
        let t = table.table.lock().unwrap();
        assert!(
            t.by_name.len() == 1 && t.other_roles.is_empty(),
            "indexes emptied"
        );
    }

    #[test]
    fn a_listing_reports_the_number_a_lookup_gives() {
        let table = InodeTable::new("/p");
        let listed = table.number("/p/a", Role::File);
        assert_eq!(table.len(), 1, "reporting a number stores nothing");
        assert_eq!(table.number("/p/a", Role::File), listed);
        assert_eq!(table.remember(ROOT_INO, "/p/a", Role::File), listed);
        assert_ne!(table.number("/p/a", Role::Dir), listed);
        assert_ne!(
            table.number("/p/a", Role::Area),
            table.number("/p/a", Role::Dir)
        );
        let fresh = InodeTable::new("/p");
        assert_eq!(
            fresh.number("/p/a", Role::File),
            listed,
            "another table (a restarted daemon) numbers alike"
        );
    }

    #[test]
    fn numbers_stay_in_range_and_collisions_probe_on() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let ino = candidates(&format!("/p/n{i}"), Role::File).next().unwrap();
            assert!(ino > ROOT_INO && ino < 1 << 63);
            assert!(seen.insert(ino), "distinct names, distinct numbers");
        }
        // Force a collision: occupy the first candidate with another key.
        let table = InodeTable::new("/p");
        let wanted = candidates("/p/b", Role::File).next().unwrap();
        {
            let mut t = table.table.lock().unwrap();
            InodeTable::insert(&mut t, wanted, ROOT_INO, "/p/squatter", None, Role::File);
        }
        let b = table.remember(ROOT_INO, "/p/b", Role::File);
        assert_ne!(b, wanted);
        assert_eq!(b, candidates("/p/b", Role::File).nth(1).unwrap());
        assert_eq!(table.number("/p/b", Role::File), b);
    }

    #[test]
    fn a_daemon_finds_the_nodes_its_predecessor_recorded_after_it_started() {
        use std::io::Write;
        let journal = tempfile::tempfile().unwrap();
        let current = InodeTable::new("/p")
            .with_journal(journal.try_clone().unwrap(), true)
            .unwrap();
        let early = current.remember(ROOT_INO, "/p/early", Role::File);
        // An upgrade's daemon starts while the current one goes on serving.
        let next = InodeTable::new("/p")
            .with_journal(journal.try_clone().unwrap(), false)
            .unwrap();
        assert_eq!(&*next.get(early).unwrap().name, "/p/early");
        let late = current.remember(ROOT_INO, "/p/late", Role::Dir);
        let later = current.remember(ROOT_INO, "/p/later", Role::File);
        assert_eq!(next.find("/p/later", Role::File), Some(later));
        let node = next.get(late).expect("a node recorded after the start");
        assert_eq!((&*node.name, node.role), ("/p/late", Role::Dir));
        // The kernel may hold it any number of times: never forgotten.
        next.forget(late, 1_000);
        assert!(next.get(late).is_some());
        // A record cut short is left for the next read, not misread.
        let whole = encode_record(77, ROOT_INO, Role::File, "/p/cut");
        (&journal).write_all(&whole[..10]).unwrap();
        assert!(next.get(77).is_none());
        (&journal).write_all(&whole[10..]).unwrap();
        assert_eq!(&*next.get(77).unwrap().name, "/p/cut");
        assert!(next.get(12345).is_none());
        // A node forgotten and looked up again is recorded once.
        let length = journal.metadata().unwrap().len();
        let again = current.remember(ROOT_INO, "/p/again", Role::File);
        let once = journal.metadata().unwrap().len();
        assert!(once > length);
        current.forget(again, 1);
        assert!(current.get(again).is_none());
        assert_eq!(current.remember(ROOT_INO, "/p/again", Role::File), again);
        assert_eq!(journal.metadata().unwrap().len(), once);
    }

    #[test]
    fn a_restart_cuts_off_a_record_its_dead_predecessor_left_cut_short() {
        use std::io::Write;
        let journal = tempfile::tempfile().unwrap();
        let dead = InodeTable::new("/p")
            .with_journal(journal.try_clone().unwrap(), true)
            .unwrap();
        let kept = dead.remember(ROOT_INO, "/p/kept", Role::File);
        let cut = encode_record(77, ROOT_INO, Role::File, "/p/cut");
        (&journal).write_all(&cut[..25]).unwrap();
        let restarted = InodeTable::new("/p")
            .with_journal(journal.try_clone().unwrap(), true)
            .unwrap();
        let after = restarted.remember(ROOT_INO, "/p/after", Role::Dir);
        let next = InodeTable::new("/p")
            .with_journal(journal.try_clone().unwrap(), true)
            .unwrap();
        assert_eq!(&*next.get(kept).unwrap().name, "/p/kept");
        assert_eq!(&*next.get(after).unwrap().name, "/p/after");
        assert!(next.get(77).is_none());
        assert_eq!(next.len(), 3);
    }
}
