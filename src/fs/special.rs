//! Names that are not plain parameters, looked up on demand and never listed:
//! selectors (`NAME:3`, `NAME:prod`), views (`NAME@json/`, `NAME@conn/`, and
//! combined, `NAME:prod@json/`) and their fields, and the extended attributes
//! of a file (`user.ssm.*`, `user.ssmfs.*`).
//!
//! A selector is one GetParameter of `NAME:SELECTOR`, cached like any value
//! under that name: a version never changes, so it is kept for as long as
//! memory allows; a label can move, so it follows the TTL. A view is a
//! directory whose fields are computed from the value (`crate::fs::views`) at
//! each lookup and read: no call beyond the value's own. Attributes come with
//! the cached parameter: no call either.

use std::ffi::OsStr;
use std::sync::Arc;

use tokio::time::Instant;

use super::attr::Entry;
use super::cache::ValueEntry;
use super::error::FsError;
use super::filesystem::{Fs, ReadData};
use super::inode::{Node, Role};
use super::views;
use crate::names::{self, Special, View};
use crate::secret::SecretBytes;
use crate::store::{Parameter, ParameterStore};

/// The attributes every file has, for `listxattr` and `getfattr -d`.
pub const XATTR_NAMES: [&str; 7] = [
    "user.ssm.version",
    "user.ssm.type",
    "user.ssm.last_modified",
    "user.ssm.data_type",
    "user.ssm.arn",
    "user.ssmfs.fetched_at",
    "user.ssmfs.stale",
];

/// `(value name, view)` of a view's name (`/p/x:3@json` -> `/p/x:3`, Json).
fn split_view(view_name: &str) -> Option<(&str, View)> {
    [View::Json, View::Conn]
        .into_iter()
        .find_map(|view| Some((view_name.strip_suffix(view.suffix())?, view)))
}

/// `(view name, key)` of a field's name (`/p/x@json/password`).
fn split_field(field_name: &str) -> Option<(&str, &str)> {
    field_name.rsplit_once('/')
}

impl<S: ParameterStore> Fs<S> {
    /// A selector or a view of a value in `parent`.
    pub(super) async fn lookup_special(
        self: &Arc<Self>,
        parent_ino: u64,
        parent: &str,
        special: Special<'_>,
    ) -> Result<Entry, FsError> {
        // The base obeys every rule of a name here (length, depth, characters).
        names::child_name(parent, special.base)?;
        let value_name = special.value_name(parent);
        let entry = self.value(&value_name).await?;
        let parameter = self.present(&entry, &value_name)?;
        match special.view {
            None => {
                let ino = self
                    .superblock
                    .inodes()
                    .remember(parent_ino, &value_name, Role::File);
                Ok(self.file_entry(ino, &parameter, &entry))
            }
            Some(view) => {
                views::fields(view, parameter.value.expose()).ok_or(FsError::NotFound)?;
                let view_name = format!("{value_name}{}", view.suffix());
                let ino = self
                    .superblock
                    .inodes()
                    .remember(parent_ino, &view_name, Role::View);
                Ok(self
                    .attrs
                    .dir(ino, entry.validity.kernel_ttl(Instant::now())))
            }
        }
    }

    /// The fields of the view `view_name` and the value entry behind them.
    async fn view_fields(
        self: &Arc<Self>,
        view_name: &str,
    ) -> Result<(Vec<(String, SecretBytes)>, Arc<Parameter>, ValueEntry), FsError> {
        let (value_name, view) = split_view(view_name).ok_or(FsError::NotFound)?;
        let entry = self.value(value_name).await?;
        let parameter = self.present(&entry, value_name)?;
        let fields = views::fields(view, parameter.value.expose()).ok_or(FsError::NotFound)?;
        Ok((fields, parameter, entry))
    }

    pub(super) async fn lookup_field(
        self: &Arc<Self>,
        view: &Node,
        segment: &OsStr,
    ) -> Result<Entry, FsError> {
        let key = segment.to_str().ok_or(FsError::NotFound)?;
        self.field_entry(&view.name, key, || {
            let field_name = format!("{}/{key}", view.name);
            self.superblock
                .inodes()
                .remember(view.ino, &field_name, Role::Field)
        })
        .await
    }

    pub(super) async fn getattr_field(self: &Arc<Self>, node: &Node) -> Result<Entry, FsError> {
        let (view_name, key) = split_field(&node.name).ok_or(FsError::NotFound)?;
        self.field_entry(view_name, key, || node.ino).await
    }

