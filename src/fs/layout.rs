//! What the mount root shows, and which names a directory admits.
//!
//! Two layouts: a plain tree, whose root is the SSM path PREFIX, and the
//! Airflow layout, whose root is virtual and holds one folder per area
//! (`variables`, `connections`, `config`), each an SSM path of its own whose
//! keys are filtered by the area's lookup pattern. An area folder is a node of
//! its own role (`Role::Area`); everything below it is an ordinary tree.

use crate::airflow::Area;
use crate::config::FsConfig;
use crate::fs::inode::{Node, Role, ROOT_INO};
use crate::names::{self, SHADOWED_VALUE_NAME};

pub(super) enum Layout {
    Tree { prefix: String },
    Areas(Vec<Area>),
}

/// What a name inside a directory stands for, before SSM is asked.
pub(super) enum Child<'a> {
    /// An area folder of the virtual root.
    Area(&'a Area),
    /// The directory's own shadowed value (`@value`).
    OwnValue,
    /// An SSM name below the directory.
    Name,
    /// Nothing can be there: not an area, or filtered out by the area's pattern.
    Excluded,
}

impl Layout {
    pub(super) fn new(config: &FsConfig) -> Self {
        if config.areas.is_empty() {
            Layout::Tree {
                prefix: config.prefix.clone(),
            }
        } else {
            Layout::Areas(config.areas.clone())
        }
    }

    /// The SSM name of the root node (none for the virtual root).
    pub(super) fn root_name(&self) -> &str {
        match self {
            Layout::Tree { prefix } => prefix,
            Layout::Areas(_) => "",
        }
    }

    /// The path the mount-time check lists: the root, or the first area.
    pub(super) fn first_path(&self) -> &str {
        match self {
            Layout::Tree { prefix } => prefix,
            Layout::Areas(areas) => &areas[0].prefix,
        }
    }

    /// The folders of a virtual root, or `None` when `dir` is a real path.
    pub(super) fn root_items(&self, dir: &Node) -> Option<&[Area]> {
        match self {
            Layout::Areas(areas) if dir.ino == ROOT_INO => Some(areas),
            _ => None,
        }
    }

    /// The area `dir` is the folder of, if it is one.
    pub(super) fn area_of(&self, dir: &Node) -> Option<&Area> {
        match self {
            Layout::Areas(areas) if dir.role == Role::Area => {
                areas.iter().find(|a| *a.prefix == *dir.name)
            }
            _ => None,
        }
    }

    /// Whether `dir` shows its own shadowed value as `@value`. The mount root
    /// does not (mount one level up to see it) and neither do area folders.
    pub(super) fn shows_own_value(&self, dir: &Node) -> bool {
        dir.ino != ROOT_INO && dir.role == Role::Dir
    }

    /// Whether the SSM name `name` is served somewhere below the mount root.
    pub(super) fn covers(&self, name: &str) -> bool {
        match self {
            Layout::Tree { prefix } => names::relative_to(prefix, name).is_some(),
            Layout::Areas(areas) => areas.iter().any(|area| {
                names::relative_to(&area.prefix, name)
                    .is_some_and(|key| area.admits(key.split('/').next().unwrap_or(key)))
            }),
        }
    }

    /// Where the SSM name `name` shows, relative to the mount root (in the
    /// Airflow layout, once per area that admits it).
    pub(super) fn mount_paths(&self, name: &str) -> Vec<String> {
        match self {
            Layout::Tree { prefix } => names::relative_to(prefix, name)
                .map(str::to_string)
                .into_iter()
                .collect(),
            Layout::Areas(areas) => areas
                .iter()
                .filter_map(|area| {
                    let key = names::relative_to(&area.prefix, name)?;
                    area.admits(key.split('/').next().unwrap_or(key))
                        .then(|| format!("{}/{key}", area.folder))
                })
                .collect(),
        }
    }

    /// The directory `dir`'s path relative to the mount root ("" for the root).
    pub(super) fn mount_path_of_dir(&self, dir: &Node) -> String {
        if dir.ino == ROOT_INO {
            return String::new();
        }
        if let Some(area) = self.area_of(dir) {
            return area.folder.clone();
        }
        self.mount_paths(&dir.name)
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// The SSM names whose values a stream opened in `dir` covers.
    pub(super) fn ssm_prefixes_of_dir(&self, dir: &Node) -> Vec<String> {
        match self.root_items(dir) {
            Some(areas) => areas.iter().map(|area| area.prefix.clone()).collect(),
            None => vec![dir.name.to_string()],
        }
    }

    /// Whether a listing of `dir` shows `child`.
    pub(super) fn admits(&self, dir: &Node, child: &str) -> bool {
        self.area_of(dir).is_none_or(|area| area.admits(child))
    }

    pub(super) fn classify<'a>(&'a self, dir: &Node, segment: &str) -> Child<'a> {
        if let Some(areas) = self.root_items(dir) {
            return match areas.iter().find(|a| a.folder == segment) {
                Some(area) => Child::Area(area),
                None => Child::Excluded,
            };
        }
        if !self.admits(dir, segment) {
            return Child::Excluded;
        }
        if segment == SHADOWED_VALUE_NAME && self.shows_own_value(dir) {
            return Child::OwnValue;
        }
        Child::Name
    }
}
