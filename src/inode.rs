//! The inode table: which inode number stands for which SSM name.
//!
//! A node is keyed by (SSM name, role): the same name can be a directory and,
//! when shadowed, also the `@value` file inside it. Numbers are never reused
//! during a mount. The kernel's lookup count is tracked so `forget` can drop a
//! node; a name whose role changes (a file that became a directory) gets a new
//! number, and the old one lives on until the kernel forgets it. Nodes hold no
//! values: the cache bounds those.

use std::collections::HashMap;
use std::sync::Mutex;

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Dir,
    File,
    /// The `@value` file showing a directory's own shadowed parameter.
    ShadowedValue,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub ino: u64,
    /// The full SSM name (for the root, the mount prefix).
    pub name: String,
    pub role: Role,
    pub parent: u64,
    lookups: u64,
    /// The value version whose size the kernel was last given.
    pub reported_version: Option<i64>,
}

struct Table {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(String, Role), u64>,
    next_ino: u64,
}

pub struct InodeTable {
    table: Mutex<Table>,
}

impl InodeTable {
    pub fn new(prefix: &str) -> Self {
        let root = Node {
            ino: ROOT_INO,
            name: prefix.to_string(),
            role: Role::Dir,
            parent: ROOT_INO,
            lookups: 1,
            reported_version: None,
        };
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, root);
        let mut by_key = HashMap::new();
        by_key.insert((prefix.to_string(), Role::Dir), ROOT_INO);
        Self {
            table: Mutex::new(Table {
                nodes,
                by_key,
                next_ino: ROOT_INO + 1,
            }),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Node> {
        self.table.lock().unwrap().nodes.get(&ino).cloned()
    }

    /// The inode for `name` in `role`, created if needed, with one more kernel
    /// reference (every successful lookup reply is one reference).
    pub fn remember(&self, parent: u64, name: &str, role: Role) -> u64 {
        let mut table = self.table.lock().unwrap();
        let key = (name.to_string(), role);
        if let Some(&ino) = table.by_key.get(&key) {
            if let Some(node) = table.nodes.get_mut(&ino) {
                node.lookups += 1;
                return ino;
            }
        }
        let ino = table.next_ino;
        table.next_ino += 1;
        let node = Node {
            ino,
            name: name.to_string(),
            role,
            parent,
            lookups: 1,
            reported_version: None,
        };
        table.nodes.insert(ino, node);
        table.by_key.insert(key, ino);
        ino
    }

    /// An inode that lives as long as the mount (the Airflow area folders).
    pub fn pin(&self, parent: u64, name: &str, role: Role) -> u64 {
        let ino = self.remember(parent, name, role);
        if let Some(node) = self.table.lock().unwrap().nodes.get_mut(&ino) {
            node.lookups = u64::MAX / 2;
        }
        ino
    }

    /// The inode of `name` in `role` if the kernel holds one.
    pub fn find(&self, name: &str, role: Role) -> Option<u64> {
        self.table
            .lock()
            .unwrap()
            .by_key
            .get(&(name.to_string(), role))
            .copied()
    }

    pub fn set_reported_version(&self, ino: u64, version: Option<i64>) {
        if let Some(node) = self.table.lock().unwrap().nodes.get_mut(&ino) {
            node.reported_version = version;
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
        if node.lookups == 0 {
            let key = (node.name.clone(), node.role);
            table.nodes.remove(&ino);
            if table.by_key.get(&key) == Some(&ino) {
                table.by_key.remove(&key);
            }
        }
    }

    /// A snapshot of every node the kernel holds.
    pub fn all(&self) -> Vec<Node> {
        self.table.lock().unwrap().nodes.values().cloned().collect()
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
        assert!(again > dir, "numbers are never reused");
        table.forget(ROOT_INO, 100);
        assert!(table.get(ROOT_INO).is_some());
    }
}