    /// The entry of the field `key` of `view_name`, for the inode `ino` gives
    /// once the field is known to exist (a lookup creates it only then).
    async fn field_entry(
        self: &Arc<Self>,
        view_name: &str,
        key: &str,
        ino: impl FnOnce() -> u64,
    ) -> Result<Entry, FsError> {
        let (fields, parameter, entry) = self.view_fields(view_name).await?;
        let (_, bytes) = fields
            .iter()
            .find(|(name, _)| name == key)
            .ok_or(FsError::NotFound)?;
        let ino = ino();
        self.superblock
            .inodes()
            .set_reported_version(ino, Some(parameter.version));
        Ok(self
            .attrs
            .sized_file(ino, bytes.len(), &parameter, &entry.validity))
    }

    /// A field's bytes from the version whose size the kernel holds.
    pub(super) async fn read_field(
        self: &Arc<Self>,
        node: &Node,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, FsError> {
        let (view_name, key) = split_field(&node.name).ok_or(FsError::NotFound)?;
        let (value_name, view) = split_view(view_name).ok_or(FsError::NotFound)?;
        let entry = self.value(value_name).await?;
        let current = self.present(&entry, value_name)?;
        let parameter = self.superblock.version_for_read(node, &entry, current);
        let (_, bytes) = views::fields(view, parameter.value.expose())
            .and_then(|fields| fields.into_iter().find(|(name, _)| name == key))
            .ok_or(FsError::NotFound)?;
        Ok(ReadData::derived(bytes, offset, size))
    }

    /// The entries of a view: its fields, as files.
    pub(super) async fn view_items(
        self: &Arc<Self>,
        view: &Node,
    ) -> Result<Vec<(String, u64)>, FsError> {
        let (fields, _, _) = self.view_fields(&view.name).await?;
        Ok(fields
            .into_iter()
            .map(|(key, _)| {
                let ino = self
                    .superblock
                    .inodes()
                    .number(&format!("{}/{key}", view.name), Role::Field);
                (key, ino)
            })
            .collect())
    }

    /// The name of the value whose metadata a node shows, if it has one.
    fn value_name_of(node: &Node) -> Option<&str> {
        match node.role {
            Role::File | Role::ShadowedValue => Some(&node.name),
            Role::View => split_view(&node.name).map(|(value, _)| value),
            Role::Field => split_field(&node.name)
                .and_then(|(view, _)| split_view(view))
                .map(|(value, _)| value),
            Role::Dir | Role::Area => None,
        }
    }

    /// One extended attribute of a file, from the cached parameter.
    pub async fn xattr(self: &Arc<Self>, ino: u64, attribute: &OsStr) -> Result<Vec<u8>, FsError> {
        let attribute = attribute.to_str().ok_or(FsError::NoAttribute)?;
        if !attribute.starts_with("user.") {
            // No SELinux labels, ACLs or capabilities here. EOPNOTSUPP (not
            // ENODATA) lets `ls -l` stop asking for them on this mount after
            // the first file (coreutils remembers an unsupporting device),
            // where each would be a round trip per file and listing.
            return Err(FsError::UnsupportedAttribute);
        }
        let node = self.node(ino)?;
        let value_name = Self::value_name_of(&node).ok_or(FsError::NoAttribute)?;
        if !XATTR_NAMES.contains(&attribute) {
            return Err(FsError::NoAttribute);
        }
        let entry = self.value(value_name).await?;
        let parameter = self.present(&entry, value_name)?;
        let text = match attribute {
            "user.ssm.version" => parameter.version.to_string(),
            "user.ssm.type" => parameter.kind.as_str().to_string(),
            "user.ssm.last_modified" => {
                humantime::format_rfc3339_millis(parameter.last_modified.into()).to_string()
            }
            "user.ssm.data_type" => parameter.data_type.as_str().to_string(),
            "user.ssm.arn" => self.store.arn(value_name).ok_or(FsError::NoAttribute)?,
            "user.ssmfs.fetched_at" => {
                humantime::format_rfc3339_seconds(entry.validity.fetched_at()).to_string()
            }
            "user.ssmfs.stale" => {
                let stale = entry.validity.stale_logged || !entry.validity.is_fresh(Instant::now());
                if stale { "1" } else { "0" }.to_string()
            }
            _ => return Err(FsError::NoAttribute),
        };
        Ok(text.into_bytes())
    }

    /// The attributes a node has (none for directories).
    pub fn xattr_names(&self, ino: u64) -> Result<&'static [&'static str], FsError> {
        let node = self.node(ino)?;
        Ok(match Self::value_name_of(&node) {
            Some(_) => &XATTR_NAMES,
            None => &[],
        })
    }
}
